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

/// `sae sweep --config CONFIG --out OUT FLAG 2 EXTRA...` (FLAG: --jobs or -j).
fn sweep_jobs(config: &str, out: &Path, flag: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "sweep",
        "--config",
        config,
        "--out",
        out.to_str().unwrap(),
        flag,
        "2",
    ];
    args.extend_from_slice(extra);
    sae(&args)
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

/// A sweep config over `grid` with an inline base config training on `x`.
fn inline_sweep(dir: &Path, name: &str, x: &str, extra_train: &str, grid: &str) -> String {
    write_config(
        dir,
        name,
        &format!(
            "base:\n  device: cpu\n  seed: 3\n  data:\n    train: {x}\n    valid_fraction: 0.2\n  \
             model:\n    d_hidden: 24\n  sparsity:\n    penalty: l1\n  \
             train:\n    epochs: 2\n    batch_size: 50\n    log_every: 5\n{extra_train}grid:\n{grid}"
        ),
    )
}

/// sweep.csv without the wall-time column.
fn csv_without_seconds(out: &Path) -> Vec<Vec<String>> {
    let csv = std::fs::read_to_string(out.join("sweep.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let secs = header.iter().position(|h| *h == "seconds").unwrap();
    let cells = |l: &str| -> Vec<String> {
        l.split(',')
            .enumerate()
            .filter(|(i, _)| *i != secs)
            .map(|(_, c)| c.to_string())
            .collect()
    };
    std::iter::once(cells(&header.join(",")))
        .chain(lines.map(cells))
        .collect()
}

#[test]
fn sweep_jobs_2_gives_the_results_of_jobs_1() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, _) = synth(d, 600, 12, 16, 2);
    // Fixed thread count: both sweeps then do the same floating-point work.
    let sweep = inline_sweep(
        d,
        "sweep.yaml",
        &x,
        "    threads: 1\n",
        "  sparsity.weight: [0.001, 0.01, 0.1]\n",
    );
    let (one, two) = (d.join("one"), d.join("two"));
    let started = std::time::Instant::now();
    sae_ok(&["sweep", "--config", &sweep, "--out", one.to_str().unwrap()]);
    let t1 = started.elapsed().as_secs_f64();
    let started = std::time::Instant::now();
    let o = sweep_jobs(&sweep, &two, "--jobs", &[]);
    let t2 = started.elapsed().as_secs_f64();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    println!("3 points: --jobs 1 {t1:.1} s, --jobs 2 {t2:.1} s\n{err}");
    assert_eq!(err.matches(": training").count(), 3, "{err}");
    assert_eq!(err.matches(" s\n").count(), 3, "finish lines:\n{err}");
    let rows = csv_without_seconds(&one);
    assert_eq!(rows.len(), 4);
    assert_eq!(rows, csv_without_seconds(&two), "sweep.csv differs");
    let run_col = rows[0].iter().position(|h| h == "run").unwrap();
    for row in &rows[1..] {
        let run = &row[run_col];
        for file in ["model.safetensors", "config.yaml"] {
            let a = std::fs::read(one.join(run).join(file)).unwrap();
            let b = std::fs::read(two.join(run).join(file)).unwrap();
            assert!(a == b, "{run}/{file} differs between --jobs 1 and 2");
        }
    }
    // The point configs written for the child processes are cleaned up.
    let hidden: Vec<_> = std::fs::read_dir(&two)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "left behind: {hidden:?}");
    // Re-running with --jobs 2 skips the finished points.
    let o = sweep_jobs(&sweep, &two, "-j", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stderr(&o).matches("[already done]").count(), 3);
}

#[test]
fn sweep_jobs_splits_the_cores_unless_threads_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, _) = synth(d, 300, 8, 10, 2);
    let cores = std::thread::available_parallelism().unwrap().get();
    let threads = |out: &Path, run: &str| -> serde_yaml::Value {
        let text = std::fs::read_to_string(out.join(run).join("config.yaml")).unwrap();
        let cfg: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        cfg["train"]["threads"].clone()
    };
    let grid = "  sparsity.weight: [0.01, 0.1]\n";
    let auto = inline_sweep(d, "auto.yaml", &x, "", grid);
    let out = d.join("auto");
    let o = sweep_jobs(&auto, &out, "--jobs", &["-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stderr(&o), "", "-q prints no progress");
    let want = serde_yaml::Value::from((cores / 2).max(1) as u64);
    for run in ["000-sparsity.weight=0.01", "001-sparsity.weight=0.1"] {
        assert_eq!(threads(&out, run), want, "{run} on {cores} cores");
    }
    // An explicit train.threads is kept, with one warning when the jobs
    // together ask for more threads than there are cores.
    let fixed = inline_sweep(
        d,
        "fixed.yaml",
        &x,
        &format!("    threads: {cores}\n"),
        grid,
    );
    let out = d.join("fixed");
    let o = sweep_jobs(&fixed, &out, "--jobs", &[]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(err.matches("warning").count(), 1, "{err}");
    assert!(err.contains("--jobs 2") && err.contains("cores"), "{err}");
    assert_eq!(
        threads(&out, "000-sparsity.weight=0.01"),
        serde_yaml::Value::from(cores as u64)
    );
    // --jobs must be a whole number of at least 1.
    for bad in ["0", "two", "-1"] {
        let o = sae(&["sweep", "--config", &auto, "--jobs", bad]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "--jobs {bad}: {err}");
        assert!(
            err.contains("--jobs") && err.contains("at least 1") && !err.contains("panicked"),
            "--jobs {bad}: {err}"
        );
    }
    let help = sae_ok(&["sweep", "--help"]);
    assert!(
        help.contains("--jobs <N>") && help.contains("cores/N"),
        "{help}"
    );
}

#[test]
fn sweep_jobs_failing_point_exits_2_naming_it_and_keeps_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, _) = synth(d, 300, 8, 10, 2);
    // model.d_in: 5 passes config validation but not the 8-column data.
    let sweep = inline_sweep(d, "sweep.yaml", &x, "", "  model.d_in: [8, 5]\n");
    let out = d.join("out");
    let o = sweep_jobs(&sweep, &out, "--jobs", &[]);
    let err = stderr(&o);
    println!("{err}");
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("[2/2] model.d_in=5: failed: model.d_in: 5 but"),
        "{err}"
    );
    let last = err.trim().lines().last().unwrap();
    assert!(
        last.starts_with("sae: error: sweep: point 2/2 model.d_in=5 failed: model.d_in: 5"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.join("000-model.d_in=8/summary.json").is_file());
    assert!(!out.join("001-model.d_in=5/summary.json").exists());
    assert!(
        !out.join("sweep.csv").exists(),
        "no table for a failed sweep"
    );
}

/// Every point's model.safetensors and metrics.jsonl in `b` are those in
/// `a`, byte for byte.
fn same_points(a: &Path, b: &Path, what: &str) {
    let rows = csv_without_seconds(a);
    let run_col = rows[0].iter().position(|h| h == "run").unwrap();
    assert!(rows.len() > 1, "{what}: no points in {}", a.display());
    for row in &rows[1..] {
        let run = &row[run_col];
        for file in ["model.safetensors", "metrics.jsonl"] {
            let (x, y) = (a.join(run).join(file), b.join(run).join(file));
            assert!(
                std::fs::read(&x).unwrap() == std::fs::read(&y).unwrap(),
                "{what}: {} and {} differ",
                x.display(),
                y.display()
            );
        }
    }
}

/// Starts `sae sweep ARGS`, waits until a point directory of `out` whose
/// name starts with `point` has a checkpoint, sends the sweep SIGINT
/// (`kill -INT`) and returns how it ended.
fn interrupt_sweep(args: &[&str], out: &Path, point: &str) -> std::process::Output {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let mut child = Command::new(sae_bin())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning sae sweep");
    let checkpointed = || {
        std::fs::read_dir(out).ok().is_some_and(|dirs| {
            dirs.flatten().any(|e| {
                e.file_name().to_string_lossy().starts_with(point)
                    && e.path().join("checkpoint/state.safetensors").exists()
            })
        })
    };
    let t0 = Instant::now();
    while !checkpointed() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the sweep ended before point {point}* had a checkpoint"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no checkpoint of {point}* after 120 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let ok = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    child.wait_with_output().unwrap()
}

/// The run directories of `out` that have a checkpoint but no summary.json.
fn stopped_points(out: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .flatten()
        .filter(|e| {
            let p = e.path();
            p.join("checkpoint/state.safetensors").exists() && !p.join("summary.json").exists()
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Ctrl-C (SIGINT) stops a sweep, `--jobs 1` or `--jobs 2`: exit 130, one
/// line per stopped point saying that re-running the sweep resumes it; the
/// same command run again resumes those points from their checkpoints and
/// trains the rest, every point ending byte-identical to an uninterrupted
/// sweep.
#[test]
fn interrupted_sweep_resumes_bit_identical_jobs_1_and_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, _) = synth(d, 2000, 8, 16, 2);
    // 2000 steps a point, a checkpoint every 25.
    let sweep = write_config(
        d,
        "sweep.yaml",
        &format!(
            "base:\n  device: cpu\n  seed: 3\n  data: {{train: {x}, valid_fraction: 0.2}}\n  \
             model: {{d_hidden: 16}}\n  sparsity: {{penalty: l1}}\n  \
             train: {{epochs: 10, batch_size: 8, log_every: 10, checkpoint_every: 25, threads: 1}}\n\
             grid:\n  sparsity.weight: [0.001, 0.01, 0.1]\n"
        ),
    );
    let reference = d.join("reference");
    let t = std::time::Instant::now();
    sae_ok(&[
        "sweep",
        "--config",
        &sweep,
        "--out",
        reference.to_str().unwrap(),
    ]);
    println!("uninterrupted sweep: {:.1} s", t.elapsed().as_secs_f64());

    for jobs in ["1", "2"] {
        let out = d.join(format!("jobs{jobs}"));
        let out_s = out.to_str().unwrap();
        let args = ["sweep", "--config", &sweep, "--out", out_s, "--jobs", jobs];
        // --jobs 1: stopped in the second point, the first finished;
        // --jobs 2: in the first two, the third not started.
        let point = if jobs == "1" { "001-" } else { "00" };
        let t = std::time::Instant::now();
        let o = interrupt_sweep(&args, &out, point);
        let err = stderr(&o);
        println!(
            "--jobs {jobs}: SIGINT after {:.1} s ->\n{err}",
            t.elapsed().as_secs_f64()
        );
        assert_eq!(o.status.code(), Some(130), "--jobs {jobs}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!err.contains("sae train --resume"), "{err}");
        let lines: Vec<&str> = err.lines().collect();
        let last = lines.last().unwrap();
        assert!(
            last.starts_with("sae: sweep interrupted by SIGINT")
                && last.contains("re-run the same `sae sweep` command"),
            "{err}"
        );
        // One line per point stopped with a checkpoint, naming it.
        let stopped = stopped_points(&out);
        let stopped_lines: Vec<&&str> = lines
            .iter()
            .filter(|l| l.starts_with("sae: [") && l.contains(": stopped "))
            .collect();
        assert!(!stopped.is_empty(), "--jobs {jobs}: no point checkpointed");
        for run in &stopped {
            let named: Vec<_> = stopped_lines.iter().filter(|l| l.contains(run)).collect();
            assert_eq!(named.len(), 1, "{run}: {err}");
            assert!(
                named[0].contains("stopped at step")
                    && named[0]
                        .contains("re-running the same `sae sweep` command resumes it from there"),
                "{err}"
            );
        }
        // Points stopped before their first checkpoint (--jobs 2: a child
        // still starting) say that they will train from the start.
        for l in &stopped_lines {
            assert!(
                stopped.iter().any(|r| l.contains(r.as_str()))
                    || l.contains("stopped before its first checkpoint"),
                "{l}"
            );
        }
        if jobs == "1" {
            assert_eq!(stopped, ["001-sparsity.weight=0.01"], "{err}");
            assert_eq!(stopped_lines.len(), 1, "{err}");
            assert!(lines[lines.len() - 2]
                .starts_with("sae: [2/3] sparsity.weight=0.01: stopped at step"));
            assert!(last.contains("1 of 3 point(s) finished"), "{err}");
            assert!(out.join("000-sparsity.weight=0.001/summary.json").is_file());
            assert!(!out.join("002-sparsity.weight=0.1").exists(), "{err}");
        } else {
            assert!(!err.contains("failed"), "{err}");
            assert!(!out.join("002-sparsity.weight=0.1").exists(), "{err}");
        }

        // The same command again: the stopped points resume, the others train.
        let t = std::time::Instant::now();
        let o = sae(&args);
        let err = stderr(&o);
        println!(
            "--jobs {jobs}: re-run in {:.1} s ->\n{err}",
            t.elapsed().as_secs_f64()
        );
        assert!(o.status.success(), "{err}");
        assert_eq!(
            err.matches(": resuming from step").count(),
            stopped.len(),
            "{err}"
        );
        same_points(
            &reference,
            &out,
            &format!("--jobs {jobs} interrupted + resumed"),
        );
        assert_eq!(csv_without_seconds(&reference), csv_without_seconds(&out));
    }
    // The point configs written for the child processes are cleaned up.
    let hidden: Vec<_> = std::fs::read_dir(d.join("jobs2"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "left behind: {hidden:?}");
}

/// `sae sweep --set key.path=value` changes the base config of every point
/// (and lands in each point's config.yaml); the grid keeps its own keys; a
/// bad --set is a one-line user error naming the key, before any training.
#[test]
fn sweep_set_overrides_the_base_config_of_every_point() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, _) = synth(d, 300, 8, 10, 2);
    let sweep = inline_sweep(d, "sweep.yaml", &x, "", "  sparsity.weight: [0.01, 0.1]\n");
    let runs = ["000-sparsity.weight=0.01", "001-sparsity.weight=0.1"];
    let (two, one) = (d.join("two"), d.join("one"));
    sae_ok(&[
        "sweep",
        "-q",
        "--config",
        &sweep,
        "--out",
        two.to_str().unwrap(),
    ]);
    let o = sae(&[
        "sweep",
        "--config",
        &sweep,
        "--out",
        one.to_str().unwrap(),
        "--set",
        "train.epochs=1",
        "--set",
        "sparsity.weight=5",
        "-q",
        "--jobs",
        "2",
    ]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    // An override of a grid key has no effect, and says so.
    assert_eq!(err.matches("warning").count(), 1, "{err}");
    assert!(
        err.contains("--set sparsity.weight=5: the grid sets"),
        "{err}"
    );
    let config = |out: &Path, run: &str| -> serde_yaml::Value {
        let text = std::fs::read_to_string(out.join(run).join("config.yaml")).unwrap();
        serde_yaml::from_str(&text).unwrap()
    };
    for (run, weight) in runs.iter().zip([0.01, 0.1]) {
        let (s2, s1) = (
            summary(&two.join(run))["steps"].as_i64().unwrap(),
            summary(&one.join(run))["steps"].as_i64().unwrap(),
        );
        assert!(
            s2 > 0 && s2 == 2 * s1,
            "{run}: {s2} steps for 2 epochs, {s1} for 1"
        );
        let cfg = config(&one, run);
        assert_eq!(cfg["train"]["epochs"].as_i64(), Some(1), "{run}");
        assert_eq!(cfg["sparsity"]["weight"].as_f64(), Some(weight), "{run}");
    }
    // A bad --set: exit 2, one line naming the key; nothing is written.
    let bad = d.join("bad");
    let bad_s = bad.to_str().unwrap();
    for (set, needles) in [
        ("train.epoks=1", ["--set train.epoks=1", "epoks"]),
        ("train.epochs=0", ["--set train.epochs=0", "train.epochs"]),
        ("train.epochs", ["--set train.epochs", "key.path=value"]),
    ] {
        expect_user_error(
            &["sweep", "--config", &sweep, "--out", bad_s, "--set", set],
            &needles,
        );
        assert!(!bad.exists(), "--set {set}: wrote {bad_s}");
    }
    let help = sae_ok(&["sweep", "--help"]);
    assert!(
        help.contains("--set <KEY.PATH=VALUE>") && help.contains("resumes"),
        "{help}"
    );
}
