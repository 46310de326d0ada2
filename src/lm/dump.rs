//! `sae activations`: a model source's rows written to `.npy` (float32 or
//! float16) in token order, streamed a few groups of sequences at a time,
//! with an optional labels file (each row's token in context, from a
//! vocabulary) for `sae latents --labels`. The rows are exactly those a
//! training run from the same source sees (the same fixed groups), so
//! training on the dump with `data.stream: true` gives the same model.

use super::source::ModelSource;
use super::vocab::Vocab;
use crate::data::npy::NpyWriter;
use crate::fsutil::{write_atomic, write_error};
use crate::{bail_user, Result};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

pub struct Options {
    pub out: PathBuf,
    /// The values' dtype (float32, float16, bfloat16).
    pub dtype: crate::data::npy::OutDtype,
    pub vocab: Option<Vocab>,
    pub labels: Option<PathBuf>,
    pub progress: bool,
}

/// What was written.
pub struct Written {
    pub rows: usize,
    pub d: i64,
    pub sequences: usize,
    pub seconds: f64,
}

/// Rows per write: about this many, in whole groups of sequences.
const CHUNK_ROWS: usize = 16_384;

/// Checks a vocabulary against the tokens and the model: every id must
/// have a string, and the model must not accept fewer ids than it has.
pub fn check_vocab(source: &ModelSource, vocab: &Vocab, path: &str) -> Result<()> {
    let corpus = &source.corpus;
    let n = vocab.len() as i64;
    for s in 0..corpus.n_seq() {
        if let Some(&id) = corpus.tokens.sequence(s).iter().find(|&&i| i >= n) {
            bail_user!(
                "--vocab: {path} has {n} entries but sequence {s} of {} holds id {id}; \
                 is it the model's tokenizer?",
                corpus.tokens.origin()
            );
        }
    }
    if let Some(v) = corpus.lm.vocab_size(corpus.tokens.ctx) {
        if v < n {
            bail_user!(
                "--vocab: {path} has {n} entries but {} accepts ids 0..{} only ({v} ids); \
                 is it the model's tokenizer?",
                corpus.lm.path().display(),
                v - 1
            );
        }
        if v > n {
            eprintln!(
                "sae: warning: --vocab: {path} has {n} entries, {} accepts {v} ids \
                 (a padded embedding?); every id in the tokens has a string",
                corpus.lm.path().display()
            );
        }
    }
    Ok(())
}

/// The vocabulary at `path` (when given), checked against `source`.
pub fn read_vocab(source: &ModelSource, path: Option<&std::path::Path>) -> Result<Option<Vocab>> {
    let Some(p) = path else {
        return Ok(None);
    };
    let v = Vocab::read(p)?;
    check_vocab(source, &v, &p.display().to_string())?;
    Ok(Some(v))
}

/// Writes every row of `source` to `opts.out` (and the labels).
pub fn write(source: &ModelSource, opts: &Options) -> Result<Written> {
    if opts.labels.is_some() != opts.vocab.is_some() {
        bail_user!("--labels and --vocab: give both (labels are the vocabulary's strings)");
    }
    let start = Instant::now();
    let corpus = &source.corpus;
    let mut npy = NpyWriter::create_as(&opts.out, corpus.d as usize, opts.dtype)?;
    let per_seq = (source.rows() / source.sequences().max(1)).max(1);
    let group = corpus.group();
    let chunk = (CHUNK_ROWS / per_seq).div_ceil(group).max(1) * group;
    let progress = Progress::new(opts.progress, source.sequences());
    let mut rows = 0usize;
    let mut body = |labels: Option<&mut dyn Write>| -> Result<()> {
        let mut labels = labels;
        source.for_each_chunk(chunk, |first, x| {
            npy.write(x)?;
            rows += x.size()[0] as usize;
            let n = (chunk).min(source.sequences() - first);
            if let (Some(w), Some(v)) = (labels.as_deref_mut(), &opts.vocab) {
                for s in first..first + n {
                    let g = source.global(s);
                    let ids = corpus.tokens.sequence(g);
                    for p in corpus.kept_positions(g) {
                        writeln!(w, "{}", v.label(&ids, p)).map_err(|e| {
                            write_error(opts.labels.as_deref().expect("with vocab"), e)
                        })?;
                    }
                }
            }
            progress.update(first + n, rows);
            Ok(())
        })
    };
    match &opts.labels {
        Some(path) => write_atomic(path, |w| body(Some(w)))?,
        None => body(None)?,
    }
    npy.finish()?;
    progress.finish();
    Ok(Written {
        rows,
        d: corpus.d,
        sequences: source.sequences(),
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// A bar on a terminal, else a line about every tenth of the sequences.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: usize,
    next_line: std::cell::Cell<usize>,
    on: bool,
}

impl Progress {
    fn new(on: bool, total: usize) -> Progress {
        let bar = (on && std::io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new(total as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} sequences [{elapsed_precise}<{eta_precise}] {msg}",
                )
                .expect("static template"),
            );
            b
        });
        Progress {
            bar,
            total,
            next_line: std::cell::Cell::new(total.div_ceil(10)),
            on,
        }
    }

    fn update(&self, done: usize, rows: usize) {
        match &self.bar {
            Some(b) => {
                b.set_position(done as u64);
                b.set_message(format!("{rows} rows"));
            }
            None if self.on && done >= self.next_line.get() && done < self.total => {
                eprintln!("activations: {done}/{} sequences, {rows} rows", self.total);
                self.next_line.set(done + self.total.div_ceil(10));
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
