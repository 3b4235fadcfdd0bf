// y = x W^T for weights stored in GGUF block formats (Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q6_K), AVX2 + FMA + F16C.
//
// The activations are quantized inside the op to int8 per block of 32 (scale d = max|x| / 127, and the block's
// sum d * sum(q) for the formats with an offset), so each block's dot product is an integer one: 32 byte
// products with one maddubs instruction (one vpdpbusd where the CPU has AVX512-VNNI: dot_i32). Each weight block is unpacked once and used for up to 4 activation
// rows (small batches), and output rows are split across threads. Block layouts are GGUF's own:
//   Q8_0: fp16 d, int8 q[32]                     w = d * q
//   Q4_0: fp16 d, uint8 qs[16] (two nibbles)      w = d * (q - 8)
//   Q4_1: fp16 d, fp16 m, uint8 qs[16]            w = d * q + m
//   Q5_0: fp16 d, uint32 qh, uint8 qs[16]         w = d * (q - 16), q = nibble | (bit j of qh) << 4
// where byte j of qs holds element j in its low nibble and element j + 16 in its high nibble.
// The k-quants (llama.cpp's, super-blocks of 256 weights = 8 activation blocks):
//   Q4_K: fp16 d, fp16 dmin, 12 bytes of 6-bit (scale, min) pairs, qs[128]
//         sub-block j (32 weights): w = d * sc_j * q - dmin * m_j; qs bytes 32c..32c+31 hold sub-block 2c in
//         their low nibbles and 2c + 1 in their high nibbles
//   Q6_K: ql[128], qh[64], int8 scales[16], fp16 d      w = d * scales[i / 16] * (q - 32)
//         per half of 128 weights: 32-groups g = 0..3 take the low (g = 0, 1) or high (g = 2, 3) nibbles of
//         ql[32 (g & 1) ...] and the 2 bits of qh[...] at shift 2g
// Their scales change every 32 (Q4_K) or 16 (Q6_K) weights, so a 32-weight activation block still has one
// integer dot product per weight scale: Q6_K's two 16-halves land in the two 128-bit lanes of madd's result.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <immintrin.h>

#include "ops.h"
#include "pool.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace {

constexpr int QK = 32;
constexpr int QK_K = 256;
enum Format : int64_t { Q8_0 = 0, Q4_0 = 1, Q4_1 = 2, Q4_K = 3, Q6_K = 4, Q5_0 = 5 };
// a format code plus X8: the same blocks with rows interleaved by 8 (tile_x8)
constexpr int64_t X8 = 16;

template <int F> constexpr int block_bytes() {
  return F == Q8_0 ? 34 : F == Q4_0 ? 18 : F == Q4_1 ? 20 : F == Q5_0 ? 22 : F == Q4_K ? 144 : 210;
}

// Q5_0's 32 fifth bits (bit j of qh = element j) as bytes 0x10 / 0x00 in element order: each byte takes the qh
// byte holding its bit (shuffles stay within a 128-bit lane; both lanes see all four bytes), then tests that bit.
inline __m256i q5_high_bits(const uint8_t* blk) {
  uint32_t qh;
  std::memcpy(&qh, blk + 2, 4);
  const __m256i which = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                         2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_setr_epi8(1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128,
                                       1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128);
  const __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(qh)), which);
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One row of K floats -> K/32 int8 blocks q, their scales d and d * sum(q) in s.
void quantize_row(const float* x, int64_t nb, int8_t* q, float* d, float* s) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * QK;
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(xb + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float mx = _mm_cvtss_f32(m);
    const float scale = mx / 127.0f;
    const __m256 inv = _mm256_set1_ps(mx > 0.0f ? 127.0f / mx : 0.0f);
    __m256i n[4];
    for (int i = 0; i < 4; ++i)
      n[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m256i total = _mm256_add_epi32(_mm256_add_epi32(n[0], n[1]), _mm256_add_epi32(n[2], n[3]));
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
    t = _mm_hadd_epi32(t, t);
    t = _mm_hadd_epi32(t, t);
    // packs work within 128-bit lanes: the permute puts the 32 bytes back in element order
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]), _mm256_packs_epi32(n[2], n[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * QK), _mm256_permutevar8x32_epi32(p, order));
    d[b] = scale;
    s[b] = scale * static_cast<float>(_mm_cvtsi128_si32(t));
  }
}

// The 32 weights of a block as bytes: int8 for Q8_0, 0..15 for the 4-bit formats, 0..31 for Q5_0.
template <int F> inline __m256i unpack(const uint8_t* blk) {
  if constexpr (F == Q8_0) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
  } else {
    constexpr int at = F == Q4_1 ? 4 : F == Q5_0 ? 6 : 2;
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + at));
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(lo, 4), lo);
    const __m256i nib = _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
    if constexpr (F == Q5_0) return _mm256_or_si256(nib, q5_high_bits(blk));
    return nib;
  }
}

// 8 int32 sums of 4 adjacent products of unsigned bytes u and signed bytes s (lane i: bytes 4i..4i+3). With
// AVX512-VNNI one instruction (vpdpbusd) instead of maddubs + madd: the same integers (maddubs's 16-bit pair sums
// never saturate here, |u| <= 127 or u <= 31), a third fewer instructions where prompts are compute-bound.
inline __m256i dot_i32(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

struct Acts {  // quantized activations of M rows
  const int8_t* q;
  const float* d;
  const float* s;
  int64_t nb;
};

// out[m, n] for rows m0..m0+R-1 and weight rows n0..n1-1. With R == 1 two accumulators alternate between blocks
// so the FMA latency does not serialise the loop.
template <int F, int R>
void tile(const uint8_t* W, int64_t row_bytes, int64_t n0, int64_t n1, const Acts& a, int64_t m0, float* out,
          int64_t N) {
  constexpr int A = R == 1 ? 2 : 1;
  constexpr int BB = block_bytes<F>();
  const int64_t nb = a.nb;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = W + n * row_bytes;
    __m256 acc[R][A];
    float off[R][A];
    for (int r = 0; r < R; ++r)
      for (int k = 0; k < A; ++k) {
        acc[r][k] = _mm256_setzero_ps();
        off[r][k] = 0.0f;
      }
    // k, the accumulator a block adds into, must be a compile-time index: with `b & 1` the compiler kept acc in
    // memory and every block waited on a store and a reload (measured ~12 cycles per block at batch 1)
    auto step = [&](int64_t b, auto kc) {
      constexpr int k = decltype(kc)::value;
      const uint8_t* blk = w + b * BB;
      const __m256i wq = unpack<F>(blk);
      const float dw = half_at(blk);
      const __m256i wabs = F == Q8_0 ? _mm256_sign_epi8(wq, wq) : wq;
      for (int r = 0; r < R; ++r) {
        const int64_t row = (m0 + r) * nb + b;
        const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q + row * QK));
        // unsigned by signed bytes: Q8_0 moves the weight's sign onto the activation
        const __m256 dot = _mm256_cvtepi32_ps(F == Q8_0 ? dot_i32(wabs, _mm256_sign_epi8(xq, wq))
                                                        : dot_i32(wabs, xq));
        acc[r][k] = _mm256_fmadd_ps(dot, _mm256_set1_ps(dw * a.d[row]), acc[r][k]);
        if constexpr (F == Q4_0) off[r][k] -= 8.0f * dw * a.s[row];
        if constexpr (F == Q5_0) off[r][k] -= 16.0f * dw * a.s[row];
        if constexpr (F == Q4_1) off[r][k] += half_at(blk + 2) * a.s[row];
      }
    };
    int64_t b = 0;
    if constexpr (A == 2)
      for (; b + 1 < nb; b += 2) {
        step(b, std::integral_constant<int, 0>{});
        step(b + 1, std::integral_constant<int, 1>{});
      }
    for (; b < nb; ++b) step(b, std::integral_constant<int, 0>{});
    for (int r = 0; r < R; ++r) {
      float y = hsum(acc[r][0]) + off[r][0];
      if constexpr (A == 2) y += hsum(acc[r][1]) + off[r][1];
      out[(m0 + r) * N + n] = y;
    }
  }
}

// ---- rows interleaved by 8 (Q8_0, Q4_0, Q4_1 repacked once at load: kernels/blocks.py repack_x8) ----
// A group of 8 output rows stores, per activation block b, the 8 rows' fp16 scales d[8] (then Q4_1's m[8]) and
// their weights arranged so that one 32-byte vector holds 4 consecutive weights of each of the 8 rows: vector j
// (Q8_0: j = 0..7, weights 4j..4j+3) or, for the nibble formats, qs bytes 4j..4j+3 of each row (j = 0..3; low
// nibbles = weights 4j.., high nibbles = weights 16 + 4j..). One vpdpbusd against the activation's 4 bytes
// broadcast then adds 4 products into each row's lane: after 8 of them lane r holds row r's integer dot
// product, so scales are applied as one vector of 8 and no horizontal sums are needed (the row-major kernel
// above spends most of a block on them and on scalar scale conversion).
template <int F> constexpr int x8_scale_bytes() { return F == Q4_1 ? 32 : 16; }

inline __m256i dot_acc(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// Q8_0's weights are signed: with VNNI they are biased to unsigned (w + 128, an xor) and the bias removed with
// the activation block's sum (128 * d_x * sum q = 128 * s); maddubs would saturate on 255 * 127 pairs, so the
// AVX2 form moves the weight's sign onto the activation instead.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
constexpr bool Q8_BIAS = true;
#else
constexpr bool Q8_BIAS = false;
#endif

template <int F, int R>
void tile_x8(const uint8_t* W, int64_t group_bytes, int64_t g0, int64_t g1, const Acts& a, int64_t m0, float* out,
             int64_t N) {
  constexpr int PB = 8 * block_bytes<F>();
  constexpr int SB = x8_scale_bytes<F>();
  const int64_t nb = a.nb;
  const __m256i low4 = _mm256_set1_epi8(0x0F), flip = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* w = W + g * group_bytes;
    __m256 acc[R], off[R];
    for (int r = 0; r < R; ++r) acc[r] = off[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = w + b * PB;
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
      __m256i wv[8];
      if constexpr (F == Q8_0) {
        for (int j = 0; j < 8; ++j) {
          wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + SB + 32 * j));
          if constexpr (Q8_BIAS) wv[j] = _mm256_xor_si256(wv[j], flip);
        }
      } else {
        for (int j = 0; j < 4; ++j) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + SB + 32 * j));
          wv[j] = _mm256_and_si256(v, low4);
          wv[j + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        }
      }
      __m256 mv;
      if constexpr (F == Q4_1) mv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16)));
      for (int r = 0; r < R; ++r) {
        const int64_t row = (m0 + r) * nb + b;
        const int8_t* x = a.q + row * QK;
        // two integer chains so consecutive vpdpbusd do not wait on each other
        __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
        for (int j = 0; j < 8; j += 2) {
          // wv[j] holds weights 4j..4j+3 of each row (nibble formats: wv[j + 4] = the high nibbles of vector j,
          // weights 16 + 4j..)
          const __m256i x0 = bcast4(x + 4 * j), x1 = bcast4(x + 4 * j + 4);
          if constexpr (F == Q8_0 && !Q8_BIAS) {
            s0 = dot_acc(s0, _mm256_sign_epi8(wv[j], wv[j]), _mm256_sign_epi8(x0, wv[j]));
            s1 = dot_acc(s1, _mm256_sign_epi8(wv[j + 1], wv[j + 1]), _mm256_sign_epi8(x1, wv[j + 1]));
          } else {
            s0 = dot_acc(s0, wv[j], x0);
            s1 = dot_acc(s1, wv[j + 1], x1);
          }
        }
        const __m256 dot = _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1));
        const __m256 dx = _mm256_set1_ps(a.d[row]);
        acc[r] = _mm256_fmadd_ps(dot, _mm256_mul_ps(d, dx), acc[r]);
        // the offsets: Q4_1 + m * s, Q4_0 - 8 d s, biased Q8_0 - 128 d s (s = d_x * sum of the block's q)
        if constexpr (F == Q4_1) off[r] = _mm256_fmadd_ps(mv, _mm256_set1_ps(a.s[row]), off[r]);
        if constexpr (F == Q4_0) off[r] = _mm256_fmadd_ps(d, _mm256_set1_ps(-8.0f * a.s[row]), off[r]);
        if constexpr (F == Q8_0 && Q8_BIAS) off[r] = _mm256_fmadd_ps(d, _mm256_set1_ps(-128.0f * a.s[row]), off[r]);
      }
    }
    const int64_t n = 8 * g, valid = std::min<int64_t>(8, N - n);
    for (int r = 0; r < R; ++r) {
      const __m256 y = _mm256_add_ps(acc[r], off[r]);
      float* o = out + (m0 + r) * N + n;
      if (valid == 8) {
        _mm256_storeu_ps(o, y);
      } else {  // the last group of a layer whose rows are not a multiple of 8 (padded with zero rows)
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, y);
        std::memcpy(o, tmp, sizeof(float) * valid);
      }
    }
  }
}

template <int F>
void matmul_x8(const uint8_t* W, int64_t group_bytes, int64_t G, const Acts& a, int64_t M, float* out, int64_t N) {
  // a few hundred KB of weights per piece, as in matmul below; a group is 8 rows
  const int64_t per_group = group_bytes * (1 + M / 4);
  const int64_t grain = std::max<int64_t>(2, (256 << 10) / std::max<int64_t>(per_group, 1));
  omnimini::parallel_range(G, grain, [&](int64_t begin, int64_t end) {
    constexpr int64_t CHUNK = 2;  // groups whose weights stay in L1/L2 while the activation rows pass by
    for (int64_t g0 = begin; g0 < end; g0 += CHUNK) {
      const int64_t g1 = std::min(g0 + CHUNK, end);
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) tile_x8<F, 4>(W, group_bytes, g0, g1, a, m, out, N);
      switch (M - m) {
        case 3: tile_x8<F, 3>(W, group_bytes, g0, g1, a, m, out, N); break;
        case 2: tile_x8<F, 2>(W, group_bytes, g0, g1, a, m, out, N); break;
        case 1: tile_x8<F, 1>(W, group_bytes, g0, g1, a, m, out, N); break;
        default: break;
      }
    }
  });
}

// Q4_K's 12 scale bytes -> 8 scales and 8 mins (6 bits each; see kernels/blocks.py q4_k_scales).
inline void q4_k_scales(const uint8_t* p, int* sc, int* mn) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = p[j] & 63;
    mn[j] = p[j + 4] & 63;
    sc[j + 4] = (p[j + 8] & 0x0F) | ((p[j] >> 6) << 4);
    mn[j + 4] = (p[j + 8] >> 4) | ((p[j + 4] >> 6) << 4);
  }
}

inline __m256 dot_f32(__m256i w_unsigned, __m256i x_signed) {
  return _mm256_cvtepi32_ps(dot_i32(w_unsigned, x_signed));
}

inline __m256i act_block(const Acts& a, int64_t row) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q + row * QK));
}

// Q4_K rows n0..n1-1 against activation rows m0..m0+R-1 (R <= 4): each super-block's scales are decoded and its
// nibbles unpacked once for all R rows.
template <int R>
void tile_q4_k(const uint8_t* W, int64_t row_bytes, int64_t n0, int64_t n1, const Acts& a, int64_t m0,
               float* out, int64_t N) {
  const int64_t nsb = a.nb / 8;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = W + n * row_bytes;
    __m256 acc[R][2];
    float off[R];
    for (int r = 0; r < R; ++r) {
      acc[r][0] = acc[r][1] = _mm256_setzero_ps();
      off[r] = 0.0f;
    }
    for (int64_t sb = 0; sb < nsb; ++sb) {
      const uint8_t* blk = w + sb * 144;
      const float d = half_at(blk), dmin = half_at(blk + 2);
      int sc[8], mn[8];
      q4_k_scales(blk + 4, sc, mn);
      for (int c = 0; c < 4; ++c) {
        const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16 + 32 * c));
        const __m256i lo = _mm256_and_si256(bytes, low4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
        const float d0 = d * static_cast<float>(sc[2 * c]), d1 = d * static_cast<float>(sc[2 * c + 1]);
        const float m0f = dmin * static_cast<float>(mn[2 * c]), m1f = dmin * static_cast<float>(mn[2 * c + 1]);
        for (int r = 0; r < R; ++r) {
          const int64_t row = (m0 + r) * a.nb + sb * 8 + 2 * c;
          acc[r][0] = _mm256_fmadd_ps(dot_f32(lo, act_block(a, row)), _mm256_set1_ps(d0 * a.d[row]), acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(dot_f32(hi, act_block(a, row + 1)), _mm256_set1_ps(d1 * a.d[row + 1]),
                                      acc[r][1]);
          off[r] -= m0f * a.s[row] + m1f * a.s[row + 1];  // the mins against the blocks' activation sums
        }
      }
    }
    for (int r = 0; r < R; ++r) out[(m0 + r) * N + n] = hsum(_mm256_add_ps(acc[r][0], acc[r][1])) + off[r];
  }
}

// Q6_K: the 6-bit values minus 32 as signed bytes; maddubs takes |w| and moves w's sign onto the activation.
template <int R>
void tile_q6_k(const uint8_t* W, int64_t row_bytes, int64_t n0, int64_t n1, const Acts& a, int64_t m0,
               float* out, int64_t N) {
  const int64_t nsb = a.nb / 8;
  const __m256i low4 = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(3), off32 = _mm256_set1_epi8(32);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = W + n * row_bytes;
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < nsb; ++sb) {
      const uint8_t* blk = w + sb * 210;
      const int8_t* scales = reinterpret_cast<const int8_t*>(blk + 192);
      const float d = half_at(blk + 208);
      for (int h = 0; h < 2; ++h) {
        const __m256i ql0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * h));
        const __m256i ql1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * h + 32));
        const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128 + 32 * h));
        __m256i g[4];
        // the 2 high bits are at most 3 before the shift by 4, so the 16-bit shifts never cross a byte
        g[0] = _mm256_or_si256(_mm256_and_si256(ql0, low4), _mm256_slli_epi16(_mm256_and_si256(qh, two), 4));
        g[1] = _mm256_or_si256(_mm256_and_si256(ql1, low4),
                               _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), two), 4));
        g[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low4),
                               _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), two), 4));
        g[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), low4),
                               _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), two), 4));
        for (int k = 0; k < 4; ++k) {
          const int grp = 4 * h + k;  // 32-weight group in the super-block = activation block sb * 8 + grp
          const __m256i wq = _mm256_sub_epi8(g[k], off32);
          const __m256i wabs = _mm256_sign_epi8(wq, wq);
          // madd's 8 sums: lanes 0-3 are weights 0-15 (scale 2 grp), lanes 4-7 weights 16-31 (scale 2 grp + 1)
          const __m256 sc = _mm256_set_m128(_mm_set1_ps(d * scales[2 * grp + 1]), _mm_set1_ps(d * scales[2 * grp]));
          for (int r = 0; r < R; ++r) {
            const int64_t row = (m0 + r) * a.nb + sb * 8 + grp;
            const __m256 dot = dot_f32(wabs, _mm256_sign_epi8(act_block(a, row), wq));
            acc[r][k & 1] = _mm256_fmadd_ps(dot, _mm256_mul_ps(sc, _mm256_set1_ps(a.d[row])), acc[r][k & 1]);
          }
        }
      }
    }
    for (int r = 0; r < R; ++r) out[(m0 + r) * N + n] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
  }
}

template <int F, int R>
inline void run_tile(const uint8_t* W, int64_t row_bytes, int64_t n0, int64_t n1, const Acts& a, int64_t m0,
                     float* out, int64_t N) {
  if constexpr (F == Q4_K) tile_q4_k<R>(W, row_bytes, n0, n1, a, m0, out, N);
  else if constexpr (F == Q6_K) tile_q6_k<R>(W, row_bytes, n0, n1, a, m0, out, N);
  else tile<F, R>(W, row_bytes, n0, n1, a, m0, out, N);
}

template <int F>
void matmul(const uint8_t* W, int64_t row_bytes, int64_t N, const Acts& a, int64_t M, float* out) {
  // rows in chunks small enough that a chunk's weights stay in L1/L2 while every activation tile passes by
  constexpr int64_t CHUNK = 16;
  // a few hundred KB of weights per piece: smaller ops are not worth waking a thread for
  const int64_t per_row = row_bytes * (1 + M / 4);
  const int64_t grain = std::max<int64_t>(CHUNK, ((256 << 10) / std::max<int64_t>(per_row, 1) + CHUNK - 1) / CHUNK * CHUNK);
  omnimini::parallel_range(N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n0 = begin; n0 < end; n0 += CHUNK) {
      const int64_t n1 = std::min(n0 + CHUNK, end);
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) run_tile<F, 4>(W, row_bytes, n0, n1, a, m, out, N);
      switch (M - m) {
        case 3: run_tile<F, 3>(W, row_bytes, n0, n1, a, m, out, N); break;
        case 2: run_tile<F, 2>(W, row_bytes, n0, n1, a, m, out, N); break;
        case 1: run_tile<F, 1>(W, row_bytes, n0, n1, a, m, out, N); break;
        default: break;
      }
    }
  });
}

int64_t bytes_for(int64_t fmt) {
  switch (fmt) {
    case Q8_0: return block_bytes<Q8_0>();
    case Q4_0: return block_bytes<Q4_0>();
    case Q4_1: return block_bytes<Q4_1>();
    case Q5_0: return block_bytes<Q5_0>();
    case Q4_K: return block_bytes<Q4_K>();
    case Q6_K: return block_bytes<Q6_K>();
    default: TORCH_CHECK(false, "omnimini qlinear: unknown block format ", fmt);
  }
}

// x [M, K] float32, w [N, K/32 * block bytes] uint8 -> [M, N] float32
at::Tensor qlinear(const at::Tensor& x, const at::Tensor& w, int64_t fmt, int64_t n_out) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "qlinear: x must be a 2-D float32 tensor");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte, "qlinear: w must be a 2-D uint8 tensor of blocks");
  const bool x8 = fmt & X8;
  const int64_t base = fmt & ~X8;
  TORCH_CHECK(!x8 || base == Q8_0 || base == Q4_0 || base == Q4_1, "qlinear: no interleaved form of format ", base);
  const int64_t M = x.size(0), K = x.size(1), N = n_out;
  // interleaved: [ceil(N / 8) groups, 8 rows' blocks]; row-major: [N rows, blocks]
  TORCH_CHECK(w.size(0) == (x8 ? (N + 7) / 8 : N), "qlinear: weight has ", w.size(0), x8 ? " row groups" : " rows",
              " for ", N, " outputs");
  TORCH_CHECK(K % QK == 0, "qlinear: K=", K, " is not a multiple of 32");
  const int64_t nb = K / QK;
  const int64_t per_block = base == Q4_K || base == Q6_K ? QK_K : QK;
  TORCH_CHECK(K % per_block == 0, "qlinear: K=", K, " is not a multiple of ", per_block, " (format ", base, ")");
  const int64_t row_bytes = K / per_block * bytes_for(base) * (x8 ? 8 : 1);
  TORCH_CHECK(w.size(1) == row_bytes, "qlinear: weight rows hold ", w.size(1), " bytes, expected ", row_bytes,
              " for K=", K);
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = w.contiguous();
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor ds = at::empty({2, M, nb}, x.options());
  const float* xp = xc.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* dp = ds.data_ptr<float>();
  float* sp = dp + M * nb;
  omnimini::parallel_range(M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) quantize_row(xp + m * K, nb, qp + m * K, dp + m * nb, sp + m * nb);
  });
  const Acts a{qp, dp, sp, nb};
  const uint8_t* wp = wc.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  if (x8) {
    const int64_t G = w.size(0);
    switch (base) {
      case Q8_0: matmul_x8<Q8_0>(wp, row_bytes, G, a, M, op, N); break;
      case Q4_0: matmul_x8<Q4_0>(wp, row_bytes, G, a, M, op, N); break;
      case Q4_1: matmul_x8<Q4_1>(wp, row_bytes, G, a, M, op, N); break;
    }
    return out;
  }
  switch (fmt) {
    case Q8_0: matmul<Q8_0>(wp, wc.size(1), N, a, M, op); break;
    case Q4_0: matmul<Q4_0>(wp, wc.size(1), N, a, M, op); break;
    case Q4_1: matmul<Q4_1>(wp, wc.size(1), N, a, M, op); break;
    case Q5_0: matmul<Q5_0>(wp, wc.size(1), N, a, M, op); break;
    case Q4_K: matmul<Q4_K>(wp, wc.size(1), N, a, M, op); break;
    case Q6_K: matmul<Q6_K>(wp, wc.size(1), N, a, M, op); break;
  }
  return out;
}

}  // namespace

namespace omnimini {
at::Tensor qlinear_op(const at::Tensor& x, const at::Tensor& w, int64_t fmt, int64_t n_out) {
  return qlinear(x, w, fmt, n_out);
}
}  // namespace omnimini

TORCH_LIBRARY_FRAGMENT(omnimini_cpu, m) {
  m.def("qlinear(Tensor x, Tensor w, int fmt, int n_out) -> Tensor");
}

TORCH_LIBRARY_IMPL(omnimini_cpu, CPU, m) {
  m.impl("qlinear", &qlinear);
}
