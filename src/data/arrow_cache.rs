//! Training rows from a SAELens activation cache: the Hugging Face `datasets`
//! directory `CacheActivationsRunner` writes with `save_to_disk`
//! (`dataset_info.json`, `state.json`, `data-XXXXX-of-NNNNN.arrow` in Arrow
//! IPC *stream* format). One column, named after the hook, holds per row a
//! `[context_size, d_in]` float array (`Array2D`: stored as a list of lists;
//! fixed-size lists are read too); `token_ids` sits beside it. Every token
//! is one training row, sequences in order (`n_seq * context_size` rows).
//!
//! Files are read in `state.json`'s `_data_files` order (what
//! `datasets.load_from_disk` does); the activation column is the one feature
//! that is not `token_ids`, or the one named by `DIR:column`.

use crate::data::npy::{check_finite, DataShape, Matrix};
use crate::error::user;
use crate::{bail_user, Result};
use arrow_array::{
    Array, ArrayRef, FixedSizeListArray, Float16Array, Float32Array, Float64Array, LargeListArray,
    ListArray,
};
use arrow_ipc::reader::StreamReader;
use arrow_schema::DataType;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// A cache directory opened: its files in order and the column to read.
pub struct Cache {
    pub dir: PathBuf,
    pub files: Vec<PathBuf>,
    pub column: String,
}

/// Whether `dir` looks like a `datasets` directory saved with `save_to_disk`.
pub fn is_cache_dir(dir: &Path) -> bool {
    dir.is_dir()
        && (dir.join("state.json").is_file()
            || dir.join("dataset_info.json").is_file()
            || dir.join("dataset_dict.json").is_file())
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| user(format!("{}: cannot read: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| user(format!("{}: not valid JSON: {e}", path.display())))
}

/// Opens the cache at `dir`, reading `column` (or the only activation column).
pub fn open(dir: &Path, column: Option<&str>) -> Result<Cache> {
    let d = dir.display();
    if dir.join("dataset_dict.json").is_file() {
        bail_user!(
            "{d}: a DatasetDict (dataset_dict.json); pass one split's directory, e.g. {d}/train"
        );
    }
    let files = data_files(dir)?;
    let features = feature_names(dir, &files[0])?;
    let column = match column {
        Some(c) => {
            if !features.iter().any(|f| f == c) {
                bail_user!(
                    "{d}:{c}: no column `{c}` in the cache (it has: {})",
                    features.join(", ")
                );
            }
            c.to_owned()
        }
        None => {
            let acts: Vec<&String> = features.iter().filter(|f| *f != "token_ids").collect();
            match acts.as_slice() {
                [one] => (*one).clone(),
                [] => bail_user!(
                    "{d}: no activation column (it has: {}); a SAELens cache holds one named \
                     after the hook, e.g. blocks.0.hook_resid_pre",
                    features.join(", ")
                ),
                _ => bail_user!(
                    "{d}: several activation columns ({}); name one: {d}:COLUMN",
                    acts.iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
    };
    Ok(Cache {
        dir: dir.to_owned(),
        files,
        column,
    })
}

/// The `.arrow` files in `state.json`'s order, else sorted by name.
fn data_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let state_path = dir.join("state.json");
    let files = match read_json(&state_path)? {
        Some(state) => {
            let list = state
                .get("_data_files")
                .and_then(|v| v.as_array())
                .ok_or_else(|| {
                    user(format!(
                        "{}: no `_data_files` list; is this a dataset saved with save_to_disk?",
                        state_path.display()
                    ))
                })?;
            let mut files = Vec::with_capacity(list.len());
            for f in list {
                match f.get("filename").and_then(|n| n.as_str()) {
                    // A bare file name: never a path out of the directory.
                    Some(n) if !n.contains('/') && !n.contains('\\') && n != ".." => {
                        files.push(dir.join(n))
                    }
                    _ => bail_user!(
                        "{}: `_data_files` entry {f} has no plain `filename`",
                        state_path.display()
                    ),
                }
            }
            files
        }
        None => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| user(format!("{}: cannot list: {e}", dir.display())))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "arrow") && p.is_file())
                .collect();
            files.sort();
            files
        }
    };
    if files.is_empty() {
        bail_user!("{}: the cache holds no .arrow data files", dir.display());
    }
    Ok(files)
}

/// Column names: `dataset_info.json`'s features, else the first file's schema.
fn feature_names(dir: &Path, first: &Path) -> Result<Vec<String>> {
    let info_path = dir.join("dataset_info.json");
    if let Some(info) = read_json(&info_path)? {
        if let Some(f) = info.get("features").and_then(|f| f.as_object()) {
            return Ok(f.keys().cloned().collect());
        }
    }
    let reader = stream(first, None)?;
    Ok(reader
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect())
}

fn stream(path: &Path, projection: Option<Vec<usize>>) -> Result<StreamReader<BufReader<File>>> {
    let p = path.display();
    let file = File::open(path).map_err(|e| user(format!("{p}: cannot open: {e}")))?;
    StreamReader::try_new(BufReader::new(file), projection)
        .map_err(|e| user(format!("{p}: not a readable Arrow IPC stream: {e}")))
}

/// Sequences (record batch rows) in one file, from the message headers
/// only: bodies are skipped.
fn count_sequences(path: &Path) -> Result<usize> {
    let p = path.display();
    let bad = |what: String| user(format!("{p}: not a readable Arrow IPC stream: {what}"));
    let file = File::open(path).map_err(|e| user(format!("{p}: cannot open: {e}")))?;
    let len = file.metadata()?.len();
    let mut r = BufReader::new(file);
    let mut n = 0usize;
    let mut meta = Vec::new();
    loop {
        let mut word = [0u8; 4];
        if r.read_exact(&mut word).is_err() {
            break; // end of stream without an end marker: allowed
        }
        let mut size = u32::from_le_bytes(word);
        if size == 0xFFFF_FFFF {
            r.read_exact(&mut word)
                .map_err(|_| bad("truncated message".into()))?;
            size = u32::from_le_bytes(word);
        }
        if size == 0 {
            break;
        }
        if size as u64 > len {
            return Err(bad(format!("message of {size} bytes in a {len}-byte file")));
        }
        meta.resize(size as usize, 0);
        r.read_exact(&mut meta)
            .map_err(|_| bad("truncated message".into()))?;
        let msg = arrow_ipc::root_as_message(&meta).map_err(|e| bad(e.to_string()))?;
        if let Some(b) = msg.header_as_record_batch() {
            n += usize::try_from(b.length()).map_err(|_| bad("negative row count".into()))?;
        }
        let body = msg.bodyLength();
        if body < 0 || body as u64 > len {
            return Err(bad(format!("body of {body} bytes")));
        }
        r.seek(SeekFrom::Current(body))
            .map_err(|e| bad(e.to_string()))?;
    }
    Ok(n)
}

/// Per list slot: (start in the child array, length).
fn list_slots(a: &dyn Array) -> Option<(ArrayRef, Vec<(usize, usize)>)> {
    let any = a.as_any();
    if let Some(l) = any.downcast_ref::<ListArray>() {
        let o = l.value_offsets();
        let slots = o
            .windows(2)
            .map(|w| (w[0] as usize, (w[1] - w[0]) as usize));
        return Some((l.values().clone(), slots.collect()));
    }
    if let Some(l) = any.downcast_ref::<LargeListArray>() {
        let o = l.value_offsets();
        let slots = o
            .windows(2)
            .map(|w| (w[0] as usize, (w[1] - w[0]) as usize));
        return Some((l.values().clone(), slots.collect()));
    }
    if let Some(l) = any.downcast_ref::<FixedSizeListArray>() {
        let n = l.value_length() as usize;
        let slots = (0..l.len()).map(|i| (l.value_offset_at(i), n));
        return Some((l.values().clone(), slots.collect()));
    }
    None
}

/// Float values as float32, whatever their width.
enum Floats<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
    F64(&'a [f64]),
}

impl<'a> Floats<'a> {
    /// The values of a float16/32/64 array (None for any other type).
    fn of(values: &'a dyn Array) -> Option<Floats<'a>> {
        let any = values.as_any();
        Some(match values.data_type() {
            DataType::Float32 => Floats::F32(
                any.downcast_ref::<Float32Array>()
                    .expect("float32")
                    .values(),
            ),
            DataType::Float16 => Floats::F16(
                any.downcast_ref::<Float16Array>()
                    .expect("float16")
                    .values(),
            ),
            DataType::Float64 => Floats::F64(
                any.downcast_ref::<Float64Array>()
                    .expect("float64")
                    .values(),
            ),
            _ => return None,
        })
    }

    fn extend(&self, out: &mut Vec<f32>, start: usize, len: usize) {
        match self {
            Floats::F32(v) => out.extend_from_slice(&v[start..start + len]),
            Floats::F16(v) => out.extend(v[start..start + len].iter().map(|x| x.to_f32())),
            Floats::F64(v) => out.extend(v[start..start + len].iter().map(|x| *x as f32)),
        }
    }
}

impl Cache {
    fn origin(&self, file: &Path) -> String {
        format!("{} (column {})", file.display(), self.column)
    }

    /// Rows and columns: sequence counts from the message headers, the
    /// sequence shape from the first batch.
    pub fn shape(&self) -> Result<DataShape> {
        let mut seqs = 0;
        for f in &self.files {
            seqs += count_sequences(f)?;
        }
        let mut shape = None;
        for f in &self.files {
            let mut found = None;
            self.read_file(f, usize::MAX / 2, None, 0, &mut |ctx, d, _| {
                found = Some((ctx, d));
                Ok(false)
            })?;
            if found.is_some() {
                shape = found;
                break;
            }
        }
        let Some((ctx, d)) = shape else {
            bail_user!("{}: the cache holds no rows", self.dir.display());
        };
        Ok(DataShape {
            rows: seqs * ctx,
            cols: d,
        })
    }

    /// Calls `f` with chunks of at most `batch` rows (tokens), in order.
    pub fn for_each_chunk(
        &self,
        batch: usize,
        f: &mut dyn FnMut(Matrix) -> Result<()>,
    ) -> Result<DataShape> {
        let mut shape: Option<(usize, usize)> = None;
        let mut rows = 0;
        for file in &self.files {
            self.read_file(file, batch, shape, rows, &mut |ctx, d, m| {
                shape.get_or_insert((ctx, d));
                if let Some(m) = m {
                    rows += m.rows;
                    f(m)?;
                }
                Ok(true)
            })?;
        }
        match shape {
            Some((_, cols)) if rows > 0 => Ok(DataShape { rows, cols }),
            _ => bail_user!("{}: the cache holds no rows", self.dir.display()),
        }
    }

    /// Reads one file's column; `go(ctx, d, chunk)` gets each chunk (or
    /// `None` first for a batch's shape when `go` may stop early: it
    /// returns false to stop). `want` is the (ctx, d) earlier files had.
    fn read_file(
        &self,
        file: &Path,
        batch: usize,
        want: Option<(usize, usize)>,
        first_row: usize,
        go: &mut dyn FnMut(usize, usize, Option<Matrix>) -> Result<bool>,
    ) -> Result<()> {
        let origin = self.origin(file);
        let fd = file.display();
        let reader = stream(file, Some(vec![self.column_index(file)?]))?;
        let mut want = want;
        let mut row = first_row;
        for rb in reader {
            let rb = rb.map_err(|e| user(format!("{fd}: cannot read a record batch: {e}")))?;
            let col = rb.column(0);
            let not_2d = || {
                user(format!(
                    "{origin}: type {} is not a [context_size, d_in] float array \
                     (Array2D, or lists of lists of floats)",
                    col.data_type()
                ))
            };
            no_nulls(col.as_ref(), &origin)?;
            let (inner, seqs) = list_slots(col.as_ref()).ok_or_else(not_2d)?;
            no_nulls(inner.as_ref(), &origin)?;
            let (values, tokens) = list_slots(inner.as_ref()).ok_or_else(not_2d)?;
            no_nulls(values.as_ref(), &origin)?;
            let floats = Floats::of(values.as_ref()).ok_or_else(not_2d)?;
            if seqs.is_empty() {
                continue;
            }
            let ctx = seqs[0].1;
            let d = tokens.get(seqs[0].0).map_or(0, |t| t.1);
            if ctx == 0 || d == 0 {
                bail_user!("{origin}: sequences of shape [{ctx}, {d}]; need at least one token and one feature");
            }
            match want {
                Some((c, w)) if (c, w) != (ctx, d) => bail_user!(
                    "{origin}: sequences of shape [{ctx}, {d}] but earlier ones are [{c}, {w}]"
                ),
                _ => want = Some((ctx, d)),
            }
            if !go(ctx, d, None)? {
                return Ok(());
            }
            let slots = token_slots(&seqs, &tokens, ctx, d, &origin)?;
            for group in slots.chunks(batch.max(1)) {
                let mut data = Vec::with_capacity(group.len() * d);
                for &s in group {
                    floats.extend(&mut data, s, d);
                }
                check_finite(&data, d, row, &origin)?;
                row += group.len();
                let m = Matrix {
                    data,
                    rows: group.len(),
                    cols: d,
                };
                go(ctx, d, Some(m))?;
            }
        }
        Ok(())
    }

    /// The index of the cache's column in `file`'s schema.
    fn column_index(&self, file: &Path) -> Result<usize> {
        let schema = stream(file, None)?.schema();
        match schema.index_of(&self.column) {
            Ok(index) => Ok(index),
            Err(_) => {
                let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                bail_user!(
                    "{}: no column `{}` (it has: {})",
                    file.display(),
                    self.column,
                    names.join(", ")
                );
            }
        }
    }
}

/// Refuses an array with null values.
fn no_nulls(a: &dyn Array, origin: &str) -> Result<()> {
    if a.null_count() > 0 {
        bail_user!("{origin}: holds null values; every row needs its activations");
    }
    Ok(())
}

/// Where each token's values start, in order, checking that every sequence
/// (slot of `seqs` in `tokens`) has `ctx` tokens of `d` values.
fn token_slots(
    seqs: &[(usize, usize)],
    tokens: &[(usize, usize)],
    ctx: usize,
    d: usize,
    origin: &str,
) -> Result<Vec<usize>> {
    let mut slots = Vec::with_capacity(seqs.len() * ctx);
    for &(start, len) in seqs {
        if len != ctx {
            bail_user!(
                "{origin}: a sequence of {len} tokens among ones of {ctx}; \
                 every row must be [context_size, d_in]"
            );
        }
        for &(s, l) in &tokens[start..start + len] {
            if l != d {
                bail_user!(
                    "{origin}: a token of {l} values among ones of {d}; \
                     every row must be [context_size, d_in]"
                );
            }
            slots.push(s);
        }
    }
    Ok(slots)
}
