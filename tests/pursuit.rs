//! Pursuit encoders (`--encoder omp|mp`) through the real binary: OMP equals
//! scikit-learn's `orthogonal_mp`, MP equals SAELens's matching-pursuit
//! encoder (tests/reference/pursuit.py), eval reports them, and bad
//! flags or models are refused cleanly.

mod common;
use common::*;
use std::path::Path;

const REFERENCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference/pursuit.py");

/// A small trained model (standardised input, so normalisation and a
/// non-zero b_dec are both in play) and its data.
fn trained(d: &Path, name: &str, extra: &str) -> (String, String) {
    let (x, _) = synth(d, 300, 16, 40, 3);
    let yaml = format!(
        "device: cpu\nseed: 1\ndata:\n  train: {x}\n  normalize: standardize\n\
         model:\n  d_hidden: 48\n{extra}train:\n  epochs: 2\n  batch_size: 64\n"
    );
    let run = Case::new(d, name).yaml(yaml).train();
    (run.path().to_string(), x)
}

fn encode(model: &str, x: &str, out: &Path, flags: &[&str]) -> String {
    let out = out.display().to_string();
    let mut args = vec!["encode", "--model", model, "--data", x, "--out", &out];
    args.extend_from_slice(flags);
    sae_ok(&args);
    out
}

/// Runs the reference on our codes; returns its JSON verdict.
fn reference(method: &str, model: &str, x: &str, ours: &str, flags: &[&str]) -> serde_json::Value {
    let st = format!("{model}/model.safetensors");
    let mut args = vec![method, &st, x, ours];
    args.extend_from_slice(flags);
    let out = py_file(REFERENCE, &args);
    println!("{method} {flags:?}: {out}");
    serde_json::from_str(out.trim()).unwrap()
}

fn close(v: &serde_json::Value, what: &str) {
    let diff = v["max_abs"].as_f64().unwrap();
    let scale = v["ref_max_abs"].as_f64().unwrap().max(1.0);
    assert!(
        diff <= 1e-5 * scale,
        "{what}: codes differ by {diff} (scale {scale}): {v}"
    );
    assert!(
        v["support_equal"].as_bool().unwrap(),
        "{what}: supports differ: {v}"
    );
}

#[test]
fn omp_matches_scikit_learn() {
    if !sklearn_available("omp_matches_scikit_learn") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (model, x) = trained(d, "m", "");
    for k in ["1", "5"] {
        let z = encode(
            &model,
            &x,
            &d.join(format!("omp{k}.npy")),
            &["--encoder", "omp", "--k", k],
        );
        let v = reference("omp", &model, &x, &z, &["--k", k]);
        close(&v, &format!("omp k={k}"));
        assert_eq!(v["ref_l0_max"].as_i64().unwrap(), k.parse::<i64>().unwrap());
    }
    // A tied model: the dictionary is W_enc.T (saved as W_dec).
    let td = d.join("tied");
    std::fs::create_dir_all(&td).unwrap();
    let (tied, x) = trained(&td, "t", "  tied: true\n");
    let z = encode(
        &tied,
        &x,
        &td.join("omp.npy"),
        &["--encoder", "omp", "--k", "5"],
    );
    close(&reference("omp", &tied, &x, &z, &["--k", "5"]), "omp tied");
}

#[test]
fn mp_matches_saelens_reference() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (model, x) = trained(d, "m", "");
    // Step limit only; the duplicate-support stop (many steps); and the
    // residual threshold stopping part of the rows.
    for (name, flags) in [
        ("k4", &["--k", "4"][..]),
        ("k40", &["--k", "40"]),
        ("thr", &["--k", "12", "--residual-threshold", "1.5"]),
    ] {
        let mut all = vec!["--encoder", "mp"];
        all.extend_from_slice(flags);
        let z = encode(&model, &x, &d.join(format!("mp_{name}.npy")), &all);
        let v = reference("mp", &model, &x, &z, flags);
        close(&v, name);
        if let Some(s) = v.get("saelens_max_abs") {
            assert!(
                s.as_f64().unwrap() == 0.0,
                "transcription differs from sae_lens: {v}"
            );
        } else {
            saelens_available("mp_matches_saelens_reference");
        }
    }
}

fn eval_json(model: &str, x: &str, flags: &[&str]) -> serde_json::Value {
    let mut args = vec!["eval", "--model", model, "--data", x, "--json"];
    args.extend_from_slice(flags);
    serde_json::from_str(&sae_ok(&args)).unwrap()
}

#[test]
fn eval_and_reconstruct_with_pursuit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (model, x) = trained(d, "m", "");
    let k = 6;
    let omp = eval_json(&model, &x, &["--encoder", "omp", "--k", "6"]);
    let mp = eval_json(&model, &x, &["--encoder", "mp", "--k", "6"]);
    let own = eval_json(&model, &x, &[]);
    let (l0, fvu_omp, fvu_mp) = (
        omp["l0"].as_f64().unwrap(),
        omp["fvu"].as_f64().unwrap(),
        mp["fvu"].as_f64().unwrap(),
    );
    println!("fvu: omp {fvu_omp}, mp {fvu_mp}, model {}", own["fvu"]);
    assert!(l0 <= k as f64 + 1e-9 && l0 > 0.0, "omp l0 {l0}");
    assert!(mp["l0"].as_f64().unwrap() <= k as f64 + 1e-9);
    assert!(
        fvu_omp <= fvu_mp + 1e-9,
        "omp fvu {fvu_omp} > mp fvu {fvu_mp}"
    );
    // reconstruct = decode(encode) with the same encoder.
    let z = encode(
        &model,
        &x,
        &d.join("z.npy"),
        &["--encoder", "omp", "--k", "6"],
    );
    let xh = d.join("xh.npy").display().to_string();
    let dz = d.join("dz.npy").display().to_string();
    sae_ok(&[
        "reconstruct",
        "--model",
        &model,
        "--data",
        &x,
        "--out",
        &xh,
        "--encoder",
        "omp",
        "--k",
        "6",
    ]);
    sae_ok(&["decode", "--model", &model, "--data", &z, "--out", &dz]);
    let diff = py(
        "import numpy as np, sys; print(np.abs(np.load(sys.argv[1]) - np.load(sys.argv[2])).max())",
        &[&xh, &dz],
    );
    assert!(
        diff.trim().parse::<f64>().unwrap() < 1e-5,
        "reconstruct vs decode(encode): {diff}"
    );
}

/// `eval.encoder: omp` in a config: summary.json's `pursuit` metrics equal
/// `sae eval --encoder omp` of the finished run, and a sweep puts them in
/// its table; configs that cannot use a pursuit are refused before training.
#[test]
fn eval_encoder_in_runs_and_sweeps() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, _) = synth(d, 300, 16, 40, 3);
    let base = format!(
        "device: cpu\nseed: 1\ndata: {{train: {x}, valid_fraction: 0.2}}\n\
         model: {{d_hidden: 48, activation: topk, k: 4}}\nsparsity: {{penalty: none}}\n\
         train: {{epochs: 2, batch_size: 64}}\neval: {{encoder: omp}}\n"
    );
    let run = Case::new(d, "run").yaml(base.clone()).train();
    let s = summary(Path::new(run.path()));
    let p = &s["pursuit"];
    assert_eq!(p["encoder"], "omp");
    assert_eq!(p["k"], 4, "eval.k defaults to model.k");
    assert!(p["valid"]["fvu"].as_f64().is_some(), "{p}");
    // The same rows as the run's training split: its data file minus valid.
    let model = run.path().to_string();
    let own = eval_json(&model, &x, &[]);
    let omp = eval_json(&model, &x, &["--encoder", "omp", "--k", "4"]);
    let n = |v: &serde_json::Value| v["rows"].as_f64().unwrap();
    let (tr, va) = (&p["train"], &p["valid"]);
    let (nt, nv) = (n(tr), n(va));
    assert_eq!(nt + nv, n(&omp));
    // Pooled over both splits, the run's figures give sae eval's on all rows.
    let pooled =
        |key: &str| (tr[key].as_f64().unwrap() * nt + va[key].as_f64().unwrap() * nv) / (nt + nv);
    let l0 = omp["l0"].as_f64().unwrap();
    assert!(
        (pooled("l0") - l0).abs() < 1e-6,
        "l0 {} vs {l0}",
        pooled("l0")
    );
    assert!((pooled("mse") - omp["mse"].as_f64().unwrap()).abs() < 1e-6);
    assert!(
        omp["fvu"].as_f64().unwrap() < own["fvu"].as_f64().unwrap(),
        "omp {} vs own {}",
        omp["fvu"],
        own["fvu"]
    );
    // A sweep over model.k: pursuit columns, filled for every point.
    let cfg = write_config(d, "base", &base);
    let sweep = write_config(
        d,
        "sweep",
        &format!("base: {cfg}\ngrid:\n  model.k: [2, 4]\n"),
    );
    let out = d.join("sw").display().to_string();
    sae_ok(&["sweep", "--config", &sweep, "--out", &out]);
    let csv = std::fs::read_to_string(d.join("sw/sweep.csv")).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let col = header
        .iter()
        .position(|h| *h == "pursuit_l0")
        .expect("pursuit_l0 column");
    for (line, k) in csv.lines().skip(1).zip([2.0, 4.0]) {
        let l0: f64 = line.split(',').nth(col).unwrap().parse().unwrap();
        assert!(l0 <= k + 1e-9 && l0 > 0.0, "{line}");
    }
    assert!(std::fs::read_to_string(d.join("sw/sweep.md"))
        .unwrap()
        .contains("omp (k: each run's eval.k"));
    // Refusals, before anything is written.
    for (extra, needles) in [
        (
            "eval: {encoder: omp}\nmodel: {activation: relu}\n",
            &["eval.encoder omp", "eval.k"][..],
        ),
        ("eval: {k: 3}\n", &["eval.k", "omp or mp"]),
        (
            "eval: {encoder: mp}\nmodel: {decoder_activation: sigmoid}\n",
            &["eval.encoder mp", "sigmoid"],
        ),
    ] {
        let cfg = write_config(
            d,
            "bad",
            &format!("device: cpu\ndata: {{train: {x}}}\n{extra}"),
        );
        let out = d.join("bad-run").display().to_string();
        expect_user_error(&["train", "--config", &cfg, "--out", &out], needles);
        assert!(!d.join("bad-run").exists());
    }
}

#[test]
fn pursuit_refusals_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (model, x) = trained(d, "m", "");
    let out = d.join("z.npy").display().to_string();
    let io = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["encode", "--model", &model, "--data", &x, "--out", &out]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let check = |args: Vec<String>, needles: &[&str]| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        expect_user_error(&a, needles);
    };
    check(
        io(&["--encoder", "omp", "--k", "0"]),
        &["--k 0", "at least 1"],
    );
    check(io(&["--encoder", "mp", "--k", "-3"]), &["--k -3"]);
    check(io(&["--encoder", "omp"]), &["--encoder omp", "--k"]);
    check(io(&["--k", "4"]), &["--k", "--encoder omp or mp"]);
    check(
        io(&[
            "--encoder",
            "omp",
            "--k",
            "4",
            "--residual-threshold",
            "0.1",
        ]),
        &["--residual-threshold", "mp"],
    );
    check(
        io(&["--encoder", "mp", "--residual-threshold", "-1"]),
        &["--residual-threshold -1"],
    );
    assert!(!Path::new(&out).exists(), "no output after a refusal");
    // A sigmoid decoder is not linear: refused, naming the model.
    let sd = d.join("sig");
    std::fs::create_dir_all(&sd).unwrap();
    let (sig, x) = trained(&sd, "s", "  decoder_activation: sigmoid\n");
    for cmd in ["encode", "reconstruct"] {
        expect_user_error(
            &[
                cmd,
                "--model",
                &sig,
                "--data",
                &x,
                "--out",
                &out,
                "--encoder",
                "omp",
                "--k",
                "3",
            ],
            &["--model", "sigmoid", "--encoder omp"],
        );
    }
    expect_user_error(
        &[
            "eval",
            "--model",
            &sig,
            "--data",
            &x,
            "--encoder",
            "mp",
            "--k",
            "3",
        ],
        &["sigmoid", "--encoder mp"],
    );
}
