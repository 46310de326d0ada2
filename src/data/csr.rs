//! Sparse codes as a scipy CSR `.npz`: written by `sae encode --sparse`,
//! read back by `sae decode`, both streamed in row chunks.
//!
//! The archive is what `scipy.sparse.save_npz(path, csr, compressed=False)`
//! writes: uncompressed (stored) members `indices.npy`, `indptr.npy`,
//! `format.npy` (0-d `|S3` b"csr"), `shape.npy` (int64 [2]) and `data.npy`
//! (float32). Indices and indptr are int32 when the shape and the number of
//! stored values fit in int32 (what scipy itself keeps on load), else int64.
//! Within a row the column indices ascend and no zero is stored: scipy's
//! canonical format.
//!
//! Writing keeps only `indptr` (rows + 1 integers) in memory: values and
//! column indices go to two temp files beside the output, copied into a temp
//! archive at the end that is renamed into place; temp files are removed on
//! success and on error. Reading keeps `indptr` and one densified chunk of
//! rows; the `data` and `indices` members are streamed side by side (also
//! from a compressed archive, as `save_npz` writes by default).

use crate::data::npy::{self, Matrix};
use crate::error::user;
use crate::fsutil::{temp_path, write_error};
use crate::{bail_user, Result};
use npyz::zip::{self, write::FileOptions, ZipArchive, ZipWriter};
use npyz::{DType, Endianness, NpyHeader, TypeChar};
use std::ffi::OsString;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// The stored entries of one row: non-zero values with ascending column
/// indices; with `top`, only the `top` largest by absolute value (ties: the
/// lower column first). `out` is cleared first.
pub fn row_entries(row: &[f32], top: Option<usize>, out: &mut Vec<(usize, f32)>) {
    out.clear();
    out.extend(
        row.iter()
            .enumerate()
            .filter(|(_, v)| **v != 0.0)
            .map(|(j, v)| (j, *v)),
    );
    if let Some(n) = top {
        if out.len() > n {
            if n == 0 {
                out.clear();
                return;
            }
            let by_size = |a: &(usize, f32), b: &(usize, f32)| {
                b.1.abs().total_cmp(&a.1.abs()).then(a.0.cmp(&b.0))
            };
            out.select_nth_unstable_by(n - 1, by_size);
            out.truncate(n);
            out.sort_unstable_by_key(|e| e.0);
        }
    }
}

/// Zeroes all but the `top` largest values (by absolute value) of each row
/// of a row-major `[rows, cols]` buffer: dense `encode --top`.
pub fn keep_top(values: &mut [f32], cols: usize, top: usize) {
    let mut kept = Vec::new();
    for row in values.chunks_mut(cols) {
        row_entries(row, Some(top), &mut kept);
        row.fill(0.0);
        for &(j, v) in &kept {
            row[j] = v;
        }
    }
}

/// `BASE` + `suffix` as a path (`.Z.npz.tmp.PID` + `.data`).
fn with_suffix(base: &Path, suffix: &str) -> PathBuf {
    let mut s = OsString::from(base.as_os_str());
    s.push(suffix);
    PathBuf::from(s)
}

/// A `.npy` v1.0 header: `descr`, C order, `shape` (empty: 0-d), padded so
/// the data starts at a multiple of 64 bytes, as numpy writes it.
fn npy_header(descr: &str, shape: &[u64]) -> Vec<u8> {
    npy::npy_header_descr(shape, 0, descr)
}

/// Streams a CSR matrix of `cols` columns into `path` (see module docs).
/// [`CsrWriter::finish`] writes the archive; dropped unfinished, it removes
/// its temp files and leaves `path` untouched.
pub struct CsrWriter {
    path: PathBuf,
    tmp: PathBuf,
    data_tmp: PathBuf,
    idx_tmp: PathBuf,
    data: Option<BufWriter<File>>,
    indices: Option<BufWriter<File>>,
    cols: usize,
    top: Option<usize>,
    indptr: Vec<i64>,
    /// Column indices need int64 in the temp file.
    wide_cols: bool,
    /// Largest count that int32 indices hold (lowered by the unit tests to
    /// exercise int64 output).
    int32_max: u64,
    /// Members of this many bytes or more get zip64 headers (ditto).
    zip64_from: u64,
    entries: Vec<(usize, f32)>,
}

impl CsrWriter {
    pub fn create(path: &Path, cols: usize, top: Option<usize>) -> Result<CsrWriter> {
        if path.is_dir() {
            bail_user!("{}: is a directory; pass a .npz file path", path.display());
        }
        let tmp = temp_path(path);
        let data_tmp = with_suffix(&tmp, ".data");
        let idx_tmp = with_suffix(&tmp, ".indices");
        let open = |p: &Path| -> Result<BufWriter<File>> {
            File::create(p)
                .map(BufWriter::new)
                .map_err(|e| user(format!("cannot write {}: {e}", path.display())))
        };
        let mut w = CsrWriter {
            path: path.to_owned(),
            tmp,
            data_tmp,
            idx_tmp,
            data: None,
            indices: None,
            cols,
            top,
            indptr: vec![0],
            wide_cols: cols > i32::MAX as usize,
            int32_max: i32::MAX as u64,
            zip64_from: u32::MAX as u64,
            entries: Vec::new(),
        };
        // Fields set one at a time so that Drop cleans up whatever was made.
        w.data = Some(open(&w.data_tmp)?);
        w.indices = Some(open(&w.idx_tmp)?);
        Ok(w)
    }

    /// Appends `rows` rows from a row-major buffer of `rows * cols` values.
    pub fn write_rows(&mut self, values: &[f32], rows: usize) -> Result<()> {
        assert_eq!(values.len(), rows * self.cols, "a [rows, cols] buffer");
        let mut data_bytes = Vec::new();
        let mut idx_bytes = Vec::new();
        let mut nnz = *self.indptr.last().expect("indptr starts with 0");
        for row in values.chunks(self.cols.max(1)).take(rows) {
            row_entries(row, self.top, &mut self.entries);
            for &(j, v) in &self.entries {
                data_bytes.extend_from_slice(&v.to_le_bytes());
                if self.wide_cols {
                    idx_bytes.extend_from_slice(&(j as i64).to_le_bytes());
                } else {
                    idx_bytes.extend_from_slice(&(j as i32).to_le_bytes());
                }
            }
            nnz += self.entries.len() as i64;
            self.indptr.push(nnz);
        }
        let path = &self.path;
        self.data
            .as_mut()
            .expect("not finished")
            .write_all(&data_bytes)
            .map_err(|e| write_error(path, e))?;
        self.indices
            .as_mut()
            .expect("not finished")
            .write_all(&idx_bytes)
            .map_err(|e| write_error(path, e))?;
        Ok(())
    }

    /// Rows written so far and values stored.
    pub fn counts(&self) -> (usize, u64) {
        (self.indptr.len() - 1, *self.indptr.last().unwrap() as u64)
    }

    /// Writes the archive (temp, fsync, rename) and removes the temp files.
    pub fn finish(mut self) -> Result<()> {
        let path = self.path.clone();
        let werr = |e: std::io::Error| write_error(&path, e);
        let zerr = |e: zip::result::ZipError| match e {
            zip::result::ZipError::Io(e) => write_error(&path, e),
            e => anyhow::anyhow!("writing {}: {e}", path.display()),
        };
        for w in [self.data.take(), self.indices.take()]
            .into_iter()
            .flatten()
        {
            let f = w.into_inner().map_err(|e| werr(e.into_error()))?;
            drop(f);
        }
        let rows = (self.indptr.len() - 1) as u64;
        let nnz = *self.indptr.last().unwrap() as u64;
        let small = |n: u64| n <= self.int32_max;
        let int32 = small(nnz) && small(rows) && small(self.cols as u64);
        let (idx_descr, idx_size) = if int32 { ("<i4", 4) } else { ("<i8", 8) };

        let file = File::create(&self.tmp)
            .map_err(|e| user(format!("cannot write {}: {e}", path.display())))?;
        let mut zip = ZipWriter::new(BufWriter::new(file));
        let zip64_from = self.zip64_from;
        let start =
            |zip: &mut ZipWriter<BufWriter<File>>, name: &str, header: &[u8], bytes: u64| {
                let size = header.len() as u64 + bytes;
                let opts = FileOptions::default()
                    .compression_method(zip::CompressionMethod::Stored)
                    .last_modified_time(zip::DateTime::default())
                    .large_file(size >= zip64_from);
                zip.start_file(name, opts).map_err(zerr)?;
                zip.write_all(header).map_err(werr)
            };

        // indices: copied from the temp file, widened if int64 is needed.
        start(
            &mut zip,
            "indices.npy",
            &npy_header(idx_descr, &[nnz]),
            nnz * idx_size,
        )?;
        self.copy_indices(&mut zip, int32)?;

        // indptr, from memory.
        start(
            &mut zip,
            "indptr.npy",
            &npy_header(idx_descr, &[rows + 1]),
            (rows + 1) * idx_size,
        )?;
        self.write_indptr(&mut zip, int32)?;

        start(&mut zip, "format.npy", &npy_header("|S3", &[]), 3)?;
        zip.write_all(b"csr").map_err(werr)?;

        start(&mut zip, "shape.npy", &npy_header("<i8", &[2]), 16)?;
        zip.write_all(&(rows as i64).to_le_bytes()).map_err(werr)?;
        zip.write_all(&(self.cols as i64).to_le_bytes())
            .map_err(werr)?;

        start(&mut zip, "data.npy", &npy_header("<f4", &[nnz]), nnz * 4)?;
        let mut src = BufReader::new(File::open(&self.data_tmp).map_err(werr)?);
        std::io::copy(&mut src, &mut zip).map_err(werr)?;
        drop(src);

        let w = zip.finish().map_err(zerr)?;
        let file = w.into_inner().map_err(|e| werr(e.into_error()))?;
        file.sync_all().map_err(werr)?;
        drop(file);
        std::fs::rename(&self.tmp, &path).map_err(werr)?;
        Ok(())
        // Drop removes the data and indices temp files.
    }

    /// Copies the column indices from their temp file into `zip`, widened
    /// from int32 when the archive needs int64.
    fn copy_indices(&self, zip: &mut impl Write, int32: bool) -> Result<()> {
        let werr = |e: std::io::Error| write_error(&self.path, e);
        let mut src = BufReader::new(File::open(&self.idx_tmp).map_err(werr)?);
        if int32 || self.wide_cols {
            std::io::copy(&mut src, zip).map_err(werr)?;
        } else {
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = read_full(&mut src, &mut buf).map_err(werr)?;
                if n == 0 {
                    break;
                }
                let wide: Vec<u8> = buf[..n]
                    .chunks_exact(4)
                    .flat_map(|c| (i32::from_le_bytes(c.try_into().unwrap()) as i64).to_le_bytes())
                    .collect();
                zip.write_all(&wide).map_err(werr)?;
            }
        }
        Ok(())
    }

    /// Writes `indptr` into `zip`, as int32 or int64.
    fn write_indptr(&self, zip: &mut impl Write, int32: bool) -> Result<()> {
        let werr = |e: std::io::Error| write_error(&self.path, e);
        let mut buf = Vec::with_capacity(1 << 20);
        for chunk in self.indptr.chunks(1 << 17) {
            buf.clear();
            for &p in chunk {
                if int32 {
                    buf.extend_from_slice(&(p as i32).to_le_bytes());
                } else {
                    buf.extend_from_slice(&p.to_le_bytes());
                }
            }
            zip.write_all(&buf).map_err(werr)?;
        }
        Ok(())
    }
}

impl Drop for CsrWriter {
    fn drop(&mut self) {
        self.data = None;
        self.indices = None;
        let _ = std::fs::remove_file(&self.data_tmp);
        let _ = std::fs::remove_file(&self.idx_tmp);
        // Absent after a successful rename.
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Reads until `buf` is full or the end; returns the bytes read.
fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Element type of a 1-D member.
#[derive(Clone, Copy, Debug)]
struct Elem {
    kind: TypeChar,
    size: usize,
    big_endian: bool,
}

/// One 1-D (or 0-d) member's header.
struct Member {
    len: u64,
    shape: Vec<u64>,
    elem: Elem,
    descr: String,
}

/// A CSR matrix in an `.npz` archive, ready to stream.
pub struct CsrFile {
    path: PathBuf,
    origin: String,
    pub rows: usize,
    pub cols: usize,
    indptr: Vec<i64>,
    data: Elem,
    indices: Elem,
}

fn open_zip(path: &Path, origin: &str) -> Result<ZipArchive<BufReader<File>>> {
    let f = File::open(path).map_err(|e| user(format!("{origin}: cannot open: {e}")))?;
    ZipArchive::new(BufReader::new(f))
        .map_err(|e| user(format!("{origin}: not a valid .npz archive: {e}")))
}

fn read_member_header<R: Read + ?Sized>(r: &mut R, origin: &str) -> Result<Member> {
    let prefix = npy::read_header_bytes(r, origin)?;
    let header = NpyHeader::from_reader(std::io::Cursor::new(&prefix))
        .map_err(|e| user(format!("{origin}: not a valid .npy member: {e}")))?;
    let ts = match header.dtype() {
        DType::Plain(ts) => ts,
        other => bail_user!("{origin}: unexpected dtype {}", other.descr()),
    };
    if ts.num_bytes().unwrap_or(0) == 0 {
        bail_user!("{origin}: dtype {ts} has no size");
    }
    let shape = header.shape().to_vec();
    if shape.len() > 1 {
        bail_user!("{origin}: expected a 1-D array, got shape {shape:?}");
    }
    Ok(Member {
        len: shape.iter().product(),
        shape,
        elem: Elem {
            kind: ts.type_char(),
            size: ts.num_bytes().unwrap_or(0),
            big_endian: ts.endianness() == Endianness::Big,
        },
        descr: ts.to_string(),
    })
}

/// Reads `n` elements' bytes (the buffer grows with what is really there).
fn read_elems<R: Read + ?Sized>(
    r: &mut R,
    n: u64,
    e: Elem,
    buf: &mut Vec<u8>,
    origin: &str,
) -> Result<()> {
    buf.clear();
    let want = n.saturating_mul(e.size as u64);
    r.take(want).read_to_end(buf).map_err(|err| {
        user(format!(
            "{origin}: cannot read ({err}); is the file truncated?"
        ))
    })?;
    if buf.len() as u64 != want {
        bail_user!("{origin}: ends early; is the file truncated?");
    }
    Ok(())
}

fn is_index(e: Elem) -> bool {
    matches!(e.kind, TypeChar::Int | TypeChar::Uint) && matches!(e.size, 1 | 2 | 4 | 8)
}

fn is_value(e: Elem) -> bool {
    matches!((e.kind, e.size), (TypeChar::Float, 2 | 4 | 8)) || is_index(e)
}

/// Integers of type `e` (checked by [`is_index`]) as i64; u64 beyond
/// i64::MAX becomes -1, caught as out of range.
fn to_i64(bytes: &[u8], e: Elem, out: &mut Vec<i64>) {
    out.clear();
    out.extend(bytes.chunks_exact(e.size).map(|c| {
        let mut a = [0u8; 8];
        let le: Vec<u8> = if e.big_endian {
            c.iter().rev().copied().collect()
        } else {
            c.to_vec()
        };
        a[..e.size].copy_from_slice(&le);
        let negative = e.kind == TypeChar::Int && le[e.size - 1] & 0x80 != 0;
        if negative {
            a[e.size..].fill(0xff);
        }
        let v = i64::from_le_bytes(a);
        if e.kind == TypeChar::Uint && e.size == 8 && v < 0 {
            -1
        } else {
            v
        }
    }));
}

/// Values of type `e` (checked by [`is_value`]) as f32.
fn to_f32(bytes: &[u8], e: Elem, out: &mut Vec<f32>) {
    out.clear();
    if e.kind == TypeChar::Float {
        out.extend(bytes.chunks_exact(e.size).map(|c| {
            let mut le = c.to_vec();
            if e.big_endian {
                le.reverse();
            }
            match e.size {
                2 => f32::from(half::f16::from_le_bytes([le[0], le[1]])),
                4 => f32::from_le_bytes(le.try_into().unwrap()),
                _ => f64::from_le_bytes(le.try_into().unwrap()) as f32,
            }
        }));
    } else {
        let mut ints = Vec::new();
        to_i64(bytes, e, &mut ints);
        out.extend(ints.iter().map(|&v| v as f32));
    }
}

/// Member `name` of the sparse archive `spec` (whose members are `names`),
/// opened and its .npy header read.
fn open_member<'a>(
    zip: &'a mut ZipArchive<BufReader<File>>,
    spec: &str,
    name: &str,
    names: &[String],
) -> Result<(zip::read::ZipFile<'a>, Member)> {
    let mut m = match zip.by_name(&format!("{name}.npy")) {
        Ok(m) => m,
        Err(_) => bail_user!(
            "{spec}: a sparse matrix archive without `{name}` (it has: {})",
            names.join(", ")
        ),
    };
    let member = read_member_header(&mut m, &format!("{spec}:{name}"))?;
    Ok((m, member))
}

/// The `format` member's string (`|S3`, or `<U3` from old scipy versions).
fn format_name(fm: &Member, fbytes: &[u8], spec: &str) -> Result<String> {
    Ok(match (fm.elem.kind, fm.shape.is_empty()) {
        (TypeChar::ByteStr, true) => String::from_utf8_lossy(fbytes)
            .trim_end_matches('\0')
            .to_string(),
        (TypeChar::UnicodeStr, true) => fbytes
            .chunks_exact(4)
            .filter_map(|c| {
                let v = if fm.elem.big_endian {
                    u32::from_be_bytes(c.try_into().unwrap())
                } else {
                    u32::from_le_bytes(c.try_into().unwrap())
                };
                char::from_u32(v)
            })
            .collect::<String>()
            .trim_end_matches('\0')
            .to_string(),
        _ => bail_user!(
            "{spec}:format: expected a string (scipy's format name), got dtype {} shape {:?}",
            fm.descr,
            fm.shape
        ),
    })
}

/// The `shape` member: (rows, cols).
fn shape_of(sm: &Member, sbytes: &[u8], spec: &str) -> Result<(usize, usize)> {
    if !is_index(sm.elem) || sm.len != 2 {
        bail_user!(
            "{spec}:shape: expected 2 integers, got dtype {} shape {:?}",
            sm.descr,
            sm.shape
        );
    }
    let mut shape = Vec::new();
    to_i64(sbytes, sm.elem, &mut shape);
    if shape.iter().any(|&d| d < 0) {
        bail_user!("{spec}:shape: {shape:?} is not a valid shape");
    }
    Ok((shape[0] as usize, shape[1] as usize))
}

/// The `indptr` member as i64, checked: `rows + 1` entries from 0, never
/// decreasing.
fn indptr_of(
    pm: &Member,
    pbytes: Vec<u8>,
    rows: usize,
    cols: usize,
    spec: &str,
) -> Result<Vec<i64>> {
    if !is_index(pm.elem) || pm.shape.len() != 1 {
        bail_user!(
            "{spec}:indptr: expected a 1-D integer array, got dtype {} shape {:?}",
            pm.descr,
            pm.shape
        );
    }
    if pm.len != rows as u64 + 1 {
        bail_user!(
            "{spec}:indptr: has {} entries but shape {rows} x {cols} needs {}",
            pm.len,
            rows + 1
        );
    }
    let mut indptr = Vec::new();
    to_i64(&pbytes, pm.elem, &mut indptr);
    drop(pbytes);
    if indptr[0] != 0 {
        bail_user!("{spec}:indptr: starts at {}, not 0", indptr[0]);
    }
    if let Some(r) = indptr.windows(2).position(|w| w[1] < w[0]) {
        bail_user!(
            "{spec}:indptr: decreases at row {r} ({} then {})",
            indptr[r],
            indptr[r + 1]
        );
    }
    Ok(indptr)
}

/// Whether `spec` names a whole `.npz` archive (no `:member`) that holds a
/// scipy sparse matrix (a `format` member): then it is opened and checked.
/// `None` for anything else (a `.npy`, a member, a dense archive).
pub fn open(spec: &str) -> Result<Option<CsrFile>> {
    let path = Path::new(spec);
    if !spec.ends_with(".npz") || !path.is_file() {
        return Ok(None);
    }
    let mut zip = open_zip(path, spec)?;
    let names: Vec<String> = zip.file_names().map(str::to_owned).collect();
    if !names.iter().any(|n| n == "format.npy") {
        return Ok(None);
    }
    let mut small = |name: &str| -> Result<(Member, Vec<u8>)> {
        let origin = format!("{spec}:{name}");
        let (mut m, member) = open_member(&mut zip, spec, name, &names)?;
        if member.len > 1 << 20 && name != "indptr" {
            bail_user!("{origin}: {} elements; expected a few", member.len);
        }
        let mut bytes = Vec::new();
        read_elems(&mut m, member.len, member.elem, &mut bytes, &origin)?;
        Ok((member, bytes))
    };

    let (fm, fbytes) = small("format")?;
    let format = format_name(&fm, &fbytes, spec)?;
    if format != "csr" {
        bail_user!(
            "{spec}: holds a sparse matrix in `{format}` format; decode reads CSR: \
             convert it with `m.tocsr()` and save it again with scipy.sparse.save_npz"
        );
    }

    let (sm, sbytes) = small("shape")?;
    let (rows, cols) = shape_of(&sm, &sbytes, spec)?;

    let (pm, pbytes) = small("indptr")?;
    let indptr = indptr_of(&pm, pbytes, rows, cols, spec)?;
    let nnz = *indptr.last().unwrap() as u64;

    // data and indices: headers only here.
    let mut header_of = |name: &str| -> Result<Member> {
        let origin = format!("{spec}:{name}");
        let (_, member) = open_member(&mut zip, spec, name, &names)?;
        if member.shape.len() != 1 {
            bail_user!(
                "{origin}: expected a 1-D array, got shape {:?}",
                member.shape
            );
        }
        if member.len != nnz {
            bail_user!(
                "{origin}: has {} entries but indptr ends at {nnz}",
                member.len
            );
        }
        Ok(member)
    };
    let im = header_of("indices")?;
    if !is_index(im.elem) {
        bail_user!("{spec}:indices: dtype {} is not an integer type", im.descr);
    }
    let dm = header_of("data")?;
    if !is_value(dm.elem) {
        bail_user!(
            "{spec}:data: dtype {} is not supported; use float32 or float64",
            dm.descr
        );
    }
    Ok(Some(CsrFile {
        path: path.to_owned(),
        origin: spec.to_owned(),
        rows,
        cols,
        indptr,
        data: dm.elem,
        indices: im.elem,
    }))
}

impl CsrFile {
    /// Stored values.
    pub fn nnz(&self) -> u64 {
        *self.indptr.last().unwrap() as u64
    }

    /// Densifies the matrix `batch` rows at a time (duplicates summed, as
    /// scipy's `toarray`), calling `f` with each chunk.
    pub fn for_each_chunk(
        &self,
        batch: usize,
        mut f: impl FnMut(Matrix) -> Result<()>,
    ) -> Result<()> {
        let spec = &self.origin;
        // Two handles: data and indices are read side by side.
        let mut zd = open_zip(&self.path, spec)?;
        let mut zi = open_zip(&self.path, spec)?;
        let dorigin = format!("{spec}:data");
        let iorigin = format!("{spec}:indices");
        let mut dr = zd
            .by_name("data.npy")
            .map_err(|e| user(format!("{dorigin}: {e}")))?;
        let mut ir = zi
            .by_name("indices.npy")
            .map_err(|e| user(format!("{iorigin}: {e}")))?;
        read_member_header(&mut dr, &dorigin)?;
        read_member_header(&mut ir, &iorigin)?;
        let cols = self.cols;
        let batch = batch.max(1);
        let (mut dbytes, mut ibytes) = (Vec::new(), Vec::new());
        let (mut vals, mut idx) = (Vec::new(), Vec::new());
        let mut r0 = 0;
        while r0 < self.rows {
            let len = batch.min(self.rows - r0);
            let (a, b) = (self.indptr[r0], self.indptr[r0 + len]);
            let n = (b - a) as u64;
            read_elems(&mut dr, n, self.data, &mut dbytes, &dorigin)?;
            read_elems(&mut ir, n, self.indices, &mut ibytes, &iorigin)?;
            to_f32(&dbytes, self.data, &mut vals);
            to_i64(&ibytes, self.indices, &mut idx);
            let mut dense = vec![0f32; len * cols];
            for r in 0..len {
                let lo = (self.indptr[r0 + r] - a) as usize;
                let hi = (self.indptr[r0 + r + 1] - a) as usize;
                for k in lo..hi {
                    let (j, v) = (idx[k], vals[k]);
                    if j < 0 || j as usize >= cols {
                        bail_user!(
                            "{iorigin}: column index {j} at row {} is out of range for {cols} columns",
                            r0 + r
                        );
                    }
                    if !v.is_finite() {
                        bail_user!(
                            "{dorigin}: value at row {}, column {j} is {v}; remove non-finite values first",
                            r0 + r
                        );
                    }
                    dense[r * cols + j as usize] += v;
                }
            }
            f(Matrix {
                data: dense,
                rows: len,
                cols,
            })?;
            r0 += len;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_keeps_largest_magnitudes_lower_index_on_ties() {
        let mut out = Vec::new();
        row_entries(&[0.0, -3.0, 1.0, 3.0, 0.0, 2.0], Some(2), &mut out);
        assert_eq!(out, vec![(1, -3.0), (3, 3.0)]);
        row_entries(&[1.0, 1.0, 1.0], Some(2), &mut out);
        assert_eq!(out, vec![(0, 1.0), (1, 1.0)]);
        row_entries(&[0.0, 5.0, 0.0], Some(3), &mut out);
        assert_eq!(out, vec![(1, 5.0)]);
        row_entries(&[0.0, -0.0, 2.0], None, &mut out);
        assert_eq!(out, vec![(2, 2.0)]);
        let mut m = vec![1.0, 4.0, -5.0, 0.0, 2.0, 2.0];
        keep_top(&mut m, 3, 1);
        assert_eq!(m, vec![0.0, 0.0, -5.0, 0.0, 2.0, 0.0]);
    }

    /// Written and read back: int32, and int64 with zip64 headers (the path
    /// of more than 2^31 stored values or a member over 4 GiB).
    #[test]
    fn round_trip_int32_and_int64() {
        let dir = tempfile::tempdir().unwrap();
        let (rows, cols) = (37, 11);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| if i % 3 == 0 { i as f32 - 200.0 } else { 0.0 })
            .collect();
        for (wide, name) in [(false, "a.npz"), (true, "b.npz")] {
            let path = dir.path().join(name);
            let mut w = CsrWriter::create(&path, cols, None).unwrap();
            if wide {
                w.int32_max = 5;
                w.zip64_from = 0;
            }
            w.write_rows(&values[..10 * cols], 10).unwrap();
            w.write_rows(&values[10 * cols..], rows - 10).unwrap();
            w.finish().unwrap();
            let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
            assert_eq!(names.len(), if wide { 2 } else { 1 }, "temp files left");
            let m = open(path.to_str().unwrap())
                .unwrap()
                .expect("a CSR archive");
            assert_eq!((m.rows, m.cols), (rows, cols));
            assert_eq!(m.indices.size, if wide { 8 } else { 4 });
            let mut back = Vec::new();
            m.for_each_chunk(4, |c| {
                back.extend(c.data);
                Ok(())
            })
            .unwrap();
            assert_eq!(back, values);
        }
    }

    #[test]
    fn integers_widen_with_sign() {
        let e = |kind, size| Elem {
            kind,
            size,
            big_endian: false,
        };
        let mut out = Vec::new();
        to_i64(&(-7i32).to_le_bytes(), e(TypeChar::Int, 4), &mut out);
        assert_eq!(out, vec![-7]);
        to_i64(&40000u16.to_le_bytes(), e(TypeChar::Uint, 2), &mut out);
        assert_eq!(out, vec![40000]);
        let be = Elem {
            big_endian: true,
            ..e(TypeChar::Int, 8)
        };
        to_i64(&(-2i64).to_be_bytes(), be, &mut out);
        assert_eq!(out, vec![-2]);
    }
}
