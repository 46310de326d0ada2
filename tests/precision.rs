//! `train.precision: bf16` from the outside (its numbers against
//! `torch.autocast` are in tests/parity.rs, the `bf16_*` cases), and
//! half-precision `.npy` files: float16 and ml_dtypes' bfloat16 read as
//! float32, and `--dtype float16|bfloat16` outputs that numpy (with
//! ml_dtypes) reads back as exactly its own rounding of our float32 values.
//! ml_dtypes comes from `make ml-dtypes` (`make test` installs it).

mod common;

use common::{apply, expect_user_error, py, python_module_available, sae_ok, summary, synth, Case};

fn ml_dtypes(test: &str) -> bool {
    python_module_available(test, "ml_dtypes", "make ml-dtypes")
}

/// A small ReLU + L1 config on `x` (in-memory, one thread, CPU).
fn relu_yaml(x: &str) -> String {
    format!(
        "device: cpu\ndata: {{train: {x}}}\nmodel: {{d_hidden: 24}}\n\
         train: {{epochs: 3, batch_size: 64, threads: 1, checkpoint_every: 5}}\n"
    )
}

#[test]
fn half_precision_npy_reads_as_numpy_widens_it() {
    if !ml_dtypes("half_precision_npy_reads_as_numpy_widens_it") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    // Values that bfloat16 and float16 must round (not exactly representable),
    // a big-endian float16, and a bfloat16 array re-saved after a plain
    // np.load (descr `|V2`).
    let out = py(
        r#"
import sys, numpy as np, ml_dtypes
d = sys.argv[1]
x = np.random.default_rng(0).normal(size=(41, 7)).astype(np.float32) * 3
b = x.astype(ml_dtypes.bfloat16)
np.save(f"{d}/bf16.npy", b)
np.save(f"{d}/bf16_plain.npy", np.load(f"{d}/bf16.npy"))
np.save(f"{d}/f16.npy", x.astype(np.float16))
np.save(f"{d}/f16_be.npy", x.astype(">f2"))
np.save(f"{d}/want_bf16.npy", b.astype(np.float32))
np.save(f"{d}/want_f16.npy", x.astype(np.float16).astype(np.float32))
print(open(f"{d}/bf16.npy", "rb").read(60)[10:].split(b",")[0].decode(),
      np.load(f"{d}/bf16_plain.npy").dtype.str)
"#,
        &[&d],
    );
    println!("numpy descr of ml_dtypes bfloat16: {}", out.trim());
    assert_eq!(out.trim(), "{'descr': '<V2' |V2");
    let read = |name: &str| sae::data::npy::read_matrix(&format!("{d}/{name}")).unwrap();
    let (want_bf16, want_f16) = (read("want_bf16.npy"), read("want_f16.npy"));
    for (name, want) in [
        ("bf16.npy", &want_bf16),
        ("bf16_plain.npy", &want_bf16),
        ("f16.npy", &want_f16),
        ("f16_be.npy", &want_f16),
    ] {
        let m = read(name);
        assert_eq!((m.rows, m.cols), (41, 7), "{name}");
        assert_eq!(m.data, want.data, "{name}: not numpy's widening to float32");
    }
    // Rounded: bfloat16 is not float16 and neither is the float32 original.
    assert_ne!(want_bf16.data, want_f16.data);
    // Trains from it like from any float file.
    let run = Case::new(dir.path(), "from_bf16")
        .yaml(relu_yaml(&format!("{d}/bf16.npy")))
        .train();
    assert_eq!(run.summary()["steps"], 3);
}

#[test]
fn encode_writes_float16_and_bfloat16_that_numpy_reads() {
    if !ml_dtypes("encode_writes_float16_and_bfloat16_that_numpy_reads") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, _) = synth(d, 300, 10, 16, 3);
    let run = Case::new(d, "run").yaml(relu_yaml(&x)).train();
    let p = |name: &str| d.join(name).display().to_string();
    apply("encode", &run.dir, &x, p("z32.npy"), &[]);
    for dtype in ["float16", "bfloat16"] {
        apply(
            "encode",
            &run.dir,
            &x,
            p(&format!("z_{dtype}.npy")),
            &["--dtype", dtype],
        );
    }
    apply(
        "reconstruct",
        &run.dir,
        &x,
        p("xh_bf16.npy"),
        &["--dtype", "bfloat16"],
    );
    apply("reconstruct", &run.dir, &x, p("xh32.npy"), &[]);
    // numpy's own rounding of our float32 outputs, bit for bit (compared as
    // uint16 so NaN-free zeros and signs count too).
    let out = py(
        r#"
import sys, numpy as np, ml_dtypes
d = sys.argv[1]
z = np.load(f"{d}/z32.npy")
h = np.load(f"{d}/z_float16.npy")
b = np.load(f"{d}/z_bfloat16.npy")
xh = np.load(f"{d}/xh32.npy")
xb = np.load(f"{d}/xh_bf16.npy")
assert h.dtype == np.float16 and h.shape == z.shape, (h.dtype, h.shape)
assert b.dtype.str == "|V2" and b.shape == z.shape, (b.dtype, b.shape)
b = b.view(ml_dtypes.bfloat16)
assert (h.view(np.uint16) == z.astype(np.float16).view(np.uint16)).all(), "float16"
assert (b.view(np.uint16) == z.astype(ml_dtypes.bfloat16).view(np.uint16)).all(), "bfloat16"
assert (xb.view(np.uint16) == xh.astype(ml_dtypes.bfloat16).view(np.uint16)).all(), "recon"
# Rounded, not copied: bfloat16 keeps 8 significant bits.
print(float(np.abs(b.astype(np.float32) - z).max()), float(np.abs(z).max()))
"#,
        &[&d.display().to_string()],
    );
    let v: Vec<f64> = out.split_whitespace().map(|s| s.parse().unwrap()).collect();
    println!(
        "bfloat16 codes: max |rounding| {:.3e} of max |z| {:.3e}",
        v[0], v[1]
    );
    assert!(v[0] > 0.0 && v[0] <= v[1] / 256.0, "{out}");
    // Our own reader takes the codes back (decode from bfloat16 codes).
    apply("decode", &run.dir, p("z_bfloat16.npy"), p("xd.npy"), &[]);
    // --sparse stores float32 values only.
    expect_user_error(
        &[
            "encode",
            "--model",
            run.path(),
            "--data",
            &x,
            "--out",
            &p("z.npz"),
            "--sparse",
            "--dtype",
            "bfloat16",
        ],
        &["--dtype bfloat16", "--sparse"],
    );
}

#[test]
fn bf16_training_is_reported_and_takes_the_dense_step() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, _) = synth(d, 400, 12, 20, 3);
    let fp32 = Case::new(d, "fp32").yaml(relu_yaml(&x)).train();
    let bf16 = Case::new(d, "bf16")
        .yaml(relu_yaml(&x))
        .set("train.precision=bf16")
        .train();
    let (s32, s16) = (fp32.summary(), bf16.summary());
    assert_eq!(s32["precision"], "fp32");
    assert_eq!(s16["precision"], "bf16");
    // ReLU + L1 has the sparse pass in fp32 (counted), never under bf16.
    assert!(s32["sparse_steps"].is_i64(), "{s32}");
    assert!(s16.get("sparse_steps").is_none(), "{s16}");
    let cfg = std::fs::read_to_string(bf16.join("config.yaml")).unwrap();
    assert!(cfg.contains("precision: bf16"), "{cfg}");
    // The matmuls round: the losses differ from fp32's, but not by much.
    let (a, b) = (fp32.metric("loss"), bf16.metric("loss"));
    assert_eq!(a.len(), b.len());
    let rel = a
        .iter()
        .zip(&b)
        .map(|(x, y)| ((x - y) / x).abs())
        .fold(0.0, f64::max);
    println!("bf16 vs fp32 loss: max rel {rel:.3e}");
    assert!(rel > 1e-6 && rel < 0.05, "{rel}");
    assert_eq!(summary(&bf16.dir)["steps"], s32["steps"]);

    let info = sae_ok(&["info"]);
    assert!(info.contains("precisions: fp32, bf16"), "{info}");

    // Bad values name the key.
    let base = Case::new(d, "bad").yaml(relu_yaml(&x));
    base.clone()
        .set("train.precision=fp16")
        .user_error(&["train.precision", "fp16"]);
    base.set("train.precision=bf16")
        .set("train.sparse_step=always")
        .user_error(&["train.sparse_step", "train.precision: bf16"]);
}
