// What the C++ kernels of the model (quant_kernels.cpp, fused_kernels.cpp) share at the C
// boundary: no exception crosses it. Each entry point runs its body through `guarded`, which
// returns a new tensor handle, or null with the reason kept for lorafit_kernels_last_error
// (defined once, in fused_kernels.cpp; read by src/model/kernels.rs).
#pragma once

#include <c10/util/Exception.h>

#include <ATen/Tensor.h>

#include <exception>
#include <string>

namespace lorafit {

// The reason the last call on this thread returned null.
inline std::string& last_error() {
  thread_local std::string message;
  return message;
}

template <typename F>
void* guarded(const char* what, F&& body) {
  try {
    return new at::Tensor(body());
  } catch (const c10::Error& e) {
    last_error() = std::string(what) + ": " + e.what_without_backtrace();
  } catch (const std::exception& e) {
    last_error() = std::string(what) + ": " + e.what();
  } catch (...) {
    last_error() = std::string(what) + ": unknown C++ exception";
  }
  return nullptr;
}

}  // namespace lorafit
