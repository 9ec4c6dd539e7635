// 16-byte vector loads and stores, and the elementwise grid-stride pattern.
// Plain CUDA: no torch header, so kernel files that include this compile fast.
#pragma once

#include <cstdint>

namespace pyext {

// N elements of T packed into one aligned 16-byte (or smaller) access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Elements per 16-byte access: 4 floats, 8 halves or bfloat16s, 2 doubles.
template <typename T>
constexpr int kVec16 = int(16 / sizeof(T));

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& x) {
  *reinterpret_cast<Vec<T, N>*>(p) = x;
}

// True when every pointer is aligned for a 16-byte access.
__host__ __device__ inline bool aligned16(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
}
template <typename... Ptrs>
__host__ __device__ inline bool aligned16(const void* p, Ptrs... rest) {
  return aligned16(p) && aligned16(rest...);
}

}  // namespace pyext
