// Decoding helpers of RET's C++ step (ret_step.cpp): each slot's token history, the loop
// breakers read from it (no-repeat n-grams, the repetition penalty, the EOS bias), and the draw
// of a sampled row, each as model/sampling.py and model/generation.py do it (the same ATen ops
// where a tensor is involved), so that several steps in one call give the tokens a step at a
// time gives. Included by ret_step.cpp only.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;

// Each slot's token history: (S, L) long, contiguous, on the CPU.
void check_history(const Tensor& history) {
  TORCH_CHECK(history.scalar_type() == at::kLong && history.dim() == 2 &&
                  history.is_contiguous() && history.device().is_cpu(),
              "history must be a contiguous (S, L) long CPU tensor");
}

// Row b's slot s and its count of generated tokens p within the history (S, L).
void check_row(int64_t b, int64_t s, int64_t p, const Tensor& history) {
  const int64_t S = history.size(0), L = history.size(1);
  TORCH_CHECK(s >= 0 && s < S && p >= 0 && p <= L, "row ", b, " has slot ", s, " and position ",
              p, " outside the history (", S, " x ", L, ")");
}

// Calls mark(t) for every token t that followed the row's last n - 1 generated tokens earlier
// in its history h[0, p) (NGramBlocker.banned: the n-grams wholly inside h; n = 1: every
// token of h). A token may be marked more than once.
template <typename Mark>
void followers(const int64_t* h, int64_t p, int64_t n, Mark&& mark) {
  if (p < n - 1) {
    return;
  }
  const int64_t* suffix = h + p - (n - 1);
  for (int64_t i = 0; i + n <= p; ++i) {
    if (std::equal(h + i, h + i + n - 1, suffix)) {
      mark(h[i + n - 1]);
    }
  }
}

// For each row b, in slot slot[b] with position[b] tokens generated: on_repeated(b, t) once
// for each token its repetition penalty applies to (the followers of its last
// penalty_n[b] - 1 tokens; penalty_n[b] 0: no penalty), on_banned(b, t) for each token its
// no-repeat ban forbids (those of its last ban_n[b] - 1; 0: no ban): what
// RepetitionTracker.repeated and NGramBlocker.banned give. Tokens outside [0, V) are skipped.
template <typename OnRepeated, typename OnBanned>
void breaker_tokens(const Tensor& history, const Tensor& slot, const Tensor& position,
                    const int64_t* penalty_n, const int64_t* ban_n, int64_t V,
                    OnRepeated&& on_repeated, OnBanned&& on_banned) {
  const int64_t L = history.size(1);
  const int64_t* h_at = history.data_ptr<int64_t>();
  std::vector<uint8_t> marked(V, 0);
  std::vector<int64_t> touched;
  for (int64_t b = 0; b < slot.numel(); ++b) {
    const int64_t s = slot.data_ptr<int64_t>()[b], p = position.data_ptr<int64_t>()[b];
    check_row(b, s, p, history);
    const int64_t* h = h_at + s * L;
    if (penalty_n[b] > 0) {
      followers(h, p, penalty_n[b], [&](int64_t t) {
        if (t >= 0 && t < V && !marked[t]) {
          marked[t] = 1;
          touched.push_back(t);
          on_repeated(b, t);
        }
      });
      for (const int64_t t : touched) marked[t] = 0;
      touched.clear();
    }
    if (ban_n[b] > 0) {
      followers(h, p, ban_n[b], [&](int64_t t) {
        if (t >= 0 && t < V) on_banned(b, t);
      });
    }
  }
}

// The tokens each row's loop breakers apply to, read from history (S, L) long (each slot's
// generated tokens, the C++ step writes them): for row b in slot slots[b] with positions[b]
// tokens generated, repeated[b] marks the followers of its last penalty_n[b] - 1 tokens
// (where penalize[b]), banned[b] those of its last ban_n[b] - 1 (where ban_n[b] > 0): what
// RepetitionTracker.repeated and NGramBlocker.banned give. -> (repeated, banned) (B, V) bool.
std::tuple<Tensor, Tensor> loop_breaker_masks(const Tensor& history, const Tensor& slots,
                                              const Tensor& positions, const Tensor& penalize,
                                              const Tensor& penalty_n, const Tensor& ban_n,
                                              int64_t V) {
  check_history(history);
  const auto slot = slots.to(at::kLong).contiguous();
  const auto position = positions.to(at::kLong).contiguous();
  const auto pen = penalize.to(at::kBool).contiguous();
  const auto pen_n = penalty_n.to(at::kLong).contiguous();
  const auto ban = ban_n.to(at::kLong).contiguous();
  const int64_t B = slot.numel();
  TORCH_CHECK(position.numel() == B && pen.numel() == B && pen_n.numel() == B &&
                  ban.numel() == B,
              "loop_breaker_masks: one slot, position, penalize, penalty_n and ban_n per row");
  std::vector<int64_t> penalized_n(B);  // 0 where the row has no penalty
  for (int64_t b = 0; b < B; ++b) {
    penalized_n[b] = pen.data_ptr<bool>()[b] ? pen_n.data_ptr<int64_t>()[b] : 0;
  }
  auto repeated = at::zeros({B, V}, at::kBool), banned = at::zeros({B, V}, at::kBool);
  bool* repeated_at = repeated.data_ptr<bool>();
  bool* banned_at = banned.data_ptr<bool>();
  breaker_tokens(
      history, slot, position, penalized_n.data(), ban.data_ptr<int64_t>(), V,
      [&](int64_t b, int64_t t) { repeated_at[b * V + t] = true; },
      [&](int64_t b, int64_t t) { banned_at[b * V + t] = true; });
  return {repeated, banned};
}

// A float32's bits as a key whose unsigned order is the floats' descending order (-0 after
// +0; NaNs apart), and back.
inline uint32_t descending_key(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return ~((bits & 0x80000000u) ? ~bits : (bits | 0x80000000u));
}

inline float from_descending_key(uint32_t key) {
  const uint32_t ascending = ~key;
  const uint32_t bits = (ascending & 0x80000000u) ? (ascending & 0x7FFFFFFFu) : ~ascending;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// Each row of x (B, V) float32 sorted in descending order, values only (NaN first, as
// numpy's ascending sort puts it last): sampling.py's _descending_values, without the
// indices torch's batched CPU sort computes. A row's NaNs go first, then its other values by
// a least-significant-digit radix sort of their keys (four passes of 8 bits, a pass skipped
// where every key shares its digit): ~7 us a row of 1,792 where std::sort took ~70. Equal
// values (+0 and -0 among them) may come in either order, which nothing downstream can tell.
Tensor descending_values(const Tensor& x) {
  auto sorted = x.contiguous().clone();
  const int64_t B = sorted.size(0), V = sorted.size(1);
  float* at = sorted.data_ptr<float>();
  std::vector<uint32_t> keys(V), spare(V);
  for (int64_t b = 0; b < B; ++b) {
    float* row = at + b * V;
    int64_t nans = 0, n = 0;
    uint32_t count[4][256] = {};
    for (int64_t i = 0; i < V; ++i) {
      if (std::isnan(row[i])) {
        row[nans++] = row[i];  // nans <= i: an entry already read
        continue;
      }
      const uint32_t key = descending_key(row[i]);
      keys[n++] = key;
      for (int d = 0; d < 4; ++d) {
        ++count[d][(key >> (8 * d)) & 0xFFu];
      }
    }
    uint32_t* from = keys.data();
    uint32_t* to = spare.data();
    for (int d = 0; d < 4 && n > 0; ++d) {
      const int shift = 8 * d;
      if (count[d][(from[0] >> shift) & 0xFFu] == static_cast<uint32_t>(n)) {
        continue;  // one digit for every key: this pass would not move any
      }
      uint32_t offset[256];
      uint32_t total = 0;
      for (int digit = 0; digit < 256; ++digit) {
        offset[digit] = total;
        total += count[d][digit];
      }
      for (int64_t j = 0; j < n; ++j) {
        to[offset[(from[j] >> shift) & 0xFFu]++] = from[j];
      }
      std::swap(from, to);
    }
    for (int64_t j = 0; j < n; ++j) {
      row[nans + j] = from_descending_key(from[j]);
    }
  }
  return sorted;
}

// sampling.py's _filter: top-k (kth_index (B, 1) long: top_k - 1, V - 1 where off), then
// nucleus (top_p (B, 1) float32, inf where off) on the sorted values; what a row keeps is a
// prefix of them, so its last kept value is a threshold: logits (B, V) below it become -inf.
Tensor filter(const Tensor& logits, const std::optional<Tensor>& kth_index,
              const std::optional<Tensor>& top_p) {
  const auto descending = descending_values(logits);
  const float inf = std::numeric_limits<float>::infinity();
  auto sorted = descending;
  if (kth_index) {
    const auto kth = sorted.gather(1, *kth_index);
    sorted = sorted.masked_fill(sorted.lt(kth), -inf);
  }
  if (top_p) {
    const auto probs = sorted.softmax(-1);
    const auto mass_before = probs.cumsum(-1) - probs;
    sorted = sorted.masked_fill(mass_before.ge(*top_p), -inf);
  }
  const auto last = (sorted.isfinite().sum(-1, true) - 1).clamp_min(0);
  const auto threshold = descending.gather(1, last);
  return logits.masked_fill(logits.lt(threshold), -inf);
}

// sampling.py's _draw: one token per row by inverse CDF on the filtered distribution, -1 for
// a row that cannot draw. logits (B, V) float32, temperature (B, 1), u (B,) in [0, 1);
// kth_index and top_p as `filter` takes them, each left out when no row uses it.
Tensor draw(const Tensor& logits, const Tensor& temperature, const Tensor& u,
            const std::optional<Tensor>& kth_index, const std::optional<Tensor>& top_p) {
  const int64_t V = logits.size(1);
  const auto top = logits.amax(-1, true);
  auto scaled = (logits - top) / temperature;
  if (kth_index || top_p) {
    scaled = filter(scaled, kth_index, top_p);
  }
  const auto cdf = scaled.softmax(-1).cumsum(-1);
  const auto total = cdf.slice(1, V - 1);  // (B, 1)
  const auto below_total = at::nextafter(total, at::zeros_like(total));
  const auto target = at::minimum(u.unsqueeze(1) * total, below_total);
  const auto token = at::searchsorted(cdf, target, false, true).select(1, 0).clamp_max(V - 1);
  return token.masked_fill(total.select(1, 0).gt(0).logical_not(), -1);
}

// sampling.py's counter_uniforms: u (B,) float32 from each row's key and draw counter,
// splitmix64's finaliser on key + counter * golden, its top 24 bits over 2**24.
Tensor counter_uniforms(const Tensor& keys, const Tensor& counters) {
  const int64_t B = keys.numel();
  auto u = at::empty({B}, keys.options().dtype(at::kFloat));
  const int64_t* key = keys.data_ptr<int64_t>();
  const int64_t* counter = counters.data_ptr<int64_t>();
  float* out = u.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    uint64_t z = static_cast<uint64_t>(key[b]) +
                 static_cast<uint64_t>(counter[b]) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z = z ^ (z >> 31);
    out[b] = static_cast<float>(z >> 40) * 0x1p-24f;
  }
  return u;
}

// history[slots[b], positions[b] - 1] = tokens[b] for each row past its first step.
void write_history(const Tensor& history, const Tensor& slots, const Tensor& positions,
                   const Tensor& tokens) {
  check_history(history);
  const auto slot = slots.to(at::kLong).contiguous();
  const auto position = positions.to(at::kLong).contiguous();
  const auto token = tokens.to(at::kLong).contiguous();
  int64_t* at = history.data_ptr<int64_t>();
  const int64_t L = history.size(1);
  for (int64_t b = 0; b < slot.numel(); ++b) {
    const int64_t s = slot.data_ptr<int64_t>()[b], p = position.data_ptr<int64_t>()[b];
    check_row(b, s, p, history);
    if (p > 0) {
      at[s * L + p - 1] = token.data_ptr<int64_t>()[b];
    }
  }
}

// torch.argmax(x, -1) of x (R, V) float32 on the CPU: each row's first index of its largest
// value, or of its first NaN where it has one. ATen's vectorised amax, then a scan for the
// first index that equals it: the same index, ~3x faster than ATen's argmax here (41 us for
// 40 rows of 1,792). -> (R,) long.
Tensor argmax_rows(const Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "argmax_rows: x must be a (R, V) float32 CPU tensor");
  const auto rows = x.contiguous();
  const auto top = rows.amax(-1).contiguous();  // NaN where the row has one
  const int64_t R = rows.size(0), V = rows.size(1);
  auto index = at::empty({R}, x.options().dtype(at::kLong));
  const float* row = rows.data_ptr<float>();
  const float* largest = top.data_ptr<float>();
  int64_t* out = index.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r, row += V) {
    const float m = largest[r];
    int64_t i = 0;
    if (std::isnan(m)) {
      while (i < V && !std::isnan(row[i])) ++i;
    } else {
      while (i < V && row[i] != m) ++i;
    }
    TORCH_CHECK(i < V || V == 0, "argmax_rows: row ", r, " has no element equal to its amax");
    out[r] = i;
  }
  return index;
}

// An n-gram draft (prompt-lookup decoding, speculating on the row's own text): the tokens
// generated[0..p) of a row, the newest earlier place its last n tokens occurred, and the up to
// m tokens that followed them there, read on as a loop would repeat: the token at p + k is
// guessed to be the one `shift` places before it (shift: how far back the match is), the
// guesses themselves read where the match runs into them. -> the draft (empty: no match, or
// p <= n). A loop ("a b c a b c a b") is matched once it has shown a whole period.
std::vector<int64_t> ngram_draft(const int64_t* generated, int64_t p, int64_t n, int64_t m) {
  std::vector<int64_t> draft;
  if (n < 1 || m < 1 || p <= n) {
    return draft;
  }
  const int64_t* key = generated + p - n;
  for (int64_t i = p - n - 1; i >= 0; --i) {
    if (std::equal(key, key + n, generated + i)) {
      const int64_t shift = p - n - i;
      for (int64_t k = 0; k < m; ++k) {
        const int64_t from = p + k - shift;
        draft.push_back(from < p ? generated[from] : draft[from - p]);
      }
      break;
    }
  }
  return draft;
}

// sample_batch's loop breakers, in its order: the EOS bias, the repetition penalty
// (logit / p where > 0, else logit * p, once per token), the no-repeat ban (-inf).
// logits (B, V) float32 -> the controlled copy (the same tensor when no row has any).
Tensor control(const Tensor& logits, const Tensor& history, const Tensor& slot,
               const Tensor& position, const Tensor& bias, const Tensor& penalty,
               const Tensor& penalty_n, const Tensor& ban_n, int64_t eos_id) {
  const int64_t B = logits.size(0), V = logits.size(1);
  const float* bias_at = bias.data_ptr<float>();
  const float* penalty_at = penalty.data_ptr<float>();
  const int64_t* ban_at = ban_n.data_ptr<int64_t>();
  bool any = false;
  std::vector<int64_t> penalized_n(B);  // 0 where the row's penalty is 1 (off)
  for (int64_t b = 0; b < B; ++b) {
    penalized_n[b] = penalty_at[b] != 1.0f ? penalty_n.data_ptr<int64_t>()[b] : 0;
    any = any || bias_at[b] != 0.0f || penalized_n[b] > 0 || ban_at[b] > 0;
  }
  if (!any) {
    return logits;
  }
  auto out = logits.contiguous().clone();
  float* row_at = out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    if (bias_at[b] != 0.0f) {
      row_at[b * V + eos_id] += bias_at[b];
    }
  }
  breaker_tokens(
      history, slot, position, penalized_n.data(), ban_at, V,
      [&](int64_t b, int64_t t) {
        float& logit = row_at[b * V + t];
        logit = logit > 0 ? logit / penalty_at[b] : logit * penalty_at[b];
      },
      [&](int64_t b, int64_t t) {
        row_at[b * V + t] = -std::numeric_limits<float>::infinity();
      });
  return out;
}

}  // namespace
