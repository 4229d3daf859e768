// Multi-tensor apply for the LAWA kernels: one launch walks every parameter of a
// bucket through a device-side table of LawaSegment rows (in the manner of
// multi_tensor_apply), tile by tile, with 128-bit vector accesses where all pointers
// of a parameter are 16-byte aligned and a scalar path for the rest.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_runtime_api.h>

#include "lawa.h"
#include "lawa_elem.cuh"

constexpr int kLawaThreads = 256;
// Resident blocks per multiprocessor at kLawaThreads (2048 threads): the grid is at
// most this many blocks per SM and strides over the remaining tiles.
constexpr int kLawaBlocksPerSm = 2048 / kLawaThreads;
static_assert(kLawaTile % (kLawaThreads * kLawaVec) == 0, "a tile is whole vector rounds");

// Index of the segment holding `tile`: the last one with tile_begin <= tile (segments
// of empty parameters have no tiles and share tile_begin with the next one).
__device__ __forceinline__ int lawa_find_segment(const LawaSegment* segments, int num_segments,
                                                 int64_t tile) {
  int lo = 0;
  int hi = num_segments - 1;
  while (lo < hi) {
    const int mid = lo + (hi - lo + 1) / 2;
    if (segments[mid].tile_begin <= tile) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Op provides `pushes` (device counter, or null when the op does not need it),
// `View view(const LawaSegment&, int64_t pushes)` (the segment's pointers and whether
// they allow the vector path) and `template <int W> step(const View&, int64_t e)`
// (elements e .. e + W - 1 of the segment).
template <class Op>
__global__ void __launch_bounds__(kLawaThreads)
    lawa_apply_kernel(const LawaSegment* __restrict__ segments, int num_segments, int64_t num_tiles,
                      Op op) {
  // Read on the device so that the host never syncs on the snapshot counter.
  const int64_t pushes = op.pushes == nullptr ? 0 : *op.pushes;
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const LawaSegment seg = segments[lawa_find_segment(segments, num_segments, tile)];
    const int64_t lo = (tile - seg.tile_begin) * kLawaTile;
    const int64_t hi = lo + kLawaTile < seg.numel ? lo + kLawaTile : seg.numel;
    const typename Op::View view = op.view(seg, pushes);
    int64_t scalar_lo = lo;
    if (view.vec) {
      scalar_lo = hi - (hi - lo) % kLawaVec;
      for (int64_t e = lo + int64_t(threadIdx.x) * kLawaVec; e < scalar_lo;
           e += int64_t(kLawaThreads) * kLawaVec) {
        op.template step<kLawaVec>(view, e);
      }
    }
    for (int64_t e = scalar_lo + threadIdx.x; e < hi; e += kLawaThreads) {
      op.template step<1>(view, e);
    }
  }
}

// Launch op over the table on the caller's stream, the grid sized from the SM count.
template <class Op>
cudaError_t lawa_apply(const LawaLaunch& launch, const Op& op) {
  if (launch.num_tiles <= 0 || launch.num_segments <= 0) {
    return cudaSuccess;
  }
  const int64_t cap = int64_t(launch.sm_count > 0 ? launch.sm_count : 1) * kLawaBlocksPerSm;
  const unsigned blocks = unsigned(launch.num_tiles < cap ? launch.num_tiles : cap);
  lawa_apply_kernel<Op><<<blocks, kLawaThreads, 0, launch.stream>>>(
      launch.segments, launch.num_segments, launch.num_tiles, op);
  return cudaGetLastError();
}

// Call f with std::integral_constant<LawaDtype, dtype>; an unknown dtype is an error.
template <class F>
cudaError_t lawa_dispatch(LawaDtype dtype, F&& f) {
  switch (dtype) {
    case kLawaFloat32:
      return f(std::integral_constant<LawaDtype, kLawaFloat32>{});
    case kLawaBFloat16:
      return f(std::integral_constant<LawaDtype, kLawaBFloat16>{});
    case kLawaFloat16:
      return f(std::integral_constant<LawaDtype, kLawaFloat16>{});
  }
  return cudaErrorInvalidValue;
}
