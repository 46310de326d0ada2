//! Checkpoints and `--resume`: a run killed (SIGKILL) at a random step and
//! resumed ends bit-identical to an uninterrupted one; SIGINT / SIGTERM
//! finish the step, checkpoint and exit 130 / 143 saying how to resume; a
//! resumed run refuses a changed config; divergence names the step and keeps
//! the last good checkpoint.

mod common;
use common::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// Top-k with AuxK, unit-norm decoder, cosine schedule with warm-up, input
/// noise and resampling (libtorch RNG): all the state a checkpoint must hold.
const TOPK: &str = "device: cpu
seed: 3
data: {train: X}
model: {d_hidden: 32, activation: topk, k: 4}
sparsity: {penalty: auxk, weight: 0.03}
train:
  epochs: 8
  batch_size: 64
  checkpoint_every: 5
  threads: 1
  unit_norm_decoder: true
  lr_schedule: cosine
  lr_warmup_steps: 10
  lr_decay_steps: 50
  input_noise: gaussian
  noise_level: 0.05
  resample_every: 40
  dead_window: 10
";

/// BatchTopK (its float64 threshold buffer), mask noise, clipping, AdamW.
const BATCHTOPK: &str = "device: cpu
seed: 11
data: {train: X}
model: {d_hidden: 24, activation: batchtopk, k: 3}
sparsity: {penalty: none}
train:
  epochs: 16
  batch_size: 50
  checkpoint_every: 7
  threads: 1
  grad_clip: 0.5
  input_noise: mask
  noise_level: 0.1
  optimizer: {name: adamw, lr: 0.003, weight_decay: 0.01}
";

/// signum: schedule-free's second point `z` and its averaging weights, a
/// warm-up, a unit-norm decoder, the validation MSE at the averaged weights.
const SIGNUM: &str = "device: cpu
seed: 5
data: {train: X, valid_fraction: 0.1}
model: {d_hidden: 32, activation: topk, k: 4}
sparsity: {penalty: auxk, weight: 0.03}
train:
  epochs: 8
  batch_size: 64
  checkpoint_every: 5
  threads: 1
  unit_norm_decoder: true
  lr_warmup_steps: 10
  dead_window: 10
  optimizer: {name: signum, lr: 0.002}
";

/// Muon: its momentum buffers on the matrices, Adam's moments on the
/// JumpReLU threshold and biases, a linear decay with the Adam part's
/// warm-up, clipping, input noise.
const MUON: &str = "device: cpu
seed: 7
data: {train: X}
model: {d_hidden: 32, activation: jumprelu}
sparsity: {penalty: l0, weight: 0.001}
train:
  epochs: 8
  batch_size: 64
  checkpoint_every: 5
  threads: 1
  grad_clip: 1.0
  lr_schedule: linear
  lr_warmup_steps: 10
  input_noise: gaussian
  noise_level: 0.05
  optimizer: {name: muon, lr: 0.003, momentum: 0.9}
";

/// p-annealing: p, the adapted weight and the queue of norms. Changes of p
/// at the ends of steps 20, 40, .., 200 of 256, each reading the 16 steps
/// before it, so most checkpoints hold a part-filled queue.
const LP_ANNEAL: &str = "device: cpu
seed: 5
data: {train: X}
model: {d_hidden: 32, activation: relu}
sparsity: {penalty: lp_anneal, weight: 0.01, p_end: 0.7, anneal_start: 20, anneal_end: 200,
           anneal_queue_length: 16, warmup_steps: 10}
train:
  epochs: 8
  batch_size: 64
  checkpoint_every: 5
  threads: 1
  unit_norm_decoder: true
";

fn spawn_train(args: &[String]) -> Child {
    Command::new(sae_bin())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning sae")
}

/// Waits until the run has written its first checkpoint (or exited).
fn wait_for_checkpoint(child: &mut Child, run: &Path) {
    let ckpt = run.join("checkpoint/state.safetensors");
    let t0 = Instant::now();
    while !ckpt.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before its first checkpoint"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no checkpoint after 60 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn random_ms(max: u64) -> u64 {
    let n = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    n % max
}

/// Both runs wrote the same model.safetensors and metrics.jsonl, byte for byte.
fn same_outputs(a: &Path, b: &Path, what: &str) {
    for file in ["model.safetensors", "metrics.jsonl"] {
        let (x, y) = (a.join(file), b.join(file));
        assert!(
            std::fs::read(&x).unwrap() == std::fs::read(&y).unwrap(),
            "{what}: {} and {} differ",
            x.display(),
            y.display()
        );
    }
}

fn steps_of(run: &Path) -> i64 {
    summary(run)["steps"].as_i64().unwrap()
}

/// JumpReLU with a skip connection (W_skip and its Adam moments), input
/// normalisation and noise.
const JUMPRELU_SKIP: &str = "device: cpu
seed: 5
data: {train: X, normalize: standardize}
model: {d_hidden: 24, activation: jumprelu, skip_connection: true}
sparsity: {penalty: l0, weight: 0.002}
train:
  epochs: 8
  batch_size: 64
  checkpoint_every: 5
  threads: 1
  input_noise: gaussian
  noise_level: 0.05
";

/// Reference run, then a SIGKILLed + resumed run, a SIGINT and a SIGTERM run:
/// all must end with the reference's model.safetensors and metrics.jsonl.
fn interrupted_runs_match_uninterrupted(yaml: &str, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, _) = synth(d, 2000, 16, 32, 3);
    let cfg = write_config(d, "c.yaml", &yaml.replace('X', &x));
    interrupted_runs_match(d, &cfg, name);
}

/// [`interrupted_runs_match_uninterrupted`] for the config file `cfg`,
/// runs made in `d`.
fn interrupted_runs_match(d: &Path, cfg: &str, name: &str) {
    let case = |name: &str| Case::new(d, name).config(cfg);
    let reference = case("reference").train().dir;
    let total = steps_of(&reference);

    // SIGKILL at a random moment after the first checkpoint.
    let killed = case("killed");
    let mut child = spawn_train(&killed.args());
    let killed = killed.dir().to_path_buf();
    wait_for_checkpoint(&mut child, &killed);
    std::thread::sleep(Duration::from_millis(random_ms(300)));
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    let lines = std::fs::read_to_string(killed.join("metrics.jsonl")).unwrap_or_default();
    println!(
        "{name}: killed ({status:?}) with {} of {total} metrics lines written",
        lines.lines().count()
    );
    // `--resume DIR` alone: the config comes from DIR/config.yaml.
    sae_ok(&["train", "-q", "--resume", killed.to_str().unwrap()]);
    same_outputs(&reference, &killed, name);
    assert_eq!(steps_of(&killed), total);

    // SIGINT -> 130, SIGTERM -> 143, each with a message naming --resume.
    for (sig, code) in [("INT", 130), ("TERM", 143)] {
        let case = case(&format!("sig{sig}"));
        let run = case.dir().to_path_buf();
        let run_s = run.to_str().unwrap();
        let mut child = spawn_train(&case.args());
        wait_for_checkpoint(&mut child, &run);
        std::thread::sleep(Duration::from_millis(random_ms(200)));
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.code() == Some(0) {
            println!("{name}: SIG{sig} arrived after the run had finished");
        } else {
            assert_eq!(out.status.code(), Some(code), "SIG{sig}: {err}");
            assert!(err.contains(&format!("SIG{sig}")), "{err}");
            assert!(
                err.contains(&format!("sae train --resume {run_s}")),
                "{err}"
            );
            assert!(!err.contains("panicked"), "{err}");
            assert!(!run.join("model.safetensors").exists());
            println!("{name}: SIG{sig} -> exit {code}: {}", err.trim());
        }
        // --config with --out and a bare --resume (the SPEC's form).
        case.flag("--resume").train();
        same_outputs(&reference, &run, name);
    }
}

/// Rows from a language model (tests/fixtures/tiny_lm.py): a resumed run
/// recomputes its window from the tokens and ends bit-identical.
#[test]
fn model_source_resume_is_bit_identical() {
    let lm = common::lm::tiny_lm();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let yaml = format!(
        "device: cpu
seed: 2
data:
  model: {}
  tokens: {}
  exclude_positions: [0]
  normalize: expected_norm
  valid_fraction: 0.05
model: {{d_hidden: 128, activation: topk, k: 6}}
sparsity: {{penalty: auxk, weight: 0.03}}
train: {{epochs: 3, batch_size: 64, checkpoint_every: 5, threads: 1, dead_window: 20,
         input_noise: gaussian, noise_level: 0.05}}
",
        lm.join("lm.pt").display(),
        lm.join("tokens.npy").display()
    );
    let cfg = write_config(d, "c.yaml", &yaml);
    interrupted_runs_match(d, &cfg, "model source");
}

#[test]
fn topk_auxk_noise_resampling_resume_is_bit_identical() {
    interrupted_runs_match_uninterrupted(TOPK, "topk");
}

/// `data.normalize: whiten` (with TOPK's state): the whitening is fitted
/// again on resume, bit for bit, and folded once at the end.
#[test]
fn whitened_topk_resume_is_bit_identical() {
    let yaml = TOPK.replace("data: {train: X}", "data: {train: X, normalize: whiten}");
    assert!(yaml.contains("whiten"));
    interrupted_runs_match_uninterrupted(&yaml, "whitened topk");
}

/// `train.precision: bf16` (autocast around the forward pass): no state of
/// its own, so the TOPK run under it resumes bit for bit too.
#[test]
fn bf16_topk_resume_is_bit_identical() {
    let yaml = TOPK.replace("  threads: 1\n", "  threads: 1\n  precision: bf16\n");
    assert!(yaml.contains("precision: bf16"));
    interrupted_runs_match_uninterrupted(&yaml, "topk bf16");
}

#[test]
fn batchtopk_threshold_resume_is_bit_identical() {
    interrupted_runs_match_uninterrupted(BATCHTOPK, "batchtopk");
}

#[test]
fn skip_connection_resume_is_bit_identical() {
    interrupted_runs_match_uninterrupted(JUMPRELU_SKIP, "jumprelu skip");
}

#[test]
fn signum_resume_is_bit_identical() {
    interrupted_runs_match_uninterrupted(SIGNUM, "signum");
}

#[test]
fn muon_resume_is_bit_identical() {
    interrupted_runs_match_uninterrupted(MUON, "muon");
}

#[test]
fn lp_anneal_resume_is_bit_identical() {
    interrupted_runs_match_uninterrupted(LP_ANNEAL, "lp_anneal");
}

/// lp_anneal stopped at the end of epoch 3 (step 96, after four changes: a
/// full queue, 12 of its norms read by the change at step 100) and resumed
/// to epoch 8 ends as the run made in one go (a resume with an empty queue
/// does not); its weight changed along the way.
#[test]
fn lp_anneal_resumes_mid_queue() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, _) = synth(d, 2000, 16, 32, 3);
    let cfg = write_config(d, "c.yaml", &LP_ANNEAL.replace('X', &x));
    let whole = Case::new(d, "whole").config(&cfg).train().dir;
    let part = Case::new(d, "part")
        .config(&cfg)
        .set("train.epochs=3")
        .train()
        .dir;
    assert_eq!(steps_of(&part), 96);
    let part_s = part.to_str().unwrap();
    sae_ok(&["train", "-q", "--resume", part_s, "--set", "train.epochs=8"]);
    same_outputs(&whole, &part, "lp_anneal 3 -> 8 epochs");
    let weights: std::collections::BTreeSet<u64> =
        std::fs::read_to_string(whole.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .skip(10)
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["sparsity_weight"].as_f64().unwrap().to_bits()
            })
            .collect();
    assert!(
        weights.len() >= 8,
        "the weight took {} values",
        weights.len()
    );
}

/// A 2-epoch, 12-step config on small synthetic data in `d`.
fn small_config(d: &Path) -> String {
    let (x, _) = synth(d, 300, 8, 8, 2);
    let yaml = "device: cpu\ndata: {train: X}\nmodel: {d_hidden: 8}\n\
                train: {epochs: 2, batch_size: 50, checkpoint_every: 4}\n"
        .replace('X', &x);
    write_config(d, "c.yaml", &yaml)
}

#[test]
fn resume_checks_config_and_extends_epochs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = small_config(d);
    let case = Case::new(d, "run").config(&cfg);
    let run = case.dir().to_path_buf();
    let run_s = run.to_str().unwrap();

    // Nothing to resume yet.
    expect_user_error(&["train", "-q", "--resume", run_s], &[run_s, "config.yaml"]);
    case.clone()
        .flag("--resume")
        .fails(&[run_s, "no checkpoint"]);
    let o = case.clone().flag("--resume").flag("--force").output();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));

    case.train();
    // A different config is refused, naming the key.
    expect_user_error(
        &[
            "train",
            "-q",
            "--resume",
            run_s,
            "--set",
            "model.d_hidden=9",
        ],
        &["model.d_hidden", "9", "8", "train.epochs"],
    );
    expect_user_error(
        &[
            "train", "-q", "--config", &cfg, "--resume", run_s, "--set", "seed=1",
        ],
        &["seed"],
    );
    let other = d.join("other");
    expect_user_error(
        &[
            "train",
            "-q",
            "--resume",
            run_s,
            "--out",
            other.to_str().unwrap(),
        ],
        &["--out"],
    );
    // Fewer epochs than done.
    expect_user_error(
        &["train", "-q", "--resume", run_s, "--set", "train.epochs=1"],
        &["train.epochs"],
    );

    // More epochs: continues to the end of epoch 4, as if run for 4 at once.
    let more = ["train", "-q", "--resume", run_s, "--set", "train.epochs=4"];
    sae_ok(&more);
    let four = Case::new(d, "four")
        .config(&cfg)
        .set("train.epochs=4")
        .train()
        .dir;
    assert_eq!(steps_of(&run), 24);
    same_outputs(&four, &run, "epochs 2 -> 4");
    // A finished run resumed does nothing new and keeps its result.
    sae_ok(&more);
    same_outputs(&four, &run, "re-resume");
}

#[test]
fn divergence_names_the_step_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, _) = synth(d, 400, 8, 8, 2);
    let yaml = "device: cpu\ndata: {train: X}\nmodel: {d_hidden: 8}\n\
                train: {epochs: 20, batch_size: 20, checkpoint_every: 1, \
                optimizer: {lr: 1.0e+30}}\n"
        .replace('X', &x);
    let case = Case::new(d, "run").yaml(yaml);
    let err = case.user_error(&["diverged", "step"]);
    assert!(!case.dir().join("model.safetensors").exists());
    assert!(err.contains("last good checkpoint (step 1)"), "{err}");
    assert!(case.dir().join("checkpoint/state.safetensors").exists());
}

/// Every file under `dir` (recursively) with a hash of its bytes.
fn hashes(dir: &Path) -> Vec<(String, u64)> {
    use std::hash::{Hash, Hasher};
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
                continue;
            }
            let mut h = std::collections::hash_map::DefaultHasher::new();
            std::fs::read(&p).unwrap().hash(&mut h);
            let name = p.strip_prefix(dir).unwrap().display().to_string();
            out.push((name, h.finish()));
        }
    }
    out.sort();
    out
}

/// `--resume` of a finished run says so and leaves every file as it was;
/// a larger `train.epochs` still extends it.
#[test]
fn resuming_a_finished_run_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = small_config(d);
    let case = Case::new(d, "run").config(&cfg);
    let run = case.clone().train().dir;
    let run_s = run.to_str().unwrap();
    let before = hashes(&run);
    assert!(
        before.iter().any(|(f, _)| f == "summary.json"),
        "{before:?}"
    );
    // --resume DIR alone, and --config with --out and --resume.
    for out in [
        sae_ok(&["train", "-q", "--resume", run_s]),
        sae_ok(
            &case
                .clone()
                .flag("--resume")
                .args()
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        ),
    ] {
        assert!(
            out.contains("finished")
                && out.contains("12 of 12 steps")
                && out.contains("train.epochs"),
            "{out}"
        );
        assert!(!out.contains("samples/s"), "{out}");
        assert_eq!(hashes(&run), before, "a finished run's files changed");
    }
    println!("{}", sae_ok(&["train", "-q", "--resume", run_s]).trim());
    // More epochs: trained on, summary.json rewritten.
    sae_ok(&["train", "-q", "--resume", run_s, "--set", "train.epochs=3"]);
    assert_eq!(steps_of(&run), 18);
    assert_ne!(hashes(&run), before);
}
