//! Any byte string given to the `.npy` reader: an error or a matrix whose
//! size matches its shape, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = sae::data::npy::read_npy(data, "fuzz.npy") {
        assert_eq!(m.data.len(), m.rows * m.cols);
        assert!(m.rows > 0 && m.cols > 0);
        assert!(m.data.iter().all(|v| v.is_finite()));
    }
});
