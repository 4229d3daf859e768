// C interface of the LAWA history kernels (Kaddour 2022, arXiv:2209.14981).
//
// Only CUDA headers are used here and in the .cu files, so they compile with plain
// `nvcc -c` on a machine without a GPU or a CUDA build of torch; bindings.cpp is the
// torch glue. Every launcher runs one kernel over all parameters of a bucket on
// `stream` and returns the launch status.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

// Element types of parameters and history.
enum LawaDtype : int { kLawaFloat32 = 0, kLawaBFloat16 = 1, kLawaFloat16 = 2 };

// What swap_in writes into the parameters.
enum LawaAverage : int {
  kLawaMean = 0,  // total, the running mean (the float64 mean of the slots where it is not finite)
  kLawaEma = 1,   // total as is
  kLawaLast = 2,  // mean of the `last` newest ring slots
};

// Elements per tile: the unit of work of one block iteration (a multiple of the
// 8-element vector, so only a parameter's last tile has a scalar tail).
constexpr int64_t kLawaTile = 8192;

// One parameter of a bucket. A device-side array of these, one per parameter in
// bucket order, is the pointer table every kernel walks; `tile_begin` is the prefix
// sum of ceil(numel / kLawaTile), so a block finds its parameter by binary search.
struct LawaSegment {
  void* param;         // first element in memory order (the parameter is dense)
  int64_t offset;      // element offset of the parameter's slice in the flat buffers
  int64_t numel;       // elements of the parameter
  int64_t tile_begin;  // index of the parameter's first tile
};
static_assert(sizeof(LawaSegment) == 4 * sizeof(int64_t), "LawaSegment is a row of 4 int64");

// The launch geometry shared by all entry points.
struct LawaLaunch {
  const LawaSegment* segments;  // device pointer, num_segments rows
  int num_segments;
  int64_t num_tiles;            // tile_begin of the last segment plus its tiles
  int device;                   // CUDA device ordinal of the buffers and the stream
  int sm_count;                 // multiprocessors of the device, to size the grid
  cudaStream_t stream;
};

// With n = pushes: ring[n % k] = cast(param), and the running mean total +=
// (float(new) - float(old)) / k ((float(new) - total) / (n + 1) while n < k), each step
// rounded; or, when (n + 1) % refresh_every == 0, total = csum(ring[0], ..., ring[c - 1])
// / c in slot order, c = min(n + 1, k) (the new slot included; csum is the compensated
// sum of lawa_optim/ops.py; wide where it is not finite). `ring` is (k, D), `total` is (D,).
cudaError_t lawa_push(const LawaLaunch& launch, LawaDtype param_dtype, LawaDtype history_dtype,
                      void* ring, float* total, const int64_t* pushes, int64_t D, int64_t k,
                      int64_t refresh_every);

// total = float(param) when pushes == 0, else decay * total + one_minus_decay * param.
cudaError_t lawa_ema_update(const LawaLaunch& launch, LawaDtype param_dtype, float* total,
                            const int64_t* pushes, float decay, float one_minus_decay);

// The power-function EMAs of mode="phema" (EDM2): for e = 0 .. E - 1, emas[e] = float(param)
// where alphas[e] == 1, else emas[e] + alphas[e] * (float(param) - emas[e]), each operation
// rounded once (no FMA). `emas` is (E, D) float32; `alphas` E float32 in device memory.
cudaError_t lawa_phema_update(const LawaLaunch& launch, LawaDtype param_dtype, float* emas,
                              const float* alphas, int64_t D, int64_t E);

// backup = param (bit for bit), then param = round(average) (lawa_optim/ops.py), see
// LawaAverage. `ring` may be null for kLawaEma only; `last` is used by kLawaLast only.
cudaError_t lawa_swap_in(const LawaLaunch& launch, LawaDtype param_dtype, LawaDtype history_dtype,
                         LawaAverage average, void* backup, const float* total, const void* ring,
                         const int64_t* pushes, int64_t D, int64_t k, int64_t last);

// backup = param (bit for bit), then param = round(s + c), the compensated (Neumaier) sum
// of weights[i] * ring[(pushes - 1 - i) % k], i = 0 .. count - 1 (1 <= count <= k;
// `weights`: count float32 coefficients in device memory, newest first).
cudaError_t lawa_swap_weighted(const LawaLaunch& launch, LawaDtype param_dtype,
                               LawaDtype history_dtype, void* backup, const void* ring,
                               const float* weights, const int64_t* pushes, int64_t D, int64_t k,
                               int64_t count);

// param = backup (bit for bit).
cudaError_t lawa_swap_back(const LawaLaunch& launch, LawaDtype param_dtype, const void* backup);

// total = csum(ring[0], ..., ring[c - 1]) / c in slot order, c = min(pushes, k) (wide
// where the sum is not finite, 0 for c = 0; lawa_optim/ops.py).
cudaError_t lawa_recompute(const LawaLaunch& launch, LawaDtype history_dtype, const void* ring,
                           float* total, const int64_t* pushes, int64_t D, int64_t k);

// The 8-bit history (lawa_optim/ops.py, push_int8): with n = pushes, anchor = float(param)
// when n == 0 or k == 1; else per block of 256 elements of a parameter (scale index
// block_bases[segment] + element / 256) the delta param - anchor quantised into codes
// ring[(n - 1) % (k - 1)] and scales[(n - 1) % (k - 1)], and the anchor moved by what was
// stored. `ring` is (k - 1, D) int8, `scales` (k - 1, nb) float32, `anchor` (D,) float32;
// `block_bases` holds one int64 per segment, on the device.
cudaError_t lawa_push_int8(const LawaLaunch& launch, LawaDtype param_dtype, const int64_t* block_bases,
                           int8_t* ring, float* scales, float* anchor, const int64_t* pushes, int64_t D,
                           int64_t nb, int64_t k);

// backup = param (bit for bit), then param = cast(s + c), Neumaier's sum of coef[0] * anchor
// and coef[j] * code * scale of the j-th newest delta, j = 1 .. m - 1 (1 <= m <= k; `coef`:
// m float32 coefficients in device memory).
cudaError_t lawa_swap_int8(const LawaLaunch& launch, LawaDtype param_dtype, const int64_t* block_bases,
                           const int8_t* ring, const float* scales, const float* anchor, void* backup,
                           const float* coef, const int64_t* pushes, int64_t D, int64_t nb, int64_t k,
                           int64_t m);

// The in-place swap (lawa_optim/ops.py) between float32 or bfloat16 parameters and the
// running mean `total`, no backup; `back` undoes it. Another dtype: cudaErrorInvalidValue.
cudaError_t lawa_exchange(const LawaLaunch& launch, LawaDtype param_dtype, float* total, bool back);
