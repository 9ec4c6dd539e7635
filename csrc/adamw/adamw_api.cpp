// The torch-facing side of the fused AdamW step: checks, device guard,
// stream, and the tensor lists cut into launches of kAdamWMaxTensors.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>

#include "adamw/adamw.h"
#include "common/torch_types.h"

namespace pyext {
namespace {

std::string item(const char* list, size_t i) { return std::string(list) + "[" + std::to_string(i) + "]"; }

bool aligned16(const at::Tensor& t) { return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0; }

// A 1-element float32 tensor on `device` (step counts, lr, GradScaler's scale and flag).
void check_scalar(const at::Tensor& t, const std::string& name, const at::Device& device) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == 1 && t.device() == device, "adamw_step: ",
              name, " must be a 1-element float32 tensor on ", device, ", got ", t.scalar_type(),
              " with ", t.numel(), " elements on ", t.device());
}

void check_like(const at::Tensor& t, const std::string& name, const at::Tensor& p, size_t i,
                at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype && t.device() == p.device() && t.sizes() == p.sizes() &&
                  t.strides() == p.strides(),
              "adamw_step: ", name, " must be ", dtype, " on ", p.device(), " with params[", i,
              "]'s shape ", p.sizes(), " and strides ", p.strides(), ", got ", t.scalar_type(), " on ",
              t.device(), ", shape ", t.sizes(), ", strides ", t.strides());
}

void adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                     at::TensorList state_steps, double lr,
                     const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
                     double weight_decay, double eps, bool amsgrad, bool maximize,
                     const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n,
              "adamw_step: grads, exp_avgs and exp_avg_sqs must have one tensor per param (", n,
              "), got ", grads.size(), ", ", exp_avgs.size(), " and ", exp_avg_sqs.size());
  TORCH_CHECK(max_exp_avg_sqs.size() == (amsgrad ? n : 0), "adamw_step: max_exp_avg_sqs must have ",
              amsgrad ? n : 0, " tensors (amsgrad=", amsgrad, "), got ", max_exp_avg_sqs.size());
  TORCH_CHECK(state_steps.size() == n, "adamw_step: state_steps must have one tensor per param (", n,
              "), got ", state_steps.size());
  if (n == 0) return;
  const at::Tensor& p0 = params[0];
  const at::ScalarType dtype = p0.scalar_type();
  TORCH_CHECK(p0.is_cuda(), "adamw_step: params must be CUDA tensors, got device ", p0.device());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "adamw_step: params must be float32, float16 or bfloat16, got ", dtype);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.scalar_type() == dtype && p.device() == p0.device(), "adamw_step: params[", i,
                "] is ", p.scalar_type(), " on ", p.device(), ", params[0] is ", dtype, " on ",
                p0.device());
    TORCH_CHECK(p.is_non_overlapping_and_dense(), "adamw_step: params[", i,
                "] must be non-overlapping and dense");
    check_like(grads[i], item("grads", i), p, i, dtype);
    check_like(exp_avgs[i], item("exp_avgs", i), p, i, at::kFloat);
    check_like(exp_avg_sqs[i], item("exp_avg_sqs", i), p, i, at::kFloat);
    if (amsgrad) check_like(max_exp_avg_sqs[i], item("max_exp_avg_sqs", i), p, i, at::kFloat);
    check_scalar(state_steps[i], item("state_steps", i), p0.device());
  }
  if (lr_tensor) check_scalar(*lr_tensor, "lr_tensor", p0.device());
  if (grad_scale) check_scalar(*grad_scale, "grad_scale", p0.device());
  if (found_inf) check_scalar(*found_inf, "found_inf", p0.device());

  const c10::cuda::CUDAGuard guard(p0.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AdamWHyper hyper{};
  hyper.beta1 = beta1;
  hyper.beta2 = beta2;
  hyper.lr = static_cast<float>(lr);
  hyper.lr_ptr = lr_tensor ? lr_tensor->data_ptr<float>() : nullptr;
  hyper.weight_decay = static_cast<float>(weight_decay);
  hyper.eps = static_cast<float>(eps);
  hyper.grad_scale = grad_scale ? grad_scale->data_ptr<float>() : nullptr;
  hyper.found_inf = found_inf ? found_inf->data_ptr<float>() : nullptr;
  hyper.maximize = maximize;

  AdamWTensorList list{};
  auto flush = [&] {
    switch (dtype) {
      case at::kFloat: adamw_step<float>(list, hyper, amsgrad, stream); break;
      case at::kHalf: adamw_step<__half>(list, hyper, amsgrad, stream); break;
      default: adamw_step<__nv_bfloat16>(list, hyper, amsgrad, stream); break;
    }
    check_launch("adamw_step_cuda");
    list.num_tensors = 0;
  };
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].numel();
    if (numel == 0) continue;
    const int t = list.num_tensors;
    list.param[t] = params[i].data_ptr();
    list.grad[t] = grads[i].data_ptr();
    list.exp_avg[t] = exp_avgs[i].data_ptr<float>();
    list.exp_avg_sq[t] = exp_avg_sqs[i].data_ptr<float>();
    list.max_exp_avg_sq[t] = amsgrad ? max_exp_avg_sqs[i].data_ptr<float>() : nullptr;
    list.step[t] = state_steps[i].data_ptr<float>();
    list.numel[t] = numel;
    list.chunk_end[t] = (t > 0 ? list.chunk_end[t - 1] : 0) + adamw_chunks(numel);
    list.vectorized[t] = aligned16(params[i]) && aligned16(grads[i]) && aligned16(exp_avgs[i]) &&
                         aligned16(exp_avg_sqs[i]) && (!amsgrad || aligned16(max_exp_avg_sqs[i]));
    list.num_tensors = t + 1;
    if (list.num_tensors == kAdamWMaxTensors) flush();
  }
  if (list.num_tensors > 0) flush();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyext, m) {
  m.def(
      "adamw_step_cuda(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor[] state_steps, float lr, "
      "Tensor? lr_tensor, float beta1, float beta2, float weight_decay, float eps, bool amsgrad, "
      "bool maximize, Tensor? grad_scale, Tensor? found_inf) -> ()");
}

TORCH_LIBRARY_IMPL(pyext, CUDA, m) { m.impl("adamw_step_cuda", &adamw_step_cuda); }

}  // namespace pyext
