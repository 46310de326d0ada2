//! Helpers shared by the integration tests: run the real binary, run the
//! project's Python (torch + numpy), make small data.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn sae_bin() -> &'static str {
    env!("CARGO_BIN_EXE_sae")
}

/// Runs `sae` with `args`; returns the output (never panics on failure).
pub fn sae(args: &[&str]) -> Output {
    Command::new(sae_bin())
        .args(args)
        .output()
        .expect("running target/release/sae")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `sae` and panics with its stderr unless it exits 0.
pub fn sae_ok(args: &[&str]) -> String {
    let o = sae(args);
    assert!(
        o.status.success(),
        "sae {:?} failed ({:?}):\n{}",
        args,
        o.status.code(),
        stderr(&o)
    );
    stdout(&o)
}

/// The project venv's Python (torch, numpy, safetensors). Fails loudly when
/// it is missing: these tests check our numbers against PyTorch itself.
pub fn python() -> PathBuf {
    let p = std::env::var_os("SAE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("third_party/venv/bin/python")
        });
    assert!(
        p.exists(),
        "Python reference interpreter {} not found: run `make setup` (or set SAE_PYTHON)",
        p.display()
    );
    p
}

/// Runs a Python snippet with `args` (as sys.argv[1:]); returns stdout.
pub fn py(code: &str, args: &[&str]) -> String {
    let o = Command::new(python())
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .expect("running python");
    assert!(
        o.status.success(),
        "python failed:\n{}\n--- code ---\n{code}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Synthetic data + truth in `dir`; returns (x.npy, truth.npy) paths.
pub fn synth(
    dir: &Path,
    n: usize,
    d_in: usize,
    features: usize,
    active: usize,
) -> (String, String) {
    let x = dir.join("x.npy").display().to_string();
    let t = dir.join("truth.npy").display().to_string();
    sae_ok(&[
        "data",
        "synth",
        "--n",
        &n.to_string(),
        "--d-in",
        &d_in.to_string(),
        "--features",
        &features.to_string(),
        "--active",
        &active.to_string(),
        "--out",
        &x,
        "--truth",
        &t,
    ]);
    (x, t)
}

/// Writes a config file and returns its path.
pub fn write_config(dir: &Path, name: &str, yaml: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, yaml).unwrap();
    p.display().to_string()
}

/// Parses DIR/metrics.jsonl.
pub fn metrics_lines(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

pub fn summary(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap()
}

/// Writes `yaml` as DIR/NAME.yaml, trains it into DIR/NAME with `--set`
/// overrides (panics with stderr on failure) and returns the run directory.
pub fn train_run(dir: &Path, name: &str, yaml: &str, sets: &[&str]) -> PathBuf {
    let cfg = write_config(dir, &format!("{name}.yaml"), yaml);
    let run = dir.join(name);
    let mut args = vec![
        "train",
        "-q",
        "--config",
        &cfg,
        "--out",
        run.to_str().unwrap(),
    ];
    for s in sets {
        args.extend_from_slice(&["--set", s]);
    }
    sae_ok(&args);
    run
}
