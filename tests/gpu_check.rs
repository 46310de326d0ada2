//! `scripts/gpu_check.sh --dry-run`: the GPU machine's one command, run
//! here on the CPU with small sizes (the CPU stands in for CUDA), so the
//! script cannot rot between the runs on a GPU. Its table must hold every
//! row the GPU run would, each check passing (or MISSING, for a feature
//! this binary lacks, as `sae info` and the probe say).

mod common;

use std::path::Path;
use std::process::Command;

const ARCHS: [&str; 10] = [
    "relu",
    "sigmoid",
    "topk",
    "abstopk",
    "batchtopk",
    "jumprelu",
    "gated",
    "matryoshka_batchtopk",
    "matching_pursuit",
    "topk streamed",
];

#[test]
fn the_gpu_check_dry_run_writes_its_table() {
    let out = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let o = Command::new("bash")
        .arg(root.join("scripts/gpu_check.sh"))
        .arg("--dry-run")
        .env("SAE_BIN", common::sae_bin())
        .env("SAE_PYTHON", common::python())
        .env("OUT", out.path())
        .output()
        .expect("running bash");
    let log = format!("{}{}", common::stdout(&o), common::stderr(&o));
    assert!(o.status.success(), "gpu_check.sh --dry-run failed:\n{log}");
    let table = std::fs::read_to_string(out.path().join("gpu_check.md"))
        .unwrap_or_else(|e| panic!("no gpu_check.md ({e}):\n{log}"));
    let rows: Vec<Vec<&str>> = table
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| ---"))
        .map(|l| l.trim_matches('|').split(" | ").map(str::trim).collect())
        .collect();
    let find = |check: &str, case: &str| {
        rows.iter()
            .find(|r| r[0] == check && r[1].starts_with(case))
            .unwrap_or_else(|| panic!("no `{check} | {case}` row in:\n{table}"))
    };
    for arch in ARCHS {
        let r = find("arch", arch);
        assert_eq!(r[3], "ok", "{r:?}");
        // CPU against CPU: the same run twice, to the bit.
        assert!(r[2].starts_with("max rel dloss 0.00e+00"), "{r:?}");
    }
    for case in ["torchscript", "saelens", "safetensors"] {
        assert_eq!(find("export", case)[3], "ok", "{table}");
    }
    assert_eq!(find("dist", "gloo, world size 1")[3], "ok", "{table}");
    // Speed: every case at both precisions, every cell a figure, MISSING
    // (a feature this binary lacks) or skipped when the time ran out.
    for case in ["M (", "MT (", "T (", "X ("] {
        for precision in ["fp32", "bf16"] {
            let r = rows
                .iter()
                .find(|r| r[0].starts_with(case) && r[1] == precision)
                .unwrap_or_else(|| panic!("no speed row {case} {precision} in:\n{table}"));
            for cell in &r[2..] {
                let figure = cell.replace(',', "").parse::<f64>().is_ok_and(|v| v > 0.0);
                assert!(
                    figure || *cell == "MISSING" || *cell == "skipped (time)",
                    "{r:?}"
                );
            }
        }
    }
    // The first case runs before any time limit: a figure on each side.
    let m = rows.iter().find(|r| r[0].starts_with("M (")).unwrap();
    assert!(
        m[2..]
            .iter()
            .all(|c| c.replace(',', "").parse::<f64>().is_ok()),
        "{m:?}"
    );
    // Absent features are said loudly, in the output and the table.
    for line in table.lines().filter(|l| l.starts_with("MISSING")) {
        assert!(log.contains(line.trim_end()), "{line}");
    }
    println!("{table}");
}
