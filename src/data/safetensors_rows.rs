//! Training rows from `.safetensors` files: one file, `file.safetensors:key`,
//! or a directory of shards (sorted file-name order, like `.npy` shard
//! directories). Each shard holds one 2-D float tensor (float32, float16,
//! bfloat16 or float64), or names one with `:key`; files are memory-mapped
//! and rows converted to float32 a chunk at a time.

use crate::data::npy::{check_finite, DataShape, Matrix};
use crate::error::user;
use crate::{bail_user, Result};
use safetensors::{Dtype, SafeTensors};
use std::fs::File;
use std::path::{Path, PathBuf};

/// Longest stretch converted at once (as `.npy` reading).
const CHUNK_BYTES: usize = 64 << 20;

/// One shard: its mapping and where its tensor lies.
pub struct Shard {
    pub path: PathBuf,
    map: memmap2::Mmap,
    /// `path` or `path:key`, for messages.
    pub origin: String,
    pub dtype: Dtype,
    pub rows: usize,
    pub cols: usize,
    /// Byte offset of the tensor's data in the file.
    pub offset: usize,
}

impl Shard {
    fn bytes(&self) -> &[u8] {
        let n = self.rows * self.cols * self.dtype.size();
        &self.map[self.offset..self.offset + n]
    }
}

/// The shards of a spec, opened and checked.
pub struct Shards {
    pub shards: Vec<Shard>,
}

/// The `.safetensors` files of a directory, sorted by name.
pub fn dir_shards(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| user(format!("{}: cannot list: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// Opens `files`, taking tensor `key` from each (or each file's only tensor).
pub fn open(files: &[PathBuf], key: Option<&str>) -> Result<Shards> {
    let mut shards: Vec<Shard> = Vec::with_capacity(files.len());
    for path in files {
        let shard = open_one(path, key)?;
        if let Some(first) = shards.first() {
            if first.cols != shard.cols {
                bail_user!(
                    "{}: has {} columns but earlier shards have {}",
                    shard.origin,
                    shard.cols,
                    first.cols
                );
            }
        }
        shards.push(shard);
    }
    Ok(Shards { shards })
}

fn open_one(path: &Path, key: Option<&str>) -> Result<Shard> {
    let file_name = path.display().to_string();
    let file = File::open(path).map_err(|e| user(format!("{file_name}: cannot open: {e}")))?;
    // SAFETY: read-only mapping; a file truncated under us faults reads
    // (as for `.npy` streaming, documented there).
    let map = unsafe { memmap2::Mmap::map(&file) }
        .map_err(|e| user(format!("{file_name}: cannot map: {e}")))?;
    let (header_len, meta) = SafeTensors::read_metadata(&map)
        .map_err(|e| user(format!("{file_name}: not a valid .safetensors file: {e:?}")))?;
    let mut names: Vec<String> = meta.tensors().into_keys().collect();
    names.sort();
    let name = match key {
        Some(k) => {
            if meta.info(k).is_none() {
                bail_user!(
                    "{file_name}:{k}: no tensor `{k}` in the file (it has: {})",
                    names.join(", ")
                );
            }
            k.to_owned()
        }
        None => match names.as_slice() {
            [only] => only.clone(),
            [] => bail_user!("{file_name}: holds no tensors"),
            _ => bail_user!(
                "{file_name}: holds {} tensors ({}); name the one to train on: \
                 {file_name}:NAME",
                names.len(),
                names.join(", ")
            ),
        },
    };
    let origin = match key {
        Some(k) => format!("{file_name}:{k}"),
        None => file_name.clone(),
    };
    let info = meta.info(&name).expect("listed above");
    let (rows, cols) = match info.shape.as_slice() {
        [r, c] => (*r, *c),
        other => bail_user!(
            "{origin}: tensor `{name}` has shape {other:?}; expected a 2-D tensor [rows, features] \
             (reshape it to [-1, d] before saving)"
        ),
    };
    if rows == 0 || cols == 0 {
        bail_user!(
            "{origin}: tensor has shape [{rows}, {cols}]; need at least one row and one column"
        );
    }
    if !matches!(
        info.dtype,
        Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64
    ) {
        bail_user!(
            "{origin}: dtype {:?} is not supported; save float32, float16 or bfloat16",
            info.dtype
        );
    }
    // read_metadata checked that the offsets fit the shape and the file.
    let offset = 8 + header_len + info.data_offsets.0;
    Ok(Shard {
        path: path.to_owned(),
        map,
        origin,
        dtype: info.dtype,
        rows,
        cols,
        offset,
    })
}

impl Shards {
    pub fn shape(&self) -> DataShape {
        DataShape {
            rows: self.shards.iter().map(|s| s.rows).sum(),
            cols: self.shards[0].cols,
        }
    }

    /// Calls `f` with chunks of at most `batch` rows, in order.
    pub fn for_each_chunk(
        &self,
        batch: usize,
        f: &mut dyn FnMut(Matrix) -> Result<()>,
    ) -> Result<DataShape> {
        let mut first_row = 0;
        for s in &self.shards {
            let row_bytes = s.cols * s.dtype.size();
            let step = batch.max(1).min((CHUNK_BYTES / row_bytes).max(1));
            let bytes = s.bytes();
            let mut r0 = 0;
            while r0 < s.rows {
                let len = step.min(s.rows - r0);
                let raw = &bytes[r0 * row_bytes..(r0 + len) * row_bytes];
                let data = to_f32(raw, s.dtype);
                check_finite(&data, s.cols, first_row + r0, &s.origin)?;
                f(Matrix {
                    data,
                    rows: len,
                    cols: s.cols,
                })?;
                r0 += len;
            }
            first_row += s.rows;
        }
        Ok(self.shape())
    }
}

/// Little-endian elements of `dtype` as float32.
fn to_f32(raw: &[u8], dtype: Dtype) -> Vec<f32> {
    match dtype {
        Dtype::F32 => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => raw
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => raw
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => raw
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect(),
        _ => unreachable!("checked in open_one"),
    }
}
