//! Embeds an rpath to libtorch so `target/release/sae` runs without
//! LD_LIBRARY_PATH, and keeps `libtorch.so` linked so CUDA is seen.

fn main() {
    // Set by torch-sys (`links = "tch"`) for crates that depend on it directly.
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
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
}
