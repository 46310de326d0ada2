//! `sae latents` and the pages: statistics and top rows equal numpy on the
//! codes `sae encode` writes (several chunks merged, dead and rarely active
//! latents), and `index.html` / `report.html` rendered in headless Chromium
//! from `file://` (DOM, console, screenshot, open time at 16,384 latents).
//!
//! The browser checks need Debian's `chromium`: installed here when missing
//! and this runs as root; under SAE_REQUIRE_BROWSER=1 (`make test`) its
//! absence fails the tests, otherwise they say loudly that they did not run.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

/// numpy's reference: per latent, the active rows ordered by (value desc,
/// row asc) via lexsort, -1 / 0 padding; statistics; decoder norms and
/// nearest cosines; the band samples (per third of the max |code|, the rows
/// with the smallest SplitMix64 hash of row * h + latent, by value desc).
/// Asserts equality with DIR's files and prints the reference top rows and
/// samples as JSON. argv: codes.npy DIR top model.safetensors rule
const NUMPY_CHECK: &str = r#"
import json, os, sys
import numpy as np
from safetensors.numpy import load_file
codes, out, top, model, rule = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
Z = np.load(codes)
n, h = Z.shape
act = Z > 0 if rule == "positive" else Z != 0
ref_rows = -np.ones((h, top), dtype=np.int64)
ref_vals = np.zeros((h, top), dtype=np.float32)
for j in range(h):
    idx = np.nonzero(act[:, j])[0]
    order = np.lexsort((idx, -Z[idx, j]))
    sel = idx[order][:top]
    ref_rows[j, :len(sel)] = sel
    ref_vals[j, :len(sel)] = Z[sel, j]
rows = np.load(f"{out}/top_rows.npy")
vals = np.load(f"{out}/top_values.npy")
assert rows.dtype == np.int64 and rows.shape == (h, top), (rows.dtype, rows.shape)
assert vals.dtype == np.float32 and vals.shape == (h, top), (vals.dtype, vals.shape)
bad = np.nonzero((rows != ref_rows).any(1))[0]
assert len(bad) == 0, f"top rows differ for latents {bad[:10]}: {rows[bad[0]]} vs numpy {ref_rows[bad[0]]}"
assert np.array_equal(vals, ref_vals), "top values differ"
t = np.genfromtxt(f"{out}/latents.csv", delimiter=",", names=True)
assert list(t.dtype.names) == ["id", "frequency", "mean_activation", "max_activation",
    "decoder_norm", "nearest_cosine", "nearest_latent", "dead"], t.dtype.names
assert np.array_equal(t["id"], np.arange(h))
freq = act.mean(0)
assert np.abs(t["frequency"] - freq).max() < 1e-12
mean = Z.astype(np.float64).mean(0)
assert np.allclose(t["mean_activation"], mean, rtol=1e-6, atol=1e-9)
assert np.array_equal(t["max_activation"].astype(np.float32), Z.max(0))
assert np.array_equal(t["dead"].astype(bool), freq == 0)
W = load_file(model)["W_dec"].astype(np.float64)
norm = np.linalg.norm(W, axis=1)
assert np.allclose(t["decoder_norm"], norm, rtol=1e-5, atol=1e-6)
U = W / norm[:, None]
C = U @ U.T
np.fill_diagonal(C, -np.inf)
assert np.allclose(t["nearest_cosine"], C.max(1), atol=1e-5)
near = t["nearest_latent"].astype(int)
assert np.allclose(C[np.arange(h), near], C.max(1), atol=1e-5)
samples = None
if os.path.exists(f"{out}/sample_rows.npy"):
    srows = np.load(f"{out}/sample_rows.npy")
    svals = np.load(f"{out}/sample_values.npy")
    per = srows.shape[2]
    assert srows.dtype == np.int64 and srows.shape == (h, 3, per), (srows.dtype, srows.shape)
    assert svals.dtype == np.float32 and svals.shape == (h, 3, per), (svals.dtype, svals.shape)
    def mix(x):
        with np.errstate(over="ignore"):
            z = x.astype(np.uint64)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            return (z ^ (z >> np.uint64(31))).view(np.int64)
    A = np.abs(Z).astype(np.float32)
    samples = []
    for j in range(h):
        idx = np.nonzero(act[:, j])[0]
        m = A[idx, j].max() if len(idx) else np.float32(0)
        band = np.clip(np.ceil((A[idx, j] * np.float32(3)) / np.float32(m)), 1, 3).astype(int) if len(idx) else idx
        got = []
        for b in range(3):
            sel = idx[band == b + 1]
            keys = mix(sel * h + j)
            sel = sel[np.argsort(keys, kind="stable")][:per]
            sel = sel[np.lexsort((sel, -Z[sel, j]))]
            want = -np.ones(per, dtype=np.int64)
            want[:len(sel)] = sel
            assert np.array_equal(srows[j, b], want), f"latent {j} band {b + 1}: {srows[j, b]} vs numpy {want}"
            v = Z[sel, j]
            assert np.array_equal(svals[j, b, :len(sel)], v) and (svals[j, b, len(sel):] == 0).all()
            # In the band: ((b) m / 3, (b + 1) m / 3] of the max |code|.
            a = np.abs(v).astype(np.float64)
            assert ((a > b * float(m) / 3 - 1e-6) & (a <= (b + 1) * float(m) / 3 + 1e-6)).all(), (j, b, a, m)
            got.append(sel.tolist())
        samples.append(got)
dead = int((freq == 0).sum())
partial = int(((ref_rows == -1).any(1) & (freq > 0)).sum())
print(json.dumps({"dead": dead, "partial": partial, "rows": n, "top": ref_rows.tolist(), "samples": samples}))
"#;

/// Makes latent 0 dead and latent 1 active on exactly `rare` rows of X by
/// moving their encoder biases (a ReLU model, normalize: none).
/// argv: model.safetensors X.npy OUT.safetensors rare
const DEAD_AND_RARE: &str = r#"
import sys
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
src, x, dst, rare = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with safe_open(src, "np") as f:
    meta = f.metadata()
    t = {k: f.get_tensor(k) for k in f.keys()}
X = np.load(x).astype(np.float64)
pre = (X - t["b_dec"]) @ t["W_enc"].astype(np.float64) + t["b_enc"]
b = t["b_enc"].copy()
b[0] = -1e6
s = np.sort(pre[:, 1])[::-1]
b[1] -= (s[rare - 1] + s[rare]) / 2
t["b_enc"] = b.astype(t["b_enc"].dtype)
save_file(t, dst, metadata=meta)
"#;

/// A small ReLU model on synthetic data with `d_in` columns (not a square,
/// so rows show as text): (tempdir, X.npy, model.safetensors with latent 0
/// dead and latent 1 active on 5 rows).
fn relu_fixture(rows: usize, d_in: usize, d_hidden: usize) -> (tempfile::TempDir, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = synth(dir.path(), rows, d_in, 40, 3);
    let run = Case::new(dir.path(), "relu")
        .yaml(format!(
            "seed: 1\ndata: {{train: {x}}}\nmodel: {{d_hidden: {d_hidden}, activation: relu}}\n\
             sparsity: {{penalty: l1, weight: 0.001}}\ntrain: {{epochs: 2, batch_size: 128}}\n"
        ))
        .train();
    let model = dir.path().join("model.safetensors").display().to_string();
    py(
        DEAD_AND_RARE,
        &[
            run.join("model.safetensors").to_str().unwrap(),
            &x,
            &model,
            "5",
        ],
    );
    (dir, x, model)
}

/// `sae encode` codes (same chunking) and `sae latents`, then the numpy
/// check; returns its JSON.
fn latents_vs_numpy(
    dir: &Path,
    model: &str,
    weights: &str,
    x: &str,
    name: &str,
    extra: &[&str],
    rule: &str,
) -> serde_json::Value {
    // --labels is for `sae latents` only.
    let (labels, extra): (Vec<&str>, Vec<&str>) = match extra.iter().position(|a| *a == "--labels")
    {
        Some(i) => (
            extra[i..i + 2].to_vec(),
            [&extra[..i], &extra[i + 2..]].concat(),
        ),
        None => (vec![], extra.to_vec()),
    };
    let codes = dir.join(format!("{name}_codes.npy"));
    let out = dir.join(name);
    let mut enc = vec!["--batch-size", "64"];
    enc.extend_from_slice(&extra);
    apply("encode", model, x, &codes, &enc);
    let out_s = out.to_str().unwrap();
    let mut args = vec![
        "latents",
        "--model",
        model,
        "--data",
        x,
        "--out",
        out_s,
        "--top",
        "10",
        "--chunk-rows",
        "64",
        "-q",
    ];
    args.extend_from_slice(&extra);
    args.extend_from_slice(&labels);
    sae_ok(&args);
    let v: serde_json::Value = serde_json::from_str(
        py(
            NUMPY_CHECK,
            &[codes.to_str().unwrap(), out_s, "10", weights, rule],
        )
        .trim(),
    )
    .unwrap();
    v
}

#[test]
fn latents_equal_numpy_over_many_chunks() {
    let (dir, x, model) = relu_fixture(3000, 24, 48);
    // 3000 rows in chunks of 64: 47 merges of the running top-10.
    let v = latents_vs_numpy(dir.path(), &model, &model, &x, "own", &[], "positive");
    assert!(v["dead"].as_i64().unwrap() >= 1, "{v}");
    assert!(v["partial"].as_i64().unwrap() >= 1, "{v}");
    let top1: Vec<i64> = serde_json::from_value(v["top"][1].clone()).unwrap();
    assert_eq!(top1.iter().filter(|&&r| r >= 0).count(), 5, "{top1:?}");
    assert!(v["top"][0].as_array().unwrap().iter().all(|r| r == -1));
    println!(
        "own encoder: {} dead, {} partly padded",
        v["dead"], v["partial"]
    );
    // A pursuit encoder: signed codes, active where non-zero.
    let v = latents_vs_numpy(
        dir.path(),
        &model,
        &model,
        &x,
        "omp",
        &["--encoder", "omp", "--k", "3"],
        "nonzero",
    );
    println!(
        "omp k=3: {} dead, {} partly padded",
        v["dead"], v["partial"]
    );
}

#[test]
fn latents_bad_input_is_one_line() {
    let (dir, x, model) = relu_fixture(300, 24, 16);
    let out = dir.path().join("o");
    let out = out.to_str().unwrap();
    let base = ["latents", "--model", &model, "--data", &x, "--out", out];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter()
            .chain(extra.iter())
            .map(|s| s.to_string())
            .collect()
    };
    let run = |extra: &[&str], needles: &[&str]| {
        let args = with(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        expect_user_error(&args, needles);
    };
    run(
        &["--image-shape", "5x5"],
        &["--image-shape 5x5", "d_in is 24"],
    );
    run(&["--image-shape", "wide"], &["--image-shape wide", "HxW"]);
    run(&["--top", "0"], &["--top 0"]);
    run(&["--samples", "-1"], &["--samples -1"]);
    let labels = dir.path().join("labels.txt");
    std::fs::write(&labels, "a\nb\nc\n").unwrap();
    run(
        &["--labels", labels.to_str().unwrap()],
        &["--labels", "3 lines", "300 rows"],
    );
    run(&["--k", "3"], &["--k"]);
    std::fs::create_dir(dir.path().join("n")).unwrap();
    let (narrow, _) = synth(&dir.path().join("n"), 50, 7, 8, 2);
    expect_user_error(
        &[
            "latents", "--model", &model, "--data", &narrow, "--out", out,
        ],
        &["7 columns", "d_in is 24"],
    );
    assert!(!Path::new(out).exists(), "a failed run left {out}");
}

// ---------------------------------------------------------------- browser

/// Debian's chromium: found, or installed (root, apt-get) once per test binary.
fn find_or_install_chromium() -> Option<PathBuf> {
    let found = || {
        ["chromium", "chromium-browser", "/usr/bin/chromium"]
            .iter()
            .find(|c| {
                Command::new(c)
                    .arg("--version")
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .map(PathBuf::from)
    };
    if let Some(b) = found() {
        return Some(b);
    }
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("chromium is not installed and this is not root: cannot apt-get install it");
        return None;
    }
    eprintln!("installing chromium (apt-get update && apt-get install -y chromium) ...");
    let ok = Command::new("sh")
        .args([
            "-c",
            "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium",
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("apt-get install chromium failed");
    }
    found()
}

/// The browser, or None with a loud NOT RUN line; under
/// SAE_REQUIRE_BROWSER=1 a missing browser fails the test.
fn browser(test: &str) -> Option<PathBuf> {
    static B: OnceLock<Option<PathBuf>> = OnceLock::new();
    let b = B.get_or_init(find_or_install_chromium).clone();
    if b.is_none() {
        let msg = format!(
            "{test}: headless Chromium is not available (Debian: apt-get install chromium); \
             the browser checks were NOT RUN"
        );
        if std::env::var("SAE_REQUIRE_BROWSER").as_deref() == Ok("1") {
            panic!("{msg} (SAE_REQUIRE_BROWSER=1)");
        }
        eprintln!("SKIPPED (NOT RUN): {msg}");
    }
    b
}

struct Rendered {
    dom: String,
    log: String,
    seconds: f64,
}

fn chromium(browser: &Path, page: &Path, hash: &str, extra: &[String]) -> (String, String, f64) {
    let profile = tempfile::tempdir().unwrap();
    let url = format!("file://{}{hash}", page.canonicalize().unwrap().display());
    let started = Instant::now();
    let out = Command::new("timeout")
        .arg("180")
        .arg(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=10000",
            &format!("--user-data-dir={}", profile.path().display()),
        ])
        .args(extra)
        .arg(&url)
        .output()
        .expect("running chromium");
    let seconds = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "chromium {url} failed ({}):\n{}",
        out.status,
        stderr(&out)
    );
    (stdout(&out), stderr(&out), seconds)
}

/// Loads `page` (with `hash`) and returns its rendered DOM, asserting that
/// the script ran to the end and reported no error on the console or in
/// `#errors`.
fn render(browser: &Path, page: &Path, hash: &str) -> Rendered {
    let (dom, log, seconds) = chromium(browser, page, hash, &["--dump-dom".to_string()]);
    let console: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(":CONSOLE") || l.contains("Uncaught"))
        .collect();
    assert!(
        console.is_empty(),
        "{}: console output:\n{}",
        page.display(),
        console.join("\n")
    );
    assert!(
        dom.contains(r#"<pre id="errors" hidden=""></pre>"#),
        "{}: the page reported errors:\n{}",
        page.display(),
        between(&dom, r#"<pre id="errors""#, "</pre>").unwrap_or_default()
    );
    assert!(
        dom.contains(r#"data-ready="1""#),
        "{}: the page's script did not finish",
        page.display()
    );
    Rendered { dom, log, seconds }
}

/// A screenshot of `page`: a PNG that is not blank (many colours).
fn screenshot(browser: &Path, page: &Path, hash: &str, png: &Path, size: &str) {
    chromium(
        browser,
        page,
        hash,
        &[
            format!("--screenshot={}", png.display()),
            format!("--window-size={size}"),
            "--hide-scrollbars".to_string(),
        ],
    );
    let decoder = png::Decoder::new(std::fs::File::open(png).expect("the screenshot"));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let px = info.color_type.samples();
    let colours: std::collections::HashSet<&[u8]> = buf[..info.buffer_size()].chunks(px).collect();
    assert!(
        colours.len() > 50,
        "{}: screenshot looks blank ({} colours)",
        png.display(),
        colours.len()
    );
    println!(
        "screenshot {} ({}x{}, {} colours)",
        png.display(),
        info.width,
        info.height,
        colours.len()
    );
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let i = s.find(start)? + start.len();
    let j = s[i..].find(end)? + i;
    Some(&s[i..j])
}

/// Number of latent rows in the table and the total the page says match.
fn table_counts(dom: &str) -> (usize, usize) {
    let rows = dom.matches(r#"<tr class="lat"#).count();
    let total = between(dom, r#"<span id="count">"#, "</span>")
        .expect("#count")
        .parse()
        .unwrap();
    (rows, total)
}

/// The opened card's latent and its top rows.
fn card_rows(dom: &str) -> (i64, Vec<i64>) {
    let latent = between(dom, r#"data-latent=""#, "\"")
        .expect("an opened card")
        .parse()
        .unwrap();
    let rows = between(dom, r#"data-top-rows=""#, "\"")
        .unwrap()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    (latent, rows)
}

fn numpy_top(v: &serde_json::Value, j: usize) -> Vec<i64> {
    let all: Vec<i64> = serde_json::from_value(v["top"][j].clone()).unwrap();
    all.into_iter().filter(|&r| r >= 0).collect()
}

#[test]
fn dashboard_renders_in_chromium_with_labels() {
    let Some(b) = browser("dashboard_renders_in_chromium_with_labels") else {
        return;
    };
    let (dir, x, model) = relu_fixture(3000, 24, 48);
    let labels = dir.path().join("labels.txt");
    let text: String = (0..3000)
        .map(|i| format!("tok{} <ctx> & \"{}\"\n", i % 7, i))
        .collect();
    std::fs::write(&labels, text).unwrap();
    let v = latents_vs_numpy(
        dir.path(),
        &model,
        &model,
        &x,
        "page",
        &["--labels", labels.to_str().unwrap()],
        "positive",
    );
    let page = dir.path().join("page/index.html");
    // Latent 1 fires on 5 rows; latent 7 on many; latent 0 never.
    for j in [1usize, 7, 0] {
        let r = render(&b, &page, &format!("#latent={j}"));
        assert_eq!(table_counts(&r.dom), (48, 48));
        let (latent, rows) = card_rows(&r.dom);
        assert_eq!(latent, j as i64);
        assert_eq!(rows, numpy_top(&v, j), "latent {j}: top rows vs numpy");
        // Plain labels (no markers) are their own top tokens.
        if let Some(row) = rows.first() {
            let tr = between(&r.dom, &format!("data-id=\"{j}\">"), "</tr>").unwrap();
            let tok = format!(
                "<span class=\"tok\">tok{} &lt;ctx&gt; &amp; \"{row}\"</span>",
                row % 7
            );
            assert!(
                tr.contains(&tok),
                "latent {j}: no top token `{tok}` in {tr}"
            );
        }
        for row in &rows {
            // The label text, escaped, beside each top row.
            let want = format!("tok{} &lt;ctx&gt; &amp; \"{row}\"", row % 7);
            assert!(r.dom.contains(&want), "latent {j}: no label `{want}`");
        }
        println!(
            "latent {j}: {} top rows as numpy; {:.1} s",
            rows.len(),
            r.seconds
        );
    }
    // Filtered and sorted from the address: the dead latents only; all
    // latents by frequency, rarest first.
    let r = render(&b, &page, "#dead=dead&latent=0");
    let dead = v["dead"].as_u64().unwrap() as usize;
    assert_eq!(table_counts(&r.dom), (dead, dead));
    assert!(r.dom.contains(r#"<tr class="lat dead open" data-id="0">"#));
    let r = render(&b, &page, "#sort=freq-asc");
    let first = between(&r.dom, r#"<tr class="lat"#, ">");
    assert_eq!(
        first,
        Some(r#" dead" data-id="0""#),
        "the rarest latent (dead, lowest id) first"
    );
    screenshot(
        &b,
        &page,
        "#latent=7",
        &dir.path().join("page.png"),
        "1400,1000",
    );
}

#[test]
fn digits_dashboard_shows_image_tiles() {
    let Some(b) = browser("digits_dashboard_shows_image_tiles") else {
        return;
    };
    if !sklearn_available("digits_dashboard_shows_image_tiles") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let data = dir.path().join("data");
    py_file(root.join("scripts/digits.py"), &[data.to_str().unwrap()]);
    let run = Case::new(dir.path(), "digits")
        .config(root.join("configs/digits.yaml"))
        .sets([
            format!("data.train={}", data.join("digits_train.npy").display()),
            format!("data.valid={}", data.join("digits_valid.npy").display()),
            "train.epochs=10".to_string(),
            "train.dead_window=100".to_string(),
        ])
        .train();
    let x = data.join("digits_train.npy");
    let x = x.to_str().unwrap();
    let weights = run.join("model.safetensors");
    let weights = weights.to_str().unwrap();
    let v = latents_vs_numpy(
        dir.path(),
        run.path(),
        weights,
        x,
        "latents",
        &[],
        "positive",
    );
    let page = dir.path().join("latents/index.html");
    let live = (0..512)
        .find(|&j| numpy_top(&v, j).len() == 10)
        .expect("a latent with 10 top rows");
    let r = render(&b, &page, &format!("#latent={live}"));
    assert_eq!(table_counts(&r.dom), (100, 512));
    let (latent, rows) = card_rows(&r.dom);
    assert_eq!((latent, &rows), (live as i64, &numpy_top(&v, live)));
    // Each top row a tile (a canvas), plus the decoder row's picture.
    let card = between(&r.dom, "latentcard", "<script").unwrap();
    let top_tiles = between(card, "Top 10 rows", "Samples by activation band").unwrap();
    assert_eq!(
        top_tiles.matches(r#"<div class="tile" data-row="#).count(),
        10
    );
    // The band samples as tiles too, as numpy chose them.
    let mut sampled = 0;
    for band in 1..=3 {
        let rows: Vec<i64> = serde_json::from_value(v["samples"][live][band - 1].clone()).unwrap();
        let rows: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
        let attr = format!("data-band=\"{band}\" data-rows=\"{}\"", rows.join(","));
        assert!(card.contains(&attr), "latent {live}: no `{attr}`");
        sampled += rows.len();
    }
    assert_eq!(
        card.matches(r#"<div class="tile" data-row="#).count(),
        10 + sampled
    );
    assert!(
        card.matches("<canvas").count() >= 12 + sampled,
        "tiles, samples, decoder, histogram"
    );
    screenshot(
        &b,
        &page,
        &format!("#latent={live}"),
        &dir.path().join("digits.png"),
        "1400,1000",
    );
    // The run's report: image tiles of originals and reconstructions.
    let r = render(&b, &run.join("report.html"), "");
    assert_eq!(r.dom.matches(r#"<div class="tile sample">"#).count(), 8);
    assert!(r.dom.contains(r#"<canvas id="pca""#));
    assert_eq!(
        r.dom.matches("<img src=\"data:image/png;base64,").count(),
        3
    );
}

#[test]
fn report_html_renders_after_training() {
    let Some(b) = browser("report_html_renders_after_training") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = synth(dir.path(), 2000, 24, 40, 3);
    let run = Case::new(dir.path(), "run")
        .yaml(format!(
            "seed: 0\ndata: {{train: {x}, valid_fraction: 0.2}}\nmodel: {{d_hidden: 64, activation: topk, k: 4}}\n\
             sparsity: {{penalty: none}}\ntrain: {{epochs: 2, batch_size: 128}}\n\
             eval: {{encoder: omp, k: 4}}\n"
        ))
        .train();
    let page = run.join("report.html");
    assert!(page.is_file(), "no report.html in {}", run.path());
    let r = render(&b, &page, "");
    // Vectors: one overlaid line plot per sample row.
    assert_eq!(r.dom.matches(r#"<div class="tile sample">"#).count(), 8);
    assert!(r.dom.contains("latent dashboard") || r.dom.contains("sae latents --model"));
    assert!(r.dom.contains("<td>fvu</td>"));
    assert!(
        r.dom.contains("<th>valid (omp, k 4)</th>"),
        "the pursuit metrics"
    );
    println!("report.html rendered in {:.1} s", r.seconds);
    let _ = r.log;
    screenshot(&b, &page, "", &dir.path().join("report.png"), "1300,1600");
}

#[test]
fn page_with_16384_latents_opens_in_seconds() {
    let Some(b) = browser("page_with_16384_latents_opens_in_seconds") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = synth(dir.path(), 4000, 24, 40, 3);
    let run = Case::new(dir.path(), "wide")
        .yaml(format!(
            "seed: 0\ndata: {{train: {x}}}\nmodel: {{d_hidden: 16384, activation: topk, k: 8}}\n\
             sparsity: {{penalty: none}}\ntrain: {{epochs: 1, batch_size: 1000}}\n"
        ))
        .train();
    let out = dir.path().join("latents");
    let started = Instant::now();
    sae_ok(&[
        "latents",
        "--model",
        run.path(),
        "--data",
        &x,
        "--out",
        out.to_str().unwrap(),
        "-q",
    ]);
    let made = started.elapsed().as_secs_f64();
    let page = out.join("index.html");
    let size = std::fs::metadata(&page).unwrap().len();
    let r = render(&b, &page, "#latent=16000");
    assert_eq!(table_counts(&r.dom), (100, 16384));
    assert_eq!(card_rows(&r.dom).0, 16000);
    let in_page: f64 = between(&r.dom, r#"data-ready-ms=""#, "\"")
        .unwrap()
        .parse()
        .unwrap();
    println!(
        "16384 latents: page {:.1} MB written in {made:.1} s; chromium load + render {:.1} s \
         (script done {:.0} ms after navigation)",
        size as f64 / 1e6,
        r.seconds,
        in_page
    );
    assert!(
        r.seconds < 20.0,
        "the 16,384-latent page took {:.1} s",
        r.seconds
    );
    // The same with text labels (a token in context per row): top tokens,
    // labels of top rows and samples in the page, a search from the address.
    let labels = dir.path().join("labels.txt");
    let text: String = (0..4000)
        .map(|i| {
            format!(
                "said the man in w{} of the house\u{27E6} t{}\u{27E7} and then some more words\n",
                i % 31,
                i % 97
            )
        })
        .collect();
    std::fs::write(&labels, text).unwrap();
    let out = dir.path().join("text");
    let started = Instant::now();
    sae_ok(&[
        "latents",
        "--model",
        run.path(),
        "--data",
        &x,
        "--out",
        out.to_str().unwrap(),
        "--labels",
        labels.to_str().unwrap(),
        "-q",
    ]);
    let made = started.elapsed().as_secs_f64();
    let page = out.join("index.html");
    let size = std::fs::metadata(&page).unwrap().len();
    let r = render(&b, &page, "#q=T42%20AND&latent=16000");
    let (shown, matching) = table_counts(&r.dom);
    assert!(matching > 0 && matching < 16384 && shown == matching.min(100));
    assert_eq!(card_rows(&r.dom).0, 16000);
    let in_page: f64 = between(&r.dom, r#"data-ready-ms=""#, "\"")
        .unwrap()
        .parse()
        .unwrap();
    println!(
        "16384 latents, text labels: page {:.1} MB written in {made:.1} s; chromium load + \
         render with a search ({matching} latents match) {:.1} s (script done {:.0} ms)",
        size as f64 / 1e6,
        r.seconds,
        in_page
    );
    assert!(
        r.seconds < 20.0,
        "the 16,384-latent text page took {:.1} s",
        r.seconds
    );
}

/// Rows of text (a token in its context, marked with ⟦ ⟧), the data's
/// second half a copy of its first (repeated text: equal codes and labels,
/// so the top rows come in pairs): the top-tokens column, the search from
/// `#q=`, the marked token escaped in the card, duplicates shown once with
/// a count, the band samples (numpy-checked) in the card, and no input
/// dimensions or image (d_in 16 is square, but these rows are text).
#[test]
fn text_dashboard_marks_tokens_searches_and_samples_bands() {
    let Some(b) = browser("text_dashboard_marks_tokens_searches_and_samples_bands") else {
        return;
    };
    let (dir, x1, model) = relu_fixture(1500, 16, 32);
    let x = dir.path().join("x2.npy");
    let x = x.to_str().unwrap();
    py(
        "import sys, numpy as np\nX = np.load(sys.argv[1])\nnp.save(sys.argv[2], np.concatenate([X, X]))",
        &[&x1, x],
    );
    let label = |i: usize| {
        let k = i % 1500;
        format!("ctx{k}. the <b>&\"quick\u{27E6} w{}\u{27E7} jumps", k % 7)
    };
    let labels = dir.path().join("labels.txt");
    let text: String = (0..3000).map(|i| label(i) + "\n").collect();
    std::fs::write(&labels, text).unwrap();
    let v = latents_vs_numpy(
        dir.path(),
        &model,
        &model,
        x,
        "text",
        &["--labels", labels.to_str().unwrap()],
        "positive",
    );
    let page = dir.path().join("text/index.html");
    let j = (2..32)
        .find(|&j| numpy_top(&v, j).len() == 10)
        .expect("a latent with 10 top rows");
    let top = numpy_top(&v, j);
    let r = render(&b, &page, &format!("#latent={j}"));
    assert_eq!(table_counts(&r.dom), (32, 32));
    assert_eq!(card_rows(&r.dom), (j as i64, top.clone()));

    // The top-tokens column: distinct tokens, most frequent first, counts.
    let mut toks: Vec<(String, usize)> = Vec::new();
    for &row in &top {
        let t = format!(" w{}", (row as usize % 1500) % 7);
        match toks.iter_mut().find(|(s, _)| *s == t) {
            Some(e) => e.1 += 1,
            None => toks.push((t, 1)),
        }
    }
    toks.sort_by_key(|e| std::cmp::Reverse(e.1));
    toks.truncate(5);
    let cell: String = toks
        .iter()
        .map(|(t, c)| {
            let n = if *c > 1 {
                format!("<span class=\"n\">\u{d7}{c}</span>")
            } else {
                String::new()
            };
            format!("<span class=\"tok\">{t}</span>{n}")
        })
        .collect();
    let tr = between(&r.dom, &format!("data-id=\"{j}\">"), "</tr>").unwrap();
    assert!(
        tr.contains(&format!("<td class=\"toks\">{cell}</td>")),
        "latent {j}: top tokens {toks:?} not in its table row: {tr}"
    );

    // The card: the marked token highlighted in its escaped context; the
    // pairs of identical labels once each, with ×2.
    let card = between(&r.dom, "id=\"latentcard\"", "<script").unwrap();
    let k = top[0] as usize % 1500;
    let want = format!(
        "<span class=\"text\">ctx{k}. the &lt;b&gt;&amp;\"quick<mark class=\"act\"> w{}</mark> jumps</span>",
        k % 7
    );
    assert!(card.contains(&want), "latent {j}: no `{want}` in the card");
    let distinct: std::collections::BTreeSet<String> =
        top.iter().map(|&r| label(r as usize)).collect();
    assert!(
        distinct.len() < top.len(),
        "repeated text among the top rows"
    );
    let list = between(card, "<ol class=\"toprows\">", "</ol>").unwrap();
    assert_eq!(list.matches("<li ").count(), distinct.len(), "{list}");
    assert!(list.contains("data-count=\"2\"") && list.contains("\u{d7}2"));
    // Text: the decoder's norm and nearest latent, no input dimensions, no
    // picture (the one canvas is the activation histogram).
    assert!(card.contains("nearest latent") && !card.contains("input dimensions"));
    assert_eq!(card.matches("<canvas").count(), 1);
    // The band samples, as numpy chose them, top band first.
    let samples = &v["samples"][j];
    for band in (1..=3).rev() {
        let rows: Vec<i64> = serde_json::from_value(samples[band - 1].clone()).unwrap();
        let rows: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
        let attr = format!("data-band=\"{band}\" data-rows=\"{}\"", rows.join(","));
        assert!(card.contains(&attr), "latent {j}: no `{attr}` in the card");
    }
    let lower = (0..32)
        .filter(|&i| !v["samples"][i][0].as_array().unwrap().is_empty())
        .count();
    assert!(
        lower > 10,
        "only {lower} latents have samples in their lowest band"
    );
    println!("latent {j}: tokens {toks:?}; {lower} latents sampled in their lowest band");

    // Search from the address, case-insensitive, over the top rows' labels
    // (the markers do not split the text).
    let hits = |f: &dyn Fn(usize) -> bool| -> Vec<usize> {
        (0..32)
            .filter(|&i| numpy_top(&v, i).iter().any(|&r| f(r as usize % 1500)))
            .collect()
    };
    let w = (k % 7 + 3) % 7;
    for (q, want) in [
        (format!("CTX{k}.%20The"), hits(&|r| r == k)),
        (format!("quick%20W{w}"), hits(&|r| r % 7 == w)),
    ] {
        let r = render(&b, &page, &format!("#q={q}&latent={j}"));
        let got: Vec<usize> = r
            .dom
            .match_indices("<tr class=\"lat")
            .map(|(i, _)| {
                between(&r.dom[i..], "data-id=\"", "\"")
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect::<std::collections::BTreeSet<usize>>()
            .into_iter()
            .collect();
        assert_eq!(got, want, "#q={q}");
        assert_eq!(table_counts(&r.dom), (want.len(), want.len()));
        assert!(!want.is_empty() && want.len() < 32, "#q={q}: {want:?}");
        println!("#q={q}: {} latents", want.len());
    }
    screenshot(
        &b,
        &page,
        &format!("#latent={j}"),
        &dir.path().join("text.png"),
        "1400,1200",
    );
}
