//! The training step in-process, no binary: two parity cases replayed step
//! by step through the library (`Plan` -> `Batches` -> `Learner::step`),
//! each step's loss terms against the plain-PyTorch reference in
//! `tests/reference/recipes.py` (relative 1e-5) and against `sae train`'s
//! own metrics.jsonl (bit for bit: the loop adds nothing to the maths), the
//! final weights against the reference (absolute 1e-5).

mod common;

use common::{python, run_ok, sae_ok};
use sae::config::Config;
use sae::data::dataset::Shard;
use sae::train::batches::Batches;
use sae::train::plan::Plan;
use sae::train::state::{self, DeadTracker};
use sae::train::step::{Learner, StepParams};
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use tch::Tensor;

/// A recipes.py case: `sae` config keys (YAML flow-mapping entries) beyond
/// the common ones, and the reference's arguments.
struct Case {
    seed: u64,
    d_hidden: i64,
    model: &'static str,
    sparsity: &'static str,
    train: &'static str,
    reference: &'static [&'static str],
}

const TOPK_AUXK: Case = Case {
    seed: 6,
    d_hidden: 128,
    model: "activation: topk, k: 4",
    sparsity: "penalty: auxk, weight: 0.03125",
    train: "dead_window: 3",
    reference: &[
        "--architecture",
        "topk",
        "--k",
        "4",
        "--penalty",
        "auxk",
        "--coefficient",
        "0.03125",
        "--dead-window",
        "3",
    ],
};

const JUMPRELU_RECIPE: Case = Case {
    seed: 9,
    d_hidden: 64,
    model: "activation: jumprelu, jumprelu_init_threshold: 0.1, jumprelu_bandwidth: 0.05",
    sparsity: "penalty: l0, weight: 0.002, warmup_steps: 30",
    train: "lr_schedule: linear, lr_warmup_steps: 5, lr_end: 0.0005, unit_norm_decoder: true, grad_clip: 0.02",
    reference: &[
        "--architecture",
        "jumprelu",
        "--penalty",
        "l0",
        "--coefficient",
        "0.002",
        "--init-threshold",
        "0.1",
        "--bandwidth",
        "0.05",
        "--lr-schedule",
        "linear",
        "--lr-warmup-steps",
        "5",
        "--lr-end",
        "0.0005",
        "--sparsity-warmup-steps",
        "30",
        "--unit-norm-decoder",
        "--grad-clip",
        "0.02",
    ],
};

const EPOCHS: i64 = 10;
const BATCH: i64 = 48;
const LR: f64 = 3e-3;

/// (loss, mse, sparsity_loss) of each line of a metrics.jsonl.
/// What the in-process tests keep of a [`Plan`] once its source and model
/// went into the batches and the learner.
struct Planned {
    cfg: Config,
    device: tch::Device,
    total_steps: i64,
}

/// The training loop's parts for `cfg`, without a run directory: the
/// batches from the start and a fresh learner.
fn in_process(cfg: &Config) -> (Planned, Batches, Learner) {
    let plan = Plan::build(cfg, 1, &Default::default()).expect("plan");
    let batches = Batches::new(
        plan.source,
        &plan.cfg,
        plan.fixed_order,
        plan.per_epoch,
        plan.device,
        &state::start(),
        Shard::ALL,
    )
    .unwrap();
    let learner = Learner::new(plan.model, &plan.cfg, plan.total_steps).unwrap();
    let planned = Planned {
        cfg: plan.cfg,
        device: plan.device,
        total_steps: plan.total_steps,
    };
    (planned, batches, learner)
}

fn losses(path: &Path) -> Vec<[f64; 3]> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            ["loss", "mse", "sparsity_loss"].map(|k| v[k].as_f64().unwrap())
        })
        .collect()
}

fn config_yaml(case: &Case, input: &Path) -> String {
    format!(
        "seed: 0\ndevice: cpu\n\
         data: {{train: {x:?}}}\n\
         model: {{init: {init:?}, d_hidden: {h}, init_scheme: sae, {model}}}\n\
         sparsity: {{{sparsity}}}\n\
         train: {{epochs: {EPOCHS}, batch_size: {BATCH}, shuffle: false, order: {order:?}, threads: 1, \
         log_every: 1, optimizer: {{name: adam, lr: {LR}}}, {train}}}\n",
        x = input.join("x.npy"),
        init = input.join("init.safetensors"),
        order = input.join("order.npy"),
        h = case.d_hidden,
        model = case.model,
        sparsity = case.sparsity,
        train = case.train,
    )
}

fn replay(case: &Case) {
    let dir = tempfile::tempdir().unwrap();
    let (input, reference) = (dir.path().join("input"), dir.path().join("reference"));
    let refdir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference");
    let py = python();
    run_ok(
        Command::new(&py)
            .arg(refdir.join("make_inputs.py"))
            .arg("--out")
            .arg(&input)
            .args(["--data-kind", "sparse", "--init-kind", "sae", "--n", "500"])
            .args(["--hidden", &case.d_hidden.to_string()])
            .args(["--seed", &case.seed.to_string()])
            .args(["--order-epochs", &EPOCHS.to_string()]),
        "make_inputs.py",
    );
    run_ok(
        Command::new(&py)
            .arg(refdir.join("recipes.py"))
            .arg("--data")
            .arg(input.join("x.npy"))
            .arg("--init")
            .arg(input.join("init.safetensors"))
            .arg("--out")
            .arg(&reference)
            .args(["--epochs", &EPOCHS.to_string(), "--lr", &LR.to_string()])
            .args(["--threads", "1", "--batch-size", &BATCH.to_string()])
            .arg("--order")
            .arg(input.join("order.npy"))
            .args(case.reference),
        "recipes.py",
    );
    let theirs = losses(&reference.join("losses.jsonl"));

    // The binary, for the bit-for-bit comparison.
    let yaml = config_yaml(case, &input);
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, &yaml).unwrap();
    let run_dir = dir.path().join("run");
    sae_ok(&[
        "train",
        "-q",
        "--config",
        config.to_str().unwrap(),
        "--out",
        run_dir.to_str().unwrap(),
    ]);
    let binary = losses(&run_dir.join("metrics.jsonl"));

    // In-process: the loop's parts without the run directory.
    let cfg = Config::from_yaml_str(&yaml, "test", &[]).expect("config");
    let (plan, mut batches, mut learner) = in_process(&cfg);
    let mut dead = DeadTracker::new(
        case.d_hidden,
        plan.cfg.train.dead_window,
        learner.model.spec.activation,
        plan.device,
    );
    let mut ours = Vec::new();
    while let Some(batch) = batches.next_batch().unwrap() {
        let p = StepParams::at(&plan.cfg, ours.len() as i64 + 1, plan.total_steps);
        let out = learner.step(&batch, &p, &mut dead);
        ours.push([&out.loss, &out.mse, &out.sparsity].map(|t| t.double_value(&[])));
    }
    assert_eq!(ours.len() as i64, plan.total_steps);
    assert_eq!(ours.len(), theirs.len(), "steps: ours vs the reference");
    // The losses are float32; metrics.jsonl's decimal text parses back to
    // the same float32 (serde_json's f64 parse may miss the last f64 ulp).
    let as_f32 =
        |v: &[[f64; 3]]| -> Vec<[f32; 3]> { v.iter().map(|r| r.map(|x| x as f32)).collect() };
    assert_eq!(
        as_f32(&ours),
        as_f32(&binary),
        "in-process steps differ from `sae train`"
    );
    for (step, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        for (x, y) in a.iter().zip(b) {
            let rel = (x - y).abs() / y.abs().max(f64::MIN_POSITIVE);
            assert!(
                x == y || rel <= 1e-5,
                "step {}: {a:?} vs the reference {b:?}",
                step + 1
            );
        }
    }
    let model = learner.into_model();
    let weights: HashMap<String, Tensor> =
        Tensor::read_safetensors(reference.join("weights.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let dec = model.decoder_weight();
    let mut ours_w = vec![
        ("W_enc", &model.w_enc),
        ("b_enc", &model.b_enc),
        ("W_dec", &dec),
        ("b_dec", &model.b_dec),
    ];
    if let Some(t) = &model.threshold {
        ours_w.push(("threshold", t));
    }
    for (name, t) in ours_w {
        let d = (t - &weights[name]).abs().max().double_value(&[]);
        assert!(d <= 1e-5, "{name}: max |dweight| {d:e}");
    }
}

#[test]
fn topk_auxk_steps_in_process() {
    replay(&TOPK_AUXK);
}

#[test]
fn jumprelu_recipe_steps_in_process() {
    replay(&JUMPRELU_RECIPE);
}

/// signum's eval weights (schedule-free's averaged `x`, which validation and
/// the saved model use) differ from the trained parameters (`y`), and
/// looking at them leaves training exactly as it was: a learner that looked
/// at them after every step ends bit-identical to one that never did, and
/// its saved model is the last eval weights.
#[test]
fn signum_eval_weights_leave_training_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = common::synth(dir.path(), 400, 12, 20, 3);
    let yaml = format!(
        "seed: 1\ndevice: cpu\ndata: {{train: {x:?}}}\n\
         model: {{d_hidden: 24, activation: topk, k: 3}}\nsparsity: {{penalty: none}}\n\
         train: {{epochs: 2, batch_size: 50, threads: 1, lr_warmup_steps: 4, \
         optimizer: {{name: signum, lr: 0.003}}}}\n"
    );
    let cfg = Config::from_yaml_str(&yaml, "test", &[]).expect("config");
    let run = |look: bool| {
        let (plan, mut batches, mut learner) = in_process(&cfg);
        let mut dead = DeadTracker::new(24, 1000, learner.model.spec.activation, plan.device);
        let (mut step, mut last_eval) = (0, Vec::new());
        while let Some(batch) = batches.next_batch().unwrap() {
            step += 1;
            let p = StepParams::at(&plan.cfg, step, plan.total_steps);
            learner.step(&batch, &p, &mut dead);
            if look {
                let before: Vec<(Tensor, usize)> = learner
                    .model
                    .parameters()
                    .iter()
                    .map(|t| (t.copy(), t.data_ptr() as usize))
                    .collect();
                last_eval = learner.with_eval_weights(|m| {
                    m.parameters().iter().map(|t| t.copy()).collect::<Vec<_>>()
                });
                for ((b, ptr), now) in before.iter().zip(learner.model.parameters()) {
                    assert!(b.equal(now), "step {step}: a parameter changed");
                    assert_eq!(*ptr, now.data_ptr() as usize, "step {step}: storage moved");
                }
                // After the first step x = y = z (its averaging weight is 1).
                assert!(
                    step == 1 || !last_eval[0].equal(&before[0].0),
                    "step {step}: eval weights are the parameters"
                );
            }
        }
        (learner.into_model(), last_eval)
    };
    let (looked, eval) = run(true);
    let (plain, _) = run(false);
    for (a, b) in looked.parameters().iter().zip(plain.parameters()) {
        assert!(a.equal(b), "looking at the eval weights changed training");
    }
    for (a, b) in looked.parameters().iter().zip(&eval) {
        assert!(a.equal(b), "the saved model is not the eval weights");
    }
}
