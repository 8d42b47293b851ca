#include "sparse_linear_op.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <new>
#include <numeric>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "../kernels/linear.h"
#include "../kernels/packed_weight.h"
#include "adapter_common.h"

namespace fastonnx::ort {
namespace {

// Named input slots (see docs/operators.md).
enum Input : size_t {
  kX = 0,
  kW = 1,
  kBias = 2,
  kXScale = 3,
  kXZeroPoint = 4,
  kResidual = 5,
  kYScale = 6,      // SparseLinearU8 only
  kYZeroPoint = 7,  // SparseLinearU8 only
  kXRowScale = 8,   // per-row quantization of a uint8 X (from a fastonnx LayerNorm)
  kXRowZeroPoint = 9,
};
constexpr size_t kInputCount = 10;

const char* op_name(bool quantized_output) {
  return quantized_output ? "SparseLinearU8" : "SparseLinear";
}

[[noreturn]] void fail(const std::string& op, const std::string& what) {
  throw std::invalid_argument(op + ": " + what);
}

class SparseLinearKernel {
 public:
  SparseLinearKernel(const OrtCustomOp* op, const OrtKernelInfo* info)
      : quantized_output_(static_cast<const SparseLinearOp*>(op)->quantized_output),
        name_(op_name(quantized_output_)) {
    Ort::ConstKernelInfo ki(info);
    activation_ = read_activation(info);
    int is_constant = 0;
    Ort::ConstValue w = ki.GetTensorConstantInput(kW, &is_constant);
    if (!is_constant || !w) {
      fail(name_, "input W (the packed weight) must be a constant initializer");
    }
    const auto w_info = w.GetTensorTypeAndShapeInfo();
    if (w_info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 ||
        w_info.GetShape().size() != 1) {
      fail(name_, "input W must be a 1-D uint8 tensor (a packed weight from fastonnx)");
    }
    const auto* data = w.GetTensorData<uint8_t>();
    const size_t size = w_info.GetElementCount();
    // Validate and re-lay the weight out for this CPU once; the blob itself is not kept.
    const PackedWeightView view = parse_packed_weight(data, size);
    kernel_ = make_linear_kernel(view);
    const std::string msg = std::string("fastonnx ") + name_ + " '" + node_name(ki) + "': kernel " +
                            kernel_->name() + ", N=" + std::to_string(view.n) +
                            ", K=" + std::to_string(view.k) + ", block " +
                            std::to_string(view.block.rows) + "x" + std::to_string(view.block.cols) +
                            ", block sparsity " + std::to_string(view.block_sparsity());
    static_cast<void>(ki.GetLogger().LogMessage(ORT_LOGGING_LEVEL_INFO, __FILE__, __LINE__, __func__,
                                                msg.c_str()));
  }

  void compute(OrtKernelContext* context) const {
    Ort::KernelContext ctx(context);
    const size_t inputs = ctx.GetInputCount();
    auto input = [&](size_t i) -> Ort::ConstValue {
      return i < inputs ? ctx.GetInput(i) : Ort::ConstValue(nullptr);
    };
    const int64_t n = kernel_->n(), k = kernel_->k();

    Ort::ConstValue x = input(kX);
    const auto x_info = x.GetTensorTypeAndShapeInfo();
    std::vector<int64_t> shape = x_info.GetShape();
    const auto x_type = x_info.GetElementType();
    if (shape.empty() || shape.back() != k) {
      fail(name_, "X has shape " + shape_str(shape) + " but the packed weight expects " +
                      std::to_string(k) + " input features in its last dimension");
    }
    LinearArgs args;
    args.m = std::accumulate(shape.begin(), shape.end() - 1, int64_t{1}, std::multiplies<>());
    if (x_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
      args.x = x.GetTensorData<float>();
    } else if (x_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) {
      args.xq = x.GetTensorData<uint8_t>();
    } else {
      fail(name_, "X must be float32 or uint8 (element type " + std::to_string(x_type) + ")");
    }

    if (Ort::ConstValue s = input(kXScale)) {
      args.per_tensor = true;
      args.x_scale = scalar<float>(s, "x_scale", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
      if (Ort::ConstValue zp = input(kXZeroPoint)) {
        args.x_zero_point = scalar<uint8_t>(zp, "x_zero_point", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
      }
    }
    Ort::ConstValue row_scale = input(kXRowScale), row_zp = input(kXRowZeroPoint);
    if (row_scale || row_zp) {
      if (!row_scale || !row_zp) fail(name_, "x_row_scale and x_row_zero_point come together");
      if (x_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 || args.per_tensor) {
        fail(name_, "x_row_scale / x_row_zero_point quantize a uint8 X per row: X must be uint8 "
                    "and x_scale absent");
      }
      const std::vector<int64_t> rows(shape.begin(), shape.end() - 1);
      for (auto [value, what, type] :
           {std::tuple{row_scale, "x_row_scale", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT},
            std::tuple{row_zp, "x_row_zero_point", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8}}) {
        const auto info = value.GetTensorTypeAndShapeInfo();
        if (info.GetElementType() != type || info.GetShape() != rows) {
          fail(name_, std::string(what) + " must be " +
                          (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ? "float32" : "uint8") +
                          " with X's leading dimensions " + shape_str(rows) + ", got " +
                          shape_str(info.GetShape()));
        }
      }
      args.x_row_scale = row_scale.GetTensorData<float>();
      args.x_row_zero_point = row_zp.GetTensorData<uint8_t>();
    } else if (x_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 && !args.per_tensor) {
      fail(name_, "a uint8 X needs x_scale (and x_zero_point), or x_row_scale and x_row_zero_point");
    }

    if (Ort::ConstValue b = input(kBias)) {
      const auto bi = b.GetTensorTypeAndShapeInfo();
      if (bi.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || bi.GetElementCount() != size_t(n)) {
        fail(name_, "bias must be float32 with " + std::to_string(n) + " elements, got shape " +
                        shape_str(bi.GetShape()));
      }
      args.bias = b.GetTensorData<float>();
    }
    shape.back() = n;
    if (Ort::ConstValue r = input(kResidual)) {
      const auto ri = r.GetTensorTypeAndShapeInfo();
      if (ri.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || ri.GetShape() != shape) {
        fail(name_, "residual must be float32 with the output's shape " + shape_str(shape) +
                        ", got " + shape_str(ri.GetShape()));
      }
      args.residual = r.GetTensorData<float>();
    }
    args.activation = activation_;
    if (!quantized_output_ && (input(kYScale) || input(kYZeroPoint))) {
      fail(name_, "y_scale and y_zero_point belong to SparseLinearU8 (uint8 output)");
    }
    if (quantized_output_) {
      Ort::ConstValue ys = input(kYScale);
      if (!ys) fail(name_, "y_scale is required");
      args.y_scale = scalar<float>(ys, "y_scale", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
      if (Ort::ConstValue zp = input(kYZeroPoint)) {
        args.y_zero_point = scalar<uint8_t>(zp, "y_zero_point", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
      }
    }

    Ort::UnownedValue y = ctx.GetOutput(0, shape);
    // An empty batch (a zero leading dimension) gives an empty Y; ORT hands out no buffer for
    // it, so the kernel (which wants one) is not called.
    if (args.m == 0) return;
    if (quantized_output_) {
      args.yq = y.GetTensorMutableData<uint8_t>();
    } else {
      args.y = y.GetTensorMutableData<float>();
    }
    // The kernel applies the op's rule for non-finite rows of X itself (linear.h).
    kernel_->run(args, OrtRunner(context));
  }

 private:
  static Activation read_activation(const OrtKernelInfo* info) {
    const OrtApi& api = Ort::GetApi();
    size_t size = 0;
    OrtStatus* status = api.KernelInfoGetAttribute_string(info, "activation", nullptr, &size);
    if (status != nullptr) {  // absent, or not a string
      api.ReleaseStatus(status);
      if (const char* type = non_string_attribute_type(info, "activation")) {
        throw std::invalid_argument(std::string("attribute 'activation' must be a string ('none' "
                                                "or 'gelu'), got ") + type);
      }
      return Activation::kNone;
    }
    std::string value(size, '\0');
    Ort::ThrowOnError(api.KernelInfoGetAttribute_string(info, "activation", value.data(), &size));
    value.resize(std::strlen(value.c_str()));
    if (value == "none" || value.empty()) return Activation::kNone;
    if (value == "gelu") return Activation::kGelu;
    throw std::invalid_argument("attribute activation='" + value + "' is not one of: none, gelu");
  }

  // The type of attribute `name` when it is present with a non-string type; null otherwise.
  // (The C API reads attributes only by name and type, so each type is probed in turn.)
  static const char* non_string_attribute_type(const OrtKernelInfo* info, const char* name) {
    const OrtApi& api = Ort::GetApi();
    auto present = [&](OrtStatus* s) {
      if (s == nullptr) return true;
      api.ReleaseStatus(s);
      return false;
    };
    int64_t i = 0;
    float f = 0.f;
    if (present(api.KernelInfoGetAttribute_int64(info, name, &i))) return "an int";
    if (present(api.KernelInfoGetAttribute_float(info, name, &f))) return "a float";
    // ORT's array getters do not check the attribute type (an int list reads as an empty float
    // list and the other way round), so the non-empty one tells.
    size_t ints = 0, floats = 0;
    const bool int_list = present(api.KernelInfoGetAttributeArray_int64(info, name, nullptr, &ints));
    const bool float_list =
        present(api.KernelInfoGetAttributeArray_float(info, name, nullptr, &floats));
    if (ints > 0) return "a list of ints";
    if (floats > 0) return "a list of floats";
    if (int_list || float_list) return "a list";
    return nullptr;
  }

  static std::string node_name(const Ort::ConstKernelInfo& ki) {
    try {
      return ki.GetNodeName();
    } catch (const std::exception&) {
      return "?";
    }
  }

  template <class T>
  T scalar(const Ort::ConstValue& v, const char* what, ONNXTensorElementDataType type) const {
    const auto info = v.GetTensorTypeAndShapeInfo();
    if (info.GetElementType() != type || info.GetElementCount() != 1) {
      fail(name_, std::string(what) + " must be a single " +
                      (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ? "float32" : "uint8") +
                      " value, got shape " + shape_str(info.GetShape()));
    }
    return *v.GetTensorData<T>();
  }

  bool quantized_output_;
  const char* name_;
  Activation activation_ = Activation::kNone;
  std::unique_ptr<LinearKernel> kernel_;
};

}  // namespace

SparseLinearOp::SparseLinearOp(bool quantized) : OrtCustomOp{}, quantized_output(quantized) {
  set_common_callbacks<SparseLinearKernel>(*this);
  GetName = [](const OrtCustomOp* op) {
    return op_name(static_cast<const SparseLinearOp*>(op)->quantized_output);
  };
  GetInputTypeCount = [](const OrtCustomOp*) { return kInputCount; };
  GetInputType = [](const OrtCustomOp*, size_t index) {
    switch (index) {
      case kX: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // float32 or uint8
      case kW:
      case kXZeroPoint:
      case kYZeroPoint:
      case kXRowZeroPoint: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
      default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
  };
  GetInputCharacteristic = [](const OrtCustomOp*, size_t index) {
    return index <= kW ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  };
  GetOutputTypeCount = [](const OrtCustomOp*) { return size_t{1}; };
  GetOutputType = [](const OrtCustomOp* op, size_t) {
    return static_cast<const SparseLinearOp*>(op)->quantized_output
               ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8
               : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  };
  GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
}

}  // namespace fastonnx::ort
