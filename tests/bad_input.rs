//! Bad configs, data and usage: exit code 2, one line on stderr naming the
//! culprit, no panic, and no run directory or output file left behind.

mod common;
use common::*;
use std::path::Path;

const GOOD: &str = "device: cpu\ndata:\n  train: X\nmodel:\n  d_hidden: 8\ntrain:\n  epochs: 1\n";

/// Asserts a clean user error: exit 2, a single `sae: error:` line that
/// contains every `needle`, no panic text.
fn assert_user_error(o: &std::process::Output, needles: &[&str], what: &str) {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{what}: expected exit 2, got {:?}; stderr:\n{err}",
        o.status.code()
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
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
}

fn train_fails(dir: &Path, name: &str, yaml: &str, sets: &[&str], needles: &[&str]) {
    let cfg = write_config(dir, &format!("{name}.yaml"), yaml);
    let run = dir.join(format!("run-{name}"));
    let mut args = vec![
        "train",
        "-q",
        "--config",
        &cfg,
        "--out",
        run.to_str().unwrap(),
    ];
    for s in sets {
        args.push("--set");
        args.push(s);
    }
    let o = sae(&args);
    assert_user_error(&o, needles, name);
    assert!(
        !run.exists(),
        "{name}: a run that failed validation left {} behind",
        run.display()
    );
}

#[test]
fn bad_configs_are_rejected_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = synth(dir.path(), 64, 4, 4, 1);
    let good = GOOD.replace('X', &x);
    let d = dir.path();
    train_fails(
        d,
        "unknown-key",
        &good.replace("epochs: 1", "epoch: 1"),
        &[],
        &["epoch", "epochs", "did you mean `epochs`?"],
    );
    train_fails(
        d,
        "misspelt-nested-key",
        &good.replace("d_hidden: 8", "d_hiden: 8"),
        &[],
        &["model", "d_hiden", "did you mean `d_hidden`?"],
    );
    train_fails(
        d,
        "wrong-type",
        &good.replace("epochs: 1", "epochs: ten"),
        &[],
        &["epochs"],
    );
    train_fails(d, "not-a-mapping", "- a\n- b\n", &[], &["mapping"]);
    train_fails(d, "bad-yaml", "data: [unclosed\n", &[], &["YAML"]);
    train_fails(
        d,
        "target-range",
        &good,
        &["sparsity.penalty=mean_abs", "sparsity.target=1.5"],
        &["sparsity.target"],
    );
    train_fails(
        d,
        "target-zero",
        &good,
        &[
            "model.activation=sigmoid",
            "sparsity.penalty=kl",
            "sparsity.target=0",
        ],
        &["sparsity.target"],
    );
    train_fails(
        d,
        "k-too-large",
        &good,
        &["model.activation=topk", "model.k=9"],
        &["model.k", "d_hidden"],
    );
    train_fails(
        d,
        "k-missing",
        &good,
        &["model.activation=topk"],
        &["model.k"],
    );
    train_fails(
        d,
        "lr-zero",
        &good,
        &["train.optimizer.lr=0"],
        &["train.optimizer.lr"],
    );
    train_fails(
        d,
        "lr-negative",
        &good,
        &["train.optimizer.lr=-1e-3"],
        &["train.optimizer.lr"],
    );
    train_fails(
        d,
        "batch-zero",
        &good,
        &["train.batch_size=0"],
        &["train.batch_size"],
    );
    train_fails(
        d,
        "batch-word",
        &good,
        &["train.batch_size=half"],
        &["batch_size"],
    );
    train_fails(
        d,
        "kl-unbounded",
        &good,
        &["sparsity.penalty=kl"],
        &["sparsity.penalty", "relu", "allow_unbounded_kl"],
    );
    train_fails(d, "device", &good, &["device=tpu"], &["device", "tpu"]);
    train_fails(
        d,
        "d-in-mismatch",
        &good,
        &["model.d_in=5"],
        &["model.d_in", "4 columns"],
    );
    train_fails(
        d,
        "missing-data",
        &good,
        &["data.train=nope.npy"],
        &["nope.npy"],
    );
    train_fails(
        d,
        "no-data",
        "model:\n  d_hidden: 4\n",
        &[],
        &["data.train"],
    );
    train_fails(
        d,
        "bad-set",
        &good,
        &["train.epochs"],
        &["--set", "key.path=value"],
    );
    train_fails(d, "set-through-scalar", &good, &["seed.x=1"], &["seed"]);
    train_fails(
        d,
        "valid-fraction",
        &good,
        &["data.valid_fraction=1.5"],
        &["data.valid_fraction"],
    );
    train_fails(
        d,
        "missing-init",
        &good,
        &["model.init=nope.safetensors"],
        &["model.init"],
    );
    train_fails(
        d,
        "bad-order",
        &good,
        &["train.order=nope.npy"],
        &["train.order"],
    );

    // A missing config file.
    let o = sae(&[
        "train",
        "--config",
        "/nonexistent/c.yaml",
        "--out",
        d.join("r").to_str().unwrap(),
    ]);
    assert_user_error(&o, &["/nonexistent/c.yaml"], "missing-config");
}

/// Writes a raw .npy with the given header dict and payload.
fn raw_npy(path: &Path, dict: &str, payload: &[u8]) {
    let mut h = dict.to_string();
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend_from_slice(&(h.len() as u16).to_le_bytes());
    b.extend_from_slice(h.as_bytes());
    b.extend_from_slice(payload);
    std::fs::write(path, b).unwrap();
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn bad_data_files_are_rejected_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = |n: &str| d.join(n).display().to_string();
    raw_npy(
        &d.join("1d.npy"),
        "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }",
        &f32s(&[1.0; 4]),
    );
    raw_npy(
        &d.join("3d.npy"),
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2, 1), }",
        &f32s(&[1.0; 4]),
    );
    raw_npy(
        &d.join("0rows.npy"),
        "{'descr': '<f4', 'fortran_order': False, 'shape': (0, 3), }",
        &[],
    );
    raw_npy(
        &d.join("0cols.npy"),
        "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 0), }",
        &[],
    );
    raw_npy(
        &d.join("complex.npy"),
        "{'descr': '<c8', 'fortran_order': False, 'shape': (2, 2), }",
        &[0u8; 32],
    );
    raw_npy(
        &d.join("bool.npy"),
        "{'descr': '|b1', 'fortran_order': False, 'shape': (2, 2), }",
        &[0u8; 4],
    );
    raw_npy(
        &d.join("truncated.npy"),
        "{'descr': '<f4', 'fortran_order': False, 'shape': (10, 10), }",
        &f32s(&[1.0; 7]),
    );
    raw_npy(
        &d.join("nan.npy"),
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }",
        &f32s(&[1.0, 2.0, f32::NAN, 0.0]),
    );
    raw_npy(
        &d.join("inf.npy"),
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }",
        &f32s(&[1.0, 2.0, 0.0, f32::NEG_INFINITY]),
    );
    raw_npy(
        &d.join("object.npy"),
        "{'descr': '|O', 'fortran_order': False, 'shape': (2, 2), }",
        &[0u8; 32],
    );
    raw_npy(
        &d.join("unicode.npy"),
        "{'descr': '<U3', 'fortran_order': False, 'shape': (2, 2), }",
        &[0u8; 48],
    );
    raw_npy(
        &d.join("bytes.npy"),
        "{'descr': '|S3', 'fortran_order': False, 'shape': (2, 2), }",
        &[0u8; 12],
    );
    std::fs::create_dir(d.join("empty-shards")).unwrap();
    py(
        "import numpy as np, sys; np.savez(sys.argv[1], train=np.ones((4, 3), np.float32))",
        &[&p("arch.npz")],
    );
    std::fs::write(d.join("magic.npy"), b"PK\x03\x04 this is not npy").unwrap();
    // Header claims 4e14 values (1.6 PB) but 16 bytes follow: must not allocate from the header.
    raw_npy(
        &d.join("lies.npy"),
        "{'descr': '<f4', 'fortran_order': False, 'shape': (100000000000, 4000), }",
        &[0u8; 16],
    );
    raw_npy(
        &d.join("lies-fortran.npy"),
        "{'descr': '<f8', 'fortran_order': True, 'shape': (100000000000, 4000), }",
        &[0u8; 16],
    );
    // Fuzzer finding: deep bracket nesting made the header parser backtrack for minutes.
    raw_npy(&d.join("nested.npy"), "{'descr': '<f2', 'fortran_order': False, 'shape': (2, 3),'shape':[[[[[[[[[[[[[[[[[[[[[ (2, 3), }", &[0u8; 12]);
    raw_npy(&d.join("overflow.npy"), "{'descr': '<f8', 'fortran_order': False, 'shape': (18446744073709551615, 18446744073709551615), }", &[0u8; 16]);
    let cases: &[(&str, &[&str])] = &[
        ("1d.npy", &["1d.npy", "2-D"]),
        ("3d.npy", &["3d.npy", "2-D"]),
        ("0rows.npy", &["0rows.npy", "at least one row"]),
        ("0cols.npy", &["0cols.npy", "at least one row"]),
        ("complex.npy", &["complex.npy", "not supported"]),
        ("bool.npy", &["bool.npy", "not supported"]),
        ("truncated.npy", &["truncated.npy"]),
        ("nan.npy", &["nan.npy", "row 1, column 0", "NaN"]),
        ("inf.npy", &["inf.npy", "row 1, column 1", "inf"]),
        ("object.npy", &["object.npy", "not supported"]),
        ("unicode.npy", &["unicode.npy", "not supported"]),
        ("bytes.npy", &["bytes.npy", "not supported"]),
        ("empty-shards", &["empty-shards", "no .npy shards"]),
        ("arch.npz:nope", &["arch.npz", "nope"]),
        ("arch.npz", &["arch.npz", ":KEY"]),
        ("magic.npy", &["magic.npy", "not a valid .npy"]),
        ("lies.npy", &["lies.npy", "truncated"]),
        ("lies-fortran.npy", &["lies-fortran.npy", "truncated"]),
        ("overflow.npy", &["overflow.npy"]),
        ("nested.npy", &["nested.npy", "nests brackets"]),
        ("missing.npy", &["missing.npy", "no such file"]),
    ];
    for (file, needles) in cases {
        let yaml = GOOD.replace('X', &p(file));
        train_fails(d, &format!("data-{file}"), &yaml, &[], needles);
    }
}

#[test]
fn model_commands_reject_bad_models_and_mismatched_data() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, _) = synth(d, 64, 4, 4, 1);
    let cfg = write_config(d, "c.yaml", &GOOD.replace('X', &x));
    let run = d.join("run").display().to_string();
    sae_ok(&["train", "-q", "--config", &cfg, "--out", &run]);
    let (x5, _) = {
        let sub = d.join("five");
        std::fs::create_dir(&sub).unwrap();
        synth(&sub, 16, 5, 4, 1)
    };
    let out = d.join("codes.npy").display().to_string();
    let o = sae(&["encode", "--model", &run, "--data", &x5, "--out", &out]);
    assert_user_error(&o, &["5 columns", "d_in is 4"], "encode-d-in-mismatch");
    assert!(!Path::new(&out).exists(), "a failed encode left {out}");
    let o = sae(&["decode", "--model", &run, "--data", &x, "--out", &out]);
    assert_user_error(&o, &["4 columns", "d_hidden is 8"], "decode-width-mismatch");
    let o = sae(&[
        "eval",
        "--model",
        &d.join("nope").display().to_string(),
        "--data",
        &x,
    ]);
    assert_user_error(&o, &["nope"], "eval-missing-model");
    let o = sae(&["eval", "--model", &x, "--data", &x]);
    assert_user_error(&o, &["unrecognised model format"], "eval-npy-as-model");
    // eval memory-maps float32 files: non-finite rows are still refused, by row.
    let nan = d.join("nan4.npy");
    raw_npy(
        &nan,
        "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }",
        &f32s(&[
            0.0,
            1.0,
            2.0,
            3.0,
            0.0,
            1.0,
            2.0,
            3.0,
            0.0,
            f32::INFINITY,
            2.0,
            3.0,
        ]),
    );
    let o = sae(&["eval", "--model", &run, "--data", nan.to_str().unwrap()]);
    assert_user_error(&o, &["nan4.npy", "row 2"], "eval-mapped-nonfinite");
    // Usage errors (clap) are exit 2 as well.
    let o = sae(&["train"]);
    assert_eq!(o.status.code(), Some(2));
    let o = sae(&["frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn existing_run_directory_needs_force() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, _) = synth(d, 64, 4, 4, 1);
    let cfg = write_config(d, "c.yaml", &GOOD.replace('X', &x));
    let run = d.join("run").display().to_string();
    sae_ok(&["train", "-q", "--config", &cfg, "--out", &run]);
    let before = std::fs::read(d.join("run/model.safetensors")).unwrap();
    let o = sae(&[
        "train", "-q", "--config", &cfg, "--out", &run, "--set", "seed=5",
    ]);
    assert_user_error(&o, &["--force"], "existing-run-dir");
    assert_eq!(
        before,
        std::fs::read(d.join("run/model.safetensors")).unwrap(),
        "refused run changed the model"
    );
    sae_ok(&[
        "train", "-q", "--config", &cfg, "--out", &run, "--set", "seed=5", "--force",
    ]);
    assert_ne!(
        before,
        std::fs::read(d.join("run/model.safetensors")).unwrap(),
        "--force did not replace"
    );
}

#[test]
fn allow_nonfinite_drops_rows_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut v = vec![0.5f32; 40];
    v[5] = f32::NAN;
    v[13] = f32::INFINITY;
    raw_npy(
        &d.join("x.npy"),
        "{'descr': '<f4', 'fortran_order': False, 'shape': (10, 4), }",
        &f32s(&v),
    );
    let cfg = write_config(
        d,
        "c.yaml",
        &GOOD.replace('X', &d.join("x.npy").display().to_string()),
    );
    let run = d.join("run").display().to_string();
    let o = sae(&[
        "train",
        "-q",
        "--config",
        &cfg,
        "--out",
        &run,
        "--set",
        "data.allow_nonfinite=true",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("dropped 2 of 10 rows"),
        "{}",
        stderr(&o)
    );
    println!("{:<40} -> {}", "allow-nonfinite", stderr(&o).trim());
    assert_eq!(summary(Path::new(&run))["train"]["rows"].as_i64(), Some(8));
}

/// Outputs that cannot be written: exit 2 naming the path, nothing partial.
#[test]
fn unwritable_and_full_output_locations_are_user_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, _) = synth(d, 256, 4, 4, 1);
    let cfg = write_config(d, "c.yaml", &GOOD.replace('X', &x));
    // Root ignores permission bits, so "unwritable" is a path through a regular file.
    let file = d.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let under = file.join("run").display().to_string();
    let o = sae(&["train", "-q", "--config", &cfg, "--out", &under]);
    assert_user_error(&o, &[&under], "out-under-a-file");
    let run = d.join("run").display().to_string();
    sae_ok(&["train", "-q", "--config", &cfg, "--out", &run]);
    let codes = file.join("codes.npy").display().to_string();
    let o = sae(&["encode", "--model", &run, "--data", &x, "--out", &codes]);
    assert_user_error(&o, &["codes.npy"], "encode-out-under-a-file");

    // A full disk: a 64 KiB tmpfs (needs root; skipped elsewhere).
    let mnt = d.join("small");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=64k",
            "tmpfs",
            mnt.to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        println!("full-disk: cannot mount a tmpfs here (not root?); skipped");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&mnt);
    // 4096 x 64 float32 codes = 1 MiB: cannot fit.
    let big = d.join("big");
    std::fs::create_dir(&big).unwrap();
    let (xb, _) = synth(&big, 4096, 4, 4, 1);
    let codes = mnt.join("codes.npy").display().to_string();
    let o = sae(&["encode", "--model", &run, "--data", &xb, "--out", &codes]);
    assert_user_error(&o, &["codes.npy"], "encode-disk-full");
    assert!(
        std::fs::read_dir(&mnt).unwrap().next().is_none(),
        "partial output left on the full disk"
    );
    // A training run whose outputs do not fit.
    let full_run = mnt.join("run").display().to_string();
    let o = sae(&[
        "train",
        "-q",
        "--config",
        &cfg,
        "--out",
        &full_run,
        "--set",
        "model.d_hidden=512",
    ]);
    assert_user_error(&o, &["small/run"], "train-disk-full");
    assert!(
        !mnt.join("run/model.safetensors").exists(),
        "a half-written model on the full disk"
    );
}
