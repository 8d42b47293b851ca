#include "attention_op.h"

#include <cmath>
#include <string>
#include <vector>

#include "../kernels/attention.h"
#include "adapter_common.h"

namespace fastonnx::ort {
namespace {

// Named input slots (see docs/operators.md).
enum Input : size_t {
  kQuery = 0,          // [B, S, D], or packed [B, S, 3D] when key and value are absent
  kKey = 1,            // [B, S, D], optional
  kValue = 2,          // [B, S, D], optional (present exactly when key is)
  kAttentionBias = 3,  // additive mask [B|1, N|1, S|1, S], optional
  kOffsets = 4,        // int32/int64 [B + 1], optional: packed tokens, q/k/v [T, *] (no bias)
};
constexpr size_t kInputCount = 5;
// Outputs: 0 Y; 1 key_scores, optional: [B, S] or packed [T], the attention each key receives
// summed over heads and queries (what token dropping ranks tokens by).
constexpr size_t kOutputCount = 2;

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument("Attention: " + what); }

const float* float_data(const Ort::ConstValue& v, const char* what) {
  const auto type = v.GetTensorTypeAndShapeInfo().GetElementType();
  if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
    fail(std::string(what) + " must be float32 (element type " + std::to_string(type) + ")");
  }
  return v.GetTensorData<float>();
}

// Offsets as int64 (int32 accepted); their values are checked by validate_attention.
std::vector<int64_t> read_offsets(const Ort::ConstValue& v) {
  const auto info = v.GetTensorTypeAndShapeInfo();
  const std::vector<int64_t> shape = info.GetShape();
  if (shape.size() != 1 || shape[0] < 1) {
    fail("offsets must be 1-D [B + 1] with B >= 0, got " + shape_str(shape));
  }
  const auto type = info.GetElementType();
  if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64) {
    const int64_t* p = v.GetTensorData<int64_t>();
    return std::vector<int64_t>(p, p + shape[0]);
  }
  if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32) {
    const int32_t* p = v.GetTensorData<int32_t>();
    return std::vector<int64_t>(p, p + shape[0]);
  }
  fail("offsets must be int64 or int32 (element type " + std::to_string(type) + ")");
}

class AttentionKernel {
 public:
  explicit AttentionKernel(const OrtKernelInfo* info) {
    const OrtApi& api = Ort::GetApi();
    int64_t heads = 0;
    if (OrtStatus* s = api.KernelInfoGetAttribute_int64(info, "num_heads", &heads)) {
      api.ReleaseStatus(s);
      fail("attribute num_heads (int) is required");
    }
    if (heads < 1 || heads > kMaxAttentionHeads) {
      fail("num_heads=" + std::to_string(heads) + " is not in [1, " +
           std::to_string(kMaxAttentionHeads) + "]");
    }
    heads_ = heads;
    float scale = 0.f;
    if (OrtStatus* s = api.KernelInfoGetAttribute_float(info, "scale", &scale)) {
      api.ReleaseStatus(s);  // absent: 1/sqrt(H), known once H is
    } else {
      if (!std::isfinite(scale)) fail("attribute scale must be finite");
      scale_ = scale;
      has_scale_ = true;
    }
    path_ = choose_attention_path();
    Ort::ConstKernelInfo ki(info);
    std::string node = "?";
    try {
      node = ki.GetNodeName();
    } catch (const std::exception&) {
    }
    const std::string msg = "fastonnx Attention '" + node + "': kernel " +
                            attention_kernel_name(path_) + ", num_heads=" + std::to_string(heads_);
    static_cast<void>(ki.GetLogger().LogMessage(ORT_LOGGING_LEVEL_INFO, __FILE__, __LINE__,
                                                __func__, msg.c_str()));
  }

  void compute(OrtKernelContext* context) const {
    Ort::KernelContext ctx(context);
    const size_t inputs = ctx.GetInputCount();
    auto input = [&](size_t i) -> Ort::ConstValue {
      return i < inputs ? ctx.GetInput(i) : Ort::ConstValue(nullptr);
    };
    Ort::ConstValue q = input(kQuery);
    Ort::ConstValue k = input(kKey);
    Ort::ConstValue v = input(kValue);
    Ort::ConstValue mask = input(kAttentionBias);
    Ort::ConstValue offsets = input(kOffsets);
    const std::vector<int64_t> q_shape = q.GetTensorTypeAndShapeInfo().GetShape();
    AttentionArgs args;
    std::vector<int64_t> offsets64;
    if (offsets) {
      if (q_shape.size() != 2) {
        fail("with offsets (packed tokens) query must be 2-D [T, D] (or [T, 3D]), got " +
             shape_str(q_shape));
      }
      if (mask) fail("with offsets (packed tokens) attention_bias must be absent");
      offsets64 = read_offsets(offsets);
      args.batch = int64_t(offsets64.size()) - 1;
      args.tokens = q_shape[0];
      args.offsets = offsets64.data();
    } else {
      if (q_shape.size() != 3) {
        fail("query must be 3-D [B, S, D] (or [B, S, 3D]), got " + shape_str(q_shape));
      }
      args.batch = q_shape[0];
      args.seq = q_shape[1];
    }
    args.heads = heads_;
    args.q = float_data(q, "query");
    int64_t d = q_shape.back();
    if (bool(k) != bool(v)) fail("key and value must both be given, or both absent (packed QKV)");
    if (k) {
      for (auto [value, what] : {std::pair{k, "key"}, std::pair{v, "value"}}) {
        const std::vector<int64_t> shape = value.GetTensorTypeAndShapeInfo().GetShape();
        if (shape != q_shape) {
          fail(std::string(what) + " has shape " + shape_str(shape) + " but query has " +
               shape_str(q_shape) + " (self-attention: all three are [B, S, D] or [T, D])");
        }
      }
      args.k = float_data(k, "key");
      args.v = float_data(v, "value");
      args.token_stride = d;
    } else {
      if (d % 3 != 0) {
        fail("packed QKV query of shape " + shape_str(q_shape) +
             " (no key/value inputs): its last dimension is not 3 * D");
      }
      args.token_stride = d;
      d /= 3;
      args.k = args.q + d;
      args.v = args.q + 2 * d;
    }
    if (d % heads_ != 0) {
      fail("num_heads=" + std::to_string(heads_) + " does not divide the hidden size D=" +
           std::to_string(d));
    }
    args.head_size = d / heads_;
    args.scale = has_scale_ ? scale_ : 1.f / std::sqrt(float(args.head_size));
    if (mask) {
      const std::vector<int64_t> m = mask.GetTensorTypeAndShapeInfo().GetShape();
      if (m.size() != 4) {
        fail("attention_bias must be 4-D [B|1, N|1, S|1, S], got " + shape_str(m));
      }
      args.mask = float_data(mask, "attention_bias");
      for (size_t i = 0; i < 4; ++i) args.mask_dims[i] = m[i];
    }
    validate_attention(args);  // bounds (and offsets) before the output is allocated
    std::vector<int64_t> y_shape = q_shape;
    y_shape.back() = d;
    Ort::UnownedValue y = ctx.GetOutput(0, y_shape);
    args.y = y.GetTensorMutableData<float>();
    if (ctx.GetOutputCount() > 1) {
      const std::vector<int64_t> rows_shape =
          offsets ? std::vector<int64_t>{args.tokens} : std::vector<int64_t>{args.batch, args.seq};
      Ort::UnownedValue scores = ctx.GetOutput(1, rows_shape);
      args.key_scores = scores.GetTensorMutableData<float>();
    }
    run_attention(args, path_, OrtRunner(context));
  }

 private:
  int64_t heads_ = 0;
  float scale_ = 0.f;
  bool has_scale_ = false;
  AttentionPath path_ = AttentionPath::kRef;
};

}  // namespace

AttentionOp::AttentionOp() : OrtCustomOp{} {
  set_common_callbacks<AttentionKernel>(*this);
  GetName = [](const OrtCustomOp*) { return "Attention"; };
  GetInputTypeCount = [](const OrtCustomOp*) { return kInputCount; };
  // Types are checked in compute, so a wrong one is an error that names the input.
  GetInputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; };
  GetInputCharacteristic = [](const OrtCustomOp*, size_t index) {
    return index == kQuery ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  };
  GetOutputTypeCount = [](const OrtCustomOp*) { return kOutputCount; };
  GetOutputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; };
  GetOutputCharacteristic = [](const OrtCustomOp*, size_t index) {
    return index == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  };
}

}  // namespace fastonnx::ort
