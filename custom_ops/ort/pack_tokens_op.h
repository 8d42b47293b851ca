// ORT adapters for com.fastonnx::PackTokens and UnpackTokens (padding removal and restoring
// around a packed encoder). Both read the same attention mask, so they share one file. The
// operators' contract is documented in docs/operators.md.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

namespace fastonnx::ort {

// OrtCustomOps filled with each op's callbacks; must outlive every session using them.
struct PackTokensOp : OrtCustomOp {
  PackTokensOp();
};
struct UnpackTokensOp : OrtCustomOp {
  UnpackTokensOp();
};

}  // namespace fastonnx::ort
