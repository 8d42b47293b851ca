// Pieces every ORT adapter shares: the exception-to-status guard, the ORT thread-pool Runner
// and shape formatting for error messages.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "../kernels/linear.h"  // Runner

namespace fastonnx::ort {

inline std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? "," : "") + std::to_string(shape[i]);
  return s + "]";
}

// Runs kernel tasks on ORT's intra-op thread pool.
class OrtRunner final : public Runner {
 public:
  explicit OrtRunner(OrtKernelContext* ctx) : ctx_(ctx) {}
  void parallel_for(size_t count, TaskFn fn, void* data) const override {
    if (count <= 1) {
      if (count == 1) fn(data, 0);
      return;
    }
    Ort::ThrowOnError(Ort::GetApi().KernelContext_ParallelFor(ctx_, fn, count, 0, data));
  }

 private:
  OrtKernelContext* ctx_;
};

// Every callback runs through this: no exception may unwind through ORT's C ABI, so each one
// becomes an OrtStatus (INVALID_ARGUMENT for bad models and inputs).
template <class F>
OrtStatusPtr guarded(F&& body, const char* what) noexcept {
  try {
    body();
    return nullptr;
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::invalid_argument& e) {
    return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, e.what());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  } catch (...) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, what);
  }
}

}  // namespace fastonnx::ort
