// One decode step of grouped-query attention over a slot KV cache, for B sequences with one new token each:
// rotary (rotate-half, the model's own cos/sin), the new key/value written into the cache, then softmax attention
// of each query head over its sequence's keys 0..position (the last `window` of them on sliding-window layers).
// Replaces ~20 small PyTorch ops per layer at decode. The cache may be float16 (half the memory, read and written
// through F16C); the new key/value are rounded to float16 once, when written.

#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <immintrin.h>

#include "ops.h"
#include "pool.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// The cache holds float32 or float16 (F16C converts 8 values per instruction); the arithmetic is float32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline float load1(const float* p) { return *p; }
inline float load1(const at::Half* p) { return static_cast<float>(*p); }

inline void store_row(const float* src, float* dst, int64_t n) { std::copy_n(src, n, dst); }
inline void store_row(const float* src, at::Half* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) dst[i] = static_cast<at::Half>(src[i]);
}

template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  int64_t i = 0;
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  float r = _mm_cvtss_f32(s);
  for (; i < n; ++i) r += a[i] * load1(b + i);
  return r;
}

template <typename T>
inline void axpy(float a, const T* x, float* y, int64_t n) {  // y += a * x
  int64_t i = 0;
  const __m256 va = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, load8(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * load1(x + i);
}

// out = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]
inline void rope(const float* x, const float* cos, const float* sin, float* out, int64_t d) {
  const int64_t h = d / 2;
  for (int64_t i = 0; i < h; ++i) {
    out[i] = x[i] * cos[i] - x[i + h] * sin[i];
    out[i + h] = x[i + h] * cos[i + h] + x[i] * sin[i + h];
  }
}

template <typename T>
void attend(const float* q, T* kc, T* vc, const int64_t* slot, const int64_t* pos, const float* cp, const float* sp,
            int64_t B, int64_t H, int64_t KVH, int64_t L, int64_t D, float scale, int64_t window, float* op) {
  const int64_t W = (H + 2 * KVH) * D, G = H / KVH;
  std::vector<float> kr(D);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < KVH; ++g) {
      const int64_t at = ((slot[b] * KVH + g) * L + pos[b]) * D;
      rope(q + b * W + (H + g) * D, cp + b * D, sp + b * D, kr.data(), D);
      store_row(kr.data(), kc + at, D);
      store_row(q + b * W + (H + KVH + g) * D, vc + at, D);
    }
  }
  int64_t keys_read = 0;  // threads only when there is enough to read (long contexts, several sequences)
  for (int64_t b = 0; b < B; ++b) keys_read += std::min<int64_t>(pos[b] + 1, window > 0 ? window : L);
  const int64_t grain = keys_read * H * D * static_cast<int64_t>(sizeof(T)) < (1 << 19) ? B * H : 1;
  omnimini::parallel_range(B * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> qr(D), p;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / H, h = t % H, g = h / G;
      const int64_t first = window > 0 ? std::max<int64_t>(0, pos[b] - window + 1) : 0, n = pos[b] + 1 - first;
      rope(q + b * W + h * D, cp + b * D, sp + b * D, qr.data(), D);
      const T* keys = kc + ((slot[b] * KVH + g) * L + first) * D;
      const T* vals = vc + ((slot[b] * KVH + g) * L + first) * D;
      p.resize(n);
      float mx = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        p[j] = dot(qr.data(), keys + j * D, D) * scale;
        mx = std::max(mx, p[j]);
      }
      float total = 0.0f;
      for (int64_t j = 0; j < n; ++j) total += (p[j] = std::exp(p[j] - mx));
      float* o = op + b * H * D + h * D;
      const float inv = 1.0f / total;
      for (int64_t j = 0; j < n; ++j) axpy(p[j] * inv, vals + j * D, o, D);
    }
  });
}

// qkv [B, (H + 2 KVH) * D]; caches [S, KVH, L, D]; slots, positions [B] int64; cos, sin [B, D] -> [B, H * D].
// scale <= 0: 1/sqrt(D); window <= 0: no sliding window.
at::Tensor attn_decode(const at::Tensor& qkv, at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slots,
                       const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin, int64_t H,
                       int64_t KVH, double scale_arg, int64_t window) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.scalar_type() == at::kFloat, "attn_decode: qkv must be 2-D float32");
  const auto kind = k_cache.scalar_type();
  TORCH_CHECK(k_cache.dim() == 4 && (kind == at::kFloat || kind == at::kHalf) && k_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == kind && v_cache.is_contiguous(),
              "attn_decode: caches must be contiguous float32 or float16 [slots, kv_heads, len, head_dim]");
  const int64_t B = qkv.size(0), S = k_cache.size(0), L = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(k_cache.size(1) == KVH && H % KVH == 0 && qkv.size(1) == (H + 2 * KVH) * D,
              "attn_decode: qkv width ", qkv.size(1), " does not match heads ", H, "/", KVH, " x ", D);
  TORCH_CHECK(slots.numel() == B && positions.numel() == B && cos.size(0) == B && cos.size(1) == D &&
                  sin.sizes() == cos.sizes(), "attn_decode: slots/positions/cos/sin must have one row per sequence");
  const at::Tensor qc = qkv.contiguous(), cc = cos.contiguous().to(at::kFloat), sc = sin.contiguous().to(at::kFloat);
  const at::Tensor sl = slots.to(at::kLong).contiguous(), ps = positions.to(at::kLong).contiguous();
  const int64_t* slot = sl.data_ptr<int64_t>();
  const int64_t* pos = ps.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(slot[b] >= 0 && slot[b] < S && pos[b] >= 0 && pos[b] < L, "attn_decode: slot ", slot[b],
                " / position ", pos[b], " outside the cache [", S, ", ", L, "]");
  at::Tensor out = at::zeros({B, H * D}, qkv.options());
  const float scale = scale_arg > 0 ? static_cast<float>(scale_arg) : 1.0f / std::sqrt(static_cast<float>(D));
  if (kind == at::kHalf)
    attend(qc.data_ptr<float>(), k_cache.data_ptr<at::Half>(), v_cache.data_ptr<at::Half>(), slot, pos,
           cc.data_ptr<float>(), sc.data_ptr<float>(), B, H, KVH, L, D, scale, window, out.data_ptr<float>());
  else
    attend(qc.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), slot, pos,
           cc.data_ptr<float>(), sc.data_ptr<float>(), B, H, KVH, L, D, scale, window, out.data_ptr<float>());
  return out;
}

}  // namespace

namespace omnimini {
at::Tensor attn_decode_op(const at::Tensor& qkv, at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slots,
                          const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin, int64_t H,
                          int64_t KVH, double scale, int64_t window) {
  return attn_decode(qkv, k_cache, v_cache, slots, positions, cos, sin, H, KVH, scale, window);
}
}  // namespace omnimini

TORCH_LIBRARY_FRAGMENT(omnimini_cpu, m) {
  m.def("attn_decode(Tensor qkv, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, Tensor positions, "
        "Tensor cos, Tensor sin, int heads, int kv_heads, float scale, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(omnimini_cpu, CPU, m) {
  m.impl("attn_decode", &attn_decode);
}
