//! `data.normalize: whiten` end to end. Training runs in whitened space and
//! the saved model has the whitening folded in: `model.safetensors` holds no
//! normalisation, and it, its SAELens and TorchScript exports and `sae eval`
//! give on raw rows what the trained (unfolded) weights give in whitened
//! space. The reference is computed in Python from the checkpoint's
//! unfolded weights with `tests/reference/whitening.py` (SAELens's
//! whitening), independently of the fold.

mod common;
use common::*;
use std::path::Path;

/// Makes correlated rows `x [400, 10]` (columns of very different scales,
/// offset) and a row-aligned target `y [400, 6]`, float32.
const MAKE_DATA: &str = r#"
import sys, numpy as np
rng = np.random.default_rng(0)
mix = rng.standard_normal((10, 10)) * np.linspace(0.2, 3.0, 10)[:, None]
x = rng.standard_normal((400, 10)) @ mix + rng.standard_normal(10) * 2
y = x @ rng.standard_normal((10, 6)) + 0.1 * rng.standard_normal((400, 6)) + 1.0
np.save(sys.argv[1], x.astype(np.float32))
np.save(sys.argv[2], y.astype(np.float32))
"#;

/// For each group (NAME RUN ARCH APPLY_B_DEC TARGET|- SAELENS_DIR TS_FILE
/// Z_OURS XH_OURS EVAL_MSE): the reference codes and raw-space
/// reconstructions from the checkpoint's weights on whitened rows, against
/// ours, sae_lens's and torch.jit's on raw rows. Prints one JSON line each.
const CHECK: &str = r#"
import sys, json, warnings, numpy as np, torch
warnings.filterwarnings("ignore")
sys.path.insert(0, sys.argv[1])
import whitening as wh
from safetensors.torch import load_file, safe_open
from sae_lens import SAE
torch.set_grad_enabled(False)
X = torch.from_numpy(np.load(sys.argv[2]))
eps = float(sys.argv[3])
a = sys.argv[4:]
for i in range(0, len(a), 10):
    name, run, arch, apply, target, sl_dir, ts, z_ours, xh_ours, eval_mse = a[i:i + 10]
    apply = apply == "true"
    Y = X if target == "-" else torch.from_numpy(np.load(target))
    ck = load_file(run + "/checkpoint/state.safetensors")
    W_enc, b_enc, W_dec, b_dec = (ck[f"param.{j}"] for j in range(4))
    win, wout = wh.estimate(X, eps), wh.estimate(Y, eps)
    xw = wh.whiten(X, win)
    sae_in = xw - b_dec if apply else xw
    pre = sae_in @ W_enc + b_enc
    if arch == "relu":
        z = pre.relu()
    elif arch == "jumprelu":
        thr = ck["threshold"].clamp(min=0)
        z = pre.relu() * (pre > thr)
    elif arch == "gated":
        r_mag, b_mag = ck["param.4"], ck["param.5"]
        mag = sae_in @ (W_enc * r_mag.exp()) + b_mag
        z = (pre > 0) * mag.relu()
    recon = (z @ W_dec + b_dec) @ wout[2].float() + wout[0].float()
    saved = load_file(run + "/model.safetensors")
    with safe_open(run + "/model.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["sae"])
    sl = SAE.load_from_disk(sl_dir)
    tsm = torch.jit.load(ts)
    dev = lambda u, v: float((u - v).abs().max()) / max(1.0, float(v.abs().max()))
    print(json.dumps({
        "name": name,
        "normalize": meta["normalize"], "out_normalize": meta.get("out_normalize"),
        "norm_tensors": [k for k in saved if "norm" in k],
        "folded": float((saved["W_enc"] - W_enc).abs().max()),
        "codes_fire": float((z > 0).float().mean()),
        "ours_encode": dev(torch.from_numpy(np.load(z_ours)), z),
        "ours_reconstruct": dev(torch.from_numpy(np.load(xh_ours)), recon),
        "saelens_encode": dev(sl.encode(X), z),
        "saelens_forward": dev(sl(X), recon),
        "torchscript_encode": dev(tsm.encode(X), z),
        "torchscript_forward": dev(tsm.forward(X), recon),
        "mse_rel": abs(float(eval_mse) / float(((recon.double() - Y.double()) ** 2).mean()) - 1),
    }))
"#;

const BASE: &str = "device: cpu
seed: 3
data:
  train: X
  normalize: whiten
  whiten_eps: 0.001
model:
  d_hidden: 24
  init_scheme: sae
sparsity:
  penalty: l1
  weight: 0.001
train:
  epochs: 4
  batch_size: 50
";

/// Relative to the largest reference value: float32 rounding of two
/// orders of the same affine maps; a wrong fold is off by O(1).
const TOL: f64 = 1e-4;

fn p(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

#[test]
fn whitened_runs_fold_into_plain_models_and_exports() {
    if !saelens_available("whitened_runs_fold_into_plain_models_and_exports") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, y) = (p(d, "x.npy"), p(d, "y.npy"));
    py(MAKE_DATA, &[&x, &y]);
    // (name, arch, b_dec subtracted from the input, target, sets)
    let cases: &[(&str, &str, bool, bool, &[&str])] = &[
        ("relu", "relu", true, false, &[]),
        (
            "jumprelu_no_bdec",
            "jumprelu",
            false,
            false,
            &[
                "model.activation=jumprelu",
                "sparsity.penalty=l0",
                "model.apply_b_dec_to_input=false",
                "model.jumprelu_init_threshold=0.05",
            ],
        ),
        (
            "gated_no_bdec",
            "gated",
            false,
            false,
            &["model.activation=gated", "model.apply_b_dec_to_input=false"],
        ),
        (
            "transcoder",
            "relu",
            false,
            true,
            &["model.apply_b_dec_to_input=false"],
        ),
    ];
    let mut groups: Vec<String> = Vec::new();
    for (name, arch, b_dec_in, transcoder, sets) in cases {
        let mut case = Case::new(d, name).yaml(BASE.replace('X', &x)).sets(*sets);
        if *transcoder {
            case = case.set(format!("data.target={y}"));
        }
        let run = case.train();
        let (z, xh) = (
            p(d, &format!("{name}_z.npy")),
            p(d, &format!("{name}_xh.npy")),
        );
        apply("encode", run.path(), &x, &z, &[]);
        apply("reconstruct", run.path(), &x, &xh, &[]);
        let (sl, ts) = (
            p(d, &format!("{name}_saelens")),
            p(d, &format!("{name}.pt")),
        );
        for (format, out) in [("saelens", &sl), ("torchscript", &ts)] {
            sae_ok(&[
                "export",
                "--model",
                run.path(),
                "--format",
                format,
                "--out",
                out,
            ]);
        }
        let mut eval_args = vec![
            "eval",
            "--model",
            run.path(),
            "--data",
            &x,
            "--json",
            "--device",
            "cpu",
        ];
        if *transcoder {
            eval_args.extend(["--target-data", &y]);
        }
        let eval: serde_json::Value = serde_json::from_str(&sae_ok(&eval_args)).unwrap();
        let eval_mse = eval["mse"].as_f64().unwrap();
        // The summary's metrics are the saved (folded) model's on raw rows.
        let summary_mse = run.stat("train", "mse");
        assert!(
            (summary_mse / eval_mse - 1.0).abs() < 1e-9,
            "{name}: summary mse {summary_mse} vs sae eval {eval_mse}"
        );
        let target = if *transcoder { y.clone() } else { "-".into() };
        groups.extend([
            name.to_string(),
            run.path().to_string(),
            arch.to_string(),
            b_dec_in.to_string(),
            target,
            sl,
            ts,
            z,
            xh,
            eval_mse.to_string(),
        ]);
    }
    let refdir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference");
    let mut args = vec![refdir.to_str().unwrap(), x.as_str(), "0.001"];
    args.extend(groups.iter().map(String::as_str));
    let out = py(CHECK, &args);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), cases.len(), "{out}");
    for r in &lines {
        println!("WHITEN {r}");
        let name = r["name"].as_str().unwrap();
        assert_eq!(r["normalize"], "none", "{name}: saved with a normalisation");
        assert!(
            r["out_normalize"].is_null() || r["out_normalize"] == "none",
            "{name}"
        );
        assert_eq!(r["norm_tensors"], serde_json::json!([]), "{name}");
        assert!(
            r["folded"].as_f64().unwrap() > 1e-3,
            "{name}: weights not folded"
        );
        let fire = r["codes_fire"].as_f64().unwrap();
        assert!(fire > 0.01 && fire < 0.95, "{name}: {fire} of codes fire");
        for k in [
            "ours_encode",
            "ours_reconstruct",
            "saelens_encode",
            "saelens_forward",
            "torchscript_encode",
            "torchscript_forward",
        ] {
            let v = r[k].as_f64().unwrap();
            assert!(
                v <= TOL,
                "{name}: {k} deviates from the whitened model by {v:.2e}"
            );
        }
        let m = r["mse_rel"].as_f64().unwrap();
        assert!(m < 1e-4, "{name}: sae eval mse off by relative {m:.2e}");
    }
}

/// Combinations the fold cannot hold, and a bad eps, are refused up front.
#[test]
fn whiten_refusals_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, _) = synth(d, 100, 6, 8, 2);
    let yaml = BASE.replace('X', &x);
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["model.tied=true"],
            &["data.normalize: whiten", "model.tied"],
        ),
        (
            &[
                "model.activation=matching_pursuit",
                "model.k=2",
                "sparsity.penalty=none",
            ],
            &["data.normalize: whiten", "matching_pursuit"],
        ),
        (
            &["model.decoder_activation=sigmoid"],
            &["data.normalize: whiten", "decoder_activation"],
        ),
        (&["data.whiten_eps=0"], &["data.whiten_eps", "> 0"]),
        (
            &["data.normalize=standardize", "data.whiten_eps=0.1"],
            &["data.whiten_eps", "only used with data.normalize: whiten"],
        ),
    ];
    for (i, (sets, needles)) in cases.iter().enumerate() {
        Case::new(d, &format!("bad{i}"))
            .yaml(yaml.clone())
            .sets(*sets)
            .user_error(needles);
    }
}
