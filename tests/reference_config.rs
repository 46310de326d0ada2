//! configs/reference.yaml documents every key: it must parse, and its values
//! must be exactly the defaults.

use sae::config::Config;

#[test]
fn reference_yaml_lists_every_key_with_its_default() {
    let root = env!("CARGO_MANIFEST_DIR");
    let text = std::fs::read_to_string(format!("{root}/configs/reference.yaml")).unwrap();
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    doc["data"]["train"] = "x.npy".into();
    let from_reference: serde_yaml::Value = serde_yaml::to_value(
        Config::from_yaml_str(&serde_yaml::to_string(&doc).unwrap(), "reference.yaml", &[])
            .unwrap(),
    )
    .unwrap();
    let defaults: serde_yaml::Value = serde_yaml::to_value(
        Config::from_yaml_str("data: {train: x.npy}", "defaults", &[]).unwrap(),
    )
    .unwrap();
    assert_eq!(
        from_reference, defaults,
        "reference.yaml and the defaults disagree"
    );
    // Every key of the defaults appears in the reference file (not just by default filling).
    fn keys(v: &serde_yaml::Value, prefix: &str, out: &mut Vec<String>) {
        if let Some(m) = v.as_mapping() {
            for (k, v) in m {
                let k = format!("{prefix}{}", k.as_str().unwrap());
                out.push(k.clone());
                keys(v, &format!("{k}."), out);
            }
        }
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    keys(&doc, "", &mut a);
    keys(&defaults, "", &mut b);
    a.sort();
    b.sort();
    assert_eq!(
        a, b,
        "reference.yaml keys differ from the config struct's keys"
    );
    // Every shipped training config parses and validates.
    for entry in std::fs::read_dir(format!("{root}/configs")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".yaml") && name != "reference.yaml" && !name.starts_with("sweep") {
            Config::from_file(&path, &[]).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        }
    }
}

#[test]
fn set_overrides_nested_keys_and_parses_yaml_values() {
    let cfg = Config::from_yaml_str(
        "data: {train: x.npy}",
        "t",
        &[
            "train.optimizer.lr=0.5".into(),
            "train.batch_size=full".into(),
            "model.activation=topk".into(),
            "model.k=3".into(),
            "train.optimizer.betas=[0.8, 0.9]".into(),
        ],
    )
    .unwrap();
    assert_eq!(cfg.train.optimizer.lr, 0.5);
    assert_eq!(cfg.train.batch_size, sae::config::BatchSize::Full);
    assert_eq!(cfg.model.k, Some(3));
    assert_eq!(cfg.train.optimizer.betas, [0.8, 0.9]);
}
