#include "pack_tokens_op.h"

#include <string>
#include <vector>

#include "../kernels/pack_tokens.h"
#include "adapter_common.h"

namespace fastonnx::ort {
namespace {

// Named input slots (see docs/operators.md).
enum PackInput : size_t {
  kHidden = 0,         // float [B, S, D]
  kPackMask = 1,       // int64/int32 [B, S], 0 or 1
};
enum UnpackInput : size_t {
  kPacked = 0,         // float [T, D]
  kOffsets = 1,        // int64/int32 [B + 1]
  kUnpackMask = 2,     // int64/int32 [B, S], 0 or 1
};

[[noreturn]] void fail(const char* op, const std::string& what) {
  throw std::invalid_argument(std::string(op) + ": " + what);
}

// Runs a kernel call, its errors prefixed with the op's name.
template <class F>
void named(const char* op, F&& body) {
  try {
    body();
  } catch (const std::invalid_argument& e) {
    fail(op, e.what());
  }
}

TokenMask read_mask(const char* op, const Ort::ConstValue& v) {
  const auto info = v.GetTensorTypeAndShapeInfo();
  const std::vector<int64_t> shape = info.GetShape();
  if (shape.size() != 2) fail(op, "attention_mask must be 2-D [B, S], got " + shape_str(shape));
  TokenMask m;
  m.batch = shape[0];
  m.seq = shape[1];
  const auto type = info.GetElementType();
  if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64) {
    m.i64 = v.GetTensorData<int64_t>();
  } else if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32) {
    m.i32 = v.GetTensorData<int32_t>();
  } else {
    fail(op, "attention_mask must be int64 or int32 (element type " + std::to_string(type) + ")");
  }
  return m;
}

const float* float_data(const char* op, const Ort::ConstValue& v, const char* what) {
  if (v.GetTensorTypeAndShapeInfo().GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
    fail(op, std::string(what) + " must be float32");
  }
  return v.GetTensorData<float>();
}

void pack_compute(OrtKernelContext* context) {
  constexpr const char* kOp = "PackTokens";
  Ort::KernelContext ctx(context);
  Ort::ConstValue hidden = ctx.GetInput(kHidden);
  const TokenMask mask = read_mask(kOp, ctx.GetInput(kPackMask));
  const std::vector<int64_t> shape = hidden.GetTensorTypeAndShapeInfo().GetShape();
  if (shape.size() != 3 || shape[0] != mask.batch || shape[1] != mask.seq) {
    fail(kOp, "hidden must be [B, S, D] with the mask's [B, S] = [" +
                  std::to_string(mask.batch) + "," + std::to_string(mask.seq) + "], got " +
                  shape_str(shape));
  }
  const float* x = float_data(kOp, hidden, "hidden");
  Ort::UnownedValue offsets_out = ctx.GetOutput(1, {mask.batch + 1});
  int64_t* offsets = offsets_out.GetTensorMutableData<int64_t>();
  named(kOp, [&] { token_offsets(mask, offsets); });  // the mask, before allocating [T, D]
  Ort::UnownedValue packed = ctx.GetOutput(0, {offsets[mask.batch], shape[2]});
  pack_tokens(x, mask, shape[2], offsets, packed.GetTensorMutableData<float>(), OrtRunner(context));
}

void unpack_compute(OrtKernelContext* context) {
  constexpr const char* kOp = "UnpackTokens";
  Ort::KernelContext ctx(context);
  Ort::ConstValue packed = ctx.GetInput(kPacked);
  Ort::ConstValue offsets_in = ctx.GetInput(kOffsets);
  const TokenMask mask = read_mask(kOp, ctx.GetInput(kUnpackMask));
  const std::vector<int64_t> shape = packed.GetTensorTypeAndShapeInfo().GetShape();
  if (shape.size() != 2) fail(kOp, "packed must be 2-D [T, D], got " + shape_str(shape));
  const float* x = float_data(kOp, packed, "packed");
  const auto info = offsets_in.GetTensorTypeAndShapeInfo();
  const std::vector<int64_t> oshape = info.GetShape();
  if (oshape.size() != 1 || oshape[0] != mask.batch + 1) {
    fail(kOp, "offsets must be [B + 1] = [" + std::to_string(mask.batch + 1) +
                  "] for the mask's B, got " + shape_str(oshape));
  }
  std::vector<int64_t> offsets(size_t(mask.batch + 1));
  const auto type = info.GetElementType();
  if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64) {
    const int64_t* p = offsets_in.GetTensorData<int64_t>();
    offsets.assign(p, p + oshape[0]);
  } else if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32) {
    const int32_t* p = offsets_in.GetTensorData<int32_t>();
    offsets.assign(p, p + oshape[0]);
  } else {
    fail(kOp, "offsets must be int64 or int32 (element type " + std::to_string(type) + ")");
  }
  named(kOp, [&] { check_offsets_match_mask(mask, offsets.data(), shape[0]); });
  Ort::UnownedValue y = ctx.GetOutput(0, {mask.batch, mask.seq, shape[1]});
  unpack_tokens(x, mask, shape[1], offsets.data(), y.GetTensorMutableData<float>(),
                OrtRunner(context));
}

// Stateless kernels for set_common_callbacks.
template <void (*Compute)(OrtKernelContext*)>
struct StatelessKernel {
  explicit StatelessKernel(const OrtKernelInfo*) {}
  void compute(OrtKernelContext* context) const { Compute(context); }
};

// The signature both ops share; inputs are typed UNDEFINED so compute names a wrong type.
void set_signature(OrtCustomOp& op) {
  op.GetInputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; };
  op.GetInputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  op.GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
}

}  // namespace

PackTokensOp::PackTokensOp() : OrtCustomOp{} {
  set_common_callbacks<StatelessKernel<pack_compute>>(*this);
  set_signature(*this);
  GetName = [](const OrtCustomOp*) { return "PackTokens"; };
  GetInputTypeCount = [](const OrtCustomOp*) { return size_t{2}; };
  GetOutputTypeCount = [](const OrtCustomOp*) { return size_t{2}; };
  GetOutputType = [](const OrtCustomOp*, size_t i) {
    return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  };
}

UnpackTokensOp::UnpackTokensOp() : OrtCustomOp{} {
  set_common_callbacks<StatelessKernel<unpack_compute>>(*this);
  set_signature(*this);
  GetName = [](const OrtCustomOp*) { return "UnpackTokens"; };
  GetInputTypeCount = [](const OrtCustomOp*) { return size_t{3}; };
  GetOutputTypeCount = [](const OrtCustomOp*) { return size_t{1}; };
  GetOutputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; };
}

}  // namespace fastonnx::ort
