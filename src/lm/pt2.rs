//! torch.export AOTInductor packages (`.pt2`) through libtorch's
//! `AOTIModelPackageLoader` (C++ shim: pt2_shim.cpp).

// Placeholder until the shim lands (branch lm-pt2): refuses every package.
use std::path::Path;

pub struct Pt2Model;

impl Pt2Model {
    pub fn load(path: &Path, _device: tch::Device) -> crate::Result<Pt2Model> {
        crate::bail_user!("{}: .pt2 packages are not supported yet", path.display())
    }

    pub fn forward(&self, _ids: &tch::Tensor) -> crate::Result<tch::Tensor> {
        unreachable!("never loaded")
    }
}
