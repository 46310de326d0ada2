//! Atomic file writes: a reader never sees a half-written output file.

use anyhow::Result;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The temp name beside `path` used while writing it (`.NAME.tmp.PID`).
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    path.with_file_name(format!(".{name}.tmp.{}", std::process::id()))
}

/// Whether an I/O error is the user's to fix (full disk, permissions, a
/// read-only file system, a path through a file): such errors exit 2.
pub fn is_user_io_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        StorageFull
            | PermissionDenied
            | ReadOnlyFilesystem
            | QuotaExceeded
            | NotADirectory
            | IsADirectory
            | NotFound
            | FileTooLarge
    )
}

/// An error writing `path`: a user error (exit 2) naming the path when the
/// cause is the user's to fix, else an internal one with the path as context.
pub fn write_error(path: &Path, e: std::io::Error) -> anyhow::Error {
    if is_user_io_error(&e) {
        crate::error::user(format!("cannot write {}: {e}", path.display()))
    } else {
        anyhow::Error::new(e).context(format!("writing {}", path.display()))
    }
}

/// Writes `path` through a temp file in the same directory, fsynced and then
/// renamed over the target, so the file is either old, new, or absent.
pub fn write_atomic<F>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&mut BufWriter<File>) -> Result<()>,
{
    let tmp = temp_path(path);
    let result = (|| -> Result<()> {
        let file = File::create(&tmp)
            .map_err(|e| crate::error::user(format!("cannot write {}: {e}", path.display())))?;
        let mut w = BufWriter::new(file);
        write(&mut w)?;
        w.flush().map_err(|e| write_error(path, e))?;
        let file = w
            .into_inner()
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
        file.sync_all().map_err(|e| write_error(path, e))?;
        fs::rename(&tmp, path).map_err(|e| write_error(path, e))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Atomic write of a byte buffer.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |w| {
        w.write_all(bytes).map_err(|e| write_error(path, e))
    })
}
