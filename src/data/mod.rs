//! Data: `.npy` I/O, in-memory datasets and batching, synthetic data.

pub mod dataset;
pub mod mmap;
pub mod npy;
pub mod synth;
pub mod window;
