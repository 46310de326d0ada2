//! Embeds an rpath to libtorch so `target/release/sae` runs without
//! LD_LIBRARY_PATH, keeps `libtorch.so` linked so CUDA is seen, and compiles
//! the C++ shims (TorchScript: src/export/torchscript_shim.cpp; c10d:
//! src/dist/c10d_shim.cpp; AOTInductor `.pt2` packages: src/lm/pt2_shim.cpp; fused Adam: src/optim_shim.cpp;
//! autocast: src/autocast_shim.cpp)
//! against the same libtorch headers torch-sys found.

use std::path::PathBuf;

const SHIM: &str = "src/export/torchscript_shim.cpp";
const DIST_SHIM: &str = "src/dist/c10d_shim.cpp";
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
    // Without USE_C10D_GLOO the ProcessGroupGloo header is empty.
    build()
        .include(GLOO_INCLUDE)
        .flag("-DUSE_C10D_GLOO")
        .file(DIST_SHIM)
        .compile("sae_c10d_shim");
}
