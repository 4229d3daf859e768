// Element access for the LAWA kernels: raw storage of each dtype, exact conversions to
// and from float32 (round to nearest even), and 16-byte vector packs.
#pragma once

#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "lawa.h"

// Elements moved per vector step: 16 bytes of a 2-byte dtype, 32 bytes of float32.
constexpr int kLawaVec = 8;

// Storage type and float32 conversions of a dtype. 2-byte dtypes are kept as raw
// bits so that same-dtype copies are exact whatever the value.
template <LawaDtype D>
struct LawaElem;

template <>
struct LawaElem<kLawaFloat32> {
  using Raw = float;
  static __device__ __forceinline__ float to_float(Raw x) { return x; }
  static __device__ __forceinline__ Raw from_float(float x) { return x; }
};

template <>
struct LawaElem<kLawaBFloat16> {
  using Raw = unsigned short;
  static __device__ __forceinline__ float to_float(Raw x) {
    return __bfloat162float(__ushort_as_bfloat16(x));
  }
  static __device__ __forceinline__ Raw from_float(float x) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
};

template <>
struct LawaElem<kLawaFloat16> {
  using Raw = unsigned short;
  static __device__ __forceinline__ float to_float(Raw x) { return __half2float(__ushort_as_half(x)); }
  static __device__ __forceinline__ Raw from_float(float x) {
    return __half_as_ushort(__float2half_rn(x));
  }
};

template <LawaDtype D>
using Raw = typename LawaElem<D>::Raw;

// csum of lawa_optim.ops (Neumaier's compensated sum): s += x, the rounding error of that
// addition added to c.
__device__ __forceinline__ void lawa_csum_add(float& s, float& c, float x) {
  const float t = __fadd_rn(s, x);
  c = __fadd_rn(c, fabsf(s) >= fabsf(x) ? __fadd_rn(__fsub_rn(s, t), x) : __fadd_rn(__fsub_rn(x, t), s));
  s = t;
}

// Cast one element from dtype S to dtype T as Tensor.to does: a plain copy for the
// same dtype, else through float32 (exact for every widening, rounded once otherwise).
template <LawaDtype S, LawaDtype T>
__device__ __forceinline__ typename LawaElem<T>::Raw lawa_cast(typename LawaElem<S>::Raw x) {
  if constexpr (S == T) {
    return x;
  } else {
    return LawaElem<T>::from_float(LawaElem<S>::to_float(x));
  }
}

// W consecutive elements (W = 1 or kLawaVec). A full vector is 16-byte aligned, so it
// moves with 128-bit loads and stores; W = 1 is the scalar path for any alignment.
template <LawaDtype D, int W>
struct alignas(W == kLawaVec ? 16 : alignof(typename LawaElem<D>::Raw)) LawaChunk {
  typename LawaElem<D>::Raw v[W];
};

// True when p may be accessed as a full vector (it is then stepped by kLawaVec elements,
// a multiple of 16 bytes for every dtype, so every step stays aligned).
__device__ __forceinline__ bool lawa_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Every access goes through the global-memory intrinsics (ld.global.ca / st.global.wb,
// the default cache policies): parameter addresses come from the pointer table, so
// plain C++ accesses compile to generic LD.E/ST.E (an address-space check each), and
// the compiler split some 16-byte struct stores into 32-bit ones. A full vector moves
// as 16-byte pieces.
// `Bytes` (a multiple of 16) between registers and 16-byte aligned global memory, as
// 128-bit ld.global.ca / st.global.wb.
template <int Bytes>
__device__ __forceinline__ void lawa_load_pieces(void* x, const void* p) {
#pragma unroll
  for (int i = 0; i < Bytes / 16; ++i) {
    const uint4 piece = __ldca(static_cast<const uint4*>(p) + i);
    memcpy(static_cast<char*>(x) + 16 * i, &piece, 16);
  }
}

template <int Bytes>
__device__ __forceinline__ void lawa_store_pieces(void* p, const void* x) {
#pragma unroll
  for (int i = 0; i < Bytes / 16; ++i) {
    uint4 piece;
    memcpy(&piece, static_cast<const char*>(x) + 16 * i, 16);
    __stwb(static_cast<uint4*>(p) + i, piece);
  }
}

template <LawaDtype D, int W>
__device__ __forceinline__ LawaChunk<D, W> lawa_load(const typename LawaElem<D>::Raw* p) {
  LawaChunk<D, W> x;
  if constexpr (W == kLawaVec) {
    lawa_load_pieces<sizeof(x)>(&x, p);
  } else {
    x.v[0] = __ldca(p);
  }
  return x;
}

template <LawaDtype D, int W>
__device__ __forceinline__ void lawa_store(typename LawaElem<D>::Raw* p, const LawaChunk<D, W>& x) {
  if constexpr (W == kLawaVec) {
    lawa_store_pieces<sizeof(x)>(p, &x);
  } else {
    __stwb(p, x.v[0]);
  }
}
