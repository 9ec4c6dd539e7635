// The torch-facing side of fused AdamW: checks, device guard, stream, launch.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "adamw/adamw.h"
#include "common/torch_types.h"

namespace pyext {
namespace {

void check_list(const char* name, const at::TensorList& list, const at::TensorList& params,
                bool moment) {
  TORCH_CHECK(list.size() == params.size(), "adamw_step_cuda: ", name, " has ", list.size(),
              " tensors but params has ", params.size());
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& t = list[i];
    const at::Tensor& p = params[i];
    TORCH_CHECK(t.device() == params[0].device(), "adamw_step_cuda: ", name, "[", i, "] is on ",
                t.device(), " but params[0] is on ", params[0].device());
    TORCH_CHECK(t.is_contiguous(), "adamw_step_cuda: ", name, "[", i, "] must be contiguous");
    TORCH_CHECK(t.numel() == p.numel(), "adamw_step_cuda: ", name, "[", i, "] has ", t.numel(),
                " elements but params[", i, "] has ", p.numel());
    const auto want = moment ? at::kFloat : params[0].scalar_type();
    TORCH_CHECK(t.scalar_type() == want, "adamw_step_cuda: ", name, "[", i, "] must be ", want,
                ", got ", t.scalar_type());
  }
}

void adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, const at::Tensor& steps,
                     double lr, const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
                     double eps, double weight_decay, bool amsgrad, bool maximize,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  TORCH_CHECK(params[0].is_cuda(), "adamw_step_cuda: params must be CUDA tensors, got ", params[0].device());
  const auto dtype = params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "adamw_step_cuda: params must be float32, float16 or bfloat16, got ", dtype);
  check_list("params", params, params, false);
  check_list("grads", grads, params, false);
  check_list("exp_avgs", exp_avgs, params, true);
  check_list("exp_avg_sqs", exp_avg_sqs, params, true);
  if (amsgrad) check_list("max_exp_avg_sqs", max_exp_avg_sqs, params, true);
  TORCH_CHECK(steps.device() == params[0].device() && steps.scalar_type() == at::kFloat &&
                  steps.is_contiguous() && steps.numel() == static_cast<int64_t>(params.size()),
              "adamw_step_cuda: steps must be a contiguous float32 tensor of ", params.size(),
              " elements on ", params[0].device());
  for (const auto* opt : {&lr_tensor, &grad_scale, &found_inf}) {
    TORCH_CHECK(!opt->has_value() || ((*opt)->device() == params[0].device() &&
                                      (*opt)->scalar_type() == at::kFloat && (*opt)->numel() == 1),
                "adamw_step_cuda: lr_tensor, grad_scale and found_inf must be one float32 element on ",
                params[0].device());
  }

  const c10::cuda::CUDAGuard guard(params[0].device());
  const size_t n = params.size();
  std::vector<void*> p(n), g(n), m(n), v(n), vmax(n, nullptr);
  std::vector<int64_t> numel(n);
  for (size_t i = 0; i < n; ++i) {
    p[i] = params[i].data_ptr();
    g[i] = grads[i].data_ptr();
    m[i] = exp_avgs[i].data_ptr();
    v[i] = exp_avg_sqs[i].data_ptr();
    if (amsgrad) vmax[i] = max_exp_avg_sqs[i].data_ptr();
    numel[i] = params[i].numel();
  }
  const AdamWTensorList list{p.data(), g.data(), reinterpret_cast<float**>(m.data()),
                             reinterpret_cast<float**>(v.data()), reinterpret_cast<float**>(vmax.data()),
                             numel.data(), static_cast<int>(n)};
  const AdamWHyper hyper{steps.data_ptr<float>(),
                         lr,
                         lr_tensor ? lr_tensor->data_ptr<float>() : nullptr,
                         grad_scale ? grad_scale->data_ptr<float>() : nullptr,
                         found_inf ? found_inf->data_ptr<float>() : nullptr,
                         beta1, beta2, static_cast<float>(eps), weight_decay,
                         amsgrad, maximize};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "adamw_step_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) adamw_step<cuda_t<scalar_t>>(list, hyper, stream);
  });
  check_launch("adamw_step_cuda");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyext, m) {
  m.def("adamw_step_cuda(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
        "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor steps, float lr, "
        "Tensor? lr_tensor, float beta1, float beta2, float eps, float weight_decay, bool amsgrad, "
        "bool maximize, Tensor? grad_scale, Tensor? found_inf) -> ()");
}

TORCH_LIBRARY_IMPL(pyext, CUDA, m) {
  m.impl("adamw_step_cuda", &adamw_step_cuda);
}

}  // namespace pyext
