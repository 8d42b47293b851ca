// fastonnx._native: weight packing and direct kernel calls from Python (used by the graph passes
// at optimize time, by the tests and by `fastonnx bench kernels`).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <chrono>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "../kernels/aligned_buffer.h"
#include "../kernels/attention.h"
#include "../kernels/cpu_features.h"
#include "../kernels/kernel_manifest.h"
#include "../kernels/layer_norm.h"
#include "../kernels/linear.h"
#include "../kernels/packed_weight.h"

namespace py = pybind11;
using namespace fastonnx;

namespace {

template <class T>
using Array = py::array_t<T, py::array::c_style | py::array::forcecast>;

// Plain std::thread runner: tasks are handed out through an atomic counter.
class ThreadRunner final : public Runner {
 public:
  explicit ThreadRunner(int threads) : threads_(std::max(1, threads)) {}
  void parallel_for(size_t count, TaskFn fn, void* ctx) const override {
    const size_t workers = std::min<size_t>(size_t(threads_), count);
    if (workers <= 1) {
      for (size_t i = 0; i < count; ++i) fn(ctx, i);
      return;
    }
    std::atomic<size_t> next{0};
    auto work = [&] {
      for (size_t i; (i = next.fetch_add(1)) < count;) fn(ctx, i);
    };
    std::vector<std::thread> pool;
    for (size_t t = 1; t < workers; ++t) pool.emplace_back(work);
    work();
    for (auto& t : pool) t.join();
  }

 private:
  int threads_;
};

std::optional<Isa> isa_arg(const std::optional<std::string>& name) {
  if (!name || *name == "auto") return std::nullopt;
  const auto isa = parse_isa(*name);
  if (!isa) throw std::invalid_argument("unknown ISA '" + *name + "' (amx, avx512_vnni, avx2, ref)");
  return isa;
}

std::string blob_string(const py::buffer& blob) {
  const py::buffer_info info = blob.request();
  if (info.itemsize != 1) throw std::invalid_argument("packed weight must be bytes or a uint8 array");
  return std::string(static_cast<const char*>(info.ptr), size_t(info.size));
}

// Copies the blob into 4-byte-aligned storage (Python bytes give no alignment promise).
struct OwnedBlob {
  explicit OwnedBlob(const py::buffer& blob) {
    const std::string s = blob_string(blob);
    words.resize((s.size() + 3) / 4);
    std::memcpy(words.data(), s.data(), s.size());
    size = s.size();
  }
  const uint8_t* data() const { return reinterpret_cast<const uint8_t*>(words.data()); }
  PackedWeightView view() const { return parse_packed_weight(data(), size); }
  std::vector<uint32_t> words;
  size_t size = 0;
};

py::tuple shape_tuple(BlockShape b) { return py::make_tuple(b.rows, b.cols); }

BlockShape shape_arg(const std::pair<uint32_t, uint32_t>& s) { return BlockShape{s.first, s.second}; }

// A weight prepared for one kernel path; calls release the GIL.
class PyLinear {
 public:
  PyLinear(const py::buffer& blob, const std::optional<std::string>& isa,
           const std::optional<std::string>& kernel) {
    const OwnedBlob owned(blob);
    const PackedWeightView view = owned.view();
    if (!kernel) {
      kernel_ = make_linear_kernel(view, isa_arg(isa));
      return;
    }
    if (isa) throw std::invalid_argument("give either isa or kernel, not both");
    const KernelEntry* e = find_kernel(*kernel);
    if (e == nullptr) throw std::invalid_argument("unknown kernel '" + *kernel + "'");
    const std::string why = kernel_unavailable_reason(*e);
    if (!why.empty()) throw std::invalid_argument("kernel " + *kernel + " cannot run here: " + why);
    kernel_ = e->make(view);
  }

  py::array call(const py::array& x, const std::optional<Array<float>>& bias,
                 std::optional<float> x_scale, uint8_t x_zero_point,
                 const std::optional<Array<float>>& residual, const std::string& activation,
                 std::optional<float> y_scale, uint8_t y_zero_point, int threads) const {
    const int64_t n = kernel_->n(), k = kernel_->k();
    if (x.ndim() < 1 || x.shape(x.ndim() - 1) != k) {
      throw std::invalid_argument("x must have " + std::to_string(k) + " features in its last dimension");
    }
    std::vector<py::ssize_t> out_shape(x.shape(), x.shape() + x.ndim());
    out_shape.back() = n;
    LinearArgs args;
    args.m = x.size() / k;
    Array<float> xf;
    Array<uint8_t> xu;
    if (x.dtype().equal(py::dtype::of<uint8_t>())) {
      xu = Array<uint8_t>::ensure(x);
      args.xq = xu.data();
    } else {
      xf = Array<float>::ensure(x);
      if (!xf) throw std::invalid_argument("x must be float32 or uint8");
      args.x = xf.data();
    }
    if (x_scale) {
      args.per_tensor = true;
      args.x_scale = *x_scale;
      args.x_zero_point = x_zero_point;
    }
    if (bias) {
      if (bias->size() != n) throw std::invalid_argument("bias must have " + std::to_string(n) + " elements");
      args.bias = bias->data();
    }
    if (residual) {
      if (residual->size() != args.m * n) throw std::invalid_argument("residual must have the output's shape");
      args.residual = residual->data();
    }
    if (activation == "gelu") {
      args.activation = Activation::kGelu;
    } else if (activation != "none") {
      throw std::invalid_argument("activation must be 'none' or 'gelu'");
    }
    py::array out;
    if (y_scale) {
      Array<uint8_t> yq(out_shape);
      args.yq = yq.mutable_data();
      args.y_scale = *y_scale;
      args.y_zero_point = y_zero_point;
      out = yq;
    } else {
      Array<float> y(out_shape);
      args.y = y.mutable_data();
      out = y;
    }
    {
      py::gil_scoped_release release;
      kernel_->run(args, ThreadRunner(threads));
    }
    return out;
  }

  Array<int32_t> accumulate(const Array<uint8_t>& xq, int threads) const {
    if (xq.ndim() != 2 || xq.shape(1) != kernel_->k()) {
      throw std::invalid_argument("xq must be uint8 [M, " + std::to_string(kernel_->k()) + "]");
    }
    Array<int32_t> acc({xq.shape(0), py::ssize_t(kernel_->n())});
    {
      py::gil_scoped_release release;
      kernel_->accumulate(xq.data(), xq.shape(0), acc.mutable_data(), ThreadRunner(threads));
    }
    return acc;
  }

  // Per-call wall times (ns) of `runs` calls on one float input with a reused output: the kernel
  // alone, without Python or ORT in the loop (for `fastonnx bench kernels --direct` and tuning).
  std::vector<int64_t> time_calls(const Array<float>& x, int runs, int threads) const {
    const int64_t k = kernel_->k();
    if (x.ndim() != 2 || x.shape(1) != k) throw std::invalid_argument("x must be float32 [M, K]");
    if (runs < 1) throw std::invalid_argument("runs must be >= 1");
    // Cache-line aligned like ORT's outputs: a misaligned one splits every vector store.
    AlignedBuffer<float> y(size_t(x.shape(0) * kernel_->n()));
    LinearArgs args;
    args.m = x.shape(0);
    args.x = x.data();
    args.y = y.data();
    std::vector<int64_t> ns;
    py::gil_scoped_release release;
    const ThreadRunner runner(threads);
    for (int i = 0; i < runs; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      kernel_->run(args, runner);
      ns.push_back(std::chrono::duration_cast<std::chrono::nanoseconds>(
                       std::chrono::steady_clock::now() - t0).count());
    }
    return ns;
  }
  std::string name() const { return kernel_->name(); }
  std::string isa() const { return isa_name(kernel_->isa()); }
  int64_t n() const { return kernel_->n(); }
  int64_t k() const { return kernel_->k(); }

 private:
  std::unique_ptr<LinearKernel> kernel_;
};

std::optional<AttentionPath> attention_path_arg(const std::optional<std::string>& name) {
  if (!name || *name == "auto") return std::nullopt;
  const auto path = parse_attention_path(*name);
  if (!path) {
    std::string names;
    for (AttentionPath p : all_attention_paths()) {
      names += std::string(names.empty() ? "" : ", ") + attention_path_name(p);
    }
    throw std::invalid_argument("unknown attention path '" + *name + "' (" + names + ")");
  }
  return path;
}

// Y = softmax(Q K^T * scale + mask) V; key/value None means q is packed [B, S, 3D]. With
// offsets (int64 [B + 1]) the tokens are packed: q/k/v are [T, D] (or q [T, 3D]).
py::object attention(const Array<float>& q, const std::optional<Array<float>>& k,
                     const std::optional<Array<float>>& v, const std::optional<Array<float>>& mask,
                     int64_t num_heads, std::optional<float> scale,
                     const std::optional<std::string>& path_name, int threads,
                     const std::optional<Array<int64_t>>& offsets, bool key_scores) {
  const py::ssize_t rank = offsets ? 2 : 3;
  if (q.ndim() != rank) {
    throw std::invalid_argument(offsets ? "with offsets, q must be float32 [T, D] or [T, 3D]"
                                        : "q must be float32 [B, S, D] or [B, S, 3D]");
  }
  if (bool(k) != bool(v)) throw std::invalid_argument("give both k and v, or neither (packed q)");
  AttentionArgs args;
  if (offsets) {
    if (offsets->ndim() != 1 || offsets->shape(0) < 1) {
      throw std::invalid_argument("offsets must be int64 [B + 1]");
    }
    args.batch = offsets->shape(0) - 1;
    args.tokens = q.shape(0);
    args.offsets = offsets->data();
  } else {
    args.batch = q.shape(0);
    args.seq = q.shape(1);
  }
  args.heads = num_heads;
  args.q = q.data();
  int64_t d = q.shape(rank - 1);
  args.token_stride = d;
  if (k) {
    for (const Array<float>* x : {&*k, &*v}) {
      bool same = x->ndim() == rank;
      for (py::ssize_t i = 0; same && i < rank; ++i) same = x->shape(i) == q.shape(i);
      if (!same) throw std::invalid_argument("k and v must have q's shape [B, S, D] or [T, D]");
    }
    args.k = k->data();
    args.v = v->data();
  } else {
    if (d % 3) throw std::invalid_argument("packed q's last dimension is not 3 * D");
    d /= 3;
    args.k = args.q + d;
    args.v = args.q + 2 * d;
  }
  if (num_heads < 1 || d % num_heads) {
    throw std::invalid_argument("num_heads=" + std::to_string(num_heads) +
                                " does not divide the hidden size D=" + std::to_string(d));
  }
  args.head_size = d / num_heads;
  args.scale = scale ? *scale : 1.f / std::sqrt(float(args.head_size));
  if (mask) {
    if (mask->ndim() != 4) throw std::invalid_argument("mask must be 4-D [B|1, N|1, S|1, S]");
    args.mask = mask->data();
    for (int i = 0; i < 4; ++i) args.mask_dims[i] = mask->shape(i);
  }
  validate_attention(args);
  Array<float> y = offsets ? Array<float>({q.shape(0), py::ssize_t(d)})
                           : Array<float>({q.shape(0), q.shape(1), py::ssize_t(d)});
  args.y = y.mutable_data();
  Array<float> scores = offsets ? Array<float>({q.shape(0)}) : Array<float>({q.shape(0), q.shape(1)});
  if (key_scores) args.key_scores = scores.mutable_data();
  const AttentionPath path = [&] {
    const auto chosen = attention_path_arg(path_name);
    return chosen ? *chosen : choose_attention_path();
  }();
  {
    py::gil_scoped_release release;
    run_attention(args, path, ThreadRunner(threads));
  }
  if (key_scores) return py::make_tuple(y, scores);
  return y;
}

// LayerNorm over the last axis plus per-row uint8 quantization: (y, yq, row_scale, row_zp).
py::tuple layer_norm(const Array<float>& x, const Array<float>& gamma,
                     const std::optional<Array<float>>& beta, float epsilon,
                     const std::optional<std::string>& isa_name_arg, int threads) {
  if (x.ndim() < 1) throw std::invalid_argument("x must have rank >= 1");
  LayerNormArgs args;
  args.d = x.shape(x.ndim() - 1);
  args.rows = args.d ? x.size() / args.d : 0;
  if (gamma.ndim() != 1 || gamma.shape(0) != args.d) throw std::invalid_argument("gamma must be [D]");
  if (beta && (beta->ndim() != 1 || beta->shape(0) != args.d)) throw std::invalid_argument("beta must be [D]");
  args.x = x.data();
  args.gamma = gamma.data();
  args.beta = beta ? beta->data() : nullptr;
  args.epsilon = epsilon;
  validate_layer_norm(args);
  std::vector<py::ssize_t> shape(x.shape(), x.shape() + x.ndim());
  std::vector<py::ssize_t> rows(shape.begin(), shape.end() - 1);
  Array<float> y(shape);
  Array<uint8_t> yq(shape);
  Array<float> scale(rows);
  Array<uint8_t> zp(rows);
  args.y = y.mutable_data();
  args.yq = yq.mutable_data();
  args.row_scale = scale.mutable_data();
  args.row_zero_point = zp.mutable_data();
  const Isa isa = isa_arg(isa_name_arg).value_or(forced_isa_from_env().value_or(best_isa()));
  {
    py::gil_scoped_release release;
    run_layer_norm(args, isa, ThreadRunner(threads));
  }
  return py::make_tuple(y, yq, scale, zp);
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "fastonnx native kernels: weight packing and sparse INT8 linear layers";

  m.def("cpu_features", [] {
    const CpuFeatures& f = cpu_features();
    py::dict d;
    d["vendor"] = f.vendor;
    d["avx2"] = f.avx2;
    d["fma"] = f.fma;
    d["avx512f"] = f.avx512f;
    d["avx512bw"] = f.avx512bw;
    d["avx512dq"] = f.avx512dq;
    d["avx512vl"] = f.avx512vl;
    d["avx512_vnni"] = f.avx512_vnni;
    d["avx512_bf16"] = f.avx512_bf16;
    d["amx_tile"] = f.amx_tile;
    d["amx_int8"] = f.amx_int8;
    d["amx_bf16"] = f.amx_bf16;
    d["amx_os_permitted"] = f.amx_os_permitted;
    return d;
  }, "Detected CPU features (usable by this process).");
  m.def("all_isas", [] {
    std::vector<std::string> out;
    for (Isa i : {Isa::kRef, Isa::kAvx2, Isa::kAvx512Vnni, Isa::kAmx}) out.push_back(isa_name(i));
    return out;
  }, "Every kernel path fastonnx has, portable first.");
  m.def("available_isas", [] {
    std::vector<std::string> out;
    for (Isa i : available_isas()) out.push_back(isa_name(i));
    return out;
  }, "Kernel paths this machine can run, portable first.");
  m.def("isa_unavailable_reason", [](const std::string& name) {
    const auto isa = isa_arg(name);
    return isa ? isa_unavailable_reason(*isa) : std::string();
  });
  m.def("layer_norm_path", [](const std::optional<std::string>& isa) {
    const Isa level = isa_arg(isa).value_or(forced_isa_from_env().value_or(best_isa()));
    return std::string(layer_norm_path_name(layer_norm_path(level)));
  }, py::arg("isa") = py::none(), "The LayerNorm path an ISA level (default: this process's) runs.");
  m.def("layer_norm", &layer_norm, py::arg("x"), py::arg("gamma"), py::arg("beta") = py::none(),
        py::arg("epsilon") = 1e-5f, py::arg("isa") = py::none(), py::arg("threads") = 1,
        "LayerNorm over the last axis plus its per-row uint8 quantization, as the LayerNorm op "
        "computes it: (y, yq, row_scale, row_zero_point).");
  m.def("attention_paths", [] {
    std::vector<std::string> out;
    for (AttentionPath p : all_attention_paths()) out.push_back(attention_path_name(p));
    return out;
  }, "Every attention kernel path, portable first.");
  m.def("available_attention_paths", [] {
    std::vector<std::string> out;
    for (AttentionPath p : available_attention_paths()) out.push_back(attention_path_name(p));
    return out;
  }, "Attention kernel paths this machine can run, portable first.");
  m.def("attention_path_unavailable_reason", [](const std::string& name) {
    const auto path = attention_path_arg(name);
    return path ? attention_path_unavailable_reason(*path) : std::string();
  });
  m.def("attention_kernel_name", [](const std::optional<std::string>& name) {
    const auto path = attention_path_arg(name);
    return std::string(attention_kernel_name(path ? *path : choose_attention_path()));
  }, py::arg("path") = py::none(),
     "Kernel name of an attention path (None: the one the op would choose here).");
  m.attr("ATTENTION_SKIP_THRESHOLD") = kSkipThreshold;
  m.attr("ATTENTION_MAX_SEQUENCE") = kMaxAttentionSequence;
  m.def("attention", &attention, py::arg("q"), py::arg("k") = py::none(), py::arg("v") = py::none(),
        py::arg("mask") = py::none(), py::kw_only(), py::arg("num_heads"),
        py::arg("scale") = py::none(), py::arg("path") = py::none(), py::arg("threads") = 1,
        py::arg("offsets") = py::none(), py::arg("key_scores") = false,
        "softmax(q k^T * scale + mask) v per head (com.fastonnx::Attention's kernel); k=v=None "
        "reads q as packed [B, S, 3D] = [Q | K | V]. offsets (int64 [B + 1]): packed tokens, "
        "q/k/v [T, D] (or q [T, 3D]), sequence b being rows offsets[b] .. offsets[b+1]. path: "
        "None (FASTONNX_ISA or best), 'ref', 'avx512_bf16' or 'amx_bf16'. key_scores=True returns "
        "(y, scores): scores [B, S] or [T], the attention each key receives summed over heads "
        "and queries.");
  m.def("best_isa", [] { return std::string(isa_name(best_isa())); });
  m.def("forced_isa", [] {
    const auto isa = forced_isa_from_env();
    return isa ? std::optional<std::string>(isa_name(*isa)) : std::nullopt;
  }, "The path FASTONNX_ISA forces (None when unset); ValueError when it cannot run here.");
  m.def("supported_block_shapes", [] {
    py::list out;
    for (BlockShape b : fastonnx::supported_block_shapes()) out.append(shape_tuple(b));
    return out;
  }, "Block shapes (rows=output channels, cols=input features) the packer accepts.");
  m.def("preferred_block_shape", [](const std::optional<std::string>& isa) {
    const auto chosen = isa_arg(isa);
    return shape_tuple(preferred_block_shape(chosen ? *chosen : best_isa()));
  }, py::arg("isa") = py::none(),
     "The block shape the kernels of this machine (or of `isa`) exploit best.");

  m.def("pack_weight", [](const py::array& w_any, const py::array& scale_any,
                          std::pair<uint32_t, uint32_t> block) {
    // Exact dtypes: a cast would silently change the weights (int 1000 becomes int8 -24).
    if (!w_any.dtype().equal(py::dtype::of<int8_t>())) {
      throw std::invalid_argument("w must be int8 [N, K], got dtype " +
                                  std::string(py::str(w_any.dtype())) + " (quantize it first)");
    }
    if (!scale_any.dtype().equal(py::dtype::of<float>())) {
      throw std::invalid_argument("scale must be float32 [N], got dtype " +
                                  std::string(py::str(scale_any.dtype())));
    }
    const auto w = Array<int8_t>::ensure(w_any);  // C-contiguous, same dtype: no value changes
    const auto scale = Array<float>::ensure(scale_any);
    if (w.ndim() != 2) throw std::invalid_argument("w must be int8 [N, K]");
    // Check the limits on the full 64-bit shape, before it is narrowed to the format's uint32.
    if (const std::string why = shape_limit_error(uint64_t(w.shape(0)), uint64_t(w.shape(1)));
        !why.empty()) {
      throw std::invalid_argument(why);
    }
    const auto n = uint32_t(w.shape(0)), k = uint32_t(w.shape(1));
    if (scale.ndim() != 1 || scale.shape(0) != py::ssize_t(n)) {
      throw std::invalid_argument("scale must be float32 [N] with N=" + std::to_string(n));
    }
    std::vector<uint8_t> blob;
    {
      py::gil_scoped_release release;
      blob = pack_weight(w.data(), n, k, scale.data(), shape_arg(block));
    }
    return py::bytes(reinterpret_cast<const char*>(blob.data()), blob.size());
  }, py::arg("w"), py::arg("scale"), py::arg("block_shape") = std::make_pair(1u, 4u),
     "Packs int8 W [N, K] (PyTorch [out, in] layout) and per-channel scales into a blob.");

  m.def("unpack_weight", [](const py::buffer& blob) {
    const OwnedBlob owned(blob);
    const PackedWeightView v = owned.view();
    const std::vector<int8_t> w = unpack_weight(v);
    Array<int8_t> wa({py::ssize_t(v.n), py::ssize_t(v.k)});
    std::copy(w.begin(), w.end(), wa.mutable_data());
    Array<float> sa(py::ssize_t(v.n));
    std::copy(v.scale, v.scale + v.n, sa.mutable_data());
    return py::make_tuple(wa, sa, shape_tuple(v.block));
  }, "Validates a blob and returns (W int8 [N, K], scale float32 [N], block_shape).");

  m.def("weight_info", [](const py::buffer& blob) {
    const OwnedBlob owned(blob);
    const PackedWeightView v = owned.view();
    py::dict d;
    d["n"] = v.n;
    d["k"] = v.k;
    d["block_shape"] = shape_tuple(v.block);
    d["nnz_blocks"] = v.nnz_blocks;
    d["block_sparsity"] = v.block_sparsity();
    d["format_version"] = kBlobVersion;
    d["nbytes"] = owned.size;
    return d;
  });
  m.attr("FORMAT_VERSION") = kBlobVersion;

  m.def("kernels", [] {
    py::list out;
    for (const KernelEntry& e : kernel_manifest()) {
      py::dict d;
      d["name"] = e.name;
      d["isa"] = isa_name(e.isa);
      d["requires_isa"] = isa_name(e.requires_isa);
      d["emulated"] = e.emulated;
      d["sparse"] = e.sparse;
      d["block_shape"] = shape_tuple(e.block);
      d["scheme"] = e.scheme;
      d["unavailable_reason"] = kernel_unavailable_reason(e);
      out.append(d);
    }
    return out;
  }, "The kernel manifest: every linear kernel, with why it cannot run here (empty if it can).");
  m.def("weight_stats", [](const py::buffer& blob) {
    const OwnedBlob owned(blob);
    const WeightStats s = weight_stats(owned.view());
    py::dict d;
    d["n"] = s.n;
    d["k"] = s.k;
    d["groups_1x4"] = s.groups_1x4;
    d["blocks_4x4"] = s.blocks_4x4;
    d["blocks_16x4"] = s.blocks_16x4;
    d["chunks_16x4"] = s.chunks_16x4;
    d["gathered_chunks"] = s.gathered_chunks;
    py::dict costs;
    for (const KernelEntry& e : kernel_manifest()) costs[e.name] = e.cost_us(s);
    d["cost_us"] = costs;
    return d;
  }, "What the kernel choice depends on for this weight, and each kernel's estimated cost.");

  py::class_<PyLinear>(m, "Linear", "A packed weight prepared for one kernel path.")
      .def(py::init<const py::buffer&, const std::optional<std::string>&,
                    const std::optional<std::string>&>(),
           py::arg("blob"), py::arg("isa") = py::none(), py::arg("kernel") = py::none(),
           "Prepares the weight for the kernel the manifest chooses, for one path (`isa`), or "
           "for one kernel by name (`kernel`).")
      .def("__call__", &PyLinear::call, py::arg("x"), py::arg("bias") = py::none(),
           py::arg("x_scale") = py::none(), py::arg("x_zero_point") = 0,
           py::arg("residual") = py::none(), py::arg("activation") = "none",
           py::arg("y_scale") = py::none(), py::arg("y_zero_point") = 0, py::arg("threads") = 1,
           "Y = act(dequant(quant(x) @ W^T) + bias) + residual; uint8 Y when y_scale is given.")
      .def("accumulate", &PyLinear::accumulate, py::arg("xq"), py::arg("threads") = 1,
           "Raw int32 xq @ W^T (no zero-point compensation).")
      .def("time_calls", &PyLinear::time_calls, py::arg("x"), py::arg("runs"),
           py::arg("threads") = 1, "Wall time (ns) of each of `runs` calls on float x [M, K].")
      .def_property_readonly("name", &PyLinear::name)
      .def_property_readonly("isa", &PyLinear::isa)
      .def_property_readonly("n", &PyLinear::n)
      .def_property_readonly("k", &PyLinear::k);
}
