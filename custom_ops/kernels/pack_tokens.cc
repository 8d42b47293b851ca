#include "pack_tokens.h"

#include <cstring>
#include <stdexcept>
#include <string>

namespace fastonnx {

void check_token_offsets(const int64_t* o, int64_t batch, int64_t tokens, int64_t max_sequence) {
  auto bad = [](const std::string& what) { throw std::invalid_argument(what); };
  if (tokens < 0) bad("negative token count");
  if (o[0] != 0) bad("offsets[0] is " + std::to_string(o[0]) + ", not 0");
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = o[b + 1] - o[b];
    if (o[b + 1] < o[b] || o[b + 1] > tokens) {
      bad("offsets are not non-decreasing within [0, T=" + std::to_string(tokens) +
          "]: offsets[" + std::to_string(b) + "]=" + std::to_string(o[b]) + ", offsets[" +
          std::to_string(b + 1) + "]=" + std::to_string(o[b + 1]));
    }
    if (len > max_sequence) {
      bad("sequence " + std::to_string(b) + " has " + std::to_string(len) +
          " tokens, beyond the limit of " + std::to_string(max_sequence));
    }
  }
  if (o[batch] != tokens) {
    bad("offsets[B=" + std::to_string(batch) + "]=" + std::to_string(o[batch]) +
        " is not the token count T=" + std::to_string(tokens));
  }
}

void token_offsets(const TokenMask& m, int64_t* offsets) {
  offsets[0] = 0;
  for (int64_t b = 0; b < m.batch; ++b) {
    int64_t count = 0;
    for (int64_t s = 0; s < m.seq; ++s) {
      const int64_t v = m.at(b * m.seq + s);
      if (v != 0 && v != 1) {
        throw std::invalid_argument("attention_mask[" + std::to_string(b) + "," +
                                    std::to_string(s) + "] is " + std::to_string(v) +
                                    ": packing needs a mask of 0 (padding) and 1 (token)");
      }
      count += v;
    }
    offsets[b + 1] = offsets[b] + count;
  }
}

void check_offsets_match_mask(const TokenMask& m, const int64_t* offsets, int64_t tokens) {
  if (offsets[0] != 0) {
    throw std::invalid_argument("offsets[0] is " + std::to_string(offsets[0]) + ", not 0");
  }
  int64_t expected = 0;
  for (int64_t b = 0; b < m.batch; ++b) {
    for (int64_t s = 0; s < m.seq; ++s) {
      const int64_t v = m.at(b * m.seq + s);
      if (v != 0 && v != 1) {
        throw std::invalid_argument("attention_mask[" + std::to_string(b) + "," +
                                    std::to_string(s) + "] is " + std::to_string(v) +
                                    ", not 0 or 1");
      }
      expected += v;
    }
    if (offsets[b + 1] != expected) {
      throw std::invalid_argument("offsets are inconsistent with the mask: offsets[" +
                                  std::to_string(b + 1) + "]=" + std::to_string(offsets[b + 1]) +
                                  " but the mask's sequences 0.." + std::to_string(b) +
                                  " hold " + std::to_string(expected) + " tokens");
    }
  }
  if (expected != tokens) {
    throw std::invalid_argument("the mask holds " + std::to_string(expected) +
                                " tokens but the packed tensor has T=" + std::to_string(tokens));
  }
}

void pack_tokens(const float* x, const TokenMask& m, int64_t d, const int64_t* offsets,
                 float* packed, const Runner& runner) {
  auto body = [&](size_t i) {
    const int64_t b = int64_t(i);
    float* out = packed + offsets[b] * d;
    for (int64_t s = 0; s < m.seq; ++s) {
      if (m.at(b * m.seq + s) == 0) continue;
      std::memcpy(out, x + (b * m.seq + s) * d, size_t(d) * sizeof(float));
      out += d;
    }
  };
  run_tasks(runner, size_t(m.batch), body);
}

void unpack_tokens(const float* packed, const TokenMask& m, int64_t d, const int64_t* offsets,
                   float* y, const Runner& runner) {
  auto body = [&](size_t i) {
    const int64_t b = int64_t(i);
    const float* in = packed + offsets[b] * d;
    for (int64_t s = 0; s < m.seq; ++s) {
      float* out = y + (b * m.seq + s) * d;
      if (m.at(b * m.seq + s) == 0) {
        std::memset(out, 0, size_t(d) * sizeof(float));
      } else {
        std::memcpy(out, in, size_t(d) * sizeof(float));
        in += d;
      }
    }
  };
  run_tasks(runner, size_t(m.batch), body);
}

}  // namespace fastonnx
