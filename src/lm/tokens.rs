//! Token ids from `.npy`: `[n_seq, ctx]`, or a 1-D stream cut into
//! sequences of `context_size` (a tail shorter than that is dropped, as
//! SAELens and sparsify do). Memory-mapped, so a billion tokens cost no
//! memory up front; any integer dtype, either byte order, C order.

use crate::error::user;
use crate::{bail_user, Result};
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

/// One integer dtype of the file.
#[derive(Debug, Clone, Copy)]
struct IntType {
    bytes: usize,
    signed: bool,
    big_endian: bool,
}

pub struct Tokens {
    map: memmap2::Mmap,
    offset: usize,
    ty: IntType,
    pub n_seq: usize,
    pub ctx: usize,
    origin: String,
}

impl Tokens {
    /// Opens `path`; `context_size` cuts a 1-D stream (and must match a
    /// 2-D file's width when given).
    pub fn open(path: &Path, context_size: Option<usize>, key: &str) -> Result<Tokens> {
        let origin = format!("{key}: {}", path.display());
        let file = File::open(path).map_err(|e| user(format!("{origin}: cannot open: {e}")))?;
        let prefix = crate::data::npy::read_header_bytes(&mut BufReader::new(&file), &origin)?;
        let header = npyz::NpyHeader::from_reader(std::io::Cursor::new(&prefix))
            .map_err(|e| user(format!("{origin}: not a valid .npy file: {e}")))?;
        let npy = npyz::NpyFile::with_header(header, std::io::empty());
        let descr = match npy.dtype() {
            npyz::DType::Plain(ts) => ts.to_string(),
            other => bail_user!("{origin}: expected integer token ids, got the dtype {other:?}"),
        };
        let ty = int_type(&descr).ok_or_else(|| {
            user(format!(
                "{origin}: token ids must be integers (int32/int64, ...), got dtype '{descr}'; \
                 convert with np.save(path, ids.astype(np.int64))"
            ))
        })?;
        let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
        if shape.len() == 2 && npy.order() != npyz::Order::C && shape[0] > 1 && shape[1] > 1 {
            bail_user!(
                "{origin}: a Fortran-order array; save it with np.ascontiguousarray(ids) first"
            );
        }
        let total: usize = shape.iter().product();
        let (n_seq, ctx) = match (shape.as_slice(), context_size) {
            ([n, c], None) => (*n, *c),
            ([n, c], Some(k)) if k == *c => (*n, *c),
            ([_, c], Some(k)) => bail_user!(
                "data.context_size: {k} but {origin} holds sequences of {c} tokens; \
                 drop data.context_size (it is for 1-D token streams)"
            ),
            ([n], Some(k)) if k > 0 => (n / k, k),
            ([_], _) => bail_user!(
                "{origin}: a 1-D token stream needs data.context_size (tokens per sequence)"
            ),
            (s, _) => {
                bail_user!("{origin}: expected [n_seq, ctx] or 1-D token ids, got shape {s:?}")
            }
        };
        if n_seq == 0 || ctx == 0 {
            bail_user!("{origin}: no whole sequence (shape {shape:?})");
        }
        // SAFETY: read-only mapping; the file is not expected to change
        // while training (as with data.stream).
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| user(format!("{origin}: cannot map: {e}")))?;
        let offset = prefix.len();
        if map.len() < offset + total * ty.bytes {
            bail_user!(
                "{origin}: truncated: the header promises {total} ids, the file holds {}",
                (map.len() - offset) / ty.bytes
            );
        }
        Ok(Tokens {
            map,
            offset,
            ty,
            n_seq,
            ctx,
            origin,
        })
    }

    /// The ids of sequence `s`, appended to `out`.
    pub fn sequence_into(&self, s: usize, out: &mut Vec<i64>) {
        let start = self.offset + s * self.ctx * self.ty.bytes;
        let bytes = &self.map[start..start + self.ctx * self.ty.bytes];
        out.extend(bytes.chunks_exact(self.ty.bytes).map(|b| self.ty.decode(b)));
    }

    pub fn sequence(&self, s: usize) -> Vec<i64> {
        let mut v = Vec::with_capacity(self.ctx);
        self.sequence_into(s, &mut v);
        v
    }

    /// Sequences `lo..hi` as an int64 `[hi - lo, ctx]` tensor.
    pub fn tensor(&self, lo: usize, hi: usize) -> tch::Tensor {
        let mut ids = Vec::with_capacity((hi - lo) * self.ctx);
        for s in lo..hi {
            self.sequence_into(s, &mut ids);
        }
        tch::Tensor::from_slice(&ids).view([(hi - lo) as i64, self.ctx as i64])
    }

    /// The file, for messages.
    pub fn origin(&self) -> &str {
        &self.origin
    }
}

impl IntType {
    fn decode(self, b: &[u8]) -> i64 {
        let mut v: u64 = 0;
        if self.big_endian {
            for &x in b {
                v = (v << 8) | x as u64;
            }
        } else {
            for &x in b.iter().rev() {
                v = (v << 8) | x as u64;
            }
        }
        let bits = 8 * self.bytes as u32;
        if self.signed && bits < 64 && (v >> (bits - 1)) & 1 == 1 {
            (v | (!0u64 << bits)) as i64
        } else {
            v as i64
        }
    }
}

/// `<i8`, `>i4`, `|u1`, ... ; None for anything but integers.
fn int_type(descr: &str) -> Option<IntType> {
    let mut c = descr.chars();
    let order = c.next()?;
    let kind = c.next()?;
    let bytes: usize = c.as_str().parse().ok()?;
    if !matches!(kind, 'i' | 'u') || !matches!(bytes, 1 | 2 | 4 | 8) {
        return None;
    }
    Some(IntType {
        bytes,
        signed: kind == 'i',
        big_endian: order == '>',
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_every_integer_width_and_order() {
        let t = int_type("<i2").unwrap();
        assert_eq!(t.decode(&(-5i16).to_le_bytes()), -5);
        let t = int_type(">i4").unwrap();
        assert_eq!(t.decode(&(-70000i32).to_be_bytes()), -70000);
        let t = int_type("<u2").unwrap();
        assert_eq!(t.decode(&(65000u16).to_le_bytes()), 65000);
        let t = int_type("|u1").unwrap();
        assert_eq!(t.decode(&[200]), 200);
        let t = int_type("<i8").unwrap();
        assert_eq!(t.decode(&(1i64 << 40).to_le_bytes()), 1 << 40);
        assert!(int_type("<f4").is_none());
        assert!(int_type("|b1").is_none());
    }
}
