//! `sae sweep` end to end, the per-run plots of `sae train`, and the eval
//! metrics not covered in torch_reference.rs, against numpy.

mod common;
use common::*;
use std::path::Path;

/// Decodes a PNG fully and returns (width, height).
fn png_size(path: &Path) -> (u32, u32) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("PNG decodes");
    assert!(
        buf.iter().any(|&b| b != 255),
        "{}: image is blank",
        path.display()
    );
    (info.width, info.height)
}

#[test]
fn small_sweep_end_to_end_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, t) = synth(d, 1500, 16, 32, 3);
    std::fs::write(
        d.join("base.yaml"),
        format!(
            "device: cpu\ndata:\n  train: {x}\n  truth: {t}\n  valid_fraction: 0.2\nmodel:\n  d_hidden: 48\n  init_scheme: sae\n\
             sparsity:\n  penalty: l1\ntrain:\n  epochs: 3\n  batch_size: 100\n  optimizer: {{lr: 0.005}}\n  log_every: 5\n"
        ),
    )
    .unwrap();
    let sweep = write_config(
        d,
        "sweep.yaml",
        "base: base.yaml\ngrid:\n  sparsity.weight: [0.001, 0.1]\n  model.d_hidden: [24, 48]\n",
    );
    let out = d.join("out");
    let out_s = out.to_str().unwrap();
    let o = sae(&["sweep", "--config", &sweep, "--out", out_s]);
    assert!(o.status.success(), "{}", stderr(&o));
    let csv = std::fs::read_to_string(out.join("sweep.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "sparsity.weight,model.d_hidden,train_mse,valid_mse,train_fvu,valid_fvu,l0,dead_fraction,mmcs,pca_fvu_at_l0,seconds,run"
    );
    assert_eq!(lines.len(), 5, "4 points + header:\n{csv}");
    assert!(
        lines[1].starts_with("0.001,24,") && lines[4].starts_with("0.1,48,"),
        "{csv}"
    );
    let col = |row: &str, i: usize| row.split(',').nth(i).unwrap().parse::<f64>().unwrap();
    // A larger L1 weight gives a sparser code at the same width.
    assert!(
        col(lines[3], 6) < col(lines[1], 6),
        "l0 should fall with the weight:\n{csv}"
    );
    assert!(std::fs::read_to_string(out.join("sweep.md"))
        .unwrap()
        .contains("| sparsity.weight | model.d_hidden |"));
    for png in ["frontier.png", "loss_curves.png", "firing_frequency.png"] {
        assert_eq!(png_size(&out.join("plots").join(png)), (900, 560), "{png}");
    }
    // PCA baseline against numpy: FVU keeping round(L0) components.
    let row = lines[1];
    let l0 = col(row, 6);
    let ours = col(row, 9);
    let np_out = py(
        r#"
import sys, numpy as np
x = np.load(sys.argv[1]).astype(np.float64); k = float(sys.argv[2])
s = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
w = int(np.floor(k)); kept = s[:w].sum() + ((k - w) * s[w] if w < len(s) else 0)
print(1 - kept / s.sum())
"#,
        &[&x, &l0.to_string()],
    );
    let theirs: f64 = np_out.trim().parse().unwrap();
    println!("PCA fvu at l0 {l0}: sae {ours} numpy {theirs}");
    assert!(
        (ours - theirs).abs() < 1e-5,
        "PCA baseline: {ours} vs numpy {theirs}"
    );

    // Re-running skips finished points and leaves their models untouched.
    let model = out
        .join(lines[1].rsplit(',').next().unwrap())
        .join("model.safetensors");
    let before = std::fs::metadata(&model).unwrap().modified().unwrap();
    let o = sae(&["sweep", "--config", &sweep, "--out", out_s]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stderr(&o).matches("[already done]").count(),
        4,
        "{}",
        stderr(&o)
    );
    assert_eq!(
        before,
        std::fs::metadata(&model).unwrap().modified().unwrap()
    );
    // A bad grid key is refused before any training.
    let bad = write_config(
        d,
        "bad.yaml",
        "base: base.yaml\ngrid:\n  sparsity.wieght: [1]\n",
    );
    expect_user_error(
        &[
            "sweep",
            "--config",
            &bad,
            "--out",
            d.join("bad").to_str().unwrap(),
        ],
        &["wieght"],
    );
}

#[test]
fn train_writes_plots_including_decoder_tiles_for_square_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = synth(dir.path(), 400, 16, 20, 2); // 16 = 4x4 images
    let run = Case::new(dir.path(), "run")
        .yaml(format!(
            "device: cpu\ndata:\n  train: {x}\nmodel:\n  d_hidden: 12\ntrain:\n  epochs: 2\n"
        ))
        .train();
    for png in ["loss.png", "firing_frequency.png"] {
        assert_eq!(png_size(&run.join("plots").join(png)), (900, 560), "{png}");
    }
    let (w, h) = png_size(&run.join("plots/decoder_tiles.png"));
    assert!(w >= 300 && h > 60, "decoder tiles {w}x{h}");
}

#[test]
fn eval_per_unit_metrics_and_histogram_match_numpy() {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = synth(dir.path(), 500, 10, 12, 2);
    let run = Case::new(dir.path(), "run")
        .yaml(format!(
            "device: cpu\ndata:\n  train: {x}\nmodel:\n  d_hidden: 30\n  activation: sigmoid\n\
             sparsity:\n  penalty: kl\n  target: 0.1\n  weight: 0.1\ntrain:\n  epochs: 3\n  batch_size: 50\n"
        ))
        .train();
    let run_s = run.path();
    let z = dir.path().join("z.npy");
    run.apply("encode", &x, &z, &[]);
    let json = sae_ok(&[
        "eval", "--model", run_s, "--data", &x, "--json", "--target", "0.1",
    ]);
    let jp = dir.path().join("eval.json");
    std::fs::write(&jp, &json).unwrap();
    let out = py(
        r#"
import sys, json, numpy as np
z = np.load(sys.argv[1]).astype(np.float64); e = json.load(open(sys.argv[2]))
q = np.clip(z.mean(0), 1e-6, 1 - 1e-6); p = 0.1
kl = (p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))).sum()
freq = (z > 0.5).mean(0)   # sigmoid codes count as active above 0.5
edges = [10.0 ** k for k in range(-6, 1)]
hist = [int((freq == 0).sum())] + [int(((freq >= lo) & (freq < hi)).sum()) for lo, hi in zip(edges[:-1], edges[1:])]
hist[1] += int(((freq > 0) & (freq < 1e-6)).sum()); hist[-1] += int((freq == 1).sum())
print(json.dumps({
  "dmean": float(np.abs(np.array(e["mean_activation"]) - z.mean(0)).max()),
  "dfreq": float(np.abs(np.array(e["firing_frequency"]) - freq).max()),
  "kl": [e["kl_to_target"], kl],
  "l0": [e["l0"], float((z > 0.5).sum(1).mean())],
  "hist": [[b["count"] for b in e["firing_histogram"]], hist],
}))
"#,
        &[z.to_str().unwrap(), jp.to_str().unwrap()],
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    println!("{v}");
    assert!(v["dmean"].as_f64().unwrap() < 1e-6);
    assert!(v["dfreq"].as_f64().unwrap() < 1e-9);
    let pair = |k: &str| (v[k][0].as_f64().unwrap(), v[k][1].as_f64().unwrap());
    let (a, b) = pair("kl");
    assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "kl {a} vs {b}");
    let (a, b) = pair("l0");
    assert!((a - b).abs() < 1e-9, "l0 {a} vs {b}");
    assert_eq!(v["hist"][0], v["hist"][1], "firing histogram");
    // The readable table names the same metrics.
    let table = sae_ok(&["eval", "--model", run_s, "--data", &x]);
    for key in EVAL_METRICS.into_iter().chain(["kl_to_target"]) {
        assert!(table.contains(key), "table lacks {key}:\n{table}");
    }
}
