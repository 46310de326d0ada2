//! What the C++ shims share on the Rust side: their errors come back as a
//! malloc'd C string (see src/shim_error.hpp), or null for success.

use std::ffi::{c_char, CStr};

extern "C" {
    fn sae_torch_version() -> *const c_char;
}

/// The libtorch version the binary was built against (its headers'), e.g. "2.11.0".
pub fn torch_version() -> String {
    // SAFETY: a static NUL-terminated string.
    unsafe { CStr::from_ptr(sae_torch_version()) }
        .to_string_lossy()
        .into_owned()
}

/// Takes ownership of a shim's error string: its text, and the memory freed.
pub(crate) fn take_error(p: *mut c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: the shims return a NUL-terminated string from malloc.
    let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
    unsafe { libc::free(p.cast()) };
    Some(s)
}
