// The torch-facing side of GELU: checks, device guard, stream, launch.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/torch_types.h"
#include "gelu/gelu.h"

namespace pyext {
namespace {

bool parse_approximate(c10::string_view approximate) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh",
              "gelu: approximate must be 'none' or 'tanh', got '", approximate, "'");
  return approximate == "tanh";
}

void check_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "gelu: ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()),
              "gelu: ", name, " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

at::Tensor gelu_fwd_cuda(const at::Tensor& x_in, c10::string_view approximate) {
  const bool tanh_approx = parse_approximate(approximate);
  check_input(x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return y;
  const GeluParams p{x.data_ptr(), nullptr, y.data_ptr(), x.numel(), tanh_approx};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gelu_fwd_cuda",
                                  [&] { gelu_fwd<cuda_t<scalar_t>>(p, stream); });
  check_launch("gelu_fwd_cuda");
  return y;
}

at::Tensor gelu_bwd_cuda(const at::Tensor& dy_in, const at::Tensor& x_in, c10::string_view approximate) {
  const bool tanh_approx = parse_approximate(approximate);
  check_input(x_in, "x");
  check_input(dy_in, "grad");
  TORCH_CHECK(dy_in.sizes() == x_in.sizes(), "gelu backward: grad shape ", dy_in.sizes(),
              " does not match input shape ", x_in.sizes());
  TORCH_CHECK(dy_in.scalar_type() == x_in.scalar_type(), "gelu backward: grad dtype ",
              dy_in.scalar_type(), " does not match input dtype ", x_in.scalar_type());
  TORCH_CHECK(dy_in.device() == x_in.device(), "gelu backward: grad is on ", dy_in.device(),
              " but input is on ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor dy = dy_in.contiguous();
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return dx;
  const GeluParams p{x.data_ptr(), dy.data_ptr(), dx.data_ptr(), x.numel(), tanh_approx};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gelu_bwd_cuda",
                                  [&] { gelu_bwd<cuda_t<scalar_t>>(p, stream); });
  check_launch("gelu_bwd_cuda");
  return dx;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyext, m) {
  m.def("gelu_fwd_cuda(Tensor x, str approximate) -> Tensor");
  m.def("gelu_bwd_cuda(Tensor grad, Tensor x, str approximate) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyext, CUDA, m) {
  m.impl("gelu_fwd_cuda", &gelu_fwd_cuda);
  m.impl("gelu_bwd_cuda", &gelu_bwd_cuda);
}

}  // namespace pyext
