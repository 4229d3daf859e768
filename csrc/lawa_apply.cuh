// Multi-tensor apply for the LAWA kernels: one launch walks every parameter of a
// bucket through a device-side table of LawaSegment rows (in the manner of
// multi_tensor_apply), tile by tile, with 128-bit vector accesses where all pointers
// of a parameter are 16-byte aligned and a scalar path for the rest.
#pragma once

#include <atomic>
#include <cstdint>
#include <type_traits>

#include <cuda_runtime_api.h>

#include "lawa.h"
#include "lawa_elem.cuh"

constexpr int kLawaThreads = 256;
// Blocks per SM the register budget must allow (at most 85 registers a thread): 768
// threads keep 48-72 KB of loads in flight per SM, over 3x what an H100 needs at full
// bandwidth (3.35 TB/s x ~600 ns / 132 SMs = 15 KB). With no bound, or 4 to 6 blocks,
// ptxas spilled 4-16 bytes in some kernels on sm_80 or sm_90.
constexpr int kLawaMinBlocks = 3;
// Devices whose occupancy is remembered per kernel; others ask for it at every launch.
constexpr int kLawaMaxDevices = 64;
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
// `View view(const LawaSegment&, int64_t pushes, int64_t lo)` (the segment's pointers
// advanced to its element lo, and whether they allow the vector path) and
// `template <int W> step(const View&, int e)` (elements lo + e .. lo + e + W - 1).
// Offsets within a tile are 32-bit: fewer live 64-bit registers, and no spills.
template <class Op>
__global__ void __launch_bounds__(kLawaThreads, kLawaMinBlocks)
    lawa_apply_kernel(const LawaSegment* __restrict__ segments, int num_segments, int64_t num_tiles,
                      Op op) {
  // Read on the device so that the host never syncs on the snapshot counter.
  const int64_t pushes = op.pushes == nullptr ? 0 : *op.pushes;
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const LawaSegment seg = segments[lawa_find_segment(segments, num_segments, tile)];
    const int64_t lo = (tile - seg.tile_begin) * kLawaTile;
    const int count = int(seg.numel - lo < kLawaTile ? seg.numel - lo : kLawaTile);
    // lo is a multiple of kLawaTile elements: the tile is aligned like its parameter.
    const typename Op::View view = op.view(seg, pushes, lo);
    int scalar_lo = 0;
    // Not unrolled: the compiler cannot move loads past stores that may alias, so
    // unrolling buys no memory parallelism, only live registers (and spills).
    if (view.vec) {
      scalar_lo = count - count % kLawaVec;
#pragma unroll 1
      for (int e = int(threadIdx.x) * kLawaVec; e < scalar_lo; e += kLawaThreads * kLawaVec) {
        op.template step<kLawaVec>(view, e);
      }
    }
#pragma unroll 1
    for (int e = scalar_lo + int(threadIdx.x); e < count; e += kLawaThreads) {
      op.template step<1>(view, e);
    }
  }
}

// Blocks of lawa_apply_kernel<Op> resident per multiprocessor of `device`, from the
// occupancy API (registers differ per Op: 5 blocks of 256 threads fit at 42-48 registers,
// not 2048 / 256 = 8), asked once per kernel and device.
template <class Op>
cudaError_t lawa_blocks_per_sm(int device, int* blocks) {
  static std::atomic<int> known[kLawaMaxDevices];  // 0: not asked yet
  const bool cached = device >= 0 && device < kLawaMaxDevices;
  if (cached && (*blocks = known[device].load(std::memory_order_relaxed)) > 0) {
    return cudaSuccess;
  }
  const cudaError_t err =
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, lawa_apply_kernel<Op>, kLawaThreads, 0);
  if (err != cudaSuccess) {
    return err;
  }
  if (*blocks < 1) {
    *blocks = 1;
  }
  if (cached) {
    known[device].store(*blocks, std::memory_order_relaxed);
  }
  return cudaSuccess;
}

// Launch op over the table on the caller's stream: one wave of resident blocks at most,
// striding over the remaining tiles.
template <class Op>
cudaError_t lawa_apply(const LawaLaunch& launch, const Op& op) {
  if (launch.num_tiles <= 0 || launch.num_segments <= 0) {
    return cudaSuccess;
  }
  int per_sm = 0;
  const cudaError_t err = lawa_blocks_per_sm<Op>(launch.device, &per_sm);
  if (err != cudaSuccess) {
    return err;
  }
  const int64_t cap = int64_t(launch.sm_count > 0 ? launch.sm_count : 1) * per_sm;
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
