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
        &[
            "NaN or Inf activations at sequence 5, position 2",
            "token id 7",
        ],
    );
    run(
        &p(b, "missing.pt"),
        &ok_tokens,
        &["missing.pt", "no such file"],
    );
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
    std::fs::write(
        &small,
        (0..30).map(|i| format!("t{i}\n")).collect::<String>(),
    )
    .unwrap();
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
    vocab_run(
        &big,
        &["big_vocab.txt has 80 entries", "accepts ids 0..49 only"],
    );
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
    train(
        &["data.train=x.npy"],
        &["data.model: not available with data.train"],
    );
    train(&["data.stream=true"], &["data.stream"]);
    train(&["train.batch_size=full"], &["batch_size: full"]);
    train(&["data.model_batch=0"], &["data.model_batch: 0"]);
    train(&["data.tokens=null"], &["data.model: needs data.tokens"]);
    train(
        &["data.context_size=4"],
        &["data.context_size: 4", "sequences of 6 tokens"],
    );
    train(&["data.valid_fraction=0.99"], &["leaves none to train on"]);
    train(
        &[
            "data.exclude_tokens=[0]",
            "data.exclude_positions=[1,2,3,4,5]",
        ],
        &["drop every position"],
    );
}

/// `sae activations` on the tiny language model (tests/fixtures/tiny_lm.py)
/// against PyTorch: TorchScript to 1e-6 and .pt2 to 1e-5 of the eager
/// forward; exclusions drop exactly the rows torch's mask drops; a 1-D
/// stream is cut into sequences; float16 and bfloat16 are the float32 rounded; labels
/// mark each row's token.
#[test]
fn activations_equal_torch_forward_for_both_exports() {
    let lm = common::lm::tiny_lm();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let t64 = p(d, "t64.npy");
    py(
        "import numpy as np, sys; np.save(sys.argv[2], np.load(sys.argv[1])[:64])",
        &[&p(&lm, "tokens.npy"), &t64],
    );
    let act = |model: &str, tokens: &str, out: &str, extra: &[&str]| {
        let mut args = vec![
            "activations",
            "--model",
            model,
            "--tokens",
            tokens,
            "--out",
            out,
            "--device",
            "cpu",
            "-q",
        ];
        args.extend_from_slice(extra);
        sae_ok(&args)
    };
    let (pt, pt2) = (p(&lm, "lm.pt"), p(&lm, "lm.pt2"));
    let said = act(&pt, &t64, &p(d, "pt.npy"), &["--batch-size", "7"]);
    assert!(said.contains("2048 rows x 64 from 64 sequences"), "{said}");
    act(&pt2, &t64, &p(d, "pt2.npy"), &[]);
    act(
        &pt,
        &t64,
        &p(d, "excl.npy"),
        &["--exclude-tokens", "0,5", "--exclude-positions", "-1"],
    );
    act(&pt, &t64, &p(d, "half.npy"), &["--dtype", "float16"]);
    act(&pt, &t64, &p(d, "bf16.npy"), &["--dtype", "bfloat16"]);
    act(
        &pt,
        &p(&lm, "tokens_1d.npy"),
        &p(d, "stream.npy"),
        &["--context-size", "32"],
    );
    let labels = p(d, "labels.txt");
    act(
        &pt,
        &t64,
        &p(d, "labelled.npy"),
        &["--vocab", &p(&lm, "vocab.txt"), "--labels", &labels],
    );
    let report = py(
        r#"
import sys, numpy as np, torch
lm, d = sys.argv[1], sys.argv[2]
ref = np.load(f"{lm}/acts_ref.npy")                      # [64, 32, 64] eager
tok = np.load(f"{lm}/tokens.npy")[:64]
flat = ref.reshape(-1, ref.shape[-1])
pt, pt2 = np.load(f"{d}/pt.npy"), np.load(f"{d}/pt2.npy")
assert pt.shape == pt2.shape == flat.shape, (pt.shape, pt2.shape, flat.shape)
print("pt", np.abs(pt - flat).max(), "pt2", np.abs(pt2 - flat).max())
assert np.abs(pt - flat).max() <= 1e-6
assert np.abs(pt2 - flat).max() <= 1e-5
keep = ~np.isin(tok, [0, 5])
keep[:, -1] = False
excl = np.load(f"{d}/excl.npy")
assert excl.shape == (keep.sum(), 64), (excl.shape, keep.sum())
assert np.abs(excl - ref[keep]).max() <= 1e-6
half = np.load(f"{d}/half.npy")
assert half.dtype == np.float16 and np.array_equal(half, pt.astype(np.float16))
# bfloat16 as ml_dtypes saves it (`<V2`): torch's rounding of the float32 rows, bit for bit.
bf = np.load(f"{d}/bf16.npy")
assert bf.dtype.str == "|V2" and bf.shape == pt.shape, (bf.dtype, bf.shape)
assert np.array_equal(bf.view(np.int16), torch.from_numpy(pt).bfloat16().view(torch.int16).numpy())
ids = np.load(f"{lm}/tokens_1d.npy").astype(np.int64)
n = len(ids) // 32
m = torch.jit.load(f"{lm}/lm.pt")
with torch.no_grad():
    s_ref = torch.cat([m(torch.from_numpy(ids[:n * 32].reshape(n, 32)[i:i + 8]))
                       for i in range(0, n, 8)]).reshape(-1, 64).numpy()
s = np.load(f"{d}/stream.npy")
assert s.shape == s_ref.shape, (s.shape, s_ref.shape)
print("stream", np.abs(s - s_ref).max())
assert np.abs(s - s_ref).max() <= 1e-6
vocab = open(f"{lm}/vocab.txt", encoding="utf-8").read().split("\n")
lines = open(f"{d}/labels.txt", encoding="utf-8").read().split("\n")[:-1]
assert len(lines) == pt.shape[0], (len(lines), pt.shape)
for i in range(0, len(lines), 97):
    s_, p_ = divmod(i, 32)
    want = "\u27e6" + vocab[tok[s_, p_]] + "\u27e7"
    assert want in lines[i], (i, want, lines[i])
    assert lines[i].startswith("".join(vocab[t] for t in tok[s_, max(0, p_ - 8):p_]) + "\u27e6")
print("ok")
"#,
        &[lm.to_str().unwrap(), d.to_str().unwrap()],
    );
    println!("{report}");
    assert!(report.trim_end().ends_with("ok"), "{report}");
}

/// One config for the tiny model: top-k, standardised on the first 5,000
/// rows, BOS dropped, 2 epochs.
fn from_model_yaml(model: &str, tokens: &str, extra_data: &str) -> String {
    format!(
        "device: cpu
seed: 5
data:
  model: {model}
  tokens: {tokens}
  exclude_positions: [0]
  normalize: standardize
  norm_rows: 5000
{extra_data}
model: {{d_hidden: 256, activation: topk, k: 8}}
sparsity: {{penalty: auxk, weight: 0.03}}
train: {{epochs: 2, batch_size: 128, threads: 1, checkpoint_every: 100, dead_window: 50}}
"
    )
}

fn same_files(a: &Path, b: &Path, what: &str) {
    for f in ["model.safetensors", "metrics.jsonl"] {
        assert!(
            std::fs::read(a.join(f)).unwrap() == std::fs::read(b.join(f)).unwrap(),
            "{what}: {f} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

/// `data.normalize: whiten` fits its covariance on the source's first
/// norm_rows rows in the same chunked float64 pass as on its streamed dump:
/// the two runs (folded models included) stay byte-identical.
#[test]
fn whitened_training_from_the_model_equals_training_from_its_dump() {
    let lm = common::lm::tiny_lm();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tokens = p(&lm, "tokens.npy");
    let white = |yaml: String| {
        assert!(yaml.contains("normalize: standardize"));
        yaml.replace("normalize: standardize", "normalize: whiten")
    };
    let cfg = write_config(
        d,
        "white.yaml",
        &white(from_model_yaml(&p(&lm, "lm.pt"), &tokens, "")),
    );
    let dump = p(d, "white_acts.npy");
    sae_ok(&["activations", "--config", &cfg, "--out", &dump, "-q"]);
    let from_model = d.join("white_model");
    sae_ok(&[
        "train",
        "-q",
        "--config",
        &cfg,
        "--out",
        from_model.to_str().unwrap(),
    ]);
    let dump_yaml = white(from_model_yaml("X", "X", "")).replace(
        "  model: X\n  tokens: X\n  exclude_positions: [0]\n",
        &format!("  train: {dump}\n  stream: true\n"),
    );
    let dump_cfg = write_config(d, "white_dump.yaml", &dump_yaml);
    let from_dump = d.join("white_dump");
    sae_ok(&[
        "train",
        "-q",
        "--config",
        &dump_cfg,
        "--out",
        from_dump.to_str().unwrap(),
    ]);
    same_files(&from_model, &from_dump, "whitened");
}

/// Train from the model = train from `sae activations`' dump of the same
/// source read with data.stream (same windows, same order), byte for byte,
/// for TorchScript and .pt2; a held-out fraction holds out whole sequences.
#[test]
fn training_from_the_model_equals_training_from_its_dump() {
    let lm = common::lm::tiny_lm();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tokens = p(&lm, "tokens.npy");
    for model in ["lm.pt", "lm.pt2"] {
        let name = model.replace('.', "_");
        let cfg = write_config(
            d,
            &format!("{name}.yaml"),
            &from_model_yaml(&p(&lm, model), &tokens, ""),
        );
        let dump = p(d, &format!("{name}_acts.npy"));
        sae_ok(&["activations", "--config", &cfg, "--out", &dump, "-q"]);
        let from_model = d.join(format!("{name}_model"));
        sae_ok(&[
            "train",
            "-q",
            "--config",
            &cfg,
            "--out",
            from_model.to_str().unwrap(),
        ]);
        let dump_yaml = from_model_yaml("X", "X", "").replace(
            "  model: X\n  tokens: X\n  exclude_positions: [0]\n",
            &format!("  train: {dump}\n  stream: true\n"),
        );
        let dump_cfg = write_config(d, &format!("{name}_dump.yaml"), &dump_yaml);
        let from_dump = d.join(format!("{name}_dump"));
        sae_ok(&[
            "train",
            "-q",
            "--config",
            &dump_cfg,
            "--out",
            from_dump.to_str().unwrap(),
        ]);
        same_files(&from_model, &from_dump, model);
        let s = summary(&from_model);
        assert_eq!(
            s["steps"].as_i64(),
            Some(2 * (1321 * 31usize).div_ceil(128) as i64)
        );
        println!(
            "{model}: train-from-model = train-from-dump over {} steps",
            s["steps"]
        );
    }
    // data.valid_fraction: the last 10 % of sequences (133 of 1321), whole.
    let cfg = write_config(
        d,
        "valid.yaml",
        &from_model_yaml(&p(&lm, "lm.pt"), &tokens, "  valid_fraction: 0.1"),
    );
    let run = d.join("valid");
    sae_ok(&[
        "train",
        "-q",
        "--config",
        &cfg,
        "--out",
        run.to_str().unwrap(),
    ]);
    let s = summary(&run);
    assert_eq!(s["valid"]["rows"].as_i64(), Some(133 * 31), "{s}");
    assert_eq!(
        s["train"]["rows"].as_i64(),
        Some(5000),
        "the sample: data.norm_rows"
    );
    assert_eq!(
        s["steps"].as_i64(),
        Some(2 * (1188 * 31usize).div_ceil(128) as i64)
    );
    let said = sae_ok(&[
        "activations",
        "--config",
        &cfg,
        "--out",
        &p(d, "v.npy"),
        "-q",
    ]);
    assert!(
        said.contains("from 1188 sequences (the last 133 held out"),
        "{said}"
    );
}

/// A sweep whose points share one model source trains them together: the
/// model runs once per window for all four (its sequence count is one
/// pass per epoch, not four), and each point ends byte-identical to the
/// same point trained alone, whatever its batch size.
#[test]
fn one_pass_sweep_points_equal_solo_runs() {
    let lm = common::lm::tiny_lm();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sweep = write_config(
        d,
        "sweep.yaml",
        &format!(
            "base:
  device: cpu
  seed: 4
  data: {{model: {}, tokens: {}, exclude_positions: [0], valid_fraction: 0.05}}
  model: {{d_hidden: 128, activation: topk, k: 4}}
  sparsity: {{penalty: none}}
  train: {{epochs: 2, batch_size: 128, threads: 1}}
grid:
  model.k: [4, 8]
  train.batch_size: [64, 256]
",
            p(&lm, "lm.pt"),
            p(&lm, "tokens.npy")
        ),
    );
    let out = d.join("sweep");
    let o = sae(&["sweep", "--config", &sweep, "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("4 point(s) train together on one pass"),
        "{err}"
    );
    // 1321 sequences, the last 67 held out: 1254 train sequences per epoch
    // (plus the groups that straddle windows), and the 67 once.
    let ran: u64 = err
        .split("the model ran on ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no model count in: {err}"));
    assert!(
        (2 * 1254 + 67..=2 * 1254 + 67 + 2 * 8 * 2).contains(&ran),
        "the model ran on {ran} sequences: {err}"
    );
    for run in std::fs::read_dir(&out).unwrap() {
        let run = run.unwrap().path();
        if !run.join("summary.json").is_file() {
            continue;
        }
        let solo = d.join(format!(
            "solo-{}",
            run.file_name().unwrap().to_str().unwrap()
        ));
        sae_ok(&[
            "train",
            "-q",
            "--config",
            run.join("config.yaml").to_str().unwrap(),
            "--out",
            solo.to_str().unwrap(),
        ]);
        same_files(&run, &solo, "one-pass sweep point vs solo");
    }
}

/// `sae latents --lm`: the dashboard straight from the language model, its
/// rows labelled with their tokens in context from --vocab; the rows'
/// temporary dump is gone afterwards.
#[test]
fn latents_from_the_model_label_rows_with_their_tokens() {
    let lm = common::lm::tiny_lm();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = write_config(
        d,
        "c.yaml",
        &format!(
            "device: cpu\ndata: {{model: {}, tokens: {}, exclude_positions: [0]}}\n\
             model: {{d_hidden: 64, activation: topk, k: 4}}\nsparsity: {{penalty: none}}\n\
             train: {{epochs: 1, batch_size: 256}}\n",
            p(&lm, "lm.pt"),
            p(&lm, "tokens.npy")
        ),
    );
    let run = p(d, "run");
    sae_ok(&["train", "-q", "--config", &cfg, "--out", &run]);
    let out = d.join("latents");
    let said = sae_ok(&[
        "latents",
        "-q",
        "--model",
        &run,
        "--lm",
        &p(&lm, "lm.pt"),
        "--tokens",
        &p(&lm, "tokens.npy"),
        "--vocab",
        &p(&lm, "vocab.txt"),
        "--exclude-positions",
        "0",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        said.contains(&format!("{} rows, 64 latents", 1321 * 31)),
        "{said}"
    );
    let page = std::fs::read_to_string(out.join("index.html")).unwrap();
    assert!(
        page.contains('⟦') && page.contains('⟧'),
        "no marked tokens in the page"
    );
    let left: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("lm-rows"))
        .collect();
    assert!(left.is_empty(), "temporary rows left: {left:?}");
    // The model must give rows as wide as the SAE takes.
    let (x, _) = synth(d, 200, 8, 8, 1);
    let small = p(d, "small");
    sae_ok(&[
        "train",
        "-q",
        "--config",
        &write_config(
            d,
            "s.yaml",
            &format!("data: {{train: {x}}}\nmodel: {{d_hidden: 8}}\ntrain: {{epochs: 1}}\n"),
        ),
        "--out",
        &small,
    ]);
    expect_user_error(
        &[
            "latents",
            "--model",
            &small,
            "--lm",
            &p(&lm, "lm.pt"),
            "--tokens",
            &p(&lm, "tokens.npy"),
            "--out",
            &p(d, "l2"),
        ],
        &["gives rows of width 64", "takes 8"],
    );
}

/// configs/from_model.yaml (the README's recipe) trains on the tiny model
/// with only the model, tokens and sizes overridden.
#[test]
fn the_from_model_recipe_trains() {
    let lm = common::lm::tiny_lm();
    let dir = tempfile::tempdir().unwrap();
    let run = p(dir.path(), "run");
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/from_model.yaml");
    let model = format!("data.model={}", p(&lm, "lm.pt"));
    let tokens = format!("data.tokens={}", p(&lm, "tokens.npy"));
    sae_ok(&[
        "train",
        "-q",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        &model,
        "--set",
        &tokens,
        "--set",
        "device=cpu",
        "--set",
        "model.d_hidden=256",
        "--set",
        "train.batch_size=512",
        "--set",
        "train.dead_window=40",
        "--out",
        &run,
    ]);
    let s = summary(Path::new(&run));
    assert!(s["valid"]["fvu"].as_f64().unwrap() < 1.0, "{s}");
    assert_eq!(
        s["valid"]["rows"].as_i64(),
        Some(14 * 31),
        "1 % of 1321 sequences"
    );
}
