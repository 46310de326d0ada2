//! `sae eval --truth --truth-acts` against sae_lens's own SynthSAEBench
//! evaluation (sae_lens.synthetic.evals, via tests/reference/synthbench.py) on
//! the same model and data (issue 23): MCC, uniqueness, precision, recall,
//! F1, accuracy, shrinkage, explained variance, L0s and dead latents.

mod common;
use common::*;
use std::path::Path;
use tch::Tensor;

#[test]
fn synthbench_scores_equal_sae_lens() {
    if !saelens_available("synthbench_scores_equal_sae_lens") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = |f: &str| d.join(f).display().to_string();
    sae_ok(&[
        "data",
        "synth",
        "--out",
        &p("x.npy"),
        "--n",
        "3000",
        "--d-in",
        "16",
        "--features",
        "24",
        "--active",
        "3",
        "--seed",
        "4",
        "--truth",
        &p("truth.npy"),
        "--truth-acts",
        &p("acts.npy"),
    ]);
    let acts = Tensor::read_npy(p("acts.npy")).unwrap();
    assert_eq!(acts.size(), [3000, 24]);
    let run = Case::new(d, "run")
        .yaml(format!(
            "data: {{train: {x}}}\nmodel: {{d_hidden: 32, activation: topk, k: 3, \
             init_scheme: sae}}\nsparsity: {{penalty: none}}\ntrain: {{epochs: 4}}\n",
            x = p("x.npy")
        ))
        .train();
    let w_dec = run.model()["W_dec"].shallow_clone();
    w_dec.write_npy(p("w_dec.npy")).unwrap();
    run.apply("encode", p("x.npy"), p("codes.npy"), &[]);
    run.apply("reconstruct", p("x.npy"), p("xhat.npy"), &[]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/synthbench.py");
    let theirs: serde_json::Value = serde_json::from_str(&py_file(
        &script,
        &[
            &p("x.npy"),
            &p("acts.npy"),
            &p("truth.npy"),
            &p("w_dec.npy"),
            &p("codes.npy"),
            &p("xhat.npy"),
        ],
    ))
    .unwrap();
    let out = sae_ok(&[
        "eval",
        "--model",
        run.path(),
        "--data",
        &p("x.npy"),
        "--truth",
        &p("truth.npy"),
        "--truth-acts",
        &p("acts.npy"),
        "--json",
        "--device",
        "cpu",
    ]);
    let ours: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ours = &ours["ground_truth"];
    let names = [
        "mcc",
        "uniqueness",
        "precision",
        "recall",
        "f1_score",
        "accuracy",
        "shrinkage",
        "explained_variance",
        "sae_l0",
        "true_l0",
        "dead_latents",
    ];
    for name in names {
        let (a, b) = (ours[name].as_f64().unwrap(), theirs[name].as_f64().unwrap());
        eprintln!("{name}: sae {a:.9} sae_lens {b:.9}");
        assert!((a - b).abs() <= 1e-6, "{name}: sae {a} vs sae_lens {b}");
    }
    // Scores that could hide a wrong definition: the model learned something.
    assert!(theirs["mcc"].as_f64().unwrap() > 0.5, "{theirs}");
    assert!(theirs["precision"].as_f64().unwrap() > 0.0, "{theirs}");
}
