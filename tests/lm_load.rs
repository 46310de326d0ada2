//! Loading the tiny language model (tests/fixtures/tiny_lm.py) from Rust:
//! the AOTInductor package (`lm.pt2`) through `sae::lm::pt2::Pt2Model` and
//! the traced TorchScript module (`lm.pt`) through tch's `CModule`, against
//! eager PyTorch's activations; and the user errors of bad packages.

mod common;

use sae::error::{exit_code, one_line};
use sae::lm::pt2::Pt2Model;
use std::path::Path;
use std::time::Instant;
use tch::{CModule, Device, IValue, Kind, Tensor};

fn npy(path: &Path) -> Tensor {
    Tensor::read_npy(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

/// tokens[:n] (int64) and, for n <= 64, acts_ref[:n].
fn tokens(n: i64) -> Tensor {
    let t = npy(&common::lm::tiny_lm().join("tokens.npy"));
    assert_eq!(t.kind(), Kind::Int64);
    t.narrow(0, 0, n)
}

fn acts_ref(n: i64) -> Tensor {
    npy(&common::lm::tiny_lm().join("acts_ref.npy")).narrow(0, 0, n)
}

#[test]
fn fixture_is_complete() {
    let dir = common::lm::tiny_lm();
    let meta = common::lm::meta();
    let (d, ctx, vocab) = (
        meta["d_model"].as_i64().unwrap(),
        meta["ctx"].as_i64().unwrap(),
        meta["vocab_size"].as_i64().unwrap(),
    );
    assert_eq!((d, ctx, vocab), (64, 32, 1024));
    assert!(
        meta["final_loss"].as_f64().unwrap() < 0.7 * (vocab as f64).ln(),
        "{meta}"
    );
    assert_eq!(common::lm::vocab().len(), vocab as usize);
    let t = npy(&dir.join("tokens.npy"));
    assert_eq!(t.size()[1], ctx);
    assert!(t.size()[0] >= 600);
    assert_eq!(t.size()[0], meta["n_seq"].as_i64().unwrap());
    assert_eq!(
        t.select(1, 0).abs().sum(Kind::Int64).int64_value(&[]),
        0,
        "each row starts with <bos>"
    );
    assert!(t.max().int64_value(&[]) < vocab);
    let t1 = npy(&dir.join("tokens_1d.npy"));
    assert_eq!((t1.kind(), t1.dim()), (Kind::Int, 1));
    assert_eq!(acts_ref(64).size(), vec![64, ctx, d]);
    println!("fixture {}: {meta}", dir.display());
}

#[test]
fn pt2_matches_eager_pytorch() {
    let path = common::lm::tiny_lm().join("lm.pt2");
    let t0 = Instant::now();
    let model = Pt2Model::load(&path, Device::Cpu).expect("loading lm.pt2");
    let load_s = t0.elapsed().as_secs_f64();
    assert_eq!(model.device(), Device::Cpu);
    assert_eq!(
        model.metadata().get("AOTI_DEVICE_KEY").map(String::as_str),
        Some("cpu")
    );
    let ids = tokens(64);
    let t0 = Instant::now();
    let acts = model.forward(&ids).expect("forward");
    let first_s = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let reps = 10;
    for _ in 0..reps {
        let _ = model.forward(&ids).unwrap();
    }
    let fwd_s = t0.elapsed().as_secs_f64() / reps as f64;
    assert_eq!(acts.kind(), Kind::Float);
    let diff = max_abs_diff(&acts, &acts_ref(64));
    assert!(diff <= 1e-5, "lm.pt2 vs eager: max |diff| {diff:e}");
    for b in [1, 7] {
        let out = model.forward(&tokens(b)).unwrap();
        let d = max_abs_diff(&out, &acts_ref(b));
        assert!(d <= 1e-5, "batch {b}: max |diff| {d:e}");
    }
    // int32 ids are converted; the model's own checks refuse another length.
    let out = model.forward(&tokens(3).to_kind(Kind::Int)).unwrap();
    assert!(max_abs_diff(&out, &acts_ref(3)) <= 1e-5);
    println!(
        "lm.pt2: load {load_s:.3} s, first forward [64, 32] {first_s:.4} s, then {fwd_s:.4} s; max |diff| {diff:e}"
    );
}

#[test]
fn pt2_is_send() {
    fn send<T: Send>(_: &T) {}
    let model = Pt2Model::load(&common::lm::tiny_lm().join("lm.pt2"), Device::Cpu).unwrap();
    send(&model);
    let out = std::thread::spawn(move || model.forward(&tokens(2)).unwrap())
        .join()
        .unwrap();
    assert!(max_abs_diff(&out, &acts_ref(2)) <= 1e-5);
}

#[test]
fn torchscript_matches_eager_pytorch() {
    let path = common::lm::tiny_lm().join("lm.pt");
    let t0 = Instant::now();
    let m = CModule::load(&path).expect("loading lm.pt");
    let load_s = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let acts = tch::no_grad(|| m.forward_ts(&[tokens(64)])).unwrap();
    let fwd_s = t0.elapsed().as_secs_f64();
    let diff = max_abs_diff(&acts, &acts_ref(64));
    assert!(diff <= 1e-6, "lm.pt vs eager: max |diff| {diff:e}");
    for b in [1, 7] {
        let out = tch::no_grad(|| m.forward_is(&[IValue::Tensor(tokens(b))])).unwrap();
        let IValue::Tensor(out) = out else {
            panic!("lm.pt returned {out:?}")
        };
        assert!(max_abs_diff(&out, &acts_ref(b)) <= 1e-6, "batch {b}");
    }
    // Ids outside the vocabulary are errors (aten::embedding's own check).
    for bad in [1024, 5000, -1] {
        let e = tch::no_grad(|| m.forward_ts(&[tokens(2).fill(bad)])).unwrap_err();
        assert!(e.to_string().contains("index out of range in self"), "{e}");
    }
    println!("lm.pt: load {load_s:.3} s, forward [64, 32] {fwd_s:.4} s; max |diff| {diff:e}");
}

/// A one-line user error (exit code 2) naming `path` and every needle.
fn assert_user_error(e: &anyhow::Error, path: &Path, needles: &[&str]) {
    let line = one_line(e);
    assert_eq!(exit_code(e), 2, "not a user error: {line}");
    assert!(!line.contains('\n'), "{line}");
    assert!(
        line.contains(&path.display().to_string()),
        "does not name {}: {line}",
        path.display()
    );
    for n in needles {
        assert!(line.contains(n), "lacks `{n}`: {line}");
    }
    println!("{line}");
}

fn load_err(path: &Path) -> anyhow::Error {
    Pt2Model::load(path, Device::Cpu).expect_err("loading should fail")
}

#[test]
fn bad_packages_are_user_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pt2");
    assert_user_error(&load_err(&missing), &missing, &["no such file"]);

    let text = dir.path().join("text.pt2");
    std::fs::write(&text, "not a zip at all\n").unwrap();
    assert_user_error(&load_err(&text), &text, &["not a zip"]);

    let empty = dir.path().join("empty.pt2");
    std::fs::write(&empty, "").unwrap();
    assert_user_error(&load_err(&empty), &empty, &["not a zip"]);

    // TorchScript files are zips too.
    let ts = dir.path().join("lm_ts.pt2");
    std::fs::copy(common::lm::tiny_lm().join("lm.pt"), &ts).unwrap();
    assert_user_error(&load_err(&ts), &ts, &["not an AOTInductor package"]);

    // A zip cut short.
    let cut = dir.path().join("cut.pt2");
    let bytes = std::fs::read(common::lm::tiny_lm().join("lm.pt2")).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert_user_error(&load_err(&cut), &cut, &[]);

    assert_user_error(&load_err(dir.path()), dir.path(), &["directory"]);
}

#[test]
fn bad_inputs_are_user_errors() {
    let path = common::lm::tiny_lm().join("lm.pt2");
    let model = Pt2Model::load(&path, Device::Cpu).unwrap();
    let e = model.forward(&tokens(2).narrow(1, 0, 31)).unwrap_err();
    assert_user_error(&e, &path, &["expected: 32, but got: 31"]);
    let e = model.forward(&tokens(2).reshape([64])).unwrap_err();
    assert_user_error(&e, &path, &["[batch, tokens]"]);
    let e = model.forward(&tokens(2).to_kind(Kind::Float)).unwrap_err();
    assert_user_error(&e, &path, &["integers"]);
    // Ids >= the vocabulary: the compiled kernel's bounds check.
    let e = model.forward(&tokens(2).fill(5000)).unwrap_err();
    assert_user_error(&e, &path, &["index out of bounds"]);
    // Negative ids: the compiled kernel would wrap them (-1 reads id 1023).
    let e = model.forward(&tokens(2).fill(-1)).unwrap_err();
    assert_user_error(&e, &path, &["must be >= 0"]);
    // The model still works after those.
    let out = model.forward(&tokens(2)).unwrap();
    assert!(max_abs_diff(&out, &acts_ref(2)) <= 1e-5);
}

/// A copy of lm.pt2 whose metadata says it was compiled for CUDA (the
/// library inside is still the CPU one: loading must stop before it runs).
fn fake_cuda_package(dst: &Path) {
    let code = r#"
import sys, zipfile
src, dst = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w") as zo:
    for it in zi.infolist():
        b = zi.read(it.filename)
        if it.filename.endswith("_metadata.json"):
            assert b'"AOTI_DEVICE_KEY": "cpu"' in b, b
            b = b.replace(b'"AOTI_DEVICE_KEY": "cpu"', b'"AOTI_DEVICE_KEY": "cuda"')
        zo.writestr(it, b)
"#;
    let src = common::lm::tiny_lm().join("lm.pt2");
    common::py(code, &[src.to_str().unwrap(), dst.to_str().unwrap()]);
}

#[test]
fn cuda_package_without_cuda_is_a_user_error() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("cuda.pt2");
    fake_cuda_package(&fake);
    let e = load_err(&fake);
    if tch::Cuda::is_available() {
        assert_user_error(&e, &fake, &["compiled for cuda", "use a CUDA device"]);
    } else {
        assert_user_error(
            &e,
            &fake,
            &[
                "was compiled for cuda; this machine has no CUDA device",
                "export it again on the CPU",
            ],
        );
    }
}

/// lm.pt2 is exported as users do (`Dim("batch")`, taken to be >= 2), so
/// with its input checks on it refuses a batch of 1 by itself; Pt2Model
/// runs such a batch as 2 rows.
#[test]
fn pt2_batch_of_one() {
    let path = common::lm::tiny_lm().join("lm.pt2");
    let code = r#"
import os, sys, torch
os.environ["AOTI_RUNTIME_CHECK_INPUTS"] = "1"
m = torch._inductor.aoti_load_package(sys.argv[1])
try:
    m(torch.zeros(1, 32, dtype=torch.long))
    print("accepted")
except RuntimeError:
    print("refused")
"#;
    let said = common::py(code, &[path.to_str().unwrap()]);
    assert_eq!(
        said.trim(),
        "refused",
        "lm.pt2 should refuse batch 1 under its checks"
    );
    let model = Pt2Model::load(&path, Device::Cpu).unwrap();
    let out = model.forward(&tokens(1)).unwrap();
    assert_eq!(out.size(), vec![1, 32, 64]);
    assert!(max_abs_diff(&out, &acts_ref(1)) <= 1e-5);
}
