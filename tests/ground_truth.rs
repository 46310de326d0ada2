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

/// `sae data synth --kind synthbench` with a deep exclusive hierarchy:
/// written activations keep its rules (a child only with its parent, one
/// child of a feature per row), and misuses of the flags are one-line
/// errors naming them.
#[test]
fn synth_deep_exclusive_hierarchy_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = |f: &str| d.join(f).display().to_string();
    let (x, acts) = (p("x.npy"), p("acts.npy"));
    let base = [
        "data",
        "synth",
        "--out",
        &x,
        "--n",
        "4000",
        "--features",
        "40",
        "--kind",
        "synthbench",
    ];
    let args = [
        &base[..],
        &[
            "--children",
            "3",
            "--depth",
            "2",
            "--exclusive",
            "--compensate",
            "--truth-acts",
            &acts,
        ],
    ]
    .concat();
    sae_ok(&args);
    // 13 features a tree: 3 roots (0..3), 9 children (3..12), 27 grandchildren (12..39).
    let fired = Tensor::read_npy(&acts).unwrap().gt(0.0);
    for (first, parents, level) in [(3i64, 0i64, 3i64), (12, 3, 9)] {
        for j in 0..level {
            let parent = fired.select(1, parents + j);
            let kids = fired.narrow(1, first + 3 * j, 3);
            let together = kids.sum_dim_intlist(1, false, tch::Kind::Int64);
            assert!(
                together.max().int64_value(&[]) <= 1,
                "siblings of {}",
                parents + j
            );
            let orphans = together.gt(0).logical_and(&parent.logical_not());
            assert_eq!(orphans.sum(tch::Kind::Int64).int64_value(&[]), 0);
        }
    }
    assert!(fired.narrow(1, 12, 27).any().int64_value(&[]) != 0);
    for (extra, needles) in [
        (&["--depth", "2"][..], &["--children"][..]),
        (
            &["--children", "1", "--exclusive"][..],
            &["--exclusive", "2 or more"][..],
        ),
        (
            &["--children", "3", "--depth", "4"][..],
            &["--depth 4", "121 features", "more than --features 40"][..],
        ),
        (&["--children", "2", "--depth", "0"][..], &["--depth 0"][..]),
    ] {
        let err = expect_user_error(&[&base[..], extra].concat(), needles);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}
