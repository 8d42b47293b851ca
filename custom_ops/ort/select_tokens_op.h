// ORT adapter for com.fastonnx::SelectTokens (token dropping on packed tokens; contract in
// docs/operators.md).
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

namespace fastonnx::ort {

// Filled with the op's callbacks; must outlive every session using it.
struct SelectTokensOp : OrtCustomOp {
  SelectTokensOp();
};

}  // namespace fastonnx::ort
