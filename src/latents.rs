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
    /// Max |code| over the active rows (0 when dead): the scale of the
    /// sample bands (equal to `max_activation` for codes >= 0).
    pub scale: Vec<f32>,
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
    scale: Tensor,
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
            scale: Tensor::zeros([d_hidden], (Kind::Float, device)),
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
        self.scale = self
            .scale
            .maximum(&z.abs().masked_fill(&inactive, 0.0).amax(0, false));

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
            scale: Vec::<f32>::try_from(cpu(&self.scale)).unwrap(),
        }
    }
}

/// Bands of a latent's activation range that the samples come from: band
/// `b` (1-based) holds the active rows with `|code|` in
/// `((b - 1) M / 3, b M / 3]`, `M` the latent's max `|code|` (in float32:
/// `ceil(|code| * 3 / M)`, clamped to 1..=3).
pub const BANDS: i64 = 3;

/// The sampling key of (row, latent): SplitMix64's finaliser of
/// `row * d_hidden + latent`, its bits read as an i64. A bijection, so no two
/// entries of a latent tie; a band's samples are its rows with the smallest
/// keys, which does not depend on the chunking.
pub fn sample_key(row: i64, latent: i64, d_hidden: i64) -> i64 {
    let mut z = row.wrapping_mul(d_hidden).wrapping_add(latent) as u64;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as i64
}

/// [`sample_key`] of every entry of an int64 tensor (wrapping products;
/// logical shifts as arithmetic shifts with the sign bits masked off).
fn sample_keys(x: &Tensor) -> Tensor {
    let shr = |t: &Tensor, s: i64| {
        t.bitwise_right_shift_tensor_scalar(s)
            .bitwise_and((1i64 << (64 - s)) - 1)
    };
    let z = x.bitwise_xor_tensor(&shr(x, 30)) * (0xBF58_476D_1CE4_E5B9u64 as i64);
    let z = z.bitwise_xor_tensor(&shr(&z, 27)) * (0x94D0_49BB_1331_11EBu64 as i64);
    z.bitwise_xor_tensor(&shr(&z, 31))
}

/// Per latent and band, up to `per` rows sampled from the band (value
/// descending, ties to the lower row; -1 / 0 pad), `[d_hidden, BANDS, per]`.
pub struct Samples {
    pub per: i64,
    pub rows: Vec<i64>,
    pub values: Vec<f32>,
}

impl Samples {
    /// The sampled rows of latent `j`, band `b` (0-based), no padding.
    pub fn rows_of(&self, j: usize, b: usize) -> &[i64] {
        let n = self.per as usize;
        let at = (j * BANDS as usize + b) * n;
        let rows = &self.rows[at..at + n];
        &rows[..rows.iter().position(|&r| r < 0).unwrap_or(n)]
    }

    pub fn values_of(&self, j: usize, b: usize) -> &[f32] {
        let n = self.per as usize;
        let at = (j * BANDS as usize + b) * n;
        &self.values[at..at + self.rows_of(j, b).len()]
    }
}

/// Samples from the lower bands of each latent's activation range, as
/// SAE-Vis and Neuronpedia show beside the top rows.
///
/// A second streamed pass, fed the same chunks of codes as the
/// [`Accumulator`] after it has finished: the bands are fractions of the
/// latent's max, which is known only at the end of the first pass. Keeping
/// exact per-band samples in one pass would need candidates for every band
/// the final max could still move a row into (the kept set grows with the
/// data's range and is not a fixed tensor); the second pass is exact and
/// chunk-independent, and costs one more encoding pass (`--samples 0` skips
/// it). It works on the active entries only: per chunk, its entries plus
/// the kept ones (at most `d_hidden * BANDS * per`) are sorted by (latent,
/// band, key) and the first `per` of each (latent, band) kept.
pub struct Sampler {
    h: i64,
    per: i64,
    rows: i64,
    /// `[h]` max |code| per latent (float32).
    scale: Tensor,
    /// The kept entries: `latent * BANDS + band - 1`, key, row, value.
    group: Tensor,
    keys: Tensor,
    best_rows: Tensor,
    best_vals: Tensor,
}

impl Sampler {
    pub fn new(scale: &[f32], per: i64, device: Device) -> Sampler {
        let empty = |k: Kind| Tensor::zeros([0], (k, device));
        Sampler {
            h: scale.len() as i64,
            per,
            rows: 0,
            scale: Tensor::from_slice(scale)
                .clamp_min(f32::MIN_POSITIVE as f64)
                .to_device(device),
            group: empty(Kind::Int64),
            keys: empty(Kind::Int64),
            best_rows: empty(Kind::Int64),
            best_vals: empty(Kind::Float),
        }
    }

    /// Adds the codes `z [b, h]` of the next `b` rows and which are active.
    pub fn add(&mut self, z: &Tensor, active: &Tensor) {
        let _guard = tch::no_grad_guard();
        let b = z.size()[0];
        let at = active.nonzero();
        if at.size()[0] > 0 {
            let (r, c) = (at.select(1, 0), at.select(1, 1));
            let v = z
                .to_kind(Kind::Float)
                .reshape([-1])
                .index_select(0, &(&r * self.h + &c));
            let band = ((v.abs() * 3.0) / self.scale.index_select(0, &c))
                .ceil_()
                .clamp_(1.0, BANDS as f64)
                .to_kind(Kind::Int64);
            let row = r + self.rows;
            let key = sample_keys(&(&row * self.h + &c));
            let g = Tensor::cat(&[&self.group, &(c * BANDS + band - 1)], 0);
            let k = Tensor::cat(&[&self.keys, &key], 0);
            let rr = Tensor::cat(&[&self.best_rows, &row], 0);
            let vv = Tensor::cat(&[&self.best_vals, &v], 0);
            // By key, then stably by group: each group's keys ascending.
            let (_, by_key) = k.sort_stable(true, 0, false);
            let (gs, by_group) = g.index_select(0, &by_key).sort_stable(true, 0, false);
            let order = by_key.index_select(0, &by_group);
            // Rank within the group: position - the group's first position.
            let n = gs.size()[0];
            let pos = Tensor::arange(n, (Kind::Int64, gs.device()));
            let first = Tensor::cat(
                &[
                    Tensor::ones([1], (Kind::Bool, gs.device())),
                    gs.narrow(0, 1, n - 1).ne_tensor(&gs.narrow(0, 0, n - 1)),
                ],
                0,
            );
            let (start, _) = (&pos * first.to_kind(Kind::Int64)).cummax(0);
            let keep = order.masked_select(&(pos - start).lt(self.per));
            self.group = g.index_select(0, &keep);
            self.keys = k.index_select(0, &keep);
            self.best_rows = rr.index_select(0, &keep);
            self.best_vals = vv.index_select(0, &keep);
        }
        self.rows += b;
    }

    pub fn finish(self) -> Samples {
        let (h, per, nb) = (self.h as usize, self.per as usize, BANDS as usize);
        let cpu = |t: &Tensor| t.to_device(Device::Cpu).contiguous();
        let group = Vec::<i64>::try_from(cpu(&self.group)).unwrap();
        let rows = Vec::<i64>::try_from(cpu(&self.best_rows)).unwrap();
        let vals = Vec::<f32>::try_from(cpu(&self.best_vals)).unwrap();
        let mut by_group: Vec<Vec<(f32, i64)>> = vec![Vec::new(); h * nb];
        for i in 0..group.len() {
            by_group[group[i] as usize].push((vals[i], rows[i]));
        }
        let mut out_r = vec![-1i64; h * nb * per];
        let mut out_v = vec![0f32; h * nb * per];
        for (g, mut got) in by_group.into_iter().enumerate() {
            got.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
            for (i, (v, r)) in got.into_iter().enumerate() {
                out_r[g * per + i] = r;
                out_v[g * per + i] = v;
            }
        }
        Samples {
            per: self.per,
            rows: out_r,
            values: out_v,
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

impl DecoderStats {
    /// For `h` latents without decoder rows (deep models): NaN, and no
    /// nearest latent.
    fn unknown(h: usize) -> DecoderStats {
        DecoderStats {
            norm: vec![f64::NAN; h],
            nearest_cosine: vec![f64::NAN; h],
            nearest: vec![-1; h],
        }
    }
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
    let mut acc = Accumulator::new(model.spec.d_hidden, top, model.device());
    for_each_code_chunk(
        model,
        codes,
        data,
        chunk_rows,
        progress,
        "latents",
        |z, a| acc.add(z, a),
    )?;
    Ok(acc.finish())
}

/// The second pass: `per` rows per band of each latent's activation range
/// (bands of `scale`, the max |code| the first pass found), see [`Sampler`].
pub fn sample(
    model: &Sae,
    codes: &dyn CodeSource,
    data: &str,
    scale: &[f32],
    per: i64,
    chunk_rows: usize,
    progress: bool,
) -> Result<Samples> {
    let mut s = Sampler::new(scale, per, model.device());
    for_each_code_chunk(
        model,
        codes,
        data,
        chunk_rows,
        progress,
        "samples",
        |z, a| s.add(z, a),
    )?;
    Ok(s.finish())
}

/// Codes of `data` chunk by chunk, with which are active, into `f`.
fn for_each_code_chunk(
    model: &Sae,
    codes: &dyn CodeSource,
    data: &str,
    chunk_rows: usize,
    progress: bool,
    what: &str,
    mut f: impl FnMut(&Tensor, &Tensor),
) -> Result<()> {
    let _guard = tch::no_grad_guard();
    let total = npy::data_shape(data)?.rows;
    let device = model.device();
    let started = Instant::now();
    let mut last = started;
    let mut done = 0usize;
    npy::for_each_chunk(data, chunk_rows, |m| {
        let xb = m.to_tensor().to_device(device);
        let xn = model.norm.apply(&xb);
        let z = codes.codes(model, &xn);
        let active = codes.active(model, &z);
        f(&z, &active);
        done += m.rows;
        if progress && last.elapsed() >= Duration::from_secs(5) {
            last = Instant::now();
            eprintln!(
                "{what}: {done} / {total} rows ({:.0}%), {:.0} s",
                100.0 * done as f64 / total.max(1) as f64,
                started.elapsed().as_secs_f64()
            );
        }
        Ok(())
    })?;
    if progress {
        eprintln!(
            "{what}: {done} rows in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
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
    /// Rows sampled per band of each latent's activation range (0: none,
    /// and no second pass).
    pub samples: i64,
    pub chunk_rows: usize,
    /// Rows are `h x w` images (checked: h * w = d_in).
    pub image: Option<(usize, usize)>,
    /// `image` came from `--image-shape` (not from a square `d_in`).
    pub image_given: bool,
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
/// Characters of a top token (or of an unmarked label standing for one).
const TOKEN_CHARS: usize = 40;
/// Top tokens listed per latent.
const TOP_TOKENS: usize = 5;
/// Input dimensions listed for a decoder row that is not an image.
const DECODER_DIMS: usize = 8;

/// The markers around the active token in a label of text: ` the⟦ fox⟧ ran`.
pub const MARK_OPEN: char = '\u{27E6}';
pub const MARK_CLOSE: char = '\u{27E7}';

/// The active token of a marked label (between the first `⟦` and the next
/// `⟧`), or None for a plain label.
pub fn marked_token(label: &str) -> Option<&str> {
    let a = label.find(MARK_OPEN)? + MARK_OPEN.len_utf8();
    let b = label[a..].find(MARK_CLOSE)? + a;
    Some(&label[a..b])
}

/// A label cut to [`LABEL_CHARS`]: a marked one keeps its token and the
/// context around it, a plain one its start.
fn trim_label(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    if chars.len() <= LABEL_CHARS {
        return text.to_string();
    }
    let open = chars.iter().position(|&c| c == MARK_OPEN);
    let close = open.and_then(|a| {
        chars[a..]
            .iter()
            .position(|&c| c == MARK_CLOSE)
            .map(|b| a + b)
    });
    let start = match (open, close) {
        (Some(a), Some(b)) if b - a < LABEL_CHARS => {
            let side = (LABEL_CHARS - (b + 1 - a)) / 2;
            a.saturating_sub(side).min(chars.len() - LABEL_CHARS)
        }
        _ => 0,
    };
    chars[start..start + LABEL_CHARS].iter().collect()
}

/// What a label stands for in a latent's top tokens: its marked token, or
/// the (plain) label itself, cut to [`TOKEN_CHARS`].
fn token_of(label: &str) -> String {
    marked_token(label)
        .unwrap_or(label)
        .chars()
        .take(TOKEN_CHARS)
        .collect()
}

/// A latent's top tokens and their counts.
type TopTokens = Vec<(String, usize)>;

/// Per latent, the distinct tokens of its top rows, most frequent first
/// (ties: the one of the higher-ranked row first), at most [`TOP_TOKENS`],
/// with their counts; rows without a label are skipped.
pub fn top_tokens(rows: &[i64], labels: &HashMap<i64, String>) -> Vec<(String, usize)> {
    let mut seen: Vec<(String, usize)> = Vec::new();
    for r in rows {
        let Some(label) = labels.get(r) else { continue };
        let t = token_of(label);
        match seen.iter_mut().find(|(s, _)| *s == t) {
            Some(e) => e.1 += 1,
            None => seen.push((t, 1)),
        }
    }
    // Stable: equal counts keep their first-seen order.
    seen.sort_by_key(|e| std::cmp::Reverse(e.1));
    seen.truncate(TOP_TOKENS);
    seen
}

/// `sae latents`: one pass for the statistics, a second for the band
/// samples (unless `samples` is 0), one more read for the rows the page
/// shows, then `out/latents.csv`, `top_rows.npy`, `top_values.npy`,
/// `sample_rows.npy`, `sample_values.npy` and `index.html`, each written
/// atomically.
pub fn run(
    model: &Sae,
    codes: &dyn CodeSource,
    data: &str,
    out: &Path,
    opts: &Options,
) -> Result<LatentStats> {
    let text = check_inputs(model, data, out, opts)?;
    // Rows of marked text are tokens: a square d_in is no image then.
    let image = if text && !opts.image_given {
        None
    } else {
        opts.image
    };
    let stats = scan(model, codes, data, opts.top, opts.chunk_rows, opts.progress)?;
    let samples = (opts.samples > 0)
        .then(|| {
            sample(
                model,
                codes,
                data,
                &stats.scale,
                opts.samples,
                opts.chunk_rows,
                opts.progress,
            )
        })
        .transpose()?;
    let dec_rows = decoder_rows(model);
    let dec = match &dec_rows {
        Some(w) => decoder_stats(w, ((16 << 20) / model.spec.d_hidden.max(1)).clamp(1, 4096)),
        None => DecoderStats::unknown(model.spec.d_hidden as usize),
    };

    // The rows the cards show pictures or text for, within the budget.
    let per_row = image.map_or(0, |(a, b)| a * b) + opts.labels.as_ref().map_or(0, |_| LABEL_CHARS);
    let (tiles, shown) = rows_within_budget(&stats, samples.as_ref(), per_row);
    let pixels = match image {
        Some(_) if !shown.is_empty() => collect_rows(data, &shown, opts.chunk_rows)?,
        _ => HashMap::new(),
    };
    let (labels, tokens) = match &opts.labels {
        Some(path) => {
            let (labels, tokens) = labels_and_tokens(path, &stats, &shown)?;
            (labels, Some(tokens))
        }
        None => (HashMap::new(), None),
    };

    std::fs::create_dir_all(out)
        .map_err(|e| crate::error::user(format!("--out {}: cannot create: {e}", out.display())))?;
    write_tables(out, &stats, &dec, samples.as_ref())?;
    let page = Page {
        stats: &stats,
        dec: &dec,
        dec_rows: dec_rows.as_ref(),
        samples: samples.as_ref(),
        pixels: &pixels,
        labels: &labels,
        tokens: tokens.as_deref(),
        text,
        image,
        tiles,
    };
    let data_json = page_data(model, &page, opts);
    let html = crate::html::latents_page(&format!("Latents of {}", opts.model_name), &data_json);
    crate::fsutil::write_bytes_atomic(&out.join("index.html"), html.as_bytes())?;
    Ok(stats)
}

/// Refuses data whose columns are not the model's `d_in`, labels with a
/// line count other than the data's rows, and an `out` that is a file;
/// returns whether the labels are marked text.
fn check_inputs(model: &Sae, data: &str, out: &Path, opts: &Options) -> Result<bool> {
    let shape = npy::data_shape(data)?;
    if shape.cols as i64 != model.spec.d_in {
        bail_user!(
            "{data}: has {} columns but the model's d_in is {}",
            shape.cols,
            model.spec.d_in
        );
    }
    let mut text = false;
    if let Some(path) = &opts.labels {
        let (n, marked) = count_lines(path)?;
        if n != shape.rows {
            bail_user!(
                "--labels {}: has {n} lines but {data} has {} rows (one line per row)",
                path.display(),
                shape.rows
            );
        }
        text = marked;
    }
    if out.is_file() {
        bail_user!("--out {}: is a file; pass a directory", out.display());
    }
    Ok(text)
}

/// Labels of the shown rows, and the top tokens of every latent's top rows
/// (all of them, shown or not).
fn labels_and_tokens(
    path: &Path,
    stats: &LatentStats,
    shown: &BTreeSet<i64>,
) -> Result<(HashMap<i64, String>, Vec<TopTokens>)> {
    let all_top: BTreeSet<i64> = stats.top_rows.iter().copied().filter(|&r| r >= 0).collect();
    let mut want = shown.clone();
    want.extend(&all_top);
    let mut read = read_labels(path, &want)?;
    let tokens: Vec<Vec<(String, usize)>> = (0..stats.d_hidden as usize)
        .map(|j| top_tokens(stats.top_rows_of(j), &read))
        .collect();
    read.retain(|r, _| shown.contains(r));
    Ok((read, tokens))
}

/// `latents.csv`, `top_rows.npy`, `top_values.npy` and, with samples,
/// `sample_rows.npy` and `sample_values.npy` in `out`.
fn write_tables(
    out: &Path,
    stats: &LatentStats,
    dec: &DecoderStats,
    samples: Option<&Samples>,
) -> Result<()> {
    write_csv(&out.join("latents.csv"), stats, dec)?;
    let (h, top) = (stats.d_hidden, stats.top);
    let (hh, n) = (h as usize, top as usize);
    npy::write_npy_i64(&out.join("top_rows.npy"), &[hh, n], &stats.top_rows)?;
    npy::write_npy(
        &out.join("top_values.npy"),
        &Tensor::from_slice(&stats.top_values).reshape([h, top]),
    )?;
    if let Some(s) = samples {
        let shape = [hh, BANDS as usize, s.per as usize];
        npy::write_npy_i64(&out.join("sample_rows.npy"), &shape, &s.rows)?;
        npy::write_npy(
            &out.join("sample_values.npy"),
            &Tensor::from_slice(&s.values).reshape([h, BANDS, s.per]),
        )?;
    }
    Ok(())
}

/// Lines of a text file (a last line without a newline counts), and whether
/// any holds the marker `⟦` (rows of text: a token in its context).
fn count_lines(path: &Path) -> Result<(usize, bool)> {
    let f = File::open(path)
        .map_err(|e| crate::error::user(format!("--labels {}: {e}", path.display())))?;
    let mut r = BufReader::new(f);
    let (mut n, mut marked, mut buf) = (0, false, Vec::new());
    let mut mark = [0u8; 4];
    let mark = MARK_OPEN.encode_utf8(&mut mark).as_bytes().to_vec();
    loop {
        buf.clear();
        let got = r
            .read_until(b'\n', &mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if got == 0 {
            return Ok((n, marked));
        }
        marked = marked || buf.windows(mark.len()).any(|w| w == mark);
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
            out.insert(i, trim_label(text.trim_end_matches(['\n', '\r'])));
        }
        i += 1;
    }
    Ok(out)
}

/// How many of each latent's top rows the page shows in full (and as many
/// of each band's samples, at most), and the distinct rows that takes,
/// within [`PAGE_ROW_BUDGET`] bytes at `per_row` bytes a row (0: no row
/// content, all shown).
fn rows_within_budget(
    stats: &LatentStats,
    samples: Option<&Samples>,
    per_row: usize,
) -> (usize, BTreeSet<i64>) {
    let h = stats.d_hidden as usize;
    let rows_for = |t: usize| -> BTreeSet<i64> {
        let mut rows: BTreeSet<i64> = (0..h)
            .flat_map(|j| stats.top_rows_of(j).iter().take(t).copied())
            .collect();
        if let Some(s) = samples {
            for j in 0..h {
                for b in 0..BANDS as usize {
                    rows.extend(s.rows_of(j, b).iter().take(t));
                }
            }
        }
        rows
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

/// What the page shows, beyond the model and the options.
struct Page<'a> {
    stats: &'a LatentStats,
    dec: &'a DecoderStats,
    dec_rows: Option<&'a Tensor>,
    samples: Option<&'a Samples>,
    pixels: &'a HashMap<i64, Vec<f32>>,
    labels: &'a HashMap<i64, String>,
    /// Per latent, its top tokens and their counts (with --labels).
    tokens: Option<&'a [Vec<(String, usize)>]>,
    /// The labels are marked text (a token in its context).
    text: bool,
    image: Option<(usize, usize)>,
    tiles: usize,
}

/// The JSON the page draws from (see src/html/latents.js): each part built
/// by one of the functions below, gathered under the keys latents.js reads.
fn page_data(model: &Sae, p: &Page, opts: &Options) -> Value {
    let (s, d) = (p.stats, p.dec);
    let h = s.d_hidden as usize;
    let max: Vec<f64> = s.max_activation.iter().map(|&x| x as f64).collect();
    let (top, vals) = top_rows_json(s);
    let labels_json = opts.labels.as_ref().map(|_| labels_json(p.labels));
    let (sample_rows, sample_vals) = p.samples.map(|x| samples_json(x, h)).unzip();
    let (tok, tt) = p.tokens.map(tokens_json).unzip();
    let fh = metrics::firing_histogram(&s.frequency);
    json!({
        "title": format!("Latents of {}", opts.model_name),
        "subtitle": format!("{} rows of {}, {} latents, encoder {}", s.rows, opts.data_name, h, opts.encoder_name),
        "summary": summary_json(model, p, opts),
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
        "hist": hist_json(s),
        "hist_edges": (0..HIST_BINS).map(|b| html::num(hist_edge(b))).collect::<Vec<_>>(),
        "image": p.image.map(|(a, b)| json!([a, b])),
        "dec": decoder_json(p),
        "pix": pixels_json(p.pixels),
        "labels": labels_json,
        "text": p.text,
        "tok": tok,
        "tt": tt,
        "scale": s.scale.iter().map(|&x| html::num(x as f64)).collect::<Vec<_>>(),
        "samples": sample_rows,
        "svals": sample_vals,
        "tiles": p.tiles,
    })
}

/// A column of the per-latent table: numbers as the page writes them.
fn nums(v: &[f64]) -> Value {
    Value::Array(v.iter().map(|&x| html::num(x)).collect())
}

/// Per latent, its top rows and their values (the cards' top-row lists).
fn top_rows_json(s: &LatentStats) -> (Vec<Value>, Vec<Value>) {
    let h = s.d_hidden as usize;
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
    (top, vals)
}

/// Per latent, its activation histogram: `[first non-empty bin, counts up
/// to the last non-empty one...]`, `[]` when dead.
fn hist_json(s: &LatentStats) -> Vec<Value> {
    let b = HIST_BINS as usize;
    (0..s.d_hidden as usize)
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
        .collect()
}

/// Per latent, its decoder row for the card: `[max |w|, base64 of w / max
/// as i8]` for images, else its largest input dimensions `[[i, w_i], ...]`.
/// None for deep models and for text (where input dimensions mean nothing:
/// the card shows the decoder norm and nearest latent only).
fn decoder_json(p: &Page) -> Option<Value> {
    let h = p.stats.d_hidden as usize;
    p.dec_rows
        .filter(|_| p.image.is_some() || !p.text)
        .map(|w| {
            let w = Vec::<f32>::try_from(w.flatten(0, -1)).unwrap_or_default();
            let din = w.len() / h.max(1);
            let rows = (0..h).map(|j| {
                let row = &w[j * din..(j + 1) * din];
                if p.image.is_some() {
                    let m = row.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let bytes: Vec<u8> = row
                        .iter()
                        .map(|v| {
                            ((v / m.max(1e-12)) * 127.0).round().clamp(-127.0, 127.0) as i8 as u8
                        })
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
        })
}

/// The shown rows as images: `{lo, hi, rows: {row: base64 of u8 pixels}}`,
/// one scale for all of them (None when no row is shown as an image).
fn pixels_json(pixels: &HashMap<i64, Vec<f32>>) -> Option<Value> {
    (!pixels.is_empty()).then(|| {
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
    })
}

/// The labels of the shown rows: `{row: text}`.
fn labels_json(labels: &HashMap<i64, String>) -> Value {
    let m: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(r, t)| (r.to_string(), Value::String(t.clone())))
        .collect();
    Value::Object(m)
}

/// Band samples: per latent `[rows of band 1, 2, 3]`, and likewise their
/// values (`[]` for a latent with none).
fn samples_json(x: &Samples, h: usize) -> (Vec<Value>, Vec<Value>) {
    let per_latent = |j: usize, vals: bool| -> Value {
        let bands: Vec<Value> = (0..BANDS as usize)
            .map(|b| {
                if vals {
                    Value::Array(
                        x.values_of(j, b)
                            .iter()
                            .map(|&v| html::num(v as f64))
                            .collect(),
                    )
                } else {
                    json!(x.rows_of(j, b))
                }
            })
            .collect();
        if (0..BANDS as usize).all(|b| x.rows_of(j, b).is_empty()) {
            json!([])
        } else {
            Value::Array(bands)
        }
    };
    (
        (0..h).map(|j| per_latent(j, false)).collect(),
        (0..h).map(|j| per_latent(j, true)).collect(),
    )
}

/// Top tokens: each distinct string once in the table, and per latent
/// `[index, count, index, count, ...]`.
fn tokens_json(all: &[Vec<(String, usize)>]) -> (Vec<String>, Vec<Value>) {
    let mut table: Vec<String> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    let per: Vec<Value> = all
        .iter()
        .map(|list| {
            let mut v = Vec::with_capacity(2 * list.len());
            for (t, c) in list {
                let i = *index.entry(t.as_str()).or_insert_with(|| {
                    table.push(t.clone());
                    table.len() - 1
                });
                v.push(i);
                v.push(*c);
            }
            json!(v)
        })
        .collect();
    (table, per)
}

/// The summary box: `[key, value]` pairs in display order.
fn summary_json(model: &Sae, p: &Page, opts: &Options) -> Vec<Value> {
    let s = p.stats;
    let h = s.d_hidden as usize;
    let dead = (0..h).filter(|&j| s.dead(j)).count();
    let l0: f64 = s.frequency.iter().sum();
    let activation = format!("{:?}", model.spec.activation)
        .to_lowercase()
        .replace(['{', '}'], "")
        .replace("  ", " ");
    let shown_as = match p.image {
        Some((a, b)) => format!("{a}x{b} images"),
        None if p.text => "tokens in context (--labels, ⟦marked⟧)".to_string(),
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
        (
            "samples per band",
            json!(p.samples.map_or("none".to_string(), |x| format!(
                "{} from each third of the max",
                x.per
            ))),
        ),
        ("rows shown as", json!(shown_as)),
    ];
    summary.into_iter().map(|(k, v)| json!([k, v])).collect()
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
    fn band_samples_are_the_smallest_keys_of_each_band_in_any_chunking() {
        let mut rng = crate::data::dataset::SplitMix64(11);
        let (n, h, per) = (97usize, 6usize, 3usize);
        // Latent 4 never fires; latent 5 on two rows.
        let z: Vec<Vec<f32>> = (0..n)
            .map(|i| {
                (0..h)
                    .map(|j| match j {
                        4 => 0.0,
                        5 => [0.0, 2.0][(i % 40 == 3) as usize],
                        _ => ((rng.below(9) as f32) - 3.0).max(0.0) * 0.37,
                    })
                    .collect()
            })
            .collect();
        let flat: Vec<f32> = z.iter().flatten().copied().collect();
        let t = Tensor::from_slice(&flat).reshape([n as i64, h as i64]);
        let scale: Vec<f32> = (0..h)
            .map(|j| z.iter().map(|r| r[j]).fold(0f32, f32::max))
            .collect();
        // The tensor keys equal the scalar ones (wrapping, logical shifts).
        let x = Tensor::from_slice(&[0i64, 1, 5, 123_456_789, i64::MAX / 3]);
        let got = Vec::<i64>::try_from(sample_keys(&(&x * h as i64 + 2))).unwrap();
        for (i, &xi) in [0i64, 1, 5, 123_456_789, i64::MAX / 3].iter().enumerate() {
            assert_eq!(got[i], sample_key(xi, 2, h as i64));
        }
        let mut first: Option<Samples> = None;
        for chunk in [1i64, 5, 32, 97] {
            let mut s = Sampler::new(&scale, per as i64, Device::Cpu);
            let mut at = 0;
            while at < n as i64 {
                let len = chunk.min(n as i64 - at);
                let zb = t.narrow(0, at, len);
                s.add(&zb, &zb.gt(0.0));
                at += len;
            }
            let got = s.finish();
            for j in 0..h {
                for b in 0..BANDS as usize {
                    // Reference: band members, smallest keys, by value desc.
                    let m = scale[j];
                    let mut cand: Vec<(i64, i64)> = (0..n)
                        .filter(|&i| z[i][j] > 0.0)
                        .filter(|&i| ((z[i][j] * 3.0) / m).ceil().clamp(1.0, 3.0) as usize == b + 1)
                        .map(|i| (sample_key(i as i64, j as i64, h as i64), i as i64))
                        .collect();
                    cand.sort();
                    let mut want: Vec<i64> = cand.iter().take(per).map(|c| c.1).collect();
                    want.sort_by(|&a, &c| {
                        z[c as usize][j]
                            .total_cmp(&z[a as usize][j])
                            .then(a.cmp(&c))
                    });
                    assert_eq!(
                        got.rows_of(j, b),
                        &want[..],
                        "latent {j} band {b} chunk {chunk}"
                    );
                    for (r, v) in got.rows_of(j, b).iter().zip(got.values_of(j, b)) {
                        assert_eq!(*v, z[*r as usize][j]);
                        assert!(
                            *v > b as f32 * m / 3.0 - 1e-6 && *v <= (b + 1) as f32 * m / 3.0 + 1e-6
                        );
                    }
                }
            }
            assert!((0..3).all(|b| got.rows_of(4, b).is_empty()));
            assert_eq!(got.rows_of(5, 2).len(), 3.min(n.div_ceil(40)));
            if let Some(f) = &first {
                assert_eq!(f.rows, got.rows, "chunk {chunk}");
            }
            first = Some(got);
        }
    }

    #[test]
    fn labels_give_tokens_and_keep_their_marker_when_cut() {
        assert_eq!(
            marked_token(" the quick brown\u{27E6} fox\u{27E7} jumps"),
            Some(" fox")
        );
        assert_eq!(marked_token("7"), None);
        assert_eq!(marked_token("a\u{27E6}b"), None);
        let labels: HashMap<i64, String> = [
            (0, "a\u{27E6} cat\u{27E7} sat"),
            (1, "the\u{27E6} dog\u{27E7} ran"),
            (2, "my\u{27E6} dog\u{27E7}!"),
            (3, "7"),
        ]
        .into_iter()
        .map(|(r, t)| (r, t.to_string()))
        .collect();
        let t = top_tokens(&[0, 1, 2, 3, 9], &labels);
        assert_eq!(
            t,
            vec![
                (" dog".to_string(), 2),
                (" cat".to_string(), 1),
                ("7".to_string(), 1)
            ]
        );
        let long = format!("{}\u{27E6}X\u{27E7}{}", "a".repeat(500), "b".repeat(500));
        let cut = trim_label(&long);
        assert_eq!(cut.chars().count(), LABEL_CHARS);
        assert_eq!(marked_token(&cut), Some("X"));
        assert_eq!(trim_label(&"z".repeat(300)), "z".repeat(LABEL_CHARS));
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
