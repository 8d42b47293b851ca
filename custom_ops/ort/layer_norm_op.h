// ORT adapter for com.fastonnx::LayerNorm (LayerNorm that also emits the uint8 activations and
// per-row scales the next SparseLinear reads). The contract is in docs/operators.md.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

namespace fastonnx::ort {

// An OrtCustomOp filled with this op's callbacks; must outlive every session using it.
struct LayerNormOp : OrtCustomOp {
  LayerNormOp();
};

}  // namespace fastonnx::ort
