//! `data.stream: true` (memory-mapped training data) trains exactly as the
//! in-memory path when no statistics are fitted, and refuses what it cannot do.

mod common;
use common::*;

#[test]
fn streamed_training_equals_in_memory_training() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, _) = synth(d, 3000, 16, 24, 3);
    let cfg = write_config(
        d,
        "c.yaml",
        &format!(
            "device: cpu\ndata:\n  train: {x}\nmodel:\n  d_hidden: 32\n  activation: topk\n  k: 4\n\
             sparsity:\n  penalty: none\ntrain:\n  epochs: 3\n  batch_size: 128\n  threads: 1\n  shuffle: false\n"
        ),
    );
    let streamed = |name: &str| Case::new(d, name).config(&cfg).set("data.stream=true");
    // Same batches (no shuffling): the same model, byte for byte.
    let memory = Case::new(d, "memory").config(&cfg).train().model_bytes();
    let stream = streamed("stream").train().model_bytes();
    assert!(memory == stream, "streamed and in-memory training differ");
    // Shuffled, streaming mixes rows within windows of blocks: a different
    // order, still deterministic.
    let shuffled = |name: &str| {
        streamed(name)
            .set("train.shuffle=true")
            .train()
            .model_bytes()
    };
    let (a, b) = (shuffled("stream-shuf-a"), shuffled("stream-shuf-b"));
    assert!(a == b, "shuffled streaming is not reproducible");
    // With normalisation both fit the same statistics up to float rounding.
    let s = streamed("stream-std")
        .set("data.normalize=standardize")
        .train()
        .model_bytes();
    assert!(!s.is_empty());
    // Whitening fits its float64 covariance in the same 8192-row chunks
    // streamed or not: the same statistics, and the same model.
    let whiten = |case: Case| case.set("data.normalize=whiten").train().model_bytes();
    let memory_white = whiten(Case::new(d, "memory-white").config(&cfg));
    let stream_white = whiten(streamed("stream-white"));
    assert!(memory_white != memory, "whitening changed nothing");
    assert!(
        memory_white == stream_white,
        "streamed and in-memory whitened training differ"
    );
    // What streaming cannot do is refused up front, naming the key.
    for (set, key) in [
        ("data.valid_fraction=0.1", "data.valid_fraction"),
        ("model.b_dec_init=mean", "model.b_dec_init"),
        ("train.batch_size=full", "train.batch_size: full"),
    ] {
        streamed("refused").set(set).fails(&[key]);
    }
    // float64 data cannot be mapped as float32: a clear error with the way out.
    let f64p = d.join("x64.npy");
    py(
        "import sys, numpy as np\nnp.save(sys.argv[2], np.load(sys.argv[1]).astype(np.float64))",
        &[&x, f64p.to_str().unwrap()],
    );
    streamed("r64")
        .set(format!("data.train={}", f64p.display()))
        .user_error(&["data.stream: false"]);
}

/// Across several windows and epochs (the reader hands over to the next
/// epoch's during the last window; O_DIRECT reads where the filesystem allows),
/// streamed training still gives the in-memory model byte for byte.
#[test]
fn streamed_training_across_windows_and_epochs_equals_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let x = d.join("x.npy");
    // 150,000 rows: three windows of 16 x 4096 rows, the last one partial.
    py(
        "import sys, numpy as np\n\
         np.save(sys.argv[1], np.random.default_rng(0).standard_normal((150000, 4)).astype(np.float32))",
        &[x.to_str().unwrap()],
    );
    let yaml = format!(
        "device: cpu\ndata:\n  train: {}\nmodel:\n  d_hidden: 8\nsparsity:\n  penalty: l1\n  weight: 0.001\n\
         train:\n  epochs: 2\n  batch_size: 5000\n  threads: 1\n  shuffle: false\n",
        x.display()
    );
    let run = |name: &str, stream: &str| {
        Case::new(d, name)
            .yaml(yaml.as_str())
            .set(format!("data.stream={stream}"))
            .train()
            .model_bytes()
    };
    assert!(
        run("memory", "false") == run("stream", "true"),
        "streamed and in-memory training differ across windows"
    );
}
