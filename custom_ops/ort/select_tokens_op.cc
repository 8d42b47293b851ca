#include "select_tokens_op.h"

#include <string>
#include <vector>

#include "../kernels/select_tokens.h"
#include "adapter_common.h"

namespace fastonnx::ort {
namespace {

enum Input : size_t {
  kScores = 0,   // float [T]: what each token is ranked by (Attention's key_scores)
  kOffsets = 1,  // int64 [B + 1]
};

[[noreturn]] void fail(const std::string& what) {
  throw std::invalid_argument("SelectTokens: " + what);
}

class SelectTokensKernel {
 public:
  explicit SelectTokensKernel(const OrtKernelInfo* info) {
    const OrtApi& api = Ort::GetApi();
    if (OrtStatus* s = api.KernelInfoGetAttribute_float(info, "keep_ratio", &keep_ratio_)) {
      api.ReleaseStatus(s);
      fail("attribute keep_ratio (float) is required");
    }
    try {
      check_keep_ratio(keep_ratio_);
    } catch (const std::invalid_argument& e) {
      fail(e.what());
    }
  }

  void compute(OrtKernelContext* context) const {
    Ort::KernelContext ctx(context);
    Ort::ConstValue scores = ctx.GetInput(kScores);
    Ort::ConstValue offsets = ctx.GetInput(kOffsets);
    const auto sinfo = scores.GetTensorTypeAndShapeInfo();
    const std::vector<int64_t> sshape = sinfo.GetShape();
    if (sshape.size() != 1 || sinfo.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
      fail("scores must be float32 [T], got " + shape_str(sshape));
    }
    const auto oinfo = offsets.GetTensorTypeAndShapeInfo();
    const std::vector<int64_t> oshape = oinfo.GetShape();
    if (oshape.size() != 1 || oshape[0] < 1 ||
        oinfo.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64) {
      fail("offsets must be int64 [B + 1], got " + shape_str(oshape));
    }
    const int64_t batch = oshape[0] - 1;
    const int64_t* off = offsets.GetTensorData<int64_t>();
    std::vector<int64_t> kept_off;
    try {
      kept_off = kept_offsets(off, batch, sshape[0], keep_ratio_);
    } catch (const std::invalid_argument& e) {
      fail(e.what());
    }
    Ort::UnownedValue kept = ctx.GetOutput(0, {kept_off.back()});
    Ort::UnownedValue new_offsets = ctx.GetOutput(1, {batch + 1});
    select_tokens(scores.GetTensorData<float>(), off, batch, kept_off.data(),
                  kept.GetTensorMutableData<int64_t>());
    std::copy(kept_off.begin(), kept_off.end(), new_offsets.GetTensorMutableData<int64_t>());
  }

 private:
  float keep_ratio_ = 1.f;
};

}  // namespace

SelectTokensOp::SelectTokensOp() : OrtCustomOp{} {
  set_common_callbacks<SelectTokensKernel>(*this);
  GetName = [](const OrtCustomOp*) { return "SelectTokens"; };
  GetInputTypeCount = [](const OrtCustomOp*) { return size_t{2}; };
  // Types are checked in compute, so a wrong one is an error that names the input.
  GetInputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; };
  GetInputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  GetOutputTypeCount = [](const OrtCustomOp*) { return size_t{2}; };
  GetOutputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64; };
  GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
}

}  // namespace fastonnx::ort
