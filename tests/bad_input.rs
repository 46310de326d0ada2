//! Bad configs, data and usage: exit code 2, one line on stderr naming the
//! culprit, no panic, and no run directory or output file left behind.

mod common;
use common::*;
use std::path::Path;

const GOOD: &str = "device: cpu\ndata:\n  train: X\nmodel:\n  d_hidden: 8\ntrain:\n  epochs: 1\n";

/// A training case on GOOD with its data file at `x`.
fn good(dir: &Path, name: &str, x: &str) -> Case {
    Case::new(dir, name).yaml(GOOD.replace('X', x))
}

#[test]
fn bad_configs_are_rejected_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, _) = synth(d, 64, 4, 4, 1);
    let good_yaml = GOOD.replace('X', &x);
    // Broken config files: (name, config text, what stderr names).
    for (name, yaml, needles) in [
        (
            "unknown-key",
            good_yaml.replace("epochs: 1", "epoch: 1"),
            &["epoch", "epochs", "did you mean `epochs`?"][..],
        ),
        (
            "misspelt-nested-key",
            good_yaml.replace("d_hidden: 8", "d_hiden: 8"),
            &["model", "d_hiden", "did you mean `d_hidden`?"],
        ),
        (
            "wrong-type",
            good_yaml.replace("epochs: 1", "epochs: ten"),
            &["epochs"],
        ),
        ("not-a-mapping", "- a\n- b\n".into(), &["mapping"]),
        ("bad-yaml", "data: [unclosed\n".into(), &["YAML"]),
        ("no-data", "model:\n  d_hidden: 4\n".into(), &["data.train"]),
    ] {
        Case::new(d, name).yaml(yaml).fails(needles);
    }
    // A good config with bad overrides: (name, --set, what stderr names).
    let bad_sets: &[(&str, &[&str], &[&str])] = &[
        (
            "target-range",
            &["sparsity.penalty=mean_abs", "sparsity.target=1.5"],
            &["sparsity.target"],
        ),
        (
            "target-zero",
            &[
                "model.activation=sigmoid",
                "sparsity.penalty=kl",
                "sparsity.target=0",
            ],
            &["sparsity.target"],
        ),
        (
            "k-too-large",
            &["model.activation=topk", "model.k=9"],
            &["model.k", "d_hidden"],
        ),
        ("k-missing", &["model.activation=topk"], &["model.k"]),
        (
            "lr-zero",
            &["train.optimizer.lr=0"],
            &["train.optimizer.lr"],
        ),
        (
            "lr-negative",
            &["train.optimizer.lr=-1e-3"],
            &["train.optimizer.lr"],
        ),
        ("batch-zero", &["train.batch_size=0"], &["train.batch_size"]),
        ("batch-word", &["train.batch_size=half"], &["batch_size"]),
        (
            "kl-unbounded",
            &["sparsity.penalty=kl"],
            &["sparsity.penalty", "relu", "allow_unbounded_kl"],
        ),
        ("device", &["device=tpu"], &["device", "tpu"]),
        (
            "d-in-mismatch",
            &["model.d_in=5"],
            &["model.d_in", "4 columns"],
        ),
        ("missing-data", &["data.train=nope.npy"], &["nope.npy"]),
        ("bad-set", &["train.epochs"], &["--set", "key.path=value"]),
        ("set-through-scalar", &["seed.x=1"], &["seed"]),
        (
            "valid-fraction",
            &["data.valid_fraction=1.5"],
            &["data.valid_fraction"],
        ),
        (
            "missing-init",
            &["model.init=nope.safetensors"],
            &["model.init"],
        ),
        ("bad-order", &["train.order=nope.npy"], &["train.order"]),
        (
            "adam-momentum",
            &["train.optimizer.momentum=0.9"],
            &["train.optimizer.momentum", "betas"],
        ),
        (
            "adam-muon-decay",
            &["train.optimizer.muon_weight_decay=0.1"],
            &["train.optimizer.muon_weight_decay", "muon"],
        ),
        (
            "signum-momentum",
            &["train.optimizer.name=signum", "train.optimizer.momentum=0"],
            &["train.optimizer.momentum", "signum"],
        ),
        (
            "signum-decay",
            &[
                "train.optimizer.name=signum",
                "train.optimizer.weight_decay=0.01",
            ],
            &["train.optimizer.weight_decay", "signum"],
        ),
        (
            "signum-cosine",
            &["train.optimizer.name=signum", "train.lr_schedule=cosine"],
            &["train.lr_schedule", "schedule-free"],
        ),
        (
            "signum-lr-decay",
            &["train.optimizer.name=signum", "train.lr_decay_steps=5"],
            &["lr_decay_steps", "schedule-free"],
        ),
        (
            "muon-fused",
            &["train.optimizer.name=muon", "train.optimizer.fused=true"],
            &["train.optimizer.fused", "muon"],
        ),
        (
            "muon-resample",
            &["train.optimizer.name=muon", "train.resample_every=5"],
            &["train.resample_every", "muon"],
        ),
        (
            "muon-decay-negative",
            &[
                "train.optimizer.name=muon",
                "train.optimizer.muon_weight_decay=-1",
            ],
            &["train.optimizer.muon_weight_decay"],
        ),
    ];
    for (name, sets, needles) in bad_sets {
        good(d, name, &x).sets(*sets).fails(needles);
    }

    // A missing config file.
    expect_user_error(
        &[
            "train",
            "--config",
            "/nonexistent/c.yaml",
            "--out",
            d.join("r").to_str().unwrap(),
        ],
        &["/nonexistent/c.yaml"],
    );
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

/// A C-order .npy header dict.
fn header(descr: &str, shape: &str) -> String {
    format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}")
}

#[test]
fn bad_data_files_are_rejected_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = |n: &str| d.join(n).display().to_string();
    // (file, dtype, shape, payload)
    for (file, descr, shape, payload) in [
        ("1d.npy", "<f4", "(4,)", f32s(&[1.0; 4])),
        ("3d.npy", "<f4", "(2, 2, 1)", f32s(&[1.0; 4])),
        ("0rows.npy", "<f4", "(0, 3)", vec![]),
        ("0cols.npy", "<f4", "(3, 0)", vec![]),
        ("complex.npy", "<c8", "(2, 2)", vec![0u8; 32]),
        ("bool.npy", "|b1", "(2, 2)", vec![0u8; 4]),
        ("truncated.npy", "<f4", "(10, 10)", f32s(&[1.0; 7])),
        ("nan.npy", "<f4", "(2, 2)", f32s(&[1.0, 2.0, f32::NAN, 0.0])),
        (
            "inf.npy",
            "<f4",
            "(2, 2)",
            f32s(&[1.0, 2.0, 0.0, f32::NEG_INFINITY]),
        ),
        ("object.npy", "|O", "(2, 2)", vec![0u8; 32]),
        ("unicode.npy", "<U3", "(2, 2)", vec![0u8; 48]),
        ("bytes.npy", "|S3", "(2, 2)", vec![0u8; 12]),
        // A 2-byte void is ml_dtypes' bfloat16; other voids are not numbers.
        ("void4.npy", "|V4", "(2, 2)", vec![0u8; 16]),
        // Header claims 4e14 values (1.6 PB) but 16 bytes follow: must not allocate from the header.
        ("lies.npy", "<f4", "(100000000000, 4000)", vec![0u8; 16]),
    ] {
        raw_npy(&d.join(file), &header(descr, shape), &payload);
    }
    std::fs::create_dir(d.join("empty-shards")).unwrap();
    py(
        "import numpy as np, sys; np.savez(sys.argv[1], train=np.ones((4, 3), np.float32))",
        &[&p("arch.npz")],
    );
    std::fs::write(d.join("magic.npy"), b"PK\x03\x04 this is not npy").unwrap();
    raw_npy(
        &d.join("lies-fortran.npy"),
        "{'descr': '<f8', 'fortran_order': True, 'shape': (100000000000, 4000), }",
        &[0u8; 16],
    );
    // Fuzzer finding: deep bracket nesting made the header parser backtrack for minutes.
    raw_npy(&d.join("nested.npy"), "{'descr': '<f2', 'fortran_order': False, 'shape': (2, 3),'shape':[[[[[[[[[[[[[[[[[[[[[ (2, 3), }", &[0u8; 12]);
    raw_npy(
        &d.join("overflow.npy"),
        &header("<f8", "(18446744073709551615, 18446744073709551615)"),
        &[0u8; 16],
    );
    let cases: &[(&str, &[&str])] = &[
        ("1d.npy", &["1d.npy", "2-D"]),
        ("3d.npy", &["3d.npy", "2-D"]),
        ("0rows.npy", &["0rows.npy", "at least one row"]),
        ("0cols.npy", &["0cols.npy", "at least one row"]),
        ("complex.npy", &["complex.npy", "not supported"]),
        ("bool.npy", &["bool.npy", "not supported"]),
        (
            "void4.npy",
            &["void4.npy", "|V4", "not supported", "bfloat16"],
        ),
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
        good(d, &format!("data-{file}"), &p(file)).fails(needles);
    }
}

#[test]
fn model_commands_reject_bad_models_and_mismatched_data() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, _) = synth(d, 64, 4, 4, 1);
    let run = good(d, "run", &x).train();
    let run = run.path();
    let (x5, _) = {
        let sub = d.join("five");
        std::fs::create_dir(&sub).unwrap();
        synth(&sub, 16, 5, 4, 1)
    };
    let out = d.join("codes.npy").display().to_string();
    // encode: d_in mismatch.
    expect_user_error(
        &["encode", "--model", run, "--data", &x5, "--out", &out],
        &["5 columns", "d_in is 4"],
    );
    assert!(!Path::new(&out).exists(), "a failed encode left {out}");
    // decode: width mismatch.
    expect_user_error(
        &["decode", "--model", run, "--data", &x, "--out", &out],
        &["4 columns", "d_hidden is 8"],
    );
    // eval: a missing model, and an .npy as a model.
    let nope = d.join("nope").display().to_string();
    expect_user_error(&["eval", "--model", &nope, "--data", &x], &["nope"]);
    expect_user_error(
        &["eval", "--model", &x, "--data", &x],
        &["unrecognised model format"],
    );
    // eval memory-maps float32 files: non-finite rows are still refused, by row.
    let nan = d.join("nan4.npy");
    let mut rows = [0.0, 1.0, 2.0, 3.0].repeat(3);
    rows[9] = f32::INFINITY;
    raw_npy(&nan, &header("<f4", "(3, 4)"), &f32s(&rows));
    expect_user_error(
        &["eval", "--model", run, "--data", nan.to_str().unwrap()],
        &["nan4.npy", "row 2"],
    );
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
    let case = good(d, "run", &x);
    let run = case.clone().train();
    let before = run.model_bytes();
    case.clone().set("seed=5").user_error(&["--force"]);
    assert_eq!(before, run.model_bytes(), "refused run changed the model");
    case.set("seed=5").flag("--force").train();
    assert_ne!(before, run.model_bytes(), "--force did not replace");
}

#[test]
fn allow_nonfinite_drops_rows_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut v = vec![0.5f32; 40];
    v[5] = f32::NAN;
    v[13] = f32::INFINITY;
    let x = d.join("x.npy");
    raw_npy(&x, &header("<f4", "(10, 4)"), &f32s(&v));
    let run = good(d, "run", x.to_str().unwrap())
        .set("data.allow_nonfinite=true")
        .train();
    assert!(
        run.stderr.contains("dropped 2 of 10 rows"),
        "{}",
        run.stderr
    );
    println!("{:<40} -> {}", "allow-nonfinite", run.stderr.trim());
    assert_eq!(run.summary()["train"]["rows"].as_i64(), Some(8));
}

/// Outputs that cannot be written: exit 2 naming the path, nothing partial.
#[test]
fn unwritable_and_full_output_locations_are_user_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, _) = synth(d, 256, 4, 4, 1);
    // Root ignores permission bits, so "unwritable" is a path through a regular file.
    let file = d.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let under = file.join("run");
    good(d, "run", &x)
        .out(&under)
        .user_error(&[under.to_str().unwrap()]);
    let run = good(d, "run", &x).train();
    let codes = file.join("codes.npy").display().to_string();
    expect_user_error(
        &[
            "encode",
            "--model",
            run.path(),
            "--data",
            &x,
            "--out",
            &codes,
        ],
        &["codes.npy"],
    );

    // A full disk: a 64 KiB tmpfs (needs root; skipped elsewhere).
    let Some(disk) = small_disk(d) else {
        return;
    };
    let mnt = disk.0.clone();
    // 4096 x 64 float32 codes = 1 MiB: cannot fit.
    let big = d.join("big");
    std::fs::create_dir(&big).unwrap();
    let (xb, _) = synth(&big, 4096, 4, 4, 1);
    let codes = mnt.join("codes.npy").display().to_string();
    expect_user_error(
        &[
            "encode",
            "--model",
            run.path(),
            "--data",
            &xb,
            "--out",
            &codes,
        ],
        &["codes.npy"],
    );
    assert!(
        std::fs::read_dir(&mnt).unwrap().next().is_none(),
        "partial output left on the full disk"
    );
    // A training run whose outputs do not fit.
    good(d, "run", &x)
        .out(mnt.join("run"))
        .set("model.d_hidden=512")
        .user_error(&["small/run"]);
    assert!(
        !mnt.join("run/model.safetensors").exists(),
        "a half-written model on the full disk"
    );
}

/// `/proc/meminfo`'s `key` in bytes (0 when unreadable).
fn meminfo(key: &str) -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb * 1024.0)
}

/// A model too large for memory is refused from the estimate, before any
/// allocation and before the run directory exists: one line with the
/// estimate, what is available and what to change.
#[test]
fn a_model_too_large_for_memory_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, _) = synth(d, 256, 64, 16, 3);
    let needles = [
        "model.d_hidden",
        "need about",
        "with Adam and gradients",
        "step temporaries",
        "available (",
        "train.batch_size",
        "data.stream: true",
    ];
    // 1e9 latents x 64: 2.6 TB with Adam and gradients, refused anywhere.
    let err = good(d, "absurd", &x)
        .set("model.d_hidden=1000000000")
        .fails(&needles);
    assert!(err.contains("TB"), "{err}");
    // The issue's 1e7 latents x 64: about 88 GB, where less is available.
    let estimate = 87e9;
    if estimate > 0.9 * meminfo("MemAvailable:") {
        good(d, "wide", &x)
            .set("model.d_hidden=10000000")
            .fails(&needles);
    } else {
        println!("wide: more than 97 GB available here; the 1e7-latent case NOT RUN");
    }
    // SAE_MEMORY_CHECK=off lets the same config reach libtorch: see
    // an_allocation_failure_is_one_line_and_exit_2.
}

/// An allocation libtorch cannot make (the check forced off) is one line,
/// exit 2, naming what to change: no panic, no C++ stack trace, no run
/// directory (the model is allocated before the directory is made).
#[test]
fn an_allocation_failure_is_one_line_and_exit_2() {
    // 4e9 latents x 64 float32: a 1 TB tensor. Linux refuses it at once
    // unless it overcommits blindly (vm.overcommit_memory = 1), or has
    // that much memory: then the run would really try, so it is not run.
    let overcommit = std::fs::read_to_string("/proc/sys/vm/overcommit_memory").unwrap_or_default();
    if overcommit.trim() == "1" || meminfo("MemTotal:") > 500e9 {
        println!("allocation failure: this machine could allocate 1 TB; NOT RUN");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, _) = synth(d, 64, 64, 16, 3);
    let case = good(d, "alloc", &x).set("model.d_hidden=4000000000");
    let o = std::process::Command::new(sae_bin())
        .args(case.args())
        .env("SAE_MEMORY_CHECK", "off")
        .output()
        .unwrap();
    let err = assert_user_error(
        &o,
        "alloc",
        &[
            "initialising the model",
            "out of memory",
            "could not allocate 1.0 TB",
            "model.d_hidden",
        ],
    );
    assert!(
        err.len() < 400 && !err.contains("frame #") && !err.contains("Exception raised"),
        "{err}"
    );
    assert!(
        !case.dir().exists(),
        "a failed allocation left the run directory"
    );
}

/// A directory given as data is one array cut in shards: one dtype, one
/// width. It is listed on stderr; anything else is refused naming the odd
/// shard against the first (`sae latents` outputs: int64 ids and float32
/// values of one width).
#[test]
fn shard_directories_must_hold_one_dtype_and_width() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let shards = |name: &str, files: &[(&str, &str, usize, usize)]| -> String {
        let sub = d.join(name);
        std::fs::create_dir(&sub).unwrap();
        for &(file, descr, rows, cols) in files {
            let size: usize = descr[2..].parse().unwrap();
            // Small integers (as floats or ints): any dtype reads them.
            let payload: Vec<u8> = (0..rows * cols)
                .flat_map(|i| {
                    let v = (i % 7) as i64;
                    match descr {
                        "<f4" => (v as f32).to_le_bytes().to_vec(),
                        "<f8" => (v as f64).to_le_bytes().to_vec(),
                        _ => v.to_le_bytes()[..size].to_vec(),
                    }
                })
                .collect();
            raw_npy(
                &sub.join(file),
                &header(descr, &format!("({rows}, {cols})")),
                &payload,
            );
        }
        sub.display().to_string()
    };
    // One dtype and width: trains, and the directory is listed.
    let ok = shards("ok", &[("a.npy", "<f4", 40, 4), ("b.npy", "<f4", 24, 4)]);
    let run = good(d, "ok-run", &ok).train();
    assert!(
        run.stderr
            .contains("2 .npy shards, 64 rows x 4 columns, float32"),
        "{}",
        run.stderr
    );
    // Integer shards of one type train, as a single integer file does.
    let ints = shards("ints", &[("a.npy", "<i8", 40, 4), ("b.npy", "<i8", 24, 4)]);
    let run = good(d, "ints-run", &ints).train();
    assert!(
        run.stderr.contains("64 rows x 4 columns, int64"),
        "{}",
        run.stderr
    );
    // Mixed dtypes, and mixed widths: refused naming both files.
    let mixed = shards("mixed", &[("a.npy", "<f4", 40, 4), ("b.npy", "<i8", 40, 4)]);
    good(d, "mixed-run", &mixed).fails(&["data.train", "b.npy", "int64", "a.npy", "float32"]);
    let floats = shards(
        "floats",
        &[("a.npy", "<f4", 40, 4), ("b.npy", "<f8", 40, 4)],
    );
    good(d, "floats-run", &floats).fails(&["b.npy", "float64", "a.npy", "float32"]);
    let widths = shards(
        "widths",
        &[("a.npy", "<f4", 40, 4), ("b.npy", "<f4", 40, 5)],
    );
    let err = good(d, "widths-run", &widths).fails(&["b.npy", "5 columns", "a.npy", "4 columns"]);
    assert!(err.contains("one dtype and width"), "{err}");
    // Other commands read data directories the same way.
    let x = format!("{ok}/a.npy");
    let model = good(d, "model", &x).train();
    let codes = d.join("codes.npy").display().to_string();
    expect_user_error(
        &[
            "encode",
            "--model",
            model.path(),
            "--data",
            &mixed,
            "--out",
            &codes,
        ],
        &["b.npy", "int64"],
    );
    // The issue's case: training on a `sae latents` output directory.
    let latents = d.join("latents").display().to_string();
    sae_ok(&[
        "latents",
        "--model",
        model.path(),
        "--data",
        &x,
        "--out",
        &latents,
        "--samples",
        "0",
    ]);
    good(d, "latents-run", &latents).fails(&["top_values.npy", "float32", "top_rows.npy", "int64"]);
}
