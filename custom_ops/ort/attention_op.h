// ORT adapter for com.fastonnx::Attention (encoder self-attention). The operator's contract is
// documented in docs/operators.md.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

namespace fastonnx::ort {

// An OrtCustomOp filled with this op's callbacks; must outlive every session using it.
struct AttentionOp : OrtCustomOp {
  AttentionOp();
};

}  // namespace fastonnx::ort
