//! Streamed training batches: a background thread reads an epoch's rows
//! from a float32 C-order `.npy` file one window at a time (the blocks the
//! window's rows fall in, with O_DIRECT where possible, several requests in
//! flight, straight into reused buffers), while the training loop gathers
//! batches from the window before.
//!
//! Why not gather from the memory map: under a memory cap every page of the
//! file is faulted in by the training thread itself, and the kernel reclaims
//! the page cache in that same thread, which stalls the compute (78 % of the
//! in-memory rate in `make bench` with half the file's size as the cap).
//! Reading ahead in a thread of its own takes both off the critical path.
//!
//! Memory: the window in use and the next, plus the next epoch's first near an
//! epoch's end: at most three window buffers, whatever the file size.

use crate::error::user;
use crate::Result;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use tch::{Device, Kind, Tensor};

/// Where the rows are: the file, the byte offset of row 0 and the shape.
#[derive(Debug, Clone)]
pub struct RowFile {
    pub path: PathBuf,
    pub file: Arc<File>,
    /// The same file opened with O_DIRECT, where the filesystem allows it.
    pub direct: Option<Arc<File>>,
    pub offset: u64,
    pub rows: usize,
    pub cols: usize,
    /// Window buffers handed back by the training loop, for the next window
    /// (shared by all epochs' readers): reused memory is already paged in,
    /// so a read costs no page faults and no zeroing on a busy core.
    pool: Arc<Mutex<Vec<AlignedBuf>>>,
}

impl RowFile {
    pub fn open(path: &Path, file: Arc<File>, offset: u64, rows: usize, cols: usize) -> RowFile {
        RowFile {
            path: path.to_owned(),
            file,
            direct: open_direct(path).map(Arc::new),
            offset,
            rows,
            cols,
            pool: Arc::default(),
        }
    }
}

/// O_DIRECT: the disk writes straight into the window (no page cache, no
/// copy). Buffered reads fill the page cache, and under a memory cap the
/// kernel then reclaims it on a core the compute needs: `make bench`'s
/// out-of-core case (cap of half the file, 2 cores) ran at 81 % of the
/// in-memory rate buffered and 93 % direct; uncapped both reach ~95 %.
fn open_direct(path: &Path) -> Option<File> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        None
    }
}

/// The rows of one window, read, and where each row of the order sits.
struct Window {
    /// A view of `buf`.
    data: Tensor,
    /// For each order entry of the window, its row in `data`...
    local: Vec<i64>,
    /// ... as a tensor, made on the training thread: a libtorch op that
    /// runs in parallel (`from_slice` zero-fills) would give this thread an
    /// OpenMP team of its own, and with more OpenMP threads than cores
    /// libgomp stops spinning between parallel regions, which left the
    /// training threads idle 6 % of the time.
    index: Option<Tensor>,
    buf: Option<AlignedBuf>,
    pool: Arc<Mutex<Vec<AlignedBuf>>>,
}

impl Drop for Window {
    fn drop(&mut self) {
        // The view goes first, then the memory goes back to the pool.
        drop(std::mem::replace(&mut self.data, Tensor::new()));
        if let (Some(buf), Ok(mut pool)) = (self.buf.take(), self.pool.lock()) {
            if pool.len() < 3 {
                pool.push(buf);
            }
        }
    }
}

/// Page-aligned memory, as O_DIRECT reads need.
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.layout.size())
    }
}

// SAFETY: plain owned memory; only one thread uses it at a time.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn new(size: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(size.max(HUGE), HUGE).expect("layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        // Huge pages where the kernel allows them: O_DIRECT pins 100 pages
        // per window instead of 50,000, and row gathers miss the TLB less.
        #[cfg(target_os = "linux")]
        // SAFETY: advice on memory we own; failure only means small pages.
        unsafe {
            libc::madvise(ptr as *mut libc::c_void, layout.size(), libc::MADV_HUGEPAGE);
        }
        AlignedBuf { ptr, layout }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

const PAGE: usize = 4096;
const HUGE: usize = 2 << 20;
/// O_DIRECT request size and how many are in flight.
const PIECE: usize = 8 << 20;
const READ_THREADS: usize = 4;

/// Reads `order` window by window (`window` rows of the order each) on a
/// background thread; `next_batch` hands out the rows in order. The
/// reader threads make no libtorch calls that compute (see `Window::index`).
pub struct WindowReader {
    rx: Option<Receiver<Result<Window>>>,
    handle: Option<JoinHandle<()>>,
    current: Option<(Window, i64)>,
    path: PathBuf,
    /// Data-parallel: this rank reads only the blocks it owns.
    owner: Option<Owner>,
}

/// Which units (blocks of a file, groups of a model's sequences) a rank
/// owns in data-parallel training: unit `u` is rank `u % world`'s. A rank
/// reads or computes only its units, and its part of a batch is the
/// batch's rows that fall in them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub rank: usize,
    pub world: usize,
}

impl Owner {
    pub fn owns(&self, unit: usize) -> bool {
        unit % self.world == self.rank
    }
}

/// The next `need` entries of a window's `local` map from `pos` on (-1:
/// a row another rank owns): where this rank's rows sit in the window, and
/// their positions in the batch, counted from `base`.
pub(crate) fn take_owned(
    local: &[i64],
    pos: &mut usize,
    need: usize,
    base: usize,
    idx: &mut Vec<i64>,
    at: &mut Vec<i64>,
) -> usize {
    let take = need.min(local.len() - *pos);
    for (i, &l) in local[*pos..*pos + take].iter().enumerate() {
        if l >= 0 {
            idx.push(l);
            at.push((base + i) as i64);
        }
    }
    *pos += take;
    take
}

impl WindowReader {
    /// Starts reading. `block` rows form the unit of a read: a window is
    /// the longest stretch of the order that falls in `window / block`
    /// blocks (exactly one window of `block_shuffled_order`; shorter for
    /// scattered orders, so memory stays bounded), and each run of adjacent
    /// blocks is one read.
    pub fn start(
        src: &RowFile,
        order: Vec<i64>,
        block: usize,
        window: usize,
        owner: Option<Owner>,
    ) -> WindowReader {
        // Rendezvous channel: the reader finishes window k+1, then waits
        // until the loop takes it, so at most two windows are alive.
        let (tx, rx) = sync_channel(0);
        let src = src.clone();
        let path = src.path.clone();
        let block = block.max(1);
        let handle = std::thread::Builder::new()
            .name("sae-reader".into())
            .spawn(move || {
                let max_blocks = window.div_ceil(block).max(1);
                for rows in windows(&order, block, max_blocks) {
                    let w = match owner {
                        None => read_window(&src, rows, block, max_blocks),
                        Some(o) => read_owned(&src, rows, block, max_blocks, o),
                    };
                    let failed = w.is_err();
                    if tx.send(w).is_err() || failed {
                        return;
                    }
                }
            })
            .expect("spawn the data reader thread");
        WindowReader {
            rx: Some(rx),
            handle: Some(handle),
            current: None,
            path,
            owner,
        }
    }

    /// Data-parallel: of the next `n` rows of the order, this rank's (the
    /// ones in blocks it owns) and their positions among the `n`.
    pub fn next_owned(&mut self, n: usize) -> Result<(Tensor, Tensor)> {
        debug_assert!(self.owner.is_some());
        let (mut parts, mut at, mut done) = (Vec::new(), Vec::new(), 0);
        while done < n {
            let (w, pos) = self.window()?;
            let mut idx = Vec::new();
            let mut p = *pos as usize;
            done += take_owned(&w.local, &mut p, n - done, done, &mut idx, &mut at);
            *pos = p as i64;
            parts.push(w.data.index_select(0, &Tensor::from_slice(&idx)));
        }
        Ok((Tensor::cat(&parts, 0), Tensor::from_slice(&at)))
    }

    /// Waits for the first window (a run's set-up, like loading in-memory
    /// data, so the training loop's timing starts with data in hand).
    pub fn prime(&mut self) -> Result<()> {
        if self.current.is_none() {
            self.advance()?;
        }
        Ok(())
    }

    fn advance(&mut self) -> Result<()> {
        let rx = self.rx.as_ref().expect("receiver lives until drop");
        let w = rx.recv().map_err(|_| {
            user(format!(
                "{}: the data reader stopped before the epoch's end",
                self.path.display()
            ))
        })??;
        let mut w = w;
        w.index = Some(Tensor::from_slice(&w.local));
        self.current = Some((w, 0));
        Ok(())
    }

    /// The window being served and the position reached in it; the next
    /// window once this one is used up.
    fn window(&mut self) -> Result<(&mut Window, &mut i64)> {
        let exhausted = match &self.current {
            Some((w, pos)) => *pos >= w.local.len() as i64,
            None => true,
        };
        if exhausted {
            self.advance()?;
        }
        let (w, pos) = self.current.as_mut().expect("set above");
        Ok((w, pos))
    }

    /// The next `n` rows of the order as a `[n, cols]` float32 tensor.
    pub fn next_batch(&mut self, n: usize) -> Result<Tensor> {
        collect_rows(n, |need| {
            let (w, pos) = self.window()?;
            let index = w.index.as_ref().expect("set in advance");
            Ok(take_rows(&w.data, index, pos, need))
        })
    }
}

/// The next `n` rows of an order served window by window: `take(need)`
/// gives up to `need` rows of the current window, moving to the next
/// window first when the current one is used up.
pub(crate) fn collect_rows(
    n: usize,
    mut take: impl FnMut(i64) -> Result<Tensor>,
) -> Result<Tensor> {
    let mut parts = Vec::new();
    let mut need = n as i64;
    while need > 0 {
        let t = take(need)?;
        need -= t.size()[0];
        parts.push(t);
    }
    Ok(match parts.len() {
        1 => parts.pop().expect("one part"),
        _ => Tensor::cat(&parts, 0),
    })
}

/// Up to `need` rows of a window `data` from its order position `pos` on
/// (`index[i]`: where the order's i-th row sits in `data`).
pub(crate) fn take_rows(data: &Tensor, index: &Tensor, pos: &mut i64, need: i64) -> Tensor {
    let take = need.min(index.size()[0] - *pos);
    let rows = data.index_select(0, &index.narrow(0, *pos, take));
    *pos += take;
    rows
}

impl Drop for WindowReader {
    fn drop(&mut self) {
        // Dropping the receiver makes the reader's next send fail; it stops.
        self.rx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Splits `order` into the longest stretches touching at most `max_blocks`
/// blocks each.
pub(crate) fn windows(order: &[i64], block: usize, max_blocks: usize) -> Vec<&[i64]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut seen: Vec<usize> = Vec::with_capacity(max_blocks);
    for (i, &r) in order.iter().enumerate() {
        let b = r as usize / block;
        if !seen.contains(&b) {
            if seen.len() == max_blocks {
                out.push(&order[start..i]);
                start = i;
                seen.clear();
            }
            seen.push(b);
        }
    }
    if start < order.len() {
        out.push(&order[start..]);
    }
    out
}

/// Reads the blocks holding `rows` into one tensor, one read per run of
/// adjacent blocks, and maps each row to its place there.
///
/// With O_DIRECT, file offset, length and memory must be page-aligned, but
/// row 0 starts after the header. A block is `block * cols * 4` bytes, a
/// multiple of 4096, so every block starts at the same offset `shift` within
/// a page; the window's data therefore starts `shift` bytes into a page too,
/// and each run is read from the page boundary before it to the one after
/// it. That spills up to a page into the neighbouring slots, so once all
/// runs are in, the first and last page of each run are read again exactly.
/// [`read_window`] of only the blocks `owner` owns; the rows of the others
/// map to -1.
fn read_owned(
    src: &RowFile,
    rows: &[i64],
    block: usize,
    max_blocks: usize,
    owner: Owner,
) -> Result<Window> {
    let mine: Vec<i64> = rows
        .iter()
        .copied()
        .filter(|&r| owner.owns(r as usize / block))
        .collect();
    let mut w = match mine.is_empty() {
        false => read_window(src, &mine, block, max_blocks)?,
        true => Window {
            data: Tensor::zeros([0, src.cols as i64], (Kind::Float, Device::Cpu)),
            local: Vec::new(),
            index: None,
            buf: None,
            pool: src.pool.clone(),
        },
    };
    let mut own = w.local.iter();
    w.local = rows
        .iter()
        .map(|&r| match owner.owns(r as usize / block) {
            true => *own.next().expect("one local row per owned row"),
            false => -1,
        })
        .collect();
    Ok(w)
}

fn read_window(src: &RowFile, rows: &[i64], block: usize, max_blocks: usize) -> Result<Window> {
    let plan = WindowPlan::new(src, rows, block);
    let buf = plan.buffer(src, max_blocks);
    let base = plan.base(&buf);
    let direct = plan.read_direct(src, base);
    plan.read_exact(src, base, direct)?;
    Ok(Window {
        data: plan.tensor(src, base),
        local: plan.local_rows(rows),
        index: None,
        buf: Some(buf),
        pool: src.pool.clone(),
    })
}

/// Where a window's blocks go in its buffer and the reads that fill it.
struct WindowPlan {
    /// The blocks the rows fall in, ascending: block `blocks[s]` fills slot `s`.
    blocks: Vec<usize>,
    /// Each run of adjacent blocks, one read each.
    runs: Vec<Run>,
    block: usize,
    row_bytes: usize,
    block_bytes: usize,
    /// Where row 0 (so every block) starts within a page of the file.
    shift: usize,
}

/// One read: the blocks from slot `slot` on, starting at row `first_row`,
/// `bytes` of data (less than whole blocks at the file's end).
struct Run {
    slot: usize,
    first_row: usize,
    bytes: usize,
}

impl WindowPlan {
    fn new(src: &RowFile, rows: &[i64], block: usize) -> WindowPlan {
        let mut blocks: Vec<usize> = rows.iter().map(|&r| r as usize / block).collect();
        blocks.sort_unstable();
        blocks.dedup();
        let row_bytes = src.cols * 4;
        let mut runs = Vec::new();
        let mut s = 0;
        while s < blocks.len() {
            let mut e = s + 1;
            while e < blocks.len() && blocks[e] == blocks[e - 1] + 1 {
                e += 1;
            }
            let first_row = blocks[s] * block;
            let n_rows = ((e - s) * block).min(src.rows - first_row);
            runs.push(Run {
                slot: s,
                first_row,
                bytes: n_rows * row_bytes,
            });
            s = e;
        }
        WindowPlan {
            blocks,
            runs,
            block,
            row_bytes,
            block_bytes: block * row_bytes,
            shift: (src.offset as usize) % PAGE,
        }
    }

    /// A buffer from the pool, or a new one. Every buffer has room for
    /// `max_blocks` blocks, so any can be reused.
    fn buffer(&self, src: &RowFile, max_blocks: usize) -> AlignedBuf {
        let size = max_blocks.max(self.blocks.len()) * self.block_bytes + 2 * PAGE;
        let pooled = src.pool.lock().ok().and_then(|mut p| p.pop());
        match pooled {
            Some(b) if b.layout.size() >= size => b,
            _ => AlignedBuf::new(size),
        }
    }

    /// Where slot 0's data starts in `buf`: `shift` bytes into its first page.
    fn base(&self, buf: &AlignedBuf) -> *mut u8 {
        // SAFETY: `shift` < PAGE lies inside the allocation.
        unsafe { buf.ptr.add(self.shift) }
    }

    /// The file position of row `row`.
    fn at(&self, src: &RowFile, row: usize) -> u64 {
        src.offset + (row * self.row_bytes) as u64
    }

    /// Reads every run with O_DIRECT, spilling up to a page either side
    /// (see [`read_window`]). False, with nothing to rely on in the buffer,
    /// where O_DIRECT is not open or blocks are not whole pages or the
    /// kernel refuses: the caller then reads buffered.
    fn read_direct(&self, src: &RowFile, base: *mut u8) -> bool {
        let Some(f) = &src.direct else {
            return false;
        };
        if !self.block_bytes.is_multiple_of(PAGE) {
            return false;
        }
        // Each run from the page boundary before it to the one after it
        // (at most a page past the data: inside the spare pages), cut
        // into pieces read by a few threads, so several requests are in
        // flight (one 200 MB read: ~0.5 GB/s here; in parallel: more).
        let mut pieces = Vec::new();
        for run in &self.runs {
            let mem = base as usize + run.slot * self.block_bytes - self.shift;
            let pos = self.at(src, run.first_row) - self.shift as u64;
            let need = run.bytes + self.shift;
            let len = need.div_ceil(PAGE) * PAGE;
            for o in (0..need).step_by(PIECE) {
                let piece = PIECE.min(len - o);
                pieces.push((mem + o, piece, pos + o as u64, piece.min(need - o)));
            }
        }
        read_pieces(f, &pieces)
    }

    /// Buffered reads: after `read_direct` (`direct`), each run's first and
    /// last page again, exactly, to mend the spills; else every run whole.
    fn read_exact(&self, src: &RowFile, base: *mut u8, direct: bool) -> Result<()> {
        let exact = |mem: *mut u8, len: usize, pos: u64, first_row: usize| -> Result<()> {
            // SAFETY: callers pass ranges inside the allocation.
            let dst = unsafe { std::slice::from_raw_parts_mut(mem, len) };
            src.file.read_exact_at(dst, pos).map_err(|e| {
                user(format!(
                    "{}: cannot read rows {first_row}..{}: {e}",
                    src.path.display(),
                    first_row + len / self.row_bytes
                ))
            })
        };
        for &Run {
            slot,
            first_row,
            bytes,
        } in &self.runs
        {
            // SAFETY: inside the allocation (see `buffer`).
            let mem = unsafe { base.add(slot * self.block_bytes) };
            let at = self.at(src, first_row);
            if direct {
                let head = bytes.min(PAGE);
                exact(mem, head, at, first_row)?;
                let tail = bytes.min(PAGE);
                // SAFETY: bytes - tail < bytes.
                let tail_mem = unsafe { mem.add(bytes - tail) };
                exact(tail_mem, tail, at + (bytes - tail) as u64, first_row)?;
            } else {
                exact(mem, bytes, at, first_row)?;
            }
        }
        Ok(())
    }

    /// The read blocks as a `[blocks * block, cols]` view of the buffer.
    fn tensor(&self, src: &RowFile, base: *mut u8) -> Tensor {
        // SAFETY: `base` holds `blocks.len() * block` rows of `cols` floats
        // and lives in the buffer, which the Window keeps past `data`.
        unsafe {
            Tensor::from_blob(
                base,
                &[(self.blocks.len() * self.block) as i64, src.cols as i64],
                &[src.cols as i64, 1],
                Kind::Float,
                Device::Cpu,
            )
        }
    }

    /// For each of `rows`, its row in [`WindowPlan::tensor`].
    fn local_rows(&self, rows: &[i64]) -> Vec<i64> {
        let slot: HashMap<usize, usize> = self
            .blocks
            .iter()
            .enumerate()
            .map(|(s, &b)| (b, s))
            .collect();
        let block = self.block;
        rows.iter()
            .map(|&r| (slot[&(r as usize / block)] * block + r as usize % block) as i64)
            .collect()
    }
}

/// O_DIRECT reads of `(address, len, file position, bytes needed)` pieces,
/// spread over a few threads. False if the filesystem or the kernel refuses
/// (the caller then reads buffered).
fn read_pieces(f: &File, pieces: &[(usize, usize, u64, usize)]) -> bool {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let ok = AtomicBool::new(true);
    std::thread::scope(|scope| {
        for _ in 0..READ_THREADS.min(pieces.len()) {
            scope.spawn(|| {
                while ok.load(Ordering::Relaxed) {
                    let Some(&(mem, len, pos, need)) =
                        pieces.get(next.fetch_add(1, Ordering::Relaxed))
                    else {
                        return;
                    };
                    if !read_direct(f, mem, len, pos, need) {
                        ok.store(false, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    ok.into_inner()
}

/// One O_DIRECT read of `len` bytes at `pos` into address `mem`, needing at
/// least `need` of them (the file may end sooner). Raw `pread`, not a Rust
/// slice: neighbouring pieces' spill pages may be written concurrently (and
/// are read again exactly afterwards).
fn read_direct(f: &File, mem: usize, len: usize, pos: u64, need: usize) -> bool {
    use std::os::unix::io::AsRawFd;
    let mut got = 0;
    while got < need {
        // SAFETY: [mem, mem + len) lies inside the caller's allocation.
        let n = unsafe {
            libc::pread(
                f.as_raw_fd(),
                (mem + got) as *mut libc::c_void,
                len - got,
                (pos + got as u64) as libc::off_t,
            )
        };
        match n {
            // Partial reads stop at page boundaries except at the file's end.
            n if n > 0 && ((got + n as usize).is_multiple_of(PAGE) || got + n as usize >= need) => {
                got += n as usize
            }
            -1 if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(dir: &std::path::Path, x: &Tensor) -> RowFile {
        let p = dir.join("x.npy");
        crate::data::npy::write_npy(&p, x).unwrap();
        let m = crate::data::mmap::map_npy(&p).unwrap();
        m.row_file(&p)
    }

    /// Batches come out in the order's order, whatever the window, block
    /// and batch sizes, including batches that straddle windows and a
    /// partial last block; with O_DIRECT (blocks of whole pages) and without.
    #[test]
    fn batches_follow_the_order_across_windows() {
        let dir = tempfile::tempdir().unwrap();
        let x = Tensor::randn([5000, 4], (Kind::Float, Device::Cpu));
        let src = source(dir.path(), &x);
        if src.direct.is_none() {
            println!(
                "NOTE: no O_DIRECT on {}: buffered reads only",
                dir.path().display()
            );
        }
        let order = crate::data::dataset::block_shuffled_order(5000, 5, 1, 1024, 2);
        let cases = [
            (1024, 2048, 500, true),
            (1024, 5000, 5000, true),
            (2048, 2048, 333, true),
            (64, 192, 50, false),
            (10, 33, 7, false),
            (1, 1, 3, false),
        ];
        for (block, window, batch, direct) in cases {
            let plan = WindowPlan::new(&src, &order[..window.min(5000)], block);
            let buf = plan.buffer(&src, window.div_ceil(block));
            let used = plan.read_direct(&src, plan.base(&buf));
            assert_eq!(used, direct && src.direct.is_some(), "block {block}");
            let mut r = WindowReader::start(&src, order.clone(), block, window, None);
            let mut at = 0;
            while at < order.len() {
                let n = batch.min(order.len() - at);
                let got = r.next_batch(n).unwrap();
                let want = x.index_select(0, &Tensor::from_slice(&order[at..at + n]));
                assert!(got.equal(&want), "block {block} window {window} at {at}");
                at += n;
            }
            assert!(r.next_batch(1).is_err(), "rows past the order's end");
        }
    }

    /// Scattered orders give short windows, never more than `max_blocks`
    /// blocks each; together they are the order.
    #[test]
    fn windows_touch_at_most_max_blocks() {
        let order: Vec<i64> = (0..1000).map(|i| (i * 7919) % 1000).collect();
        let ws = windows(&order, 10, 4);
        assert_eq!(ws.concat(), order);
        for w in &ws {
            let mut b: Vec<i64> = w.iter().map(|r| r / 10).collect();
            b.sort();
            b.dedup();
            assert!(b.len() <= 4);
        }
        let seq: Vec<i64> = (0..1000).collect();
        assert_eq!(windows(&seq, 10, 4).len(), 25);
    }

    /// Dropping a reader mid-epoch stops its thread (no hang).
    #[test]
    fn dropping_mid_epoch_stops_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let x = Tensor::randn([300, 3], (Kind::Float, Device::Cpu));
        let src = source(dir.path(), &x);
        let mut r = WindowReader::start(&src, (0..300).collect(), 8, 16, None);
        assert_eq!(r.next_batch(5).unwrap().size(), [5, 3]);
        drop(r);
    }
}
