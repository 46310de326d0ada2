//! Out-of-core training data: rows are read from `.npy` files in chunks by a
//! background thread, mixed in a bounded shuffle buffer and handed over as
//! ready batches through a bounded channel. Memory is bounded by the buffer
//! and the prefetch depth, not by the file size.
//!
//! Order: each epoch visits every chunk once in a seeded random order; rows
//! are shuffled within the buffer. This is the usual streaming compromise
//! (as in WebDataset / tf.data): not a global permutation, but every row once
//! per epoch.

use crate::data::dataset::SplitMix64;
use crate::error::user;
use crate::{bail_user, Result};
use std::fs::File;
use std::io::BufReader;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::JoinHandle;

/// Element type of a streamable file.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Elem {
    F32,
    F64,
}

/// One C-order little-endian float `.npy` file, read by row ranges.
#[derive(Debug)]
pub struct NpyRows {
    path: PathBuf,
    file: File,
    offset: u64,
    elem: Elem,
    pub rows: usize,
    pub cols: usize,
}

impl NpyRows {
    pub fn open(path: &Path) -> Result<NpyRows> {
        let origin = path.display().to_string();
        let f = File::open(path).map_err(|e| user(format!("{origin}: cannot open: {e}")))?;
        let prefix = crate::data::npy::read_header_bytes(&mut BufReader::new(&f), &origin)?;
        let header = npyz::NpyHeader::from_reader(std::io::Cursor::new(prefix))
            .map_err(|e| user(format!("{origin}: not a valid .npy file: {e}")))?;
        let npy = npyz::NpyFile::with_header(header, std::io::empty());
        let shape = npy.shape().to_vec();
        let (rows, cols) = match shape.as_slice() {
            [r, c] if *r > 0 && *c > 0 => (*r as usize, *c as usize),
            _ => bail_user!("{origin}: expected a non-empty 2-D array, got shape {shape:?}"),
        };
        if npy.order() != npyz::Order::C {
            bail_user!("{origin}: streaming needs C order; save with np.ascontiguousarray or set data.stream: false");
        }
        let elem = match npy.dtype() {
            npyz::DType::Plain(ts) if ts.to_string() == "<f4" => Elem::F32,
            npyz::DType::Plain(ts) if ts.to_string() == "<f8" => Elem::F64,
            other => bail_user!(
                "{origin}: streaming reads little-endian float32/float64, not {}; convert it or set data.stream: false",
                other.descr()
            ),
        };
        let width = match elem {
            Elem::F32 => 4,
            Elem::F64 => 8,
        };
        let len = f.metadata()?.len();
        let data_bytes = (rows * cols * width) as u64;
        if len < data_bytes {
            bail_user!("{origin}: file holds {len} bytes, too few for {rows}x{cols} values; is it truncated?");
        }
        let offset = len - data_bytes;
        Ok(NpyRows {
            path: path.to_owned(),
            file: f,
            offset,
            elem,
            rows,
            cols,
        })
    }

    /// Reads rows `start..start+count` as float32, row-major.
    pub fn read(&self, start: usize, count: usize) -> Result<Vec<f32>> {
        let n = count * self.cols;
        match self.elem {
            Elem::F32 => {
                let mut buf = vec![0u8; n * 4];
                self.file
                    .read_exact_at(&mut buf, self.offset + (start * self.cols * 4) as u64)?;
                Ok(buf
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect())
            }
            Elem::F64 => {
                let mut buf = vec![0u8; n * 8];
                self.file
                    .read_exact_at(&mut buf, self.offset + (start * self.cols * 8) as u64)?;
                Ok(buf
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
                    .collect())
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A `.npy` file or a directory of `.npy` shards, as one row sequence.
#[derive(Debug)]
pub struct RowSource {
    pub files: Vec<NpyRows>,
    pub cols: usize,
}

impl RowSource {
    pub fn open(spec: &str) -> Result<RowSource> {
        let path = Path::new(spec);
        let paths: Vec<PathBuf> = if path.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| user(format!("{spec}: cannot list: {e}")))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "npy"))
                .collect();
            v.sort();
            if v.is_empty() {
                bail_user!("{spec}: directory holds no .npy shards");
            }
            v
        } else if path.is_file() {
            vec![path.to_owned()]
        } else {
            bail_user!(
                "{spec}: no such file (streaming takes a .npy file or a directory of shards)"
            );
        };
        let files: Vec<NpyRows> = paths
            .iter()
            .map(|p| NpyRows::open(p))
            .collect::<Result<_>>()?;
        let cols = files[0].cols;
        if let Some(f) = files.iter().find(|f| f.cols != cols) {
            bail_user!(
                "{}: has {} columns but {} has {cols}",
                f.path().display(),
                f.cols,
                files[0].path().display()
            );
        }
        Ok(RowSource { files, cols })
    }

    pub fn rows(&self) -> usize {
        self.files.iter().map(|f| f.rows).sum()
    }

    /// (file index, first row, row count) for every chunk of `chunk` rows.
    fn chunks(&self, chunk: usize) -> Vec<(usize, usize, usize)> {
        let mut out = Vec::new();
        for (i, f) in self.files.iter().enumerate() {
            let mut s = 0;
            while s < f.rows {
                let n = chunk.min(f.rows - s);
                out.push((i, s, n));
                s += n;
            }
        }
        out
    }

    /// Visits every row in file order, `chunk` rows at a time (for statistics
    /// and evaluation).
    pub fn for_each_chunk<F: FnMut(&[f32], usize) -> Result<()>>(
        &self,
        chunk: usize,
        mut f: F,
    ) -> Result<()> {
        for (i, s, n) in self.chunks(chunk) {
            let rows = self.files[i].read(s, n)?;
            if let Some(j) = rows.iter().position(|v| !v.is_finite()) {
                bail_user!(
                    "{}: value at row {}, column {} is {}; remove non-finite rows first",
                    self.files[i].path().display(),
                    s + j / self.cols,
                    j % self.cols,
                    rows[j]
                );
            }
            f(&rows, n)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
pub struct StreamOptions {
    pub batch: usize,
    /// Rows read per disk request.
    pub chunk_rows: usize,
    /// Rows mixed together before batches are cut.
    pub buffer_rows: usize,
    /// Ready batches queued ahead of the training loop.
    pub prefetch: usize,
    pub seed: u64,
    pub shuffle: bool,
}

/// A batch of rows (row-major float32) with its row count.
pub struct Batch {
    pub data: Vec<f32>,
    pub rows: usize,
}

/// One epoch of batches, produced by a background thread.
pub struct EpochStream {
    rx: Receiver<Result<Batch>>,
    handle: Option<JoinHandle<()>>,
}

impl Iterator for EpochStream {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Self::Item> {
        self.rx.recv().ok()
    }
}

impl Drop for EpochStream {
    fn drop(&mut self) {
        // Dropping the receiver makes the producer's next send fail and stop.
        let (_tx, rx) = sync_channel(0);
        self.rx = rx;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Starts streaming epoch `epoch` of `source`.
pub fn epoch(source: std::sync::Arc<RowSource>, epoch: i64, opt: StreamOptions) -> EpochStream {
    let (tx, rx) = sync_channel(opt.prefetch.max(1));
    let handle = std::thread::spawn(move || {
        let cols = source.cols;
        let mut rng = SplitMix64(opt.seed ^ (epoch as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
        let mut chunks = source.chunks(opt.chunk_rows.max(1));
        if opt.shuffle {
            for i in (1..chunks.len()).rev() {
                chunks.swap(i, rng.below(i as u64 + 1) as usize);
            }
        }
        let cap = opt.buffer_rows.max(opt.batch);
        let mut buf: Vec<f32> = Vec::with_capacity(cap * cols);
        let emit = |buf: &mut Vec<f32>, last: bool, rng: &mut SplitMix64| -> bool {
            let rows = buf.len() / cols;
            if opt.shuffle {
                for i in (1..rows).rev() {
                    let j = rng.below(i as u64 + 1) as usize;
                    if i != j {
                        for c in 0..cols {
                            buf.swap(i * cols + c, j * cols + c);
                        }
                    }
                }
            }
            // Cut full batches; keep the remainder in the buffer unless last.
            let full = rows / opt.batch;
            let take = if last { rows } else { full * opt.batch };
            let mut start = 0;
            while start < take {
                let n = opt.batch.min(take - start);
                let data = buf[start * cols..(start + n) * cols].to_vec();
                if tx.send(Ok(Batch { data, rows: n })).is_err() {
                    return false;
                }
                start += n;
            }
            buf.drain(..take * cols);
            true
        };
        for (i, s, n) in chunks {
            let rows = match source.files[i].read(s, n) {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            buf.extend_from_slice(&rows);
            if buf.len() / cols >= cap && !emit(&mut buf, false, &mut rng) {
                return;
            }
        }
        if !buf.is_empty() {
            emit(&mut buf, true, &mut rng);
        }
    });
    EpochStream {
        rx,
        handle: Some(handle),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, rows: usize, cols: usize) {
        let t = tch::Tensor::arange((rows * cols) as i64, (tch::Kind::Float, tch::Device::Cpu))
            .reshape([rows as i64, cols as i64]);
        crate::data::npy::write_npy(path, &t).unwrap();
    }

    #[test]
    fn every_row_once_per_epoch_in_bounded_batches() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("a.npy"), 1000, 3);
        write(&dir.path().join("b.npy"), 37, 3);
        let src = std::sync::Arc::new(RowSource::open(dir.path().to_str().unwrap()).unwrap());
        assert_eq!(src.rows(), 1037);
        let opt = StreamOptions {
            batch: 64,
            chunk_rows: 50,
            buffer_rows: 200,
            prefetch: 2,
            seed: 3,
            shuffle: true,
        };
        let mut firsts: Vec<Vec<f32>> = Vec::new();
        for e in 0..2 {
            let mut seen = Vec::new();
            let mut sizes = Vec::new();
            for b in epoch(src.clone(), e, opt) {
                let b = b.unwrap();
                sizes.push(b.rows);
                for r in 0..b.rows {
                    seen.push(b.data[r * 3]);
                }
            }
            assert!(
                sizes[..sizes.len() - 1].iter().all(|&s| s == 64),
                "{sizes:?}"
            );
            firsts.push(seen.clone());
            seen.sort_by(|a, b| a.total_cmp(b));
            // Row r of file a starts with 3r; of file b (also arange) with 3r.
            let mut want: Vec<f32> = (0..1000)
                .map(|r| (3 * r) as f32)
                .chain((0..37).map(|r| (3 * r) as f32))
                .collect();
            want.sort_by(|a, b| a.total_cmp(b));
            assert_eq!(seen, want, "epoch {e}: every row exactly once");
        }
        assert_ne!(
            firsts[0], firsts[1],
            "epochs should be shuffled differently"
        );
        // Same seed, same order.
        let again: Vec<f32> = epoch(src.clone(), 0, opt)
            .flat_map(|b| {
                let b = b.unwrap();
                (0..b.rows).map(move |r| b.data[r * 3]).collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(again, firsts[0]);
    }

    #[test]
    fn stopping_early_does_not_hang() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("a.npy"), 5000, 2);
        let src = std::sync::Arc::new(
            RowSource::open(dir.path().join("a.npy").to_str().unwrap()).unwrap(),
        );
        let opt = StreamOptions {
            batch: 10,
            chunk_rows: 100,
            buffer_rows: 100,
            prefetch: 1,
            seed: 0,
            shuffle: false,
        };
        let mut s = epoch(src, 0, opt);
        let first = s.next().unwrap().unwrap();
        assert_eq!(&first.data[..4], &[0.0, 1.0, 2.0, 3.0]);
        drop(s);
    }
}
