//! In-memory datasets, validation splits and seeded mini-batch orders.

use tch::{Device, Kind, Tensor};

/// SplitMix64: a tiny, well-known generator, so the batch order depends on the
/// seed alone (not on libtorch's RNG or the device) and is easy to reproduce.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), by rejection so there is no modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let v = self.next_u64();
            if v < zone {
                return v % n;
            }
        }
    }
}

/// A Fisher–Yates permutation of `0..n` from `seed`.
pub fn permutation(n: usize, seed: u64) -> Vec<i64> {
    let mut rng = SplitMix64(seed);
    let mut p: Vec<i64> = (0..n as i64).collect();
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        p.swap(i, j);
    }
    p
}

/// The order for one epoch: a permutation seeded by (seed, epoch), or 0..n.
pub fn epoch_order(n: usize, seed: u64, epoch: i64, shuffle: bool) -> Vec<i64> {
    if shuffle {
        permutation(n, seed ^ (epoch as u64).wrapping_mul(0xA24B_AED4_963E_E407))
    } else {
        (0..n as i64).collect()
    }
}

/// The order for one epoch of streamed (memory-mapped) data: contiguous
/// blocks of `block` rows in a seeded random order, then rows shuffled within
/// windows of `window` blocks. Every row once per epoch, but the pages a
/// batch touches stay within one window, so reads are near-sequential and the
/// page cache needs only a window's worth of memory, not the file.
pub fn block_shuffled_order(
    n: usize,
    seed: u64,
    epoch: i64,
    block: usize,
    window: usize,
) -> Vec<i64> {
    let block = block.max(1);
    let n_blocks = n.div_ceil(block);
    let blocks = permutation(
        n_blocks,
        seed ^ (epoch as u64).wrapping_mul(0xA24B_AED4_963E_E407),
    );
    let mut rng = SplitMix64(seed ^ 0xB10C ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut out = Vec::with_capacity(n);
    for group in blocks.chunks(window.max(1)) {
        let start = out.len();
        for &b in group {
            let lo = b as usize * block;
            out.extend((lo..(lo + block).min(n)).map(|r| r as i64));
        }
        let rows = &mut out[start..];
        for i in (1..rows.len()).rev() {
            rows.swap(i, rng.below(i as u64 + 1) as usize);
        }
    }
    out
}

/// Reads `train.order`: an int64 `.npy` of shape `[n]` (used every epoch) or
/// `[epochs, n]`, each row a permutation of `0..n`.
pub fn read_order(path: &str, n: usize, epochs: i64) -> crate::Result<Vec<Vec<i64>>> {
    use crate::error::user;
    let f = std::fs::File::open(path)
        .map_err(|e| user(format!("train.order: {path}: cannot open: {e}")))?;
    let npy = npyz::NpyFile::new(std::io::BufReader::new(f))
        .map_err(|e| user(format!("train.order: {path}: not a valid .npy file: {e}")))?;
    let shape = npy.shape().to_vec();
    let rows: Vec<i64> = npy
        .into_vec::<i64>()
        .map_err(|e| user(format!("train.order: {path}: expected int64 values: {e}")))?;
    let orders: Vec<Vec<i64>> = match shape.as_slice() {
        [m] if *m as usize == n => vec![rows],
        [e, m] if *m as usize == n && *e as i64 == epochs => {
            rows.chunks(n).map(|c| c.to_vec()).collect()
        }
        _ => crate::bail_user!(
            "train.order: {path}: shape {shape:?}; expected [{n}] or [{epochs}, {n}] \
             (train.epochs x training rows)"
        ),
    };
    for (e, o) in orders.iter().enumerate() {
        let mut seen = vec![false; n];
        for &i in o {
            if i < 0 || i as usize >= n || std::mem::replace(&mut seen[i as usize], true) {
                crate::bail_user!(
                    "train.order: {path}: row {e} is not a permutation of 0..{n} (bad or repeated index {i})"
                );
            }
        }
    }
    Ok(orders)
}

/// Rows of one float32 matrix, kept on the training device.
#[derive(Debug)]
pub struct Dataset {
    pub x: Tensor,
}

impl Dataset {
    pub fn new(x: Tensor, device: Device) -> Dataset {
        Dataset {
            x: x.to_kind(Kind::Float).to_device(device),
        }
    }

    pub fn rows(&self) -> usize {
        self.x.size()[0] as usize
    }

    pub fn cols(&self) -> i64 {
        self.x.size()[1]
    }

    /// Splits off a validation set: `fraction` of the rows, chosen by a
    /// permutation seeded with `seed`. Returns (train, valid).
    pub fn split(self, fraction: f64, seed: u64) -> (Dataset, Dataset) {
        let n = self.rows();
        let n_valid = ((n as f64) * fraction).round().max(1.0) as usize;
        let perm = permutation(n, seed ^ 0x5EED_5EED);
        let device = self.x.device();
        let idx = |s: &[i64]| Tensor::from_slice(s).to_device(device);
        let valid = self.x.index_select(0, &idx(&perm[..n_valid]));
        let train = self.x.index_select(0, &idx(&perm[n_valid..]));
        (Dataset { x: train }, Dataset { x: valid })
    }

    /// Batches in `order`, `size` rows each (the last may be smaller); of
    /// each, the rows of `shard` (data-parallel: this rank's part).
    pub fn batches(&self, order: &[i64], size: usize, shard: Shard) -> EpochBatches {
        let identity = order.iter().enumerate().all(|(i, &v)| i as i64 == v);
        EpochBatches {
            x: self.x.shallow_clone(),
            // One index tensor per epoch; each batch gathers through a view of it.
            index: (!identity)
                .then(|| crate::device::upload(&Tensor::from_slice(order), self.x.device())),
            len: order.len(),
            size: size.max(1),
            at: 0,
            shard,
        }
    }
}

/// One rank's part of every batch: of `n` rows, rows `n·rank/world ..
/// n·(rank+1)/world` (parts differ by at most one row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Shard {
    /// The whole batch (one process).
    pub const ALL: Shard = Shard { rank: 0, world: 1 };

    /// This shard's rows of a batch of `n`: (first, count).
    pub fn range(&self, n: usize) -> (usize, usize) {
        let lo = n * self.rank / self.world;
        let hi = n * (self.rank + 1) / self.world;
        (lo, hi - lo)
    }
}

/// One epoch's batches of a [`Dataset`], in a fixed order.
pub struct EpochBatches {
    x: Tensor,
    /// The order as a tensor; `None` when it is `0..len` (batches are views).
    index: Option<Tensor>,
    len: usize,
    size: usize,
    at: usize,
    shard: Shard,
}

impl Iterator for EpochBatches {
    /// The shard's rows of the next batch, and the batch's row count.
    type Item = (Tensor, usize);

    fn next(&mut self) -> Option<(Tensor, usize)> {
        if self.at >= self.len {
            return None;
        }
        let n = self.size.min(self.len - self.at);
        let (lo, count) = self.shard.range(n);
        let (at, count) = ((self.at + lo) as i64, count as i64);
        self.at += n;
        Some((
            match &self.index {
                Some(ix) => self.x.index_select(0, &ix.narrow(0, at, count)),
                // Contiguous rows: a view, no gather.
                None => self.x.narrow(0, at, count),
            },
            n,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_shuffled_order_is_a_permutation_local_to_windows() {
        let o = block_shuffled_order(1000, 7, 1, 64, 2);
        let mut sorted = o.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<i64>>());
        assert_ne!(o, block_shuffled_order(1000, 7, 2, 64, 2));
        // The first 128 rows come from exactly two 64-row blocks.
        let mut blocks: Vec<i64> = o[..128].iter().map(|r| r / 64).collect();
        blocks.sort();
        blocks.dedup();
        assert_eq!(blocks.len(), 2);
    }
}
