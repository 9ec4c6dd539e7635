// The torch-facing side of LayerNorm and RMSNorm: checks, device guard,
// stream, workspace, launch. The ops see x as (rows, cols), cols = the product
// of normalized_shape; mean and rstd have x's leading (batch) shape, in fp32
// (fp64 for fp64 x).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "common/torch_types.h"
#include "layer_norm/layer_norm.h"

namespace pyext {
namespace {

using OptTensor = std::optional<at::Tensor>;

bool is_reduced(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

at::ScalarType stat_type(at::ScalarType x) { return x == at::kDouble ? at::kDouble : at::kFloat; }

void check_x(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", x.device());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || is_reduced(t),
              op, ": x must be float32, float64, float16 or bfloat16, got ", t);
}

// weight or bias: shape normalized_shape, x's device, x's dtype (or float32
// when x is float16/bfloat16); and both of one dtype.
void check_param(const char* op, const char* name, const OptTensor& p, const at::Tensor& x,
                 at::IntArrayRef normalized_shape) {
  if (!p) return;
  TORCH_CHECK(p->sizes() == normalized_shape, op, ": ", name, " must have shape normalized_shape ",
              normalized_shape, ", got ", p->sizes());
  TORCH_CHECK(p->device() == x.device(), op, ": ", name, " is on ", p->device(), " but x is on ", x.device());
  TORCH_CHECK(p->scalar_type() == x.scalar_type() || (is_reduced(x.scalar_type()) && p->scalar_type() == at::kFloat),
              op, ": ", name, " must be ", x.scalar_type(), " (or float32 for float16/bfloat16 x), got ",
              p->scalar_type());
}

void check_params(const char* op, const OptTensor& weight, const OptTensor& bias, const at::Tensor& x,
                  at::IntArrayRef normalized_shape) {
  check_param(op, "weight", weight, x, normalized_shape);
  check_param(op, "bias", bias, x, normalized_shape);
  TORCH_CHECK(!weight || !bias || weight->scalar_type() == bias->scalar_type(), op, ": bias dtype ",
              bias->scalar_type(), " differs from weight dtype ", weight->scalar_type());
}

template <typename T> struct Tag { using type = T; };

// Calls f(Tag<T>, Tag<W>): T the CUDA type of x, W that of weight and bias
// (T, or float for float16/bfloat16 x with float32 parameters).
template <typename F>
void dispatch_types(at::ScalarType x, const OptTensor& weight, const OptTensor& bias, F&& f) {
  const bool float_params = (weight && weight->scalar_type() == at::kFloat) ||
                            (bias && bias->scalar_type() == at::kFloat);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x, "norm_cuda", [&] {
    using T = cuda_t<scalar_t>;
    if constexpr (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) {
      if (float_params) return f(Tag<T>{}, Tag<float>{});
    }
    f(Tag<T>{}, Tag<T>{});
  });
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

at::Tensor contiguous_or_undefined(const OptTensor& t) { return t ? t->contiguous() : at::Tensor(); }

// Returns (y, mean, rstd); mean is undefined for RMSNorm.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_fwd_cuda(const char* op, const at::Tensor& x_in,
                                                             at::IntArrayRef normalized_shape,
                                                             const OptTensor& weight_in, const OptTensor& bias_in,
                                                             double eps, bool rms) {
  check_x(op, x_in);
  const int64_t k = int64_t(normalized_shape.size());
  TORCH_CHECK(k >= 1, op, ": normalized_shape must have at least one dimension, got ", normalized_shape);
  TORCH_CHECK(x_in.dim() >= k && x_in.sizes().slice(x_in.dim() - k) == normalized_shape, op,
              ": x of shape ", x_in.sizes(), " does not end in normalized_shape ", normalized_shape);
  check_params(op, weight_in, bias_in, x_in, normalized_shape);

  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = contiguous_or_undefined(weight_in);
  const at::Tensor bias = contiguous_or_undefined(bias_in);
  const auto batch = x.sizes().slice(0, x.dim() - k);
  const auto stat_options = x.options().dtype(stat_type(x.scalar_type()));
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor rstd = at::empty(batch, stat_options);
  at::Tensor mean = rms ? at::Tensor() : at::empty(batch, stat_options);
  const int64_t rows = rstd.numel();
  const int64_t cols = c10::multiply_integers(normalized_shape);
  if (rows == 0) return {y, mean, rstd};
  if (cols == 0) {  // an empty row: variance 0 by convention, nothing to write in y
    if (!rms) mean = at::zeros(batch, stat_options);
    rstd = at::full(batch, 1.0 / std::sqrt(eps), stat_options);
    return {y, mean, rstd};
  }
  const NormFwdParams p{x.data_ptr(), ptr_or_null(weight), ptr_or_null(bias), y.data_ptr(),
                        rms ? nullptr : mean.data_ptr(), rstd.data_ptr(), rows, cols, eps, rms};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_types(x.scalar_type(), weight_in, bias_in, [&](auto t, auto w) {
    norm_fwd<typename decltype(t)::type, typename decltype(w)::type>(p, stream);
  });
  check_launch(op);
  return {y, mean, rstd};
}

// Returns (dx, dweight, dbias); a gradient not asked for is an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd_cuda(const char* op, const at::Tensor& dy_in,
                                                             const at::Tensor& x_in, const at::Tensor& mean_in,
                                                             const at::Tensor& rstd_in, const OptTensor& weight_in,
                                                             const OptTensor& bias_in, bool need_dweight,
                                                             bool need_dbias, bool rms) {
  check_x(op, x_in);
  TORCH_CHECK(dy_in.sizes() == x_in.sizes(), op, ": grad shape ", dy_in.sizes(), " does not match x shape ",
              x_in.sizes());
  TORCH_CHECK(dy_in.scalar_type() == x_in.scalar_type(), op, ": grad dtype ", dy_in.scalar_type(),
              " does not match x dtype ", x_in.scalar_type());
  TORCH_CHECK(dy_in.device() == x_in.device(), op, ": grad is on ", dy_in.device(), " but x is on ", x_in.device());
  const int64_t batch_dims = rstd_in.dim();
  TORCH_CHECK(batch_dims < x_in.dim() && rstd_in.sizes() == x_in.sizes().slice(0, batch_dims), op,
              ": rstd of shape ", rstd_in.sizes(), " is not a leading part of x's shape ", x_in.sizes());
  const at::ScalarType st = stat_type(x_in.scalar_type());
  TORCH_CHECK(rstd_in.scalar_type() == st && rstd_in.device() == x_in.device(), op, ": rstd must be ", st,
              " on ", x_in.device(), ", got ", rstd_in.scalar_type(), " on ", rstd_in.device());
  if (!rms) {
    TORCH_CHECK(mean_in.sizes() == rstd_in.sizes() && mean_in.scalar_type() == st &&
                    mean_in.device() == x_in.device(),
                op, ": mean must be ", st, " of shape ", rstd_in.sizes(), " on ", x_in.device(), ", got ",
                mean_in.scalar_type(), " of shape ", mean_in.sizes(), " on ", mean_in.device());
  }
  const auto normalized_shape = x_in.sizes().slice(batch_dims);
  check_params(op, weight_in, bias_in, x_in, normalized_shape);
  TORCH_CHECK(!need_dweight || weight_in, op, ": need_dweight without a weight");
  TORCH_CHECK(!need_dbias || bias_in, op, ": need_dbias without a bias");

  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor dy = dy_in.contiguous();
  const at::Tensor weight = contiguous_or_undefined(weight_in);
  const at::Tensor rstd = rstd_in.contiguous();
  const at::Tensor mean = rms ? at::Tensor() : mean_in.contiguous();
  const int64_t rows = rstd.numel();
  const int64_t cols = c10::multiply_integers(normalized_shape);
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  // Sums over no rows are zero: allocate zeros when there are none.
  auto grad_for = [&](bool need, const OptTensor& param) {
    if (!need) return at::empty({0}, x.options());
    return rows == 0 ? at::zeros(normalized_shape, param->options()) : at::empty(normalized_shape, param->options());
  };
  at::Tensor dweight = grad_for(need_dweight, weight_in);
  at::Tensor dbias = grad_for(need_dbias, bias_in);
  if (rows == 0 || cols == 0) return {dx, dweight, dbias};

  NormBwdParams p{dy.data_ptr(), x.data_ptr(), ptr_or_null(mean), rstd.data_ptr(), ptr_or_null(weight),
                  dx.data_ptr(), nullptr, nullptr, need_dweight ? dweight.data_ptr() : nullptr,
                  need_dbias ? dbias.data_ptr() : nullptr, rows, cols, 0, rms};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor dweight_partial, dbias_partial;  // alive until the launches are queued
  dispatch_types(x.scalar_type(), weight_in, bias_in, [&](auto t, auto w) {
    using T = typename decltype(t)::type;
    using W = typename decltype(w)::type;
    p.partial_rows = norm_bwd_partial_rows<T, W>(p);
    const auto partial_options = x.options().dtype(st);
    if (need_dweight) {
      dweight_partial = at::empty({p.partial_rows, cols}, partial_options);
      p.dweight_partial = dweight_partial.data_ptr();
    }
    if (need_dbias) {
      dbias_partial = at::empty({p.partial_rows, cols}, partial_options);
      p.dbias_partial = dbias_partial.data_ptr();
    }
    norm_bwd<T, W>(p, stream);
  });
  check_launch(op);
  return {dx, dweight, dbias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(const at::Tensor& x, at::IntArrayRef normalized_shape,
                                                                   const OptTensor& weight, const OptTensor& bias,
                                                                   double eps) {
  return norm_fwd_cuda("layer_norm_fwd_cuda", x, normalized_shape, weight, bias, eps, false);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cuda(const at::Tensor& x, at::IntArrayRef normalized_shape,
                                                     const OptTensor& weight, double eps) {
  auto [y, mean, rstd] = norm_fwd_cuda("rms_norm_fwd_cuda", x, normalized_shape, weight, std::nullopt, eps, true);
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                                   const at::Tensor& mean, const at::Tensor& rstd,
                                                                   const OptTensor& weight, const OptTensor& bias,
                                                                   bool need_dweight, bool need_dbias) {
  return norm_bwd_cuda("layer_norm_bwd_cuda", grad, x, mean, rstd, weight, bias, need_dweight, need_dbias, false);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                     const at::Tensor& rstd, const OptTensor& weight,
                                                     bool need_dweight) {
  auto [dx, dweight, dbias] = norm_bwd_cuda("rms_norm_bwd_cuda", grad, x, at::Tensor(), rstd, weight, std::nullopt,
                                            need_dweight, false, true);
  return {dx, dweight};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyext, m) {
  m.def("layer_norm_fwd_cuda(Tensor x, int[] normalized_shape, Tensor? weight, Tensor? bias, float eps) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_bwd_cuda(Tensor grad, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias, "
        "bool need_dweight, bool need_dbias) -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm_fwd_cuda(Tensor x, int[] normalized_shape, Tensor? weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd_cuda(Tensor grad, Tensor x, Tensor rstd, Tensor? weight, bool need_dweight) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pyext, CUDA, m) {
  m.impl("layer_norm_fwd_cuda", &layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd_cuda", &layer_norm_bwd_cuda);
  m.impl("rms_norm_fwd_cuda", &rms_norm_fwd_cuda);
  m.impl("rms_norm_bwd_cuda", &rms_norm_bwd_cuda);
}

}  // namespace pyext
