//! Exact parity with PyTorch reference training.
//!
//! Each case makes its inputs (data, initial weights, batch order) with
//! `tests/reference/make_inputs.py`, trains with `sae train` and with a plain
//! PyTorch script in `tests/reference/` written from the seeds' algorithms
//! (it does not use this crate), then checks that every logged loss agrees to
//! relative 1e-5 and the final weights to absolute 1e-5 (float32, CPU, one
//! thread on both sides).
//!
//! The interpreter is `$SAE_PYTHON` (the Makefile exports it), else
//! `third_party/venv/bin/python` (`common::python`); without one these tests
//! fail, never skip.
//! `make parity` runs them and prints the table of the `PARITY` lines.

mod common;

use common::{python, run_ok, Case};
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::Tensor;

const LOSS_RTOL: f64 = 1e-5;
const WEIGHT_ATOL: f64 = 1e-5;

/// How close ours and the reference must be: every logged loss term to
/// relative `loss_rtol`, the final weights to absolute `weight_atol`.
#[derive(Clone, Copy)]
struct Tol {
    loss_rtol: f64,
    weight_atol: f64,
}

const FP32: Tol = Tol {
    loss_rtol: LOSS_RTOL,
    weight_atol: WEIGHT_ATOL,
};

/// bf16 runs whose float32 formulas differ in the last bit from the
/// reference's (ReLU + L1: the L1 sum's order, already 1.5e-7 apart in
/// fp32). Both sides round the same matmul inputs and outputs to bfloat16
/// (8 significant bits: unit roundoff u = 2^-8), so they agree bit for bit
/// until such a last-bit difference flips one bfloat16 rounding; from then
/// on they drift, by far less than a rounding: losses to u/4 relative,
/// weights (all |w| < 1) to u/2 absolute. Measured on l1_full: 2.6e-4 and
/// 7.8e-4; the same case with the reference in fp32 misses both by over
/// 3x (2.9e-3, 6.8e-3), which `check` asserts, so the test sees autocast.
const BF16_DRIFT: Tol = Tol {
    loss_rtol: 1.0 / 1024.0,
    weight_atol: 1.0 / 512.0,
};
const WEIGHTS: [&str; 4] = ["W_enc", "b_enc", "W_dec", "b_dec"];

/// `x <= tol`, false for NaN.
fn within(x: f64, tol: f64) -> bool {
    x <= tol
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[derive(Clone, Copy)]
enum Reference {
    /// `seed002.py`: nn.Linear, ReLU encoder, sigmoid decoder, mean_abs penalty.
    Seed002,
    /// `seed004.py`: nn.Linear, sigmoid coding layer, KL penalty.
    Seed004,
    /// `saelens.py --architecture standard`: ReLU, L1 x decoder row norms.
    SaeLensStandard,
    /// `saelens.py --architecture topk`.
    SaeLensTopK,
    /// `recipes.py`: top-k/batch top-k + AuxK, JumpReLU + L0, schedules and
    /// constraints (issue 8); its arguments are the case's `ref_args`.
    Recipes,
    /// `p_anneal.py`: dictionary_learning's p-annealing (ReLU, lp_anneal),
    /// its arguments the case's knobs.
    PAnneal,
}

struct Parity {
    name: &'static str,
    reference: Reference,
    /// make_inputs.py `--data-kind`, `--n` (rows; `None`: the kind's own), `--init-kind`.
    data_kind: &'static str,
    n: Option<usize>,
    init_kind: &'static str,
    normalize: &'static str,
    d_hidden: i64,
    activation: &'static str,
    k: Option<i64>,
    decoder_activation: &'static str,
    apply_b_dec_to_input: bool,
    penalty: &'static str,
    target: f64,
    weight: f64,
    lr: f64,
    epochs: i64,
    /// `None`: full batch in row order; `Some(b)`: batches of `b` in a
    /// different random order each epoch (`train.order`, `[epochs, n]`).
    batch: Option<usize>,
    seed: u64,
    /// Recipe knobs (`Recipes` cases): each an extra `--set key=value` for
    /// `sae train` with the matching reference arguments.
    knobs: &'static [(&'static str, &'static [&'static str])],
    /// A transcoder: make_inputs.py `--target` writes `y.npy` (as wide as
    /// x), `data.target` on our side, `--target` on the reference's.
    transcoder: bool,
    tol: Tol,
}

impl Parity {
    fn config_yaml(&self, input: &Path) -> String {
        let k = self.k.map(|k| format!("\n  k: {k}")).unwrap_or_default();
        let (batch, order) = match self.batch {
            None => ("full".to_string(), String::new()),
            Some(b) => (
                b.to_string(),
                format!("\n  order: {:?}", input.join("order.npy")),
            ),
        };
        let data_target = match self.transcoder {
            true => format!("\n  target: {:?}", input.join("y.npy")),
            false => String::new(),
        };
        format!(
            "seed: 0
device: cpu
data:
  train: {train:?}{data_target}
  normalize: {normalize}
model:
  init: {init:?}
  d_hidden: {d_hidden}
  activation: {activation}{k}
  decoder_activation: {decoder_activation}
  apply_b_dec_to_input: {apply_b_dec_to_input}
sparsity:
  penalty: {penalty}
  target: {target}
  weight: {weight}
train:
  epochs: {epochs}
  batch_size: {batch}
  shuffle: false{order}
  threads: 1
  log_every: 1
  optimizer: {{name: adam, lr: {lr}, betas: [0.9, 0.999], eps: 1.0e-8, weight_decay: 0.0}}
",
            train = input.join("x.npy"),
            init = input.join("init.safetensors"),
            normalize = self.normalize,
            d_hidden = self.d_hidden,
            activation = self.activation,
            decoder_activation = self.decoder_activation,
            apply_b_dec_to_input = self.apply_b_dec_to_input,
            penalty = self.penalty,
            target = self.target,
            weight = self.weight,
            epochs = self.epochs,
            lr = self.lr,
        )
    }

    /// The reference script and its case-specific arguments.
    fn reference_args(&self) -> (&'static str, Vec<String>) {
        let arg = |flag: &str, value: &dyn ToString| vec![flag.to_string(), value.to_string()];
        let (script, args) = match self.reference {
            Reference::Seed002 => (
                "seed002.py",
                vec![
                    arg("--hidden", &self.d_hidden),
                    arg("--factor", &self.weight),
                    arg("--target", &self.target),
                ],
            ),
            Reference::Seed004 => (
                "seed004.py",
                vec![
                    arg("--hidden", &self.d_hidden),
                    arg("--target", &self.target),
                    arg("--weight", &self.weight),
                ],
            ),
            Reference::SaeLensStandard => (
                "saelens.py",
                vec![
                    arg("--architecture", &"standard"),
                    arg("--l1-coefficient", &self.weight),
                ],
            ),
            Reference::SaeLensTopK => (
                "saelens.py",
                vec![
                    arg("--architecture", &"topk"),
                    arg("--k", &self.k.expect("topk case has k")),
                ],
            ),
            Reference::Recipes => (
                "recipes.py",
                vec![
                    arg("--architecture", &self.activation),
                    self.k.map(|k| arg("--k", &k)).unwrap_or_default(),
                    arg("--penalty", &self.penalty),
                    arg("--coefficient", &self.weight),
                ],
            ),
            Reference::PAnneal => ("p_anneal.py", vec![arg("--coefficient", &self.weight)]),
        };
        // Recipe and p-annealing knobs, and `train.precision` (any reference: common.py).
        let knobs = self.knobs.iter().flat_map(|(_, r)| r.iter());
        let mut args = args.concat();
        args.extend(knobs.map(|a| a.to_string()));
        (script, args)
    }
}

/// `sparsity_weight` of every line of our metrics.jsonl against the
/// reference's trace, to relative `LOSS_RTOL` (the weight adapts to norms
/// of codes that agree to that).
fn check_weights_trace(metrics: &Path, trace: &Path, name: &str) {
    let read = |p: &Path| -> Vec<(i64, f64)> {
        fs::read_to_string(p)
            .unwrap()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["step"].as_i64().unwrap(),
                    v["sparsity_weight"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let (ours, theirs) = (read(metrics), read(trace));
    assert_eq!(ours.len(), theirs.len(), "{name}: sparsity_weight lines");
    let mut distinct = theirs.iter().map(|t| t.1.to_bits()).collect::<Vec<_>>();
    distinct.dedup();
    for (a, b) in ours.iter().zip(&theirs) {
        let rel = (a.1 - b.1).abs() / b.1.abs().max(f64::MIN_POSITIVE);
        assert!(
            a.0 == b.0 && (a.1 == b.1 || within(rel, LOSS_RTOL)),
            "{name}: step {} sparsity_weight {} vs the reference's {} (step {})",
            a.0,
            a.1,
            b.1,
            b.0
        );
    }
    println!(
        "{name}: sparsity_weight agrees over {} steps ({} distinct values)",
        ours.len(),
        distinct.len()
    );
}

/// One logged step: (step, epoch, loss, mse, sparsity_loss).
type Row = (i64, i64, f64, f64, f64);

fn read_jsonl(path: &Path) -> Vec<Row> {
    let text =
        fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}: bad JSON line {l:?}: {e}", path.display()));
            let f = |k: &str| {
                v[k].as_f64()
                    .unwrap_or_else(|| panic!("{}: no number `{k}` in {l}", path.display()))
            };
            (
                f("step") as i64,
                f("epoch") as i64,
                f("loss"),
                f("mse"),
                f("sparsity_loss"),
            )
        })
        .collect()
}

fn read_weights(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// Largest deviation of one logged series.
#[derive(Default)]
struct Worst {
    /// Largest absolute difference over all steps.
    max_abs: f64,
    /// Largest relative difference, and where it happened.
    rel: f64,
    step: i64,
    ours: f64,
    theirs: f64,
}

impl Worst {
    fn see(&mut self, step: i64, ours: f64, theirs: f64) {
        let abs = (ours - theirs).abs();
        // Relative to the reference; 0 against 0 (no penalty) is exact.
        let rel = if abs == 0.0 {
            0.0
        } else {
            abs / theirs.abs().max(f64::MIN_POSITIVE)
        };
        // NaN (a diverged run) must win, not vanish as f64::max would make it.
        if abs.is_nan() || abs > self.max_abs {
            self.max_abs = abs;
        }
        if rel.is_nan() || rel > self.rel {
            self.rel = rel;
            self.step = step;
            self.ours = ours;
            self.theirs = theirs;
        }
    }

    fn describe(&self, name: &str) -> String {
        if self.max_abs == 0.0 {
            return format!("{name}: bitwise equal at every step");
        }
        format!(
            "{name}: max |d| {:.3e}; max rel {:.3e} at step {} (sae {:.9} vs torch {:.9})",
            self.max_abs, self.rel, self.step, self.ours, self.theirs
        )
    }
}

/// Runs the case's PyTorch reference into `out`, `tail` appended to its
/// arguments (argparse: a later flag overrides an earlier one).
fn run_reference(case: &Parity, input: &Path, out: &Path, tail: &[&str]) {
    let (script, extra) = case.reference_args();
    let mut reference = Command::new(python());
    reference
        .arg(manifest_dir().join("tests/reference").join(script))
        .arg("--data")
        .arg(input.join("x.npy"))
        .arg("--init")
        .arg(input.join("init.safetensors"))
        .arg("--out")
        .arg(out)
        .args(["--epochs", &case.epochs.to_string()])
        .args(["--lr", &case.lr.to_string()])
        .args(["--threads", "1"])
        .args(extra);
    if case.transcoder {
        reference.arg("--target").arg(input.join("y.npy"));
    }
    match case.batch {
        None => {
            reference.args(["--batch-size", "full"]);
        }
        Some(b) => {
            reference
                .args(["--batch-size", &b.to_string()])
                .arg("--order")
                .arg(input.join("order.npy"));
        }
    }
    reference.args(tail);
    run_ok(&mut reference, &format!("{}: {script}", case.name));
}

/// A bf16 case's tolerance must tell bf16 from fp32: the reference trained
/// in fp32 must miss the bf16 reference by more than it, in the loss or mse
/// and in some weight (else the case would pass without autocast).
fn assert_bf16_visible(case: &Parity, input: &Path, ref_dir: &Path, tmp: &Path) {
    let fp32_dir = tmp.join("reference-fp32");
    run_reference(case, input, &fp32_dir, &["--precision", "fp32"]);
    let a = read_jsonl(&ref_dir.join("losses.jsonl"));
    let b = read_jsonl(&fp32_dir.join("losses.jsonl"));
    let mut worst = Worst::default();
    for (x, y) in a.iter().zip(&b) {
        worst.see(x.0, x.2, y.2);
        worst.see(x.0, x.3, y.3);
    }
    let (wa, wb) = (
        read_weights(&ref_dir.join("weights.safetensors")),
        read_weights(&fp32_dir.join("weights.safetensors")),
    );
    let dweight = WEIGHTS
        .iter()
        .map(|n| (&wa[*n] - &wb[*n]).abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    println!(
        "  reference bf16 vs fp32: max rel dloss {:.3e}, max |dweight| {dweight:.3e}",
        worst.rel
    );
    assert!(
        worst.rel > case.tol.loss_rtol && dweight > case.tol.weight_atol,
        "{}: the reference in bf16 and in fp32 agree within the tolerance \
         (rel dloss {:.3e} vs {:e}, dweight {dweight:.3e} vs {:e}): the check cannot see autocast",
        case.name,
        worst.rel,
        case.tol.loss_rtol,
        case.tol.weight_atol
    );
}

fn check(case: &Parity) {
    let py = python();
    let refdir = manifest_dir().join("tests/reference");
    let tmp = tempfile::tempdir().expect("temp dir");
    let input = tmp.path().join("input");
    let ref_dir = tmp.path().join("reference");

    // Inputs: data, init weights and (mini-batch cases) the batch order.
    let mut make = Command::new(&py);
    make.arg(refdir.join("make_inputs.py"))
        .arg("--out")
        .arg(&input)
        .args(["--data-kind", case.data_kind])
        .args(["--init-kind", case.init_kind])
        .args(["--hidden", &case.d_hidden.to_string()])
        .args(["--seed", &case.seed.to_string()]);
    if let Some(n) = case.n {
        make.args(["--n", &n.to_string()]);
    }
    if case.batch.is_some() {
        make.args(["--order-epochs", &case.epochs.to_string()]);
    }
    if case.transcoder {
        make.arg("--target");
    }
    run_ok(&mut make, &format!("{}: make_inputs.py", case.name));

    // Ours.
    let run_dir = Case::new(tmp.path(), "run")
        .yaml(case.config_yaml(&input))
        .sets(case.knobs.iter().map(|(set, _)| set))
        .train()
        .dir;

    // The PyTorch reference.
    run_reference(case, &input, &ref_dir, &[]);

    // p-annealing: the adapted sparsity weight, step by step.
    let trace = ref_dir.join("anneal.jsonl");
    if trace.is_file() {
        check_weights_trace(&run_dir.join("metrics.jsonl"), &trace, case.name);
    }

    // Losses, step by step.
    let ours = read_jsonl(&run_dir.join("metrics.jsonl"));
    let theirs = read_jsonl(&ref_dir.join("losses.jsonl"));
    let mut failures = Vec::new();
    if ours.len() != theirs.len() {
        failures.push(format!(
            "sae logged {} steps, the reference {}",
            ours.len(),
            theirs.len()
        ));
    }
    let (mut loss, mut mse, mut sparsity) = (Worst::default(), Worst::default(), Worst::default());
    for (a, b) in ours.iter().zip(&theirs) {
        if (a.0, a.1) != (b.0, b.1) {
            failures.push(format!(
                "step/epoch mismatch: sae ({}, {}) vs torch ({}, {})",
                a.0, a.1, b.0, b.1
            ));
            break;
        }
        loss.see(a.0, a.2, b.2);
        mse.see(a.0, a.3, b.3);
        sparsity.see(a.0, a.4, b.4);
    }
    for (name, w) in [("loss", &loss), ("mse", &mse), ("sparsity_loss", &sparsity)] {
        if !within(w.rel, case.tol.loss_rtol) {
            failures.push(format!(
                "{} exceeds relative {:e}",
                w.describe(name),
                case.tol.loss_rtol
            ));
        }
    }

    // Final weights.
    let wa = read_weights(&run_dir.join("model.safetensors"));
    let wb = read_weights(&ref_dir.join("weights.safetensors"));
    let mut dweight = 0.0f64;
    let mut per_tensor = Vec::new();
    // jumprelu / batchtopk thresholds, gated magnitudes and W_skip too,
    // when the reference has them.
    let extra = ["threshold", "r_mag", "b_mag", "W_skip"]
        .into_iter()
        .filter(|n| wb.contains_key(*n));
    for name in WEIGHTS.into_iter().chain(extra) {
        let (a, b) = match (wa.get(name), wb.get(name)) {
            (Some(a), Some(b)) => (a, b),
            _ => {
                failures.push(format!("tensor {name} missing from one side"));
                continue;
            }
        };
        if a.size() != b.size() {
            failures.push(format!(
                "{name}: shape {:?} (sae) vs {:?} (torch)",
                a.size(),
                b.size()
            ));
            continue;
        }
        let d = (a - b).abs().max().double_value(&[]);
        per_tensor.push(format!("{name} {d:.3e}"));
        dweight = dweight.max(d);
        if !within(d, case.tol.weight_atol) {
            failures.push(format!(
                "{name}: max |dweight| {d:.3e} exceeds {:e}",
                case.tol.weight_atol
            ));
        }
    }

    // Report (visible with --nocapture; `make parity` tabulates PARITY lines).
    println!();
    println!(
        "{}: {} steps over {} epochs ({})",
        case.name,
        ours.len(),
        case.epochs,
        match case.batch {
            None => "full batch".to_string(),
            Some(b) => format!("batches of {b}, train.order"),
        }
    );
    println!("  {}", loss.describe("loss"));
    println!("  {}", mse.describe("mse"));
    println!("  {}", sparsity.describe("sparsity_loss"));
    println!("  max |dweight| {dweight:.3e} ({})", per_tensor.join(", "));
    println!(
        "PARITY\t{}\t{}\t{}\t{:.3e}\t{:.3e}\t{:.3e}\t{}",
        case.name,
        case.epochs,
        ours.len(),
        loss.max_abs,
        loss.rel,
        dweight,
        if failures.is_empty() { "ok" } else { "FAIL" }
    );
    if case.knobs.contains(&BF16) {
        assert_bf16_visible(case, &input, &ref_dir, tmp.path());
    }
    assert!(
        failures.is_empty(),
        "{}: no parity with the PyTorch reference:\n  {}",
        case.name,
        failures.join("\n  ")
    );
}

/// What most cases share: SAELens-style sparse data (500 rows), SAELens init,
/// b_dec subtracted from the input, a linear decoder, Adam lr 3e-3; each
/// case below says what it changes.
fn sparse(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        name,
        reference: Reference::Recipes,
        data_kind: "sparse",
        n: Some(500),
        init_kind: "sae",
        normalize: "none",
        d_hidden: 64,
        activation: "relu",
        k: None,
        decoder_activation: "none",
        apply_b_dec_to_input: true,
        penalty: "none",
        target: 0.05,
        weight: 0.0,
        lr: 3e-3,
        epochs,
        batch,
        seed: 0,
        knobs: &[],
        transcoder: false,
        tol: FP32,
    }
}

/// Seed 002: ReLU encoder, sigmoid decoder, `sum(factor * |rho_hat - 0.05|)`,
/// Adam lr 1e-3, standardised make_classification-like data, 8 hidden units.
fn seed002(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        reference: Reference::Seed002,
        data_kind: "classification",
        n: None, // fixed by the seed: 1000 samples, 800 in the train split
        init_kind: "linear",
        normalize: "standardize",
        d_hidden: 8,
        decoder_activation: "sigmoid",
        apply_b_dec_to_input: false,
        penalty: "mean_abs",
        weight: 0.05,
        lr: 1e-3,
        seed: 2,
        ..sparse(name, epochs, batch)
    }
}

/// Seed 004: sigmoid coding layer, linear output, `0.2 * sum KL(0.1 || rho_hat)`,
/// Adam lr 0.01, uint8 pixel data scaled to [0, 1] (minmax).
fn seed004(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        reference: Reference::Seed004,
        data_kind: "pixels",
        n: Some(600),
        init_kind: "linear",
        normalize: "minmax",
        d_hidden: 48,
        activation: "sigmoid",
        apply_b_dec_to_input: false,
        penalty: "kl",
        target: 0.1,
        weight: 0.2,
        lr: 0.01,
        seed: 4,
        ..sparse(name, epochs, batch)
    }
}

/// SAELens standard: ReLU, L1 scaled by decoder row norms, b_dec subtracted
/// from the input, SAELens init (b_dec = data mean).
fn saelens_l1(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        reference: Reference::SaeLensStandard,
        d_hidden: 32,
        penalty: "l1",
        weight: 0.005,
        seed: 3,
        ..sparse(name, epochs, batch)
    }
}

/// SAELens top-k: k = 4 of 64, no penalty.
fn saelens_topk(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        reference: Reference::SaeLensTopK,
        activation: "topk",
        k: Some(4),
        seed: 5,
        ..sparse(name, epochs, batch)
    }
}

/// Top-k (k = 4 of 128) with the AuxK loss (coefficient 1/32, k_aux = d_in/2):
/// latents silent for more than 3 steps count as dead and reconstruct the
/// residual.
fn topk_auxk(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        d_hidden: 128,
        activation: "topk",
        k: Some(4),
        penalty: "auxk",
        weight: 0.03125,
        seed: 6,
        knobs: &[("train.dead_window=3", &["--dead-window", "3"])],
        ..sparse(name, epochs, batch)
    }
}

/// Top-k + AuxK with SAELens's `rescale_acts_by_decoder_norm` (its top-k
/// training default): selection on pre-activations times the decoder
/// norms, codes decoded over them, the norms folded into the saved weights.
/// From `nn.Linear` weights, whose decoder rows have unequal norms, so the
/// rescaling changes the selection from the first step.
fn topk_rescale(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        seed: 7,
        init_kind: "linear",
        knobs: &[
            ("train.dead_window=3", &["--dead-window", "3"]),
            (
                "model.rescale_acts_by_decoder_norm=true",
                &["--rescale-acts-by-decoder-norm"],
            ),
        ],
        ..topk_auxk(name, epochs, batch)
    }
}

/// Anthropic's JumpReLU recipe (SAELens jumprelu, `tanh` sparsity mode):
/// the tanh sparsity loss, the pre-activation loss on dead latents, and the
/// straight-through estimate reaching the pre-activations.
fn jumprelu_tanh(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        penalty: "tanh",
        weight: 0.01,
        seed: 10,
        knobs: &[
            (
                "model.jumprelu_init_threshold=0.1",
                &["--init-threshold", "0.1"],
            ),
            ("sparsity.tanh_scale=3.0", &["--tanh-scale", "3.0"]),
            (
                "sparsity.pre_act_weight=0.003",
                &["--pre-act-coefficient", "0.003"],
            ),
            ("train.dead_window=3", &["--dead-window", "3"]),
            ("model.jumprelu_ste_to_input=true", &["--ste-to-input"]),
        ],
        ..jumprelu_l0(name, epochs, batch)
    }
}

/// Gemma Scope 2's JumpReLU loss (SAELens `quadratic` mode): each row's L0
/// pulled to a target, quadratically.
fn jumprelu_quadratic(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        penalty: "quadratic_l0",
        weight: 0.001,
        seed: 12,
        knobs: &[
            (
                "model.jumprelu_init_threshold=0.1",
                &["--init-threshold", "0.1"],
            ),
            ("sparsity.target_l0=6", &["--target-l0", "6"]),
        ],
        ..jumprelu_l0(name, epochs, batch)
    }
}

/// JumpReLU + L0 with the straight-through estimate reaching the
/// pre-activations (SAELens `jumprelu_ste_to_input`).
fn jumprelu_l0_ste_input(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        seed: 11,
        knobs: &[
            (
                "model.jumprelu_init_threshold=0.1",
                &["--init-threshold", "0.1"],
            ),
            ("model.jumprelu_ste_to_input=true", &["--ste-to-input"]),
        ],
        ..jumprelu_l0(name, epochs, batch)
    }
}

/// Top-k + AuxK updated by torch's fused Adam kernel on both sides
/// (`train.optimizer.fused`, `torch.optim.Adam(fused=True)`).
fn topk_fused_adam(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        seed: 13,
        knobs: &[
            ("train.dead_window=3", &["--dead-window", "3"]),
            ("train.optimizer.fused=true", &["--fused"]),
        ],
        ..topk_auxk(name, epochs, batch)
    }
}

/// sparsify's Multi-TopK loss (the 4k reconstruction, weight 1/8) with
/// its k decay (from min(d_hidden, 10 d_in) down to k over 30 steps), AuxK.
fn topk_multi_decay(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        seed: 14,
        knobs: &[
            ("train.dead_window=3", &["--dead-window", "3"]),
            ("model.multi_topk=true", &["--multi-topk"]),
            ("train.k_decay_steps=30", &["--k-decay-steps", "30"]),
        ],
        ..topk_auxk(name, epochs, batch)
    }
}

/// sparsify's skip transcoder: top-k + AuxK reconstructing another array
/// (`data.target`, the encoder reading x itself) plus `x @ W_skip.T`,
/// W_skip from zeros.
fn topk_skip_transcoder(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        seed: 15,
        apply_b_dec_to_input: false,
        transcoder: true,
        knobs: &[
            ("train.dead_window=3", &["--dead-window", "3"]),
            ("model.skip_connection=true", &["--skip-connection"]),
        ],
        ..topk_auxk(name, epochs, batch)
    }
}

/// Top-k + AuxK trained by sparsify's `signum`: sign descent made
/// schedule-free (schedulefree's ScheduleFreeWrapper, momentum 0.95); the
/// saved weights are its averaged (eval-mode) ones.
fn topk_signum(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        seed: 15,
        lr: 0.002,
        knobs: &[
            ("train.dead_window=3", &["--dead-window", "3"]),
            ("train.optimizer.name=signum", &["--optimizer", "signum"]),
        ],
        ..topk_auxk(name, epochs, batch)
    }
}

/// A skip connection on a plain SAE (b_dec subtracted from the encoder's
/// input, not from the skip term's) with Multi-TopK, whose 4k
/// reconstruction leaves the skip term out as sparsify's does.
fn topk_skip_multi(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        seed: 16,
        knobs: &[
            ("train.dead_window=3", &["--dead-window", "3"]),
            ("model.skip_connection=true", &["--skip-connection"]),
            ("model.multi_topk=true", &["--multi-topk"]),
        ],
        ..topk_auxk(name, epochs, batch)
    }
}

/// signum with a learning-rate warm-up (schedule-free weighs its average by
/// the largest rate so far, squared), a unit-norm decoder, clipping and a
/// momentum of its own.
fn topk_signum_recipe(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        seed: 16,
        lr: 0.002,
        knobs: &[
            ("train.dead_window=3", &["--dead-window", "3"]),
            ("train.optimizer.name=signum", &["--optimizer", "signum"]),
            ("train.optimizer.momentum=0.9", &["--momentum", "0.9"]),
            ("train.lr_warmup_steps=20", &["--lr-warmup-steps", "20"]),
            ("train.unit_norm_decoder=true", &["--unit-norm-decoder"]),
            ("train.grad_clip=0.5", &["--grad-clip", "0.5"]),
        ],
        ..topk_auxk(name, epochs, batch)
    }
}

/// Top-k + AuxK trained by sparsify's `muon`: Muon (bfloat16 Newton-Schulz)
/// on W_enc and W_dec with its weight decay, Adam on the biases.
fn topk_muon(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        seed: 17,
        lr: 0.002,
        knobs: &[
            ("train.dead_window=3", &["--dead-window", "3"]),
            ("train.optimizer.name=muon", &["--optimizer", "muon"]),
        ],
        ..topk_auxk(name, epochs, batch)
    }
}

/// Muon as sparsify schedules it: linear decay to 0, the warm-up on the
/// Adam part only; with a unit-norm decoder, clipping, a momentum and
/// weight decay of its own.
fn topk_muon_recipe(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        seed: 18,
        lr: 0.002,
        knobs: &[
            ("train.dead_window=3", &["--dead-window", "3"]),
            ("train.optimizer.name=muon", &["--optimizer", "muon"]),
            ("train.optimizer.momentum=0.9", &["--momentum", "0.9"]),
            (
                "train.optimizer.muon_weight_decay=0.05",
                &["--muon-weight-decay", "0.05"],
            ),
            ("train.lr_schedule=linear", &["--lr-schedule", "linear"]),
            ("train.lr_warmup_steps=20", &["--lr-warmup-steps", "20"]),
            ("train.unit_norm_decoder=true", &["--unit-norm-decoder"]),
            ("train.grad_clip=0.5", &["--grad-clip", "0.5"]),
        ],
        ..topk_auxk(name, epochs, batch)
    }
}

/// AbsTopK (SAELens `abstopk`) + AuxK: the k largest |pre-activations|
/// keep their sign; dead latents ranked by magnitude.
fn abstopk(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        activation: "abstopk",
        seed: 8,
        ..topk_auxk(name, epochs, batch)
    }
}

/// JumpReLU + the step-function L0 penalty, straight-through to the
/// thresholds (SAELens's own autograd Functions on the reference side).
fn jumprelu_l0(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        activation: "jumprelu",
        penalty: "l0",
        weight: 0.002,
        seed: 7,
        knobs: &[
            (
                "model.jumprelu_init_threshold=0.1",
                &["--init-threshold", "0.1"],
            ),
            ("model.jumprelu_bandwidth=0.05", &["--bandwidth", "0.05"]),
        ],
        ..sparse(name, epochs, batch)
    }
}

/// The training recipe knobs together, on batch top-k + AuxK: LR warm-up,
/// cosine decay to lr_end and a final linear decay, sparsity-weight warm-up,
/// unit-norm decoder rows, gradient clipping, b_dec = data mean, and the
/// inference threshold (running min positive code) compared at the end.
fn batchtopk_recipe(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        d_hidden: 96,
        activation: "batchtopk",
        k: Some(3),
        penalty: "auxk",
        weight: 0.0625,
        lr: 4e-3,
        seed: 8,
        knobs: &[
            ("train.dead_window=4", &["--dead-window", "4"]),
            ("train.lr_schedule=cosine", &["--lr-schedule", "cosine"]),
            ("train.lr_warmup_steps=10", &["--lr-warmup-steps", "10"]),
            ("train.lr_decay_steps=15", &["--lr-decay-steps", "15"]),
            ("train.lr_end=0.001", &["--lr-end", "0.001"]),
            (
                "sparsity.warmup_steps=20",
                &["--sparsity-warmup-steps", "20"],
            ),
            ("train.unit_norm_decoder=true", &["--unit-norm-decoder"]),
            ("train.grad_clip=0.05", &["--grad-clip", "0.05"]),
            ("model.b_dec_init=mean", &["--b-dec-mean"]),
            (
                "model.topk_threshold_lr=0.05",
                &["--topk-threshold-lr", "0.05"],
            ),
        ],
        ..sparse(name, epochs, batch)
    }
}

/// JumpReLU + L0 with the recipe knobs (linear LR decay after warm-up,
/// L0-coefficient warm-up, unit-norm decoder, gradient clipping).
fn jumprelu_recipe(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        seed: 9,
        knobs: &[
            (
                "model.jumprelu_init_threshold=0.1",
                &["--init-threshold", "0.1"],
            ),
            ("train.lr_schedule=linear", &["--lr-schedule", "linear"]),
            ("train.lr_warmup_steps=5", &["--lr-warmup-steps", "5"]),
            ("train.lr_end=0.0005", &["--lr-end", "0.0005"]),
            (
                "sparsity.warmup_steps=30",
                &["--sparsity-warmup-steps", "30"],
            ),
            ("train.unit_norm_decoder=true", &["--unit-norm-decoder"]),
            ("train.grad_clip=0.02", &["--grad-clip", "0.02"]),
        ],
        ..jumprelu_l0(name, epochs, batch)
    }
}

/// Gated SAE (SAELens `gated`): gate L1 scaled by decoder norms plus the
/// gate's own reconstruction loss.
fn gated(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        activation: "gated",
        penalty: "l1",
        weight: 0.003,
        seed: 10,
        ..sparse(name, epochs, batch)
    }
}

/// Matryoshka batch top-k (SAELens `matryoshka_batchtopk`): levels of 16,
/// 48 and (appended) 96 latents, each inner prefix's reconstruction added to
/// the loss; with AuxK, unit-norm decoder rows, b_dec = data mean, and the
/// inference threshold compared at the end.
fn matryoshka(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        d_hidden: 96,
        activation: "matryoshka_batchtopk",
        k: Some(3),
        penalty: "auxk",
        weight: 0.0625,
        lr: 4e-3,
        seed: 11,
        knobs: &[
            (
                "model.matryoshka_widths=[16, 48]",
                &["--matryoshka-widths", "16,48"],
            ),
            ("train.dead_window=4", &["--dead-window", "4"]),
            ("train.unit_norm_decoder=true", &["--unit-norm-decoder"]),
            ("model.b_dec_init=mean", &["--b-dec-mean"]),
            (
                "model.topk_threshold_lr=0.05",
                &["--topk-threshold-lr", "0.05"],
            ),
        ],
        ..sparse(name, epochs, batch)
    }
}

/// Matching pursuit (SAELens `matching_pursuit`): tied, codes from a greedy
/// pursuit of at most 6 atoms over W_dec (residual threshold 0.05), trained
/// through the pursuit on the reconstruction alone.
fn matching_pursuit(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        activation: "matching_pursuit",
        k: Some(6),
        seed: 12,
        knobs: &[
            ("model.tied=true", &[]),
            (
                "model.residual_threshold=0.05",
                &["--residual-threshold", "0.05"],
            ),
        ],
        ..sparse(name, epochs, batch)
    }
}

/// SAELens's covariance whitening (`data.normalize: whiten`;
/// `reference/whitening.py`): trained on the whitened rows, the whitening
/// folded into the saved weights, which are compared. ReLU + L1 with b_dec
/// not subtracted from the input, so the fold also shifts b_enc.
fn whiten_l1(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        normalize: "whiten",
        apply_b_dec_to_input: false,
        knobs: &[(
            "data.whiten_eps=0.001",
            &["--whiten-eps", "0.001", "--no-b-dec-on-input"],
        )],
        ..saelens_l1(name, epochs, batch)
    }
}

/// Whitening with top-k + AuxK rescaled by the decoder norms: the norms
/// are folded first, then the whitening (SAELens TopKSAE's order).
fn whiten_topk_rescale(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        normalize: "whiten",
        knobs: &[
            ("train.dead_window=3", &["--dead-window", "3"]),
            (
                "model.rescale_acts_by_decoder_norm=true",
                &["--rescale-acts-by-decoder-norm"],
            ),
            ("data.whiten_eps=0.01", &["--whiten-eps", "0.01"]),
        ],
        ..topk_rescale(name, epochs, batch)
    }
}

/// Whitening with a gated SAE (its magnitude path shares W_enc).
fn whiten_gated(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        normalize: "whiten",
        knobs: &[("data.whiten_eps=0.001", &["--whiten-eps", "0.001"])],
        ..gated(name, epochs, batch)
    }
}

/// Whitening with JumpReLU + L0: thresholds act on pre-activations, which
/// the fold keeps.
fn whiten_jumprelu(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        normalize: "whiten",
        knobs: &[
            (
                "model.jumprelu_init_threshold=0.1",
                &["--init-threshold", "0.1"],
            ),
            ("model.jumprelu_bandwidth=0.05", &["--bandwidth", "0.05"]),
            ("data.whiten_eps=0.001", &["--whiten-eps", "0.001"]),
        ],
        ..jumprelu_l0(name, epochs, batch)
    }
}

/// The reference's copy of schedulefree's `ScheduleFreeWrapper` (which the
/// signum cases check us against) is the installed package's own, bit for
/// bit, in train mode after every step and in eval mode at the end.
#[test]
fn signum_reference_matches_schedulefree() {
    let test = "signum_reference_matches_schedulefree";
    if !common::python_module_available(test, "schedulefree", "make schedulefree") {
        return;
    }
    let script = manifest_dir().join("tests/reference/schedulefree_check.py");
    let out = run_ok(Command::new(python()).arg(&script), test);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    println!("{test}: {v}");
    for key in ["train_equal", "eval_equal", "eval_differs_from_train"] {
        assert_eq!(v[key], true, "{test}: {key} is false: {v}");
    }
}

/// `train.precision: bf16`: the same case with each step's forward pass and
/// loss under autocast to bfloat16, against the reference under
/// `torch.autocast('cpu', dtype=torch.bfloat16)` (backward outside on both
/// sides).
const BF16: (&str, &[&str]) = ("train.precision=bf16", &["--precision", "bf16"]);

/// SAELens standard (ReLU + L1) in bf16 (the dense step: the sparse one is
/// float32 only).
/// In mini-batches the weights come out bit for bit equal; the full batch
/// drifts (see [`BF16_DRIFT`]).
fn l1_bf16(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        knobs: &[BF16],
        tol: if batch.is_none() { BF16_DRIFT } else { FP32 },
        ..saelens_l1(name, epochs, batch)
    }
}

/// Top-k + AuxK in bf16.
fn topk_auxk_bf16(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        knobs: &[("train.dead_window=3", &["--dead-window", "3"]), BF16],
        ..topk_auxk(name, epochs, batch)
    }
}

/// JumpReLU + L0 in bf16 (straight-through thresholds).
fn jumprelu_bf16(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        knobs: &[
            (
                "model.jumprelu_init_threshold=0.1",
                &["--init-threshold", "0.1"],
            ),
            ("model.jumprelu_bandwidth=0.05", &["--bandwidth", "0.05"]),
            BF16,
        ],
        ..jumprelu_l0(name, epochs, batch)
    }
}

/// Gated in bf16 (its gate's L1 and reconstruction terms).
fn gated_bf16(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        knobs: &[BF16],
        ..gated(name, epochs, batch)
    }
}

/// Matryoshka batch top-k in bf16 (the inner levels' matmuls too).
fn matryoshka_bf16(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        knobs: &[
            (
                "model.matryoshka_widths=[16, 48]",
                &["--matryoshka-widths", "16,48"],
            ),
            ("train.dead_window=4", &["--dead-window", "4"]),
            ("train.unit_norm_decoder=true", &["--unit-norm-decoder"]),
            ("model.b_dec_init=mean", &["--b-dec-mean"]),
            (
                "model.topk_threshold_lr=0.05",
                &["--topk-threshold-lr", "0.05"],
            ),
            BF16,
        ],
        ..matryoshka(name, epochs, batch)
    }
}

/// dictionary_learning's p-annealing (PAnnealTrainer): ReLU codes, the Lp
/// penalty with p from 1 to 0.75 in 6 values at the ends of steps
/// 11, 27, 43, 59, 75, 91 (its 0-based 10..90), the weight rescaled at the
/// last five from a queue of 4 steps' norms, warmed up over 5 steps, unit-norm
/// decoder rows (ConstrainedAdam). Below p = 0.75 the two sides part in the
/// weights (p z^(p-1) grows without bound near 0, so last-bit differences
/// in a small code grow: 5e-4 by step 100 at p = 0.5, lr 1e-3, full batch).
fn p_anneal(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        reference: Reference::PAnneal,
        penalty: "lp_anneal",
        weight: 0.005,
        lr: 1e-3,
        seed: 13,
        knobs: &[
            ("sparsity.p_end=0.75", &["--p-end", "0.75"]),
            ("sparsity.anneal_start=11", &["--anneal-start", "10"]),
            ("sparsity.anneal_end=91", &["--anneal-end", "90"]),
            ("sparsity.p_updates=6", &["--n-sparsity-updates", "6"]),
            (
                "sparsity.anneal_queue_length=4",
                &["--sparsity-queue-length", "4"],
            ),
            ("sparsity.warmup_steps=5", &["--sparsity-warmup-steps", "5"]),
            ("train.unit_norm_decoder=true", &["--unit-norm-decoder"]),
        ],
        ..sparse(name, epochs, batch)
    }
}

/// p-annealing with `Lp^p` and dictionary_learning's default end (`auto`:
/// past the run, so p's last value 0.6 is never set): 8 values over
/// 110 steps from step 21 (down to 0.657), the weight rescaled 6 times
/// from 10 steps' norms.
fn p_anneal_lp_pow_p(name: &'static str, epochs: i64, batch: Option<usize>) -> Parity {
    Parity {
        reference: Reference::PAnneal,
        penalty: "lp_anneal",
        weight: 0.005,
        lr: 1e-3,
        seed: 14,
        knobs: &[
            ("sparsity.lp_form=lp^p", &["--sparsity-function", "Lp^p"]),
            ("sparsity.p_end=0.6", &["--p-end", "0.6"]),
            ("sparsity.anneal_start=21", &["--anneal-start", "20"]),
            ("sparsity.p_updates=8", &["--n-sparsity-updates", "8"]),
        ],
        ..sparse(name, epochs, batch)
    }
}

/// `test_name: case(name, epochs, batch);` -> a `#[test]` checking that case.
macro_rules! parity_tests {
    ($($test:ident: $case:ident($name:literal, $epochs:literal, $batch:expr);)*) => {
        $(
            #[test]
            fn $test() {
                check(&$case($name, $epochs, $batch));
            }
        )*
    };
}

// Mini-batch sizes leave a smaller last batch: 800 = 8*96 + 32,
// 600 = 4*128 + 88, 500 = 7*64 + 52, 500 = 10*48 + 20.
parity_tests! {
    seed002_full_batch: seed002("seed002_full", 200, None);
    seed002_minibatch: seed002("seed002_minibatch", 8, Some(96));
    seed004_full_batch: seed004("seed004_full", 100, None);
    seed004_minibatch: seed004("seed004_minibatch", 10, Some(128));
    saelens_l1_full_batch: saelens_l1("l1_full", 200, None);
    saelens_l1_minibatch: saelens_l1("l1_minibatch", 10, Some(64));
    topk_full_batch: saelens_topk("topk_full", 200, None);
    topk_minibatch: saelens_topk("topk_minibatch", 10, Some(48));
    gated_full_batch: gated("gated_full", 200, None);
    gated_minibatch: gated("gated_minibatch", 10, Some(48));
    topk_auxk_full_batch: topk_auxk("topk_auxk_full", 100, None);
    topk_auxk_minibatch: topk_auxk("topk_auxk_minibatch", 10, Some(48));
    topk_rescale_full_batch: topk_rescale("topk_rescale_full", 100, None);
    topk_rescale_minibatch: topk_rescale("topk_rescale_minibatch", 10, Some(48));
    abstopk_full_batch: abstopk("abstopk_full", 100, None);
    abstopk_minibatch: abstopk("abstopk_minibatch", 10, Some(48));
    topk_fused_adam_minibatch: topk_fused_adam("topk_fused_adam", 10, Some(48));
    topk_multi_decay_full_batch: topk_multi_decay("topk_multi_decay_full", 60, None);
    topk_multi_decay_minibatch: topk_multi_decay("topk_multi_decay_minibatch", 10, Some(48));
    topk_skip_transcoder_full_batch: topk_skip_transcoder("topk_skip_transcoder_full", 100, None);
    topk_skip_transcoder_minibatch: topk_skip_transcoder("topk_skip_transcoder_minibatch", 10, Some(48));
    topk_skip_multi_minibatch: topk_skip_multi("topk_skip_multi_minibatch", 10, Some(48));
    topk_signum_full_batch: topk_signum("topk_signum_full", 100, None);
    topk_signum_minibatch: topk_signum("topk_signum_minibatch", 10, Some(48));
    topk_signum_recipe_minibatch: topk_signum_recipe("topk_signum_recipe", 10, Some(48));
    topk_muon_full_batch: topk_muon("topk_muon_full", 100, None);
    topk_muon_minibatch: topk_muon("topk_muon_minibatch", 10, Some(48));
    topk_muon_recipe_minibatch: topk_muon_recipe("topk_muon_recipe", 10, Some(48));
    jumprelu_tanh_full_batch: jumprelu_tanh("jumprelu_tanh_full", 100, None);
    jumprelu_tanh_minibatch: jumprelu_tanh("jumprelu_tanh_minibatch", 10, Some(48));
    jumprelu_quadratic_full_batch: jumprelu_quadratic("jumprelu_quadratic_full", 100, None);
    jumprelu_quadratic_minibatch: jumprelu_quadratic("jumprelu_quadratic_minibatch", 10, Some(48));
    jumprelu_l0_ste_input_minibatch: jumprelu_l0_ste_input("jumprelu_l0_ste_input", 10, Some(48));
    jumprelu_full_batch: jumprelu_l0("jumprelu_full", 200, None);
    jumprelu_minibatch: jumprelu_l0("jumprelu_minibatch", 10, Some(48));
    batchtopk_recipe_minibatch: batchtopk_recipe("batchtopk_recipe", 10, Some(48));
    jumprelu_recipe_minibatch: jumprelu_recipe("jumprelu_recipe", 10, Some(48));
    matryoshka_full_batch: matryoshka("matryoshka_full", 100, None);
    matryoshka_minibatch: matryoshka("matryoshka_minibatch", 10, Some(48));
    matching_pursuit_full_batch: matching_pursuit("matching_pursuit_full", 100, None);
    matching_pursuit_minibatch: matching_pursuit("matching_pursuit_minibatch", 10, Some(48));
    whiten_l1_full_batch: whiten_l1("whiten_l1_full", 100, None);
    whiten_l1_minibatch: whiten_l1("whiten_l1_minibatch", 10, Some(64));
    whiten_topk_rescale_minibatch: whiten_topk_rescale("whiten_topk_rescale", 10, Some(48));
    whiten_gated_minibatch: whiten_gated("whiten_gated", 10, Some(48));
    whiten_jumprelu_minibatch: whiten_jumprelu("whiten_jumprelu", 10, Some(48));
    bf16_l1_full_batch: l1_bf16("bf16_l1_full", 200, None);
    bf16_l1_minibatch: l1_bf16("bf16_l1_minibatch", 10, Some(64));
    bf16_topk_auxk_full_batch: topk_auxk_bf16("bf16_topk_auxk_full", 100, None);
    bf16_topk_auxk_minibatch: topk_auxk_bf16("bf16_topk_auxk_minibatch", 10, Some(48));
    bf16_jumprelu_minibatch: jumprelu_bf16("bf16_jumprelu_minibatch", 10, Some(48));
    bf16_gated_minibatch: gated_bf16("bf16_gated_minibatch", 10, Some(48));
    bf16_matryoshka_minibatch: matryoshka_bf16("bf16_matryoshka_minibatch", 10, Some(48));
    p_anneal_full_batch: p_anneal("p_anneal_full", 100, None);
    p_anneal_minibatch: p_anneal("p_anneal_minibatch", 10, Some(48));
    p_anneal_lp_pow_p_minibatch: p_anneal_lp_pow_p("p_anneal_lp_pow_p", 10, Some(48));
}
