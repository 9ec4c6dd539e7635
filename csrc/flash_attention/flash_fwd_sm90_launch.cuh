// Host launcher of the Stage 2 (sm_90a) FlashAttention forward for one dtype
// and head dim (flash_fwd_sm90_kernel.cuh). Included by the
// flash_fwd_sm90_hdim*.cu files.
#pragma once

#include "common/launch.h"
#include "flash_attention/flash_fwd_sm90_kernel.cuh"

namespace pyext {

template <typename T, int kD>
bool flash_fwd_sm90(const FlashAttnParams& p, cudaStream_t stream) {
  using Tr = FlashFwdSm90Traits<kD>;
  auto kernel = flash_fwd_sm90_kernel<T, kD>;
  if (!has_sm90a_body(kernel)) return false;
  Sm90TensorMaps maps;
  if (!make_sm90_tensor_maps<T>(p, Tr::kBlockM, Tr::kBlockN, maps)) return false;
  // 113 / 225 KB of dynamic shared memory: should a device refuse it, Stage 1 runs.
  if (!opt_in_smem(kernel, Tr::kSmemBytes)) return false;
  kernel<<<Tr::ctas(kernel, p), Tr::kThreads, Tr::kSmemBytes, stream>>>(maps.q, maps.k, maps.v, p);
  return true;
}

}  // namespace pyext
