//! `.npy` / `.npz` reading into float32 rows, whole or streamed in chunks,
//! and float32 `.npy` writing, whole or incrementally.
//!
//! Accepted: float16/32/64 and integer dtypes (cast to float32), C or Fortran
//! order, either endianness, 2-D arrays. A data spec is a `.npy` path, a
//! `file.npz:key` member, or a directory of `.npy` shards read as one array
//! (in file-name order; the shards must share one dtype and width). Safetensors shards and SAELens activation caches
//! are handed to [`crate::data::sources`] by [`data_shape`] and
//! [`for_each_chunk`].
//!
//! Streaming ([`for_each_chunk`]) holds one chunk of rows in memory: `.npy`
//! files in C order are read sequentially, in Fortran order column by column
//! with seeks; `.npz` members in C order stream too (even compressed), while
//! a Fortran-order `.npz` member, which cannot be seeked, is read whole.

use crate::error::user;
use crate::{bail_user, Result};
use anyhow::Context;
use npyz::{DType, Endianness, NpyHeader, Order, TypeChar};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
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

/// Rows and columns of a data spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataShape {
    pub rows: usize,
    pub cols: usize,
}

/// One array of a data spec.
enum Part {
    File(PathBuf),
    Npz(PathBuf, String),
}

impl Part {
    fn origin(&self) -> String {
        match self {
            Part::File(p) => p.display().to_string(),
            Part::Npz(p, k) => format!("{}:{k}", p.display()),
        }
    }
}

/// The arrays a data spec names, in order.
fn parts(spec: &str) -> Result<Vec<Part>> {
    let path = Path::new(spec);
    if path.is_dir() {
        let mut shards: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| user(format!("{}: cannot list: {e}", path.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "npy") && p.is_file())
            .collect();
        shards.sort();
        if shards.is_empty() {
            bail_user!(
                "{}: directory holds no .npy shards (nor .safetensors shards, nor a SAELens \
                 cache's state.json)",
                path.display()
            );
        }
        return Ok(shards.into_iter().map(Part::File).collect());
    }
    if let Some((file, key)) = split_npz(spec) {
        return Ok(vec![Part::Npz(PathBuf::from(file), key.to_owned())]);
    }
    if !path.exists() {
        bail_user!("{spec}: no such file");
    }
    if spec.ends_with(".npz") {
        bail_user!("{spec}: an .npz archive needs a member name: {spec}:KEY");
    }
    Ok(vec![Part::File(path.to_owned())])
}

/// `file.npz:key` → (`file.npz`, `key`), when the file part ends in `.npz`.
fn split_npz(spec: &str) -> Option<(&str, &str)> {
    let (file, key) = spec.rsplit_once(':')?;
    file.ends_with(".npz").then_some((file, key))
}

/// An element type we convert to float32.
#[derive(Debug, Clone, Copy)]
struct Elem {
    kind: TypeChar,
    size: usize,
    big_endian: bool,
}

/// What the header of one array says.
struct ArrayInfo {
    rows: usize,
    cols: usize,
    order: Order,
    elem: Elem,
}

fn parse_header(header: &NpyHeader, origin: &str) -> Result<ArrayInfo> {
    let (rows, cols) = match header.shape() {
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
    let ts = match header.dtype() {
        DType::Plain(ts) => ts,
        other => bail_user!(
            "{origin}: structured dtype {} is not supported; save a plain float array",
            other.descr()
        ),
    };
    let size = ts.size_field() as usize;
    // `V2` is ml_dtypes' bfloat16: `np.save` writes it as the 2-byte void
    // `<V2` (numpy has no bfloat16 of its own); no other 2-byte void is in use.
    let ok = matches!(
        (ts.type_char(), size),
        (TypeChar::Float, 2 | 4 | 8)
            | (TypeChar::Int | TypeChar::Uint, 1 | 2 | 4 | 8)
            | (TypeChar::RawData, 2)
    );
    if !ok {
        bail_user!(
            "{origin}: dtype `{}` is not supported; use float16/32/64, bfloat16 (ml_dtypes, \
             saved as `<V2`) or an integer type",
            ts
        );
    }
    Ok(ArrayInfo {
        rows,
        cols,
        order: header.order(),
        elem: Elem {
            kind: ts.type_char(),
            size,
            big_endian: ts.endianness() == Endianness::Big,
        },
    })
}

/// Appends `bytes` (whole elements of type `e`) to `out` as float32.
fn convert(bytes: &[u8], e: Elem, out: &mut Vec<f32>) {
    macro_rules! conv {
        ($t:ty, $n:expr, $f:expr) => {
            out.extend(bytes.chunks_exact($n).map(|c| {
                let a: [u8; $n] = c.try_into().expect("chunk of element size");
                let v = if e.big_endian {
                    <$t>::from_be_bytes(a)
                } else {
                    <$t>::from_le_bytes(a)
                };
                $f(v)
            }))
        };
    }
    match (e.kind, e.size) {
        (TypeChar::Float, 4) => conv!(f32, 4, |v: f32| v),
        (TypeChar::Float, 8) => conv!(f64, 8, |v: f64| v as f32),
        (TypeChar::Float, 2) => conv!(half::f16, 2, f32::from),
        (TypeChar::RawData, 2) => conv!(half::bf16, 2, f32::from),
        (TypeChar::Int, 1) => conv!(i8, 1, f32::from),
        (TypeChar::Int, 2) => conv!(i16, 2, f32::from),
        (TypeChar::Int, 4) => conv!(i32, 4, |v: i32| v as f32),
        (TypeChar::Int, 8) => conv!(i64, 8, |v: i64| v as f32),
        (TypeChar::Uint, 1) => conv!(u8, 1, f32::from),
        (TypeChar::Uint, 2) => conv!(u16, 2, f32::from),
        (TypeChar::Uint, 4) => conv!(u32, 4, |v: u32| v as f32),
        (TypeChar::Uint, 8) => conv!(u64, 8, |v: u64| v as f32),
        _ => unreachable!("checked in parse_header"),
    }
}

fn truncated(origin: &str) -> impl Fn(std::io::Error) -> anyhow::Error + '_ {
    move |e| {
        user(format!(
            "{origin}: cannot read data ({e}); is the file truncated?"
        ))
    }
}

thread_local! {
    /// Set while [`read_tensor_allow_nonfinite`] reads: NaN/Inf pass through.
    static ALLOW_NONFINITE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Rejects non-finite values, naming the row (counted over the whole spec).
pub(crate) fn check_finite(
    data: &[f32],
    cols: usize,
    first_row: usize,
    origin: &str,
) -> Result<()> {
    if ALLOW_NONFINITE.with(|a| a.get()) {
        return Ok(());
    }
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        bail_user!(
            "{origin}: value at row {}, column {} is {}; remove non-finite rows first",
            first_row + i / cols,
            i % cols,
            data[i]
        );
    }
    Ok(())
}

/// Random access to an array's data: fill the buffer from a byte offset
/// (relative to the start of the data).
/// Largest single read; bounds memory when a header lies about the shape.
const READ_CHUNK_BYTES: usize = 64 << 20;

type ReadAt<'a> = &'a mut dyn FnMut(u64, &mut Vec<u8>) -> std::io::Result<()>;

/// Streams one array in chunks of `batch` rows; `first_row` is its offset in
/// the spec (for error messages). Returns its row count.
fn stream_array<R: Read + ?Sized>(
    reader: &mut R,
    seek: Option<ReadAt<'_>>,
    info: &ArrayInfo,
    origin: &str,
    batch: usize,
    first_row: usize,
    f: &mut dyn FnMut(Matrix) -> Result<()>,
) -> Result<usize> {
    let (rows, cols, e) = (info.rows, info.cols, info.elem);
    // A header may claim more data than the file holds: never allocate from
    // the header alone. Reads are at most READ_CHUNK_BYTES, so a lying header
    // ends in a "truncated" error after reading what is really there.
    let total = rows
        .checked_mul(cols)
        .and_then(|v| v.checked_mul(e.size))
        .ok_or_else(|| {
            user(format!(
                "{origin}: header shape [{rows}, {cols}] is impossibly large"
            ))
        })?;
    let batch = batch.min((READ_CHUNK_BYTES / (cols * e.size)).max(1));
    let mut bytes = Vec::new();
    match (info.order, seek) {
        (Order::C, _) => {
            let mut r0 = 0;
            while r0 < rows {
                let len = batch.min(rows - r0);
                read_exactly(reader, len * cols * e.size, &mut bytes, origin)?;
                let mut data = Vec::with_capacity(len * cols);
                convert(&bytes, e, &mut data);
                check_finite(&data, cols, first_row + r0, origin)?;
                f(Matrix {
                    data,
                    rows: len,
                    cols,
                })?;
                r0 += len;
            }
        }
        (Order::Fortran, Some(read_at)) => {
            // Column c of rows r0..r0+len is contiguous at element c*rows + r0.
            let mut r0 = 0;
            let mut col = Vec::new();
            while r0 < rows {
                let len = batch.min(rows - r0);
                let mut data = vec![0f32; len * cols];
                for c in 0..cols {
                    bytes.resize(len * e.size, 0);
                    read_at(((c * rows + r0) * e.size) as u64, &mut bytes)
                        .map_err(truncated(origin))?;
                    col.clear();
                    convert(&bytes, e, &mut col);
                    for (r, v) in col.iter().enumerate() {
                        data[r * cols + c] = *v;
                    }
                }
                check_finite(&data, cols, first_row + r0, origin)?;
                f(Matrix {
                    data,
                    rows: len,
                    cols,
                })?;
                r0 += len;
            }
        }
        (Order::Fortran, None) => {
            read_exactly(reader, total, &mut bytes, origin)?;
            let mut fortran = Vec::with_capacity(rows * cols);
            convert(&bytes, e, &mut fortran);
            drop(bytes);
            let data = fortran_to_c(&fortran, rows, cols);
            drop(fortran);
            check_finite(&data, cols, first_row, origin)?;
            for chunk in data.chunks(batch.saturating_mul(cols)) {
                f(Matrix {
                    data: chunk.to_vec(),
                    rows: chunk.len() / cols,
                    cols,
                })?;
            }
        }
    }
    Ok(rows)
}

/// Reads exactly `n` bytes into `buf` (cleared first). The buffer grows with
/// the data actually read, so a header that overstates the size costs
/// nothing before the "truncated" error.
fn read_exactly<R: Read + ?Sized>(
    reader: &mut R,
    n: usize,
    buf: &mut Vec<u8>,
    origin: &str,
) -> Result<()> {
    buf.clear();
    reader
        .take(n as u64)
        .read_to_end(buf)
        .map_err(truncated(origin))?;
    if buf.len() != n {
        return Err(truncated(origin)(std::io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(())
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

fn read_header<R: Read + ?Sized>(reader: &mut R, origin: &str) -> Result<ArrayInfo> {
    let prefix = read_header_bytes(reader, origin)?;
    let header = NpyHeader::from_reader(std::io::Cursor::new(&prefix)).map_err(|e| {
        // Object arrays (`|O`, pickled Python objects) fail in the parser:
        // say what they are rather than "invalid type string".
        let text = String::from_utf8_lossy(&prefix);
        if text.contains("'|O'") || text.contains("'O'") {
            user(format!(
                "{origin}: dtype `|O` (Python objects, pickled) is not supported; \
                 save a plain float array"
            ))
        } else {
            user(format!("{origin}: not a valid .npy file: {e}"))
        }
    })?;
    parse_header(&header, origin)
}

/// Longest header text accepted (numpy itself writes well under 1 KiB for
/// plain arrays; it caps reading at 10 000 bytes).
const MAX_HEADER_TEXT: usize = 10_000;
/// Deepest bracket nesting accepted in the header dict. A plain array needs
/// 2 (`{` and the shape's `(`). The header parser backtracks exponentially
/// on deep nesting, so such a file would hang instead of failing (found by
/// fuzzing: 21 `[` took 4 minutes).
const MAX_HEADER_DEPTH: usize = 4;

/// Reads magic, version, length and header text, checking each, and
/// returns those bytes for the header parser.
pub(crate) fn read_header_bytes<R: Read + ?Sized>(reader: &mut R, origin: &str) -> Result<Vec<u8>> {
    let bad = |what: &str| user(format!("{origin}: not a valid .npy file: {what}"));
    let mut buf = vec![0u8; 10];
    reader
        .read_exact(&mut buf)
        .map_err(|_| bad("too short for a .npy header"))?;
    if &buf[..6] != b"\x93NUMPY" {
        return Err(bad("magic string \\x93NUMPY not found"));
    }
    let text_len = match buf[6] {
        1 => u16::from_le_bytes([buf[8], buf[9]]) as usize,
        2 | 3 => {
            let mut more = [0u8; 2];
            reader
                .read_exact(&mut more)
                .map_err(|_| bad("truncated header"))?;
            buf.extend_from_slice(&more);
            u32::from_le_bytes([buf[8], buf[9], more[0], more[1]]) as usize
        }
        v => return Err(bad(&format!("unknown format version {v}"))),
    };
    if text_len > MAX_HEADER_TEXT {
        return Err(bad(&format!("header of {text_len} bytes is too long")));
    }
    let start = buf.len();
    buf.resize(start + text_len, 0);
    reader
        .read_exact(&mut buf[start..])
        .map_err(|_| bad("truncated header"))?;
    let (mut depth, mut max_depth) = (0usize, 0usize);
    for &b in &buf[start..] {
        match b {
            b'[' | b'(' | b'{' => {
                depth += 1;
                max_depth = max_depth.max(depth);
            }
            b']' | b')' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    if max_depth > MAX_HEADER_DEPTH {
        return Err(bad(&format!("header nests brackets {max_depth} deep")));
    }
    Ok(buf)
}

fn open_npz(file: &Path) -> Result<npyz::zip::ZipArchive<BufReader<File>>> {
    let f = File::open(file).map_err(|e| user(format!("{}: cannot open: {e}", file.display())))?;
    npyz::zip::ZipArchive::new(BufReader::new(f))
        .map_err(|e| user(format!("{}: not a valid .npz archive: {e}", file.display())))
}

/// What [`with_part`] runs: (reader at the header, random access to the
/// data when seekable, origin for messages).
type PartFn<'a, T> = &'a mut dyn FnMut(&mut dyn Read, Option<ReadAt<'_>>, &str) -> Result<T>;

/// Runs `go` on the reader of `part`, positioned at its header, plus a
/// random-access reader of its data when it is seekable.
fn with_part<T>(part: &Part, go: PartFn<'_, T>) -> Result<T> {
    let origin = part.origin();
    match part {
        Part::File(path) => {
            let file = File::open(path).map_err(|e| user(format!("{origin}: cannot open: {e}")))?;
            let mut reader = BufReader::new(file);
            // A second handle for random access (Fortran order): it learns
            // where the data starts from the header on first use.
            let mut file2 =
                File::open(path).map_err(|e| user(format!("{origin}: cannot open: {e}")))?;
            let mut data_start = None;
            let mut seek_reader = |offset: u64, buf: &mut Vec<u8>| -> std::io::Result<()> {
                let base = match data_start {
                    Some(b) => b,
                    None => {
                        let mut r = BufReader::new(&mut file2);
                        r.seek(SeekFrom::Start(0))?;
                        NpyHeader::from_reader(&mut r)?;
                        let b = r.stream_position()?;
                        data_start = Some(b);
                        b
                    }
                };
                file2.seek(SeekFrom::Start(base + offset))?;
                file2.read_exact(buf)
            };
            go(&mut reader, Some(&mut seek_reader), &origin)
        }
        Part::Npz(file, key) => {
            let mut zip = open_npz(file)?;
            let names: Vec<String> = zip
                .file_names()
                .filter_map(|n| n.strip_suffix(".npy").map(str::to_owned))
                .collect();
            let mut member = match zip.by_name(&format!("{key}.npy")) {
                Ok(m) => m,
                Err(_) => bail_user!(
                    "{origin}: no array `{key}` in the archive (it has: {})",
                    names.join(", ")
                ),
            };
            go(&mut member, None, &origin)
        }
    }
}

/// `float32`, `int64`, `uint8`: numpy's name of an element type.
fn dtype_name(e: Elem) -> String {
    if e.kind == TypeChar::RawData {
        return "bfloat16".into();
    }
    let kind = match e.kind {
        TypeChar::Float => "float",
        TypeChar::Int => "int",
        TypeChar::Uint => "uint",
        _ => "?",
    };
    format!("{kind}{}", 8 * e.size)
}

/// The headers of a directory's shards, in order, after checking that they
/// are one array cut in pieces: the same dtype (integer shards only with
/// integer shards of the same type, as floats with floats) and the same
/// width. A directory holding anything else (another command's outputs,
/// e.g. `sae latents`'s int64 row ids beside float32 values) is refused
/// naming the odd file against the first.
fn shard_infos(parts: &[Part]) -> Result<Vec<ArrayInfo>> {
    let mut infos: Vec<ArrayInfo> = Vec::with_capacity(parts.len());
    for part in parts {
        let info = with_part(part, &mut |r, _, origin| read_header(r, origin))?;
        if let Some(first) = infos.first() {
            let same_dtype = first.elem.kind == info.elem.kind && first.elem.size == info.elem.size;
            if !same_dtype || first.cols != info.cols {
                bail_user!(
                    "{}: {} with {} columns, but {} (the directory's first shard) is {} with {} \
                     columns; the .npy shards of a directory are read as one array and must share \
                     one dtype and width: keep only the data's shards in it",
                    part.origin(),
                    dtype_name(info.elem),
                    info.cols,
                    parts[0].origin(),
                    dtype_name(first.elem),
                    first.cols
                );
            }
        }
        infos.push(info);
    }
    Ok(infos)
}

/// The parts of `spec` and, for a directory of shards, their headers
/// (checked by [`shard_infos`]).
fn checked_parts(spec: &str) -> Result<(Vec<Part>, Option<Vec<ArrayInfo>>)> {
    let parts = parts(spec)?;
    let infos = match Path::new(spec).is_dir() {
        true => Some(shard_infos(&parts)?),
        false => None,
    };
    Ok((parts, infos))
}

/// For a directory of `.npy` shards: a line telling what it holds (`12 .npy
/// shards, 120000 rows x 64 columns, float32`), after the checks of
/// [`shard_infos`]. None for any other spec.
pub fn shards_summary(spec: &str) -> Result<Option<String>> {
    if !Path::new(spec).is_dir() || crate::data::sources::detect(spec)?.is_some() {
        return Ok(None);
    }
    let (parts, infos) = checked_parts(spec)?;
    let infos = infos.expect("a directory");
    let rows: usize = infos.iter().map(|i| i.rows).sum();
    Ok(Some(format!(
        "{} .npy shard{}, {rows} rows x {} columns, {}",
        parts.len(),
        if parts.len() == 1 { "" } else { "s" },
        infos[0].cols,
        dtype_name(infos[0].elem)
    )))
}

/// The shape of a data spec, from its headers only (shards must agree on
/// dtype and columns).
pub fn data_shape(spec: &str) -> Result<DataShape> {
    if let Some(other) = crate::data::sources::detect(spec)? {
        return other.shape();
    }
    let mut shape: Option<DataShape> = None;
    let (parts, _) = checked_parts(spec)?;
    for part in parts {
        let info = with_part(&part, &mut |r, _, origin| read_header(r, origin))?;
        shape = Some(accumulate(shape, &info, &part)?);
    }
    Ok(shape.expect("at least one part"))
}

fn accumulate(acc: Option<DataShape>, info: &ArrayInfo, part: &Part) -> Result<DataShape> {
    match acc {
        None => Ok(DataShape {
            rows: info.rows,
            cols: info.cols,
        }),
        Some(s) => {
            if s.cols != info.cols {
                bail_user!(
                    "{}: has {} columns but earlier shards have {}",
                    part.origin(),
                    info.cols,
                    s.cols
                );
            }
            Ok(DataShape {
                rows: s.rows + info.rows,
                cols: s.cols,
            })
        }
    }
}

/// Reads a data spec in order, in chunks of at most `batch` rows (at least
/// one), calling `f` with each. Returns the total shape.
pub fn for_each_chunk(
    spec: &str,
    batch: usize,
    mut f: impl FnMut(Matrix) -> Result<()>,
) -> Result<DataShape> {
    let batch = batch.max(1);
    if let Some(other) = crate::data::sources::detect(spec)? {
        return other.for_each_chunk(batch, &mut f);
    }
    let mut shape: Option<DataShape> = None;
    let (parts, _) = checked_parts(spec)?;
    for part in parts {
        let first_row = shape.map_or(0, |s| s.rows);
        let info = with_part(&part, &mut |r, seek, origin| {
            let info = read_header(r, origin)?;
            if let Some(s) = shape {
                if s.cols != info.cols {
                    bail_user!(
                        "{origin}: has {} columns but earlier shards have {}",
                        info.cols,
                        s.cols
                    );
                }
            }
            stream_array(r, seek, &info, origin, batch, first_row, &mut f)?;
            Ok(info)
        })?;
        shape = Some(accumulate(shape, &info, &part)?);
    }
    Ok(shape.expect("at least one part"))
}

/// Reads a data spec (see module docs) as a float32 matrix.
pub fn read_matrix(spec: &str) -> Result<Matrix> {
    let mut data = Vec::new();
    let shape = for_each_chunk(spec, usize::MAX / 2, |m| {
        if data.is_empty() {
            data = m.data;
        } else {
            data.extend_from_slice(&m.data);
        }
        Ok(())
    })?;
    Ok(Matrix {
        data,
        rows: shape.rows,
        cols: shape.cols,
    })
}

/// Reads one `.npy` stream whole; `origin` names it in errors.
pub fn read_npy<R: Read>(mut reader: R, origin: &str) -> Result<Matrix> {
    let info = read_header(&mut reader, origin)?;
    let mut data = Vec::new();
    stream_array(&mut reader, None, &info, origin, info.rows, 0, &mut |m| {
        data.extend_from_slice(&m.data);
        Ok(())
    })?;
    Ok(Matrix {
        data,
        rows: info.rows,
        cols: info.cols,
    })
}

/// Reads a 2-D float32 tensor from a data spec.
pub fn read_tensor(spec: &str) -> Result<Tensor> {
    Ok(read_matrix(spec)?.to_tensor())
}

/// Like [`read_tensor`], but NaN and Inf values are kept (`data.allow_nonfinite`:
/// the caller drops those rows).
pub fn read_tensor_allow_nonfinite(spec: &str) -> Result<Tensor> {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            ALLOW_NONFINITE.with(|a| a.set(false));
        }
    }
    ALLOW_NONFINITE.with(|a| a.set(true));
    let _reset = Reset;
    read_tensor(spec)
}

fn shape_dict(shape: &[u64], descr: &str) -> String {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_txt = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_txt}, }}")
}

/// The `.npy` v1.0 header for a little-endian float32 C-order array, padded
/// to `min_len` bytes (rounded up to a multiple of 64).
fn npy_header_len(shape: &[u64], min_len: usize) -> Vec<u8> {
    npy_header_descr(shape, min_len, "<f4")
}

/// [`npy_header_len`] for another dtype (`descr`, e.g. `<i8`).
pub(crate) fn npy_header_descr(shape: &[u64], min_len: usize, descr: &str) -> Vec<u8> {
    let mut dict = shape_dict(shape, descr);
    // Magic (6) + version (2) + length (2) + dict + '\n' is a multiple of 64.
    let unpadded = 10 + dict.len() + 1;
    let total = unpadded.max(min_len).div_ceil(64) * 64;
    dict.push_str(&" ".repeat(total - unpadded));
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

fn npy_header(shape: &[i64]) -> Vec<u8> {
    let s: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    npy_header_len(&s, 0)
}

/// `values` as little-endian bytes: the memory itself on little-endian
/// machines (no per-element copy: it bounded `sae encode`'s writer thread),
/// a converted copy elsewhere.
fn f32_le_bytes(values: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        // SAFETY: f32 has no padding and any byte is a valid u8; the slice
        // covers exactly the values' memory and borrows it.
        std::borrow::Cow::Borrowed(unsafe {
            std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
        })
    } else {
        std::borrow::Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
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
        w.write_all(&f32_le_bytes(&values))?;
        Ok(())
    })
}

/// Writes int64 values of `shape` (C order) as `.npy`, atomically.
pub fn write_npy_i64(path: &Path, shape: &[usize], values: &[i64]) -> Result<()> {
    let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    debug_assert_eq!(dims.iter().product::<u64>() as usize, values.len());
    crate::fsutil::write_atomic(path, |w| {
        w.write_all(&npy_header_descr(&dims, 0, "<i8"))?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        w.write_all(&bytes)?;
        Ok(())
    })
}

/// The element type a [`NpyWriter`] stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutDtype {
    #[default]
    Float32,
    Float16,
    /// ml_dtypes' bfloat16, saved as numpy saves it: descr `<V2`, so
    /// `np.load(f).view(ml_dtypes.bfloat16)` reads it.
    BFloat16,
}

impl OutDtype {
    /// From numpy's name: float32, float16, bfloat16.
    pub fn parse(name: &str) -> Option<OutDtype> {
        match name {
            "float32" => Some(OutDtype::Float32),
            "float16" => Some(OutDtype::Float16),
            "bfloat16" => Some(OutDtype::BFloat16),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            OutDtype::Float32 => "float32",
            OutDtype::Float16 => "float16",
            OutDtype::BFloat16 => "bfloat16",
        }
    }

    fn descr(self) -> &'static str {
        match self {
            OutDtype::Float32 => "<f4",
            OutDtype::Float16 => "<f2",
            OutDtype::BFloat16 => "<V2",
        }
    }
}

/// `values` rounded to `dtype` (to nearest even, as numpy's and ml_dtypes'
/// `astype`), little-endian.
fn half_le_bytes(values: &[f32], dtype: OutDtype) -> Vec<u8> {
    match dtype {
        OutDtype::Float16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        OutDtype::BFloat16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        OutDtype::Float32 => unreachable!("float32 is written as is"),
    }
}

/// Header room for any `(rows, cols)` shape: 20-digit numbers fit.
const STREAM_HEADER_LEN: usize = 128;

/// Writes a float32 C-order `.npy` of `cols` columns row chunk by row chunk
/// into a temp file beside the target; [`NpyWriter::finish`] writes the final
/// row count into the header and renames the file into place. Dropped
/// unfinished (an error on the way), it removes the temp file and leaves the
/// target untouched.
pub struct NpyWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
    cols: usize,
    rows: u64,
    dtype: OutDtype,
}

impl NpyWriter {
    pub fn create(path: &Path, cols: usize) -> Result<NpyWriter> {
        NpyWriter::create_as(path, cols, OutDtype::Float32)
    }

    /// A writer of `dtype` values.
    pub fn create_as(path: &Path, cols: usize, dtype: OutDtype) -> Result<NpyWriter> {
        if path.is_dir() {
            bail_user!("{}: is a directory; pass a .npy file path", path.display());
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        let tmp = path.with_file_name(format!(".{name}.tmp.{}", std::process::id()));
        let file = File::create(&tmp)
            .map_err(|e| user(format!("cannot write {}: {e}", path.display())))?;
        let mut out = BufWriter::new(file);
        out.write_all(&npy_header_descr(
            &[0, cols as u64],
            STREAM_HEADER_LEN,
            dtype.descr(),
        ))
        .with_context(|| format!("writing {}", path.display()))?;
        Ok(NpyWriter {
            path: path.to_owned(),
            tmp,
            out: Some(out),
            cols,
            rows: 0,
            dtype,
        })
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Appends rows: a `[n, cols]` tensor (any float kind, any device).
    pub fn write(&mut self, t: &Tensor) -> Result<()> {
        let t = t
            .to_device(tch::Device::Cpu)
            .to_kind(tch::Kind::Float)
            .contiguous();
        let size = t.size();
        if size.len() != 2 || size[1] as usize != self.cols {
            anyhow::bail!(
                "{}: writing rows of shape {:?} into a {}-column array",
                self.path.display(),
                size,
                self.cols
            );
        }
        if self.dtype != OutDtype::Float32 {
            // Rounded by libtorch (to nearest even, as numpy's and
            // ml_dtypes' astype).
            let kind = match self.dtype {
                OutDtype::BFloat16 => tch::Kind::BFloat16,
                _ => tch::Kind::Half,
            };
            let h = t.to_kind(kind).flatten(0, -1);
            let mut bytes = vec![0u8; h.numel() * 2];
            h.copy_data_u8(&mut bytes, h.numel());
            if cfg!(target_endian = "big") {
                bytes.chunks_exact_mut(2).for_each(|c| c.swap(0, 1));
            }
            self.out
                .as_mut()
                .expect("not finished")
                .write_all(&bytes)
                .with_context(|| format!("writing {}", self.path.display()))?;
            self.rows += size[0] as u64;
            return Ok(());
        }
        let values = Vec::<f32>::try_from(t.flatten(0, -1)).context("tensor to vec")?;
        self.write_rows(&values, size[0] as usize)
    }

    /// Appends `rows` rows given row-major (no libtorch call: a writer
    /// thread can run it while the next batch computes), rounded to the
    /// writer's dtype.
    pub fn write_rows(&mut self, values: &[f32], rows: usize) -> Result<()> {
        if values.len() != rows * self.cols {
            anyhow::bail!(
                "{}: {} values are not {rows} rows of {}",
                self.path.display(),
                values.len(),
                self.cols
            );
        }
        let bytes = match self.dtype {
            OutDtype::Float32 => f32_le_bytes(values),
            d => std::borrow::Cow::Owned(half_le_bytes(values, d)),
        };
        self.out
            .as_mut()
            .expect("not finished")
            .write_all(&bytes)
            .with_context(|| format!("writing {}", self.path.display()))?;
        self.rows += rows as u64;
        Ok(())
    }

    /// Patches the header with the row count, syncs, and renames into place.
    pub fn finish(mut self) -> Result<()> {
        let out = self.out.take().expect("not finished");
        let ctx = || format!("writing {}", self.path.display());
        let mut file = out
            .into_inner()
            .map_err(|e| anyhow::anyhow!("{}: {e}", ctx()))?;
        let header = npy_header_descr(
            &[self.rows, self.cols as u64],
            STREAM_HEADER_LEN,
            self.dtype.descr(),
        );
        debug_assert_eq!(header.len(), STREAM_HEADER_LEN);
        file.seek(SeekFrom::Start(0)).with_context(ctx)?;
        file.write_all(&header).with_context(ctx)?;
        file.sync_all().with_context(ctx)?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path)
            .with_context(|| format!("renaming into {}", self.path.display()))?;
        Ok(())
    }
}

impl Drop for NpyWriter {
    fn drop(&mut self) {
        if self.out.is_some() {
            self.out = None;
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
