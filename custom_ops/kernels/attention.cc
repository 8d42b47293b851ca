#include "attention.h"

#include "pack_tokens.h"  // check_token_offsets

#include <stdexcept>

namespace fastonnx {

const char* attention_path_name(AttentionPath path) {
  switch (path) {
    case AttentionPath::kRef: return "ref";
    case AttentionPath::kAvx2F32: return "avx2_f32";
    case AttentionPath::kAvx512F32: return "avx512_f32";
    case AttentionPath::kAvx512Bf16: return "avx512_bf16";
    case AttentionPath::kAmxBf16: return "amx_bf16";
  }
  return "?";
}

const char* attention_kernel_name(AttentionPath path) {
  switch (path) {
    case AttentionPath::kRef: return "f32_attention__ref";
    case AttentionPath::kAvx2F32: return "f32_attention_6x16__avx2";
    case AttentionPath::kAvx512F32: return "f32_attention_8x32__avx512";
    case AttentionPath::kAvx512Bf16: return "bf16_attention_8x32__avx512_bf16";
    case AttentionPath::kAmxBf16: return "bf16_attention_16x32__amx_bf16";
  }
  return "?";
}

std::vector<AttentionPath> all_attention_paths() {
  return {AttentionPath::kRef, AttentionPath::kAvx2F32, AttentionPath::kAvx512F32,
          AttentionPath::kAvx512Bf16, AttentionPath::kAmxBf16};
}

std::optional<AttentionPath> parse_attention_path(const std::string& name) {
  for (AttentionPath p : all_attention_paths()) {
    if (name == attention_path_name(p)) return p;
  }
  return std::nullopt;
}

std::string attention_path_unavailable_reason(AttentionPath path) {
  const CpuFeatures& f = cpu_features();
  switch (path) {
    case AttentionPath::kRef: return "";
    case AttentionPath::kAvx2F32:
      return f.avx2 && f.fma ? "" : "this CPU (or OS) lacks AVX2 with FMA";
    // Shares the bf16 paths' helpers, compiled for the same target (it issues no bf16 op).
    case AttentionPath::kAvx512F32:
    case AttentionPath::kAvx512Bf16:
      return f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx512_vnni && f.avx512_bf16
                 ? ""
                 : "this CPU (or OS) lacks AVX-512 BW/VL/DQ/VNNI with AVX512_BF16";
    case AttentionPath::kAmxBf16:
      if (!(f.amx_tile && f.amx_bf16)) return "this CPU (or OS) lacks AMX-BF16";
      if (!f.amx_os_permitted) return "the OS refused AMX tile-data permission (arch_prctl)";
      return attention_path_unavailable_reason(AttentionPath::kAvx512Bf16);
  }
  return "unknown attention path";
}

std::vector<AttentionPath> available_attention_paths() {
  std::vector<AttentionPath> out;
  for (AttentionPath p : all_attention_paths()) {
    if (attention_path_unavailable_reason(p).empty()) out.push_back(p);
  }
  return out;
}

AttentionPath attention_path_for_isa(Isa isa) {
  switch (isa) {
    case Isa::kRef: return AttentionPath::kRef;
    case Isa::kAvx2: return AttentionPath::kAvx2F32;
    case Isa::kAvx512Vnni: return avx512_attention_path();
    case Isa::kAmx: return AttentionPath::kAmxBf16;
  }
  return AttentionPath::kRef;
}

AttentionPath avx512_attention_path() {
  // Intel cores before AMX run vdpbf16ps at about half the fp32 FMA rate in multiply-adds
  // (Emerald Rapids with AMX hidden: 0.82 ns against 0.22 ns per instruction); Zen 4/5 run it
  // at full rate, where bf16 halves the work.
  return cpu_features().vendor == "GenuineIntel" ? AttentionPath::kAvx512F32
                                                 : AttentionPath::kAvx512Bf16;
}

AttentionPath choose_attention_path() {
  const std::optional<Isa> forced = forced_isa_from_env();
  if (!forced) {
    const AttentionPath best = available_attention_paths().back();
    return best == AttentionPath::kAvx512Bf16 ? avx512_attention_path() : best;
  }
  const AttentionPath path = attention_path_for_isa(*forced);
  const std::string why = attention_path_unavailable_reason(path);
  if (!why.empty()) {
    throw std::invalid_argument(std::string("FASTONNX_ISA=") + isa_name(*forced) +
                                " selects the attention path " + attention_path_name(path) +
                                ", which cannot run here: " + why);
  }
  return path;
}

namespace {

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument("Attention: " + what); }

// Offsets must rise from 0 to T, each step (a sequence) within the sequence limit. Checked in
// full before any work: every task then reads only its own rows.
void validate_offsets(const AttentionArgs& a) {
  try {
    check_token_offsets(a.offsets, a.batch, a.tokens, kMaxAttentionSequence);
  } catch (const std::invalid_argument& e) {
    bad(e.what());
  }
}

}  // namespace

void validate_attention(const AttentionArgs& a) {
  if (a.batch < 0 || a.seq < 0) bad("negative batch or sequence length");
  if (a.seq > kMaxAttentionSequence) {
    bad("sequence length " + std::to_string(a.seq) + " exceeds the limit of " +
        std::to_string(kMaxAttentionSequence));
  }
  if (a.heads < 1 || a.heads > kMaxAttentionHeads) {
    bad("num_heads " + std::to_string(a.heads) + " is not in [1, " +
        std::to_string(kMaxAttentionHeads) + "]");
  }
  if (a.head_size < 1 || a.head_size > kMaxAttentionHeadSize) {
    bad("head size " + std::to_string(a.head_size) + " is not in [1, " +
        std::to_string(kMaxAttentionHeadSize) + "]");
  }
  if (a.token_stride < a.heads * a.head_size) bad("token stride smaller than the hidden size");
  if (a.offsets) {
    if (a.mask) bad("packed tokens (offsets) take no attention_bias: each sequence sees its own");
    validate_offsets(a);
  }
  if (a.mask) {
    const int64_t* m = a.mask_dims;
    const bool ok = (m[0] == 1 || m[0] == a.batch) && (m[1] == 1 || m[1] == a.heads) &&
                    (m[2] == 1 || m[2] == a.seq) && m[3] == a.seq;
    if (!ok) {
      bad("mask of shape [" + std::to_string(m[0]) + "," + std::to_string(m[1]) + "," +
          std::to_string(m[2]) + "," + std::to_string(m[3]) + "] does not broadcast to [B=" +
          std::to_string(a.batch) + ", N=" + std::to_string(a.heads) + ", S=" +
          std::to_string(a.seq) + ", S=" + std::to_string(a.seq) +
          "] (each axis 1 or the full size; the key axis full)");
    }
  }
  const int64_t rows = a.offsets ? a.tokens : a.batch * a.seq;
  if (rows > 0 && (!a.q || !a.k || !a.v)) bad("missing Q, K or V");
}

namespace attention_detail {

Task task_of(const AttentionArgs& a, int64_t task) {
  const int64_t b = task / a.heads, n = task % a.heads;
  const int64_t d = a.heads * a.head_size;
  const int64_t first = a.offsets ? a.offsets[b] : b * a.seq;  // the sequence's first row
  Task t{};
  t.seq = a.offsets ? a.offsets[b + 1] - a.offsets[b] : a.seq;
  t.q = a.q + first * a.token_stride + n * a.head_size;
  t.k = a.k + first * a.token_stride + n * a.head_size;
  t.v = a.v + first * a.token_stride + n * a.head_size;
  t.y = a.y + first * d + n * a.head_size;
  if (a.mask) {
    const int64_t* m = a.mask_dims;
    const int64_t plane = m[2] * m[3];
    t.mask = a.mask + (m[0] == 1 ? 0 : b) * m[1] * plane + (m[1] == 1 ? 0 : n) * plane;
    t.mask_row_stride = m[2] == 1 ? 0 : m[3];
  }
  return t;
}

}  // namespace attention_detail

void run_attention(const AttentionArgs& args, AttentionPath path, const Runner& runner) {
  validate_attention(args);
  const std::string why = attention_path_unavailable_reason(path);
  if (!why.empty()) {
    throw std::invalid_argument(std::string("attention path ") + attention_path_name(path) +
                                " cannot run here: " + why);
  }
  if (args.batch == 0 || (args.offsets ? args.tokens : args.seq) == 0) return;
  if (!args.y) throw std::invalid_argument("Attention: missing output");
  // Key scores: one row per head (tasks write disjoint segments), summed over heads after.
  const int64_t rows = args.offsets ? args.tokens : args.batch * args.seq;
  std::vector<float> per_head;
  if (args.key_scores) per_head.assign(size_t(args.heads * rows), 0.f);
  using HeadFn = void (*)(const AttentionArgs&, const attention_detail::Task&);
  const HeadFn head = path == AttentionPath::kRef          ? attention_detail::head_ref
                      : path == AttentionPath::kAvx2F32    ? attention_detail::head_avx2_f32
                      : path == AttentionPath::kAvx512F32  ? attention_detail::head_avx512_f32
                      : path == AttentionPath::kAvx512Bf16 ? attention_detail::head_avx512_bf16
                                                           : attention_detail::head_amx_bf16;
  auto body = [&](size_t i) {
    attention_detail::Task t = attention_detail::task_of(args, int64_t(i));
    if (args.key_scores) {
      const int64_t b = int64_t(i) / args.heads, n = int64_t(i) % args.heads;
      const int64_t first = args.offsets ? args.offsets[b] : b * args.seq;
      t.key_scores = per_head.data() + n * rows + first;
    }
    if (t.seq > 0) head(args, t);  // a packed sequence may be empty
  };
  run_tasks(runner, size_t(args.batch * args.heads), body);
  if (args.key_scores) {
    std::fill(args.key_scores, args.key_scores + rows, 0.f);
    for (int64_t n = 0; n < args.heads; ++n) {
      const float* src = per_head.data() + n * rows;
      for (int64_t r = 0; r < rows; ++r) args.key_scores[r] += src[r];
    }
  }
}

}  // namespace fastonnx
