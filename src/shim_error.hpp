// Errors of the C++ shims (src/export/torchscript_shim.cpp,
// src/dist/c10d_shim.cpp): a C++ exception never crosses the FFI boundary;
// it comes back as a malloc'd C string, which Rust frees (src/shim.rs).

#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace sae_shim {

inline char *dup_string(const std::string &s) {
  char *out = static_cast<char *>(std::malloc(s.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, s.c_str(), s.size() + 1);
  }
  return out;
}

// Runs `f`; returns nullptr on success or the error message.
template <typename F> char *guard(F f) {
  try {
    f();
    return nullptr;
  } catch (const c10::Error &e) {
    return dup_string(e.what_without_backtrace());
  } catch (const std::exception &e) {
    return dup_string(e.what());
  } catch (...) {
    return dup_string("unknown C++ exception");
  }
}

} // namespace sae_shim
