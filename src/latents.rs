//! `sae latents`: what each latent learned, from data streamed in chunks.
//!
//! Per latent, over the rows of the data (codes from the model's encoder or
//! a pursuit, in the model's normalised space):
//! - `frequency` = fraction of rows on which it is active (the rule of
//!   `metrics.rs` l0: code > the activation's threshold, or ≠ 0 for pursuit
//!   codes: [`CodeSource::active`])
//! - `mean_activation` = mean of the code over all rows; `max_activation` its max
//! - `decoder_norm` = ‖W_dec[j]‖ (in data space, see
//!   [`metrics::decoder_rows_in_data_space`]); `nearest_cosine` = max over
//!   other latents i of cos(W_dec[j], W_dec[i]) (and which i)
//! - `dead` = active on no row of these data
//! - the top-N rows: active rows by largest code, ties broken by the lower
//!   row index; `-1` (value 0) pads a latent active on fewer than N rows
//! - an activation histogram of the active codes' |value| in half-octave bins
//!
//! Memory is bounded: one chunk of rows and its codes `[chunk, d_hidden]`,
//! plus `[d_hidden, N]` running top-N tensors merged chunk by chunk; the
//! nearest-cosine search takes decoder rows in blocks (never `[h, h]`).

use crate::data::npy;
use crate::html;
use crate::metrics::{self, CodeSource};
use crate::model::Sae;
use crate::{bail_user, Result};
use anyhow::Context;
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// Activation-histogram bins: half octaves, bin `b` holds
/// `|z| in [2^((b - HIST_OFFSET)/2), 2^((b + 1 - HIST_OFFSET)/2))`, the ends
/// open (anything smaller in bin 0, larger in the last).
pub const HIST_BINS: i64 = 48;
pub const HIST_OFFSET: i64 = 28;

/// The lower edge of histogram bin `b` (bin 0 also holds everything below).
pub fn hist_edge(b: i64) -> f64 {
    2f64.powf((b - HIST_OFFSET) as f64 / 2.0)
}

/// Rows per chunk when none is asked: codes of about 32 MB (1,024 rows at
/// 8,192 latents); a chunk's work holds a few such buffers.
pub fn default_chunk_rows(d_hidden: i64) -> usize {
    ((8 << 20) / d_hidden.max(1)).clamp(256, 8192) as usize
}

/// Per-latent statistics of one pass over the data.
pub struct LatentStats {
    pub rows: i64,
    pub d_hidden: i64,
    pub top: i64,
    pub frequency: Vec<f64>,
    pub mean_activation: Vec<f64>,
    pub max_activation: Vec<f32>,
    /// `[d_hidden, top]` row-major; -1 pads.
    pub top_rows: Vec<i64>,
    /// `[d_hidden, top]`; 0 where the row is -1.
    pub top_values: Vec<f32>,
    /// `[d_hidden, HIST_BINS]` counts of active codes.
    pub hist: Vec<i64>,
}

impl LatentStats {
    pub fn dead(&self, j: usize) -> bool {
        self.frequency[j] == 0.0
    }

    /// The top rows of latent `j` that exist (no -1 padding).
    pub fn top_rows_of(&self, j: usize) -> &[i64] {
        let n = self.top as usize;
        let rows = &self.top_rows[j * n..(j + 1) * n];
        let len = rows.iter().position(|&r| r < 0).unwrap_or(n);
        &rows[..len]
    }

    pub fn top_values_of(&self, j: usize) -> &[f32] {
        let n = self.top as usize;
        let len = self.top_rows_of(j).len();
        &self.top_values[j * n..j * n + len]
    }
}

/// Running statistics: feed it chunks of codes in row order.
pub struct Accumulator {
    h: i64,
    top: i64,
    rows: i64,
    fire: Tensor,
    sum: Tensor,
    max: Tensor,
    best_vals: Tensor,
    best_rows: Tensor,
    hist: Tensor,
}

impl Accumulator {
    pub fn new(d_hidden: i64, top: i64, device: Device) -> Accumulator {
        let f64o = (Kind::Double, device);
        Accumulator {
            h: d_hidden,
            top,
            rows: 0,
            fire: Tensor::zeros([d_hidden], f64o),
            sum: Tensor::zeros([d_hidden], f64o),
            max: Tensor::full([d_hidden], f64::NEG_INFINITY, (Kind::Float, device)),
            best_vals: Tensor::full([d_hidden, top], f64::NEG_INFINITY, (Kind::Float, device)),
            best_rows: Tensor::full([d_hidden, top], -1, (Kind::Int64, device)),
            hist: Tensor::zeros([d_hidden * HIST_BINS + 1], (Kind::Int64, device)),
        }
    }

    /// Adds the codes `z [b, h]` of the next `b` rows and which are active.
    pub fn add(&mut self, z: &Tensor, active: &Tensor) {
        let _guard = tch::no_grad_guard();
        let b = z.size()[0];
        if b == 0 {
            return;
        }
        let z = z.to_kind(Kind::Float);
        let inactive = active.logical_not();
        self.fire += active.sum_dim_intlist(0, false, Kind::Double);
        self.sum += z.sum_dim_intlist(0, false, Kind::Double);
        self.max = self.max.maximum(&z.amax(0, false));

        // Histogram: flat index latent * BINS + bin, inactive codes into the
        // spare last slot. In place: one [b, h] float and one int64 buffer.
        let mut t = z.abs();
        let _ = t.clamp_min_(1e-30);
        let _ = t.log2_();
        t *= 2.0;
        let _ = t.floor_();
        let _ = t.clamp_(-(HIST_OFFSET as f64), (HIST_BINS - 1 - HIST_OFFSET) as f64);
        let mut flat = t.to_kind(Kind::Int64);
        drop(t);
        let latent = Tensor::arange(self.h, (Kind::Int64, z.device())) * HIST_BINS + HIST_OFFSET;
        flat += latent.unsqueeze(0);
        let _ = flat.masked_fill_(&inactive, self.h * HIST_BINS);
        self.hist += flat
            .view([-1])
            .bincount::<Tensor>(None, self.h * HIST_BINS + 1);
        drop(flat);

        // This chunk's top rows per latent, ties to the lower row.
        let mut masked = z.tr().contiguous();
        let _ = masked.masked_fill_(&inactive.tr(), f64::NEG_INFINITY);
        let k = self.top.min(b);
        let (mut vals, mut idx) = masked.topk(k, 1, true, true);
        // topk does not promise which of equal values it keeps: where the
        // k-th value also occurs outside the selection, sort those latents'
        // codes stably instead.
        let kth = vals.narrow(1, k - 1, 1);
        let ties_all = masked
            .eq_tensor(&kth)
            .sum_dim_intlist(1, false, Kind::Int64);
        let ties_kept = vals.eq_tensor(&kth).sum_dim_intlist(1, false, Kind::Int64);
        let redo = ties_all
            .gt_tensor(&ties_kept)
            .logical_and(&kth.squeeze_dim(1).isfinite())
            .nonzero()
            .squeeze_dim(1);
        if redo.size()[0] > 0 {
            let (sv, si) = masked.index_select(0, &redo).sort_stable(true, 1, true);
            vals = vals.index_copy(0, &redo, &sv.narrow(1, 0, k));
            idx = idx.index_copy(0, &redo, &si.narrow(1, 0, k));
        }
        let rows = idx + self.rows;
        // Merge with the running top-N: order by row, then stably by value
        // (descending), so equal values keep the lower row first.
        let cand_v = Tensor::cat(&[&self.best_vals, &vals], 1);
        let cand_r = Tensor::cat(&[&self.best_rows, &rows], 1);
        let (by_row, perm) = cand_r.sort_stable(true, 1, false);
        let cand_v = cand_v.gather(1, &perm, false);
        let (v, perm) = cand_v.sort_stable(true, 1, true);
        let r = by_row.gather(1, &perm, false);
        self.best_vals = v.narrow(1, 0, self.top).contiguous();
        self.best_rows = r.narrow(1, 0, self.top).contiguous();
        self.rows += b;
    }

    pub fn rows(&self) -> i64 {
        self.rows
    }

    pub fn finish(self) -> LatentStats {
        let n = self.rows.max(1) as f64;
        let found = self.best_vals.isfinite();
        let rows = self
            .best_rows
            .where_self(&found, &self.best_rows.full_like(-1));
        let vals = self
            .best_vals
            .where_self(&found, &self.best_vals.zeros_like());
        let cpu = |t: &Tensor| t.to_device(Device::Cpu).contiguous();
        let f64s = |t: Tensor| Vec::<f64>::try_from(cpu(&t).to_kind(Kind::Double)).unwrap();
        LatentStats {
            rows: self.rows,
            d_hidden: self.h,
            top: self.top,
            frequency: f64s(&self.fire / n),
            mean_activation: f64s(&self.sum / n),
            max_activation: Vec::<f32>::try_from(cpu(&self.max)).unwrap(),
            top_rows: Vec::<i64>::try_from(cpu(&rows).flatten(0, -1)).unwrap(),
            top_values: Vec::<f32>::try_from(cpu(&vals).flatten(0, -1)).unwrap(),
            hist: Vec::<i64>::try_from(cpu(&self.hist.narrow(0, 0, self.h * HIST_BINS))).unwrap(),
        }
    }
}

/// Decoder statistics per latent.
pub struct DecoderStats {
    pub norm: Vec<f64>,
    /// Max cosine with another latent's row (NaN with one latent or a zero row).
    pub nearest_cosine: Vec<f64>,
    /// Which latent that is (-1 when none).
    pub nearest: Vec<i64>,
}

/// Norms and nearest cosines of decoder rows `w [h, d]`, `block` rows of the
/// `[block, h]` cosine matrix at a time.
pub fn decoder_stats(w: &Tensor, block: i64) -> DecoderStats {
    let _guard = tch::no_grad_guard();
    let w = w.detach().to_kind(Kind::Float);
    let h = w.size()[0];
    let norm = w.norm_scalaropt_dim(2, [1], false);
    let unit = &w / norm.clamp_min(1e-12).unsqueeze(1);
    let zero = norm.eq(0.0);
    let mut best = Vec::with_capacity(h as usize);
    let mut which = Vec::with_capacity(h as usize);
    let mut start = 0;
    while start < h {
        let len = block.min(h - start);
        let cos = unit.narrow(0, start, len).matmul(&unit.tr());
        // Not with itself, nor with all-zero rows.
        let own = Tensor::arange_start(start, start + len, (Kind::Int64, w.device())).unsqueeze(1);
        let cos = cos
            .scatter_value(1, &own, f64::NEG_INFINITY)
            .masked_fill(&zero.unsqueeze(0), f64::NEG_INFINITY);
        let (v, i) = cos.max_dim(1, false);
        best.extend(Vec::<f64>::try_from(v.to_device(Device::Cpu).to_kind(Kind::Double)).unwrap());
        which.extend(Vec::<i64>::try_from(i.to_device(Device::Cpu)).unwrap());
        start += len;
    }
    let zero_rows = Vec::<bool>::try_from(zero.to_device(Device::Cpu)).unwrap();
    for j in 0..h as usize {
        if !best[j].is_finite() || zero_rows[j] {
            best[j] = f64::NAN;
            which[j] = -1;
        }
    }
    DecoderStats {
        norm: Vec::<f64>::try_from(norm.to_device(Device::Cpu).to_kind(Kind::Double)).unwrap(),
        nearest_cosine: best,
        nearest: which,
    }
}

/// Decoder rows `[h, d]` on the CPU in data space when they are dictionary
/// directions (not for deep models: None).
pub fn decoder_rows(model: &Sae) -> Option<Tensor> {
    model.decoder_rows_in_output_space().then(|| {
        metrics::decoder_rows_in_data_space(model)
            .detach()
            .to_device(Device::Cpu)
            .to_kind(Kind::Float)
    })
}

/// One pass over `data`: codes chunk by chunk into an [`Accumulator`].
/// Progress lines go to stderr every few seconds when `progress`.
pub fn scan(
    model: &Sae,
    codes: &dyn CodeSource,
    data: &str,
    top: i64,
    chunk_rows: usize,
    progress: bool,
) -> Result<LatentStats> {
    let _guard = tch::no_grad_guard();
    let total = npy::data_shape(data)?.rows;
    let device = model.device();
    let mut acc = Accumulator::new(model.spec.d_hidden, top, device);
    let started = Instant::now();
    let mut last = started;
    npy::for_each_chunk(data, chunk_rows, |m| {
        let xb = m.to_tensor().to_device(device);
        let xn = model.norm.apply(&xb);
        let z = codes.codes(model, &xn);
        let active = codes.active(model, &z);
        acc.add(&z, &active);
        if progress && last.elapsed() >= Duration::from_secs(5) {
            last = Instant::now();
            eprintln!(
                "latents: {} / {total} rows ({:.0}%), {:.0} s",
                acc.rows(),
                100.0 * acc.rows() as f64 / total.max(1) as f64,
                started.elapsed().as_secs_f64()
            );
        }
        Ok(())
    })?;
    if progress {
        eprintln!(
            "latents: {} rows in {:.1} s",
            acc.rows(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(acc.finish())
}

/// The first two principal-component scores `[n, 2]` (float32) of codes
/// `z [n, h]`: randomized subspace iteration on the centred codes (no
/// `[h, h]` matrix), started from a fixed pseudo-random basis so the map is
/// the same every run; each axis's sign makes its largest |score| positive.
pub fn pca_2d(z: &Tensor) -> Tensor {
    let _guard = tch::no_grad_guard();
    let z = z.to_kind(Kind::Float);
    let (n, h) = (z.size()[0], z.size()[1]);
    let dev = z.device();
    if n == 0 {
        return Tensor::zeros([0, 2], (Kind::Float, dev));
    }
    let zc = &z - z.mean_dim(0, true, Kind::Float);
    let q = h.min(n).clamp(1, 16);
    let mut rng = crate::data::dataset::SplitMix64(0x5ae);
    let start: Vec<f32> = (0..h * q)
        .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
        .collect();
    let omega = Tensor::from_slice(&start).reshape([h, q]).to_device(dev);
    let mut y = zc.matmul(&omega);
    for _ in 0..8 {
        let (qy, _) = Tensor::linalg_qr(&y, "reduced");
        y = zc.matmul(&zc.tr().matmul(&qy));
    }
    let (qy, _) = Tensor::linalg_qr(&y, "reduced");
    // B = Qᵀ zc is [q, h]; its left singular vectors are the eigenvectors
    // of B Bᵀ (ascending eigenvalues: the last two are the largest).
    let b = qy.tr().matmul(&zc).to_kind(Kind::Double);
    let (evals, evecs) = b.matmul(&b.tr()).linalg_eigh("L");
    let k = 2.min(evals.size()[0]);
    let top = evecs.narrow(1, evals.size()[0] - k, k).flip([1]);
    let sv = evals
        .narrow(0, evals.size()[0] - k, k)
        .flip([0])
        .clamp_min(0.0)
        .sqrt();
    let mut scores = (qy.to_kind(Kind::Double).matmul(&top) * sv).to_kind(Kind::Float);
    if k < 2 {
        scores = Tensor::cat(&[scores, Tensor::zeros([n, 2 - k], (Kind::Float, dev))], 1);
    }
    let idx = scores.abs().argmax(0, true);
    let sign = scores.gather(0, &idx, false).sign();
    let sign = sign.where_self(&sign.ne(0.0), &sign.ones_like());
    scores * sign
}

/// What `sae latents` was asked for, beyond the model and the data.
pub struct Options {
    pub top: i64,
    pub chunk_rows: usize,
    /// Rows are `h x w` images (checked: h * w = d_in).
    pub image: Option<(usize, usize)>,
    /// One line of text per data row.
    pub labels: Option<PathBuf>,
    pub progress: bool,
    /// Names for the page: the model and data as given, and the encoder.
    pub model_name: String,
    pub data_name: String,
    pub encoder_name: String,
}

/// Bytes of row pictures and label text embedded in the page at most; past
/// this, cards show pictures/text for fewer of their top rows.
const PAGE_ROW_BUDGET: usize = 24 << 20;
/// Characters of one label kept.
const LABEL_CHARS: usize = 200;
/// Input dimensions listed for a decoder row that is not an image.
const DECODER_DIMS: usize = 8;

/// `sae latents`: one pass for the statistics, a second for the rows the
/// page shows, then `out/latents.csv`, `top_rows.npy`, `top_values.npy`
/// and `index.html`, each written atomically.
pub fn run(
    model: &Sae,
    codes: &dyn CodeSource,
    data: &str,
    out: &Path,
    opts: &Options,
) -> Result<LatentStats> {
    let shape = npy::data_shape(data)?;
    if shape.cols as i64 != model.spec.d_in {
        bail_user!(
            "{data}: has {} columns but the model's d_in is {}",
            shape.cols,
            model.spec.d_in
        );
    }
    if let Some(path) = &opts.labels {
        let n = count_lines(path)?;
        if n != shape.rows {
            bail_user!(
                "--labels {}: has {n} lines but {data} has {} rows (one line per row)",
                path.display(),
                shape.rows
            );
        }
    }
    if out.is_file() {
        bail_user!("--out {}: is a file; pass a directory", out.display());
    }
    let stats = scan(model, codes, data, opts.top, opts.chunk_rows, opts.progress)?;
    let dec_rows = decoder_rows(model);
    let h = model.spec.d_hidden;
    let dec = match &dec_rows {
        Some(w) => decoder_stats(w, ((16 << 20) / h.max(1)).clamp(1, 4096)),
        None => DecoderStats {
            norm: vec![f64::NAN; h as usize],
            nearest_cosine: vec![f64::NAN; h as usize],
            nearest: vec![-1; h as usize],
        },
    };

    // The rows the cards show pictures or text for, within the budget.
    let per_row =
        opts.image.map_or(0, |(a, b)| a * b) + opts.labels.as_ref().map_or(0, |_| LABEL_CHARS);
    let (tiles, shown) = rows_within_budget(&stats, per_row);
    let pixels = match opts.image {
        Some(_) if !shown.is_empty() => collect_rows(data, &shown, opts.chunk_rows)?,
        _ => HashMap::new(),
    };
    let labels = match &opts.labels {
        Some(path) => read_labels(path, &shown)?,
        None => HashMap::new(),
    };

    std::fs::create_dir_all(out)
        .map_err(|e| crate::error::user(format!("--out {}: cannot create: {e}", out.display())))?;
    write_csv(&out.join("latents.csv"), &stats, &dec)?;
    let (hh, n) = (h as usize, opts.top as usize);
    npy::write_npy_i64(&out.join("top_rows.npy"), &[hh, n], &stats.top_rows)?;
    npy::write_npy(
        &out.join("top_values.npy"),
        &Tensor::from_slice(&stats.top_values).reshape([h, opts.top]),
    )?;
    let data_json = page_data(
        model,
        &stats,
        &dec,
        dec_rows.as_ref(),
        &pixels,
        &labels,
        tiles,
        opts,
    );
    let html = crate::html::latents_page(&format!("Latents of {}", opts.model_name), &data_json);
    crate::fsutil::write_bytes_atomic(&out.join("index.html"), html.as_bytes())?;
    Ok(stats)
}

/// Lines of a text file (a last line without a newline counts).
fn count_lines(path: &Path) -> Result<usize> {
    let f = File::open(path)
        .map_err(|e| crate::error::user(format!("--labels {}: {e}", path.display())))?;
    let mut r = BufReader::new(f);
    let (mut n, mut buf) = (0, Vec::new());
    loop {
        buf.clear();
        let got = r
            .read_until(b'\n', &mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if got == 0 {
            return Ok(n);
        }
        n += 1;
    }
}

/// The lines of `rows` (0-based), trimmed to [`LABEL_CHARS`].
fn read_labels(path: &Path, rows: &BTreeSet<i64>) -> Result<HashMap<i64, String>> {
    let f = File::open(path)
        .map_err(|e| crate::error::user(format!("--labels {}: {e}", path.display())))?;
    let mut r = BufReader::new(f);
    let mut out = HashMap::new();
    let (mut i, mut buf) = (0i64, Vec::new());
    let last = rows.iter().next_back().copied().unwrap_or(-1);
    while i <= last {
        buf.clear();
        if r.read_until(b'\n', &mut buf)
            .with_context(|| format!("reading {}", path.display()))?
            == 0
        {
            break;
        }
        if rows.contains(&i) {
            let text = String::from_utf8_lossy(&buf);
            let text = text.trim_end_matches(['\n', '\r']);
            out.insert(i, text.chars().take(LABEL_CHARS).collect());
        }
        i += 1;
    }
    Ok(out)
}

/// How many of each latent's top rows the page shows in full, and the
/// distinct rows that takes, within [`PAGE_ROW_BUDGET`] bytes at
/// `per_row` bytes a row (0: no row content, all shown).
fn rows_within_budget(stats: &LatentStats, per_row: usize) -> (usize, BTreeSet<i64>) {
    let h = stats.d_hidden as usize;
    let rows_for = |t: usize| -> BTreeSet<i64> {
        (0..h)
            .flat_map(|j| stats.top_rows_of(j).iter().take(t).copied())
            .collect()
    };
    if per_row == 0 {
        return (stats.top as usize, BTreeSet::new());
    }
    let mut t = stats.top as usize;
    loop {
        let rows = rows_for(t);
        if t == 0 || rows.len() * per_row <= PAGE_ROW_BUDGET {
            return (t, rows);
        }
        t -= 1;
    }
}

/// The values of `rows` of the data (a second streamed pass).
fn collect_rows(data: &str, rows: &BTreeSet<i64>, chunk: usize) -> Result<HashMap<i64, Vec<f32>>> {
    let mut out = HashMap::new();
    let mut start = 0i64;
    npy::for_each_chunk(data, chunk, |m| {
        let end = start + m.rows as i64;
        for &r in rows.range(start..end) {
            let i = (r - start) as usize;
            out.insert(r, m.data[i * m.cols..(i + 1) * m.cols].to_vec());
        }
        start = end;
        Ok(())
    })?;
    Ok(out)
}

fn write_csv(path: &Path, s: &LatentStats, d: &DecoderStats) -> Result<()> {
    let f = |x: f64| {
        if x.is_nan() {
            "nan".to_string()
        } else {
            format!("{x}")
        }
    };
    let mut text = String::from(
        "id,frequency,mean_activation,max_activation,decoder_norm,nearest_cosine,nearest_latent,dead\n",
    );
    for j in 0..s.d_hidden as usize {
        text += &format!(
            "{j},{},{},{},{},{},{},{}\n",
            f(s.frequency[j]),
            f(s.mean_activation[j]),
            f(s.max_activation[j] as f64),
            f(d.norm[j]),
            f(d.nearest_cosine[j]),
            d.nearest[j],
            s.dead(j) as u8
        );
    }
    crate::fsutil::write_bytes_atomic(path, text.as_bytes())
}

/// The JSON the page draws from (see src/html/latents.js).
#[allow(clippy::too_many_arguments)]
fn page_data(
    model: &Sae,
    s: &LatentStats,
    d: &DecoderStats,
    dec_rows: Option<&Tensor>,
    pixels: &HashMap<i64, Vec<f32>>,
    labels: &HashMap<i64, String>,
    tiles: usize,
    opts: &Options,
) -> Value {
    let h = s.d_hidden as usize;
    let nums = |v: &[f64]| Value::Array(v.iter().map(|&x| html::num(x)).collect());
    let max: Vec<f64> = s.max_activation.iter().map(|&x| x as f64).collect();
    let top: Vec<Value> = (0..h).map(|j| json!(s.top_rows_of(j))).collect();
    let vals: Vec<Value> = (0..h)
        .map(|j| {
            Value::Array(
                s.top_values_of(j)
                    .iter()
                    .map(|&v| html::num(v as f64))
                    .collect(),
            )
        })
        .collect();
    let b = HIST_BINS as usize;
    let hist: Vec<Value> = (0..h)
        .map(|j| {
            let c = &s.hist[j * b..(j + 1) * b];
            match (
                c.iter().position(|&x| x > 0),
                c.iter().rposition(|&x| x > 0),
            ) {
                (Some(lo), Some(hi)) => {
                    let mut v = vec![lo as i64];
                    v.extend_from_slice(&c[lo..=hi]);
                    json!(v)
                }
                _ => json!([]),
            }
        })
        .collect();
    let dec_json = dec_rows.map(|w| {
        let w = Vec::<f32>::try_from(w.flatten(0, -1)).unwrap_or_default();
        let din = w.len() / h.max(1);
        let rows = (0..h).map(|j| {
            let row = &w[j * din..(j + 1) * din];
            if opts.image.is_some() {
                let m = row.iter().fold(0f32, |a, v| a.max(v.abs()));
                let bytes: Vec<u8> = row
                    .iter()
                    .map(|v| ((v / m.max(1e-12)) * 127.0).round().clamp(-127.0, 127.0) as i8 as u8)
                    .collect();
                json!([html::num(m as f64), html::base64(&bytes)])
            } else {
                let mut dims: Vec<usize> = (0..din).collect();
                dims.sort_by(|&a, &b| row[b].abs().total_cmp(&row[a].abs()).then(a.cmp(&b)));
                Value::Array(
                    dims.iter()
                        .take(DECODER_DIMS)
                        .map(|&i| json!([i, html::num(row[i] as f64)]))
                        .collect(),
                )
            }
        });
        Value::Array(rows.collect())
    });
    let pix = (!pixels.is_empty()).then(|| {
        let (lo, hi) = pixels
            .values()
            .flatten()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        let span = (hi - lo).max(1e-12);
        let rows: serde_json::Map<String, Value> = pixels
            .iter()
            .map(|(r, v)| {
                let bytes: Vec<u8> = v
                    .iter()
                    .map(|x| (((x - lo) / span) * 255.0).round().clamp(0.0, 255.0) as u8)
                    .collect();
                (r.to_string(), Value::String(html::base64(&bytes)))
            })
            .collect();
        json!({"lo": lo, "hi": hi, "rows": rows})
    });
    let labels_json = opts.labels.as_ref().map(|_| {
        let m: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(r, t)| (r.to_string(), Value::String(t.clone())))
            .collect();
        Value::Object(m)
    });
    let dead = (0..h).filter(|&j| s.dead(j)).count();
    let fh = metrics::firing_histogram(&s.frequency);
    let l0: f64 = s.frequency.iter().sum();
    // Key-value pairs in display order.
    let activation = format!("{:?}", model.spec.activation)
        .to_lowercase()
        .replace(['{', '}'], "")
        .replace("  ", " ");
    let shown_as = match opts.image {
        Some((a, b)) => format!("{a}x{b} images"),
        None if opts.labels.is_some() => "text (--labels)".to_string(),
        None => "row numbers".to_string(),
    };
    let summary: Vec<(&str, Value)> = vec![
        ("model", json!(opts.model_name)),
        ("data", json!(opts.data_name)),
        ("rows", json!(s.rows)),
        (
            "d_in → d_hidden",
            json!(format!("{} → {h}", model.spec.d_in)),
        ),
        ("activation", json!(activation.trim())),
        ("encoder", json!(opts.encoder_name)),
        (
            "mean L0 (active latents per row)",
            json!(format!("{l0:.2}")),
        ),
        (
            "dead latents",
            json!(format!(
                "{dead} of {h} ({:.1}%)",
                100.0 * dead as f64 / h.max(1) as f64
            )),
        ),
        ("top rows per latent", json!(s.top)),
        ("rows shown as", json!(shown_as)),
    ];
    let summary: Vec<Value> = summary.into_iter().map(|(k, v)| json!([k, v])).collect();
    json!({
        "title": format!("Latents of {}", opts.model_name),
        "subtitle": format!("{} rows of {}, {} latents, encoder {}", s.rows, opts.data_name, h, opts.encoder_name),
        "summary": summary,
        "freq_hist": {
            "labels": fh.iter().map(|b| b.label.clone()).collect::<Vec<_>>(),
            "counts": fh.iter().map(|b| b.count).collect::<Vec<_>>(),
        },
        "freq": nums(&s.frequency),
        "mean": nums(&s.mean_activation),
        "max": nums(&max),
        "norm": nums(&d.norm),
        "cos": nums(&d.nearest_cosine),
        "near": d.nearest,
        "top_n": s.top,
        "top": top,
        "vals": vals,
        "hist": hist,
        "hist_edges": (0..HIST_BINS).map(|b| html::num(hist_edge(b))).collect::<Vec<_>>(),
        "image": opts.image.map(|(a, b)| json!([a, b])),
        "dec": dec_json,
        "pix": pix,
        "labels": labels_json,
        "tiles": tiles,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference: per latent, active rows sorted by (value desc, row asc).
    fn reference(z: &[Vec<f32>], top: usize) -> Vec<Vec<i64>> {
        let h = z[0].len();
        (0..h)
            .map(|j| {
                let mut rows: Vec<(f32, i64)> = z
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r[j] > 0.0)
                    .map(|(i, r)| (r[j], i as i64))
                    .collect();
                rows.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
                let mut out: Vec<i64> = rows.iter().take(top).map(|r| r.1).collect();
                out.resize(top, -1);
                out
            })
            .collect()
    }

    #[test]
    fn streamed_top_rows_match_a_full_sort_with_ties() {
        // Values on a coarse grid so ties are everywhere; latent 3 never fires.
        let mut rng = crate::data::dataset::SplitMix64(7);
        let (n, h, top) = (53usize, 5usize, 6usize);
        let z: Vec<Vec<f32>> = (0..n)
            .map(|_| {
                (0..h)
                    .map(|j| {
                        let v = (rng.below(5) as f32) - 1.0;
                        if j == 3 {
                            0.0
                        } else {
                            v.max(0.0)
                        }
                    })
                    .collect()
            })
            .collect();
        let flat: Vec<f32> = z.iter().flatten().copied().collect();
        let t = Tensor::from_slice(&flat).reshape([n as i64, h as i64]);
        for chunk in [1i64, 4, 7, 53] {
            let mut acc = Accumulator::new(h as i64, top as i64, Device::Cpu);
            let mut s = 0;
            while s < n as i64 {
                let len = chunk.min(n as i64 - s);
                let zb = t.narrow(0, s, len);
                acc.add(&zb, &zb.gt(0.0));
                s += len;
            }
            let st = acc.finish();
            let want = reference(&z, top);
            for (j, want) in want.iter().enumerate() {
                assert_eq!(
                    &st.top_rows[j * top..(j + 1) * top],
                    &want[..],
                    "latent {j}, chunk {chunk}"
                );
            }
            assert!(st.dead(3) && !st.dead(0));
            assert_eq!(st.top_rows_of(3).len(), 0);
            let hist_total: i64 = st.hist.iter().sum();
            let active = flat.iter().filter(|&&v| v > 0.0).count() as i64;
            assert_eq!(hist_total, active);
        }
    }

    #[test]
    fn pca_scores_match_the_exact_svd() {
        let _g = crate::seeded();
        tch::manual_seed(3);
        // Two clear leading directions over a slowly decaying rest.
        let scale = Tensor::cat(
            &[
                Tensor::from_slice(&[6f32, 3.0]),
                Tensor::linspace(1.5, 0.1, 38, (Kind::Float, Device::Cpu)),
            ],
            0,
        );
        let z = Tensor::randn([300, 40], (Kind::Float, Device::Cpu)) * scale;
        let got = pca_2d(&z);
        let zc = &z - z.mean_dim(0, true, Kind::Float);
        let zd = zc.to_kind(Kind::Double);
        let (_, v) = zd.tr().matmul(&zd).linalg_eigh("L");
        let want = zd
            .matmul(&v.narrow(1, 38, 2).flip([1]))
            .to_kind(Kind::Float);
        for c in 0..2 {
            let (g, w) = (got.select(1, c), want.select(1, c));
            let d = (&g - &w)
                .abs()
                .max()
                .double_value(&[])
                .min((&g + &w).abs().max().double_value(&[]));
            assert!(
                d < 1e-2 * w.abs().max().double_value(&[]),
                "component {c}: {d}"
            );
        }
    }

    #[test]
    fn nearest_cosine_in_blocks_equals_the_full_matrix() {
        let w = Tensor::from_slice(&[1f32, 0., 0., 1., 1., 1., 0., 0., -1., 0.]).reshape([5, 2]);
        for block in [1, 2, 5] {
            let s = decoder_stats(&w, block);
            assert_eq!(s.nearest[0], 2, "block {block}");
            assert!((s.nearest_cosine[0] - 0.5f64.sqrt()).abs() < 1e-6);
            assert!(s.nearest_cosine[3].is_nan() && s.nearest[3] == -1);
            assert!((s.norm[2] - 2f64.sqrt()).abs() < 1e-6);
        }
    }
}
