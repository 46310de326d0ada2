//! Rows from a language model: the activations of the kept positions of
//! token sequences, in token order (sequence by sequence, position by
//! position), as `sae activations` writes them.
//!
//! Why fixed groups: the model always runs on the same groups of
//! `group` consecutive sequences of the token file (group g = sequences
//! g·group .. (g+1)·group), whoever asks for which rows. A matmul's result
//! for one row can depend on how many rows share the call, so only fixed
//! groups make a row's value a function of the tokens alone: a window
//! recomputed on resume, the same rows read from an `sae activations` dump,
//! and the rows of any other window are then bit-identical.

use super::tokens::Tokens;
use super::LanguageModel;
use crate::data::window::{take_owned, Owner};
use crate::error::user;
use crate::{bail_user, Result};
use std::cell::{Cell, RefCell};
use std::collections::{HashSet, VecDeque};
use std::path::Path;
use std::rc::Rc;
use tch::{Device, Kind, Tensor};

/// What a model source is made of (the `data.*` keys, or `sae activations`'
/// flags).
#[derive(Debug, Clone)]
pub struct Spec {
    pub model: String,
    pub tokens: String,
    pub context_size: Option<usize>,
    pub exclude_tokens: Vec<i64>,
    /// Negative positions count from the sequence's end.
    pub exclude_positions: Vec<i64>,
    /// Sequences per model call.
    pub group: usize,
    pub device: Device,
    /// Flags (`--model`, `--tokens`) rather than config keys name the
    /// files in messages.
    pub cli: bool,
}

impl Spec {
    /// The spec of a config's `data.*` keys (the model on `data.model_device`,
    /// else on the training device `device`).
    pub fn from_config(cfg: &crate::config::Config) -> Result<Spec> {
        let d = &cfg.data;
        let device = match &d.model_device {
            Some(dev) => crate::device::resolve(dev)
                .map_err(|e| user(format!("data.model_device: {}", crate::error::one_line(&e))))?,
            None => crate::device::resolve(&cfg.device)?,
        };
        Ok(Spec {
            model: d.model.clone().expect("validated"),
            tokens: d.tokens.clone().expect("validated"),
            context_size: d.context_size.map(|c| c as usize),
            exclude_tokens: d.exclude_tokens.clone(),
            exclude_positions: d.exclude_positions.clone(),
            group: d.model_batch as usize,
            device,
            cli: false,
        })
    }
}

/// Sequences held out for validation by `data.valid_fraction` (the last
/// ones of the file), leaving at least one to train on.
pub fn held_out(n_seq: usize, fraction: f64) -> Result<usize> {
    let n = match fraction > 0.0 {
        true => ((fraction * n_seq as f64).ceil() as usize).max(1),
        false => 0,
    };
    if n >= n_seq {
        bail_user!(
            "data.valid_fraction: {fraction} of {n_seq} sequence(s) leaves none to train on"
        );
    }
    Ok(n)
}

/// The model, its tokens, and which positions give rows.
pub struct Corpus {
    pub lm: LanguageModel,
    pub tokens: Tokens,
    group: usize,
    exclude_tokens: HashSet<i64>,
    /// Per position: dropped.
    exclude_position: Vec<bool>,
    /// Rows (kept positions) of every sequence of the file.
    kept: Vec<u32>,
    /// The model's output width.
    pub d: i64,
    /// Runs sharing this corpus besides the first (`train_together`): while
    /// there are any, computed windows and row ranges are kept for them.
    sharers: Cell<usize>,
    /// Sequences the model has run on (group by group), for reports, and
    /// those that training windows asked for (this rank's share).
    pub sequences_run: Cell<u64>,
    pub window_sequences: Cell<u64>,
    windows: RefCell<VecDeque<(WindowKey, Window)>>,
    heads: RefCell<Vec<((usize, usize), Tensor)>>,
}

/// A computed window: its rows, and where the order's rows sit in them.
type Window = (Tensor, Rc<Vec<i64>>);

/// Which rows a window holds: the source's first sequence, how many rows
/// the order asks, its first and last and a hash of them all.
type WindowKey = (usize, usize, i64, i64, u64);

/// Windows kept for runs sharing a corpus: they move through the same
/// order within a batch of each other, so at most two are in use.
const KEPT_WINDOWS: usize = 3;

impl Corpus {
    /// Opens the model and tokens, checks every id (negative, or past the
    /// model's vocabulary: named by sequence) and counts the kept positions.
    pub fn open(spec: &Spec) -> Result<Corpus> {
        let (model_key, tokens_key) = match spec.cli {
            true => ("--model", "--tokens"),
            false => ("data.model", "data.tokens"),
        };
        let tokens = Tokens::open(Path::new(&spec.tokens), spec.context_size, tokens_key)?;
        let ctx = tokens.ctx;
        let mut exclude_position = vec![false; ctx];
        for &p in &spec.exclude_positions {
            let q = if p < 0 { ctx as i64 + p } else { p };
            if !(0..ctx as i64).contains(&q) {
                bail_user!(
                    "data.exclude_positions: {p} is outside a sequence of {ctx} positions \
                     (0..{ctx}, or -{ctx}..-1 from the end)"
                );
            }
            exclude_position[q as usize] = true;
        }
        let exclude_tokens: HashSet<i64> = spec.exclude_tokens.iter().copied().collect();
        let mut kept = Vec::with_capacity(tokens.n_seq);
        let (mut max_id, mut ids) = (0i64, Vec::with_capacity(ctx));
        for s in 0..tokens.n_seq {
            ids.clear();
            tokens.sequence_into(s, &mut ids);
            let mut k = 0u32;
            for (p, &id) in ids.iter().enumerate() {
                if id < 0 {
                    bail_user!(
                        "{}: sequence {s} holds the negative id {id} at position {p}",
                        tokens.origin()
                    );
                }
                max_id = max_id.max(id);
                k += u32::from(!exclude_position[p] && !exclude_tokens.contains(&id));
            }
            kept.push(k);
        }
        let rows: u64 = kept.iter().map(|&k| k as u64).sum();
        if rows == 0 {
            bail_user!(
                "{}: data.exclude_tokens / data.exclude_positions drop every position",
                tokens.origin()
            );
        }
        let lm = LanguageModel::open(Path::new(&spec.model), spec.device, model_key)?;
        let mut corpus = Corpus {
            lm,
            tokens,
            group: spec.group.max(1),
            exclude_tokens,
            exclude_position,
            kept,
            d: 0,
            sharers: Cell::new(0),
            sequences_run: Cell::new(0),
            window_sequences: Cell::new(0),
            windows: RefCell::default(),
            heads: RefCell::default(),
        };
        // Id 0 is inside any vocabulary: this first call finds what is
        // wrong with the model itself before ids are blamed.
        let zeros = Tensor::zeros([1, ctx as i64], (Kind::Int64, Device::Cpu));
        corpus.d = corpus.lm.forward(&zeros, "a sequence of id 0")?.size()[2];
        corpus.check_ids(max_id)?;
        Ok(corpus)
    }

    /// Every id must be inside the model's vocabulary: the forward of the
    /// largest one is tried, and when it fails the vocabulary's size is
    /// probed and the first sequence past it named.
    fn check_ids(&self, max_id: i64) -> Result<()> {
        let ctx = self.tokens.ctx;
        if self.lm.accepts(max_id, ctx) {
            return Ok(());
        }
        let Some(v) = self.lm.vocab_size(ctx) else {
            return Ok(());
        };
        for s in 0..self.tokens.n_seq {
            let ids = self.tokens.sequence(s);
            if let Some(p) = ids.iter().position(|&i| i >= v) {
                bail_user!(
                    "{}: sequence {s} holds id {} at position {p}, outside {}'s vocabulary \
                     (its forward accepts ids 0..{})",
                    self.tokens.origin(),
                    ids[p],
                    self.lm.path().display(),
                    v - 1
                );
            }
        }
        Ok(())
    }

    pub fn n_seq(&self) -> usize {
        self.tokens.n_seq
    }

    /// Sequences per model call.
    pub fn group(&self) -> usize {
        self.group
    }

    /// One more run uses this corpus: keep what is computed for it.
    pub fn share(&self) {
        self.sharers.set(self.sharers.get() + 1);
    }

    fn shared(&self) -> bool {
        self.sharers.get() > 0
    }

    /// Kept positions of sequence `s` with ids `ids`.
    fn keeps(&self, ids: &[i64]) -> impl Iterator<Item = usize> + '_ {
        let ids = ids.to_vec();
        (0..ids.len())
            .filter(move |&p| !self.exclude_position[p] && !self.exclude_tokens.contains(&ids[p]))
    }

    /// The kept positions of sequence `s`.
    pub fn kept_positions(&self, s: usize) -> Vec<usize> {
        self.keeps(&self.tokens.sequence(s)).collect()
    }

    /// The model's output for group `g`: float32 `[n, ctx, d]` on the CPU.
    fn run_group(&self, g: usize) -> Result<Tensor> {
        let lo = g * self.group;
        let hi = (lo + self.group).min(self.tokens.n_seq);
        let what = format!("sequences {lo}..{hi}");
        let out = self.lm.forward(&self.tokens.tensor(lo, hi), &what)?;
        self.sequences_run
            .set(self.sequences_run.get() + (hi - lo) as u64);
        if out.size()[2] != self.d {
            bail_user!(
                "{}: forward returned width {} on {what} but {} before",
                self.lm.path().display(),
                out.size()[2],
                self.d
            );
        }
        Ok(out.to_device(Device::Cpu))
    }

    /// The rows of sequences `seqs` (ascending), in order: `[rows, d]`
    /// float32 on the CPU. Each group is run once.
    pub fn rows_of(&self, seqs: &[usize]) -> Result<Tensor> {
        let ctx = self.tokens.ctx;
        let mut parts = Vec::new();
        let mut i = 0;
        while i < seqs.len() {
            let g = seqs[i] / self.group;
            let base = g * self.group;
            let mut flat = Vec::new();
            let mut owners = Vec::new();
            while i < seqs.len() && seqs[i] / self.group == g {
                let s = seqs[i];
                for p in self.kept_positions(s) {
                    flat.push(((s - base) * ctx + p) as i64);
                    owners.push((s, p));
                }
                i += 1;
            }
            if flat.is_empty() {
                continue;
            }
            let out = self.run_group(g)?;
            let rows = out
                .view([-1, self.d])
                .index_select(0, &Tensor::from_slice(&flat));
            self.check_finite(&rows, &owners)?;
            parts.push(rows);
        }
        Ok(match parts.len() {
            0 => Tensor::zeros([0, self.d], (Kind::Float, Device::Cpu)),
            1 => parts.pop().expect("one part"),
            _ => Tensor::cat(&parts, 0),
        })
    }

    /// NaN/Inf activations are refused, naming sequence and position.
    fn check_finite(&self, rows: &Tensor, owners: &[(usize, usize)]) -> Result<()> {
        let ok = rows.isfinite().all_dim(1, false);
        if bool::try_from(ok.all()).unwrap_or(false) {
            return Ok(());
        }
        let bad = ok.logical_not().nonzero().int64_value(&[0, 0]) as usize;
        let (s, p) = owners[bad];
        Err(user(format!(
            "{}: NaN or Inf activations at sequence {s}, position {p} (token id {})",
            self.lm.path().display(),
            self.tokens.sequence(s)[p]
        )))
    }
}

/// The rows of a range of sequences (training or validation).
pub struct ModelSource {
    pub corpus: Rc<Corpus>,
    first: usize,
    /// First row of each sequence of the range, then the row count.
    starts: Vec<u64>,
}

impl ModelSource {
    /// Sequences `lo..hi` of `corpus`.
    pub fn new(corpus: Rc<Corpus>, lo: usize, hi: usize) -> ModelSource {
        let mut starts = Vec::with_capacity(hi - lo + 1);
        let mut acc = 0u64;
        starts.push(0);
        for &k in &corpus.kept[lo..hi] {
            acc += k as u64;
            starts.push(acc);
        }
        ModelSource {
            corpus,
            first: lo,
            starts,
        }
    }

    pub fn rows(&self) -> usize {
        *self.starts.last().expect("starts has the total") as usize
    }

    pub fn sequences(&self) -> usize {
        self.starts.len() - 1
    }

    /// The range's index of the sequence holding row `r`.
    fn sequence_of(&self, r: u64) -> usize {
        self.starts.partition_point(|&s| s <= r) - 1
    }

    /// The rows `rows` ask for: `(data, local)` where `data` holds the
    /// rows of every sequence they touch and `local[i]` is where `rows[i]`
    /// sits in it. Computed, or taken from a run sharing the corpus.
    pub fn window(&self, rows: &[i64], owner: Option<Owner>) -> Result<Window> {
        let corpus = &self.corpus;
        if !corpus.shared() || owner.is_some() {
            return self.compute_window(rows, owner);
        }
        let key = window_key(self.first, rows);
        if let Some((_, w)) = corpus.windows.borrow().iter().find(|(k, _)| *k == key) {
            return Ok((w.0.shallow_clone(), w.1.clone()));
        }
        let w = self.compute_window(rows, None)?;
        let mut kept = corpus.windows.borrow_mut();
        if kept.len() == KEPT_WINDOWS {
            kept.pop_front();
        }
        kept.push_back((key, (w.0.shallow_clone(), w.1.clone())));
        Ok(w)
    }

    /// With an `owner` (data-parallel), only the sequences of the groups
    /// this rank owns are computed; the other rows map to -1.
    fn compute_window(&self, rows: &[i64], owner: Option<Owner>) -> Result<Window> {
        let group = self.corpus.group;
        let mine = |s: usize| owner.is_none_or(|o| o.owns((self.first + s) / group));
        let mut seqs: Vec<usize> = rows
            .iter()
            .map(|&r| self.sequence_of(r as u64))
            .filter(|&s| mine(s))
            .collect();
        seqs.sort_unstable();
        seqs.dedup();
        let counted = &self.corpus.window_sequences;
        counted.set(counted.get() + seqs.len() as u64);
        // Where each touched sequence's rows start in `data`.
        let mut offset = Vec::with_capacity(seqs.len());
        let mut acc = 0u64;
        for &s in &seqs {
            offset.push(acc);
            acc += self.starts[s + 1] - self.starts[s];
        }
        let global: Vec<usize> = seqs.iter().map(|&s| s + self.first).collect();
        let data = self.corpus.rows_of(&global)?;
        let local = rows
            .iter()
            .map(|&r| {
                let s = self.sequence_of(r as u64);
                match seqs.binary_search(&s) {
                    Ok(at) => (offset[at] + r as u64 - self.starts[s]) as i64,
                    Err(_) => -1,
                }
            })
            .collect();
        Ok((data, Rc::new(local)))
    }

    /// The first `n` rows (at most all), in order (computed once for all
    /// runs sharing the corpus).
    pub fn head(&self, n: usize) -> Result<Tensor> {
        let n = n.min(self.rows());
        let key = (self.first, n);
        if let Some((_, t)) = self.corpus.heads.borrow().iter().find(|(k, _)| *k == key) {
            return Ok(t.shallow_clone());
        }
        let t = self.compute_head(n)?;
        if self.corpus.shared() {
            self.corpus
                .heads
                .borrow_mut()
                .push((key, t.shallow_clone()));
        }
        Ok(t)
    }

    fn compute_head(&self, n: usize) -> Result<Tensor> {
        let last = self.sequence_of((n.max(1) - 1) as u64);
        let seqs: Vec<usize> = (self.first..=self.first + last).collect();
        Ok(self.corpus.rows_of(&seqs)?.narrow(0, 0, n as i64))
    }

    /// Every row, in order, computed `chunk` sequences at a time and handed
    /// to `f` with the range's index of the chunk's first sequence.
    pub fn for_each_chunk(
        &self,
        chunk: usize,
        mut f: impl FnMut(usize, &Tensor) -> Result<()>,
    ) -> Result<()> {
        let n = self.sequences();
        let mut s = 0;
        while s < n {
            let e = (s + chunk.max(1)).min(n);
            let seqs: Vec<usize> = (self.first + s..self.first + e).collect();
            f(s, &self.corpus.rows_of(&seqs)?)?;
            s = e;
        }
        Ok(())
    }

    /// The file index of the range's sequence `s`.
    pub fn global(&self, s: usize) -> usize {
        self.first + s
    }
}

/// An epoch's order served from a model source window by window (the
/// windows `data::window` cuts from the order, so a streamed dump of the
/// same rows is served in the same batches). A window is computed when
/// the loop reaches it, on the loop's thread: the model and the SAE step
/// take turns on the same cores.
pub struct ModelWindows {
    source: Rc<ModelSource>,
    /// The order's windows, as ranges of `order`.
    order: Vec<i64>,
    bounds: Vec<(usize, usize)>,
    next: usize,
    /// The current window's rows, where the order's rows sit in them, and
    /// the position reached.
    current: Option<(Tensor, Tensor, i64)>,
    /// Data-parallel: the groups of sequences this rank computes, and the
    /// current window's map (-1: another rank's row).
    owner: Option<Owner>,
    local: Rc<Vec<i64>>,
}

impl ModelWindows {
    pub fn new(
        source: Rc<ModelSource>,
        order: Vec<i64>,
        block: usize,
        window: usize,
        owner: Option<Owner>,
    ) -> Self {
        let max_blocks = window.div_ceil(block.max(1)).max(1);
        let mut bounds = Vec::new();
        let mut at = 0;
        for w in crate::data::window::windows(&order, block.max(1), max_blocks) {
            bounds.push((at, at + w.len()));
            at += w.len();
        }
        ModelWindows {
            source,
            order,
            bounds,
            next: 0,
            current: None,
            owner,
            local: Rc::default(),
        }
    }

    fn advance(&mut self) -> Result<()> {
        let Some(&(lo, hi)) = self.bounds.get(self.next) else {
            bail_user!("data.model: the order ran out of rows before the epoch's end");
        };
        self.next += 1;
        let (data, local) = self.source.window(&self.order[lo..hi], self.owner)?;
        self.current = Some((data, Tensor::from_slice(&local[..]), 0));
        self.local = local;
        Ok(())
    }

    /// The window being served (its rows, their map, the position reached);
    /// the next window once this one is used up.
    fn window(&mut self) -> Result<(&Tensor, &Tensor, &mut i64)> {
        let exhausted = match &self.current {
            Some((_, index, pos)) => *pos >= index.size()[0],
            None => true,
        };
        if exhausted {
            self.advance()?;
        }
        let (data, index, pos) = self.current.as_mut().expect("set above");
        Ok((data, index, pos))
    }

    /// Computes the first window (a run's set-up).
    pub fn prime(&mut self) -> Result<()> {
        if self.current.is_none() {
            self.advance()?;
        }
        Ok(())
    }

    /// Data-parallel: of the next `n` rows of the order, this rank's (those
    /// of sequences in groups it owns) and their positions among the `n`.
    pub fn next_owned(&mut self, n: usize) -> Result<(Tensor, Tensor)> {
        let (mut parts, mut at, mut done) = (Vec::new(), Vec::new(), 0);
        while done < n {
            self.window()?;
            let (data, _, pos) = self.current.as_mut().expect("set by window");
            let (mut idx, mut p) = (Vec::new(), *pos as usize);
            done += take_owned(&self.local, &mut p, n - done, done, &mut idx, &mut at);
            *pos = p as i64;
            parts.push(data.index_select(0, &Tensor::from_slice(&idx)));
        }
        Ok((Tensor::cat(&parts, 0), Tensor::from_slice(&at)))
    }

    /// The next `n` rows of the order, `[n, d]` float32 on the CPU.
    pub fn next_batch(&mut self, n: usize) -> Result<Tensor> {
        crate::data::window::collect_rows(n, |need| {
            let (data, index, pos) = self.window()?;
            Ok(crate::data::window::take_rows(data, index, pos, need))
        })
    }
}

/// The key of the window of `rows` of a source starting at sequence `first`.
fn window_key(first: usize, rows: &[i64]) -> WindowKey {
    // FNV-1a over the row numbers.
    let hash = rows.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &r| {
        (h ^ r as u64).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let (a, b) = (rows.first().copied(), rows.last().copied());
    (first, rows.len(), a.unwrap_or(-1), b.unwrap_or(-1), hash)
}
