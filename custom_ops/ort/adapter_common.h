// Pieces every ORT adapter shares: the exception-to-status guard, the ORT thread-pool Runner
// and shape formatting for error messages.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <climits>
#include <cstdint>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
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
  } catch (const std::bad_alloc&) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, (std::string(what) + ": out of memory").c_str());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  } catch (...) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, (std::string(what) + ": unknown error").c_str());
  }
}

}  // namespace fastonnx::ort

namespace fastonnx::ort {

// The OrtCustomOp callbacks every fastonnx op shares: CPU, opset 1 and later, V2 kernels of type
// Kernel (constructed from the OrtKernelInfo, run by `compute(OrtKernelContext*) const`), with
// every exception turned into a status. The op then sets its name and signature.
template <class Kernel>
void set_common_callbacks(OrtCustomOp& op) {
  op.version = ORT_API_VERSION;
  op.GetExecutionProviderType = [](const OrtCustomOp*) -> const char* { return nullptr; };
  op.GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
  op.GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 0; };
  op.GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 0; };
  op.CreateKernel = nullptr;
  op.KernelCompute = nullptr;
  op.CreateKernelV2 = [](const OrtCustomOp* self, const OrtApi*, const OrtKernelInfo* info,
                         void** kernel) noexcept -> OrtStatusPtr {
    return guarded(
        [&] {
          // A kernel that depends on which op variant it is takes the op too.
          if constexpr (std::is_constructible_v<Kernel, const OrtCustomOp*, const OrtKernelInfo*>) {
            *kernel = new Kernel(self, info);
          } else {
            *kernel = new Kernel(info);
          }
        },
        "fastonnx: creating the kernel");
  };
  op.KernelComputeV2 = [](void* kernel, OrtKernelContext* context) noexcept -> OrtStatusPtr {
    return guarded([&] { static_cast<const Kernel*>(kernel)->compute(context); },
                   "fastonnx: running the kernel");
  };
  op.KernelDestroy = [](void* kernel) noexcept { delete static_cast<Kernel*>(kernel); };
  op.InferOutputShapeFn = nullptr;
  op.GetStartVersion = [](const OrtCustomOp*) { return 1; };
  op.GetEndVersion = [](const OrtCustomOp*) { return INT_MAX; };
  op.GetMayInplace = nullptr;
  op.ReleaseMayInplace = nullptr;
  op.GetAliasMap = nullptr;
  op.ReleaseAliasMap = nullptr;
}

}  // namespace fastonnx::ort
