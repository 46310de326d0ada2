//! Out-of-core data: a float32 C-order `.npy` file memory-mapped and viewed
//! as a tensor without copying, for the whole-file passes of `data.stream:
//! true` (normalisation fit, final metrics) and `sae eval`; the kernel pages
//! rows in and, under memory pressure, drops clean pages again, so resident
//! memory is bounded by what a pass touches, not by the file. Training
//! batches are read ahead by `data::window` instead.

use crate::error::user;
use crate::{bail_user, Result};
use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// A mapped array; the tensor borrows the mapping, so keep both together.
pub struct Mapped {
    pub tensor: Tensor,
    _map: Arc<memmap2::Mmap>,
    file: Arc<File>,
    offset: usize,
    /// The mapped file (a data spec may add `:key` to it).
    path: std::path::PathBuf,
}

impl Mapped {
    /// The same rows for reading with `pread` (see `data::window`). The
    /// mapped file itself is opened again (for O_DIRECT), whatever `_spec`
    /// adds to its name (`x.safetensors:key`).
    pub fn row_file(&self, _spec: &Path) -> crate::data::window::RowFile {
        let size = self.tensor.size();
        crate::data::window::RowFile::open(
            &self.path,
            self.file.clone(),
            self.offset as u64,
            size[0] as usize,
            size[1] as usize,
        )
    }
}

impl std::fmt::Debug for Mapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mapped({:?})", self.tensor.size())
    }
}

/// Maps `path` as a `[rows, cols]` float32 tensor (CPU, read-only).
pub fn map_npy(path: &Path) -> Result<Mapped> {
    let origin = path.display().to_string();
    let file = File::open(path).map_err(|e| user(format!("{origin}: cannot open: {e}")))?;
    let prefix = crate::data::npy::read_header_bytes(&mut BufReader::new(&file), &origin)?;
    let header = npyz::NpyHeader::from_reader(std::io::Cursor::new(&prefix))
        .map_err(|e| user(format!("{origin}: not a valid .npy file: {e}")))?;
    let npy = npyz::NpyFile::with_header(header, std::io::empty());
    let (rows, cols) = match npy.shape() {
        [r, c] if *r > 0 && *c > 0 => (*r as usize, *c as usize),
        other => bail_user!("{origin}: expected a non-empty 2-D array, got shape {other:?}"),
    };
    let little_f32 = matches!(npy.dtype(), npyz::DType::Plain(ts) if ts.to_string() == "<f4");
    if !little_f32 || npy.order() != npyz::Order::C {
        bail_user!(
            "{origin}: data.stream maps little-endian float32 C-order arrays only; convert with \
             np.save(path, np.ascontiguousarray(x, dtype='<f4')) or set data.stream: false"
        );
    }
    let offset = prefix.len();
    map_f32(path, file, offset, rows, cols, &origin)
}

/// Maps `[rows, cols]` little-endian float32 C-order values at byte
/// `offset` of `file`.
fn map_f32(
    path: &Path,
    file: File,
    offset: usize,
    rows: usize,
    cols: usize,
    origin: &str,
) -> Result<Mapped> {
    let len = file.metadata()?.len() as usize;
    if len < offset + rows * cols * 4 {
        bail_user!("{origin}: file is shorter than its header's [{rows}, {cols}] float32 array; is it truncated?");
    }
    // SAFETY: the file is opened read-only; if another process truncates it
    // while we train, reads fault (as with any mmap user) — documented.
    let map = unsafe { memmap2::Mmap::map(&file) }
        .map_err(|e| user(format!("{origin}: cannot map: {e}")))?;
    let map = Arc::new(map);
    // SAFETY: the pointer stays valid while `_map` lives, and `Mapped` keeps
    // both; the tensor is only read (training never writes to its input).
    let tensor = unsafe {
        Tensor::from_blob(
            map.as_ptr().add(offset),
            &[rows as i64, cols as i64],
            &[cols as i64, 1],
            Kind::Float,
            Device::Cpu,
        )
    };
    Ok(Mapped {
        tensor,
        _map: map,
        file: Arc::new(file),
        offset,
        path: path.to_owned(),
    })
}

/// `data.stream`'s source: a float32 C-order `.npy`, or one `.safetensors`
/// file whose tensor is float32 (little-endian, C order, as the format
/// stores it). Anything else is refused with the way to convert it.
pub fn map_spec(spec: &str) -> Result<Mapped> {
    use crate::data::sources::{self, Other};
    let convert = |what: &str, python: &str| {
        user(format!(
            "{spec}: data.stream reads a float32 .npy or one float32 .safetensors file, not {what}; \
             set data.stream: false (read into memory), or convert it once: python -c \"{python}\" \
             and train on x.npy"
        ))
    };
    match sources::detect(spec)? {
        None => map_npy(Path::new(spec)),
        Some(Other::Safetensors(s)) => {
            // Each file's tensor, by the name read (or the only one).
            let tensor = match spec.rsplit_once(':') {
                Some((_, key)) if s.shards.iter().any(|x| x.origin.ends_with(&format!(":{key}"))) => {
                    format!("st.load_file(f)['{key}']")
                }
                _ => "next(iter(st.load_file(f).values()))".to_owned(),
            };
            let python = |files: String| {
                format!(
                    "import glob, numpy as np, safetensors.torch as st; np.save('x.npy', \
                     np.concatenate([{tensor}.float().numpy() for f in {files}]))"
                )
            };
            match s.shards.as_slice() {
                [one] if one.dtype == safetensors::Dtype::F32 => {
                    let file = File::open(&one.path)
                        .map_err(|e| user(format!("{}: cannot open: {e}", one.origin)))?;
                    map_f32(&one.path, file, one.offset, one.rows, one.cols, &one.origin)
                }
                [one] => Err(convert(
                    &format!("{:?} values", one.dtype),
                    &python(format!("['{}']", one.path.display())),
                )),
                [first, ..] => {
                    let dir = first.path.parent().unwrap_or(Path::new("."));
                    Err(convert(
                        "a directory of shards",
                        &python(format!("sorted(glob.glob('{}/*.safetensors'))", dir.display())),
                    ))
                }
                [] => unreachable!("a spec has at least one shard"),
            }
        }
        Some(Other::Cache(c)) => Err(convert(
            "a SAELens activation cache",
            &format!(
                "import datasets, numpy as np; a = datasets.load_from_disk('{}').with_format('numpy')[:]['{}']; \
                 np.save('x.npy', a.reshape(-1, a.shape[-1]).astype('<f4'))",
                c.dir.display(),
                c.column
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NormalizeKind;
    use crate::normalize::Normalizer;

    #[test]
    fn mapped_tensor_equals_the_file_and_chunked_fit_equals_fit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.npy");
        let x = Tensor::randn([257, 5], (Kind::Float, Device::Cpu)) * 3.0 + 1.0;
        crate::data::npy::write_npy(&p, &x).unwrap();
        let m = map_npy(&p).unwrap();
        assert!(m.tensor.equal(&x));
        for kind in [
            NormalizeKind::Standardize,
            NormalizeKind::Minmax,
            NormalizeKind::ExpectedNorm,
        ] {
            let a = Normalizer::fit(kind, &x, 1e-3);
            let b = Normalizer::fit_chunked(kind, &m.tensor, 10, "x", 1e-3).unwrap();
            for (u, v) in [(&a.shift, &b.shift), (&a.scale, &b.scale)] {
                let (u, v) = (u.as_ref().unwrap(), v.as_ref().unwrap());
                assert!(u.allclose(v, 1e-5, 1e-5, false), "{kind:?}: {u} vs {v}");
            }
        }
        // Non-finite rows are named.
        let bad = x.copy();
        let _ = bad.get(200).get(3).fill_(f64::NAN);
        let err = Normalizer::fit_chunked(NormalizeKind::None, &bad, 64, "x", 1e-3).unwrap_err();
        assert!(format!("{err}").contains("row 200"), "{err}");
        // Other layouts are refused with a way out.
        let f64p = dir.path().join("d.npy");
        let mut dict = "{'descr': '<f8', 'fortran_order': False, 'shape': (1, 1), }".to_string();
        while !(10 + dict.len() + 1).is_multiple_of(64) {
            dict.push(' ');
        }
        dict.push('\n');
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend_from_slice(&(dict.len() as u16).to_le_bytes());
        bytes.extend_from_slice(dict.as_bytes());
        bytes.extend_from_slice(&[0u8; 8]);
        std::fs::write(&f64p, bytes).unwrap();
        let err = map_npy(&f64p).unwrap_err();
        assert!(format!("{err}").contains("data.stream: false"), "{err}");
    }
}
