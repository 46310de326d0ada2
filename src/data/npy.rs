//! `.npy` / `.npz` reading into a float32 matrix, and float32 `.npy` writing.
//!
//! Accepted: float16/32/64 and integer dtypes (cast to float32), C or Fortran
//! order, either endianness, 2-D arrays. A data spec is a `.npy` path, a
//! `file.npz:key` member, or a directory of `.npy` shards read as one array.

use crate::error::user;
use crate::{bail_user, Result};
use anyhow::Context;
use npyz::{DType, NpyFile, Order, TypeChar};
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use tch::Tensor;

/// A dense row-major float32 matrix.
#[derive(Debug, Clone)]
pub struct Matrix {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl Matrix {
    pub fn to_tensor(&self) -> Tensor {
        Tensor::from_slice(&self.data).reshape([self.rows as i64, self.cols as i64])
    }
}

/// Reads a data spec (see module docs) as a float32 matrix.
pub fn read_matrix(spec: &str) -> Result<Matrix> {
    let path = Path::new(spec);
    if path.is_dir() {
        return read_shards(path);
    }
    if let Some((file, key)) = split_npz(spec) {
        return read_npz_member(Path::new(file), key);
    }
    if !path.exists() {
        bail_user!("{spec}: no such file");
    }
    if spec.ends_with(".npz") {
        bail_user!("{spec}: an .npz archive needs a member name: {spec}:KEY");
    }
    let file = File::open(path).map_err(|e| user(format!("{spec}: cannot open: {e}")))?;
    read_npy(BufReader::new(file), spec)
}

/// `file.npz:key` → (`file.npz`, `key`), when the file part ends in `.npz`.
fn split_npz(spec: &str) -> Option<(&str, &str)> {
    let (file, key) = spec.rsplit_once(':')?;
    file.ends_with(".npz").then_some((file, key))
}

fn read_npz_member(file: &Path, key: &str) -> Result<Matrix> {
    let origin = format!("{}:{key}", file.display());
    let f = File::open(file).map_err(|e| user(format!("{}: cannot open: {e}", file.display())))?;
    let mut zip = npyz::zip::ZipArchive::new(BufReader::new(f))
        .map_err(|e| user(format!("{}: not a valid .npz archive: {e}", file.display())))?;
    let names: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.strip_suffix(".npy").map(str::to_owned))
        .collect();
    let member = match zip.by_name(&format!("{key}.npy")) {
        Ok(m) => m,
        Err(_) => bail_user!(
            "{origin}: no array `{key}` in the archive (it has: {})",
            names.join(", ")
        ),
    };
    read_npy(BufReader::new(member), &origin)
}

fn read_shards(dir: &Path) -> Result<Matrix> {
    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| user(format!("{}: cannot list: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "npy"))
        .collect();
    shards.sort();
    if shards.is_empty() {
        bail_user!("{}: directory holds no .npy shards", dir.display());
    }
    let mut out: Option<Matrix> = None;
    for shard in &shards {
        let m = read_matrix(&shard.display().to_string())?;
        match &mut out {
            None => out = Some(m),
            Some(acc) => {
                if acc.cols != m.cols {
                    bail_user!(
                        "{}: has {} columns but earlier shards have {}",
                        shard.display(),
                        m.cols,
                        acc.cols
                    );
                }
                acc.data.extend_from_slice(&m.data);
                acc.rows += m.rows;
            }
        }
    }
    Ok(out.expect("at least one shard"))
}

/// Reads one `.npy` stream; `origin` names it in errors.
pub fn read_npy<R: Read>(reader: R, origin: &str) -> Result<Matrix> {
    let npy =
        NpyFile::new(reader).map_err(|e| user(format!("{origin}: not a valid .npy file: {e}")))?;
    let shape: Vec<u64> = npy.shape().to_vec();
    let (rows, cols) = match shape.as_slice() {
        [r, c] => (*r as usize, *c as usize),
        other => bail_user!(
            "{origin}: expected a 2-D array [rows, features], got shape {:?}",
            other
        ),
    };
    if rows == 0 || cols == 0 {
        bail_user!(
            "{origin}: array has shape [{rows}, {cols}]; need at least one row and one column"
        );
    }
    let order = npy.order();
    let ts = match npy.dtype() {
        DType::Plain(ts) => ts,
        other => bail_user!(
            "{origin}: structured dtype {} is not supported; save a plain float array",
            other.descr()
        ),
    };
    let size = ts.size_field();
    let truncated = |e: std::io::Error| {
        user(format!(
            "{origin}: cannot read data ({e}); is the file truncated?"
        ))
    };
    let data: Vec<f32> = match (ts.type_char(), size) {
        (TypeChar::Float, 4) => npy.into_vec::<f32>().map_err(truncated)?,
        (TypeChar::Float, 8) => cast(npy.into_vec::<f64>().map_err(truncated)?, |v| v as f32),
        (TypeChar::Float, 2) => cast(npy.into_vec::<half::f16>().map_err(truncated)?, f32::from),
        (TypeChar::Int, 1) => cast(npy.into_vec::<i8>().map_err(truncated)?, f32::from),
        (TypeChar::Int, 2) => cast(npy.into_vec::<i16>().map_err(truncated)?, f32::from),
        (TypeChar::Int, 4) => cast(npy.into_vec::<i32>().map_err(truncated)?, |v| v as f32),
        (TypeChar::Int, 8) => cast(npy.into_vec::<i64>().map_err(truncated)?, |v| v as f32),
        (TypeChar::Uint, 1) => cast(npy.into_vec::<u8>().map_err(truncated)?, f32::from),
        (TypeChar::Uint, 2) => cast(npy.into_vec::<u16>().map_err(truncated)?, f32::from),
        (TypeChar::Uint, 4) => cast(npy.into_vec::<u32>().map_err(truncated)?, |v| v as f32),
        (TypeChar::Uint, 8) => cast(npy.into_vec::<u64>().map_err(truncated)?, |v| v as f32),
        _ => bail_user!(
            "{origin}: dtype `{}` is not supported; use float16/32/64 or an integer type",
            ts
        ),
    };
    if data.len() != rows * cols {
        bail_user!(
            "{origin}: header says {rows}x{cols} values but the file holds {}",
            data.len()
        );
    }
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        bail_user!(
            "{origin}: value at row {}, column {} is {}; remove non-finite rows first",
            if order == Order::C {
                i / cols
            } else {
                i % rows
            },
            if order == Order::C {
                i % cols
            } else {
                i / rows
            },
            data[i]
        );
    }
    let data = match order {
        Order::C => data,
        Order::Fortran => fortran_to_c(&data, rows, cols),
    };
    Ok(Matrix { data, rows, cols })
}

fn cast<T: Copy, F: Fn(T) -> f32>(v: Vec<T>, f: F) -> Vec<f32> {
    v.into_iter().map(f).collect()
}

fn fortran_to_c(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; data.len()];
    for c in 0..cols {
        for r in 0..rows {
            out[r * cols + c] = data[c * rows + r];
        }
    }
    out
}

/// Reads a 2-D float32 tensor from a data spec.
pub fn read_tensor(spec: &str) -> Result<Tensor> {
    Ok(read_matrix(spec)?.to_tensor())
}

/// The `.npy` v1.0 header for a little-endian float32 C-order array.
fn npy_header(shape: &[i64]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_txt = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_txt}, }}");
    // Magic (6) + version (2) + length (2) + dict + '\n' is a multiple of 64.
    let unpadded = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

/// Writes a tensor as float32 C-order `.npy`, atomically.
pub fn write_npy(path: &Path, t: &Tensor) -> Result<()> {
    let t = t
        .to_device(tch::Device::Cpu)
        .to_kind(tch::Kind::Float)
        .contiguous();
    let shape = t.size();
    let values: Vec<f32> = Vec::<f32>::try_from(t.flatten(0, -1)).context("tensor to vec")?;
    crate::fsutil::write_atomic(path, |w| {
        w.write_all(&npy_header(&shape))?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        w.write_all(&bytes)?;
        Ok(())
    })
}
