//! `sae encode --sparse` writes the scipy CSR `.npz` that
//! `scipy.sparse.save_npz` would (scipy reads it back equal to the dense
//! codes), `--top N` keeps the N largest |codes| per row, `sae decode` reads
//! CSR archives (ours and scipy's compressed ones), and bad input is refused
//! cleanly. The memory check encodes many more rows than one batch.

mod common;
use common::*;
use std::path::Path;

fn s(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

/// A small top-k model (k 4 of 64 latents) on 16-column synthetic data.
fn tiny_model(d: &Path) -> (Run, String) {
    let (x, _) = synth(d, 1500, 16, 24, 3);
    let cfg = write_config(
        d,
        "c.yaml",
        &format!(
            "device: cpu\ndata:\n  train: {x}\nmodel:\n  d_hidden: 64\n  activation: topk\n  k: 4\n\
             train:\n  epochs: 2\n  batch_size: 128\n  threads: 1\n"
        ),
    );
    (Case::new(d, "run").config(&cfg).train(), x)
}

/// Files in `d` whose names mark them as temp files of an atomic write.
fn temp_files(d: &Path) -> Vec<String> {
    std::fs::read_dir(d)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp."))
        .collect()
}

/// scipy reads our file as the dense codes, canonical, with the members,
/// dtypes and bytes scipy's own `save_npz(compressed=False)` writes.
const CHECK_EQUAL: &str = r#"
import sys, zipfile, numpy as np, scipy.sparse as sp
ours, dense = sys.argv[1], np.load(sys.argv[2])
m = sp.load_npz(ours)
assert m.format == "csr", m.format
assert m.shape == dense.shape, (m.shape, dense.shape)
assert m.dtype == np.float32, m.dtype
assert m.has_canonical_format and m.has_sorted_indices
assert np.array_equal(m.toarray(), dense), "values differ"
assert (m.data != 0).all(), "a stored zero"
z = zipfile.ZipFile(ours)
names = [i.filename for i in z.infolist()]
assert names == ["indices.npy", "indptr.npy", "format.npy", "shape.npy", "data.npy"], names
assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
raw = np.load(ours)
assert raw["format"].dtype == np.dtype("S3") and raw["format"].shape == () and raw["format"].item() == b"csr"
assert raw["shape"].dtype == np.int64 and list(raw["shape"]) == list(dense.shape)
assert raw["indices"].dtype == np.int32 and raw["indptr"].dtype == np.int32
assert raw["data"].dtype == np.float32
# scipy's own file from the dense codes: the same members byte for byte.
sp.save_npz(sys.argv[3], sp.csr_matrix(dense), compressed=False)
theirs = zipfile.ZipFile(sys.argv[3])
for n in names:
    assert z.read(n) == theirs.read(n), n
print(m.nnz, m.shape[0] * m.shape[1])
"#;

/// Codes kept by `--top N`: the N largest |values| of each dense row, ties
/// to the lower column, zeros never.
const CHECK_TOP: &str = r#"
import sys, numpy as np, scipy.sparse as sp
m, dense, n = sp.load_npz(sys.argv[1]), np.load(sys.argv[2]), int(sys.argv[3])
assert m.has_canonical_format
got = m.toarray()
want = np.zeros_like(dense)
for r, row in enumerate(dense):
    cols = np.arange(row.size)
    order = np.lexsort((cols, -np.abs(row)))[:n]
    order = order[row[order] != 0]
    want[r, order] = row[order]
assert np.array_equal(got, want)
assert (np.diff(m.indptr) <= n).all()
if len(sys.argv) > 4:
    assert np.array_equal(np.load(sys.argv[4]), want), "dense --top differs"
print(m.nnz, (dense != 0).sum())
"#;

#[test]
fn sparse_codes_are_scipy_csr_equal_to_the_dense_codes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (run, x) = tiny_model(d);
    let p = |n: &str| d.join(n);
    let scipy_copy = p("scipy.npz");

    // Model codes, several batches appended (1500 rows, 128 per batch).
    run.apply("encode", &x, p("z.npy"), &[]);
    run.apply(
        "encode",
        &x,
        p("z.npz"),
        &["--sparse", "--batch-size", "128"],
    );
    let out = py(
        CHECK_EQUAL,
        &[s(&p("z.npz")), s(&p("z.npy")), s(&scipy_copy)],
    );
    println!("model codes: stored / dense entries = {}", out.trim());
    assert!(
        temp_files(d).is_empty(),
        "temp files left: {:?}",
        temp_files(d)
    );

    // --top 3, sparse and dense.
    run.apply("encode", &x, p("t.npz"), &["--sparse", "--top", "3"]);
    run.apply(
        "encode",
        &x,
        p("t.npy"),
        &["--top", "3", "--batch-size", "100"],
    );
    let out = py(
        CHECK_TOP,
        &[s(&p("t.npz")), s(&p("z.npy")), "3", s(&p("t.npy"))],
    );
    println!("--top 3: stored / non-zero = {}", out.trim());

    // OMP: signed codes.
    let omp = ["--encoder", "omp", "--k", "4"];
    run.apply("encode", &x, p("o.npy"), &omp);
    let sparse: Vec<&str> = omp
        .iter()
        .copied()
        .chain(["--sparse", "--batch-size", "200"])
        .collect();
    run.apply("encode", &x, p("o.npz"), &sparse);
    py(
        CHECK_EQUAL,
        &[s(&p("o.npz")), s(&p("o.npy")), s(&scipy_copy)],
    );
    let neg = py(
        "import sys, numpy as np; print((np.load(sys.argv[1]) < 0).sum())",
        &[s(&p("o.npy"))],
    );
    assert!(
        neg.trim() != "0",
        "OMP codes should include negative values"
    );
    let top: Vec<&str> = omp
        .iter()
        .copied()
        .chain(["--sparse", "--top", "2"])
        .collect();
    run.apply("encode", &x, p("o2.npz"), &top);
    py(CHECK_TOP, &[s(&p("o2.npz")), s(&p("o.npy")), "2"]);
}

#[test]
fn decode_reads_csr_archives_and_refuses_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (run, x) = tiny_model(d);
    let p = |n: &str| d.join(n);
    run.apply("encode", &x, p("z.npy"), &[]);
    run.apply(
        "encode",
        &x,
        p("z.npz"),
        &["--sparse", "--batch-size", "300"],
    );
    // Decoding the sparse codes gives what decoding the dense ones gives.
    run.apply("decode", p("z.npy"), p("dense.npy"), &[]);
    run.apply("decode", p("z.npz"), p("ours.npy"), &["--batch-size", "77"]);
    // scipy's compressed archive; and int64 indices with float64 data.
    py(
        r#"
import sys, numpy as np, scipy.sparse as sp
m = sp.csr_matrix(np.load(sys.argv[1]))
sp.save_npz(sys.argv[2], m)
w = sp.csr_matrix((m.data.astype(np.float64), m.indices.astype(np.int64), m.indptr.astype(np.int64)), shape=m.shape)
np.savez(sys.argv[3], indices=w.indices.astype(np.int64), indptr=w.indptr.astype(np.int64), format=b"csr", shape=np.array(m.shape), data=w.data)
sp.save_npz(sys.argv[4], m.tocsc())
sp.save_npz(sys.argv[5], sp.csr_matrix((m.data, m.indices, m.indptr), shape=(m.shape[0], m.shape[1] + 1)))
def raw(path, **changes):
    arrays = dict(indices=m.indices, indptr=m.indptr, format=b"csr", shape=np.array(m.shape), data=m.data)
    arrays.update(changes)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
bad = m.indices.copy(); bad[-1] = 64
raw(sys.argv[6], indices=bad)
ptr = m.indptr.copy(); ptr[5] = ptr[7]
raw(sys.argv[7], indptr=ptr)
raw(sys.argv[8], data=None)
np.savez(sys.argv[9], codes=np.load(sys.argv[1]))
"#,
        &[
            s(&p("z.npy")),
            s(&p("scipy.npz")),
            s(&p("wide.npz")),
            s(&p("csc.npz")),
            s(&p("cols.npz")),
            s(&p("range.npz")),
            s(&p("order.npz")),
            s(&p("nodata.npz")),
            s(&p("dense.npz")),
        ],
    );
    run.apply(
        "decode",
        p("scipy.npz"),
        p("scipy.npy"),
        &["--batch-size", "500"],
    );
    run.apply("decode", p("wide.npz"), p("wide.npy"), &[]);
    let diff = py(
        r#"
import sys, numpy as np
a = np.load(sys.argv[1])
print(max(float(np.abs(np.load(f) - a).max()) for f in sys.argv[2:]))
"#,
        &[
            s(&p("dense.npy")),
            s(&p("ours.npy")),
            s(&p("scipy.npy")),
            s(&p("wide.npy")),
        ],
    );
    let diff: f64 = diff.trim().parse().unwrap();
    assert!(diff <= 1e-6, "decode of CSR codes differs by {diff}");

    // Refusals: exit 2, one line, no output or temp file left behind.
    let model = run.path();
    let refused = |data: &Path, cmd: &str, extra: &[&str], needles: &[&str]| {
        let out = p("refused.out.npz");
        let mut args = vec![cmd, "--model", model, "--data", s(data), "--out", s(&out)];
        args.extend_from_slice(extra);
        expect_user_error(&args, needles);
        assert!(!out.exists(), "{args:?} left {}", out.display());
        assert!(
            temp_files(d).is_empty(),
            "temp files left: {:?}",
            temp_files(d)
        );
    };
    refused(&p("csc.npz"), "decode", &[], &["csc", ".tocsr()"]);
    refused(
        &p("cols.npz"),
        "decode",
        &[],
        &["65 columns", "d_hidden is 64"],
    );
    refused(&p("z.npz"), "encode", &[], &["only `sae decode`"]);
    refused(
        &p("range.npz"),
        "decode",
        &[],
        &["indices", "64", "out of range"],
    );
    refused(
        &p("order.npz"),
        "decode",
        &[],
        &["indptr", "decreases at row"],
    );
    refused(&p("nodata.npz"), "decode", &[], &["without `data`"]);
    refused(&p("dense.npz"), "decode", &[], &["needs a member name"]);
    refused(
        Path::new(&x),
        "encode",
        &["--top", "0"],
        &["--top 0", "at least 1"],
    );
    refused(
        Path::new(&x),
        "encode",
        &["--sparse", "--top", "-2"],
        &["--top -2"],
    );
    let npy_out = p("codes.npy");
    let args = [
        "encode",
        "--model",
        model,
        "--data",
        &x,
        "--out",
        s(&npy_out),
        "--sparse",
    ];
    expect_user_error(&args, &["--sparse", ".npz"]);
    assert!(!npy_out.exists());
    // --sparse and --top are encode's only.
    for cmd in ["decode", "reconstruct", "score"] {
        let o = sae(&[
            cmd,
            "--model",
            model,
            "--data",
            &x,
            "--out",
            s(&npy_out),
            "--sparse",
        ]);
        assert_eq!(o.status.code(), Some(2), "{cmd} --sparse: {}", stderr(&o));
    }
}

/// Bounded memory: the peak RSS of a sparse encode of 200 000 rows stays
/// close to that of 2 000 rows (libtorch itself is most of it), far below
/// the dense codes' size. Also prints dense vs sparse file sizes at L0 ~1%.
#[test]
fn sparse_encode_memory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let small = d.join("small.npy");
    let big = d.join("big.npy");
    for (f, n) in [(&small, "2000"), (&big, "200000")] {
        sae_ok(&[
            "data",
            "synth",
            "--out",
            s(f),
            "--n",
            n,
            "--d-in",
            "64",
            "--features",
            "128",
            "--active",
            "3",
        ]);
    }
    let cfg = write_config(
        d,
        "c.yaml",
        &format!(
            "device: cpu\ndata:\n  train: {}\nmodel:\n  d_hidden: 512\n  activation: topk\n  k: 5\n\
             train:\n  epochs: 1\n  batch_size: 256\n  threads: 1\n",
            small.display()
        ),
    );
    let run = Case::new(d, "run").config(&cfg).train();
    let peak = |data: &Path, out: &Path| -> f64 {
        let o = py(
            r#"
import sys, subprocess, resource
subprocess.run(sys.argv[1:], check=True, capture_output=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
"#,
            &[
                sae_bin(),
                "encode",
                "--model",
                run.path(),
                "--data",
                s(data),
                "--out",
                s(out),
                "--sparse",
                "--batch-size",
                "1024",
            ],
        );
        o.trim().parse().unwrap()
    };
    let base = peak(&small, &d.join("small.npz"));
    let big_rss = peak(&big, &d.join("big.npz"));
    let dense_mb = 200_000.0 * 512.0 * 4.0 / (1 << 20) as f64;
    let sparse_mb = std::fs::metadata(d.join("big.npz")).unwrap().len() as f64 / (1 << 20) as f64;
    println!(
        "peak RSS: {base:.0} MB for 2000 rows, {big_rss:.0} MB for 200000 rows; \
         codes: dense {dense_mb:.0} MB, sparse {sparse_mb:.1} MB"
    );
    assert!(
        big_rss - base < dense_mb / 8.0,
        "sparse encode grew by {:.0} MB over 200000 rows (dense codes: {dense_mb:.0} MB)",
        big_rss - base
    );
    assert!(sparse_mb < dense_mb / 20.0, "sparse file {sparse_mb:.1} MB");
    let counts = py(
        "import sys, scipy.sparse as sp\nm = sp.load_npz(sys.argv[1])\nprint(m.shape, m.nnz)",
        &[s(&d.join("big.npz"))],
    );
    assert_eq!(counts.trim(), "(200000, 512) 1000000");
}

/// An output through a regular file, and a full disk (a 64 KiB tmpfs; needs
/// root, skipped elsewhere): exit 2 naming the file, nothing left behind.
#[test]
fn sparse_output_that_cannot_be_written_is_a_user_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (run, _) = tiny_model(d);
    let big = d.join("big");
    std::fs::create_dir(&big).unwrap();
    let (xb, _) = synth(&big, 20000, 16, 24, 3);
    let file = d.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let encode = |out: &Path| {
        expect_user_error(
            &[
                "encode",
                "--model",
                run.path(),
                "--data",
                &xb,
                "--out",
                s(out),
                "--sparse",
                "--batch-size",
                "1000",
            ],
            &["codes.npz"],
        );
    };
    encode(&file.join("codes.npz"));

    let Some(disk) = small_disk(d) else {
        return;
    };
    let mnt = disk.0.clone();
    // 20000 rows x 4 codes x 8 bytes = 640 KB: cannot fit.
    encode(&mnt.join("codes.npz"));
    let left: Vec<_> = std::fs::read_dir(&mnt).unwrap().collect();
    assert!(left.is_empty(), "left on the full disk: {left:?}");
}
