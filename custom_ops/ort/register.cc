// Entry point ORT calls when a session registers this library
// (SessionOptions.register_custom_ops_library(fastonnx.get_library_path())).
#include "attention_op.h"
#include "layer_norm_op.h"
#include "pack_tokens_op.h"
#include "select_tokens_op.h"
#include "sparse_linear_op.h"

#include <exception>

namespace {
constexpr const char* kDomain = "com.fastonnx";
}

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) noexcept {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // Too old an ORT for our headers: report through the oldest API every ORT has.
    const OrtApi* v1 = api_base->GetApi(1);
    return v1 ? v1->CreateStatus(ORT_FAIL, "fastonnx needs ONNX Runtime >= 1.21") : nullptr;
  }
  Ort::InitApi(api);
  static fastonnx::ort::SparseLinearOp float_output(false);
  static fastonnx::ort::SparseLinearOp uint8_output(true);
  static fastonnx::ort::AttentionOp attention;
  static fastonnx::ort::LayerNormOp layer_norm;
  static fastonnx::ort::PackTokensOp pack_tokens;
  static fastonnx::ort::UnpackTokensOp unpack_tokens;
  static fastonnx::ort::SelectTokensOp select_tokens;
  // The domain must outlive every session that uses it and ORT cannot tell us when that is,
  // so it is deliberately never released (a few bytes per registration).
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* s = api->CreateCustomOpDomain(kDomain, &domain)) return s;
  if (OrtStatus* s = api->CustomOpDomain_Add(domain, &float_output)) return s;
  if (OrtStatus* s = api->CustomOpDomain_Add(domain, &uint8_output)) return s;
  if (OrtStatus* s = api->CustomOpDomain_Add(domain, &attention)) return s;
  if (OrtStatus* s = api->CustomOpDomain_Add(domain, &layer_norm)) return s;
  if (OrtStatus* s = api->CustomOpDomain_Add(domain, &pack_tokens)) return s;
  if (OrtStatus* s = api->CustomOpDomain_Add(domain, &unpack_tokens)) return s;
  if (OrtStatus* s = api->CustomOpDomain_Add(domain, &select_tokens)) return s;
  return api->AddCustomOpDomain(options, domain);
}
