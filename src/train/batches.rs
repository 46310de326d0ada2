//! Where training batches come from: the run's batches from a position on,
//! epoch after epoch. [`Batches`] owns each epoch's order (seeded shuffle,
//! block shuffle for streamed files, or `train.order`) and the way rows
//! arrive: gathered from normalised rows in memory, or read window by window
//! from the mapped file by a reader thread ahead of the loop.

use super::plan::{joined, Data};
use super::state::Position;
use crate::config::{BatchSize, Config};
use crate::data::dataset::{block_shuffled_order, epoch_order, Dataset, EpochBatches, Shard};
use crate::data::window::{Owner, RowFile, WindowReader};
use crate::lm::source::{ModelSource, ModelWindows};
use crate::model::Sae;
use crate::normalize::Normalizer;
use crate::Result;
use std::path::Path;
use std::rc::Rc;
use tch::{Device, Tensor};

/// data.stream: rows per contiguous block, and blocks mixed per window.
const STREAM_BLOCK_ROWS: usize = 4096;
const STREAM_WINDOW_BLOCKS: usize = 16;
const STREAM_WINDOW_ROWS: usize = STREAM_BLOCK_ROWS * STREAM_WINDOW_BLOCKS;

/// The training rows.
pub enum Source {
    /// Normalised rows (input, then the target for transcoders) on the
    /// training device: normalised once.
    Memory(Dataset),
    /// data.stream: the mapped file's raw rows, normalised per batch as it
    /// is gathered, so nothing of the file's size is copied.
    Stream {
        file: RowFile,
        rows: usize,
        norm: Normalizer,
    },
    /// data.model: rows computed by the language model window by window,
    /// in the order a streamed dump of them would be read.
    Model {
        source: Rc<ModelSource>,
        norm: Normalizer,
    },
}

impl Source {
    pub fn new(cfg: &Config, data: &Data, model: &Sae, device: Device) -> Source {
        if let Some(source) = &data.model_source {
            return Source::Model {
                source: source.clone(),
                norm: model.norm.clone(),
            };
        }
        match &data.mapped {
            Some(m) => Source::Stream {
                file: m.row_file(Path::new(cfg.data.train.as_deref().expect("validated"))),
                rows: data.train.size()[0] as usize,
                norm: model.norm.clone(),
            },
            None => Source::Memory(Dataset::new(
                joined(model, &data.train, data.train_target.as_ref(), device),
                device,
            )),
        }
    }

    pub fn rows(&self) -> usize {
        match self {
            Source::Memory(d) => d.rows(),
            Source::Stream { rows, .. } => *rows,
            Source::Model { source, .. } => source.rows(),
        }
    }
}

/// One training batch and where it sits in the run.
pub struct Batch {
    /// Normalised rows (input, then the target for transcoders): this
    /// rank's part of the batch (all of it in a single process).
    pub x: Tensor,
    /// Rows of the whole (global) batch, and where this rank's part starts.
    pub rows: usize,
    pub offset: usize,
    /// Data-parallel streamed or model rows: this rank's rows sit at these
    /// positions of the global batch (its part is not one range).
    pub positions: Option<Tensor>,
    pub epoch: i64,
    /// Its index within the epoch.
    pub index: i64,
    pub end_of_epoch: bool,
}

/// How each epoch orders the rows.
struct Orders {
    rows: usize,
    seed: u64,
    shuffle: bool,
    fixed: Option<Vec<Vec<i64>>>,
    stream: bool,
}

impl Orders {
    fn of(&self, epoch: i64) -> Vec<i64> {
        match &self.fixed {
            Some(o) => o[((epoch - 1) as usize).min(o.len() - 1)].clone(),
            // Streamed data: shuffle within windows of contiguous blocks, so
            // reads stay near-sequential (see block_shuffled_order).
            None if self.stream && self.shuffle => block_shuffled_order(
                self.rows,
                self.seed,
                epoch,
                STREAM_BLOCK_ROWS,
                STREAM_WINDOW_BLOCKS,
            ),
            None => epoch_order(self.rows, self.seed, epoch, self.shuffle),
        }
    }
}

/// The epoch being served.
enum Current {
    Memory(EpochBatches),
    /// The epoch's reader, and the normalisation each batch gets.
    Stream(Reader, Normalizer),
}

/// Windows of a streamed file (read ahead on a thread) or of a model
/// source (computed when reached).
enum Reader {
    File(WindowReader),
    Model(ModelWindows),
}

impl Reader {
    fn prime(&mut self) -> Result<()> {
        match self {
            Reader::File(r) => r.prime(),
            Reader::Model(m) => m.prime(),
        }
    }

    fn next_batch(&mut self, n: usize) -> Result<Tensor> {
        match self {
            Reader::File(r) => r.next_batch(n),
            Reader::Model(m) => m.next_batch(n),
        }
    }

    fn next_owned(&mut self, n: usize) -> Result<(Tensor, Tensor)> {
        match self {
            Reader::File(r) => r.next_owned(n),
            Reader::Model(m) => m.next_owned(n),
        }
    }
}

pub struct Batches {
    source: Source,
    device: Device,
    orders: Orders,
    batch_size: BatchSize,
    shard: Shard,
    epochs: i64,
    per_epoch: i64,
    epoch: i64,
    /// Index (within the epoch) of the first batch served this epoch.
    first: usize,
    /// Rows of the epoch still to serve at its start, and per batch.
    rest_rows: usize,
    batch_rows: usize,
    /// Batches served this epoch.
    served: usize,
    current: Option<Current>,
    /// Each epoch's order is drawn once, by whoever needs it first: streams
    /// draw the next one when they start reading it ahead.
    next_order: Option<Vec<i64>>,
    next_reader: Option<Reader>,
    /// Streams on CUDA: the batch after the one served, its copy to the
    /// device already queued (see [`Batches::next_batch`]).
    ahead: Option<Result<Option<Batch>>>,
}

impl Batches {
    /// Batches from `pos` on, this `shard` of each. A streamed run's first
    /// window is read before this returns (as in-memory data is loaded
    /// before the loop).
    pub fn new(
        source: Source,
        cfg: &Config,
        fixed_order: Option<Vec<Vec<i64>>>,
        per_epoch: i64,
        device: Device,
        pos: &Position,
        shard: Shard,
    ) -> Result<Batches> {
        let orders = Orders {
            rows: source.rows(),
            seed: cfg.seed,
            shuffle: cfg.train.shuffle,
            fixed: fixed_order,
            stream: matches!(source, Source::Stream { .. } | Source::Model { .. }),
        };
        let mut b = Batches {
            source,
            device,
            orders,
            batch_size: cfg.train.batch_size,
            shard,
            epochs: cfg.train.epochs,
            per_epoch,
            epoch: pos.epoch,
            first: 0,
            rest_rows: 0,
            batch_rows: 0,
            served: 0,
            current: None,
            next_order: None,
            next_reader: None,
            ahead: None,
        };
        if pos.epoch <= b.epochs {
            b.begin_epoch(pos.epoch, pos.batch as usize)?;
        }
        Ok(b)
    }

    /// Starts serving `epoch` from its batch `first`.
    fn begin_epoch(&mut self, epoch: i64, first: usize) -> Result<()> {
        let order = self
            .next_order
            .take()
            .unwrap_or_else(|| self.orders.of(epoch));
        let rows_per_batch = match self.batch_size {
            BatchSize::Full => order.len(),
            BatchSize::Rows(r) => r as usize,
        };
        let rest = &order[(first * rows_per_batch).min(order.len())..];
        self.epoch = epoch;
        self.first = first;
        self.served = 0;
        self.rest_rows = rest.len();
        self.batch_rows = match self.batch_size {
            BatchSize::Full => rest.len().max(1),
            BatchSize::Rows(r) => r as usize,
        };
        self.current = Some(match &self.source {
            Source::Memory(d) => Current::Memory(d.batches(rest, self.batch_rows, self.shard)),
            Source::Stream { norm, .. } | Source::Model { norm, .. } => {
                let reader = match self.next_reader.take() {
                    Some(r) => r,
                    None => {
                        let mut r = start_reader(&self.source, rest.to_vec(), self.shard);
                        r.prime()?;
                        r
                    }
                };
                Current::Stream(reader, norm.clone())
            }
        });
        Ok(())
    }

    /// The next batch of the run; `None` after the last epoch. Streamed
    /// rows on CUDA go one batch ahead: the next batch is read and its
    /// copy from pinned memory queued before this one is returned, so the
    /// host prepares it while the device runs this step (nothing waits).
    pub fn next_batch(&mut self) -> Result<Option<Batch>> {
        let ahead =
            matches!(self.device, Device::Cuda(_)) && !matches!(self.source, Source::Memory(_));
        let batch = match self.ahead.take() {
            Some(b) => b,
            None => self.read_batch(),
        };
        if ahead && matches!(batch, Ok(Some(_))) {
            self.ahead = Some(self.read_batch());
        }
        batch
    }

    fn read_batch(&mut self) -> Result<Option<Batch>> {
        if self.current.is_none() {
            return Ok(None);
        }
        while self.served >= self.rest_rows.div_ceil(self.batch_rows) {
            if self.epoch >= self.epochs {
                self.current = None;
                return Ok(None);
            }
            self.begin_epoch(self.epoch + 1, 0)?;
        }
        let left = self.rest_rows - self.served * self.batch_rows;
        self.read_ahead(left);
        let mut positions = None;
        let (x, rows) = match self.current.as_mut().expect("checked") {
            Current::Memory(m) => m.next().expect("one batch per chunk of the order"),
            Current::Stream(r, norm) => {
                let rows = self.batch_rows.min(left);
                let x = match self.shard.world {
                    1 => r.next_batch(rows)?,
                    // Each rank reads (or computes) only the blocks (groups
                    // of sequences) it owns: its part is the batch's rows there.
                    _ => {
                        let (x, at) = r.next_owned(rows)?;
                        positions = Some(crate::device::upload(&at, self.device));
                        x
                    }
                };
                (norm.apply(&crate::device::upload(&x, self.device)), rows)
            }
        };
        let index = (self.first + self.served) as i64;
        self.served += 1;
        Ok(Some(Batch {
            x,
            rows,
            offset: match positions {
                Some(_) => 0,
                None => self.shard.range(rows).0,
            },
            positions,
            epoch: self.epoch,
            index,
            end_of_epoch: index + 1 == self.per_epoch,
        }))
    }

    /// Streams: once the epoch's last window is reached, the next epoch's
    /// reader starts, so only the run's very first window is waited for.
    fn read_ahead(&mut self, left: usize) {
        if matches!(self.source, Source::Memory(_)) {
            return;
        }
        if self.next_reader.is_none() && self.epoch < self.epochs && left <= STREAM_WINDOW_ROWS {
            let order = self.orders.of(self.epoch + 1);
            self.next_reader = Some(start_reader(&self.source, order.clone(), self.shard));
            self.next_order = Some(order);
        }
    }
}

fn start_reader(source: &Source, order: Vec<i64>, shard: Shard) -> Reader {
    let owner = (shard.world > 1).then_some(Owner {
        rank: shard.rank,
        world: shard.world,
    });
    match source {
        Source::Stream { file, .. } => Reader::File(WindowReader::start(
            file,
            order,
            STREAM_BLOCK_ROWS,
            STREAM_WINDOW_ROWS,
            owner,
        )),
        Source::Model { source, .. } => Reader::Model(ModelWindows::new(
            source.clone(),
            order,
            STREAM_BLOCK_ROWS,
            STREAM_WINDOW_ROWS,
            owner,
        )),
        Source::Memory(_) => unreachable!("in-memory data has no reader"),
    }
}
