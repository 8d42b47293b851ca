// ORT adapter for com.fastonnx::SparseLinear (float output) and SparseLinearU8 (uint8 output).
// The operators' contract is documented in docs/operators.md.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

namespace fastonnx::ort {

// An OrtCustomOp filled with this op's callbacks. Instances must outlive every session using
// them (RegisterCustomOps keeps them static).
struct SparseLinearOp : OrtCustomOp {
  explicit SparseLinearOp(bool quantized_output);
  bool quantized_output;
};

}  // namespace fastonnx::ort
