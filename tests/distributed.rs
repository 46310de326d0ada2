//! Data-parallel training under the project venv's `torchrun` (c10d, Gloo):
//! 2 ranks train the model 1 process trains with the same global batch
//! (weights equal to 1e-5 relative after 126 steps; relu+l1, topk+auxk,
//! batchtopk, jumprelu+l0, and relu with input noise), bit for bit again on a
//! rerun, into one run directory; the gradient allreduce in buckets during
//! backward (`dist.bucket_mb`) gives the same bits as one allreduce after it;
//! a killed rank ends the job and `--resume`
//! then finishes bit-identical to an uninterrupted run, with 2 ranks or 1.
//!
//! The tests run one at a time (each job has two ranks on this machine's
//! cores). Without the venv's torchrun they fail, never skip.

mod common;

use common::{python, sae_bin, sae_ok, stderr, write_config};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tch::Tensor;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn torchrun_bin() -> PathBuf {
    let bin = python().parent().unwrap().join("torchrun");
    assert!(
        bin.exists(),
        "{} not found: `make setup` installs torch (and its torchrun) into the venv",
        bin.display()
    );
    bin
}

/// `torchrun --standalone --nproc-per-node N --no-python sae ARGS`.
fn torchrun(nproc: usize, args: &[&str]) -> Command {
    let mut c = Command::new(torchrun_bin());
    c.args(["--standalone", "--nproc-per-node", &nproc.to_string()])
        .args(["--no-python", sae_bin()])
        .args(args)
        // torchrun's default sets OMP_NUM_THREADS=1 with a warning; say it.
        .env("OMP_NUM_THREADS", "1");
    c
}

/// `sae train -q --config CFG --out OUT` and more arguments.
fn train_args<'a>(cfg: &'a str, out: &'a Path, more: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "train",
        "-q",
        "--config",
        cfg,
        "--out",
        out.to_str().unwrap(),
    ];
    a.extend_from_slice(more);
    a
}

fn run_ok(mut c: Command) -> Output {
    let o = c.output().expect("starting torchrun");
    assert!(
        o.status.success(),
        "{c:?} failed ({:?}):\n{}",
        o.status.code(),
        stderr(&o)
    );
    o
}

/// 1001 rows: with batches of 50 the last batch has 1 row, so one of two
/// ranks trains on nothing at that step.
fn data(dir: &Path) -> String {
    let x = dir.join("x.npy").display().to_string();
    sae_ok(&[
        "data",
        "synth",
        "--n",
        "1001",
        "--d-in",
        "16",
        "--features",
        "24",
        "--active",
        "3",
        "--seed",
        "5",
        "--out",
        &x,
    ]);
    x
}

fn config(dir: &Path, name: &str, x: &str, model: &str, sparsity: &str) -> String {
    // Input noise: drawn for the whole batch, each rank adds its rows' part.
    let noise = match name.ends_with("_noise") {
        true => ", input_noise: gaussian, noise_level: 0.2",
        false => "",
    };
    write_config(
        dir,
        &format!("{name}.yaml"),
        &format!(
            "seed: 3\ndevice: cpu\ndata: {{train: {x:?}}}\n\
             model: {{d_hidden: 32, init_scheme: sae, {model}}}\n\
             sparsity: {{{sparsity}}}\n\
             train: {{epochs: 6, batch_size: 50, threads: 1, log_every: 5, checkpoint_every: 40, \
             dead_window: 10, optimizer: {{lr: 0.003}}{noise}}}\ndist: {{timeout_s: 60}}\n"
        ),
    )
}

fn weights(run: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(run.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

/// max |a - b| / max |b| over each tensor of the two runs' models.
fn assert_close(a: &Path, b: &Path, rtol: f64) {
    let (wa, wb) = (weights(a), weights(b));
    for name in ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"] {
        let (Some(x), Some(y)) = (wa.get(name), wb.get(name)) else {
            assert_eq!(wa.contains_key(name), wb.contains_key(name), "{name}");
            continue;
        };
        let scale = y.abs().max().double_value(&[]).max(1e-12);
        let d = (x - y).abs().max().double_value(&[]) / scale;
        assert!(d <= rtol, "{name}: relative difference {d:e} > {rtol:e}");
    }
}

fn summary(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap()
}

const RECIPES: [(&str, &str, &str); 5] = [
    ("relu_l1", "activation: relu", "penalty: l1, weight: 0.01"),
    (
        "topk_auxk",
        "activation: topk, k: 4",
        "penalty: auxk, weight: 0.03",
    ),
    ("batchtopk", "activation: batchtopk, k: 4", "penalty: none"),
    (
        "jumprelu",
        "activation: jumprelu, jumprelu_init_threshold: 0.05",
        "penalty: l0, weight: 0.002",
    ),
    (
        "relu_noise",
        "activation: relu",
        "penalty: l1, weight: 0.01",
    ),
];

#[test]
fn two_ranks_train_the_model_one_process_trains() {
    let _one = serial();
    let tmp = tempfile::tempdir().unwrap();
    let x = data(tmp.path());
    for (name, model, sparsity) in RECIPES {
        let cfg = config(tmp.path(), name, &x, model, sparsity);
        let single = tmp.path().join(format!("{name}_1"));
        let dp = tmp.path().join(format!("{name}_2"));
        sae_ok(&train_args(&cfg, &single, &[]));
        run_ok(torchrun(2, &train_args(&cfg, &dp, &[])));
        assert_close(&dp, &single, 1e-5);
        let s = summary(&dp);
        assert_eq!(s["steps"], 126, "{name}: 6 epochs of 21 batches");
        assert_eq!(s["world_size"], 2, "{name}");
        assert_eq!(s["backend"], "gloo", "{name}");
        assert_eq!(summary(&single)["world_size"], 1);
        // One run directory, written by rank 0 alone, unlocked at the end.
        assert!(
            !dp.join(".lock").exists(),
            "{name}: the lock outlived the run"
        );
        let lines = |r: &Path| std::fs::read_to_string(r.join("metrics.jsonl")).unwrap();
        assert_eq!(lines(&dp).lines().count(), lines(&single).lines().count());
        // Logged losses are the global batch's: close to the single run's.
        let last = |r: &Path| -> f64 {
            let l = lines(r);
            let v: serde_json::Value = serde_json::from_str(l.lines().last().unwrap()).unwrap();
            v["loss"].as_f64().unwrap()
        };
        let (a, b) = (last(&dp), last(&single));
        assert!(
            (a - b).abs() <= 1e-4 * b.abs(),
            "{name}: final loss {a} vs {b}"
        );
    }
}

/// `data.normalize: whiten`: every rank whitens with rank 0's statistics
/// (float64 and float32 copies replicated) and the fold is rank 0's.
#[test]
fn two_ranks_train_a_whitened_model_as_one_process() {
    let _one = serial();
    let tmp = tempfile::tempdir().unwrap();
    let x = data(tmp.path());
    let cfg = config(
        tmp.path(),
        "whiten",
        &x,
        "activation: topk, k: 4",
        "penalty: none",
    );
    let (single, dp) = (tmp.path().join("white_1"), tmp.path().join("white_2"));
    let white = ["--set", "data.normalize=whiten"];
    sae_ok(&train_args(&cfg, &single, &white));
    run_ok(torchrun(2, &train_args(&cfg, &dp, &white)));
    assert_close(&dp, &single, 1e-5);
    let plain = tmp.path().join("plain_1");
    sae_ok(&train_args(&cfg, &plain, &[]));
    assert!(
        weights(&plain)["W_enc"] != weights(&single)["W_enc"],
        "whitening changed nothing"
    );
}

/// signum and Muon with two ranks (each gradient all-reduced on its own:
/// they have no flat buffer) against one process. Sign descent sees the
/// same signs: the weights agree to 1e-5. Muon rounds its update to
/// bfloat16, which turns the last-bit differences of the summed gradients
/// into ~1e-2 of a weight: the weights agree to 5e-2 and the final loss to
/// 1e-3.
#[test]
fn signum_and_muon_train_with_two_ranks() {
    let _one = serial();
    let tmp = tempfile::tempdir().unwrap();
    let x = data(tmp.path());
    for (name, rtol, loss_rtol) in [("signum", 1e-5, 1e-5), ("muon", 5e-2, 1e-3)] {
        let cfg = config(
            tmp.path(),
            name,
            &x,
            "activation: topk, k: 4",
            "penalty: auxk, weight: 0.03",
        );
        let cfg_text = std::fs::read_to_string(&cfg).unwrap().replace(
            "optimizer: {lr: 0.003}",
            &format!("optimizer: {{name: {name}, lr: 0.003}}"),
        );
        std::fs::write(&cfg, cfg_text).unwrap();
        let single = tmp.path().join(format!("{name}_1"));
        let dp = tmp.path().join(format!("{name}_2"));
        sae_ok(&train_args(&cfg, &single, &[]));
        run_ok(torchrun(2, &train_args(&cfg, &dp, &[])));
        assert_eq!(summary(&dp)["world_size"], 2, "{name}");
        assert_close(&dp, &single, rtol);
        let last = |r: &Path| -> f64 {
            let l = std::fs::read_to_string(r.join("metrics.jsonl")).unwrap();
            let v: serde_json::Value = serde_json::from_str(l.lines().last().unwrap()).unwrap();
            v["loss"].as_f64().unwrap()
        };
        let (a, b) = (last(&dp), last(&single));
        assert!(
            (a - b).abs() <= loss_rtol * b.abs(),
            "{name}: final loss {a} vs {b}"
        );
    }
}

#[test]
fn reruns_are_bit_identical() {
    let _one = serial();
    let tmp = tempfile::tempdir().unwrap();
    let x = data(tmp.path());
    let (name, model, sparsity) = RECIPES[2];
    let cfg = config(tmp.path(), name, &x, model, sparsity);
    let bytes: Vec<Vec<u8>> = (0..2)
        .map(|i| {
            let out = tmp.path().join(format!("run{i}"));
            run_ok(torchrun(2, &train_args(&cfg, &out, &[])));
            std::fs::read(out.join("model.safetensors")).unwrap()
        })
        .collect();
    assert!(bytes[0] == bytes[1], "two identical 2-rank runs differ");
}

/// The bucketed allreduce that overlaps backward (`dist.bucket_mb`, one
/// bucket per parameter here, and the default 25 MiB: one bucket of the
/// hooked parameters) trains bit for bit what one allreduce after backward
/// (`bucket_mb: 0`) trains: each bucket is scaled and summed as the whole
/// buffer was, and with 2 ranks a sum has one order. relu (a leaf: the
/// encoder's gradients and b_dec's finished by hand, their buckets started
/// after backward), batchtopk (every gradient from autograd) and jumprelu
/// (its threshold hooked too). Buckets did start during backward.
#[test]
fn bucketed_allreduce_during_backward_matches_one_after_it_bit_for_bit() {
    let _one = serial();
    let tmp = tempfile::tempdir().unwrap();
    let x = data(tmp.path());
    for (name, model, sparsity) in [RECIPES[0], RECIPES[2], RECIPES[3]] {
        let cfg = config(tmp.path(), name, &x, model, sparsity);
        let run = |bucket_mb: &str| {
            let out = tmp.path().join(format!("{name}_{bucket_mb}"));
            let set = format!("dist.bucket_mb={bucket_mb}");
            run_ok(torchrun(2, &train_args(&cfg, &out, &["--set", &set])));
            let early = summary(&out)["overlapped_buckets"].as_u64().unwrap();
            (std::fs::read(out.join("model.safetensors")).unwrap(), early)
        };
        let (after, none) = run("0");
        assert_eq!(none, 0, "{name}: bucket_mb 0 overlaps nothing");
        for bucket_mb in ["0.000001", "25"] {
            let (during, early) = run(bucket_mb);
            assert!(
                during == after,
                "{name}: bucket_mb {bucket_mb} differs from one allreduce after backward"
            );
            // From the second step on (the first builds Adam's flat buffer).
            assert!(
                early >= 125,
                "{name}: bucket_mb {bucket_mb}: only {early} buckets started during backward"
            );
        }
    }
}

/// The PIDs of processes whose command line holds `needle` and whose
/// environment says RANK=`rank`.
fn rank_pids(needle: &str, rank: usize) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let read = |f: &str| std::fs::read(e.path().join(f)).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&read("cmdline")).replace('\0', " ");
        let environ = String::from_utf8_lossy(&read("environ")).into_owned();
        let is_sae = cmdline.starts_with(sae_bin()) && cmdline.contains(needle);
        if is_sae && environ.split('\0').any(|v| v == format!("RANK={rank}")) {
            pids.push(pid);
        }
    }
    pids
}

fn wait_for(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn(mut c: Command) -> Child {
    c.stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn a_killed_rank_ends_the_job_and_resume_finishes_it_bit_identical() {
    let _one = serial();
    let tmp = tempfile::tempdir().unwrap();
    let x = data(tmp.path());
    let (name, model, sparsity) = RECIPES[1];
    let cfg = config(tmp.path(), name, &x, model, sparsity);
    let long = [
        "--set",
        "train.epochs=400",
        "--set",
        "train.checkpoint_every=50",
    ];
    let whole = tmp.path().join("whole");
    let args = train_args(&cfg, &whole, &long);
    run_ok(torchrun(2, &args));

    let cut = tmp.path().join("cut");
    let args = train_args(&cfg, &cut, &long);
    let mut job = spawn(torchrun(2, &args));
    let state = cut.join("checkpoint/state.safetensors");
    wait_for("a checkpoint", Duration::from_secs(120), || state.exists());
    // While it trains, a second run into the same directory is refused.
    let again = Command::new(sae_bin())
        .args([
            "train",
            "-q",
            "--config",
            &cfg,
            "--force",
            "--out",
            cut.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("another run is training in it (pid"),
        "{}",
        stderr(&again)
    );
    let victim = rank_pids(cut.to_str().unwrap(), 1);
    assert_eq!(victim.len(), 1, "rank 1's process");
    let killed_at = Instant::now();
    unsafe { libc::kill(victim[0] as i32, libc::SIGKILL) };
    let status = job.wait().unwrap();
    assert!(!status.success(), "the job must fail when a rank dies");
    assert!(
        killed_at.elapsed() < Duration::from_secs(60),
        "the job took {:?} to end (dist.timeout_s is 60)",
        killed_at.elapsed()
    );
    // The checkpoint on disk is whole, and resuming finishes the run.
    let mut resume = vec!["train", "-q", "--resume", cut.to_str().unwrap()];
    resume.extend(long);
    run_ok(torchrun(2, &resume));
    let read = |r: &Path| std::fs::read(r.join("model.safetensors")).unwrap();
    assert!(
        read(&cut) == read(&whole),
        "resumed 2-rank run differs from the uninterrupted one"
    );
    assert_eq!(
        std::fs::read(cut.join("metrics.jsonl")).unwrap(),
        std::fs::read(whole.join("metrics.jsonl")).unwrap()
    );
}

#[test]
fn a_two_rank_run_resumes_as_one_process() {
    let _one = serial();
    let tmp = tempfile::tempdir().unwrap();
    let x = data(tmp.path());
    let (name, model, sparsity) = RECIPES[0];
    let cfg = config(tmp.path(), name, &x, model, sparsity);
    let whole = tmp.path().join("whole");
    run_ok(torchrun(2, &train_args(&cfg, &whole, &[])));
    let part = tmp.path().join("part");
    run_ok(torchrun(
        2,
        &train_args(&cfg, &part, &["--set", "train.epochs=3"]),
    ));
    sae_ok(&[
        "train",
        "-q",
        "--resume",
        part.to_str().unwrap(),
        "--set",
        "train.epochs=6",
    ]);
    assert_eq!(summary(&part)["world_size"], 1);
    assert_eq!(summary(&part)["steps"], 126);
    assert_close(&part, &whole, 1e-5);
}

#[test]
fn an_incomplete_launch_environment_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let x = data(tmp.path());
    let cfg = config(tmp.path(), "env", &x, "activation: relu", "penalty: l1");
    let o = Command::new(sae_bin())
        .args(["train", "-q", "--config", &cfg, "--out"])
        .arg(tmp.path().join("run"))
        .env("RANK", "0")
        .env_remove("WORLD_SIZE")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("WORLD_SIZE is not set"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn what_data_parallel_training_refuses_is_said_before_joining() {
    let tmp = tempfile::tempdir().unwrap();
    let x = data(tmp.path());
    let cfg = config(tmp.path(), "refused", &x, "activation: relu", "penalty: l1");
    let launch = |sets: &[&str]| {
        let mut c = Command::new(sae_bin());
        c.args(["train", "-q", "--config", &cfg, "--out"])
            .arg(tmp.path().join("run"))
            .envs([
                ("RANK", "0"),
                ("WORLD_SIZE", "2"),
                ("MASTER_ADDR", "127.0.0.1"),
                // Nobody listens here: a refusal must come before the rendezvous.
                ("MASTER_PORT", "9"),
            ]);
        for s in sets {
            c.args(["--set", s]);
        }
        c.output().unwrap()
    };
    for (sets, says) in [
        (
            &["train.resample_every=10"][..],
            "train.resample_every: not supported with data-parallel",
        ),
        (
            &["train.batch_size=1"][..],
            "train.batch_size: 1 rows cannot be shared by 2 ranks",
        ),
        (
            &["dist.bucket_mb=-1"][..],
            "dist.bucket_mb: -1 must be a size in MiB",
        ),
        // NCCL is built in; asked for where it cannot run, it says why in
        // one line.
        (
            &["dist.backend=nccl"][..],
            match tch::Cuda::device_count() {
                0 => "dist.backend: nccl needs a CUDA GPU for each rank and none is usable here",
                _ => "dist.backend: nccl reduces CUDA tensors, but device: cpu is the CPU",
            },
        ),
    ] {
        let o = launch(sets);
        assert_eq!(o.status.code(), Some(2), "{sets:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "{sets:?}: {}", stderr(&o));
        let lines = stderr(&o).lines().filter(|l| !l.trim().is_empty()).count();
        assert_eq!(lines, 1, "{sets:?}: one line: {}", stderr(&o));
    }
}

/// Rows from a language model (tests/fixtures/tiny_lm.py) or a streamed
/// `.npy`: each rank computes (reads) only the groups of sequences (blocks)
/// it owns, its part of each batch is the batch's rows there, and 2 ranks
/// train what 1 process trains (to 1e-5), with the global batch unchanged.
#[test]
fn two_ranks_share_the_model_and_the_stream() {
    let _one = serial();
    let lm = common::lm::tiny_lm();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let yaml = |data: &str| {
        format!(
            "seed: 3\ndevice: cpu\ndata: {{{data}}}\n\
             model: {{d_hidden: 64, init_scheme: sae, activation: topk, k: 6}}\n\
             sparsity: {{penalty: auxk, weight: 0.03}}\n\
             train: {{epochs: 2, batch_size: 256, threads: 1, checkpoint_every: 100, \
             dead_window: 20, input_noise: gaussian, noise_level: 0.05}}\ndist: {{timeout_s: 60}}\n"
        )
    };
    let model_data = format!(
        "model: {}, tokens: {}, exclude_positions: [0]",
        lm.join("lm.pt").display(),
        lm.join("tokens.npy").display()
    );
    let cfg = write_config(d, "model.yaml", &yaml(&model_data));
    let (single, dp) = (d.join("model_1"), d.join("model_2"));
    sae_ok(&train_args(&cfg, &single, &[]));
    let o = run_ok(torchrun(2, &train_args(&cfg, &dp, &[])));
    assert_close(&dp, &single, 1e-5);
    let (s1, s2) = (summary(&single), summary(&dp));
    assert_eq!(s1["steps"], s2["steps"], "the global batch is unchanged");
    // Both epochs' windows: all 1321 sequences each (groups of 8 that
    // straddle two windows count twice); each rank about half of them.
    let all = s1["model_sequences"].as_u64().unwrap();
    assert!((2 * 1321..2 * 1321 + 64).contains(&all), "{s1}");
    let err = stderr(&o);
    let per_rank: Vec<u64> = err
        .lines()
        .filter_map(|l| l.split("the model ran on ").nth(1))
        .filter_map(|r| r.split(' ').next()?.parse().ok())
        .collect();
    assert_eq!(per_rank.len(), 2, "{err}");
    for n in &per_rank {
        let share = *n as f64 / all as f64;
        assert!(
            (0.4..0.6).contains(&share),
            "a rank computed {n} of {all}: {err}"
        );
    }
    println!("model source: 1 process {all} sequences, 2 ranks {per_rank:?}");
    // The same rows dumped and streamed: each rank reads only its blocks.
    let acts = d.join("acts.npy").display().to_string();
    sae_ok(&["activations", "--config", &cfg, "--out", &acts, "-q"]);
    let cfg = write_config(
        d,
        "stream.yaml",
        &yaml(&format!("train: {acts}, stream: true")),
    );
    let (single, dp) = (d.join("stream_1"), d.join("stream_2"));
    sae_ok(&train_args(&cfg, &single, &[]));
    run_ok(torchrun(2, &train_args(&cfg, &dp, &[])));
    assert_close(&dp, &single, 1e-5);
}
