// One decoder layer for one new token per sequence, in one op: RMSNorm -> fused q/k/v -> rotary + cache write +
// attention (attn_decode) -> o_proj + residual -> RMSNorm -> fused gate/up -> SiLU * up -> down + residual, all
// weights in GGUF blocks. The same kernels the layer's modules call one by one; what this saves is the ~20
// PyTorch dispatches and Python steps between them per layer, a third of a batch-1 token on a small model.

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "ops.h"

namespace {

at::Tensor decode_layer(const at::Tensor& x, const at::Tensor& in_norm, const at::Tensor& post_norm, double eps,
                        const at::Tensor& qkv_w, int64_t qkv_fmt, int64_t qkv_n, const at::Tensor& o_w,
                        int64_t o_fmt, const at::Tensor& gu_w, int64_t gu_fmt, int64_t gu_n,
                        const at::Tensor& down_w, int64_t down_fmt, at::Tensor k_cache, at::Tensor v_cache,
                        const at::Tensor& slots, const at::Tensor& positions, const at::Tensor& cos,
                        const at::Tensor& sin, int64_t heads, int64_t kv_heads, double scale, int64_t window) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "decode_layer: x must be float32 [B, hidden]");
  using namespace omnimini;
  const int64_t D = x.size(1);
  const at::Tensor xc = x.contiguous();
  const at::Tensor qkv = qlinear_op(rms_norm_op(xc, in_norm, eps), qkv_w, qkv_fmt, qkv_n);
  const at::Tensor att = attn_decode_op(qkv, k_cache, v_cache, slots, positions, cos, sin, heads, kv_heads, scale,
                                        window);
  at::Tensor h = qlinear_op(att, o_w, o_fmt, D);
  h.add_(xc);
  at::Tensor y = qlinear_op(silu_mul_op(qlinear_op(rms_norm_op(h, post_norm, eps), gu_w, gu_fmt, gu_n)), down_w,
                            down_fmt, D);
  y.add_(h);
  return y;
}

// Every layer of a model whose layers all take decode_layer, one after the other, in one op: per layer its
// norms, weights (and format codes), caches and sliding window (0: none); layers with a window take the local
// rotary angles (Gemma-style models; the same tensors as cos/sin where a model has one set). What this saves over
// one decode_layer per layer is the Python loop and ~30 dispatches of 24 arguments: ~1 ms of a 6 ms token on the
// default model.
at::Tensor decode_layers(const at::Tensor& x, at::TensorList in_norms, at::TensorList post_norms, double eps,
                         at::TensorList qkv_w, at::IntArrayRef qkv_fmt, int64_t qkv_n, at::TensorList o_w,
                         at::IntArrayRef o_fmt, at::TensorList gu_w, at::IntArrayRef gu_fmt, int64_t gu_n,
                         at::TensorList down_w, at::IntArrayRef down_fmt, at::TensorList k_caches,
                         at::TensorList v_caches, const at::Tensor& slots, const at::Tensor& positions,
                         const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& cos_local,
                         const at::Tensor& sin_local, at::IntArrayRef windows, int64_t heads, int64_t kv_heads,
                         double scale) {
  const size_t L = in_norms.size();
  TORCH_CHECK(post_norms.size() == L && qkv_w.size() == L && qkv_fmt.size() == L && o_w.size() == L &&
                  o_fmt.size() == L && gu_w.size() == L && gu_fmt.size() == L && down_w.size() == L &&
                  down_fmt.size() == L && k_caches.size() == L && v_caches.size() == L && windows.size() == L,
              "decode_layers: every per-layer list must have one entry per layer (", L, ")");
  at::Tensor h = x;
  for (size_t i = 0; i < L; ++i) {
    const bool local = windows[i] > 0;
    h = decode_layer(h, in_norms[i], post_norms[i], eps, qkv_w[i], qkv_fmt[i], qkv_n, o_w[i], o_fmt[i], gu_w[i],
                     gu_fmt[i], gu_n, down_w[i], down_fmt[i], k_caches[i], v_caches[i], slots, positions,
                     local ? cos_local : cos, local ? sin_local : sin, heads, kv_heads, scale, windows[i]);
  }
  return h;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(omnimini_cpu, m) {
  m.def("decode_layers(Tensor x, Tensor[] in_norms, Tensor[] post_norms, float eps, Tensor[] qkv_w, int[] qkv_fmt, "
        "int qkv_n, Tensor[] o_w, int[] o_fmt, Tensor[] gu_w, int[] gu_fmt, int gu_n, Tensor[] down_w, "
        "int[] down_fmt, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor slots, Tensor positions, Tensor cos, "
        "Tensor sin, Tensor cos_local, Tensor sin_local, int[] windows, int heads, int kv_heads, float scale) "
        "-> Tensor");
  m.def("decode_layer(Tensor x, Tensor in_norm, Tensor post_norm, float eps, Tensor qkv_w, int qkv_fmt, int qkv_n, "
        "Tensor o_w, int o_fmt, Tensor gu_w, int gu_fmt, int gu_n, Tensor down_w, int down_fmt, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, Tensor slots, Tensor positions, Tensor cos, Tensor sin, int heads, int kv_heads, "
        "float scale, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(omnimini_cpu, CPU, m) {
  m.impl("decode_layer", &decode_layer);
  m.impl("decode_layers", &decode_layers);
}
