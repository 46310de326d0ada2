//! Data: `.npy` I/O, scipy CSR `.npz` codes, in-memory datasets and batching, synthetic data.

pub mod csr;
pub mod dataset;
pub mod mmap;
pub mod npy;
pub mod synth;
pub mod window;
