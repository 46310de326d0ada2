//! torch.export AOTInductor packages (`.pt2`) through libtorch's
//! `AOTIModelPackageLoader` (C++ shim: pt2_shim.cpp).
