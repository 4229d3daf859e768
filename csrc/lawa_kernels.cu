// The LAWA history kernels (Kaddour 2022, arXiv:2209.14981): snapshot into the ring
// with the float32 running mean, EMA update, swap-in with backup (mean, EMA, last=j,
// weighted), swap-back, the in-place swap (exchange) and recompute, each one launch
// per bucket (see lawa_apply.cuh).
//
// The running mean and the averages must match the pure-torch reference bit for bit,
// so every rounding step is an explicit _rn intrinsic: nvcc would otherwise contract
// a * b + c into an FMA, and the mean's update rounds the difference, then the
// quotient, before adding it.

#include "lawa.h"
#include "lawa_apply.cuh"
#include "lawa_elem.cuh"

namespace {

// The sum of lawa_csum_add's (s, c) as csum of lawa_optim.ops reads it.
__device__ __forceinline__ float lawa_csum_result(float s, float c) {
  return isfinite(s) ? __fadd_rn(s, c) : s;
}

// wide of lawa_optim.ops: the `count` slots of one element (`ring` at slot 0), from slot
// `first` on, stepping back through the ring (newest first) or forward (slot order),
// summed in double. Runs only where a float32 sum is not finite.
template <LawaDtype H>
__device__ __forceinline__ float lawa_wide(const Raw<H>* ring, int64_t D, int64_t k, int64_t first,
                                        bool newest_first, int64_t count) {
  double w = 0.0;
  int64_t s = first;
  for (int64_t i = 0; i < count; ++i) {
    w = __dadd_rn(w, double(LawaElem<H>::to_float(__ldca(ring + s * D))));
    s = newest_first ? (s == 0 ? k : s) - 1 : s + 1;
  }
  return __double2float_rn(__ddiv_rn(w, double(count)));
}

// round of lawa_optim.ops: an average written into a parameter. bfloat16 rounds to
// nearest with ties away from zero ((bits + 0x8000) >> 16), which the exchange undoes;
// a NaN and the other dtypes as the cast rounds them.
template <LawaDtype P>
__device__ __forceinline__ Raw<P> lawa_round(float x) {
  if constexpr (P == kLawaBFloat16) {
    return isnan(x) ? LawaElem<P>::from_float(x) : static_cast<Raw<P>>((__float_as_uint(x) + 0x8000u) >> 16);
  } else {
    return LawaElem<P>::from_float(x);
  }
}

// ring[n % k] = cast(param); the running mean total += (float(new) - float(old)) / k, or
// (float(new) - total) / (n + 1) while n < k; at a refresh ((n + 1) % refresh_every == 0)
// total is rebuilt from the filled slots instead (their mean; wide where the sum is not
// finite).
template <LawaDtype P, LawaDtype H>
struct PushOp {
  Raw<H>* ring;
  float* total;
  const int64_t* pushes;
  int64_t D;
  int64_t k;
  int64_t refresh_every;

  struct View {
    const Raw<P>* param;
    Raw<H>* slot;
    const Raw<H>* ring;  // slot 0 of the segment's slice
    float* total;
    int64_t s;           // the slot written
    int64_t filled;      // slots summed at a refresh, the new one included
    bool full;
    bool refresh;
    bool vec;
  };

  __device__ View view(const LawaSegment& seg, int64_t n, int64_t lo) const {
    View v;
    v.param = static_cast<const Raw<P>*>(seg.param) + lo;
    v.s = n % k;
    v.slot = ring + v.s * D + seg.offset + lo;
    v.ring = ring + seg.offset + lo;
    v.total = total + seg.offset + lo;
    v.full = n >= k;
    v.refresh = (n + 1) % refresh_every == 0;
    v.filled = n + 1 < k ? n + 1 : k;
    v.vec = lawa_aligned(v.param) && lawa_aligned(v.slot) && lawa_aligned(v.total) &&
            (D * int64_t(sizeof(Raw<H>))) % 16 == 0;
    return v;
  }

  template <int W>
  __device__ void step(const View& v, int e) const {
    const LawaChunk<P, W> p = lawa_load<P, W>(v.param + e);
    LawaChunk<H, W> h;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      h.v[j] = lawa_cast<P, H>(p.v[j]);
    }
    LawaChunk<kLawaFloat32, W> t;
    const float count = float(v.filled);
    if (v.refresh) {
      // Stored first: the sums below read the new slot back.
      lawa_store<H, W>(v.slot + e, h);
      // csum of the filled slots in slot order, as recompute leaves it, the new slot
      // read back (this thread stored it): holding it in registers instead spills.
#pragma unroll
      for (int j = 0; j < W; ++j) {
        t.v[j] = 0.0f;
      }
      const Raw<H>* row = v.ring + e;
      float c[W];
#pragma unroll
      for (int j = 0; j < W; ++j) {
        c[j] = 0.0f;
      }
      for (int64_t s = 0; s < v.filled; ++s, row += D) {
        const LawaChunk<H, W> r = lawa_load<H, W>(row);
#pragma unroll
        for (int j = 0; j < W; ++j) {
          lawa_csum_add(t.v[j], c[j], LawaElem<H>::to_float(r.v[j]));
        }
      }
#pragma unroll
      for (int j = 0; j < W; ++j) {
        const float sum = lawa_csum_result(t.v[j], c[j]);
        t.v[j] = isfinite(sum) ? __fdiv_rn(sum, count) : lawa_wide<H>(v.ring + e + j, D, k, 0, false, v.filled);
      }
    } else {
      t = lawa_load<kLawaFloat32, W>(v.total + e);
      // While the ring fills the overwritten value is the mean itself (and count = n + 1).
      const LawaChunk<H, W> old = v.full ? lawa_load<H, W>(v.slot + e) : h;
#pragma unroll
      for (int j = 0; j < W; ++j) {
        const float was = v.full ? LawaElem<H>::to_float(old.v[j]) : t.v[j];
        const float diff = __fsub_rn(LawaElem<H>::to_float(h.v[j]), was);
        t.v[j] = __fadd_rn(t.v[j], __fdiv_rn(diff, count));
      }
      lawa_store<H, W>(v.slot + e, h);
    }
    lawa_store<kLawaFloat32, W>(v.total + e, t);
  }
};

// total = float(param) when n == 0, else decay * total + one_minus_decay * param. The
// product decay * total is rounded, then fused with the second product, as torch's
// CUDA foreach kernels compute mul_ then add_(alpha=...).
template <LawaDtype P>
struct EmaOp {
  float* total;
  const int64_t* pushes;
  float decay;
  float one_minus_decay;

  struct View {
    const Raw<P>* param;
    float* total;
    bool first;
    bool vec;
  };

  __device__ View view(const LawaSegment& seg, int64_t n, int64_t lo) const {
    View v;
    v.param = static_cast<const Raw<P>*>(seg.param) + lo;
    v.total = total + seg.offset + lo;
    v.first = n == 0;
    v.vec = lawa_aligned(v.param) && lawa_aligned(v.total);
    return v;
  }

  template <int W>
  __device__ void step(const View& v, int e) const {
    const LawaChunk<P, W> p = lawa_load<P, W>(v.param + e);
    LawaChunk<kLawaFloat32, W> t;
    if (v.first) {
#pragma unroll
      for (int j = 0; j < W; ++j) {
        t.v[j] = LawaElem<P>::to_float(p.v[j]);
      }
    } else {
      t = lawa_load<kLawaFloat32, W>(v.total + e);
#pragma unroll
      for (int j = 0; j < W; ++j) {
        t.v[j] = __fmaf_rn(one_minus_decay, LawaElem<P>::to_float(p.v[j]), __fmul_rn(decay, t.v[j]));
      }
    }
    lawa_store<kLawaFloat32, W>(v.total + e, t);
  }
};

// backup = param, then param = round(average): the mean in total, or for last = j the
// compensated sum of the slots over an IEEE division; where that mean or sum is not
// finite, the float64 mean of the same slots (lawa_wide). One kernel per
// kind of average keeps each small: with all three in one, bfloat16 and float16
// parameters spilled 12-16 bytes on sm_90.
template <LawaDtype P, LawaDtype H, LawaAverage A>
struct SwapInOp {
  Raw<P>* backup;
  const float* total;
  const Raw<H>* ring;
  const int64_t* pushes;
  int64_t D;
  int64_t k;
  int64_t last;

  struct View {
    Raw<P>* param;
    Raw<P>* backup;
    const float* total;
    const Raw<H>* ring;  // slot 0 of the segment's slice (not in kLawaEma)
    int64_t newest;      // slot of the newest snapshot (kLawaLast only)
    int64_t slots;       // snapshots averaged
    float count;         // divisor of last=j's mean (kLawaLast only)
    bool vec;
  };

  __device__ View view(const LawaSegment& seg, int64_t n, int64_t lo) const {
    View v;
    v.param = static_cast<Raw<P>*>(seg.param) + lo;
    v.backup = backup + seg.offset + lo;
    v.total = total + seg.offset + lo;
    v.ring = A == kLawaEma ? nullptr : ring + seg.offset + lo;
    v.newest = A == kLawaLast ? (n - 1) % k : 0;
    v.slots = A == kLawaLast ? last : (n < k ? n : k);
    v.count = float(last);
    v.vec = lawa_aligned(v.param) && lawa_aligned(v.backup);
    if (A == kLawaLast) {
      v.vec = v.vec && lawa_aligned(v.ring) && (D * int64_t(sizeof(Raw<H>))) % 16 == 0;
    } else {
      v.vec = v.vec && lawa_aligned(v.total);
    }
    return v;
  }

  template <int W>
  __device__ void step(const View& v, int e) const {
    const LawaChunk<P, W> p = lawa_load<P, W>(v.param + e);
    lawa_store<P, W>(v.backup + e, p);
    float avg[W];
    if constexpr (A == kLawaLast) {
      float c[W];
#pragma unroll
      for (int j = 0; j < W; ++j) {
        avg[j] = 0.0f;
        c[j] = 0.0f;
      }
      // The newest slot first, as the contract accumulates them; stepping back through
      // the ring wraps with a compare, not a 64-bit % k per slot.
      int64_t s = v.newest;
      for (int64_t i = 0; i < last; ++i) {
        const LawaChunk<H, W> r = lawa_load<H, W>(v.ring + s * D + e);
#pragma unroll
        for (int j = 0; j < W; ++j) {
          lawa_csum_add(avg[j], c[j], LawaElem<H>::to_float(r.v[j]));
        }
        s = (s == 0 ? k : s) - 1;
      }
#pragma unroll
      for (int j = 0; j < W; ++j) {
        const float sum = lawa_csum_result(avg[j], c[j]);
        avg[j] = isfinite(sum) ? __fdiv_rn(sum, v.count)
                               : lawa_wide<H>(v.ring + e + j, D, k, v.newest, true, v.slots);
      }
    } else {
      const LawaChunk<kLawaFloat32, W> t = lawa_load<kLawaFloat32, W>(v.total + e);
#pragma unroll
      for (int j = 0; j < W; ++j) {
        if (A == kLawaEma) {
          avg[j] = t.v[j];
        } else {
          avg[j] = isfinite(t.v[j]) ? t.v[j] : lawa_wide<H>(v.ring + e + j, D, k, 0, false, v.slots);
        }
      }
    }
    LawaChunk<P, W> out;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      out.v[j] = lawa_round<P>(avg[j]);
    }
    lawa_store<P, W>(v.param + e, out);
  }
};

// backup = param, then param = round(s + c): Neumaier's compensated sum of
// weights[i] * slot(newest - i), i = 0 .. count - 1, every product and sum rounded once
// (_rn intrinsics: no contraction into an FMA). The coefficients are read from device
// memory, so a new vector needs neither a host sync nor another kernel.
template <LawaDtype P, LawaDtype H>
struct SwapWeightedOp {
  Raw<P>* backup;
  const Raw<H>* ring;
  const float* weights;
  const int64_t* pushes;
  int64_t D;
  int64_t k;
  int64_t count;

  struct View {
    Raw<P>* param;
    Raw<P>* backup;
    const Raw<H>* ring;  // slot 0 of the segment's slice
    int64_t newest;      // slot of the newest snapshot
    bool vec;
  };

  __device__ View view(const LawaSegment& seg, int64_t n, int64_t lo) const {
    View v;
    v.param = static_cast<Raw<P>*>(seg.param) + lo;
    v.backup = backup + seg.offset + lo;
    v.ring = ring + seg.offset + lo;
    v.newest = (n - 1) % k;
    v.vec = lawa_aligned(v.param) && lawa_aligned(v.backup) && lawa_aligned(v.ring) &&
            (D * int64_t(sizeof(Raw<H>))) % 16 == 0;
    return v;
  }

  template <int W>
  __device__ void step(const View& v, int e) const {
    const LawaChunk<P, W> p = lawa_load<P, W>(v.param + e);
    lawa_store<P, W>(v.backup + e, p);
    float s[W];
    float c[W];
#pragma unroll
    for (int j = 0; j < W; ++j) {
      s[j] = 0.0f;
      c[j] = 0.0f;
    }
    int64_t slot = v.newest;
    for (int64_t i = 0; i < count; ++i) {
      const float w = __ldg(weights + i);
      const LawaChunk<H, W> r = lawa_load<H, W>(v.ring + slot * D + e);
#pragma unroll
      for (int j = 0; j < W; ++j) {
        const float y = __fmul_rn(w, LawaElem<H>::to_float(r.v[j]));
        const float t = __fadd_rn(s[j], y);
        const float d = fabsf(s[j]) >= fabsf(y) ? __fadd_rn(__fsub_rn(s[j], t), y)
                                                : __fadd_rn(__fsub_rn(y, t), s[j]);
        c[j] = __fadd_rn(c[j], d);
        s[j] = t;
      }
      slot = (slot == 0 ? k : slot) - 1;
    }
    LawaChunk<P, W> out;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      out.v[j] = lawa_round<P>(__fadd_rn(s[j], c[j]));
    }
    lawa_store<P, W>(v.param + e, out);
  }
};

// param = backup, bit for bit.
template <LawaDtype P>
struct SwapBackOp {
  const Raw<P>* backup;
  const int64_t* pushes;  // null: swap_back does not read the counter

  struct View {
    Raw<P>* param;
    const Raw<P>* backup;
    bool vec;
  };

  __device__ View view(const LawaSegment& seg, int64_t, int64_t lo) const {
    View v;
    v.param = static_cast<Raw<P>*>(seg.param) + lo;
    v.backup = backup + seg.offset + lo;
    v.vec = lawa_aligned(v.param) && lawa_aligned(v.backup);
    return v;
  }

  template <int W>
  __device__ void step(const View& v, int e) const {
    lawa_store<P, W>(v.param + e, lawa_load<P, W>(v.backup + e));
  }
};

// total = csum(ring[0], ..., ring[c - 1]) / c in slot order, c = min(n, k); wide of the
// same slots where the sum is not finite; 0 for c = 0.
template <LawaDtype H>
struct RecomputeOp {
  const Raw<H>* ring;
  float* total;
  const int64_t* pushes;
  int64_t D;
  int64_t k;

  struct View {
    const Raw<H>* ring;  // slot 0 of the segment's slice
    float* total;
    int64_t filled;
    bool vec;
  };

  __device__ View view(const LawaSegment& seg, int64_t n, int64_t lo) const {
    View v;
    v.ring = ring + seg.offset + lo;
    v.total = total + seg.offset + lo;
    v.filled = n < k ? n : k;
    v.vec = lawa_aligned(v.ring) && lawa_aligned(v.total) && (D * int64_t(sizeof(Raw<H>))) % 16 == 0;
    return v;
  }

  template <int W>
  __device__ void step(const View& v, int e) const {
    LawaChunk<kLawaFloat32, W> t;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      t.v[j] = 0.0f;
    }
    float c[W];
#pragma unroll
    for (int j = 0; j < W; ++j) {
      c[j] = 0.0f;
    }
    for (int64_t s = 0; s < v.filled; ++s) {
      const LawaChunk<H, W> r = lawa_load<H, W>(v.ring + s * D + e);
#pragma unroll
      for (int j = 0; j < W; ++j) {
        lawa_csum_add(t.v[j], c[j], LawaElem<H>::to_float(r.v[j]));
      }
    }
    const float count = float(v.filled > 0 ? v.filled : 1);
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const float sum = lawa_csum_result(t.v[j], c[j]);
      t.v[j] = isfinite(sum) ? __fdiv_rn(sum, count) : lawa_wide<H>(v.ring + e + j, D, k, 0, false, v.filled);
    }
    lawa_store<kLawaFloat32, W>(v.total + e, t);
  }
};

// The in-place swap of lawa_optim.ops between parameters and the running mean, no
// backup: float32 parameters trade places with it (its own inverse); a bfloat16
// parameter w with mean m gets round(m) and m's word keeps (w << 16) | low16(m), and
// `back` restores both.
template <LawaDtype P>
struct ExchangeOp {
  float* total;
  bool back;
  const int64_t* pushes;  // null: the exchange does not read the counter

  struct View {
    Raw<P>* param;
    float* total;
    bool vec;
  };

  __device__ View view(const LawaSegment& seg, int64_t, int64_t lo) const {
    View v;
    v.param = static_cast<Raw<P>*>(seg.param) + lo;
    v.total = total + seg.offset + lo;
    v.vec = lawa_aligned(v.param) && lawa_aligned(v.total);
    return v;
  }

  template <int W>
  __device__ void step(const View& v, int e) const {
    const LawaChunk<P, W> p = lawa_load<P, W>(v.param + e);
    const LawaChunk<kLawaFloat32, W> t = lawa_load<kLawaFloat32, W>(v.total + e);
    LawaChunk<P, W> shown;
    LawaChunk<kLawaFloat32, W> kept;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      if constexpr (P == kLawaFloat32) {
        shown.v[j] = t.v[j];
        kept.v[j] = p.v[j];
      } else {
        const unsigned word = __float_as_uint(t.v[j]), low = word & 0xFFFFu, w = p.v[j];
        shown.v[j] = static_cast<Raw<P>>(back ? word >> 16 : (word + 0x8000u) >> 16);
        kept.v[j] = __uint_as_float(back ? (((w - (low >> 15)) & 0xFFFFu) << 16) | low : (w << 16) | low);
      }
    }
    lawa_store<P, W>(v.param + e, shown);
    lawa_store<kLawaFloat32, W>(v.total + e, kept);
  }
};

}  // namespace

cudaError_t lawa_push(const LawaLaunch& launch, LawaDtype param_dtype, LawaDtype history_dtype,
                      void* ring, float* total, const int64_t* pushes, int64_t D, int64_t k,
                      int64_t refresh_every) {
  if (k < 1 || refresh_every < 1) {
    return cudaErrorInvalidValue;
  }
  return lawa_dispatch(param_dtype, [&](auto p) {
    return lawa_dispatch(history_dtype, [&](auto h) {
      constexpr LawaDtype P = decltype(p)::value;
      constexpr LawaDtype H = decltype(h)::value;
      return lawa_apply(launch, PushOp<P, H>{static_cast<Raw<H>*>(ring), total, pushes, D, k, refresh_every});
    });
  });
}

cudaError_t lawa_ema_update(const LawaLaunch& launch, LawaDtype param_dtype, float* total,
                            const int64_t* pushes, float decay, float one_minus_decay) {
  return lawa_dispatch(param_dtype, [&](auto p) {
    constexpr LawaDtype P = decltype(p)::value;
    return lawa_apply(launch, EmaOp<P>{total, pushes, decay, one_minus_decay});
  });
}

cudaError_t lawa_swap_in(const LawaLaunch& launch, LawaDtype param_dtype, LawaDtype history_dtype,
                         LawaAverage average, void* backup, const float* total, const void* ring,
                         const int64_t* pushes, int64_t D, int64_t k, int64_t last) {
  if ((average != kLawaEma && ring == nullptr) || (average == kLawaLast && (last < 1 || last > k))) {
    return cudaErrorInvalidValue;  // the mean reads the ring where the sum is not finite
  }
  return lawa_dispatch(param_dtype, [&](auto p) {
    return lawa_dispatch(history_dtype, [&](auto h) {
      constexpr LawaDtype P = decltype(p)::value;
      constexpr LawaDtype H = decltype(h)::value;
      const auto launch_as = [&](auto a) {
        constexpr LawaAverage A = decltype(a)::value;
        return lawa_apply(launch, SwapInOp<P, H, A>{static_cast<Raw<P>*>(backup), total,
                                                    static_cast<const Raw<H>*>(ring), pushes, D, k,
                                                    last});
      };
      switch (average) {
        case kLawaMean:
          return launch_as(std::integral_constant<LawaAverage, kLawaMean>{});
        case kLawaEma:
          return launch_as(std::integral_constant<LawaAverage, kLawaEma>{});
        case kLawaLast:
          return launch_as(std::integral_constant<LawaAverage, kLawaLast>{});
      }
      return cudaErrorInvalidValue;
    });
  });
}

cudaError_t lawa_swap_weighted(const LawaLaunch& launch, LawaDtype param_dtype,
                               LawaDtype history_dtype, void* backup, const void* ring,
                               const float* weights, const int64_t* pushes, int64_t D, int64_t k,
                               int64_t count) {
  if (ring == nullptr || weights == nullptr || count < 1 || count > k) {
    return cudaErrorInvalidValue;
  }
  return lawa_dispatch(param_dtype, [&](auto p) {
    return lawa_dispatch(history_dtype, [&](auto h) {
      constexpr LawaDtype P = decltype(p)::value;
      constexpr LawaDtype H = decltype(h)::value;
      return lawa_apply(launch, SwapWeightedOp<P, H>{static_cast<Raw<P>*>(backup),
                                                     static_cast<const Raw<H>*>(ring), weights,
                                                     pushes, D, k, count});
    });
  });
}

cudaError_t lawa_swap_back(const LawaLaunch& launch, LawaDtype param_dtype, const void* backup) {
  return lawa_dispatch(param_dtype, [&](auto p) {
    constexpr LawaDtype P = decltype(p)::value;
    return lawa_apply(launch, SwapBackOp<P>{static_cast<const Raw<P>*>(backup), nullptr});
  });
}

cudaError_t lawa_recompute(const LawaLaunch& launch, LawaDtype history_dtype, const void* ring,
                           float* total, const int64_t* pushes, int64_t D, int64_t k) {
  return lawa_dispatch(history_dtype, [&](auto h) {
    constexpr LawaDtype H = decltype(h)::value;
    return lawa_apply(launch, RecomputeOp<H>{static_cast<const Raw<H>*>(ring), total, pushes, D, k});
  });
}

cudaError_t lawa_exchange(const LawaLaunch& launch, LawaDtype param_dtype, float* total, bool back) {
  switch (param_dtype) {
    case kLawaFloat32:
      return lawa_apply(launch, ExchangeOp<kLawaFloat32>{total, back, nullptr});
    case kLawaBFloat16:
      return lawa_apply(launch, ExchangeOp<kLawaBFloat16>{total, back, nullptr});
    default:
      return cudaErrorInvalidValue;  // float16 parameters keep a backup
  }
}
