#include "layer_norm_op.h"

#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "../kernels/layer_norm.h"
#include "adapter_common.h"

namespace fastonnx::ort {
namespace {

enum Input : size_t { kX = 0, kGamma = 1, kBeta = 2 };
enum Output : size_t { kY = 0, kYQuantized = 1, kRowScale = 2, kRowZeroPoint = 3 };
constexpr size_t kInputCount = 3, kOutputCount = 4;

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument("LayerNorm: " + what); }

const float* vector_of(const Ort::ConstValue& v, int64_t d, const char* what) {
  const auto info = v.GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || info.GetShape().size() != 1 ||
      info.GetShape()[0] != d) {
    fail(std::string(what) + " must be float32 [" + std::to_string(d) + "] (X's last dimension), got " +
         shape_str(info.GetShape()));
  }
  return v.GetTensorData<float>();
}

class LayerNormKernel {
 public:
  explicit LayerNormKernel(const OrtKernelInfo* info) {
    const OrtApi& api = Ort::GetApi();
    if (OrtStatus* s = api.KernelInfoGetAttribute_float(info, "epsilon", &epsilon_)) {
      api.ReleaseStatus(s);  // absent: ONNX's default
      epsilon_ = 1e-5f;
    }
    if (!(std::isfinite(epsilon_) && epsilon_ >= 0.f)) {
      fail("attribute epsilon must be finite and >= 0, got " + std::to_string(epsilon_));
    }
    int64_t axis = -1;
    if (OrtStatus* s = api.KernelInfoGetAttribute_int64(info, "axis", &axis)) api.ReleaseStatus(s);
    if (axis != -1) fail("attribute axis must be -1 (the last axis), got " + std::to_string(axis));
    isa_ = forced_isa_from_env().value_or(best_isa());
  }

  void compute(OrtKernelContext* context) const {
    Ort::KernelContext ctx(context);
    Ort::ConstValue x = ctx.GetInput(kX);
    const auto x_info = x.GetTensorTypeAndShapeInfo();
    const std::vector<int64_t> shape = x_info.GetShape();
    if (x_info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || shape.empty()) {
      fail("X must be a float32 tensor of rank >= 1, got element type " +
           std::to_string(x_info.GetElementType()) + " shape " + shape_str(shape));
    }
    LayerNormArgs args;
    args.d = shape.back();
    args.rows = std::accumulate(shape.begin(), shape.end() - 1, int64_t{1}, std::multiplies<>());
    args.x = x.GetTensorData<float>();
    args.gamma = vector_of(ctx.GetInput(kGamma), args.d, "gamma");
    if (ctx.GetInputCount() > kBeta) {
      if (Ort::ConstValue beta = ctx.GetInput(kBeta)) args.beta = vector_of(beta, args.d, "beta");
    }
    args.epsilon = epsilon_;
    validate_layer_norm(args);  // before any output is allocated
    const std::vector<int64_t> rows_shape(shape.begin(), shape.end() - 1);
    Ort::UnownedValue y = ctx.GetOutput(kY, shape);
    Ort::UnownedValue yq = ctx.GetOutput(kYQuantized, shape);
    Ort::UnownedValue scale = ctx.GetOutput(kRowScale, rows_shape);
    Ort::UnownedValue zp = ctx.GetOutput(kRowZeroPoint, rows_shape);
    if (args.rows == 0) return;  // empty outputs: ORT hands out no buffers
    args.y = y.GetTensorMutableData<float>();
    args.yq = yq.GetTensorMutableData<uint8_t>();
    args.row_scale = scale.GetTensorMutableData<float>();
    args.row_zero_point = zp.GetTensorMutableData<uint8_t>();
    run_layer_norm(args, isa_, OrtRunner(context));
  }

 private:
  float epsilon_ = 1e-5f;
  Isa isa_ = Isa::kRef;
};

}  // namespace

LayerNormOp::LayerNormOp() : OrtCustomOp{} {
  set_common_callbacks<LayerNormKernel>(*this);
  GetName = [](const OrtCustomOp*) { return "LayerNorm"; };
  GetInputTypeCount = [](const OrtCustomOp*) { return kInputCount; };
  // Types are checked in compute, so a wrong one is an error that names the input.
  GetInputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; };
  GetInputCharacteristic = [](const OrtCustomOp*, size_t index) {
    return index == kBeta ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  };
  GetOutputTypeCount = [](const OrtCustomOp*) { return kOutputCount; };
  GetOutputType = [](const OrtCustomOp*, size_t index) {
    return index == kY || index == kRowScale ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
                                             : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  };
  GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
}

}  // namespace fastonnx::ort
