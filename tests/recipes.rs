//! The modern training recipes (issue 8), end to end through the binary:
//! batch top-k and JumpReLU, AuxK, schedules, the unit-norm decoder, b_dec
//! init, input scaling, transcoders, deep and denoising models, resampling.
//! Bit-exact training against PyTorch is in tests/parity.rs.

mod common;
use common::*;
use std::path::Path;
use tch::{Kind, Tensor};

/// A small config on `x` (48 latents, 4 epochs of 128-row batches); each
/// test adds its recipe as `--set` overrides.
fn recipe(dir: &Path, name: &str, x: &str) -> Case {
    Case::new(dir, name)
        .yaml(format!(
            "seed: 3\ndevice: cpu\ndata:\n  train: {x}\n\
             model:\n  d_hidden: 48\n  init_scheme: sae\n\
             sparsity: {{}}\n\
             train:\n  epochs: 4\n  batch_size: 128\n  optimizer: {{lr: 0.005}}\n  threads: 1\n"
        ))
        .flag("--force")
}

fn data(dir: &Path) -> (String, String) {
    synth(dir, 2048, 16, 32, 3)
}

/// Largest |a - b| between two .npy files.
fn npy_dev(a: &Path, b: &Path) -> f64 {
    (Tensor::read_npy(a).unwrap() - Tensor::read_npy(b).unwrap())
        .abs()
        .max()
        .double_value(&[])
}

#[test]
fn topk_l0_is_exactly_k() {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = data(dir.path());
    let run = recipe(dir.path(), "topk", &x)
        .sets([
            "model.activation=topk",
            "model.k=4",
            "sparsity.penalty=none",
        ])
        .train();
    let _codes = assert_k_codes_per_row(&run, dir.path(), &x, 4);
}

/// L0 is `k` on every training batch and on the whole data after training,
/// and each row's encoding has exactly `k` non-zero codes; returns the codes.
fn assert_k_codes_per_row(run: &Run, dir: &Path, x: &str, k: i64) -> Tensor {
    for l0 in run.metric("l0") {
        assert_eq!(l0, k as f64, "training-batch l0");
    }
    assert_eq!(run.stat("train", "l0"), k as f64);
    let z = dir.join("z.npy");
    run.apply("encode", x, &z, &[]);
    let z = Tensor::read_npy(&z).unwrap();
    let per_row = z.ne(0.0).sum_dim_intlist(1, false, Kind::Int64);
    assert_eq!(per_row.max().int64_value(&[]), k);
    assert_eq!(per_row.min().int64_value(&[]), k);
    z
}

/// AbsTopK keeps k codes of either sign per row: L0 (codes that are not
/// 0) is k on every batch, and some kept codes are negative.
#[test]
fn abstopk_keeps_k_signed_codes_per_row() {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = data(dir.path());
    let run = recipe(dir.path(), "abstopk", &x)
        .sets([
            "model.activation=abstopk",
            "model.k=4",
            "sparsity.penalty=auxk",
            "train.dead_window=5",
        ])
        .train();
    let z = assert_k_codes_per_row(&run, dir.path(), &x, 4);
    let negative = z.lt(0.0).sum(Kind::Int64).int64_value(&[]);
    assert!(negative > 0, "no negative code kept");
}

#[test]
fn batchtopk_mean_l0_is_k_on_every_training_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = data(dir.path());
    // 2048 rows in batches of 128: k x 128 codes survive per batch.
    let run = recipe(dir.path(), "batchtopk", &x)
        .sets([
            "model.activation=batchtopk",
            "model.k=3",
            "model.topk_threshold_lr=0.05",
            "sparsity.penalty=auxk",
            "sparsity.weight=0.03",
            "train.dead_window=10",
        ])
        .train();
    for l0 in run.metric("l0") {
        assert_eq!(l0, 3.0, "training-batch mean l0");
    }
    // The inference threshold: saved per latent, all equal, positive.
    let t = &run.model()["threshold"];
    assert_eq!(t.size(), vec![48]);
    let (lo, hi) = (t.min().double_value(&[]), t.max().double_value(&[]));
    assert!(lo > 0.0 && lo == hi, "threshold {lo}..{hi}");
    // At inference the rows' L0 varies but averages near k.
    let l0 = run.stat("train", "l0");
    assert!((1.0..8.0).contains(&l0), "inference l0 {l0}");
}

#[test]
fn matryoshka_batchtopk_trains_its_levels_and_validates_its_widths() {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = data(dir.path());
    let sets = [
        "model.activation=matryoshka_batchtopk",
        "model.k=3",
        "sparsity.penalty=none",
    ];
    let run = recipe(dir.path(), "matryoshka", &x)
        .sets(sets)
        .set("model.matryoshka_widths=[8, 24]")
        .train();
    // Batch top-k codes; the two inner levels' mse logged as aux_loss and
    // added to the loss.
    for l0 in run.metric("l0") {
        assert_eq!(l0, 3.0, "training-batch mean l0");
    }
    let (loss, mse, aux) = (
        run.metric("loss"),
        run.metric("mse"),
        run.metric("aux_loss"),
    );
    assert_eq!(aux.len(), loss.len());
    for i in 0..loss.len() {
        assert!(aux[i] > 0.0, "aux_loss {}", aux[i]);
        let d = (loss[i] - mse[i] - aux[i]).abs();
        assert!(d <= 1e-5 * loss[i].abs(), "loss != mse + aux_loss at {i}");
    }
    // Saved as batchtopk: one positive threshold for every latent.
    let t = &run.model()["threshold"];
    assert_eq!(t.size(), vec![48]);
    assert!(t.min().double_value(&[]) > 0.0);
    // model.matryoshka_widths as SAELens checks it.
    let base = recipe(dir.path(), "never", &x).sets(sets);
    for (widths, needle) in [
        ("[]", "model.matryoshka_widths: required"),
        (
            "[0, 8]",
            "model.matryoshka_widths: width 0 must be at least 1",
        ),
        (
            "[8, 8]",
            "model.matryoshka_widths: must be strictly increasing",
        ),
        (
            "[8, 49]",
            "model.matryoshka_widths: width 49 exceeds model.d_hidden",
        ),
    ] {
        base.clone()
            .set(format!("model.matryoshka_widths={widths}"))
            .fails(&[needle]);
    }
    recipe(dir.path(), "never", &x)
        .sets(["model.matryoshka_widths=[8]"])
        .fails(&["model.matryoshka_widths: only used by activation matryoshka_batchtopk"]);
}

#[test]
fn jumprelu_l0_falls_as_its_coefficient_rises() {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = data(dir.path());
    let mut l0s = Vec::new();
    for w in ["0.0", "0.0003", "0.003", "0.03"] {
        let run = recipe(dir.path(), &format!("jumprelu-{w}"), &x)
            .sets([
                "model.activation=jumprelu",
                "model.jumprelu_init_threshold=0.05",
                "sparsity.penalty=l0",
                &format!("sparsity.weight={w}"),
                "train.epochs=8",
            ])
            .train();
        let l0 = run.stat("train", "l0");
        println!(
            "l0 weight {w}: l0 {l0:.3} fvu {:.4}",
            run.stat("train", "fvu")
        );
        l0s.push(l0);
        let t = &run.model()["threshold"];
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
    let mut last = None;
    for w in ["0.001", "0.01"] {
        let run = recipe(dir.path(), &format!("gated-{w}"), &x)
            .sets([
                "model.activation=gated",
                "sparsity.penalty=l1",
                &format!("sparsity.weight={w}"),
                "train.epochs=6",
                "data.normalize=standardize",
            ])
            .train();
        let lines = run.metrics();
        let l = lines.last().unwrap();
        let want = l["mse"].as_f64().unwrap()
            + l["sparsity_weight"].as_f64().unwrap() * l["sparsity_loss"].as_f64().unwrap()
            + l["aux_loss"].as_f64().unwrap();
        assert!((l["loss"].as_f64().unwrap() - want).abs() < 1e-6, "{l}");
        l0s.push(run.stat("train", "l0"));
        let w = run.model();
        assert_eq!(w["r_mag"].size(), vec![48]);
        assert_eq!(w["b_mag"].size(), vec![48]);
        last = Some(run);
    }
    let last = last.unwrap();
    assert!(
        l0s[1] < l0s[0],
        "gated l0 should fall with the weight: {l0s:?}"
    );
    let sl = dir.path().join("gated_sl");
    sae_ok(&[
        "export",
        "--model",
        last.path(),
        "--format",
        "saelens",
        "--out",
        sl.to_str().unwrap(),
    ]);
    let z = dir.path().join("z.npy");
    last.apply("encode", &x, &z, &[]);
    // Our own reader of the SAELens directory and of the TorchScript module.
    for (m, name) in [
        (sl.clone(), "saelens"),
        (last.join("model.pt"), "torchscript"),
    ] {
        let z2 = dir.path().join(format!("z-{name}.npy"));
        apply("encode", &m, &x, &z2, &[]);
        let d = npy_dev(&z, &z2);
        assert!(d < 1e-4, "{name}: codes differ by {d}");
    }
    if !saelens_available("gated_trains_and_exports: the sae_lens check of the gated export") {
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

/// Largest |row norm - 1| of the decoder.
fn unit_norm_dev(run: &Run) -> f64 {
    let norms = run.model()["W_dec"].norm_scalaropt_dim(2, [1], false);
    (norms - 1.0).abs().max().double_value(&[])
}

#[test]
fn decoder_rows_are_unit_norm_after_every_step() {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = data(dir.path());
    for tied in [false, true] {
        // Full batch: epochs = steps; the model after step s is run s's.
        for steps in 1..=3 {
            let run = recipe(dir.path(), &format!("unit-{tied}-{steps}"), &x)
                .sets([
                    "model.activation=relu",
                    &format!("model.tied={tied}"),
                    "model.init_scheme=torch_linear",
                    "sparsity.penalty=l1",
                    "sparsity.weight=0.01",
                    &format!("train.epochs={steps}"),
                    "train.batch_size=full",
                    "train.unit_norm_decoder=true",
                ])
                .train();
            let dev = unit_norm_dev(&run);
            assert!(
                dev < 1e-5,
                "tied {tied}, step {steps}: max |norm - 1| {dev}"
            );
        }
    }
    // Mini-batches with a schedule and clipping: still unit norm at the end,
    // and without the option the rows drift.
    for (unit, name) in [(true, "unit-mb"), (false, "free-mb")] {
        let run = recipe(dir.path(), name, &x)
            .sets([
                "model.activation=topk",
                "model.k=3",
                "sparsity.penalty=none",
                &format!("train.unit_norm_decoder={unit}"),
                "train.grad_clip=1.0",
                "train.lr_warmup_steps=5",
            ])
            .train();
        let dev = unit_norm_dev(&run);
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
    let run = recipe(dir.path(), "sched", &x)
        .sets([
            "model.activation=relu",
            "sparsity.penalty=l1",
            "sparsity.weight=0.02",
            "sparsity.warmup_steps=10",
            "train.lr_schedule=cosine",
            "train.lr_warmup_steps=8",
            "train.lr_decay_steps=16",
            "train.lr_end=0.001",
        ])
        .train();
    let lines = run.metrics();
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
        let run = recipe(dir.path(), &format!("bdec-{how}"), &x)
            .sets([
                "model.activation=relu",
                "sparsity.penalty=l1",
                "train.epochs=1",
                "train.batch_size=full",
                "train.optimizer={lr: 1.0e-9}",
            ])
            .set(format!("model.b_dec_init={how}"))
            .train();
        run.model()["b_dec"].to_kind(Kind::Double)
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
    let run = recipe(dir.path(), "scaled", &x)
        .sets([
            "model.activation=relu",
            "sparsity.penalty=l1",
            "train.epochs=1",
            "data.normalize=expected_norm",
        ])
        .train();
    let w = run.model();
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
    run.apply("reconstruct", &x, &xh, &[]);
    let xh = Tensor::read_npy(&xh).unwrap().to_kind(Kind::Double);
    let fvu = (&xh - &xs).square().sum(Kind::Double).double_value(&[])
        / (&xs - xs.mean_dim(0, true, Kind::Double))
            .square()
            .sum(Kind::Double)
            .double_value(&[]);
    let reported = run.stat("train", "fvu");
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
    let run = recipe(dir.path(), "transcoder", &x)
        .sets([
            "model.activation=relu",
            "model.apply_b_dec_to_input=false",
            "model.b_dec_init=mean",
            "sparsity.penalty=l1",
            "sparsity.weight=0.001",
            "train.epochs=10",
        ])
        .set(format!("data.target={}", y.display()))
        .sets(["data.normalize=standardize", "data.valid_fraction=0.1"])
        .train();
    let w = run.model();
    assert_eq!(w["W_dec"].size(), vec![48, 10]);
    assert_eq!(w["out_norm_scale"].size(), vec![10]);
    let fvu = run.stat("valid", "fvu");
    assert!(fvu < 0.2, "transcoder fvu {fvu}");
    // Reconstruct gives the target's width, in its own scale.
    let yh = dir.path().join("yh.npy");
    run.apply("reconstruct", &x, &yh, &[]);
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
        run.path(),
        "--data",
        &x,
        "--target-data",
        y,
        "--json",
    ]);
    let m: serde_json::Value = serde_json::from_str(&out).unwrap();
    let train_fvu = run.stat("train", "fvu");
    assert!(m["fvu"].as_f64().unwrap() < 0.2, "{out}");
    println!(
        "transcoder: valid fvu {fvu:.4}, train {train_fvu:.4}, eval on all rows {}",
        m["fvu"]
    );
    // Eval of a transcoder without --target-data.
    expect_user_error(
        &["eval", "--model", run.path(), "--data", &x],
        &["--target-data"],
    );
}

#[test]
fn deep_and_denoising_models_train() {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = data(dir.path());
    // Deep: 16 -> 32 -> 24 (code) -> 32 -> 16.
    let run = recipe(dir.path(), "deep", &x)
        .sets([
            "model.activation=relu",
            "model.hidden=[32, 24]",
            "model.apply_b_dec_to_input=false",
            "model.init_scheme=torch_linear",
            "sparsity.penalty=l1",
            "sparsity.weight=0.001",
            "train.epochs=10",
            "model.d_hidden=24",
        ])
        .train();
    let w = run.model();
    assert_eq!(w["enc_layers.0.W"].size(), vec![16, 32]);
    assert_eq!(w["W_enc"].size(), vec![32, 24]);
    assert_eq!(w["W_dec"].size(), vec![24, 32]);
    assert_eq!(w["dec_layers.0.W"].size(), vec![32, 16]);
    let resolved = std::fs::read_to_string(run.join("config.yaml")).unwrap();
    assert!(resolved.contains("d_hidden: 24"), "{resolved}");
    let fvu = run.stat("train", "fvu");
    assert!(fvu < 0.5, "deep fvu {fvu}");
    let z = dir.path().join("z.npy");
    run.apply("encode", &x, &z, &[]);
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
        let run = recipe(dir.path(), name, &x)
            .sets([
                "model.activation=relu",
                "sparsity.penalty=l1",
                "sparsity.weight=0.001",
                "train.epochs=10",
                "train.noise_level=0.3",
            ])
            .set(format!("train.input_noise={noise}"))
            .train();
        let xh = dir.path().join(format!("{name}-xh.npy"));
        run.apply("reconstruct", &noisy, &xh, &[]);
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
    let run = recipe(dir.path(), "gauss", &x)
        .sets([
            "model.activation=relu",
            "sparsity.penalty=l1",
            "train.input_noise=gaussian",
        ])
        .train();
    assert!(run.stat("train", "fvu") < 1.0);
}

#[test]
fn dead_latents_are_counted_and_resampled() {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = data(dir.path());
    // Many latents for the data, k = 2: some go silent.
    let run = |name: &str, resample: i64| {
        recipe(dir.path(), name, &x)
            .sets([
                "model.activation=topk",
                "model.k=2",
                "sparsity.penalty=none",
                "train.epochs=6",
                "train.dead_window=8",
                "model.d_hidden=128",
            ])
            .set(format!("train.resample_every={resample}"))
            .train()
    };
    let dead = run("dead", 0).metric("dead");
    assert!(
        dead.iter().any(|&d| d > 0.0),
        "no dead latents seen: {dead:?}"
    );
    let lines = run("resampled", 20).metrics();
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
    let base =
        recipe(dir.path(), "never", &x).sets(["model.activation=relu", "sparsity.penalty=l1"]);
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
        (
            "model.rescale_acts_by_decoder_norm=true",
            "model.rescale_acts_by_decoder_norm: only for activation topk, not relu",
        ),
        (
            "sparsity.penalty=tanh",
            "sparsity.penalty: tanh needs activation jumprelu",
        ),
        (
            "sparsity.pre_act_weight=0.1",
            "sparsity.pre_act_weight: only for activation jumprelu",
        ),
        (
            "model.jumprelu_ste_to_input=true",
            "model.jumprelu_ste_to_input: only for activation jumprelu",
        ),
        (
            "sparsity.tanh_scale=0",
            "sparsity.tanh_scale: 0 must be > 0",
        ),
        (
            "model.multi_topk=true",
            "model.multi_topk: only for activation topk",
        ),
        (
            "train.k_decay_steps=10",
            "train.k_decay_steps: only for activation topk",
        ),
        (
            "sparsity.penalty=quadratic_l0",
            "sparsity.penalty: quadratic_l0 needs activation jumprelu",
        ),
        (
            "sparsity.target_l0=5",
            "sparsity.target_l0: only used by penalty quadratic_l0, not l1",
        ),
    ] {
        let mut case = base.clone().set(set);
        if set.starts_with("train.input_noise") {
            case = case.set("train.noise_level=1.5");
        }
        if set.starts_with("model.hidden") {
            case = case.set("model.d_hidden=16");
        }
        case.fails(&[needle]);
    }
}

/// `model.skip_connection`: refused where the training step or the exports
/// have no skip term (other activations, deep models, a sigmoid output,
/// pursuit encoders); a skip model trains with W_skip moving off zero and
/// the skip term in `reconstruct` but not in `decode`.
#[test]
fn skip_connection_is_validated_and_trains() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, _) = data(d);
    let base = recipe(d, "never", &x).sets(["model.skip_connection=true"]);
    for (sets, needle) in [
        (
            &["model.activation=gated"][..],
            "model.skip_connection: supported for activations relu, topk, batchtopk and \
             jumprelu, not gated",
        ),
        (
            &["model.hidden=[32, 8]", "model.d_hidden=16"][..],
            "model.skip_connection: not with model.hidden",
        ),
        (
            &["model.decoder_activation=sigmoid"][..],
            "model.skip_connection: needs model.decoder_activation: none",
        ),
        (
            &["eval.encoder=omp", "eval.k=3"][..],
            "model.skip_connection",
        ),
    ] {
        base.clone().sets(sets).fails(&[needle]);
    }
    let run = recipe(d, "skip", &x)
        .sets([
            "model.skip_connection=true",
            "model.activation=topk",
            "model.k=4",
            "sparsity.penalty=auxk",
            "train.epochs=2",
            "train.dead_window=8",
        ])
        .train();
    let w = Tensor::read_safetensors(run.dir.join("model.safetensors")).unwrap();
    let w_skip = &w
        .iter()
        .find(|(n, _)| n == "W_skip")
        .expect("W_skip saved")
        .1;
    assert_eq!(w_skip.size(), [16, 16]);
    let moved = w_skip.abs().max().double_value(&[]);
    assert!(moved > 0.0, "W_skip stayed at zero");
    let run_s = run.dir.to_str().unwrap();
    let (z, xh, dec) = (d.join("z.npy"), d.join("xh.npy"), d.join("dec.npy"));
    let s = |p: &Path| p.to_str().unwrap().to_string();
    sae_ok(&["encode", "--model", run_s, "--data", &x, "--out", &s(&z)]);
    sae_ok(&[
        "reconstruct",
        "--model",
        run_s,
        "--data",
        &x,
        "--out",
        &s(&xh),
    ]);
    sae_ok(&[
        "decode",
        "--model",
        run_s,
        "--data",
        &s(&z),
        "--out",
        &s(&dec),
    ]);
    // reconstruct = decode + x @ W_skip.T (no normalisation here).
    let xt = Tensor::read_npy(&x).unwrap();
    let want = Tensor::read_npy(&dec).unwrap() + xt.mm(&w_skip.tr());
    let dev = (Tensor::read_npy(&xh).unwrap() - want)
        .abs()
        .max()
        .double_value(&[]);
    assert!(dev < 1e-5, "reconstruct is not decode + skip term: {dev}");
    expect_user_error(
        &[
            "encode",
            "--model",
            run_s,
            "--data",
            &x,
            "--out",
            &s(&z),
            "--encoder",
            "omp",
            "--k",
            "3",
        ],
        &["--encoder omp: not for skip models"],
    );
    // model.init carries W_skip over to a skip model, and says when the
    // file's W_skip has no place in the configured model.
    let init = |name: &str, skip: bool| {
        recipe(d, name, &x)
            .sets([
                "model.activation=topk",
                "model.k=4",
                "sparsity.penalty=none",
                "train.epochs=1",
            ])
            .set(format!("model.skip_connection={skip}"))
            .set(format!("model.init={run_s}"))
            .train()
            .stderr
    };
    let err = init("init_skip", true);
    assert!(err.contains("b_dec, W_skip from"), "{err}");
    let err = init("init_plain", false);
    assert!(err.contains("W_skip in the file not used"), "{err}");
}

#[test]
fn dead_window_longer_than_the_run_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = data(dir.path());
    // 2048 rows / 128 = 16 steps an epoch, 4 epochs: 64 steps.
    let auxk = recipe(dir.path(), "auxk_window", &x).sets([
        "model.activation=topk",
        "model.k=4",
        "sparsity.penalty=auxk",
        "train.dead_window=65",
    ]);
    let err = auxk.user_error(&[
        "train.dead_window",
        "65",
        "64 steps",
        "sparsity.penalty: auxk",
    ]);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    recipe(dir.path(), "resample_window", &x)
        .sets([
            "model.activation=relu",
            "sparsity.penalty=l1",
            "train.resample_every=10",
            "train.dead_window=1000",
        ])
        .user_error(&["train.dead_window", "64 steps", "train.resample_every"]);
    // Without auxk or resampling the window only feeds the `dead` column.
    recipe(dir.path(), "plain_window", &x)
        .sets([
            "model.activation=topk",
            "model.k=4",
            "sparsity.penalty=none",
            "train.epochs=1",
            "train.dead_window=1000",
        ])
        .train();
}

#[test]
fn many_dead_latents_warn_on_stderr_and_in_the_summary() {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = data(dir.path());
    // An L1 weight this large, on unit-norm decoder rows, silences the latents.
    let run = recipe(dir.path(), "dead", &x)
        .sets([
            "model.activation=relu",
            "sparsity.penalty=l1",
            "sparsity.weight=100",
            "train.optimizer.lr=0.05",
            "train.unit_norm_decoder=true",
        ])
        .train();
    let dead = run.stat("train", "dead_fraction");
    assert!(dead > 0.3, "dead_fraction {dead}");
    // Shown even with -q (Case trains with -q), on one line.
    let lines: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("sae: warning:"))
        .collect();
    assert_eq!(lines.len(), 1, "stderr: {}", run.stderr);
    for needle in [
        "% of latents are dead",
        "train.resample_every",
        "train.optimizer.lr",
    ] {
        assert!(lines[0].contains(needle), "{needle} missing: {}", lines[0]);
    }
    let warnings = run.summary()["warnings"].as_array().unwrap().clone();
    assert_eq!(warnings.len(), 1);
    assert_eq!(
        format!("sae: warning: {}", warnings[0].as_str().unwrap()),
        lines[0]
    );
    // A healthy run: no warning, no `warnings` key.
    let run = recipe(dir.path(), "healthy", &x)
        .sets([
            "model.activation=topk",
            "model.k=4",
            "sparsity.penalty=none",
        ])
        .train();
    assert!(run.stat("train", "dead_fraction") <= 0.3);
    assert!(!run.stderr.contains("warning"), "{}", run.stderr);
    assert!(run.summary().get("warnings").is_none());
}

#[test]
fn calibrated_batchtopk_threshold_gives_l0_k_on_the_training_rows() {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = data(dir.path());
    for (name, extra) in [
        ("calibrated_batchtopk", None),
        (
            "calibrated_matryoshka",
            Some("model.matryoshka_widths=[8, 24]"),
        ),
    ] {
        let activation = match extra {
            Some(_) => "model.activation=matryoshka_batchtopk",
            None => "model.activation=batchtopk",
        };
        let run = recipe(dir.path(), name, &x)
            .sets([
                activation,
                "model.k=5",
                "sparsity.penalty=none",
                "model.calibrate_threshold=true",
            ])
            .sets(extra)
            .train();
        // The saved encoder, on the training rows: mean L0 = k within 1 %.
        let z = dir.path().join(format!("{name}_z.npy"));
        run.apply("encode", &x, &z, &[]);
        let z = Tensor::read_npy(&z).unwrap();
        let l0 = z
            .gt(0.0)
            .sum_dim_intlist(1, false, Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        assert!((l0 - 5.0).abs() <= 0.05, "{name}: encoded l0 {l0}");
        let summary_l0 = run.stat("train", "l0");
        assert!(
            (summary_l0 - 5.0).abs() <= 0.05,
            "{name}: summary l0 {summary_l0}"
        );
    }
    recipe(dir.path(), "calibrate_topk", &x)
        .sets([
            "model.activation=topk",
            "model.k=5",
            "model.calibrate_threshold=true",
        ])
        .user_error(&["model.calibrate_threshold", "topk"]);
}
