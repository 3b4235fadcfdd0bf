// The kernels' entry points, for ops built from them (decode_layer.cpp): the same functions the
// torch.ops.omnimini_cpu.* registrations call.
#pragma once

#include <ATen/core/Tensor.h>

namespace omnimini {

at::Tensor qlinear_op(const at::Tensor& x, const at::Tensor& w, int64_t fmt, int64_t n_out);
at::Tensor attn_decode_op(const at::Tensor& qkv, at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slots,
                          const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin, int64_t H,
                          int64_t KVH, double scale, int64_t window);
at::Tensor rms_norm_op(const at::Tensor& x, const at::Tensor& w, double eps);
at::Tensor silu_mul_op(const at::Tensor& gu);

}  // namespace omnimini
