//! Embeds an rpath to libtorch so `target/release/sae` runs without
//! LD_LIBRARY_PATH, keeps `libtorch.so` linked so CUDA is seen, and compiles
//! the C++ shims (TorchScript: src/export/torchscript_shim.cpp; c10d:
//! src/dist/c10d_shim.cpp, with NCCL from src/dist/c10d_nccl.cpp when libtorch has CUDA; AOTInductor
//! `.pt2` packages: src/lm/pt2_shim.cpp; fused Adam: src/optim_shim.cpp; autocast: src/autocast_shim.cpp)
//! against the same libtorch headers torch-sys found.

use std::path::PathBuf;

const SHIM: &str = "src/export/torchscript_shim.cpp";
const DIST_SHIM: &str = "src/dist/c10d_shim.cpp";
const NCCL_SHIM: &str = "src/dist/c10d_nccl.cpp";
const PT2_SHIM: &str = "src/lm/pt2_shim.cpp";
const OPTIM_SHIM: &str = "src/optim_shim.cpp";
const AUTOCAST_SHIM: &str = "src/autocast_shim.cpp";
/// gloo's headers, which ProcessGroupGloo.hpp includes (third_party/gloo/README.md).
const GLOO_INCLUDE: &str = "third_party/gloo";

fn main() {
    // Set by torch-sys (`links = "tch"`) for crates that depend on it directly.
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").ok();
    if let Some(lib) = &lib {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
    // With --as-needed (the default on Debian/Ubuntu) the linker drops
    // libtorch.so because no symbol is used from it directly; then
    // libtorch_cuda never loads and CUDA looks unavailable on a GPU machine.
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    build_shim(lib.as_deref());
}

/// The shim uses only libtorch_cpu / c10, which torch-sys already links.
/// Headers live next to `lib/` both in the PyPI wheel and a standalone libtorch.
fn build_shim(lib: Option<&str>) {
    println!("cargo:rerun-if-changed={SHIM}");
    println!("cargo:rerun-if-changed={DIST_SHIM}");
    println!("cargo:rerun-if-changed={NCCL_SHIM}");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-changed={PT2_SHIM}");
    println!("cargo:rerun-if-changed={OPTIM_SHIM}");
    println!("cargo:rerun-if-changed={AUTOCAST_SHIM}");
    println!("cargo:rerun-if-changed=src/shim_error.hpp");
    println!("cargo:rerun-if-changed={GLOO_INCLUDE}");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let lib = PathBuf::from(
        lib.expect("torch-sys did not report the libtorch lib directory (DEP_TCH_LIBTORCH_LIB)"),
    );
    let include = lib
        .parent()
        .expect("libtorch lib dir has a parent")
        .join("include");
    // torch-sys's own default; torch >= 2.6 wheels and libtorch builds use 1.
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    let build = || {
        let mut b = cc::Build::new();
        b.cpp(true)
            .pic(true)
            .warnings(false)
            .include(&include)
            .include(include.join("torch/csrc/api/include"))
            .flag("-std=c++17")
            .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
            .flag("-DGLOG_USE_GLOG_EXPORT");
        b
    };
    build().file(SHIM).compile("sae_torchscript_shim");
    build().file(PT2_SHIM).compile("sae_pt2_shim");
    build().file(OPTIM_SHIM).compile("sae_optim_shim");
    build().file(AUTOCAST_SHIM).compile("sae_autocast_shim");
    // NCCL (ProcessGroupNCCL, in libtorch_cuda) when this libtorch has CUDA
    // and the CUDA and NCCL headers are found; see `cuda_includes`.
    let nccl = cuda_includes(&lib);
    if let Some(dirs) = &nccl {
        let mut b = build();
        for d in dirs {
            b.include(d);
        }
        b.flag("-DUSE_C10D_NCCL")
            .flag("-DUSE_CUDA")
            .file(NCCL_SHIM)
            .compile("sae_c10d_nccl");
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    } else {
        println!(
            "cargo:warning=NCCL is not built in (no libtorch_cuda, or no CUDA/NCCL headers: \
             `make setup` installs them into the venv); data-parallel training uses Gloo only"
        );
    }
    // Without USE_C10D_GLOO the ProcessGroupGloo header is empty.
    let mut dist = build();
    dist.include(GLOO_INCLUDE).flag("-DUSE_C10D_GLOO");
    if nccl.is_some() {
        dist.flag("-DSAE_WITH_NCCL");
    }
    dist.file(DIST_SHIM).compile("sae_c10d_shim");
}

/// The include directories the NCCL translation unit needs beyond
/// libtorch's: the CUDA runtime headers, CUDA's `crt/` headers, cccl
/// (`nv/target`) and `nccl.h`. From the wheel's own `nvidia-*` packages
/// beside `torch/` in site-packages (`nvidia-cuda-runtime`,
/// `nvidia-nccl-cu13`, plus `nvidia-cuda-crt` and `nvidia-cuda-cccl`, which
/// `make setup` adds), else from `CUDA_HOME` (a CUDA toolkit with NCCL
/// installed beside it). None when libtorch has no CUDA or a header is missing.
fn cuda_includes(lib: &std::path::Path) -> Option<Vec<PathBuf>> {
    if !lib.join("libtorch_cuda.so").exists() {
        return None;
    }
    let mut dirs = Vec::new();
    if let Some(site) = lib.parent().and_then(|t| t.parent()) {
        let nvidia = site.join("nvidia");
        if let Ok(entries) = std::fs::read_dir(&nvidia) {
            for e in entries.flatten() {
                let inc = e.path().join("include");
                if inc.is_dir() {
                    // Headers installed later (`make setup`) build NCCL in.
                    println!("cargo:rerun-if-changed={}", inc.display());
                    dirs.push(inc.clone());
                    if inc.join("cccl").is_dir() {
                        dirs.push(inc.join("cccl"));
                    }
                }
            }
        }
    }
    if let Ok(home) = std::env::var("CUDA_HOME") {
        let inc = PathBuf::from(home).join("include");
        dirs.push(inc.join("cccl"));
        dirs.push(inc);
    }
    let found = |f: &str| dirs.iter().any(|d| d.join(f).exists());
    let needed = [
        "cuda_runtime_api.h",
        "crt/host_config.h",
        "nv/target",
        "nccl.h",
    ];
    needed.iter().all(|f| found(f)).then_some(dirs)
}
