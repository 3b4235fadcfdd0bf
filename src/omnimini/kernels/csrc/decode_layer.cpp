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

}  // namespace

TORCH_LIBRARY_FRAGMENT(omnimini_cpu, m) {
  m.def("decode_layer(Tensor x, Tensor in_norm, Tensor post_norm, float eps, Tensor qkv_w, int qkv_fmt, int qkv_n, "
        "Tensor o_w, int o_fmt, Tensor gu_w, int gu_fmt, int gu_n, Tensor down_w, int down_fmt, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, Tensor slots, Tensor positions, Tensor cos, Tensor sin, int heads, int kv_heads, "
        "float scale, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(omnimini_cpu, CPU, m) {
  m.impl("decode_layer", &decode_layer);
}
