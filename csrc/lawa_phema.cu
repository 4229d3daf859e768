// The power-function EMAs of mode="phema" (Karras et al. 2024, EDM2) over a bucket of the
// LAWA history in one launch: each parameter element is read once and folded into every
// width's EMA. Every rounding is an explicit _rn intrinsic, so nvcc contracts nothing into
// an FMA and the bits are the pure-torch reference's.

#include "lawa.h"
#include "lawa_apply.cuh"
#include "lawa_elem.cuh"

namespace {

template <LawaDtype P>
struct PhemaOp {
  float* emas;
  const float* alphas;
  int64_t D;
  int64_t E;
  const int64_t* pushes;  // null: the update does not read the counter

  struct View {
    const Raw<P>* param;
    float* emas;  // row 0 of the segment's slice
    bool vec;
  };

  __device__ View view(const LawaSegment& seg, int64_t, int64_t lo) const {
    View v;
    v.param = static_cast<const Raw<P>*>(seg.param) + lo;
    v.emas = emas + seg.offset + lo;
    // D is a multiple of 64 elements, so every row is aligned like row 0.
    v.vec = lawa_aligned(v.param) && lawa_aligned(v.emas);
    return v;
  }

  template <int W>
  __device__ void step(const View& v, int e) const {
    const LawaChunk<P, W> p = lawa_load<P, W>(v.param + e);
    float theta[W];
#pragma unroll
    for (int j = 0; j < W; ++j) {
      theta[j] = LawaElem<P>::to_float(p.v[j]);
    }
    float* row = v.emas + e;
    for (int64_t r = 0; r < E; ++r, row += D) {
      const float a = __ldg(alphas + r);
      LawaChunk<kLawaFloat32, W> m = lawa_load<kLawaFloat32, W>(row);
#pragma unroll
      for (int j = 0; j < W; ++j) {
        m.v[j] = a == 1.0f ? theta[j] : __fadd_rn(m.v[j], __fmul_rn(a, __fsub_rn(theta[j], m.v[j])));
      }
      lawa_store<kLawaFloat32, W>(row, m);
    }
  }
};

}  // namespace

cudaError_t lawa_phema_update(const LawaLaunch& launch, LawaDtype param_dtype, float* emas,
                              const float* alphas, int64_t D, int64_t E) {
  if (emas == nullptr || alphas == nullptr || E < 1 || D % 64 != 0) {
    return cudaErrorInvalidValue;
  }
  return lawa_dispatch(param_dtype, [&](auto p) {
    constexpr LawaDtype P = decltype(p)::value;
    return lawa_apply(launch, PhemaOp<P>{emas, alphas, D, E, nullptr});
  });
}
