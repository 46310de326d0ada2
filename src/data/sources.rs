//! Data specs that are not `.npy`/`.npz`: safetensors shards and SAELens
//! activation caches. [`detect`] tells them apart from the path alone (and
//! what a directory holds); `npy::data_shape` / `npy::for_each_chunk` hand
//! them here, so every reader of a data spec takes them.
//!
//! Forms: `x.safetensors`, `x.safetensors:NAME`, a directory of
//! `.safetensors` shards (optionally `DIR:NAME`), a `datasets` directory
//! (`state.json` / `dataset_info.json`: a SAELens cache), `CACHE:COLUMN`.

use crate::data::arrow_cache::{self, Cache};
use crate::data::npy::{DataShape, Matrix};
use crate::data::safetensors_rows::{self, Shards};
use crate::{bail_user, Result};
use std::path::{Path, PathBuf};

pub enum Other {
    Safetensors(Shards),
    Cache(Cache),
}

/// `spec` as (path, key): the whole spec when it exists, else split at the
/// last `:` when the part before it is a safetensors file or a directory.
fn split(spec: &str) -> (&str, Option<&str>) {
    if Path::new(spec).exists() {
        return (spec, None);
    }
    match spec.rsplit_once(':') {
        Some((base, key))
            if !key.is_empty() && (base.ends_with(".safetensors") || Path::new(base).is_dir()) =>
        {
            (base, Some(key))
        }
        _ => (spec, None),
    }
}

/// The source `spec` names when it is not `.npy`/`.npz` (None: it is, or
/// it names nothing; the `.npy` reader reports that).
pub fn detect(spec: &str) -> Result<Option<Other>> {
    let (base, key) = split(spec);
    let path = Path::new(base);
    if path.is_dir() {
        if arrow_cache::is_cache_dir(path) {
            return Ok(Some(Other::Cache(arrow_cache::open(path, key)?)));
        }
        let st = safetensors_rows::dir_shards(path)?;
        if st.is_empty() {
            return Ok(None);
        }
        if has_npy(path) {
            bail_user!(
                "{}: holds both .npy and .safetensors shards; keep one kind per directory",
                path.display()
            );
        }
        return Ok(Some(Other::Safetensors(safetensors_rows::open(&st, key)?)));
    }
    if base.ends_with(".safetensors") {
        if !path.exists() {
            bail_user!("{base}: no such file");
        }
        let files = [PathBuf::from(base)];
        return Ok(Some(Other::Safetensors(safetensors_rows::open(
            &files, key,
        )?)));
    }
    Ok(None)
}

fn has_npy(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .filter_map(|e| e.ok())
            .any(|e| e.path().extension().is_some_and(|x| x == "npy"))
    })
}

impl Other {
    pub fn shape(&self) -> Result<DataShape> {
        match self {
            Other::Safetensors(s) => Ok(s.shape()),
            Other::Cache(c) => c.shape(),
        }
    }

    /// Calls `f` with chunks of exactly `batch` rows (the last may be
    /// shorter), whatever the shard and record-batch boundaries: the same
    /// chunks as one `.npy` of the same rows, so per-chunk results (`sae
    /// encode`'s batched matmuls) are the same too.
    pub fn for_each_chunk(
        &self,
        batch: usize,
        f: &mut dyn FnMut(Matrix) -> Result<()>,
    ) -> Result<DataShape> {
        let batch = batch.max(1);
        let mut pending: Vec<f32> = Vec::new();
        let mut cols = 0;
        let mut take = |m: Matrix| -> Result<()> {
            cols = m.cols;
            if pending.is_empty() && m.rows == batch {
                return f(m);
            }
            // Saturates for "everything in one chunk" (`read_matrix`).
            let full_len = batch.saturating_mul(m.cols);
            let mut data = m.data.as_slice();
            while !data.is_empty() {
                let room = full_len - pending.len();
                let (now, rest) = data.split_at(room.min(data.len()));
                pending.extend_from_slice(now);
                data = rest;
                if pending.len() == full_len {
                    let full = std::mem::take(&mut pending);
                    f(Matrix {
                        data: full,
                        rows: batch,
                        cols: m.cols,
                    })?;
                }
            }
            Ok(())
        };
        let shape = match self {
            Other::Safetensors(s) => s.for_each_chunk(batch, &mut take)?,
            Other::Cache(c) => c.for_each_chunk(batch, &mut take)?,
        };
        if !pending.is_empty() {
            f(Matrix {
                rows: pending.len() / cols,
                data: pending,
                cols,
            })?;
        }
        Ok(shape)
    }
}
