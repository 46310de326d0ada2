//! The modern training recipes (issue 8), end to end through the binary:
//! batch top-k and JumpReLU, AuxK, schedules, the unit-norm decoder, b_dec
//! init, input scaling, transcoders, deep and denoising models, resampling.
//! Bit-exact training against PyTorch is in tests/parity.rs.

mod common;
use common::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// A small config on `x`; `model`, `sparsity` and `train` are YAML mapping
/// lines (two-space indented) that add to or replace the defaults below.
fn config(x: &str, model: &str, sparsity: &str, train: &str) -> String {
    let base = format!(
        "seed: 3\ndevice: cpu\ndata:\n  train: {x}\n\
         model:\n  d_hidden: 48\n  init_scheme: sae\n\
         sparsity: {{}}\n\
         train:\n  epochs: 4\n  batch_size: 128\n  optimizer: {{lr: 0.005}}\n  threads: 1\n"
    );
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&base).unwrap();
    for (section, lines) in [("model", model), ("sparsity", sparsity), ("train", train)] {
        let dedented: String = lines
            .lines()
            .map(|l| format!("{}\n", l.strip_prefix("  ").unwrap_or(l)))
            .collect();
        if let Some(extra) = serde_yaml::from_str::<serde_yaml::Value>(&dedented)
            .unwrap()
            .as_mapping()
        {
            let m = doc[section].as_mapping_mut().unwrap();
            for (k, v) in extra {
                m.insert(k.clone(), v.clone());
            }
        }
    }
    serde_yaml::to_string(&doc).unwrap()
}

fn train(dir: &Path, name: &str, yaml: &str, sets: &[&str]) -> PathBuf {
    let cfg = write_config(dir, &format!("{name}.yaml"), yaml);
    let run = dir.join(name);
    let mut args = vec![
        "train",
        "-q",
        "--config",
        &cfg,
        "--out",
        run.to_str().unwrap(),
        "--force",
    ];
    for s in sets {
        args.push("--set");
        args.push(s);
    }
    sae_ok(&args);
    run
}

fn weights(run: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(run.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn col(lines: &[serde_json::Value], key: &str) -> Vec<f64> {
    lines.iter().map(|l| l[key].as_f64().unwrap()).collect()
}

fn data(dir: &Path) -> (String, String) {
    synth(dir, 2048, 16, 32, 3)
}

#[test]
fn topk_l0_is_exactly_k() {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = data(dir.path());
    let run = train(
        dir.path(),
        "topk",
        &config(&x, "  activation: topk\n  k: 4\n", "  penalty: none\n", ""),
        &[],
    );
    // Every training batch, and the whole data set after training.
    for l0 in col(&metrics_lines(&run), "l0") {
        assert_eq!(l0, 4.0, "training-batch l0");
    }
    assert_eq!(summary(&run)["train"]["l0"].as_f64().unwrap(), 4.0);
    // Per row: never more than k codes, k on (nearly) every row.
    let z = dir.path().join("z.npy");
    sae_ok(&[
        "encode",
        "--model",
        run.to_str().unwrap(),
        "--data",
        &x,
        "--out",
        z.to_str().unwrap(),
    ]);
    let z = Tensor::read_npy(&z).unwrap();
    let per_row = z.gt(0.0).sum_dim_intlist(1, false, Kind::Int64);
    assert_eq!(per_row.max().int64_value(&[]), 4);
    assert_eq!(per_row.min().int64_value(&[]), 4);
}

#[test]
fn batchtopk_mean_l0_is_k_on_every_training_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = data(dir.path());
    // 2048 rows in batches of 128: k x 128 codes survive per batch.
    let run = train(
        dir.path(),
        "batchtopk",
        &config(
            &x,
            "  activation: batchtopk\n  k: 3\n  topk_threshold_lr: 0.05\n",
            "  penalty: auxk\n  weight: 0.03\n",
            "  dead_window: 10\n",
        ),
        &[],
    );
    let lines = metrics_lines(&run);
    for l0 in col(&lines, "l0") {
        assert_eq!(l0, 3.0, "training-batch mean l0");
    }
    // The inference threshold: saved per latent, all equal, positive.
    let w = weights(&run);
    let t = &w["threshold"];
    assert_eq!(t.size(), vec![48]);
    let (lo, hi) = (t.min().double_value(&[]), t.max().double_value(&[]));
    assert!(lo > 0.0 && lo == hi, "threshold {lo}..{hi}");
    // At inference the rows' L0 varies but averages near k.
    let l0 = summary(&run)["train"]["l0"].as_f64().unwrap();
    assert!((1.0..8.0).contains(&l0), "inference l0 {l0}");
}

#[test]
fn jumprelu_l0_falls_as_its_coefficient_rises() {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = data(dir.path());
    let mut l0s = Vec::new();
    for w in ["0.0", "0.0003", "0.003", "0.03"] {
        let run = train(
            dir.path(),
            &format!("jumprelu-{w}"),
            &config(
                &x,
                "  activation: jumprelu\n  jumprelu_init_threshold: 0.05\n",
                &format!("  penalty: l0\n  weight: {w}\n"),
                "  epochs: 8\n",
            ),
            &[],
        );
        let s = summary(&run);
        let l0 = s["train"]["l0"].as_f64().unwrap();
        println!("l0 weight {w}: l0 {l0:.3} fvu {:.4}", s["train"]["fvu"]);
        l0s.push(l0);
        let t = &weights(&run)["threshold"];
        assert_eq!(t.size(), vec![48]);
        assert!(t.min().double_value(&[]) >= 0.0, "thresholds stay >= 0");
    }
    for p in l0s.windows(2) {
        assert!(p[1] < p[0], "l0 did not fall: {l0s:?}");
    }
}

/// The gated SAE trains (its L0 falls with the L1 weight on the gate) and its
/// SAELens export gives the same codes in sae_lens (when installed).
#[test]
fn gated_trains_and_exports() {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = data(dir.path());
    let mut l0s = Vec::new();
    let mut last = PathBuf::new();
    for w in ["0.001", "0.01"] {
        let run = train(
            dir.path(),
            &format!("gated-{w}"),
            &config(
                &x,
                "  activation: gated\n",
                &format!("  penalty: l1\n  weight: {w}\n"),
                "  epochs: 6\n",
            ),
            &["data.normalize=standardize"],
        );
        let lines = metrics_lines(&run);
        let l = lines.last().unwrap();
        let want = l["mse"].as_f64().unwrap()
            + l["sparsity_weight"].as_f64().unwrap() * l["sparsity_loss"].as_f64().unwrap()
            + l["aux_loss"].as_f64().unwrap();
        assert!((l["loss"].as_f64().unwrap() - want).abs() < 1e-6, "{l}");
        l0s.push(summary(&run)["train"]["l0"].as_f64().unwrap());
        let w = weights(&run);
        assert_eq!(w["r_mag"].size(), vec![48]);
        assert_eq!(w["b_mag"].size(), vec![48]);
        last = run;
    }
    assert!(
        l0s[1] < l0s[0],
        "gated l0 should fall with the weight: {l0s:?}"
    );
    let sl = dir.path().join("gated_sl");
    sae_ok(&[
        "export",
        "--model",
        last.to_str().unwrap(),
        "--format",
        "saelens",
        "--out",
        sl.to_str().unwrap(),
    ]);
    let z = dir.path().join("z.npy");
    sae_ok(&[
        "encode",
        "--model",
        last.to_str().unwrap(),
        "--data",
        &x,
        "--out",
        z.to_str().unwrap(),
    ]);
    // Our own reader of the SAELens directory and of the TorchScript module.
    for (m, name) in [
        (sl.clone(), "saelens"),
        (last.join("model.pt"), "torchscript"),
    ] {
        let z2 = dir.path().join(format!("z-{name}.npy"));
        sae_ok(&[
            "encode",
            "--model",
            m.to_str().unwrap(),
            "--data",
            &x,
            "--out",
            z2.to_str().unwrap(),
        ]);
        let d = (Tensor::read_npy(&z).unwrap() - Tensor::read_npy(&z2).unwrap())
            .abs()
            .max()
            .double_value(&[]);
        assert!(d < 1e-4, "{name}: codes differ by {d}");
    }
    let has_saelens = std::process::Command::new(python())
        .args(["-c", "import sae_lens"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_saelens {
        assert_ne!(
            std::env::var("SAE_REQUIRE_SAELENS").as_deref(),
            Ok("1"),
            "sae_lens is not installed (`make saelens`)"
        );
        eprintln!("SKIPPED (NOT RUN): sae_lens check of the gated export");
        return;
    }
    let out = py(
        r#"
import sys, numpy as np, torch
from sae_lens import SAE
sae = SAE.load_from_disk(sys.argv[1], device="cpu")
z = sae.encode(torch.from_numpy(np.load(sys.argv[2]))).detach().numpy()
print(type(sae).__name__, float(np.abs(z - np.load(sys.argv[3])).max()))
"#,
        &[sl.to_str().unwrap(), &x, z.to_str().unwrap()],
    );
    let mut it = out.split_whitespace();
    assert_eq!(it.next(), Some("GatedSAE"), "{out}");
    let d: f64 = it.next().unwrap().parse().unwrap();
    assert!(d < 1e-4, "sae_lens codes differ by {d}");
}

#[test]
fn decoder_rows_are_unit_norm_after_every_step() {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = data(dir.path());
    for tied in [false, true] {
        // Full batch: epochs = steps; the model after step s is run s's.
        for steps in 1..=3 {
            let run = train(
                dir.path(),
                &format!("unit-{tied}-{steps}"),
                &config(
                    &x,
                    &format!("  activation: relu\n  tied: {tied}\n  init_scheme: torch_linear\n"),
                    "  penalty: l1\n  weight: 0.01\n",
                    &format!("  epochs: {steps}\n  batch_size: full\n  unit_norm_decoder: true\n"),
                ),
                &[],
            );
            let w_dec = &weights(&run)["W_dec"];
            let norms = w_dec.norm_scalaropt_dim(2, [1], false);
            let dev = (norms - 1.0).abs().max().double_value(&[]);
            assert!(
                dev < 1e-5,
                "tied {tied}, step {steps}: max |norm - 1| {dev}"
            );
        }
    }
    // Mini-batches with a schedule and clipping: still unit norm at the end,
    // and without the option the rows drift.
    for (unit, name) in [(true, "unit-mb"), (false, "free-mb")] {
        let run = train(
            dir.path(),
            name,
            &config(
                &x,
                "  activation: topk\n  k: 3\n",
                "  penalty: none\n",
                &format!("  unit_norm_decoder: {unit}\n  grad_clip: 1.0\n  lr_warmup_steps: 5\n"),
            ),
            &[],
        );
        let norms = weights(&run)["W_dec"].norm_scalaropt_dim(2, [1], false);
        let dev = (norms - 1.0).abs().max().double_value(&[]);
        if unit {
            assert!(dev < 1e-5, "{name}: max |norm - 1| {dev}");
        } else {
            assert!(
                dev > 1e-3,
                "{name}: rows should drift without the constraint"
            );
        }
    }
}

#[test]
fn schedules_give_the_expected_values_at_given_steps() {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = data(dir.path());
    // 2048 / 128 = 16 steps per epoch, 4 epochs: 64 steps.
    let run = train(
        dir.path(),
        "sched",
        &config(
            &x,
            "  activation: relu\n",
            "  penalty: l1\n  weight: 0.02\n  warmup_steps: 10\n",
            "  lr_schedule: cosine\n  lr_warmup_steps: 8\n  lr_decay_steps: 16\n  lr_end: 0.001\n",
        ),
        &[],
    );
    let lines = metrics_lines(&run);
    assert_eq!(lines.len(), 64);
    let at = |step: usize, key: &str| lines[step - 1][key].as_f64().unwrap();
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1e-12);
    let lr = 0.005;
    // Warm-up: lr * s / 8.
    for s in [1, 4, 8] {
        assert!(
            close(at(s, "lr"), lr * s as f64 / 8.0),
            "lr at {s}: {}",
            at(s, "lr")
        );
    }
    // Cosine over steps 9..=48 (40 steps) from lr to lr_end.
    assert!(close(at(9, "lr"), lr));
    let mid = 0.001 + (lr - 0.001) * 0.5; // j = 20 of 40
    assert!(close(at(29, "lr"), mid), "lr at 29: {}", at(29, "lr"));
    // Final decay: lr_end * (1 - i / 16) over the last 16 steps.
    assert!(close(at(49, "lr"), 0.001));
    assert!(close(at(57, "lr"), 0.001 * 0.5));
    assert!(close(at(64, "lr"), 0.001 / 16.0));
    // Sparsity weight: 0 at step 1, weight * (s - 1) / 10, full from step 11.
    assert_eq!(at(1, "sparsity_weight"), 0.0);
    assert!(close(at(6, "sparsity_weight"), 0.02 * 0.5));
    assert_eq!(at(11, "sparsity_weight"), 0.02);
    assert_eq!(at(64, "sparsity_weight"), 0.02);
    // The logged loss uses that weight.
    for s in [1, 6, 30] {
        let want = at(s, "mse") + at(s, "sparsity_weight") * at(s, "sparsity_loss");
        assert!(
            (at(s, "loss") - want).abs() < 1e-6 * want,
            "loss at step {s}"
        );
    }
}

#[test]
fn b_dec_starts_at_the_mean_or_geometric_median() {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = data(dir.path());
    let xs = Tensor::read_npy(&x).unwrap().to_kind(Kind::Double);
    // lr tiny: after one step b_dec is still where it started.
    let run_for = |how: &str| {
        let run = train(
            dir.path(),
            &format!("bdec-{how}"),
            &config(
                &x,
                &format!("  activation: relu\n  b_dec_init: {how}\n"),
                "  penalty: l1\n",
                "  epochs: 1\n  batch_size: full\n  optimizer: {lr: 1.0e-9}\n",
            ),
            &[],
        );
        weights(&run)["b_dec"].to_kind(Kind::Double)
    };
    let mean = xs.mean_dim(0, false, Kind::Double);
    let b = run_for("mean");
    assert!((&b - &mean).abs().max().double_value(&[]) < 1e-6);
    // The geometric median: no worse (sum of distances) than the mean, and
    // equal to numpy's Weiszfeld iteration.
    let g = run_for("geometric_median");
    let cost = |m: &Tensor| {
        (&xs - m)
            .norm_scalaropt_dim(2, [1], false)
            .sum(Kind::Double)
            .double_value(&[])
    };
    assert!(
        cost(&g) < cost(&mean),
        "geometric median should beat the mean"
    );
    let out = py(
        r#"
import sys, numpy as np
X = np.load(sys.argv[1]).astype(np.float64)
m = X.mean(0)
for _ in range(100):
    w = 1 / np.maximum(np.linalg.norm(X - m, axis=1), 1e-6)
    m = (X * w[:, None]).sum(0) / w.sum()
print(" ".join(repr(float(v)) for v in m))
"#,
        &[&x],
    );
    let want: Vec<f64> = out.split_whitespace().map(|v| v.parse().unwrap()).collect();
    let diff = (g - Tensor::from_slice(&want))
        .abs()
        .max()
        .double_value(&[]);
    assert!(
        diff < 1e-4,
        "geometric median differs from numpy's by {diff}"
    );
    // Zeros.
    let z = run_for("zeros");
    assert!(z.abs().max().double_value(&[]) < 1e-6);
}

#[test]
fn expected_norm_scales_inputs_to_mean_norm_sqrt_d() {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = data(dir.path());
    let run = train(
        dir.path(),
        "scaled",
        &config(
            &x,
            "  activation: relu\n",
            "  penalty: l1\n",
            "  epochs: 1\n",
        ),
        &["data.normalize=expected_norm"],
    );
    let w = weights(&run);
    let xs = Tensor::read_npy(&x).unwrap().to_kind(Kind::Double);
    let scaled = &xs / w["norm_scale"].to_kind(Kind::Double);
    let mean_norm = scaled
        .norm_scalaropt_dim(2, [1], false)
        .mean(Kind::Double)
        .double_value(&[]);
    assert!(
        (mean_norm - 4.0).abs() < 1e-5,
        "mean norm {mean_norm}, want sqrt(16)"
    );
    assert_eq!(w["norm_shift"].abs().max().double_value(&[]), 0.0);
    // Reconstructions come back in the data's own scale.
    let xh = dir.path().join("xh.npy");
    sae_ok(&[
        "reconstruct",
        "--model",
        run.to_str().unwrap(),
        "--data",
        &x,
        "--out",
        xh.to_str().unwrap(),
    ]);
    let xh = Tensor::read_npy(&xh).unwrap().to_kind(Kind::Double);
    let fvu = (&xh - &xs).square().sum(Kind::Double).double_value(&[])
        / (&xs - xs.mean_dim(0, true, Kind::Double))
            .square()
            .sum(Kind::Double)
            .double_value(&[]);
    let reported = summary(&run)["train"]["fvu"].as_f64().unwrap();
    assert!(
        (fvu - reported).abs() < 1e-4,
        "fvu {fvu} vs summary {reported}"
    );
}

#[test]
fn transcoder_reconstructs_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = data(dir.path());
    // y: a fixed linear map of x into 10 columns, plus an offset.
    let y = dir.path().join("y.npy");
    py(
        r#"
import sys, numpy as np
X = np.load(sys.argv[1])
A = np.random.default_rng(0).standard_normal((X.shape[1], 10)).astype(np.float32) / 4
np.save(sys.argv[2], (X @ A + 0.5).astype(np.float32))
"#,
        &[&x, y.to_str().unwrap()],
    );
    let run = train(
        dir.path(),
        "transcoder",
        &config(
            &x,
            "  activation: relu\n  apply_b_dec_to_input: false\n  b_dec_init: mean\n",
            "  penalty: l1\n  weight: 0.001\n",
            "  epochs: 10\n",
        ),
        &[
            &format!("data.target={}", y.display()),
            "data.normalize=standardize",
            "data.valid_fraction=0.1",
        ],
    );
    let w = weights(&run);
    assert_eq!(w["W_dec"].size(), vec![48, 10]);
    assert_eq!(w["out_norm_scale"].size(), vec![10]);
    let s = summary(&run);
    let fvu = s["valid"]["fvu"].as_f64().unwrap();
    assert!(fvu < 0.2, "transcoder fvu {fvu}");
    // Reconstruct gives the target's width, in its own scale.
    let yh = dir.path().join("yh.npy");
    sae_ok(&[
        "reconstruct",
        "--model",
        run.to_str().unwrap(),
        "--data",
        &x,
        "--out",
        yh.to_str().unwrap(),
    ]);
    let yh = Tensor::read_npy(&yh).unwrap();
    let yt = Tensor::read_npy(&y).unwrap();
    assert_eq!(yh.size(), yt.size());
    let rel = (&yh - &yt).square().mean(Kind::Float).double_value(&[])
        / (&yt - yt.mean_dim(0, true, Kind::Float))
            .square()
            .mean(Kind::Float)
            .double_value(&[]);
    assert!(rel < 0.2, "reconstruct vs target: {rel}");
    // Reloading (eval on the run directory) keeps the architecture.
    let y = y.to_str().unwrap();
    let out = sae_ok(&[
        "eval",
        "--model",
        run.to_str().unwrap(),
        "--data",
        &x,
        "--target-data",
        y,
        "--json",
    ]);
    let m: serde_json::Value = serde_json::from_str(&out).unwrap();
    let train_fvu = s["train"]["fvu"].as_f64().unwrap();
    assert!(m["fvu"].as_f64().unwrap() < 0.2, "{out}");
    println!(
        "transcoder: valid fvu {fvu:.4}, train {train_fvu:.4}, eval on all rows {}",
        m["fvu"]
    );
    let o = sae(&["eval", "--model", run.to_str().unwrap(), "--data", &x]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "eval of a transcoder without --target-data"
    );
    assert!(stderr(&o).contains("--target-data"), "{}", stderr(&o));
}

#[test]
fn deep_and_denoising_models_train() {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = data(dir.path());
    // Deep: 16 -> 32 -> 24 (code) -> 32 -> 16.
    let run = train(
        dir.path(),
        "deep",
        &config(
            &x,
            "  activation: relu\n  hidden: [32, 24]\n  apply_b_dec_to_input: false\n  init_scheme: torch_linear\n",
            "  penalty: l1\n  weight: 0.001\n",
            "  epochs: 10\n",
        ),
        &["model.d_hidden=24"],
    );
    let w = weights(&run);
    assert_eq!(w["enc_layers.0.W"].size(), vec![16, 32]);
    assert_eq!(w["W_enc"].size(), vec![32, 24]);
    assert_eq!(w["W_dec"].size(), vec![24, 32]);
    assert_eq!(w["dec_layers.0.W"].size(), vec![32, 16]);
    let resolved = std::fs::read_to_string(run.join("config.yaml")).unwrap();
    assert!(resolved.contains("d_hidden: 24"), "{resolved}");
    let fvu = summary(&run)["train"]["fvu"].as_f64().unwrap();
    assert!(fvu < 0.5, "deep fvu {fvu}");
    let z = dir.path().join("z.npy");
    sae_ok(&[
        "encode",
        "--model",
        run.to_str().unwrap(),
        "--data",
        &x,
        "--out",
        z.to_str().unwrap(),
    ]);
    assert_eq!(Tensor::read_npy(&z).unwrap().size(), vec![2048, 24]);

    // Denoising: trained on corrupted inputs, measured against the clean
    // ones. On masked inputs it reconstructs the clean rows better than a
    // model trained without noise.
    let noisy = dir.path().join("noisy.npy");
    py(
        r#"
import sys, numpy as np
X = np.load(sys.argv[1])
keep = np.random.default_rng(1).random(X.shape) >= 0.3
np.save(sys.argv[2], (X * keep).astype(np.float32))
"#,
        &[&x, noisy.to_str().unwrap()],
    );
    let mut errs = Vec::new();
    for (noise, name) in [("none", "clean"), ("mask", "denoise")] {
        let run = train(
            dir.path(),
            name,
            &config(
                &x,
                "  activation: relu\n",
                "  penalty: l1\n  weight: 0.001\n",
                &format!("  epochs: 10\n  input_noise: {noise}\n  noise_level: 0.3\n"),
            ),
            &[],
        );
        let xh = dir.path().join(format!("{name}-xh.npy"));
        sae_ok(&[
            "reconstruct",
            "--model",
            run.to_str().unwrap(),
            "--data",
            noisy.to_str().unwrap(),
            "--out",
            xh.to_str().unwrap(),
        ]);
        let xh = Tensor::read_npy(&xh).unwrap();
        let clean = Tensor::read_npy(&x).unwrap();
        errs.push((xh - clean).square().mean(Kind::Float).double_value(&[]));
    }
    println!(
        "mse vs clean on masked inputs: plain {:.5}, denoising {:.5}",
        errs[0], errs[1]
    );
    assert!(
        errs[1] < errs[0],
        "denoising should help on noisy inputs: {errs:?}"
    );
    // Gaussian noise trains too.
    let run = train(
        dir.path(),
        "gauss",
        &config(
            &x,
            "  activation: relu\n",
            "  penalty: l1\n",
            "  input_noise: gaussian\n",
        ),
        &[],
    );
    assert!(summary(&run)["train"]["fvu"].as_f64().unwrap() < 1.0);
}

#[test]
fn dead_latents_are_counted_and_resampled() {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = data(dir.path());
    // Many latents for the data, k = 2: some go silent.
    let base = |resample: i64| {
        config(
            &x,
            "  activation: topk\n  k: 2\n",
            "  penalty: none\n",
            &format!("  epochs: 6\n  dead_window: 8\n  resample_every: {resample}\n"),
        )
    };
    let wide = ["model.d_hidden=128"];
    let plain = metrics_lines(&train(dir.path(), "dead", &base(0), &wide));
    let dead = col(&plain, "dead");
    assert!(
        dead.iter().any(|&d| d > 0.0),
        "no dead latents seen: {dead:?}"
    );
    let lines = metrics_lines(&train(dir.path(), "resampled", &base(20), &wide));
    for l in &lines {
        let step = l["step"].as_i64().unwrap();
        if step % 20 == 0 {
            assert_eq!(
                l["dead"].as_i64(),
                Some(0),
                "step {step}: all dead were resampled"
            );
        }
    }
}

#[test]
fn new_keys_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = data(dir.path());
    let cfg = write_config(
        dir.path(),
        "v.yaml",
        &config(&x, "  activation: relu\n", "  penalty: l1\n", ""),
    );
    for (set, needle) in [
        ("sparsity.penalty=l0", "sparsity.penalty"),
        ("sparsity.penalty=auxk", "sparsity.penalty"),
        ("model.activation=batchtopk", "model.k"),
        ("model.jumprelu_bandwidth=0", "model.jumprelu_bandwidth"),
        ("train.grad_clip=-1", "train.grad_clip"),
        ("train.dead_window=0", "train.dead_window"),
        ("train.input_noise=mask", "train.noise_level"),
        ("model.hidden=[32, 8]", "model.d_hidden"),
        ("data.target=y.npy", "model.apply_b_dec_to_input"),
        ("train.lr_warmup_steps=100000", "train.lr_warmup_steps"),
    ] {
        let mut args = vec!["train", "--config", &cfg, "--out"];
        let out = dir.path().join("never");
        args.push(out.to_str().unwrap());
        args.extend(["--set", set]);
        if set.starts_with("train.input_noise") {
            args.extend(["--set", "train.noise_level=1.5"]);
        }
        if set.starts_with("model.hidden") {
            args.extend(["--set", "model.d_hidden=16"]);
        }
        let o = sae(&args);
        assert_eq!(o.status.code(), Some(2), "{set}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{set}: {}", stderr(&o));
        assert!(!out.exists(), "{set}: left a run directory");
    }
}
