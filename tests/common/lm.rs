//! The tiny language-model fixture (tests/fixtures/tiny_lm.py), generated
//! once per version of the script and cached under the cargo target dir:
//! `target/fixtures/tiny_lm-<hash of tiny_lm.py>/` holds `vocab.txt`,
//! `tokens.npy`, `tokens_1d.npy`, `lm.pt`, `lm.pt2`, `acts_ref.npy` and
//! `meta.json` (see the script's docstring). Generating takes about a
//! minute (training ~15 s, the .pt2 compile ~35 s).
//!
//! Parallel tests share one generation: inside a test binary through a
//! `OnceLock`, across binaries through an exclusive `flock` on
//! `target/fixtures/tiny_lm-<hash>.lock`; the script writes into a temp
//! directory that is renamed into place only when complete, so the
//! directory's existence means a whole fixture.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The generator script.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_lm.py")
}

/// 64-bit FNV-1a: a stable name for the script's bytes.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `target/fixtures` (beside `target/tmp`, CARGO_TARGET_TMPDIR).
fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR has a parent (the target dir)")
        .join("fixtures")
}

/// Holds an exclusive flock on a file until dropped.
struct FileLock(File);

impl FileLock {
    fn acquire(path: &Path) -> FileLock {
        let f = File::create(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        // SAFETY: a valid open descriptor.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(
            rc,
            0,
            "flock {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        FileLock(f)
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // SAFETY: as in acquire; closing the file would release it too.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

fn generate(dir: &Path) {
    let root = dir.parent().expect("the fixture dir has a parent");
    std::fs::create_dir_all(root).unwrap();
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    let _lock = FileLock::acquire(&root.join(format!("{name}.lock")));
    if dir.is_dir() {
        return; // another process made it while we waited
    }
    let tmp = root.join(format!("{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let start = std::time::Instant::now();
    let out = Command::new(super::python())
        .arg(script())
        .arg(&tmp)
        .output()
        .expect("running tests/fixtures/tiny_lm.py");
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        panic!(
            "tiny_lm.py failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
            out.status,
            super::stdout(&out),
            super::stderr(&out)
        );
    }
    std::fs::rename(&tmp, dir)
        .unwrap_or_else(|e| panic!("renaming {} to {}: {e}", tmp.display(), dir.display()));
    eprintln!(
        "tiny_lm fixture generated in {:.1} s: {}",
        start.elapsed().as_secs_f64(),
        dir.display()
    );
}

/// The fixture directory, generated on first use (see the module docs).
pub fn tiny_lm() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let bytes = std::fs::read(script()).expect("reading tests/fixtures/tiny_lm.py");
        let dir = fixtures_dir().join(format!("tiny_lm-{:016x}", fnv1a(&bytes)));
        if !dir.is_dir() {
            generate(&dir);
        }
        dir
    })
    .clone()
}

/// `meta.json` of the fixture.
pub fn meta() -> serde_json::Value {
    let p = tiny_lm().join("meta.json");
    serde_json::from_str(&std::fs::read_to_string(&p).expect("reading meta.json"))
        .expect("meta.json is JSON")
}

/// The fixture's vocabulary: line i of `vocab.txt` is id i's piece, with
/// `↵` / `→` standing for a newline / tab.
pub fn vocab() -> Vec<String> {
    std::fs::read_to_string(tiny_lm().join("vocab.txt"))
        .expect("reading vocab.txt")
        .lines()
        .map(str::to_string)
        .collect()
}
