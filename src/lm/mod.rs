//! Language models that make training rows from token ids: a TorchScript
//! module or a torch.export AOTInductor package (`.pt2`), each with
//! `forward(ids[int64, B, T]) -> [B, T, d]`.

pub mod pt2;
