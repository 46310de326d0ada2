//! Any text given to the config parser (with and without a `--set`): an error
//! or a config that passes validation, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (yaml, set) = match text.split_once("\n--set ") {
        Some((y, s)) => (y.to_string(), vec![s.to_string()]),
        None => (text.to_string(), vec![]),
    };
    if let Ok(cfg) = sae::config::Config::from_yaml_str(&yaml, "fuzz.yaml", &set) {
        assert!(cfg.validate().is_ok());
        // The resolved config round-trips.
        let again = sae::config::Config::from_yaml_str(&cfg.to_yaml().unwrap(), "again", &[]).unwrap();
        assert_eq!(again.to_yaml().unwrap(), cfg.to_yaml().unwrap());
    }
});
