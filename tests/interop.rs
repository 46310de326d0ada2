//! Model exchange with Python, checked by Python itself: TorchScript both
//! ways (torch.jit.load of our `model.pt`/export, and modules scripted in
//! Python read by `sae`), SAELens both ways with the real `sae_lens`
//! package, `model.init` from either, and streamed `.npy` I/O for every
//! layout (fixtures written by tests/fixtures/*.py).

mod common;
use common::*;
use sae::data::npy;
use std::path::Path;

const TOL: f64 = 1e-5;

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

/// Runs a fixture script with `args`.
fn py_script(script: &str, args: &[&str]) {
    py_file(fixture(script), args);
}

const BASE: &str = "device: cpu
seed: 1
data:
  train: X
model:
  d_hidden: 12
sparsity:
  penalty: l1
  weight: 0.01
train:
  epochs: 2
  batch_size: 64
";

/// Trains a small model on `x` with `--set` overrides; returns the run dir.
fn train(dir: &Path, name: &str, x: &str, sets: &[&str]) -> String {
    let run = Case::new(dir, name)
        .yaml(BASE.replace('X', x))
        .sets(sets)
        .train();
    run.path().to_string()
}

fn p(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

/// Largest |a - b| between two .npy files (same shape required).
fn max_dev(a: &str, b: &str) -> f64 {
    let (a, b) = (npy::read_matrix(a).unwrap(), npy::read_matrix(b).unwrap());
    assert_eq!((a.rows, a.cols), (b.rows, b.cols), "shapes differ");
    a.data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max)
}

/// Python side of the TorchScript checks: for each group of arguments
/// (MODEL X Z XH DEC), loads MODEL with torch.jit.load alone and compares its
/// methods with our outputs. Prints one JSON line per group.
const TS_CHECK: &str = r#"
import sys, json, numpy as np, torch
torch.set_grad_enabled(False)
def check(model, x, z, xh, dec):
  m = torch.jit.load(model)
  x = torch.from_numpy(np.load(x)); z_ours = np.load(z); xh_ours = np.load(xh); dec_ours = np.load(dec)
  dev = lambda a, b: float(np.abs(a.numpy() - b).max())
  out = {
      "encode": dev(m.encode(x), z_ours),
      "forward": dev(m.forward(x), xh_ours),
      "decode": dev(m.decode(torch.from_numpy(z_ours)), dec_ours),
      "params": [n for n, _ in m.named_parameters()],
      "buffers": [n for n, _ in m.named_buffers()],
      # batch size free: one row, and an odd batch, agree with the full batch
      "batch_free": bool(torch.allclose(m.encode(x[:1]), m.encode(x)[:1], atol=1e-6)
                         and torch.allclose(m.forward(x[:7]), m.forward(x)[:7], atol=1e-6)),
      "methods": [n for n in ("encode", "decode", "forward") if hasattr(m, n)],
  }
  # Scripted, not traced: the weights are live parameters the methods read.
  with torch.no_grad():
      before = m.encode(x).clone()
      m.W_enc.mul_(-1.0)
      out["weights_live"] = not torch.equal(before, m.encode(x))
  return out
a = sys.argv[1:]
for i in range(0, len(a), 5):
    print(json.dumps(check(*a[i:i + 5])))
"#;

/// Runs [`TS_CHECK`] once for all `groups` (one Python start-up).
fn ts_checks(groups: &[[String; 5]]) -> Vec<serde_json::Value> {
    let args: Vec<&str> = groups.iter().flatten().map(String::as_str).collect();
    let out: Vec<serde_json::Value> = py(TS_CHECK, &args)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(out.len(), groups.len());
    out
}

/// A trained model variant: `--set` overrides, and the parameters beyond
/// the four weights and the buffers its TorchScript module must have.
struct Variant {
    name: &'static str,
    sets: &'static [&'static str],
    extra_params: &'static [&'static str],
    buffers: &'static [&'static str],
}

const NORM: &[&str] = &["norm_shift", "norm_scale"];

const VARIANTS: &[Variant] = &[
    Variant {
        name: "relu",
        sets: &[],
        extra_params: &[],
        buffers: &[],
    },
    Variant {
        name: "topk",
        sets: &[
            "model.activation=topk",
            "model.k=3",
            "sparsity.penalty=none",
        ],
        extra_params: &[],
        buffers: &[],
    },
    Variant {
        name: "abstopk",
        sets: &[
            "model.activation=abstopk",
            "model.k=3",
            "sparsity.penalty=none",
        ],
        extra_params: &[],
        buffers: &[],
    },
    Variant {
        name: "sigmoid",
        sets: &[
            "model.activation=sigmoid",
            "sparsity.penalty=kl",
            "sparsity.weight=0.1",
        ],
        extra_params: &[],
        buffers: &[],
    },
    Variant {
        name: "jumprelu",
        sets: &[
            "model.activation=jumprelu",
            "sparsity.penalty=l0",
            "data.normalize=standardize",
        ],
        extra_params: &["threshold"],
        buffers: NORM,
    },
    Variant {
        name: "batchtopk",
        sets: &[
            "model.activation=batchtopk",
            "model.k=3",
            "sparsity.penalty=none",
        ],
        extra_params: &[],
        buffers: &["threshold"],
    },
    Variant {
        name: "matryoshka_batchtopk",
        sets: &[
            "model.activation=matryoshka_batchtopk",
            "model.k=3",
            "model.matryoshka_widths=[4, 8]",
            "sparsity.penalty=none",
        ],
        extra_params: &[],
        buffers: &["threshold"],
    },
    Variant {
        name: "matching_pursuit",
        sets: &[
            "model.activation=matching_pursuit",
            "model.k=4",
            "model.tied=true",
            "sparsity.penalty=none",
        ],
        extra_params: &[],
        buffers: &[],
    },
    Variant {
        name: "relu_standardize_tied",
        sets: &["data.normalize=standardize", "model.tied=true"],
        extra_params: &[],
        buffers: NORM,
    },
    Variant {
        name: "topk_minmax_no_bdec",
        sets: &[
            "model.activation=topk",
            "model.k=4",
            "sparsity.penalty=none",
            "data.normalize=minmax",
            "model.apply_b_dec_to_input=false",
        ],
        extra_params: &[],
        buffers: NORM,
    },
    Variant {
        name: "relu_sigmoid_out",
        sets: &["model.decoder_activation=sigmoid", "data.normalize=minmax"],
        extra_params: &[],
        buffers: NORM,
    },
    Variant {
        name: "deep",
        sets: &["model.hidden=[16, 12]", "model.apply_b_dec_to_input=false"],
        extra_params: &[
            "enc_layers_0_W",
            "enc_layers_0_b",
            "dec_layers_0_W",
            "dec_layers_0_b",
        ],
        buffers: &[],
    },
    Variant {
        name: "transcoder",
        sets: &[
            "data.target=TARGET",
            "data.normalize=standardize",
            "model.apply_b_dec_to_input=false",
        ],
        extra_params: &[],
        buffers: &[
            "norm_shift",
            "norm_scale",
            "out_norm_shift",
            "out_norm_scale",
        ],
    },
    Variant {
        name: "topk_skip_transcoder",
        sets: &[
            "data.target=TARGET",
            "data.normalize=standardize",
            "model.apply_b_dec_to_input=false",
            "model.activation=topk",
            "model.k=3",
            "sparsity.penalty=none",
            "model.skip_connection=true",
        ],
        extra_params: &["W_skip"],
        buffers: &[
            "norm_shift",
            "norm_scale",
            "out_norm_shift",
            "out_norm_scale",
        ],
    },
    Variant {
        name: "jumprelu_skip",
        sets: &[
            "model.activation=jumprelu",
            "sparsity.penalty=l0",
            "data.normalize=standardize",
            "model.skip_connection=true",
        ],
        extra_params: &["threshold", "W_skip"],
        buffers: NORM,
    },
];

/// Every activation and model variant: `model.pt` from `sae train` and
/// `sae export --format torchscript` give, in Python (torch.jit.load alone),
/// the codes, decoder outputs and reconstructions `sae encode` / `decode` /
/// `reconstruct` write; parameters are named and live (a scripted module,
/// not a trace); any batch size works; `sae` reads its own module back.
#[test]
fn torchscript_export_matches_sae_for_every_activation() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, _) = synth(d, 300, 10, 16, 2);
    // A row-aligned target of another width, for the transcoder.
    let (target, _) = {
        let sub = d.join("target");
        std::fs::create_dir(&sub).unwrap();
        synth(&sub, 300, 6, 8, 2)
    };
    let mut groups = Vec::new();
    for v in VARIANTS {
        let name = v.name;
        let sets: Vec<String> = v
            .sets
            .iter()
            .map(|s| s.replace("TARGET", &target))
            .collect();
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let run = train(d, name, &x, &sets);
        let (z, xh, dec) = (
            p(d, &format!("{name}_z.npy")),
            p(d, &format!("{name}_xh.npy")),
            p(d, &format!("{name}_dec.npy")),
        );
        // Streamed in batches of 50 (300 rows: 6 chunks).
        for (cmd, data, out) in [
            ("encode", &x, &z),
            ("reconstruct", &x, &xh),
            ("decode", &z, &dec),
        ] {
            apply(cmd, &run, data, out, &["--batch-size", "50"]);
        }
        let exported = p(d, &format!("{name}.pt"));
        sae_ok(&[
            "export",
            "--model",
            &run,
            "--format",
            "torchscript",
            "--out",
            &exported,
        ]);
        for model in [format!("{run}/model.pt"), exported] {
            groups.push([model, x.clone(), z.clone(), xh.clone(), dec.clone()]);
        }
        // And `sae` reads its own TorchScript back to the same outputs.
        let (z2, xh2) = (
            p(d, &format!("{name}_z2.npy")),
            p(d, &format!("{name}_xh2.npy")),
        );
        let pt = format!("{run}/model.pt");
        apply("encode", &pt, &x, &z2, &[]);
        apply("reconstruct", &pt, &x, &xh2, &[]);
        let (dz, dx) = (max_dev(&z, &z2), max_dev(&xh, &xh2));
        assert!(
            dz <= 1e-6 && dx <= 1e-6,
            "{name}: model.pt read back deviates by {dz}, {dx}"
        );
    }
    // Python: torch.jit.load alone, for both files of every variant.
    let results = ts_checks(&groups);
    for (i, r) in results.iter().enumerate() {
        let v = &VARIANTS[i / 2];
        let (name, model) = (v.name, &groups[i][0]);
        println!("INTEROP torchscript {name}: {r}");
        for k in ["encode", "forward", "decode"] {
            let dev = r[k].as_f64().unwrap();
            assert!(dev <= TOL, "{name} {model}: {k} deviates by {dev}");
        }
        let names = |k: &str| -> Vec<String> {
            r[k].as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        };
        let mut want: Vec<&str> = vec!["W_enc", "b_enc", "W_dec", "b_dec"];
        want.extend(v.extra_params);
        assert_eq!(names("params"), want, "{name}: named_parameters");
        let mut buffers = names("buffers");
        buffers.sort();
        let mut want: Vec<&str> = v.buffers.to_vec();
        want.sort();
        assert_eq!(buffers, want, "{name}: named_buffers");
        assert_eq!(r["methods"].as_array().unwrap().len(), 3, "{name}: methods");
        assert_eq!(r["batch_free"], true, "{name}: batch size not free");
        assert_eq!(r["weights_live"], true, "{name}: weights frozen (a trace?)");
    }
}

/// Modules scripted in Python (plain nn.Module, SAELens-named parameters,
/// no architecture attributes unless described) are read by `sae`: the
/// same codes, decoder output and reconstruction Python computes; `eval`
/// runs; `model.init` starts training from their weights.
#[test]
fn python_torchscript_modules_are_read_by_sae() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, _) = synth(d, 200, 8, 16, 2);
    let cases: &[(&str, &[&str])] = &[
        ("py_relu", &[]),
        ("py_topk", &["--k", "5"]),
        ("py_topk_no_bdec", &["--k", "5", "--no-b-dec-in"]),
        (
            "py_relu_norm_sigmoid_out",
            &["--normalize", "--sigmoid-out"],
        ),
        (
            "py_topk_described",
            &["--k", "3", "--normalize", "--describe"],
        ),
    ];
    let mut groups = Vec::new();
    for (name, extra) in cases {
        let pt = p(d, &format!("{name}.pt"));
        let mut args = vec![pt.as_str(), "--d-in", "8", "--d-hidden", "20"];
        args.extend_from_slice(extra);
        py_script("torchscript_sae.py", &args);
        let (z, xh, dec) = (
            p(d, &format!("{name}_z.npy")),
            p(d, &format!("{name}_xh.npy")),
            p(d, &format!("{name}_dec.npy")),
        );
        apply("encode", &pt, &x, &z, &["--batch-size", "33"]);
        apply("reconstruct", &pt, &x, &xh, &[]);
        apply("decode", &pt, &z, &dec, &[]);
        groups.push([pt.clone(), x.clone(), z, xh, dec]);
        let out = sae_ok(&["eval", "--model", &pt, "--data", &x, "--json"]);
        let m: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert!(m["mse"].as_f64().unwrap().is_finite(), "{name}: eval");
    }

    for (r, (name, _)) in ts_checks(&groups).iter().zip(cases) {
        println!("INTEROP python-torchscript {name}: {r}");
        for k in ["encode", "forward", "decode"] {
            let v = r[k].as_f64().unwrap();
            assert!(v <= TOL, "{name}: {k} deviates by {v}");
        }
    }

    // model.init from a Python module: with a negligible lr the run keeps its weights.
    let pt = p(d, "py_topk.pt");
    let run = train(
        d,
        "init_from_ts",
        &x,
        &[
            &format!("model.init={pt}"),
            "model.d_hidden=20",
            "model.activation=topk",
            "model.k=5",
            "sparsity.penalty=none",
            "train.optimizer.lr=1e-12",
            "train.epochs=1",
        ],
    );
    let same = py(
        r#"
import sys, torch
from safetensors.torch import load_file
m = torch.jit.load(sys.argv[1]); w = load_file(sys.argv[2])
print(all(torch.allclose(p, w[n], atol=1e-7, rtol=0) for n, p in m.named_parameters()))
"#,
        &[&pt, &format!("{run}/model.safetensors")],
    );
    assert_eq!(same.trim(), "True", "model.init from TorchScript");

    // A module whose encode is not an SAE this tool can run: a clear refusal.
    let odd = p(d, "odd.pt");
    py_script(
        "torchscript_sae.py",
        &[&odd, "--d-in", "8", "--d-hidden", "6", "--tanh"],
    );
    expect_user_error(
        &[
            "encode",
            "--model",
            &odd,
            "--data",
            &x,
            "--out",
            &p(d, "odd_z.npy"),
        ],
        &["odd.pt", "encode"],
    );
    assert!(!d.join("odd_z.npy").exists());
}

/// Our SAELens export loads with `sae_lens.SAE.load_from_disk` and gives our
/// codes and reconstructions (input normalisation folded into the weights).
/// SAELens loads each of our exports and encodes `x` as we do: for every
/// group of (export dir, our codes .npy, our outputs .npy, expected class)
/// named in `names`, sae_lens builds that class and its `encode` and forward
/// are within TOL of ours.
fn assert_saelens_matches(x: &str, groups: &[String], names: &[&str], what: &str) {
    let res = py(
        r#"
import sys, json, warnings, numpy as np, torch
warnings.filterwarnings("ignore")
from sae_lens import SAE
torch.set_grad_enabled(False)
x = torch.from_numpy(np.load(sys.argv[1]))
a = sys.argv[2:]
for i in range(0, len(a), 4):
    sae = SAE.load_from_disk(a[i])
    cfg = json.load(open(a[i] + "/cfg.json"))
    print(json.dumps({
        "class": type(sae).__name__, "architecture": cfg["architecture"],
        "encode": float(np.abs(sae.encode(x).numpy() - np.load(a[i + 1])).max()),
        "forward": float(np.abs(sae(x).numpy() - np.load(a[i + 2])).max()),
        "expected": a[i + 3],
    }))
"#,
        &[
            [x].as_slice(),
            &groups.iter().map(String::as_str).collect::<Vec<_>>(),
        ]
        .concat(),
    );
    let lines: Vec<serde_json::Value> = res
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), names.len());
    for (r, name) in lines.iter().zip(names) {
        println!("INTEROP {what} {name}: {r}");
        assert_eq!(r["class"], r["expected"], "{name}: class");
        for k in ["encode", "forward"] {
            let v = r[k].as_f64().unwrap();
            assert!(v <= TOL, "{name}: sae_lens {k} deviates by {v}");
        }
    }
}

#[test]
fn saelens_export_loads_in_sae_lens_and_matches() {
    if !saelens_available("saelens_export_loads_in_sae_lens_and_matches") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, _) = synth(d, 300, 10, 16, 2);
    let cases: &[(&str, &[&str], &str)] = &[
        ("relu", &[], "StandardSAE"),
        (
            "topk",
            &[
                "model.activation=topk",
                "model.k=3",
                "sparsity.penalty=none",
            ],
            "TopKSAE",
        ),
        (
            "abstopk",
            &[
                "model.activation=abstopk",
                "model.k=3",
                "sparsity.penalty=none",
            ],
            "AbsTopKSAE",
        ),
        (
            "relu_standardize_tied",
            &["data.normalize=standardize", "model.tied=true"],
            "StandardSAE",
        ),
        (
            "topk_minmax_no_bdec",
            &[
                "model.activation=topk",
                "model.k=4",
                "sparsity.penalty=none",
                "data.normalize=minmax",
                "model.apply_b_dec_to_input=false",
            ],
            "TopKSAE",
        ),
        (
            "relu_standardize_no_bdec",
            &[
                "data.normalize=standardize",
                "model.apply_b_dec_to_input=false",
            ],
            "StandardSAE",
        ),
        (
            "jumprelu_standardize",
            &[
                "model.activation=jumprelu",
                "sparsity.penalty=l0",
                "data.normalize=standardize",
            ],
            "JumpReLUSAE",
        ),
        // SAELens saves BatchTopK SAEs for inference as JumpReLU.
        (
            "batchtopk",
            &[
                "model.activation=batchtopk",
                "model.k=3",
                "sparsity.penalty=none",
            ],
            "JumpReLUSAE",
        ),
        // So does SAELens a MatryoshkaBatchTopK SAE.
        (
            "matryoshka_batchtopk",
            &[
                "model.activation=matryoshka_batchtopk",
                "model.k=3",
                "model.matryoshka_widths=[4, 8]",
                "sparsity.penalty=none",
            ],
            "JumpReLUSAE",
        ),
        (
            "matching_pursuit",
            &[
                "model.activation=matching_pursuit",
                "model.k=4",
                "model.tied=true",
                "sparsity.penalty=none",
            ],
            "MatchingPursuitSAE",
        ),
    ];
    let mut dirs = Vec::new();
    for (name, sets, class) in cases {
        let run = train(d, name, &x, sets);
        let (z, xh) = (
            p(d, &format!("{name}_z.npy")),
            p(d, &format!("{name}_xh.npy")),
        );
        apply("encode", &run, &x, &z, &[]);
        apply("reconstruct", &run, &x, &xh, &[]);
        let out = p(d, &format!("{name}_saelens"));
        sae_ok(&[
            "export", "--model", &run, "--format", "saelens", "--out", &out,
        ]);
        dirs.extend([out, z, xh, class.to_string()]);
    }
    let names: Vec<&str> = cases.iter().map(|c| c.0).collect();
    assert_saelens_matches(&x, &dirs, &names, "saelens-export");
    // Our reader takes our export back.
    let z2 = p(d, "relu_z2.npy");
    apply(
        "encode",
        p(d, "relu_standardize_tied_saelens"),
        &x,
        &z2,
        &[],
    );
    let dev = max_dev(&p(d, "relu_standardize_tied_z.npy"), &z2);
    assert!(dev <= TOL, "SAELens export read back deviates by {dev}");
    // A matching-pursuit export (W_dec and b_dec only) too.
    let z2 = p(d, "matching_pursuit_z2.npy");
    apply("encode", p(d, "matching_pursuit_saelens"), &x, &z2, &[]);
    let dev = max_dev(&p(d, "matching_pursuit_z.npy"), &z2);
    assert!(
        dev <= TOL,
        "matching_pursuit SAELens export read back deviates by {dev}"
    );
}

/// 300 rows of x (d 10) and a target y = x @ R + 3 (d 7), for the
/// transcoder exports.
fn transcoder_data(d: &Path) -> (String, String) {
    let (x, _) = synth(d, 300, 10, 16, 2);
    let y = p(d, "y.npy");
    py(
        "import sys, numpy as np\nx = np.load(sys.argv[1]); r = np.random.default_rng(0)\n\
         np.save(sys.argv[2], (x @ r.standard_normal((10, 7)) + 3.0).astype(np.float32))",
        &[&x, &y],
    );
    (x, y)
}

/// Transcoders (`data.target`) export as SAELens's `transcoder` (ReLU) and
/// `jumprelu_transcoder`, normalisations of input and target folded in:
/// sae_lens encodes and maps to the target's space as `sae` does, and
/// `sae` reads the export back. Other activations are refused.
#[test]
fn saelens_transcoder_export() {
    if !saelens_available("saelens_transcoder_export") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, y) = transcoder_data(d);
    let base = "model.apply_b_dec_to_input=false".to_string();
    let target = format!("data.target={y}");
    let cases: &[(&str, &[&str], &str)] = &[
        ("relu", &["data.normalize=standardize"], "Transcoder"),
        (
            "jumprelu",
            &["model.activation=jumprelu", "sparsity.penalty=l0"],
            "JumpReLUTranscoder",
        ),
    ];
    let mut args = Vec::new();
    for (name, sets, class) in cases {
        let mut all = vec![base.as_str(), target.as_str()];
        all.extend_from_slice(sets);
        let run = train(d, &format!("tc_{name}"), &x, &all);
        let (z, yh) = (
            p(d, &format!("{name}_z.npy")),
            p(d, &format!("{name}_yh.npy")),
        );
        apply("encode", &run, &x, &z, &[]);
        apply("reconstruct", &run, &x, &yh, &[]);
        let out = p(d, &format!("{name}_saelens"));
        sae_ok(&[
            "export", "--model", &run, "--format", "saelens", "--out", &out,
        ]);
        // Read back by sae: the same codes.
        let z2 = p(d, &format!("{name}_z2.npy"));
        apply("encode", &out, &x, &z2, &[]);
        let dev = max_dev(&z, &z2);
        assert!(dev <= TOL, "{name}: read back deviates by {dev}");
        args.extend([out, z, yh, class.to_string()]);
    }
    let names: Vec<&str> = cases.iter().map(|c| c.0).collect();
    assert_saelens_matches(&x, &args, &names, "saelens-export transcoder");
    let run = train(
        d,
        "tc_topk",
        &x,
        &[
            &base,
            &target,
            "model.activation=topk",
            "model.k=3",
            "sparsity.penalty=none",
        ],
    );
    let out = p(d, "topk_saelens");
    expect_user_error(
        &[
            "export", "--model", &run, "--format", "saelens", "--out", &out,
        ],
        &["SAELens transcoders are ReLU", "topk"],
    );
    assert!(!Path::new(&out).exists());
}

/// Skip models (`model.skip_connection`) export as SAELens's
/// `skip_transcoder` (ReLU) and `jumprelu_skip_transcoder` (JumpReLU,
/// batchtopk), transcoders or plain SAEs (b_dec on the input folded into
/// b_enc), normalisations folded into W_skip and b_dec too: sae_lens
/// encodes and its forward (with `x @ W_skip.T`) reconstructs as `sae`
/// does, and `sae` reads the export back to the same codes and
/// reconstructions. Top-k is refused (SAELens has no top-k transcoder).
#[test]
fn saelens_skip_transcoder_export() {
    if !saelens_available("saelens_skip_transcoder_export") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, y) = transcoder_data(d);
    let target = format!("data.target={y}");
    let skip = "model.skip_connection=true";
    let tc = "model.apply_b_dec_to_input=false";
    let cases: &[(&str, &[&str], &str)] = &[
        (
            "relu_tc",
            &[&target, tc, "data.normalize=standardize"],
            "SkipTranscoder",
        ),
        (
            "jumprelu_tc",
            &[
                &target,
                tc,
                "model.activation=jumprelu",
                "sparsity.penalty=l0",
            ],
            "JumpReLUSkipTranscoder",
        ),
        (
            "relu_sae",
            &["data.normalize=standardize"],
            "SkipTranscoder",
        ),
        (
            "batchtopk_sae",
            &[
                "data.normalize=standardize",
                "model.activation=batchtopk",
                "model.k=3",
                "sparsity.penalty=none",
            ],
            "JumpReLUSkipTranscoder",
        ),
    ];
    let mut args = Vec::new();
    for (name, sets, class) in cases {
        let mut all = vec![skip, "train.epochs=4"];
        all.extend_from_slice(sets);
        let run = train(d, &format!("skip_{name}"), &x, &all);
        let (z, yh) = (
            p(d, &format!("{name}_z.npy")),
            p(d, &format!("{name}_yh.npy")),
        );
        apply("encode", &run, &x, &z, &[]);
        apply("reconstruct", &run, &x, &yh, &[]);
        // The skip term is trained: reconstruct differs from decode(encode).
        let dec = p(d, &format!("{name}_dec.npy"));
        apply("decode", &run, &z, &dec, &[]);
        assert!(max_dev(&yh, &dec) > 1e-3, "{name}: W_skip stayed at zero");
        let out = p(d, &format!("{name}_saelens"));
        sae_ok(&[
            "export", "--model", &run, "--format", "saelens", "--out", &out,
        ]);
        // Read back by sae: the same codes and reconstructions.
        let (z2, yh2) = (
            p(d, &format!("{name}_z2.npy")),
            p(d, &format!("{name}_yh2.npy")),
        );
        apply("encode", &out, &x, &z2, &[]);
        apply("reconstruct", &out, &x, &yh2, &[]);
        let (dz, dy) = (max_dev(&z, &z2), max_dev(&yh, &yh2));
        assert!(
            dz <= TOL && dy <= 1e-4,
            "{name}: read back deviates by {dz} (codes), {dy} (reconstructions)"
        );
        args.extend([out, z, yh, class.to_string()]);
    }
    let names: Vec<&str> = cases.iter().map(|c| c.0).collect();
    assert_saelens_matches(&x, &args, &names, "saelens-export skip transcoder");
    let run = train(
        d,
        "skip_topk",
        &x,
        &[
            skip,
            "model.activation=topk",
            "model.k=3",
            "sparsity.penalty=none",
        ],
    );
    let out = p(d, "skip_topk_saelens");
    expect_user_error(
        &[
            "export", "--model", &run, "--format", "saelens", "--out", &out,
        ],
        &["SAELens skip transcoders are ReLU", "topk"],
    );
    assert!(!Path::new(&out).exists());
}

/// SAEs saved by `sae_lens` itself load in `sae` (`--model DIR`) and give the
/// codes and reconstructions sae_lens computes; `model.init` takes them.
#[test]
fn saelens_saved_sae_is_read_by_sae() {
    if !saelens_available("saelens_saved_sae_is_read_by_sae") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, _) = synth(d, 200, 10, 16, 2);
    let cases: &[(&str, &[&str])] = &[
        ("standard", &["--architecture", "standard"]),
        (
            "standard_no_bdec",
            &["--architecture", "standard", "--no-b-dec-in"],
        ),
        ("topk", &["--architecture", "topk", "--k", "4"]),
        (
            "topk_rescale",
            &["--architecture", "topk", "--k", "4", "--rescale"],
        ),
        ("jumprelu", &["--architecture", "jumprelu"]),
        (
            "matching_pursuit",
            &["--architecture", "matching_pursuit", "--k", "5"],
        ),
    ];
    for (name, extra) in cases {
        let sl = p(d, name);
        let mut args = vec![sl.as_str(), x.as_str()];
        args.extend_from_slice(extra);
        py_script("saelens_sae.py", &args);
        let (z, xh) = (
            p(d, &format!("{name}_z.npy")),
            p(d, &format!("{name}_xh.npy")),
        );
        apply("encode", &sl, &x, &z, &["--batch-size", "64"]);
        apply("reconstruct", &sl, &x, &xh, &[]);
        let (ez, ex) = (
            max_dev(&z, &format!("{sl}/codes.npy")),
            max_dev(&xh, &format!("{sl}/recon.npy")),
        );
        println!("INTEROP saelens-import {name}: encode {ez:.3e} reconstruct {ex:.3e}");
        assert!(
            ez <= TOL && ex <= TOL,
            "{name}: encode {ez}, reconstruct {ex}"
        );
    }
    // model.init from a SAELens directory, negligible lr: weights kept.
    let run = train(
        d,
        "init_from_saelens",
        &x,
        &[
            &format!("model.init={}", p(d, "standard")),
            "model.d_hidden=24",
            "train.optimizer.lr=1e-12",
            "train.epochs=1",
        ],
    );
    let same = py(
        r#"
import sys, torch
from safetensors.torch import load_file
a = load_file(sys.argv[1] + "/sae_weights.safetensors"); b = load_file(sys.argv[2])
print(all(torch.allclose(a[n], b[n], atol=1e-7, rtol=0) for n in ["W_enc", "b_enc", "W_dec", "b_dec"]))
"#,
        &[&p(d, "standard"), &format!("{run}/model.safetensors")],
    );
    assert_eq!(same.trim(), "True", "model.init from SAELens");
    // A JumpReLU SAE: its thresholds come along too (every tensor, not four).
    let out = Case::new(d, "init_from_saelens_jumprelu")
        .yaml(BASE.replace('X', &x))
        .sets([
            &format!("model.init={}", p(d, "jumprelu")),
            "model.d_hidden=24",
            "model.activation=jumprelu",
            "sparsity.penalty=none",
            "train.optimizer.lr=1e-12",
            "train.epochs=1",
        ])
        .output();
    assert!(out.status.success(), "{}", stderr(&out));
    let said = stderr(&out);
    assert!(
        said.contains("model.init: W_enc, b_enc, W_dec, b_dec, threshold from"),
        "{said}"
    );
    let run = p(d, "init_from_saelens_jumprelu");
    let same = py(
        r#"
import sys, torch
from safetensors.torch import load_file
a = load_file(sys.argv[1] + "/sae_weights.safetensors"); b = load_file(sys.argv[2])
print(all(torch.allclose(a[n], b[n], atol=1e-6, rtol=0) for n in ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"]))
"#,
        &[&p(d, "jumprelu"), &format!("{run}/model.safetensors")],
    );
    assert_eq!(
        same.trim(),
        "True",
        "model.init from a SAELens JumpReLU SAE"
    );
}

/// What SAELens cannot represent is refused with one clear line (exit 2) and
/// nothing written; other export mistakes too.
#[test]
fn export_refusals_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, _) = synth(d, 100, 6, 8, 2);
    let sig = train(
        d,
        "sig",
        &x,
        &[
            "model.activation=sigmoid",
            "sparsity.penalty=kl",
            "sparsity.weight=0.1",
            "train.epochs=1",
        ],
    );
    let out = p(d, "sig_saelens");
    let export = |model: &str, format: &str, out: &str, needles: &[&str]| {
        expect_user_error(
            &["export", "--model", model, "--format", format, "--out", out],
            needles,
        )
    };
    export(&sig, "saelens", &out, &["SAELens", "sigmoid"]);
    assert!(!Path::new(&out).exists(), "a refused export left {out}");
    let relu = train(
        d,
        "relu",
        &x,
        &["model.decoder_activation=sigmoid", "train.epochs=1"],
    );
    export(&relu, "saelens", &out, &["decoder"]);
    assert!(!Path::new(&out).exists());
    let no_dir = p(d, "no/such/dir/m.pt");
    export(&relu, "torchscript", &no_dir, &["no/such/dir"]);
    export(&p(d, "missing"), "safetensors", &p(d, "m.safetensors"), &[]);
    // safetensors export of a TorchScript model reads back the same.
    let st = p(d, "from_ts.safetensors");
    sae_ok(&[
        "export",
        "--model",
        &format!("{relu}/model.pt"),
        "--format",
        "safetensors",
        "--out",
        &st,
    ]);
    let (z1, z2) = (p(d, "z1.npy"), p(d, "z2.npy"));
    apply("encode", &st, &x, &z1, &[]);
    apply("encode", &relu, &x, &z2, &[]);
    assert!(max_dev(&z1, &z2) <= 1e-6);
}

/// Every `.npy` layout (fixtures by tests/fixtures/npy_variants.py) reads
/// the same, whole and streamed in uneven chunks through `sae encode`.
#[test]
fn every_npy_layout_streams_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fx = d.join("fx");
    py_script("npy_variants.py", &[fx.to_str().unwrap()]);
    let reference = npy::read_matrix(&p(&fx, "reference.npy")).unwrap();
    let run = train(
        d,
        "run",
        &p(&fx, "reference.npy"),
        &["data.normalize=standardize"],
    );
    let z_ref = p(d, "z_ref.npy");
    apply("encode", &run, p(&fx, "reference.npy"), &z_ref, &[]);
    let z_ref_m = npy::read_matrix(&z_ref).unwrap();
    let specs = std::fs::read_to_string(fx.join("variants.txt")).unwrap();
    let mut n = 0;
    for spec in specs.lines() {
        let full = p(&fx, spec);
        let m = npy::read_matrix(&full).unwrap_or_else(|e| panic!("{spec}: {e:#}"));
        assert_eq!((m.rows, m.cols), (37, 6), "{spec}: shape");
        assert_eq!(m.data, reference.data, "{spec}: values differ");
        let shape = npy::data_shape(&full).unwrap();
        assert_eq!((shape.rows, shape.cols), (37, 6), "{spec}: header shape");
        // Streamed: 37 rows in chunks of at most 7 (also across shard ends).
        let mut streamed = Vec::new();
        npy::for_each_chunk(&full, 7, |c| {
            assert!(
                c.rows >= 1 && c.rows <= 7 && c.cols == 6,
                "{spec}: chunk {}x{}",
                c.rows,
                c.cols
            );
            streamed.extend_from_slice(&c.data);
            Ok(())
        })
        .unwrap();
        assert_eq!(streamed, reference.data, "{spec}: streamed values differ");
        n += 1;
    }
    println!("INTEROP npy layouts read whole and streamed: {n}");
    assert!(n >= 40, "only {n} layouts");
    // Through the binary, for the layouts that stream differently.
    for spec in [
        "le_f4_fortran.npy",
        "be_f2.npy",
        "be_u8_fortran.npy",
        "stored.npz:ints",
        "compressed.npz:fortran",
        "shards",
    ] {
        let z = p(d, "z.npy");
        let full = p(&fx, spec);
        apply("encode", &run, &full, &z, &["--batch-size", "7"]);
        let zm = npy::read_matrix(&z).unwrap();
        assert_eq!((zm.rows, zm.cols), (37, 12), "{spec}: output shape");
        let dev = zm
            .data
            .iter()
            .zip(&z_ref_m.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(dev <= 1e-6, "{spec}: streamed codes deviate by {dev}");
    }
    // Our streamed output is a plain numpy array.
    let out = py(
        "import sys, numpy as np\na = np.load(sys.argv[1]); print(a.dtype, a.shape, a.flags['C_CONTIGUOUS'])",
        &[&z_ref],
    );
    assert_eq!(out.trim(), "float32 (37, 12) True");
}

/// `encode`/`score` hold one batch, not the file: peak memory on a 256 MB
/// input stays within a fixed margin of the peak on a tiny one. `score`
/// writes per-row MSE in the model's space, as numpy computes it from
/// `reconstruct`.
#[test]
fn streaming_keeps_memory_bounded_and_scores_rows() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, _) = synth(d, 500, 64, 32, 3);
    let run = train(d, "run", &x, &["model.d_hidden=8", "train.epochs=1"]);
    // Score per row = mean over columns of (x - x̂)² (no normalisation here).
    let (s, xh) = (p(d, "s.npy"), p(d, "xh.npy"));
    apply("score", &run, &x, &s, &["--batch-size", "77"]);
    apply("reconstruct", &run, &x, &xh, &[]);
    let dev: f64 = py(
        "import sys, numpy as np\nx, xh, s = (np.load(a) for a in sys.argv[1:4])\n\
         assert s.shape == (x.shape[0], 1), s.shape\nprint(np.abs(((x - xh) ** 2).mean(1, keepdims=True) - s).max())",
        &[&x, &xh, &s],
    )
    .trim()
    .parse()
    .unwrap();
    assert!(dev <= 1e-6, "score deviates from numpy by {dev}");

    let big = p(d, "big.npy");
    let out = py(
        r#"
import sys, resource, subprocess, numpy as np
sae, run, small, big, d = sys.argv[1:6]
rows = 1 << 20  # x 64 float32 = 256 MiB
a = np.lib.format.open_memmap(big, mode="w+", dtype=np.float32, shape=(rows, 64))
for i in range(0, rows, 1 << 16):
    a[i:i + (1 << 16)] = np.random.default_rng(i).standard_normal((1 << 16, 64), dtype=np.float32)
a.flush(); del a
def peak(data):
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run([sae, "score", "--model", run, "--data", data, "--out", d + "/s_peak.npy",
                    "--device", "cpu"], check=True)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
small_kb = peak(small)
big_kb = peak(big)
s = np.load(d + "/s_peak.npy", mmap_mode="r")
assert s.shape == (rows, 1), s.shape
print(small_kb, big_kb)
"#,
        &[sae_bin(), &run, &x, &big, d.to_str().unwrap()],
    );
    let kb: Vec<f64> = out.split_whitespace().map(|v| v.parse().unwrap()).collect();
    let (small_mb, big_mb) = (kb[0] / 1024.0, kb[1] / 1024.0);
    println!("INTEROP peak RSS: tiny input {small_mb:.0} MiB, 256 MiB input {big_mb:.0} MiB");
    assert!(
        big_mb < small_mb + 96.0,
        "peak memory grew with the input: {small_mb:.0} MiB -> {big_mb:.0} MiB"
    );
}
