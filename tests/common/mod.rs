//! Helpers shared by the integration tests: run the real binary, run the
//! project's Python (torch + numpy), make small data, and build training
//! runs ([`Case`] -> [`Run`]) and user-error checks once for every test file.
#![allow(dead_code)]

pub mod lm;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tch::Tensor;

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

/// Runs `cmd`; returns its stdout, panicking with `what`, the command and
/// both streams unless it exits 0.
pub fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\n{cmd:?}\n--- stdout\n{}\n--- stderr\n{}",
            out.status,
            stdout(&out),
            stderr(&out)
        );
    }
    stdout(&out)
}

/// Runs a Python snippet with `args` (as sys.argv[1:]); returns stdout.
pub fn py(code: &str, args: &[&str]) -> String {
    run_ok(
        Command::new(python()).arg("-c").arg(code).args(args),
        &format!("python\n--- code ---\n{code}\n---"),
    )
}

/// Runs a Python script with `args`; returns stdout.
pub fn py_file(script: impl AsRef<Path>, args: &[&str]) -> String {
    let script = script.as_ref();
    run_ok(
        Command::new(python()).arg(script).args(args),
        &format!("{} {args:?}", script.display()),
    )
}

/// Whether the venv has sae_lens. Under `make test` (SAE_REQUIRE_SAELENS=1)
/// its absence is a failure; a bare `cargo test` says loudly that the
/// SAELens checks of `test` did not run.
pub fn saelens_available(test: &str) -> bool {
    python_module_available(test, "sae_lens", "make saelens")
}

/// Whether the venv has scikit-learn (the OMP reference), under the same
/// rule as [`saelens_available`].
pub fn sklearn_available(test: &str) -> bool {
    python_module_available(test, "sklearn", "make sklearn")
}

/// Whether the venv's Python imports `module`; when not, a failure under
/// SAE_REQUIRE_SAELENS=1 (`make test`), else a loud SKIPPED line.
pub fn python_module_available(test: &str, module: &str, make_target: &str) -> bool {
    let ok = Command::new(python())
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        let msg = format!(
            "{test}: {module} is not installed in {}; `{make_target}` installs it (`make test` does)",
            python().display()
        );
        if std::env::var("SAE_REQUIRE_SAELENS").as_deref() == Ok("1") {
            panic!("{msg}");
        }
        eprintln!("SKIPPED (NOT RUN): {msg}");
    }
    ok
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

/// The metrics `sae eval` reports for every model (table and `--json`).
pub const EVAL_METRICS: [&str; 7] = [
    "mse",
    "fvu",
    "explained_variance",
    "l0",
    "l1",
    "dead_fraction",
    "dense_fraction",
];

/// Runs a model command, `sae CMD --model MODEL --data DATA --out OUT EXTRA...`
/// (encode, reconstruct, decode, score), panicking unless it exits 0;
/// returns stdout.
pub fn apply(
    cmd: &str,
    model: impl AsRef<Path>,
    data: impl AsRef<Path>,
    out: impl AsRef<Path>,
    extra: &[&str],
) -> String {
    let s = |p: &Path| p.to_str().expect("a UTF-8 path").to_string();
    let (model, data, out) = (s(model.as_ref()), s(data.as_ref()), s(out.as_ref()));
    let mut args = vec![cmd, "--model", &model, "--data", &data, "--out", &out];
    args.extend_from_slice(extra);
    sae_ok(&args)
}

/// Asserts a clean user error: exit 2, a single `sae: error:` line on stderr
/// that contains every `needle`, no panic text. Returns stderr.
pub fn assert_user_error(o: &Output, what: &str, needles: &[&str]) -> String {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{what}: expected exit 2, got {:?}; stderr:\n{err}",
        o.status.code()
    );
    let lines: Vec<&str> = err.trim().lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: expected one stderr line, got:\n{err}"
    );
    assert!(lines[0].starts_with("sae: error:"), "{what}: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{what}: panic: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "{what}: stderr lacks `{n}`:\n{err}");
    }
    println!("{what:<40} -> {}", lines[0]);
    err
}

/// Runs `sae ARGS` and asserts a clean user error naming every `needle`
/// (see [`assert_user_error`]). Returns stderr.
pub fn expect_user_error(args: &[&str], needles: &[&str]) -> String {
    assert_user_error(&sae(args), &args.join(" "), needles)
}

/// One `sae train` invocation, built up: the config (written from YAML, or
/// an existing file), `--set` overrides, extra flags and the run directory.
/// `Case::new(dir, "name")` writes DIR/name.yaml and trains into DIR/name.
#[derive(Clone, Debug)]
pub struct Case {
    name: String,
    config: PathBuf,
    yaml: Option<String>,
    out: PathBuf,
    sets: Vec<String>,
    flags: Vec<String>,
}

impl Case {
    pub fn new(dir: impl AsRef<Path>, name: &str) -> Case {
        let dir = dir.as_ref();
        Case {
            name: name.to_string(),
            config: dir.join(format!("{name}.yaml")),
            yaml: None,
            out: dir.join(name),
            sets: Vec::new(),
            flags: Vec::new(),
        }
    }

    /// The config text, written to DIR/NAME.yaml when the case runs.
    pub fn yaml(mut self, yaml: impl Into<String>) -> Case {
        self.yaml = Some(yaml.into());
        self
    }

    /// Trains from an existing config file instead of writing one.
    pub fn config(mut self, path: impl AsRef<Path>) -> Case {
        self.config = path.as_ref().to_path_buf();
        self.yaml = None;
        self
    }

    /// Another run directory than DIR/NAME.
    pub fn out(mut self, out: impl AsRef<Path>) -> Case {
        self.out = out.as_ref().to_path_buf();
        self
    }

    /// One `--set key=value` override.
    pub fn set(mut self, key_value: impl Into<String>) -> Case {
        self.sets.push(key_value.into());
        self
    }

    /// `--set` overrides, in order.
    pub fn sets<S: AsRef<str>>(mut self, key_values: impl IntoIterator<Item = S>) -> Case {
        self.sets
            .extend(key_values.into_iter().map(|s| s.as_ref().to_string()));
        self
    }

    /// An extra command-line flag (`--force`, `--resume`).
    pub fn flag(mut self, flag: &str) -> Case {
        self.flags.push(flag.to_string());
        self
    }

    /// The run directory this case trains into.
    pub fn dir(&self) -> &Path {
        &self.out
    }

    /// `sae` arguments: `train -q --config C --out O [--set S]... [FLAG]...`.
    /// Writes the config file when the case has YAML.
    pub fn args(&self) -> Vec<String> {
        if let Some(yaml) = &self.yaml {
            std::fs::write(&self.config, yaml).expect("writing the config");
        }
        let path = |p: &Path| p.to_str().expect("a UTF-8 path").to_string();
        let mut args: Vec<String> = vec![
            "train".into(),
            "-q".into(),
            "--config".into(),
            path(&self.config),
            "--out".into(),
            path(&self.out),
        ];
        for s in &self.sets {
            args.extend(["--set".to_string(), s.clone()]);
        }
        args.extend(self.flags.iter().cloned());
        args
    }

    /// Runs the case; the output whatever the exit status.
    pub fn output(&self) -> Output {
        Command::new(sae_bin())
            .args(self.args())
            .output()
            .expect("running target/release/sae")
    }

    /// Trains, panicking with the command and its output unless it exits 0.
    pub fn train(self) -> Run {
        let o = self.output();
        assert!(
            o.status.success(),
            "{}: sae {:?} failed ({:?}):\n--- stdout\n{}\n--- stderr\n{}",
            self.name,
            self.args(),
            o.status.code(),
            stdout(&o),
            stderr(&o)
        );
        Run {
            dir: self.out,
            stdout: stdout(&o),
            stderr: stderr(&o),
        }
    }

    /// Asserts a clean user error naming every `needle` (see
    /// [`assert_user_error`]); returns stderr.
    pub fn user_error(&self, needles: &[&str]) -> String {
        assert_user_error(&self.output(), &self.name, needles)
    }

    /// [`Case::user_error`], and no run directory left behind.
    pub fn fails(&self, needles: &[&str]) -> String {
        let err = self.user_error(needles);
        assert!(
            !self.out.exists(),
            "{}: a run that failed left {} behind",
            self.name,
            self.out.display()
        );
        err
    }
}

/// A finished training run.
#[derive(Clone, Debug)]
pub struct Run {
    pub dir: PathBuf,
    /// What `sae train -q` printed (the summary table).
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The run directory as a string, for command lines.
    pub fn path(&self) -> &str {
        self.dir.to_str().expect("a UTF-8 path")
    }

    pub fn join(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    pub fn summary(&self) -> serde_json::Value {
        summary(&self.dir)
    }

    /// `summary.json`'s `[split][key]` as a number (`split`: train, valid).
    pub fn stat(&self, split: &str, key: &str) -> f64 {
        let s = self.summary();
        s[split][key]
            .as_f64()
            .unwrap_or_else(|| panic!("summary.json has no number {split}.{key}: {s}"))
    }

    pub fn metrics(&self) -> Vec<serde_json::Value> {
        metrics_lines(&self.dir)
    }

    /// One key of every metrics.jsonl line.
    pub fn metric(&self, key: &str) -> Vec<f64> {
        self.metrics()
            .iter()
            .map(|l| {
                l[key]
                    .as_f64()
                    .unwrap_or_else(|| panic!("no `{key}` in {l}"))
            })
            .collect()
    }

    /// The weights in model.safetensors.
    pub fn model(&self) -> HashMap<String, Tensor> {
        Tensor::read_safetensors(self.join("model.safetensors"))
            .expect("reading model.safetensors")
            .into_iter()
            .collect()
    }

    /// model.safetensors, byte for byte.
    pub fn model_bytes(&self) -> Vec<u8> {
        std::fs::read(self.join("model.safetensors")).expect("reading model.safetensors")
    }

    /// `sae CMD --model RUN --data DATA --out OUT EXTRA...` (see [`apply`]).
    pub fn apply(
        &self,
        cmd: &str,
        data: impl AsRef<Path>,
        out: impl AsRef<Path>,
        extra: &[&str],
    ) -> String {
        apply(cmd, &self.dir, data, out, extra)
    }
}

/// A 64 KiB tmpfs under `dir` for full-disk tests, unmounted when dropped.
pub struct SmallDisk(pub PathBuf);

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Mounts a [`SmallDisk`] at `dir/small`; None, saying so on stdout, where
/// no tmpfs can be mounted (mounting needs root).
pub fn small_disk(dir: &Path) -> Option<SmallDisk> {
    let mnt = dir.join("small");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&mnt)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        println!("full-disk: cannot mount a tmpfs here (not root?); NOT RUN");
        return None;
    }
    Some(SmallDisk(mnt))
}
