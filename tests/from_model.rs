//! Training rows from a language model (`data.model` + `data.tokens`) and
//! `sae activations`: activations equal torch's forward; train-from-model
//! equals train-from-dump bit for bit; exclusions, validation sequences,
//! float16 output and labels; every bad input is one line, exit 2, nothing
//! written.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Small scripted modules and token files (tests/fixtures/bad_lms.py), made
/// once per test binary.
fn bad_lms() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bad_lms.py");
        py_file(&script, &[dir.to_str().unwrap()]);
        dir
    })
}

fn p(dir: &Path, name: &str) -> String {
    dir.join(name).to_str().unwrap().to_string()
}

#[test]
fn bad_models_and_tokens_are_refused_in_one_line() {
    let b = bad_lms();
    let out = tempfile::tempdir().unwrap();
    let o = p(out.path(), "a.npy");
    let ok_tokens = p(b, "tokens_ok.npy");
    let run = |model: &str, tokens: &str, needles: &[&str]| {
        expect_user_error(
            &[
                "activations",
                "--model",
                model,
                "--tokens",
                tokens,
                "--out",
                &o,
                "-q",
                "--device",
                "cpu",
            ],
            needles,
        );
        assert!(!Path::new(&o).exists(), "{model}: wrote {o}");
    };
    run(
        &p(b, "no_forward.pt"),
        &ok_tokens,
        &["no_forward.pt", "no forward method"],
    );
    run(
        &p(b, "two_d.pt"),
        &ok_tokens,
        &["two_d.pt", "returned shape [1, 6]", "[1, 6, d]"],
    );
    run(&p(b, "tuple.pt"), &ok_tokens, &["several values"]);
    run(
        &p(b, "width.pt"),
        &ok_tokens,
        &["width.pt", "width 8 on sequences 0..8 but 1 before"],
    );
    run(&p(b, "ints.pt"), &ok_tokens, &["Int64", "floating-point"]);
    run(
        &p(b, "ok.pt"),
        &p(b, "tokens_float.npy"),
        &["tokens_float.npy", "must be integers", "'<f4'"],
    );
    run(
        &p(b, "ok.pt"),
        &p(b, "tokens_big.npy"),
        &["sequence 3 holds id 60 at position 4", "accepts ids 0..49"],
    );
    run(
        &p(b, "nan.pt"),
        &p(b, "tokens_nan.npy"),
        &["NaN or Inf activations at sequence 5, position 2", "token id 7"],
    );
    run(&p(b, "missing.pt"), &ok_tokens, &["missing.pt", "no such file"]);
    run(
        &p(b, "tokens_ok.npy"),
        &ok_tokens,
        &["tokens_ok.npy", "not a TorchScript module"],
    );
    // A sparse autoencoder where a language model is expected.
    let (x, _) = synth(out.path(), 300, 8, 8, 1);
    let sae_run = out.path().join("sae");
    sae_ok(&[
        "train",
        "-q",
        "--config",
        &write_config(
            out.path(),
            "s.yaml",
            &format!("data: {{train: {x}}}\nmodel: {{d_hidden: 8}}\ntrain: {{epochs: 1}}\n"),
        ),
        "--out",
        sae_run.to_str().unwrap(),
    ]);
    run(
        &p(&sae_run, "model.pt"),
        &ok_tokens,
        &["is a sparse autoencoder", "not a language model"],
    );
    // Exclusions outside the sequence, and a vocabulary of the wrong size.
    expect_user_error(
        &[
            "activations",
            "--model",
            &p(b, "ok.pt"),
            "--tokens",
            &ok_tokens,
            "--out",
            &o,
            "--exclude-positions",
            "6",
        ],
        &["exclude_positions: 6 is outside a sequence of 6 positions"],
    );
    let small = out.path().join("small_vocab.txt");
    std::fs::write(&small, (0..30).map(|i| format!("t{i}\n")).collect::<String>()).unwrap();
    let labels = p(out.path(), "labels.txt");
    let vocab_run = |vocab: &Path, needles: &[&str]| {
        expect_user_error(
            &[
                "activations",
                "--model",
                &p(b, "ok.pt"),
                "--tokens",
                &ok_tokens,
                "--out",
                &o,
                "--vocab",
                vocab.to_str().unwrap(),
                "--labels",
                &labels,
            ],
            needles,
        );
        assert!(!Path::new(&o).exists() && !Path::new(&labels).exists());
    };
    vocab_run(&small, &["small_vocab.txt has 30 entries", "holds id"]);
    let big = out.path().join("big_vocab.txt");
    std::fs::write(&big, (0..80).map(|i| format!("t{i}\n")).collect::<String>()).unwrap();
    vocab_run(&big, &["big_vocab.txt has 80 entries", "accepts ids 0..49 only"]);
}

#[test]
fn bad_model_source_configs_are_refused() {
    let b = bad_lms();
    let dir = tempfile::tempdir().unwrap();
    let base = format!(
        "device: cpu\ndata: {{model: {}, tokens: {}}}\nmodel: {{d_hidden: 16}}\n",
        p(b, "ok.pt"),
        p(b, "tokens_ok.npy")
    );
    let cfg = write_config(dir.path(), "c.yaml", &base);
    let out = p(dir.path(), "run");
    let train = |sets: &[&str], needles: &[&str]| {
        let mut args = vec!["train", "--config", &cfg, "--out", &out];
        for s in sets {
            args.extend(["--set", s]);
        }
        expect_user_error(&args, needles);
        assert!(!Path::new(&out).exists(), "{sets:?} wrote {out}");
    };
    train(&["data.train=x.npy"], &["data.model: not available with data.train"]);
    train(&["data.stream=true"], &["data.stream"]);
    train(&["train.batch_size=full"], &["batch_size: full"]);
    train(&["data.model_batch=0"], &["data.model_batch: 0"]);
    train(&["data.tokens=null"], &["data.model: needs data.tokens"]);
    train(&["data.context_size=4"], &["data.context_size: 4", "sequences of 6 tokens"]);
    train(&["data.valid_fraction=0.99"], &["leaves none to train on"]);
    train(
        &["data.exclude_tokens=[0]", "data.exclude_positions=[1,2,3,4,5]"],
        &["drop every position"],
    );
}
