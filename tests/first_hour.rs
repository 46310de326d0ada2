//! What a new user meets first (issue 22's small items): the quickstart on
//! their own data, errors that blame the right place and point to the
//! right key, `sae info` naming libtorch, dense `encode` saying what it
//! wrote, and a summary table whose columns never run together.

mod common;
use common::*;

#[test]
fn the_help_workflow_runs_on_a_users_own_data() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Another width than the demo's, and no truth file: as `sae --help` shows.
    let x = d.join("x.npy").display().to_string();
    sae_ok(&["data", "synth", "--n", "2000", "--d-in", "24", "--out", &x]);
    let root = env!("CARGO_MANIFEST_DIR");
    let run = d.join("q").display().to_string();
    let out = sae_ok(&[
        "train",
        "--config",
        &format!("{root}/configs/quickstart.yaml"),
        "--set",
        &format!("data.train={x}"),
        "--set",
        "train.epochs=2",
        "--out",
        &run,
    ]);
    assert!(out.contains("run directory"), "{out}");
    let codes = d.join("codes.npy").display().to_string();
    let o = sae(&["encode", "--model", &run, "--data", &x, "--out", &codes]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("wrote {codes} [2000 x 512, float32]")),
        "dense encode says what it wrote: {}",
        stderr(&o)
    );
    let info = sae_ok(&["info"]);
    assert!(info.contains("libtorch: 2.11"), "{info}");
}

#[test]
fn errors_blame_the_set_and_point_to_the_right_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, _) = synth(d, 200, 8, 8, 1);
    let cfg = write_config(
        d,
        "c.yaml",
        &format!("data: {{train: {x}}}\nmodel: {{d_hidden: 8}}\n"),
    );
    let out = d.join("r").display().to_string();
    let train = |set: &str, needles: &[&str]| {
        expect_user_error(
            &["train", "--config", &cfg, "--out", &out, "--set", set],
            needles,
        );
    };
    // A typo in --set is the --set's fault, not c.yaml's.
    train(
        "train.epochz=3",
        &["--set train.epochz=3", "did you mean `epochs`"],
    );
    train(
        "train.lr=0.1",
        &["--set train.lr=0.1", "did you mean `train.optimizer.lr`"],
    );
    train(
        "model.k=4",
        &["model.k: only used by activations topk, abstopk, batchtopk, matryoshka_batchtopk, matching_pursuit"],
    );
    // In the file, the file is blamed.
    let bad = write_config(
        d,
        "bad.yaml",
        &format!("data: {{train: {x}}}\ntrain: {{lr: 0.1}}\n"),
    );
    expect_user_error(
        &["train", "--config", &bad, "--out", &out],
        &[
            "bad.yaml: train.lr: unknown field `lr`",
            "train.optimizer.lr",
        ],
    );
    // OMP with more atoms than the model has.
    let run = d.join("run").display().to_string();
    sae_ok(&[
        "train",
        "-q",
        "--config",
        &cfg,
        "--out",
        &run,
        "--set",
        "train.epochs=1",
    ]);
    expect_user_error(
        &[
            "eval",
            "--model",
            &run,
            "--data",
            &x,
            "--encoder",
            "omp",
            "--k",
            "1000",
        ],
        &["--k 1000: more atoms than the model's 8 decoder rows"],
    );
}

#[test]
fn the_summary_table_keeps_large_values_apart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, _) = synth(d, 300, 8, 8, 1);
    let big = d.join("big.npy").display().to_string();
    py(
        "import numpy as np, sys; np.save(sys.argv[2], np.load(sys.argv[1]) * 1e5)",
        &[&x, &big],
    );
    let cfg = write_config(
        d,
        "c.yaml",
        &format!("data: {{train: {big}, valid_fraction: 0.2}}\nmodel: {{d_hidden: 8}}\ntrain: {{epochs: 1}}\n"),
    );
    let out = sae_ok(&[
        "train",
        "--config",
        &cfg,
        "--out",
        d.join("r").to_str().unwrap(),
    ]);
    let mse = out
        .lines()
        .find(|l| l.starts_with("mse "))
        .unwrap_or_else(|| panic!("no mse row: {out}"));
    let cells: Vec<&str> = mse.split_whitespace().collect();
    assert_eq!(cells.len(), 3, "columns ran together: {mse:?}");
    let v: f64 = cells[1].parse().unwrap();
    assert!(v > 1e6, "{mse}");
}

/// A run says how libtorch's idle workers wait (issue 22: the busy-machine
/// default) in its first line and `summary.json`; a user's own choice wins.
#[test]
fn a_run_says_how_its_threads_wait() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, _) = synth(d, 256, 8, 8, 1);
    let cfg = write_config(
        d,
        "c.yaml",
        &format!(
            "data: {{train: {x}}}\nmodel: {{d_hidden: 8}}\ntrain: {{epochs: 1, threads: 2}}\n"
        ),
    );
    let run = |env: &[(&str, &str)]| {
        let out = d.join("r");
        let mut cmd = std::process::Command::new(sae_bin());
        cmd.args(["train", "--config", &cfg, "--force", "--out"])
            .arg(&out)
            .env_remove("OMP_WAIT_POLICY")
            .env_remove("GOMP_SPINCOUNT")
            .envs(env.iter().copied());
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let first = stderr(&o).lines().next().unwrap_or_default().to_string();
        let s = summary(&out);
        (
            first,
            s["omp_wait"].as_str().unwrap().to_string(),
            s["threads"].as_i64(),
        )
    };
    let (first, wait, threads) = run(&[]);
    assert_eq!(wait, "spin 10000 then sleep (sae's default)");
    assert_eq!(threads, Some(2));
    assert!(
        first.starts_with("training 1 step on cpu, 2 threads, OpenMP wait: spin 10000"),
        "{first}"
    );
    let (first, wait, _) = run(&[("OMP_WAIT_POLICY", "PASSIVE")]);
    assert_eq!(wait, "OMP_WAIT_POLICY=PASSIVE");
    assert!(
        first.ends_with("OpenMP wait: OMP_WAIT_POLICY=PASSIVE"),
        "{first}"
    );
    let (_, wait, _) = run(&[("GOMP_SPINCOUNT", "300000")]);
    assert_eq!(wait, "spin 300000 then sleep (GOMP_SPINCOUNT)");
}
