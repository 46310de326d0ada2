//! Will the run fit in memory? An estimate of what training needs, made
//! from the config and the data's headers before anything is allocated or
//! written, against what the machine (or its cgroup) has available. A run
//! clearly over is refused (exit 2) with the figures and what to change,
//! instead of an allocation failure or the kernel's OOM killer minutes in.
//!
//! The estimate, in float32 bytes (4 per value), with `P` the model's
//! parameter count, `B` the rows of a batch, `H` = `d_hidden`:
//!
//! - model, Adam's two moments, gradients, and one more copy of the largest
//!   of them while the optimizer gathers them into its flat buffers: `5 P`;
//! - the step's temporaries: `6 B H` (pre-activations, codes, their
//!   gradients, the penalty's and the activation's masks) plus `4 B (d_in + d_out)`;
//! - the end-of-run evaluation's chunk budget (`metrics::CHUNK_BUDGET_BYTES`);
//! - data held in memory: twice the rows as float32 (the rows as read and
//!   their normalised copy; reading also holds two copies for a moment),
//!   training and validation rows, input and target; streamed or model
//!   rows: two windows of 65,536 rows.
//!
//! The language model of `data.model` is not counted, nor libtorch itself
//! (already loaded, so not in what is available). Against peak RSS less
//! libtorch's own (0.46 GB here; `/usr/bin/time -f %M`, relu + l1, 2 cores):
//! 256 -> 16,384 latents, 50,000 rows, batch 1,024: estimate 0.95 GB,
//! measured 0.70 GB; 512 -> 32,768, 10,000 rows, batch 256: estimate 1.19 GB,
//! measured 1.02 GB. Over, not tight: a run is refused only above
//! [`REFUSE_ABOVE`] of what is available.

use crate::config::{BatchSize, Config};
use crate::error::{human_bytes, MEMORY_REMEDY};
use crate::{bail_user, Result};
use tch::Device;

/// A run is refused when its estimate is above this fraction of the
/// memory available.
pub const REFUSE_ABOVE: f64 = 0.9;

/// Rows of one streamed window (16 blocks of 4,096 rows).
const WINDOW_ROWS: f64 = 65_536.0;

/// `SAE_MEMORY_CHECK=off` skips the check (the estimate can be wrong for
/// an unusual machine; the run may then fail to allocate, or be killed);
/// `SAE_MEMORY_CHECK=show` prints the estimate and goes on.
pub const SKIP_ENV: &str = "SAE_MEMORY_CHECK";

/// What the estimate needs to know about the data.
#[derive(Debug, Clone, Copy)]
pub struct DataSize {
    pub d_in: i64,
    /// The reconstruction's width (a transcoder's target; else `d_in`).
    pub d_out: i64,
    /// Training rows.
    pub rows: i64,
    /// Validation rows read from their own file (0 when split off or none).
    pub valid_rows: i64,
    /// Whether the target is a separate array (a transcoder).
    pub target: bool,
    /// Rows come in windows (data.stream, data.model), not all in memory.
    pub windowed: bool,
}

/// The parts of an estimate, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct Estimate {
    pub params: f64,
    pub training: f64,
    pub temporaries: f64,
    pub data: f64,
}

impl Estimate {
    pub fn total(&self) -> f64 {
        self.training + self.temporaries + self.data
    }
}

/// The model's parameter count for `cfg` on data `d_in` → `d_out`.
pub fn parameter_count(cfg: &Config, d_in: i64, d_out: i64) -> f64 {
    let m = &cfg.model;
    let h = m.d_hidden as f64;
    let inner: &[i64] = match m.hidden.len() {
        0 | 1 => &[],
        n => &m.hidden[..n - 1],
    };
    let (code_in, code_out) = match (inner.first(), inner.last()) {
        (Some(_), Some(&last)) => (last as f64, last as f64),
        _ => (d_in as f64, d_out as f64),
    };
    let mut p = code_in * h + h + code_out; // W_enc, b_enc, b_dec
    if !m.tied {
        p += h * code_out;
    }
    // A threshold or a gate's r_mag / b_mag: at most 2 per latent.
    p += 2.0 * h;
    if m.skip_connection {
        p += d_in as f64 * d_out as f64; // W_skip
    }
    let mut chain: Vec<f64> = vec![d_in as f64];
    chain.extend(inner.iter().map(|&w| w as f64));
    for w in chain.windows(2) {
        p += w[0] * w[1] + w[1];
    }
    let mut chain: Vec<f64> = inner.iter().rev().map(|&w| w as f64).collect();
    chain.push(d_out as f64);
    for w in chain.windows(2) {
        p += w[0] * w[1] + w[1];
    }
    p
}

/// The estimate for `cfg` on data of `size`.
pub fn estimate(cfg: &Config, size: &DataSize) -> Estimate {
    const F32: f64 = 4.0;
    let (d_in, d_out) = (size.d_in as f64, size.d_out as f64);
    let h = cfg.model.d_hidden as f64;
    let rows_in_memory = match size.windowed {
        true => 2.0 * WINDOW_ROWS,
        false => size.rows as f64,
    };
    let batch = match cfg.train.batch_size {
        BatchSize::Full => rows_in_memory,
        BatchSize::Rows(b) => (b as f64).min(size.rows.max(1) as f64),
    };
    let params = parameter_count(cfg, size.d_in, size.d_out) * F32;
    let width = d_in + if size.target { d_out } else { 0.0 };
    let data = 2.0 * (rows_in_memory + size.valid_rows as f64) * width * F32;
    Estimate {
        params,
        training: 5.0 * params,
        temporaries: (6.0 * batch * h + 4.0 * batch * (d_in + d_out)) * F32
            + crate::metrics::CHUNK_BUDGET_BYTES as f64,
        data,
    }
}

/// Memory this process can still use, in bytes, and where the figure
/// comes from: `MemAvailable`, or a cgroup's limit less its usage when
/// that is lower (file cache it could drop not counted as used).
pub fn available() -> Option<(f64, &'static str)> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb = |key: &str| -> Option<f64> {
        meminfo
            .lines()
            .find(|l| l.starts_with(key))?
            .split_whitespace()
            .nth(1)?
            .parse::<f64>()
            .ok()
            .map(|v| v * 1024.0)
    };
    let mut best = (kb("MemAvailable:")?, "MemAvailable");
    if let Some(left) = cgroup_left() {
        if left < best.0 {
            best = (left, "the cgroup's memory limit");
        }
    }
    Some(best)
}

/// A cgroup (v2, or v1) memory limit less what the group uses now.
fn cgroup_left() -> Option<f64> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let num = |s: Option<String>| s.and_then(|s| s.trim().parse::<f64>().ok());
    let stat = |p: &str, key: &str| -> f64 {
        read(p)
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix(key)?.trim().parse::<f64>().ok())
            })
            .unwrap_or(0.0)
    };
    // v2: "max" (no limit) does not parse.
    let (limit, used) = match num(read("/sys/fs/cgroup/memory.max")) {
        Some(limit) => (
            limit,
            num(read("/sys/fs/cgroup/memory.current"))?
                - stat("/sys/fs/cgroup/memory.stat", "inactive_file "),
        ),
        None => {
            let v1 = "/sys/fs/cgroup/memory";
            let limit = num(read(&format!("{v1}/memory.limit_in_bytes")))?;
            (
                limit,
                num(read(&format!("{v1}/memory.usage_in_bytes")))?
                    - stat(&format!("{v1}/memory.stat"), "total_inactive_file "),
            )
        }
    };
    // v1 says "no limit" with a number near 2^63.
    (limit < 2f64.powi(60)).then(|| (limit - used.max(0.0)).max(0.0))
}

/// Refuses a run on the CPU whose estimate is above [`REFUSE_ABOVE`] of
/// what is available. CUDA runs are not checked (tch does not report the
/// device's free memory); neither is anything when `SAE_MEMORY_CHECK=off`
/// or the available memory cannot be read.
pub fn check(cfg: &Config, device: Device, size: &DataSize) -> Result<()> {
    let mode = std::env::var(SKIP_ENV).unwrap_or_default();
    if device != Device::Cpu || mode == "off" {
        return Ok(());
    }
    let Some((avail, from)) = available() else {
        return Ok(());
    };
    let e = estimate(cfg, size);
    let figures = format!(
        "model.d_hidden: {} latents on {} rows x {} columns (batch {}) need about {} of memory \
         (parameters {}, with Adam and gradients {}; step temporaries {}; data {})",
        cfg.model.d_hidden,
        size.rows,
        size.d_in,
        match cfg.train.batch_size {
            BatchSize::Full => "full".to_string(),
            BatchSize::Rows(b) => b.to_string(),
        },
        human_bytes(e.total()),
        human_bytes(e.params),
        human_bytes(e.training),
        human_bytes(e.temporaries),
        human_bytes(e.data),
    );
    let avail_text = format!("{} available ({from})", human_bytes(avail));
    if mode == "show" {
        eprintln!("sae: memory estimate: {figures}; {avail_text}");
    }
    if e.total() <= REFUSE_ABOVE * avail {
        return Ok(());
    }
    bail_user!(
        "{figures}, more than {:.0}% of the {avail_text}; {MEMORY_REMEDY} (or {SKIP_ENV}=off \
         to try anyway)",
        100.0 * REFUSE_ABOVE
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(d_hidden: i64, tied: bool, batch: i64) -> Config {
        let mut c = Config::default();
        c.model.d_hidden = d_hidden;
        c.model.tied = tied;
        c.train.batch_size = BatchSize::Rows(batch as _);
        c
    }

    #[test]
    fn parameters_count_both_matrices_unless_tied() {
        let p = |tied| parameter_count(&cfg(100, tied, 10), 8, 8);
        // W_enc + b_enc + b_dec (+ W_dec) + 2 per latent.
        assert_eq!(p(false), (800 + 100 + 8 + 800 + 200) as f64);
        assert_eq!(p(true), (800 + 100 + 8 + 200) as f64);
    }

    #[test]
    fn estimate_grows_with_width_batch_and_rows() {
        let size = DataSize {
            d_in: 64,
            d_out: 64,
            rows: 10_000,
            valid_rows: 0,
            target: false,
            windowed: false,
        };
        let e = estimate(&cfg(10_000_000, false, 4096), &size);
        // W_enc + W_dec 1.28e9, b_enc + b_dec, 2 per latent: 5.24 GB,
        // 26.2 GB with Adam and gradients.
        let p = 2.0 * 64.0 * 1e7 + 1e7 + 64.0 + 2e7;
        assert_eq!(e.params, 4.0 * p);
        assert_eq!(e.training, 5.0 * 4.0 * p);
        assert!(e.total() > e.training + 6.0 * 4096.0 * 1e7 * 4.0);
        assert_eq!(e.data, 2.0 * 10_000.0 * 64.0 * 4.0);
    }
}
