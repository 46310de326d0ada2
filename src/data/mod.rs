//! Data: `.npy` I/O, safetensors shards and SAELens activation caches as row sources, scipy CSR `.npz` codes, in-memory datasets and batching, synthetic data.

pub mod arrow_cache;
pub mod csr;
pub mod dataset;
pub mod mmap;
pub mod npy;
pub mod safetensors_rows;
pub mod sources;
pub mod synth;
pub mod window;
