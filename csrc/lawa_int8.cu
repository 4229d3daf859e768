// The 8-bit history's kernels (lawa_optim/ops.py: push_int8, swap_in_int8): int8 deltas
// against a float32 anchor (the newest stored snapshot), one float32 scale per block of
// 256 elements counted from each parameter's first element.
//
// Each lane moves 16 consecutive elements (16 codes: one 128-bit access), so the 16 lanes
// of a half warp hold one quantisation block and the push reduces its largest |delta|
// with four shuffles. Tiles are those of the pointer table (kLawaTile elements, a
// multiple of the 512 a warp moves per step), so blocks start where the table says.
// Every rounding is an explicit _rn intrinsic: no contraction into an FMA.

#include "lawa.h"
#include "lawa_apply.cuh"
#include "lawa_elem.cuh"

namespace {

constexpr int kLane = 16;     // elements per lane
constexpr int kQBlock = 256;  // elements per quantisation block (lawa_optim.ops.QBLOCK)
static_assert(kQBlock == 16 * kLane, "a half warp holds one quantisation block");
static_assert(kLawaTile % (kLawaThreads * kLane) == 0, "a tile is whole steps");
// Blocks per SM the register budget must allow (up to 128 registers a thread): a lane
// keeps 16 elements of two or three streams live. 512 threads per SM then hold ~115 KB of
// loads in flight, several times what full bandwidth needs; with 3 blocks (80
// registers) ptxas spilled 24-56 bytes.
constexpr int kInt8MinBlocks = 2;

// The lane's 16 elements from p: 128-bit loads where vec and all 16 are in the tile,
// else one by one, zero beyond `valid`.
template <class T>
__device__ __forceinline__ void lawa_load16(T (&x)[kLane], const T* p, int valid, bool vec) {
  if (vec && valid >= kLane) {
    lawa_load_pieces<sizeof(x)>(&x, p);
  } else {
#pragma unroll
    for (int j = 0; j < kLane; ++j) {
      x[j] = j < valid ? __ldca(p + j) : T(0);
    }
  }
}

template <class T>
__device__ __forceinline__ void lawa_store16(T* p, const T (&x)[kLane], int valid, bool vec) {
  if (vec && valid >= kLane) {
    lawa_store_pieces<sizeof(x)>(p, &x);
  } else {
#pragma unroll
    for (int j = 0; j < kLane; ++j) {
      if (j < valid) {
        __stwb(p + j, x[j]);
      }
    }
  }
}

// With n = pushes: anchor = float(param) when n == 0 or k == 1; else, per block, the delta
// d = float(param) - anchor into slot (n - 1) % (k - 1): scale = max|d| / 127, codes
// rint(d * (127 / max|d|)), anchor += code * scale; a block with max|d| < 2^-120 stores
// scale 0 and codes 0; one with a non-finite d stores scale NaN, codes 0, anchor = param.
template <LawaDtype P>
__global__ void __launch_bounds__(kLawaThreads, kInt8MinBlocks)
    lawa_push_int8_kernel(const LawaSegment* __restrict__ segments, int num_segments, int64_t num_tiles,
                          const int64_t* __restrict__ block_bases, int8_t* ring, float* scales,
                          float* anchor, const int64_t* pushes, int64_t D, int64_t nb, int64_t k) {
  const int64_t n = *pushes;
  const bool first = n == 0 || k == 1;
  const int64_t s = first ? 0 : (n - 1) % (k - 1);
  const int lane = int(threadIdx.x) % 32;
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int i = lawa_find_segment(segments, num_segments, tile);
    const LawaSegment seg = segments[i];
    const int64_t lo = (tile - seg.tile_begin) * kLawaTile;
    const int count = int(seg.numel - lo < kLawaTile ? seg.numel - lo : kLawaTile);
    const Raw<P>* param = static_cast<const Raw<P>*>(seg.param) + lo;
    float* a = anchor + seg.offset + lo;
    int8_t* codes = ring + s * D + seg.offset + lo;
    float* sc = scales + s * nb + block_bases[i] + lo / kQBlock;
    const bool vec = lawa_aligned(param) && lawa_aligned(a) && lawa_aligned(codes);
    // A whole warp per step (the shuffles need every lane): lanes past the tile see d = 0.
#pragma unroll 1
    for (int base = int(threadIdx.x) / 32 * 32 * kLane; base < count; base += kLawaThreads * kLane) {
      const int e = base + lane * kLane;
      const int valid = count - e;
      Raw<P> p[kLane];
      float x[kLane];
      lawa_load16(p, param + e, valid, vec);
#pragma unroll
      for (int j = 0; j < kLane; ++j) {
        x[j] = LawaElem<P>::to_float(p[j]);
      }
      if (first) {
        lawa_store16(a + e, x, valid, vec);
        continue;
      }
      float av[kLane];
      lawa_load16(av, a + e, valid, vec);
      // max |d| on the bits: a NaN or an infinity is above every finite value.
      unsigned top = 0;
#pragma unroll
      for (int j = 0; j < kLane; ++j) {
        x[j] = __fsub_rn(x[j], av[j]);
        top = max(top, __float_as_uint(x[j]) & 0x7fffffffu);
      }
#pragma unroll
      for (int o = kLane / 2; o > 0; o /= 2) {
        top = max(top, __shfl_xor_sync(0xffffffffu, top, o));
      }
      const bool bad = top >= 0x7f800000u;
      const float m = __uint_as_float(top);
      const bool live = !bad && m >= 0x1p-120f;
      const float scale = live ? __fdiv_rn(m, 127.0f) : bad ? __int_as_float(0x7fc00000) : 0.0f;
      const float inv = live ? __fdiv_rn(127.0f, m) : 0.0f;
      int8_t q8[kLane];
#pragma unroll
      for (int j = 0; j < kLane; ++j) {
        const float q = live ? rintf(__fmul_rn(x[j], inv)) : 0.0f;
        q8[j] = static_cast<int8_t>(__float2int_rn(q));
        if (bad) {
          av[j] = LawaElem<P>::to_float(p[j]);
        } else if (live) {
          av[j] = __fadd_rn(av[j], __fmul_rn(q, scale));
        }
      }
      lawa_store16(codes + e, q8, valid, vec);
      lawa_store16(a + e, av, valid, vec);
      if (lane % 16 == 0 && valid > 0) {
        __stwb(sc + e / kQBlock, scale);
      }
    }
  }
}

// backup = param; param = cast(s + c), Neumaier's sum of coef[0] * anchor and
// coef[j] * (float(code) * scale) of the j-th newest delta, slot (n - 1 - j) % (k - 1),
// j = 1 .. m - 1, every product and sum rounded once.
template <LawaDtype P>
__global__ void __launch_bounds__(kLawaThreads, kInt8MinBlocks)
    lawa_swap_int8_kernel(const LawaSegment* __restrict__ segments, int num_segments, int64_t num_tiles,
                          const int64_t* __restrict__ block_bases, const int8_t* ring, const float* scales,
                          const float* anchor, Raw<P>* backup, const float* __restrict__ coef,
                          const int64_t* pushes, int64_t D, int64_t nb, int64_t k, int64_t m) {
  const int64_t n = *pushes;
  // The newest delta's slot; older ones step back with a compare, not a 64-bit % per step.
  const int64_t newest = k > 1 ? (n - 2 + (k - 1)) % (k - 1) : 0;
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int i = lawa_find_segment(segments, num_segments, tile);
    const LawaSegment seg = segments[i];
    const int64_t lo = (tile - seg.tile_begin) * kLawaTile;
    const int count = int(seg.numel - lo < kLawaTile ? seg.numel - lo : kLawaTile);
    Raw<P>* param = static_cast<Raw<P>*>(seg.param) + lo;
    Raw<P>* bk = backup + seg.offset + lo;
    const float* a = anchor + seg.offset + lo;
    const int8_t* codes = ring + seg.offset + lo;
    const float* sc = scales + block_bases[i] + lo / kQBlock;
    const bool vec = lawa_aligned(param) && lawa_aligned(bk) && lawa_aligned(a) && lawa_aligned(codes) &&
                     D % 16 == 0;
#pragma unroll 1
    for (int e = int(threadIdx.x) * kLane; e < count; e += kLawaThreads * kLane) {
      const int valid = count - e;
      Raw<P> p[kLane];
      lawa_load16(p, param + e, valid, vec);
      lawa_store16(bk + e, p, valid, vec);
      float av[kLane];
      lawa_load16(av, a + e, valid, vec);
      float s[kLane];
      float c[kLane];
      const float w0 = __ldg(coef);
#pragma unroll
      for (int j = 0; j < kLane; ++j) {
        s[j] = 0.0f;
        c[j] = 0.0f;
        lawa_csum_add(s[j], c[j], __fmul_rn(w0, av[j]));
      }
      int64_t slot = newest;
#pragma unroll 1
      for (int64_t t = 1; t < m; ++t) {
        int8_t q8[kLane];
        lawa_load16(q8, codes + slot * D + e, valid, vec);
        // Lanes past the tile read no scale: theirs may lie past the last parameter's.
        const float scale = valid > 0 ? __ldg(sc + slot * nb + e / kQBlock) : 0.0f;
        const float w = __ldg(coef + t);
#pragma unroll
        for (int j = 0; j < kLane; ++j) {
          lawa_csum_add(s[j], c[j], __fmul_rn(w, __fmul_rn(float(q8[j]), scale)));
        }
        slot = (slot == 0 ? k - 1 : slot) - 1;
      }
      Raw<P> out[kLane];
#pragma unroll
      for (int j = 0; j < kLane; ++j) {
        out[j] = LawaElem<P>::from_float(__fadd_rn(s[j], c[j]));
      }
      lawa_store16(param + e, out, valid, vec);
    }
  }
}

// One launch of `kernel` over the tiles, the grid capped at what is resident at once
// (occupancy API): the tail of every 8-bit entry point.
template <class... Params, class... Args>
cudaError_t lawa_int8_launch(const LawaLaunch& launch, void (*kernel)(Params...), Args... args) {
  int per_sm = 0;
  const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kLawaThreads, 0);
  if (err != cudaSuccess) {
    return err;
  }
  const int64_t cap = int64_t(launch.sm_count > 0 ? launch.sm_count : 1) * (per_sm > 0 ? per_sm : 1);
  const unsigned blocks = unsigned(launch.num_tiles < cap ? launch.num_tiles : cap);
  kernel<<<blocks, kLawaThreads, 0, launch.stream>>>(launch.segments, launch.num_segments, launch.num_tiles,
                                                      args...);
  return cudaGetLastError();
}

}  // namespace

cudaError_t lawa_push_int8(const LawaLaunch& launch, LawaDtype param_dtype, const int64_t* block_bases,
                           int8_t* ring, float* scales, float* anchor, const int64_t* pushes, int64_t D,
                           int64_t nb, int64_t k) {
  if (k < 1 || (k > 1 && (ring == nullptr || scales == nullptr))) {
    return cudaErrorInvalidValue;
  }
  if (launch.num_tiles <= 0 || launch.num_segments <= 0) {
    return cudaSuccess;
  }
  return lawa_dispatch(param_dtype, [&](auto p) {
    constexpr LawaDtype P = decltype(p)::value;
    return lawa_int8_launch(launch, lawa_push_int8_kernel<P>, block_bases, ring, scales, anchor, pushes, D, nb, k);
  });
}

cudaError_t lawa_swap_int8(const LawaLaunch& launch, LawaDtype param_dtype, const int64_t* block_bases,
                           const int8_t* ring, const float* scales, const float* anchor, void* backup,
                           const float* coef, const int64_t* pushes, int64_t D, int64_t nb, int64_t k,
                           int64_t m) {
  if (coef == nullptr || m < 1 || m > k || (m > 1 && (ring == nullptr || scales == nullptr))) {
    return cudaErrorInvalidValue;
  }
  if (launch.num_tiles <= 0 || launch.num_segments <= 0) {
    return cudaSuccess;
  }
  return lawa_dispatch(param_dtype, [&](auto p) {
    constexpr LawaDtype P = decltype(p)::value;
    return lawa_int8_launch(launch, lawa_swap_int8_kernel<P>, block_bases, ring, scales, anchor,
                            static_cast<Raw<P>*>(backup), coef, pushes, D, nb, k, m);
  });
}
