//! Our numbers against PyTorch/numpy computing the same formulas: penalties,
//! encode/decode of every activation, eval metrics, and `.npy` variants.

mod common;
use common::*;
use sae::data::npy;
use sae::penalty::{Penalty, PenaltyInput};
use tch::{Kind, Tensor};

fn rel_close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1e-12)
}

#[test]
fn penalties_match_torch() {
    let dir = tempfile::tempdir().unwrap();
    // Codes in (0, 1) (so KL is defined) with a saturated unit, and a decoder.
    let z = (Tensor::arange(6 * 5, (Kind::Float, tch::Device::Cpu)).reshape([6, 5]) * 0.7)
        .sin()
        .abs()
        * 0.9;
    let z = z.index_fill(1, &Tensor::from_slice(&[4i64]), 0.0);
    let w = (Tensor::arange(5 * 3, (Kind::Float, tch::Device::Cpu)).reshape([5, 3]) * 0.3).cos();
    let zp = dir.path().join("z.npy");
    let wp = dir.path().join("w.npy");
    npy::write_npy(&zp, &z).unwrap();
    npy::write_npy(&wp, &w).unwrap();
    let ours = [
        Penalty::Kl { target: 0.1 }
            .value(&PenaltyInput::codes(&z, &w))
            .double_value(&[]),
        Penalty::L1 { decoder_norm: true }
            .value(&PenaltyInput::codes(&z, &w))
            .double_value(&[]),
        Penalty::L1 {
            decoder_norm: false,
        }
        .value(&PenaltyInput::codes(&z, &w))
        .double_value(&[]),
        Penalty::MeanAbs { target: 0.05 }
            .value(&PenaltyInput::codes(&z, &w))
            .double_value(&[]),
    ];
    let out = py(
        r#"
import sys, numpy as np, torch
z = torch.from_numpy(np.load(sys.argv[1])); w = torch.from_numpy(np.load(sys.argv[2]))
def kl(p, q): return p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
rho_hat = z.mean(0).clamp(1e-6, 1 - 1e-6)
vals = [kl(0.1, rho_hat).sum(),
        (z.abs() * w.norm(dim=1)).sum(-1).mean(),
        z.abs().sum(-1).mean(),
        (z.mean(0) - 0.05).abs().sum()]
print(" ".join(repr(float(v)) for v in vals))
"#,
        &[zp.to_str().unwrap(), wp.to_str().unwrap()],
    );
    let theirs: Vec<f64> = out.split_whitespace().map(|v| v.parse().unwrap()).collect();
    for (name, (a, b)) in ["kl", "l1", "l1_plain", "mean_abs"]
        .iter()
        .zip(ours.iter().zip(&theirs))
    {
        println!("{name:<9} ours {a:.9} torch {b:.9}");
        assert!(rel_close(*a, *b, 1e-6), "{name}: ours {a} vs torch {b}");
    }
    // One value by hand: KL(0.1 || 0.5) = 0.1 ln 0.2 + 0.9 ln 1.8.
    let half = Tensor::full([4, 1], 0.5, (Kind::Float, tch::Device::Cpu));
    let kl = Penalty::Kl { target: 0.1 }
        .value(&PenaltyInput::codes(&half, &half))
        .double_value(&[]);
    let by_hand = 0.1 * 0.2f64.ln() + 0.9 * 1.8f64.ln();
    assert!(
        rel_close(kl, by_hand, 1e-6),
        "KL(0.1||0.5): {kl} vs {by_hand}"
    );
}

/// A model of each activation, trained briefly, then encoded and
/// reconstructed by `sae` and by torch from model.safetensors.
#[test]
fn encode_and_reconstruct_match_torch_for_every_activation() {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = synth(dir.path(), 300, 12, 16, 2);
    let cases = [
        ("relu", "l1", "none", "standardize", true, false),
        ("sigmoid", "kl", "sigmoid", "minmax", false, false),
        ("topk", "none", "none", "none", true, false),
        ("relu", "l1", "none", "none", true, true), // tied
    ];
    for (i, (act, pen, out_act, norm, b_dec_in, tied)) in cases.iter().enumerate() {
        let k = if *act == "topk" { "  k: 3\n" } else { "" };
        let yaml = format!(
            "device: cpu\ndata:\n  train: {x}\n  normalize: {norm}\nmodel:\n  d_hidden: 20\n  activation: {act}\n{k}\
             decoder_activation: {out_act}\n  apply_b_dec_to_input: {b_dec_in}\n  tied: {tied}\n\
             sparsity:\n  penalty: {pen}\n  target: 0.1\ntrain:\n  epochs: 3\n  batch_size: 64\n"
        )
        .replace("decoder_activation", "  decoder_activation");
        let run = Case::new(dir.path(), &format!("run{i}")).yaml(yaml).train();
        let run_s = run.path();
        let file = |prefix: &str| dir.path().join(format!("{prefix}{i}.npy"));
        let (codes, recon, dec, score) = (file("z"), file("xh"), file("d"), file("s"));
        run.apply("encode", &x, &codes, &["--batch-size", "7"]);
        run.apply("reconstruct", &x, &recon, &[]);
        run.apply("decode", &codes, &dec, &[]);
        run.apply("score", &x, &score, &[]);
        let out = py(
            r#"
import sys, json, numpy as np, torch
from safetensors.torch import load_file
x = torch.from_numpy(np.load(sys.argv[1])); w = load_file(sys.argv[2] + "/model.safetensors")
act, out_act, b_dec_in, k = sys.argv[7], sys.argv[8], sys.argv[9] == "true", 3
shift, scale = w.get("norm_shift"), w.get("norm_scale")
xn = (x - shift) / scale if shift is not None else x
pre = (xn - w["b_dec"] if b_dec_in else xn) @ w["W_enc"] + w["b_enc"]
if act == "relu": z = torch.relu(pre)
elif act == "sigmoid": z = torch.sigmoid(pre)
else:
    v, i = pre.topk(k, dim=-1); z = torch.zeros_like(pre).scatter(-1, i, v.relu())
def dec(z):
    o = z @ w["W_dec"] + w["b_dec"]
    return torch.sigmoid(o) if out_act == "sigmoid" else o
xhn = dec(z)
xh = xhn * scale + shift if shift is not None else xhn
ours_z, ours_xh = np.load(sys.argv[3]), np.load(sys.argv[4])
ours_d, ours_s = np.load(sys.argv[5]), np.load(sys.argv[6])
score = ((xhn - xn) ** 2).mean(-1, keepdim=True)
print(json.dumps({
  "dz": float(np.abs(ours_z - z.numpy()).max()),
  "dxh": float(np.abs(ours_xh - xh.numpy()).max()),
  "ddec": float(np.abs(ours_d - dec(torch.from_numpy(ours_z)).numpy() * (scale.numpy() if scale is not None else 1) - (shift.numpy() if shift is not None else 0)).max()),
  "dscore": float(np.abs(ours_s - score.numpy()).max()),
  "dtypes": [str(a.dtype) for a in (ours_z, ours_xh, ours_d, ours_s)],
  "c_order": all(a.flags.c_contiguous for a in (ours_z, ours_xh)),
}))
"#,
            &[
                &x,
                run_s,
                codes.to_str().unwrap(),
                recon.to_str().unwrap(),
                dec.to_str().unwrap(),
                score.to_str().unwrap(),
                act,
                out_act,
                &b_dec_in.to_string(),
            ],
        );
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        println!("{act}/{out_act}/{norm}/b_dec_in={b_dec_in}/tied={tied}: {v}");
        for key in ["dz", "dxh", "ddec", "dscore"] {
            let d = v[key].as_f64().unwrap();
            assert!(d <= 1e-5, "{act}: {key} = {d} exceeds 1e-5");
        }
        assert_eq!(
            v["dtypes"],
            serde_json::json!(["float32", "float32", "float32", "float32"])
        );
        assert_eq!(v["c_order"], serde_json::json!(true));
    }
}

#[test]
fn eval_metrics_match_numpy() {
    let dir = tempfile::tempdir().unwrap();
    let (x, t) = synth(dir.path(), 500, 10, 12, 2);
    let run = Case::new(dir.path(), "run")
        .yaml(format!("device: cpu\ndata:\n  train: {x}\nmodel:\n  d_hidden: 40\n  init_scheme: sae\nsparsity:\n  weight: 0.05\ntrain:\n  epochs: 4\n  batch_size: 50\n  optimizer: {{lr: 0.005}}\n"))
        .train();
    let run_s = run.path();
    let z = dir.path().join("z.npy");
    let xh = dir.path().join("xh.npy");
    run.apply("encode", &x, &z, &[]);
    run.apply("reconstruct", &x, &xh, &[]);
    let ours: serde_json::Value = serde_json::from_str(&sae_ok(&[
        "eval",
        "--model",
        run_s,
        "--data",
        &x,
        "--truth",
        &t,
        "--json",
        "--batch-size",
        "64",
    ]))
    .unwrap();
    let out = py(
        r#"
import sys, json, numpy as np
from safetensors.numpy import load_file
x = np.load(sys.argv[1]).astype(np.float64); z = np.load(sys.argv[2]).astype(np.float64)
xh = np.load(sys.argv[3]).astype(np.float64); truth = np.load(sys.argv[4]).astype(np.float64)
W = load_file(sys.argv[5] + "/model.safetensors")["W_dec"].astype(np.float64)
fvu = ((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
freq = (z > 0).mean(0)
u = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
print(json.dumps({
  "mse": ((x - xh) ** 2).mean(), "fvu": fvu, "explained_variance": 1 - fvu,
  "l0": (z > 0).sum(1).mean(), "l1": np.abs(z).sum(1).mean(),
  "dead_fraction": (freq == 0).mean(), "dense_fraction": (freq > 0.1).mean(),
  "mmcs": (u(truth) @ u(W).T).max(1).mean(),
}))
"#,
        &[&x, z.to_str().unwrap(), xh.to_str().unwrap(), &t, run_s],
    );
    let np_: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for key in EVAL_METRICS.into_iter().chain(["mmcs"]) {
        let a = ours[key].as_f64().unwrap();
        let b = np_[key].as_f64().unwrap();
        println!("{key:<20} sae {a:.8} numpy {b:.8}");
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
            "{key}: sae {a} vs numpy {b}"
        );
    }
    assert_eq!(ours["mean_activation"].as_array().unwrap().len(), 40);
}

#[test]
fn npy_variants_from_numpy_read_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    // Values exactly representable in float16 and as integers after scaling.
    py(
        r#"
import sys, os, numpy as np
d = sys.argv[1]
rng = np.random.default_rng(0)
x = (rng.integers(-8, 8, size=(37, 6)) / 4).astype(np.float32)
np.save(f"{d}/f32.npy", x)
np.save(f"{d}/f64.npy", x.astype(np.float64))
np.save(f"{d}/f16.npy", x.astype(np.float16))
np.save(f"{d}/fortran.npy", np.asfortranarray(x))
np.save(f"{d}/bigend.npy", x.astype(">f4"))
np.save(f"{d}/bigend64_fortran.npy", np.asfortranarray(x.astype(">f8")))
np.save(f"{d}/int.npy", (x * 4).astype(np.int32))
np.savez(f"{d}/arch.npz", train=x, other=x[:2])
os.mkdir(f"{d}/shards")
np.save(f"{d}/shards/part0.npy", x[:20]); np.save(f"{d}/shards/part1.npy", x[20:])
"#,
        &[&d],
    );
    let reference = npy::read_matrix(&format!("{d}/f32.npy")).unwrap();
    assert_eq!((reference.rows, reference.cols), (37, 6));
    for name in [
        "f64.npy",
        "f16.npy",
        "fortran.npy",
        "bigend.npy",
        "bigend64_fortran.npy",
        "arch.npz:train",
        "shards",
    ] {
        let m =
            npy::read_matrix(&format!("{d}/{name}")).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!((m.rows, m.cols), (37, 6), "{name}: shape");
        assert_eq!(
            m.data, reference.data,
            "{name}: values differ from float32 C order"
        );
    }
    let ints = npy::read_matrix(&format!("{d}/int.npy")).unwrap();
    let scaled: Vec<f32> = reference.data.iter().map(|v| v * 4.0).collect();
    assert_eq!(ints.data, scaled, "int32 cast to float32");
    let err = npy::read_matrix(&format!("{d}/arch.npz:nope")).unwrap_err();
    assert!(format!("{err:#}").contains("no array `nope`"), "{err:#}");
    // Our output loads in numpy with the same values.
    let out = dir.path().join("out.npy");
    npy::write_npy(&out, &reference.to_tensor()).unwrap();
    let same = py(
        "import sys, numpy as np\na = np.load(sys.argv[1]); b = np.load(sys.argv[2])\nprint(a.dtype, a.shape, bool((a == b).all()))",
        &[out.to_str().unwrap(), &format!("{d}/f32.npy")],
    );
    assert_eq!(same.trim(), "float32 (37, 6) True");
}
