// RET's KV-cached decode step (model.py: RET.step) as one call from Python.
//
// The same ATen ops on the same shapes as the eager step, so the logits are bitwise the eager
// step's (tests/model/test_cpp_step.py compares them); what it saves is Python's per-op
// overhead (~50 ops a block), the autograd dispatch (InferenceMode), the GIL handoffs around
// every op (the GIL is released once for the whole step), the work every block repeated:
// RoPE's frequencies (once per model), its angles and the attention mask (once per step),
// and, when each row sits in its own slot (a lone call), moving queries to their slots.
// With prefix attention (a float32 model and cache on the CPU) a layer's RoPE, cache writes
// and attention are one pass per row and head (rotate_write_attend): bitwise the same ops
// around prefix_attention, without their small tensors. `decode` runs several steps in one
// call, each row's token chosen and fed back in C++ (its loop breakers and draw: ret_decode.h).
#include <torch/extension.h>

#include "ret_decode.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

using at::Tensor;
using at::indexing::Slice;

// What `decode` gives after a row's last token (model/decoding.py's NO_TOKEN).
constexpr int64_t kNoToken = -2;

// Each row's slot and position as long arrays on the host, checked against a cache
// (S, H, L, D) as index_put_ checks its indices: built once a step, read by every layer's cache
// writes and prefix attention.
// Rows may share a slot at different positions (a draft's rows, `decode`): then every row's
// key and value are written before any row attends (`repeats`).
struct RowIndex {
  Tensor slot, position;
  const int64_t* slot_at;
  const int64_t* position_at;
  bool repeats = false;  // some slot has more than one row

  RowIndex(const Tensor& slots, const Tensor& positions, const Tensor& cache)
      : slot(slots.to(at::kLong).contiguous()), position(positions.to(at::kLong).contiguous()),
        slot_at(slot.data_ptr<int64_t>()), position_at(position.data_ptr<int64_t>()) {
    std::vector<bool> seen(cache.size(0));
    for (int64_t b = 0; b < slot.size(0); ++b) {
      TORCH_CHECK(slot_at[b] >= 0 && slot_at[b] < cache.size(0) && position_at[b] >= 0 &&
                      position_at[b] < cache.size(2),
                  "row ", b, " has slot ", slot_at[b], " and position ", position_at[b],
                  " outside the cache (", cache.size(0), " slots of ", cache.size(2), ")");
      repeats = repeats || seen[slot_at[b]];
      seen[slot_at[b]] = true;
    }
  }
};

// cache[slots[b], :, positions[b]] = x[b, :, 0] for each row b: what index_put_ writes, as plain
// copies (exact, any dtype) where index_put_ costs tens of microseconds a call on the CPU.
// cache (S, H, L, D) with unit stride in D, on the CPU; x (B, H, 1, D).
void write_cache(Tensor& cache, const RowIndex& rows, const Tensor& x) {
  const int64_t B = x.size(0), H = x.size(1), D = x.size(3);
  const auto xc = x.contiguous().to(cache.scalar_type());
  const int64_t* slot_at = rows.slot_at;
  const int64_t* position_at = rows.position_at;
  const int64_t item = cache.element_size();
  const auto* from = static_cast<const char*>(xc.data_ptr());
  auto* to = static_cast<char*>(cache.data_ptr());
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t at_cache =
          slot_at[b] * cache.stride(0) + h * cache.stride(1) + position_at[b] * cache.stride(2);
      std::memcpy(to + at_cache * item, from + (b * H + h) * D * item, D * item);
    }
  }
}

// One row's single-query attention over its own prefix, for one head: qv (D) against the first
// n keys and values (unit stride in D, `key_stride` and `value_stride` between positions) -> out
// (D). `weight` holds at least n floats. Its own order of sums: 8 independent partial sums per
// dot product, so the compiler can vectorise, and one pass each for the softmax and the sum.
// kD: the head's size where it is 16, 32, 64 or 128 (attend_row_for), so that the loops over
// it have constant bounds and the output's kD sums stay in registers across the n values: the
// same products and sums in the same order, so bitwise the same out, ~1.3x faster at D = 32;
// kDynamic: D taken at run time.
constexpr int64_t kDynamic = 0;

// weight[j] = exp(weight[j] - top) for j < n, top their maximum -> 1 / their sum.
inline float softmax_in_place(float* weight, int64_t n, float top) {
  float total = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    weight[j] = std::exp(weight[j] - top);
    total += weight[j];
  }
  return 1.0f / total;
}

template <int64_t kD>
void attend_row(const float* qv, const float* keys, const float* values, int64_t n, int64_t D,
                int64_t key_stride, int64_t value_stride, float scale, float* weight,
                float* out) {
  constexpr int64_t kLanes = 8;
  static_assert(kD % kLanes == 0, "a fixed head size is a multiple of the lanes");
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    const float* key = keys + j * key_stride;
    float lane[kLanes] = {0};
    float dot = 0.0f;
    if constexpr (kD != kDynamic) {  // constant bounds, no remainder: the same sums
      for (int64_t d = 0; d < kD; d += kLanes) {
        for (int64_t l = 0; l < kLanes; ++l) lane[l] += qv[d + l] * key[d + l];
      }
    } else {
      int64_t d = 0;
      for (; d + kLanes <= D; d += kLanes) {
        for (int64_t l = 0; l < kLanes; ++l) lane[l] += qv[d + l] * key[d + l];
      }
      for (; d < D; ++d) dot += qv[d] * key[d];
    }
    for (int64_t l = 0; l < kLanes; ++l) dot += lane[l];
    weight[j] = dot * scale;
    top = std::max(top, weight[j]);
  }
  const float inverse = softmax_in_place(weight, n, top);
  if constexpr (kD != kDynamic) {
    float sum[kD] = {0};
    for (int64_t j = 0; j < n; ++j) {
      const float* value = values + j * value_stride;
      const float w = weight[j];
      for (int64_t d = 0; d < kD; ++d) sum[d] += w * value[d];
    }
    for (int64_t d = 0; d < kD; ++d) out[d] = sum[d] * inverse;
  } else {
    std::fill(out, out + D, 0.0f);
    for (int64_t j = 0; j < n; ++j) {
      const float* value = values + j * value_stride;
      const float w = weight[j];
      for (int64_t d = 0; d < D; ++d) out[d] += w * value[d];
    }
    for (int64_t d = 0; d < D; ++d) out[d] *= inverse;
  }
}

using AttendRow = void (*)(const float*, const float*, const float*, int64_t, int64_t, int64_t,
                           int64_t, float, float*, float*);

#if defined(__x86_64__)
// attend_row<kD> with its eight lanes in one AVX2 register: the same products, sums and
// order (a multiply, then an add: no fused multiply-add), so bitwise the same out, ~1.1-1.2x
// faster. Chosen at run time where the CPU has AVX2 (the extension is built for any x86-64).
template <int64_t kD>
__attribute__((target("avx2"))) void attend_row_avx2(const float* qv, const float* keys,
                                                    const float* values, int64_t n, int64_t,
                                                    int64_t key_stride, int64_t value_stride,
                                                    float scale, float* weight, float* out) {
  constexpr int64_t kVectors = kD / 8;
  __m256 q[kVectors];
  for (int64_t i = 0; i < kVectors; ++i) q[i] = _mm256_loadu_ps(qv + 8 * i);
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    const float* key = keys + j * key_stride;
    __m256 lane = _mm256_setzero_ps();
    for (int64_t i = 0; i < kVectors; ++i) {
      lane = _mm256_add_ps(lane, _mm256_mul_ps(q[i], _mm256_loadu_ps(key + 8 * i)));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, lane);
    float dot = 0.0f;
    for (int64_t l = 0; l < 8; ++l) dot += lanes[l];
    weight[j] = dot * scale;
    top = std::max(top, weight[j]);
  }
  const float inverse = softmax_in_place(weight, n, top);
  __m256 sum[kVectors];
  for (int64_t i = 0; i < kVectors; ++i) sum[i] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const float* value = values + j * value_stride;
    const __m256 w = _mm256_set1_ps(weight[j]);
    for (int64_t i = 0; i < kVectors; ++i) {
      sum[i] = _mm256_add_ps(sum[i], _mm256_mul_ps(w, _mm256_loadu_ps(value + 8 * i)));
    }
  }
  const __m256 scaled = _mm256_set1_ps(inverse);
  for (int64_t i = 0; i < kVectors; ++i) {
    _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(sum[i], scaled));
  }
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif

// Which attend_row kernels attend_row_for may pick: the fastest (kAuto), the fixed-size
// portable ones only (kPortable), or the runtime-size one (kRuntimeSize); the last two are
// for the tests, which compare them bit for bit.
enum class Kernel { kAuto, kPortable, kRuntimeSize };

template <int64_t kD>
AttendRow fixed_size(Kernel kernel) {
#if defined(__x86_64__)
  if (kernel == Kernel::kAuto && cpu_has_avx2()) {
    return attend_row_avx2<kD>;
  }
#endif
  return attend_row<kD>;
}

// attend_row for a head of size D: a fixed-size one where there is one.
AttendRow attend_row_for(int64_t D, Kernel kernel = Kernel::kAuto) {
  if (kernel == Kernel::kRuntimeSize) {
    return attend_row<kDynamic>;
  }
  switch (D) {
    case 16:
      return fixed_size<16>(kernel);
    case 32:
      return fixed_size<32>(kernel);
    case 64:
      return fixed_size<64>(kernel);
    case 128:
      return fixed_size<128>(kernel);
    default:
      return attend_row<kDynamic>;
  }
}

// Single-query attention that reads only each row's own prefix: row b's query (H, D) against
// positions 0..positions[b] of cache slot slots[b]. q (B, H, 1, D); k_cache, v_cache (S, H, L, D)
// with unit stride in D; float32 on the CPU -> y (B, H, 1, D). Where SDPA over a padded batch
// reads every slot up to the furthest row's position, this reads each row's own prefix once
// (half the cache a step, for rows spread evenly) and needs no mask and no moving of queries to
// their slots. It rounds differently from SDPA (its own order of sums), so its outputs are
// measured for quality rather than bitwise the eager step's. The caller has checked the
// shapes (see prefix_attention below).
Tensor attend_prefixes(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                       const RowIndex& rows, Kernel kernel = Kernel::kAuto) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), L = k_cache.size(2);
  const auto qc = q.contiguous();
  auto y = at::empty({B, H, 1, D}, qc.options());
  const float* q_at = qc.data_ptr<float>();
  const float* k_at = k_cache.data_ptr<float>();
  const float* v_at = v_cache.data_ptr<float>();
  float* y_at = y.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const AttendRow attend = attend_row_for(D, kernel);
  at::parallel_for(0, B * H, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> weight(L);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H, slot = rows.slot_at[b];
      attend(q_at + i * D, k_at + slot * k_cache.stride(0) + h * k_cache.stride(1),
             v_at + slot * v_cache.stride(0) + h * v_cache.stride(1), rows.position_at[b] + 1,
             D, k_cache.stride(2), v_cache.stride(2), scale, weight.data(), y_at + i * D);
    }
  });
  return y;
}

// The middle of the attention sublayer for a float32 cache on the CPU, one pass per row and
// head: from the fused projection qkv (B, 1, 3C), rotate the row's query and key by RoPE
// (apply_rope's rotate-half, the same float32 products and sums), write its key and value to
// its slot at its position, and attend over its prefix (attend_row) -> y (B, 1, C), heads side
// by side. The same arithmetic as rotating with ATen ops, write_cache and attend_prefixes, so
// the same logits, without their ~30 small ops and copies a layer. cos, sin (B, 1, 1, D/2)
// float32, contiguous.
Tensor rotate_write_attend(const Tensor& qkv, const Tensor& cos, const Tensor& sin,
                           Tensor& k_cache, Tensor& v_cache, const RowIndex& rows,
                           int64_t H) {
  const int64_t B = qkv.size(0), C = qkv.size(2) / 3, D = C / H, half = D / 2;
  const int64_t L = k_cache.size(2);
  const auto x = qkv.contiguous();
  auto y = at::empty({B, 1, C}, x.options());
  const float* x_at = x.data_ptr<float>();
  const float* cos_at = cos.data_ptr<float>();
  const float* sin_at = sin.data_ptr<float>();
  float* k_at = k_cache.data_ptr<float>();
  float* v_at = v_cache.data_ptr<float>();
  float* y_at = y.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const AttendRow attend = attend_row_for(D);
  // Rotate row b's query (into q) and key, and write its key and value at its position.
  auto rotate_write = [&](int64_t b, int64_t h, float* q) {
    const int64_t slot = rows.slot_at[b], position = rows.position_at[b];
    const float* qv = x_at + b * 3 * C + h * D;
    const float* kv = qv + C;
    const float* vv = qv + 2 * C;
    const float* c = cos_at + b * half;
    const float* s = sin_at + b * half;
    float* key = k_at + slot * k_cache.stride(0) + h * k_cache.stride(1) +
                 position * k_cache.stride(2);
    for (int64_t d = 0; d < half; ++d) {  // x1 * cos - x2 * sin, x1 * sin + x2 * cos
      q[d] = qv[d] * c[d] - qv[d + half] * s[d];
      q[d + half] = qv[d] * s[d] + qv[d + half] * c[d];
      key[d] = kv[d] * c[d] - kv[d + half] * s[d];
      key[d + half] = kv[d] * s[d] + kv[d + half] * c[d];
    }
    std::memcpy(v_at + slot * v_cache.stride(0) + h * v_cache.stride(1) +
                    position * v_cache.stride(2),
                vv, D * sizeof(float));
  };
  // Row b's query attends over its slot's positions up to its own.
  auto attend_at = [&](int64_t b, int64_t h, const float* q, float* weight) {
    const int64_t slot = rows.slot_at[b];
    attend(q, k_at + slot * k_cache.stride(0) + h * k_cache.stride(1),
           v_at + slot * v_cache.stride(0) + h * v_cache.stride(1), rows.position_at[b] + 1, D,
           k_cache.stride(2), v_cache.stride(2), scale, weight, y_at + b * C + h * D);
  };
  if (rows.repeats) {  // a slot's later rows read what its earlier rows write: write first
    std::vector<float> queries(B * H * D);
    for (int64_t i = 0; i < B * H; ++i) {
      rotate_write(i / H, i % H, queries.data() + i * D);
    }
    at::parallel_for(0, B * H, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> weight(L);
      for (int64_t i = begin; i < end; ++i) {
        attend_at(i / H, i % H, queries.data() + i * D, weight.data());
      }
    });
    return y;
  }
  at::parallel_for(0, B * H, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> weight(L), q(D);
    for (int64_t i = begin; i < end; ++i) {
      rotate_write(i / H, i % H, q.data());
      attend_at(i / H, i % H, q.data(), weight.data());
    }
  });
  return y;
}

// attend_prefixes from Python (the tests compare it with SDPA), its inputs checked; kernel:
// "auto" (what the step runs), "portable" (the fixed-size kernels without AVX2) or "runtime"
// (the runtime-size kernel whatever the head's size): the tests compare them bit for bit.
Tensor prefix_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                        const Tensor& slots, const Tensor& positions, const std::string& kernel) {
  TORCH_CHECK(kernel == "auto" || kernel == "portable" || kernel == "runtime",
              "prefix_attention: kernel must be auto, portable or runtime, got ", kernel);
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kFloat &&
                  k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat,
              "prefix_attention: float32 CPU tensors only");
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && k_cache.dim() == 4 && v_cache.dim() == 4,
              "prefix_attention: q (B, H, 1, D), caches (S, H, L, D)");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "prefix_attention: the caches need unit stride in D");
  TORCH_CHECK(k_cache.size(1) == q.size(1) && k_cache.size(3) == q.size(3) &&
                  v_cache.sizes() == k_cache.sizes(),
              "prefix_attention: q and the caches disagree on heads or head size");
  const Kernel chosen = kernel == "portable" ? Kernel::kPortable
                        : kernel == "runtime"  ? Kernel::kRuntimeSize
                                               : Kernel::kAuto;
  return attend_prefixes(q, k_cache, v_cache, RowIndex(slots, positions, k_cache), chosen);
}

// The conditioning rows of a decode call, in one call that keeps the GIL: the joiners'
// vectors first (embeddings (J, E) -> layer_norm(embeddings @ bridge_w.T), the ATen ops of
// RET.condition, so the same bits) written to their slots (J,) of cond_cache (S, C);
// -> cond_cache's rows at slots (B,) long, (B, C). Tens of microseconds: releasing the GIL
// for them would let a busy event loop's thread take it, and the worker wait longer than that
// to get it back (each torch op called from Python does so).
Tensor condition_rows(const Tensor& cond_cache, const Tensor& slots,
                      const std::optional<Tensor>& embeddings,
                      const std::optional<Tensor>& embedding_slots, const Tensor& bridge_w,
                      const Tensor& ln_w, const Tensor& ln_b, double eps) {
  c10::InferenceMode inference;
  TORCH_CHECK(embeddings.has_value() == embedding_slots.has_value(),
              "condition_rows: embeddings and embedding_slots go together");
  if (embeddings) {
    TORCH_CHECK(embeddings->dim() == 2 && embedding_slots->numel() == embeddings->size(0),
                "condition_rows: one slot per embedding row");
    const auto cond = at::layer_norm(at::linear(embeddings->to(bridge_w.scalar_type()), bridge_w),
                                     {bridge_w.size(0)}, ln_w, ln_b, eps);
    cond_cache.index_put_({*embedding_slots}, cond);
  }
  return cond_cache.index({slots});
}

struct BlockWeights {
  Tensor cond_proj;  // undefined unless conditioning == "layer"
  Tensor ln_1_w, ln_1_b, qkv, attn_proj, ln_2_w, ln_2_b, fc, mlp_proj;
};

class RETStep {
 public:
  // blocks: each block's ln_1 weight and bias, attn.qkv, attn.proj, ln_2 weight and bias,
  // mlp.fc, mlp.proj; cond_projs: one per block with conditioning "layer", else none.
  // prefix: attend with prefix_attention where the cache is float32 on the CPU (else SDPA).
  RETStep(Tensor wte, const std::vector<std::vector<Tensor>>& blocks,
          const std::vector<Tensor>& cond_projs, Tensor ln_f_w, Tensor ln_f_b, int64_t n_head,
          double rope_base, double eps, bool prefix)
      : wte_(std::move(wte)), ln_f_w_(std::move(ln_f_w)), ln_f_b_(std::move(ln_f_b)),
        n_head_(n_head), eps_(eps), prefix_(prefix) {
    TORCH_CHECK(!blocks.empty(), "RETStep needs at least one block");
    TORCH_CHECK(cond_projs.empty() || cond_projs.size() == blocks.size(),
                "cond_projs: one per block or none, got ", cond_projs.size());
    for (size_t i = 0; i < blocks.size(); ++i) {
      const auto& b = blocks[i];
      TORCH_CHECK(b.size() == 8, "a block takes 8 tensors, got ", b.size());
      blocks_.push_back({cond_projs.empty() ? Tensor() : cond_projs[i], b[0], b[1], b[2], b[3],
                         b[4], b[5], b[6], b[7]});
    }
    const int64_t C = wte_.size(1);
    TORCH_CHECK(n_head > 0 && C % n_head == 0 && (C / n_head) % 2 == 0,
                "n_head must divide n_embd into even head dims");
    // apply_rope's inverse frequencies: base ** (-arange(D/2) / (D/2)), float32
    const int64_t half = C / n_head / 2;
    inv_freq_ = at::pow(
        rope_base, at::neg(at::arange(half, wte_.options().dtype(at::kFloat))).div(half));
  }

  // cond (B, C); tokens, positions, slots (B,) long; k, v (n_layer, S, H, L, D), written in
  // place; length = max(positions) + 1, span = max(slots) + 1 -> logits (B, V). history
  // (S, L) long, if given: each slot's generated tokens, where row b's input token is written
  // at position - 1 (what `decode`'s loop breakers read).
  Tensor step(const Tensor& cond, const Tensor& tokens, const Tensor& positions,
              const Tensor& k_cache, const Tensor& v_cache, const Tensor& slots, int64_t length,
              int64_t span, const std::optional<Tensor>& history) const {
    pybind11::gil_scoped_release no_gil;
    c10::InferenceMode inference;
    if (history) {
      write_history(*history, slots, positions, tokens);
    }
    return forward(cond, tokens, positions, k_cache, v_cache, slots, length, span);
  }

  // Up to `steps` decode steps in one call, each row's token fed back as its next input: what
  // `sample_batch` picks a step at a time, with the same ATen ops on the same (B, V) tensors,
  // so the same tokens and log-probabilities to the bit. Per row (B,): eos_bias (float32,
  // added to logit eos_id), penalty (float32, 1 = off) over the tokens that would repeat one
  // of the row's penalty_n-grams, ban_n (long, 0 = off): the tokens that would repeat one of
  // its ban_n-grams are banned (both read history (S, L) long, each slot's generated tokens,
  // written here); temperature (float32, what the draw divides by: 1 for greedy rows), greedy
  // (bool), seeded (bool) and keys (long): a seeded row's u hashes its key and its position
  // (counter_uniforms); kth_index (B, 1) long and top_p (B, 1) float32, each if some row
  // uses it: top-k and nucleus filtering as `filter` takes them; uniforms (steps, B)
  // float32, if given: the other sampled rows' u at each step. A sampled row that cannot
  // draw gets token -1 and a NaN log-probability (its next input is token 0). The caller
  // keeps every row's position + steps within the cache.
  //
  // Speculation (draft_tokens > 0, prefix attention only): at each step a greedy row may
  // also run up to draft_tokens guessed next tokens (`ngram_draft` of its history, n =
  // draft_ngram) as rows of the same slot at the following positions, no more than its
  // room (B,) long (tokens it may still take: 0, it never drafts; none: unbounded) allows or
  // than keeps the call's later steps within the cache. Each guess that equals the token the
  // row picks at the position before it is kept, and so is the token picked after it: a row
  // gains one token a step for each guess kept, the same tokens it would pick a step at a
  // time (a row's logits do not depend on the rows beside it). Then a row may give more
  // tokens than steps, and rows give different numbers of them.
  // -> tokens (T, B) long, logprobs (T, B) float32: row b's tokens in order, then kNoToken
  // (NaN) once it has none (T = steps without speculation).
  std::tuple<Tensor, Tensor> decode(const Tensor& cond, const Tensor& tokens,
                                    const Tensor& positions, const Tensor& k_cache,
                                    const Tensor& v_cache, const Tensor& slots, int64_t span,
                                    const Tensor& history, const Tensor& eos_bias,
                                    const Tensor& penalty, const Tensor& penalty_n,
                                    const Tensor& ban_n, int64_t eos_id,
                                    const Tensor& temperature, const Tensor& greedy,
                                    const Tensor& seeded, const Tensor& keys,
                                    const std::optional<Tensor>& kth_index,
                                    const std::optional<Tensor>& top_p,
                                    const std::optional<Tensor>& uniforms, int64_t steps,
                                    int64_t draft_tokens, int64_t draft_ngram,
                                    const std::optional<Tensor>& room) const {
    pybind11::gil_scoped_release no_gil;
    c10::InferenceMode inference;
    TORCH_CHECK(steps >= 1, "decode: steps must be >= 1, got ", steps);
    TORCH_CHECK(draft_tokens >= 0 && draft_ngram >= 1,
                "decode: draft_tokens must be >= 0 and draft_ngram >= 1");
    check_history(history);
    const int64_t B = tokens.size(0);
    const auto bias = eos_bias.to(at::kFloat).contiguous();
    const auto pen = penalty.to(at::kFloat).contiguous();
    const auto pen_n = penalty_n.to(at::kLong).contiguous();
    const auto ban = ban_n.to(at::kLong).contiguous();
    const auto is_greedy = greedy.to(at::kBool).contiguous();
    const auto is_seeded = seeded.to(at::kBool).contiguous();
    const auto key = keys.to(at::kLong).contiguous();
    for (const auto* t : {&bias, &pen, &pen_n, &ban, &is_greedy, &is_seeded, &key}) {
      TORCH_CHECK(t->numel() == B, "decode: every per-row argument needs one entry per row");
    }
    const bool all_greedy = is_greedy.all().item<bool>();
    const bool any_greedy = is_greedy.any().item<bool>();
    const auto sampled = is_greedy.logical_not();
    // a mixed batch's sampled rows, the ones it draws (`draw` below)
    const auto drawn = any_greedy && !all_greedy ? sampled.nonzero().select(1, 0) : Tensor();
    const bool any_seeded = sampled.logical_and(is_seeded).any().item<bool>();
    const bool any_unseeded = sampled.logical_and(is_seeded.logical_not()).any().item<bool>();
    TORCH_CHECK(!any_unseeded || (uniforms && uniforms->dim() == 2 &&
                                  uniforms->size(0) >= steps && uniforms->size(1) == B),
                "decode: unseeded sampled rows need uniforms (steps, B)");
    // sample_batch's temperature: (B, 1), clamped so that a t float32 rounds to 0 divides
    const auto temp = temperature.to(at::kFloat).unsqueeze(1).clamp_min(
        std::numeric_limits<float>::min());
    // the rows are read and advanced on the host (history, which the loop breakers read, is
    // on the CPU too)
    auto token = tokens.to(at::kCPU, at::kLong).clone();
    auto position = positions.to(at::kCPU, at::kLong).clone();
    const auto slot = slots.to(at::kCPU, at::kLong).contiguous();
    const int64_t L = history.size(1);
    const bool drafting = draft_tokens > 0 && any_greedy && prefix_path(cond, k_cache, v_cache);
    std::vector<int64_t> left(B, std::numeric_limits<int64_t>::max());  // each row's room
    if (room) {
      TORCH_CHECK(room->numel() == B, "decode: room needs one entry per row");
      const auto given = room->to(at::kLong).contiguous();
      std::copy(given.data_ptr<int64_t>(), given.data_ptr<int64_t>() + B, left.begin());
    }
    std::vector<std::vector<int64_t>> out_token(B);
    std::vector<std::vector<float>> out_logprob(B);
    for (int64_t j = 0; j < steps; ++j) {
      write_history(history, slot, position, token);
      // The rows of this step: every row, then each greedy row's draft rows.
      // a draft row's row, its input token, and which of the row's guesses it is (1, 2, ...)
      std::vector<int64_t> owner, drafted, guess;
      if (drafting) {
        const int64_t* generated = history.data_ptr<int64_t>();
        for (int64_t b = 0; b < B; ++b) {
          const int64_t p = position.data_ptr<int64_t>()[b];
          // guesses fit where every later step of the call still has a position in the cache
          const int64_t fits = std::min(L - 1 - (steps - 1 - j) - p, left[b] - 1);
          if (!is_greedy.data_ptr<bool>()[b] || fits < 1) {
            continue;
          }
          const int64_t s = slot.data_ptr<int64_t>()[b];
          int64_t k = 0;
          for (const int64_t t : ngram_draft(generated + s * L, p, draft_ngram,
                                             std::min(draft_tokens, fits))) {
            owner.push_back(b);
            drafted.push_back(t);
            guess.push_back(++k);
          }
        }
      }
      const int64_t R = B + static_cast<int64_t>(owner.size());
      Tensor row_of, step_token = token, step_position = position, step_slot = slot;
      if (R > B) {
        row_of = at::empty({R}, at::kLong);
        auto draft_token = at::empty({R - B}, at::kLong);
        auto draft_position = at::empty({R - B}, at::kLong);
        int64_t* row_at = row_of.data_ptr<int64_t>();
        for (int64_t b = 0; b < B; ++b) {
          row_at[b] = b;
        }
        for (int64_t r = 0; r < R - B; ++r) {
          row_at[B + r] = owner[r];
          draft_token.data_ptr<int64_t>()[r] = drafted[r];
          draft_position.data_ptr<int64_t>()[r] = position.data_ptr<int64_t>()[owner[r]] + guess[r];
        }
        step_token = at::cat({token, draft_token});
        step_position = at::cat({position, draft_position});
        step_slot = slot.index_select(0, row_of);
        write_history(history, step_slot.narrow(0, B, R - B), draft_position, draft_token);
      }
      const auto step_cond = R > B ? cond.index_select(0, row_of) : cond;
      const int64_t length = step_position.max().item<int64_t>() + 1;
      const auto logits = forward(step_cond, step_token, step_position, k_cache, v_cache,
                                  step_slot, length, span)
                              .to(at::kFloat);
      const auto row_param = [&](const Tensor& t) { return R > B ? t.index_select(0, row_of) : t; };
      const auto controlled = control(logits, history, step_slot, step_position, row_param(bias),
                                      row_param(pen), row_param(pen_n), row_param(ban), eos_id);
      Tensor chosen;  // (R,): every row's token, a draft row's its argmax
      if (all_greedy) {
        chosen = argmax_rows(controlled);
      } else {
        const auto own = controlled.narrow(0, 0, B);
        Tensor u;  // (B,): sample_batch's uniforms at this step
        if (!any_unseeded) {
          u = counter_uniforms(key, position);
        } else if (!any_seeded) {
          u = uniforms->select(0, j);
        } else {
          u = at::where(is_seeded, counter_uniforms(key, position), uniforms->select(0, j));
        }
        // A mixed batch: the greedy rows' argmax, the sampled rows' draw (a row's draw reads
        // its own logits only, so drawing the sampled rows alone picks the same tokens).
        if (any_greedy) {
          const auto pick = [&](const std::optional<Tensor>& t) -> std::optional<Tensor> {
            return t ? std::optional<Tensor>(t->index_select(0, drawn)) : std::nullopt;
          };
          chosen = argmax_rows(own);
          chosen.index_put_({drawn}, draw(own.index_select(0, drawn), temp.index_select(0, drawn),
                                          u.index_select(0, drawn), pick(kth_index), pick(top_p)));
        } else {
          chosen = draw(own, temp, u, kth_index, top_p);
        }
        if (R > B) {
          chosen = at::cat({chosen, argmax_rows(controlled.narrow(0, B, R - B))});
        }
      }
      auto logprob =
          at::log_softmax(logits, -1).gather(1, chosen.clamp_min(0).unsqueeze(1)).select(1, 0);
      if (!all_greedy) {
        logprob = logprob.masked_fill(chosen.lt(0), NAN);
      }
      chosen = chosen.to(at::kCPU).contiguous();
      logprob = logprob.to(at::kCPU).contiguous();
      const int64_t* chosen_at = chosen.data_ptr<int64_t>();
      const float* logprob_at = logprob.data_ptr<float>();
      // Each row's token, then its guesses' tokens while each guess was right.
      std::vector<int64_t> count(B, 1);
      for (int64_t b = 0; b < B; ++b) {
        out_token[b].push_back(chosen_at[b]);
        out_logprob[b].push_back(logprob_at[b]);
      }
      for (int64_t r = 0; r < R - B; ++r) {
        const int64_t b = owner[r];
        // guess[r] - 1 guesses of the row come before this one: each was right if the row
        // has a token for each; then this one is right if the row's last token is it
        if (count[b] != guess[r] || out_token[b].back() == eos_id ||
            out_token[b].back() != drafted[r]) {
          continue;
        }
        out_token[b].push_back(chosen_at[B + r]);
        out_logprob[b].push_back(logprob_at[B + r]);
        ++count[b];
      }
      for (int64_t b = 0; b < B; ++b) {
        left[b] -= count[b];
        position.data_ptr<int64_t>()[b] += count[b];
        // a row that could not draw: ended, its input is 0
        token.data_ptr<int64_t>()[b] = std::max<int64_t>(out_token[b].back(), 0);
      }
    }
    size_t most = 0;
    for (const auto& t : out_token) {
      most = std::max(most, t.size());
    }
    const int64_t T = static_cast<int64_t>(most);
    auto out_tokens =
        at::full({T, B}, kNoToken, tokens.options().dtype(at::kLong).device(at::kCPU));
    auto out_logprobs = at::full({T, B}, NAN, cond.options().dtype(at::kFloat).device(at::kCPU));
    int64_t* tokens_at = out_tokens.data_ptr<int64_t>();
    float* logprobs_at = out_logprobs.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      for (size_t t = 0; t < out_token[b].size(); ++t) {
        tokens_at[t * B + b] = out_token[b][t];
        logprobs_at[t * B + b] = out_logprob[b][t];
      }
    }
    return {out_tokens.to(tokens.device()), out_logprobs.to(cond.device())};
  }

 private:
  // Whether `forward` attends with prefix_attention (what a draft's rows need: rows sharing a
  // slot): a float32 cache on the CPU, unit stride in D.
  bool prefix_path(const Tensor& cond, const Tensor& k_cache, const Tensor& v_cache) const {
    return prefix_ && k_cache.device().is_cpu() && k_cache.scalar_type() == at::kFloat &&
           cond.scalar_type() == at::kFloat && k_cache.stride(4) == 1 && v_cache.stride(4) == 1;
  }

  Tensor forward(const Tensor& cond, const Tensor& tokens, const Tensor& positions,
                 const Tensor& k_cache, const Tensor& v_cache, const Tensor& slots,
                 int64_t length, int64_t span) const {
    TORCH_CHECK(k_cache.size(0) == static_cast<int64_t>(blocks_.size()),
                "the cache has ", k_cache.size(0), " layers, the model ", blocks_.size());
    // What every block shares: RoPE's cos and sin at the rows' positions, (B, 1, 1, D/2),
    // and for SDPA which cached positions each slot's query sees, (S, 1, 1, L). When row i is
    // in slot i for every row (a lone call: slot 0), queries need no moving to their slots.
    // On the CPU the rows are read on the host once: the cache writes are plain copies, and
    // prefix attention (a float32 cache) reads them.
    std::optional<RowIndex> rows;
    if (k_cache.device().is_cpu() && slots.device().is_cpu() && positions.device().is_cpu() &&
        k_cache.stride(4) == 1 && v_cache.stride(4) == 1) {
      rows.emplace(slots, positions, k_cache.select(0, 0));
    }
    const bool prefix = rows && prefix_path(cond, k_cache, v_cache);
    const bool dense = !prefix && in_own_slots(slots, span);
    const auto angles = positions.unsqueeze(1).to(at::kFloat).unsqueeze(-1) * inv_freq_;
    const auto cos = angles.cos().unsqueeze(-3), sin = angles.sin().unsqueeze(-3);
    Tensor visible;  // undefined with prefix_attention, which needs no mask
    if (!prefix) {
      auto position_at_slot = positions;
      if (!dense) {
        position_at_slot = positions.new_zeros({span});
        position_at_slot.index_put_({slots}, positions);
      }
      visible = at::arange(length, positions.options())
                    .unsqueeze(0)
                    .le(position_at_slot.unsqueeze(1))
                    .unsqueeze(1)
                    .unsqueeze(1);
    }

    const auto first = positions.eq(0);
    const auto prev = at::embedding(wte_, tokens.masked_fill(first, 0));  // (B, C)
    auto x = at::where(first.unsqueeze(1), cond, prev + cond).unsqueeze(1);  // (B, 1, C)
    const int64_t C = x.size(2);
    for (size_t layer = 0; layer < blocks_.size(); ++layer) {
      const auto& w = blocks_[layer];
      if (w.cond_proj.defined()) {
        x = x + at::linear(cond, w.cond_proj).unsqueeze(1);
      }
      const auto h = at::layer_norm(x, {C}, w.ln_1_w, w.ln_1_b, eps_);
      x = x + attention(h, w, positions, cos, sin, k_cache.select(0, layer),
                        v_cache.select(0, layer), slots, visible, length, span, dense,
                        rows ? &*rows : nullptr, prefix);
      const auto g = at::layer_norm(x, {C}, w.ln_2_w, w.ln_2_b, eps_);
      x = x + at::linear(at::gelu(at::linear(g, w.fc)), w.mlp_proj);
    }
    const auto last = x.select(1, 0);  // (B, C)
    return at::matmul(at::layer_norm(last, {C}, ln_f_w_, ln_f_b_, eps_), wte_.t());
  }

  // Whether row i's slot is i for every row and there are no other slots (read on the host:
  // only for CPU tensors, where that costs no device sync).
  static bool in_own_slots(const Tensor& slots, int64_t span) {
    if (!slots.device().is_cpu() || slots.size(0) != span) {
      return false;
    }
    const auto owned = slots.to(at::kLong).contiguous();
    const int64_t* slot = owned.data_ptr<int64_t>();
    for (int64_t i = 0; i < span; ++i) {
      if (slot[i] != i) {
        return false;
      }
    }
    return true;
  }

  // CausalSelfAttention.step on h (B, 1, C).
  Tensor attention(const Tensor& h, const BlockWeights& w, const Tensor& positions,
                   const Tensor& cos, const Tensor& sin, Tensor k_cache, Tensor v_cache,
                   const Tensor& slots, const Tensor& visible, int64_t length, int64_t span,
                   bool dense, const RowIndex* rows, bool prefix) const {
    const int64_t B = h.size(0), C = h.size(2), H = n_head_, D = C / H, half = D / 2;
    if (prefix) {
      const auto y = rotate_write_attend(at::linear(h, w.qkv), cos, sin, k_cache, v_cache,
                                         *rows, H);
      return at::linear(y, w.attn_proj);
    }
    const auto qkv = at::linear(h, w.qkv).split(C, 2);
    const auto q0 = qkv[0].view({B, 1, H, D}).transpose(1, 2);  // (B, H, 1, D)
    const auto k0 = qkv[1].view({B, 1, H, D}).transpose(1, 2);
    const auto v = qkv[2].view({B, 1, H, D}).transpose(1, 2);
    // apply_rope on q and k together, (B, 2H, 1, D), rotate-half in float32
    const auto both = at::cat({q0, k0}, 1);
    const auto xf = both.to(at::kFloat);
    const auto x1 = xf.slice(-1, 0, half), x2 = xf.slice(-1, half);
    const auto rotated =
        at::cat({x1 * cos - x2 * sin, x1 * sin + x2 * cos}, -1).to(both.scalar_type());
    const auto q = rotated.slice(1, 0, H), k = rotated.slice(1, H);
    if (rows != nullptr) {
      write_cache(k_cache, *rows, k);
      write_cache(v_cache, *rows, v);
    } else {
      k_cache.index_put_({slots, Slice(), positions}, k.select(2, 0));
      v_cache.index_put_({slots, Slice(), positions}, v.select(2, 0));
    }
    const auto keys = k_cache.slice(0, 0, span).slice(2, 0, length);  // (S, H, L, D)
    const auto values = v_cache.slice(0, 0, span).slice(2, 0, length);
    Tensor y;  // (B, H, 1, D)
    if (dense) {
      y = at::scaled_dot_product_attention(q, keys, values, visible);
    } else {
      auto q_at_slot = q.new_zeros({span, H, 1, D});
      q_at_slot.index_put_({slots}, q);
      y = at::scaled_dot_product_attention(q_at_slot, keys, values, visible).index({slots});
    }
    return at::linear(y.transpose(1, 2).reshape({B, 1, C}), w.attn_proj);
  }

  Tensor wte_, ln_f_w_, ln_f_b_, inv_freq_;
  std::vector<BlockWeights> blocks_;
  int64_t n_head_;
  double eps_;
  bool prefix_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<RETStep>(m, "RETStep")
      .def(pybind11::init<Tensor, const std::vector<std::vector<Tensor>>&,
                          const std::vector<Tensor>&, Tensor, Tensor, int64_t, double, double,
                          bool>())
      .def("step", &RETStep::step)
      .def("decode", &RETStep::decode);
  m.def("condition_rows", &condition_rows,
        "Joiners' conditioning into their slots of cond_cache, then the rows at slots.",
        pybind11::arg("cond_cache"), pybind11::arg("slots"), pybind11::arg("embeddings"),
        pybind11::arg("embedding_slots"), pybind11::arg("bridge_w"), pybind11::arg("ln_w"),
        pybind11::arg("ln_b"), pybind11::arg("eps"));
  m.def("loop_breaker_masks", &loop_breaker_masks,
        "The tokens each row's repetition penalty and no-repeat ban apply to, from history.");
  m.def("argmax_rows", &argmax_rows, "torch.argmax(x, -1) of a (R, V) float32 CPU tensor.");
  m.def("descending_values", &descending_values,
        "Each row of a (B, V) float32 CPU tensor sorted in descending order, NaNs first.");
  m.def(
      "ngram_draft",
      [](const std::vector<int64_t>& generated, int64_t n, int64_t m) {
        return ngram_draft(generated.data(), static_cast<int64_t>(generated.size()), n, m);
      },
      "The n-gram draft decode speculates on: up to m guesses of what follows generated.",
      pybind11::arg("generated"), pybind11::arg("n"), pybind11::arg("m"));
  m.def("prefix_attention", &prefix_attention,
        "Single-query attention over each row's own cached prefix (float32, CPU).",
        pybind11::arg("q"), pybind11::arg("k_cache"), pybind11::arg("v_cache"),
        pybind11::arg("slots"), pybind11::arg("positions"),
        pybind11::arg("kernel") = "auto");
}
