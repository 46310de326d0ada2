//! The training loop reads nothing back from the device except on logged
//! steps (issue 24): on CUDA every read waits for the kernels queued before
//! it. Each architecture family trains in-process, step by step, and the
//! host reads (`sae::device::host_reads`, which every read of the loop goes
//! through) are counted per step: one on a logged step (its loss terms, L0
//! and dead count together), plus the validation MSE's at an epoch's end,
//! none on any other step. CPU stands in for the device: the count is the
//! same there. One test function: the counter is per process.

use sae::config::Config;
use sae::train::{Session, Sources, TrainOptions};
use std::path::Path;
use tch::{Device, Kind, Tensor};

const ROWS: i64 = 500;
const BATCH: i64 = 50;
const EPOCHS: i64 = 2;
const LOG_EVERY: i64 = 7;

/// (name, model, sparsity, train) config entries of a family.
const FAMILIES: [(&str, &str, &str, &str); 5] = [
    (
        "relu+l1 (clipped)",
        "activation: relu",
        "penalty: l1, weight: 0.001",
        "grad_clip: 1.0",
    ),
    (
        "topk+auxk",
        "activation: topk, k: 4",
        "penalty: auxk, weight: 0.03125",
        // Past the window, latents die: auxk then runs with dead latents.
        "dead_window: 3",
    ),
    (
        "batchtopk",
        "activation: batchtopk, k: 4",
        "penalty: none",
        "dead_window: 3",
    ),
    (
        "jumprelu+l0 (pre-act loss)",
        "activation: jumprelu, jumprelu_init_threshold: 0.1, jumprelu_bandwidth: 0.05",
        "penalty: l0, weight: 0.002, pre_act_weight: 0.1",
        "dead_window: 3",
    ),
    (
        "relu+l1 streamed, sparse step",
        "activation: relu",
        "penalty: l1, weight: 0.001",
        "sparse_step: always",
    ),
];

fn yaml(dir: &Path, (_, model, sparsity, train): (&str, &str, &str, &str), stream: bool) -> String {
    let data = match stream {
        true => format!(
            "{{train: {:?}, valid: {:?}, stream: true}}",
            dir.join("x.npy"),
            dir.join("v.npy")
        ),
        false => format!("{{train: {:?}}}", dir.join("x.npy")),
    };
    format!(
        "seed: 3\ndevice: cpu\ndata: {data}\n\
         model: {{d_hidden: 64, init_scheme: sae, {model}}}\n\
         sparsity: {{{sparsity}}}\n\
         train: {{epochs: {EPOCHS}, batch_size: {BATCH}, threads: 1, log_every: {LOG_EVERY}, \
         optimizer: {{name: adam, lr: 0.003}}, {train}}}\n"
    )
}

#[test]
fn the_loop_reads_from_the_device_on_logged_steps_only() {
    let dir = tempfile::tempdir().unwrap();
    tch::manual_seed(0);
    let x = Tensor::randn([ROWS, 16], (Kind::Float, Device::Cpu)).relu();
    x.write_npy(dir.path().join("x.npy")).unwrap();
    x.narrow(0, 0, 100)
        .write_npy(dir.path().join("v.npy"))
        .unwrap();
    let per_epoch = ROWS / BATCH;
    for (i, family) in FAMILIES.into_iter().enumerate() {
        let stream = family.0.contains("streamed");
        let text = yaml(dir.path(), family, stream);
        let cfg = Config::from_yaml_str(&text, "test", &[]).expect("config");
        let opts = TrainOptions {
            out: dir.path().join(format!("run{i}")),
            force: true,
            progress: false,
            resume: false,
        };
        let mut session = Session::open(&cfg, &opts, &Sources::default()).expect("open");
        let (mut step, mut logged) = (0, Vec::new());
        loop {
            let before = sae::device::host_reads();
            if !session.step(None).expect("step") {
                break;
            }
            step += 1;
            let reads = sae::device::host_reads() - before;
            let end_of_epoch = step % per_epoch == 0;
            let log = step % LOG_EVERY == 0 || end_of_epoch;
            // The validation MSE: one read per 4096 rows, at an epoch's end.
            let expected = match (log, stream && end_of_epoch) {
                (false, _) => 0,
                (true, false) => 1,
                (true, true) => 2,
            };
            assert_eq!(
                reads, expected,
                "{}: step {step} made {reads} host reads, expected {expected}",
                family.0
            );
            if log {
                logged.push(step);
            }
        }
        assert_eq!(step, EPOCHS * per_epoch, "{}", family.0);
        assert_eq!(logged, [7, 10, 14, 20], "{}", family.0);
        let summary = session.finish().expect("finish").expect("the writer");
        let lines = std::fs::read_to_string(opts.out.join("metrics.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), logged.len(), "{}", family.0);
        // The families that can lose latents did: the dead-latent paths ran.
        if family.3.contains("dead_window") {
            let last: serde_json::Value =
                serde_json::from_str(lines.lines().last().unwrap()).unwrap();
            assert!(
                last["dead"].as_i64().unwrap() > 0,
                "{}: no dead latent at the end: the dead-latent paths did not run",
                family.0
            );
        }
        assert!(summary.final_loss.is_finite(), "{}", family.0);
        println!("{}: {step} steps, host reads on steps {logged:?}", family.0);
    }
}
