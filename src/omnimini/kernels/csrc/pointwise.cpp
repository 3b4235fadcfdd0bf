// The small per-token ops of a decode step, one pass each: RMSNorm, and SiLU(gate) * up over a fused gate_up row.
// At batch 1 PyTorch spends more time dispatching their several elementwise ops than computing them.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <immintrin.h>

#include "ops.h"
#include "pool.h"

#include <algorithm>
#include <cmath>

namespace {

// x [M, N] float32, w [N] -> x / sqrt(mean(x^2) + eps) * w
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat &&
                  w.numel() == x.size(1), "rms_norm: x [M, N] and w [N] must be float32");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const int64_t M = x.size(0), N = x.size(1);
  at::Tensor out = at::empty_like(xc);
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  omnimini::parallel_range(M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const float* r = xp + m * N;
      __m256 acc = _mm256_setzero_ps();
      int64_t i = 0;
      for (; i + 8 <= N; i += 8) {
        const __m256 v = _mm256_loadu_ps(r + i);
        acc = _mm256_fmadd_ps(v, v, acc);
      }
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, acc);
      double ss = 0.0;
      for (float l : lanes) ss += l;
      for (; i < N; ++i) ss += static_cast<double>(r[i]) * r[i];
      const float inv = static_cast<float>(1.0 / std::sqrt(ss / N + eps));
      for (int64_t j = 0; j < N; ++j) op[m * N + j] = r[j] * inv * wp[j];
    }
  });
  return out;
}

// exp(x) for 8 floats: 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2, p a degree-6 polynomial (relative error
// ~2e-7, as expf's); inputs clamped to [-87, 88], where float exp neither overflows nor goes subnormal.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504089f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n ln2 in two steps (ln2's high part is exact in float, so n * hi has no rounding error)
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// gu [M, 2I] (gate then up) -> silu(gate) * up [M, I]; eight at a time (a prompt's MLPs are ~5 % of its
// prefill with a scalar exp)
at::Tensor silu_mul(const at::Tensor& gu) {
  TORCH_CHECK(gu.dim() == 2 && gu.scalar_type() == at::kFloat && gu.size(1) % 2 == 0,
              "silu_mul: gu must be float32 [M, 2I]");
  const at::Tensor g = gu.contiguous();
  const int64_t M = g.size(0), I = g.size(1) / 2;
  at::Tensor out = at::empty({M, I}, g.options());
  const float* gp = g.data_ptr<float>();
  float* op = out.data_ptr<float>();
  omnimini::parallel_range(M, std::max<int64_t>(1, 16384 / std::max<int64_t>(I, 1)), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const float* gate = gp + m * 2 * I;
      const float* up = gate + I;
      float* o = op + m * I;
      int64_t i = 0;
      const __m256 one = _mm256_set1_ps(1.0f);
      for (; i + 8 <= I; i += 8) {
        const __m256 a = _mm256_loadu_ps(gate + i);
        const __m256 den = _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), a)));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(a, den), _mm256_loadu_ps(up + i)));
      }
      for (; i < I; ++i) o[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
    }
  });
  return out;
}

}  // namespace

namespace omnimini {
at::Tensor rms_norm_op(const at::Tensor& x, const at::Tensor& w, double eps) { return rms_norm(x, w, eps); }
at::Tensor silu_mul_op(const at::Tensor& gu) { return silu_mul(gu); }
}  // namespace omnimini

TORCH_LIBRARY_FRAGMENT(omnimini_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("silu_mul(Tensor gu) -> Tensor");
}

TORCH_LIBRARY_IMPL(omnimini_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
}
