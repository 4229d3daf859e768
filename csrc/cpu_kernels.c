/* Fused CPU kernels of the LAWA history (Kaddour 2022, arXiv:2209.14981).
 *
 * Each operation of lawa_optim.ops in one pass over memory, bit for bit as that
 * module's docstring specifies:
 *   push       new = cast(param); old = slot; slot = new; the running mean
 *              total += ((float)new - (float)old) / k, each operation rounded to float32
 *              (total += ((float)new - total) / (n + 1) while the ring fills; 20 bytes per
 *              float32 element). At a refresh push total = csum(ring[0], ...,
 *              ring[filled - 1]) / filled in slot order instead (wide of the same slots
 *              where the sum is not finite), the new slot included, computed block by
 *              block while the block is in cache.
 *   ema        total = fma(param, 1 - decay, decay * total): the product rounded, then one
 *              fused multiply-add, as torch's CPU add-with-alpha rounds (the caller probes
 *              torch and passes fused = 0 where it does not fuse).
 *   swap_in    backup = param; param = round(total) (the mean, or the EMA), or
 *              round(csum(newest, ..., j-th newest) / j) for last = j; where the mean or
 *              the sum is not finite (but in EMA mode), round(wide(the same slots)).
 *   swap_weighted  backup = param; param = round(s + c), the compensated (Neumaier) sum
 *              of the newest slots times float32 coefficients, newest first.
 *   swap_back  param = backup.
 *   push_int8, swap_int8  the 8-bit history: a delta per block of QBLOCK elements against
 *              the float32 anchor (the newest stored snapshot), quantised to int8 with one
 *              float32 scale, and the anchor moved by what was stored (closed loop); the
 *              swap-in the compensated sum of the anchor and the dequantised deltas times
 *              float32 coefficients (lawa_optim.ops). Their work tables have a fourth
 *              column: the index of the row's first block.
 *   exchange   the swap without a backup: float32 parameters and the mean trade places;
 *              a bfloat16 parameter gets round(mean) and the mean's word keeps
 *              (bits(param) << 16) | low16(bits(mean)); back: the exact inverse.
 * round is the cast but for bfloat16 parameters: to nearest, ties away from zero
 * ((bits + 0x8000) >> 16), which the exchange can undo.
 *
 * Build WITHOUT -ffast-math and with -ffp-contract=off: a contracted multiply-add or a
 * reassociated sum would break bit-equality with the torch reference.
 *
 * Work is a table of rows (parameter address, offset in the flat buffers, element
 * count), each at most a few hundred KiB, shared among OpenMP threads. Every entry
 * point returns 0, -1 for a dtype code outside 0..2, or -2 for counts that would index
 * outside the ring (checked before anything is written).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* Dtype codes, the indices of the dispatch tables below. */
enum { LAWA_F32 = 0, LAWA_BF16 = 1, LAWA_F16 = 2 };

typedef float f32_t;
typedef uint16_t bf16_t;
typedef uint16_t f16_t; /* the bits: GCC 12 vectorises no _Float16 conversion */

/* Elements per block of the multi-slot sums: a float32 block is 8 KiB, so the block of
 * total stays in L1 while the slots stream past it. */
#define BLOCK 2048

static inline float bits_to_f(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline uint32_t f_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float f32_to_f(f32_t x) { return x; }
static inline float bf16_to_f(bf16_t x) { return bits_to_f((uint32_t)x << 16); }

/* float16 <-> float32 in integer and exact float arithmetic that vectorises (M. Dukhan's
 * FP16 library, also c10's software path): every value converts as the F16C/AVX-512
 * instructions that torch uses do (round to nearest even, overflow to infinity,
 * subnormals exact, unaffected by flush-to-zero); a NaN stays a NaN of the same sign,
 * with a canonical payload. */
static inline float f16_to_f(f16_t h) {
    uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    float normalized = bits_to_f((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    float denormalized = bits_to_f((two_w >> 17) | (126u << 23)) - 0.5f;
    return bits_to_f(sign | (two_w < (1u << 27) ? f_to_bits(denormalized) : f_to_bits(normalized)));
}
static inline f16_t f_to_f16(float f) {
    uint32_t w = f_to_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    uint32_t bits = f_to_bits(bits_to_f((bias >> 1) + 0x07800000u) + base);
    uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
    return (f16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

/* Round to nearest even on the bit pattern, as torch does; torch maps a NaN to 0xFFFF
 * from float32 but to 0x7FC0 from float16, so the caller says which. */
static inline bf16_t f_to_bf16(float f, bf16_t nan) {
    uint32_t u = f_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return nan;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

/* cast(param) into the history dtype, as Tensor.to does: a bit copy for equal dtypes. */
static inline f32_t cast_f32_f32(f32_t x) { return x; }
static inline bf16_t cast_f32_bf16(f32_t x) { return f_to_bf16(x, 0xffffu); }
static inline f16_t cast_f32_f16(f32_t x) { return f_to_f16(x); }
static inline f32_t cast_bf16_f32(bf16_t x) { return bf16_to_f(x); }
static inline bf16_t cast_bf16_bf16(bf16_t x) { return x; }
static inline f16_t cast_bf16_f16(bf16_t x) { return f_to_f16(bf16_to_f(x)); }
static inline f32_t cast_f16_f32(f16_t x) { return f16_to_f(x); }
static inline bf16_t cast_f16_bf16(f16_t x) { return f_to_bf16(f16_to_f(x), 0x7fc0u); }
static inline f16_t cast_f16_f16(f16_t x) { return x; }

/* round of the swaps: the cast, but to nearest with ties away from zero for bfloat16,
 * which the exchange inverts from the low half it keeps. */
static inline f32_t avg_f32_f32(float x) { return x; }
static inline bf16_t avg_f32_bf16(float x) {
    uint32_t u = f_to_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0xffffu;
    return (bf16_t)((u + 0x8000u) >> 16);
}
static inline f16_t avg_f32_f16(float x) { return f_to_f16(x); }

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* csum of lawa_optim.ops (Neumaier's compensated sum): s += x, the rounding error of that
 * addition added to c; the sum is csum_result(s, c). */
static inline void csum_add(float *s, float *c, float x) {
    /* Both errors computed, one selected: a plain select vectorises, a branch does not. */
    float t = *s + x, if_s = (*s - t) + x, if_x = (x - t) + *s;
    *c += fabsf(*s) >= fabsf(x) ? if_s : if_x;
    *s = t;
}
static inline float csum_result(float s, float c) { return isfinite(s) ? s + c : s; }

/* dst = src with non-temporal stores where the CPU has them: the destination (a backup,
 * or weights restored from one) is not read into the cache first, which saves a third of
 * the traffic (2x measured on GPT-2 small's swap-back, one thread). */
static void copy_streaming(char *restrict dst, const char *restrict src, size_t n) {
#if defined(__SSE2__)
    size_t i = (16 - ((uintptr_t)dst & 15)) & 15;
    if (i > n) i = n;
    memcpy(dst, src, i);
    for (; i + 64 <= n; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
        _mm_stream_si128((__m128i *)(dst + i), a);
        _mm_stream_si128((__m128i *)(dst + i + 16), b);
        _mm_stream_si128((__m128i *)(dst + i + 32), c);
        _mm_stream_si128((__m128i *)(dst + i + 48), d);
    }
    memcpy(dst + i, src + i, n - i);
    _mm_sfence();
#else
    memcpy(dst, src, n);
#endif
}

/* wide of lawa_optim.ops for element 0 of `ring` (slot 0 at this element): the `count`
 * slots in slot order, or newest first after `pushes` pushes, summed in double. Runs only
 * where the float32 sum is not finite. */
#define DEFINE_WIDE(H)                                                                      \
    static float wide_##H(const H##_t *ring, int64_t D, int64_t k, int64_t pushes,          \
                          int newest_first, int64_t count) {                                \
        double w = 0.0;                                                                     \
        for (int64_t j = 0; j < count; j++)                                                 \
            w += (double)H##_to_f(ring[(newest_first ? (pushes - 1 - j) % k : j) * D]);      \
        return (float)(w / (double)count);                                                  \
    }

/* mode: 0 while the ring fills (total += (new - total) / filled), 1 on a full ring
 * (total += (new - old) / k), 2 at a refresh (total = the mean of the first `filled`
 * slots, slot s holding new). The
 * restrict pointers of the refresh live in separate blocks: slot s is one of the slots
 * summed, so no two of them may be live at once. */
#define DEFINE_PUSH(P, H)                                                                   \
    static void push_##P##_##H(const void *src_, void *ring_, int64_t D, int64_t k,         \
                               int64_t s, int64_t filled, int mode, float *restrict total,  \
                               int64_t n) {                                                 \
        const P##_t *restrict src = src_;                                                   \
        H##_t *ring = ring_;                                                                \
        float count = (float)filled;                                                        \
        if (mode == 1) {                                                                    \
            H##_t *restrict slot = ring + s * D;                                            \
            for (int64_t i = 0; i < n; i++) {                                               \
                H##_t nw = cast_##P##_##H(src[i]);                                          \
                float d = (H##_to_f(nw) - H##_to_f(slot[i])) / count;                       \
                slot[i] = nw;                                                               \
                total[i] = total[i] + d;                                                    \
            }                                                                               \
        } else if (mode == 0) {                                                             \
            H##_t *restrict slot = ring + s * D;                                            \
            for (int64_t i = 0; i < n; i++) {                                               \
                H##_t nw = cast_##P##_##H(src[i]);                                          \
                slot[i] = nw;                                                               \
                total[i] = total[i] + (H##_to_f(nw) - total[i]) / count;                    \
            }                                                                               \
        } else {                                                                            \
            float comp[BLOCK];                                                              \
            for (int64_t b = 0; b < n; b += BLOCK) {                                        \
                int64_t e = b + min64(BLOCK, n - b);                                        \
                {                                                                           \
                    H##_t *restrict slot = ring + s * D;                                    \
                    for (int64_t i = b; i < e; i++) slot[i] = cast_##P##_##H(src[i]);       \
                }                                                                           \
                for (int64_t i = b; i < e; i++) total[i] = comp[i - b] = 0.0f;              \
                for (int64_t j = 0; j < filled; j++) {                                      \
                    const H##_t *restrict r = ring + j * D;                                 \
                    for (int64_t i = b; i < e; i++) csum_add(&total[i], &comp[i - b], H##_to_f(r[i]));\
                }                                                                           \
                for (int64_t i = b; i < e; i++) {                                           \
                    comp[i - b] = csum_result(total[i], comp[i - b]);                       \
                    total[i] = comp[i - b] / count;                                         \
                }                                                                           \
                for (int64_t i = b; i < e; i++)                                             \
                    if (!isfinite(comp[i - b])) total[i] = wide_##H(ring + i, D, k, 0, 0, filled);\
            }                                                                               \
        }                                                                                   \
    }

/* The average of one row into the parameter, after backing the parameter up: mode 0
 * rounds total (EMA), 1 rounds the mean in total, 2 averages the `count` newest slots. */
#define DEFINE_SWAP_IN(P, H)                                                                \
    static void swap_in_##P##_##H(void *param_, void *backup_, const float *restrict total, \
                                  const void *ring_, int64_t D, int64_t k, int64_t pushes,  \
                                  int mode, int64_t count, int64_t n) {                     \
        copy_streaming(backup_, param_, (size_t)n * sizeof(P##_t));                         \
        P##_t *restrict param = param_;                                                     \
        const H##_t *ring = ring_;                                                          \
        float divisor = (float)count;                                                       \
        if (mode != 2) {                                                                    \
            for (int64_t i = 0; i < n; i++) param[i] = avg_f32_##P(total[i]);               \
            for (int64_t i = 0; mode == 1 && i < n; i++)                                    \
                if (!isfinite(total[i]))                                                    \
                    param[i] = avg_f32_##P(wide_##H(ring + i, D, k, pushes, 0, count));     \
        } else {                                                                            \
            float acc[BLOCK], comp[BLOCK];                                                  \
            for (int64_t b = 0; b < n; b += BLOCK) {                                        \
                int64_t m = min64(BLOCK, n - b);                                            \
                for (int64_t i = 0; i < m; i++) acc[i] = comp[i] = 0.0f;                    \
                for (int64_t j = 0; j < count; j++) {                                       \
                    const H##_t *restrict r = ring + ((pushes - 1 - j) % k) * D + b;        \
                    for (int64_t i = 0; i < m; i++) csum_add(&acc[i], &comp[i], H##_to_f(r[i])); \
                }                                                                           \
                for (int64_t i = 0; i < m; i++) {                                           \
                    acc[i] = csum_result(acc[i], comp[i]);                                  \
                    param[b + i] = avg_f32_##P(acc[i] / divisor);                           \
                }                                                                           \
                for (int64_t i = 0; i < m; i++)                                             \
                    if (!isfinite(acc[i]))                                                  \
                        param[b + i] = avg_f32_##P(wide_##H(ring + b + i, D, k, pushes, 1, count)); \
            }                                                                               \
        }                                                                                   \
    }

/* The weighted average of one row into the parameter, after backing the parameter up:
 * cast(s + c), Neumaier's compensated sum of w[j] * (slot of the j-th newest snapshot),
 * j = 0 .. count - 1, each product and each sum rounded once (lawa_optim.ops). */
#define DEFINE_SWAP_WEIGHTED(P, H)                                                          \
    static void swap_weighted_##P##_##H(void *param_, void *backup_, const void *ring_,     \
                                        int64_t D, int64_t k, int64_t pushes,               \
                                        const float *restrict w, int64_t count, int64_t n) {\
        copy_streaming((char *)backup_, (const char *)param_, sizeof(P##_t) * (size_t)n);   \
        P##_t *restrict param = param_;                                                     \
        const H##_t *ring = ring_;                                                          \
        float sum[BLOCK], comp[BLOCK];                                                      \
        for (int64_t b = 0; b < n; b += BLOCK) {                                            \
            int64_t m = min64(BLOCK, n - b);                                                \
            for (int64_t i = 0; i < m; i++) sum[i] = comp[i] = 0.0f;                        \
            for (int64_t j = 0; j < count; j++) {                                           \
                int64_t slot = (pushes - 1 - j) % k;                                        \
                const H##_t *restrict r = ring + slot * D + b;                              \
                float wj = w[j];                                                            \
                for (int64_t i = 0; i < m; i++) {                                           \
                    float y = wj * H##_to_f(r[i]), s = sum[i], t = s + y;                   \
                    comp[i] = comp[i] + (fabsf(s) >= fabsf(y) ? (s - t) + y : (y - t) + s); \
                    sum[i] = t;                                                             \
                }                                                                           \
            }                                                                               \
            for (int64_t i = 0; i < m; i++) param[b + i] = avg_f32_##P(sum[i] + comp[i]);   \
        }                                                                                   \
    }

#define DEFINE_EMA(P)                                                                       \
    static void ema_##P(const void *src_, float *restrict total, int first, int fused,      \
                        float decay, float alpha, int64_t n) {                              \
        const P##_t *restrict src = src_;                                                   \
        if (first) {                                                                        \
            for (int64_t i = 0; i < n; i++) total[i] = P##_to_f(src[i]);                    \
        } else if (fused) {                                                                 \
            for (int64_t i = 0; i < n; i++) total[i] = fmaf(P##_to_f(src[i]), alpha, total[i] * decay); \
        } else {                                                                            \
            for (int64_t i = 0; i < n; i++) total[i] = total[i] * decay + P##_to_f(src[i]) * alpha; \
        }                                                                                   \
    }

#define FOR_HISTORY(X, P) X(P, f32) X(P, bf16) X(P, f16)
#define FOR_PAIRS(X) FOR_HISTORY(X, f32) FOR_HISTORY(X, bf16) FOR_HISTORY(X, f16)
#define DEFINE_PUSH_(P, H) DEFINE_PUSH(P, H)
#define DEFINE_SWAP_IN_(P, H) DEFINE_SWAP_IN(P, H)
#define DEFINE_SWAP_WEIGHTED_(P, H) DEFINE_SWAP_WEIGHTED(P, H)
DEFINE_WIDE(f32)
DEFINE_WIDE(bf16)
DEFINE_WIDE(f16)
FOR_PAIRS(DEFINE_PUSH_)
FOR_PAIRS(DEFINE_SWAP_IN_)
FOR_PAIRS(DEFINE_SWAP_WEIGHTED_)
DEFINE_EMA(f32)
DEFINE_EMA(bf16)
DEFINE_EMA(f16)

/* Elements per quantisation block of the 8-bit history (lawa_optim.ops.QBLOCK). */
#define QBLOCK 256

/* Round to nearest even for |x| <= 2**22: exact, and it vectorises. */
static inline float rint_small(float x) { return (x + 0x1.8p23f) - 0x1.8p23f; }

/* One row of an 8-bit push: `codes` and `scales` are the row's part of the delta slot.
 * first: the first push (or k == 1): the anchor becomes the weights. */
#define DEFINE_PUSH_INT8(P)                                                                \
    static void push_int8_##P(const void *src_, float *restrict anchor, int8_t *restrict codes, \
                              float *restrict scales, int first, int64_t n) {              \
        const P##_t *restrict src = src_;                                                  \
        if (first) {                                                                       \
            for (int64_t i = 0; i < n; i++) anchor[i] = P##_to_f(src[i]);                  \
            return;                                                                        \
        }                                                                                  \
        float d[QBLOCK];                                                                   \
        for (int64_t b = 0; b < n; b += QBLOCK) {                                          \
            int64_t m = min64(QBLOCK, n - b);                                              \
            /* max |d| on the bits: a NaN or an infinity is above every finite value. */   \
            uint32_t top = 0;                                                              \
            for (int64_t i = 0; i < m; i++) {                                              \
                float x = P##_to_f(src[b + i]) - anchor[b + i];                            \
                uint32_t u = f_to_bits(x) & 0x7fffffffu;                                   \
                d[i] = x;                                                                  \
                top = u > top ? u : top;                                                   \
            }                                                                              \
            float mx = bits_to_f(top);                                                     \
            if (top >= 0x7f800000u) {                                                      \
                scales[b / QBLOCK] = NAN;                                                  \
                for (int64_t i = 0; i < m; i++) {                                          \
                    codes[b + i] = 0;                                                      \
                    anchor[b + i] = P##_to_f(src[b + i]);                                  \
                }                                                                          \
            } else if (mx < 0x1p-120f) {                                                   \
                scales[b / QBLOCK] = 0.0f;                                                 \
                for (int64_t i = 0; i < m; i++) codes[b + i] = 0;                          \
            } else {                                                                       \
                float scale = mx / 127.0f, inv = 127.0f / mx;                              \
                scales[b / QBLOCK] = scale;                                                \
                for (int64_t i = 0; i < m; i++) {                                          \
                    float q = rint_small(d[i] * inv);                                      \
                    codes[b + i] = (int8_t)(int32_t)q;                                     \
                    anchor[b + i] = anchor[b + i] + q * scale;                             \
                }                                                                          \
            }                                                                              \
        }                                                                                  \
    }

/* One row of an 8-bit swap-in: param = cast(s + c), Neumaier's sum of coef[0] * anchor and
 * coef[j] * float(code) * scale of the j-th newest delta, slot (pushes - 1 - j) % (k - 1),
 * j = 1 .. m - 1, after `pushes` pushes. `ring`
 * and `scales` point at the row's part of slot 0. */
#define DEFINE_SWAP_INT8(P)                                                                \
    static void swap_int8_##P(void *param_, void *backup_, const float *restrict anchor,   \
                              const int8_t *ring, const float *scales, int64_t D, int64_t nb, \
                              int64_t k, int64_t pushes, const float *coef, int64_t m,     \
                              int64_t n) {                                                 \
        copy_streaming((char *)backup_, (const char *)param_, sizeof(P##_t) * (size_t)n);  \
        P##_t *restrict param = param_;                                                    \
        float acc[BLOCK], cmp[BLOCK];                                                      \
        for (int64_t b = 0; b < n; b += BLOCK) {                                           \
            int64_t len = min64(BLOCK, n - b);                                             \
            float w0 = coef[0];                                                            \
            for (int64_t i = 0; i < len; i++) acc[i] = cmp[i] = 0.0f;                      \
            for (int64_t i = 0; i < len; i++) csum_add(&acc[i], &cmp[i], w0 * anchor[b + i]); \
            for (int64_t j = 1; j < m; j++) {                                              \
                int64_t slot = (pushes - 1 - j) % (k - 1);                                 \
                const int8_t *restrict r = ring + b + slot * D;                            \
                const float *sc = scales + slot * nb + b / QBLOCK;                         \
                float wj = coef[j];                                                        \
                for (int64_t q = 0; q < len; q += QBLOCK) {                                \
                    float scale = sc[q / QBLOCK];                                          \
                    int64_t e = min64(q + QBLOCK, len);                                    \
                    for (int64_t i = q; i < e; i++)                                        \
                        csum_add(&acc[i], &cmp[i], wj * ((float)r[i] * scale));            \
                }                                                                          \
            }                                                                              \
            for (int64_t i = 0; i < len; i++) param[b + i] = cast_f32_##P(acc[i] + cmp[i]);\
        }                                                                                  \
    }

DEFINE_PUSH_INT8(f32)
DEFINE_PUSH_INT8(bf16)
DEFINE_PUSH_INT8(f16)
DEFINE_SWAP_INT8(f32)
DEFINE_SWAP_INT8(bf16)
DEFINE_SWAP_INT8(f16)

typedef void (*push_int8_fn)(const void *, float *, int8_t *, float *, int, int64_t);
typedef void (*swap_int8_fn)(void *, void *, const float *, const int8_t *, const float *, int64_t,
                             int64_t, int64_t, int64_t, const float *, int64_t, int64_t);
static const push_int8_fn PUSH_INT8[3] = {push_int8_f32, push_int8_bf16, push_int8_f16};
static const swap_int8_fn SWAP_INT8[3] = {swap_int8_f32, swap_int8_bf16, swap_int8_f16};

typedef void (*push_fn)(const void *, void *, int64_t, int64_t, int64_t, int64_t, int, float *,
                        int64_t);
typedef void (*swap_in_fn)(void *, void *, const float *, const void *, int64_t, int64_t,
                           int64_t, int, int64_t, int64_t);
typedef void (*ema_fn)(const void *, float *, int, int, float, float, int64_t);
typedef void (*swap_weighted_fn)(void *, void *, const void *, int64_t, int64_t, int64_t,
                                 const float *, int64_t, int64_t);

#define ROW_OF(X, P) {X##_##P##_f32, X##_##P##_bf16, X##_##P##_f16}
static const push_fn PUSH[3][3] = {ROW_OF(push, f32), ROW_OF(push, bf16), ROW_OF(push, f16)};
static const swap_in_fn SWAP_IN[3][3] = {ROW_OF(swap_in, f32), ROW_OF(swap_in, bf16),
                                         ROW_OF(swap_in, f16)};
static const swap_weighted_fn SWAP_WEIGHTED[3][3] = {
    ROW_OF(swap_weighted, f32), ROW_OF(swap_weighted, bf16), ROW_OF(swap_weighted, f16)};
static const ema_fn EMA[3] = {ema_f32, ema_bf16, ema_f16};

static const int64_t ELEMENT_SIZE[3] = {[LAWA_F32] = 4, [LAWA_BF16] = 2, [LAWA_F16] = 2};

static int bad_dtype(int code) { return code < LAWA_F32 || code > LAWA_F16; }

/* rows: nrows triples (parameter address, offset into the flat buffers, count).
 * Push number n (0-based) of a ring of k slots of D elements each. */
int lawa_cpu_push(const int64_t *rows, int64_t nrows, int pdtype, int hdtype, void *ring,
                  int64_t D, int64_t k, int64_t n, int64_t refresh_every, float *total,
                  int nthreads) {
    if (bad_dtype(pdtype) || bad_dtype(hdtype)) return -1;
    if (k < 1 || refresh_every < 1 || n < 0) return -2;
    push_fn fn = PUSH[pdtype][hdtype];
    int mode = (n + 1) % refresh_every == 0 ? 2 : n >= k;
    int64_t filled = min64(n + 1, k), hsize = ELEMENT_SIZE[hdtype];
    char *base = (char *)ring;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < nrows; r++) {
        const int64_t *row = rows + 3 * r;
        fn((const void *)(intptr_t)row[0], base + row[1] * hsize, D, k, n % k, filled, mode,
           total + row[1], row[2]);
    }
    return 0;
}

/* first: 1 for the first update (total = param). */
int lawa_cpu_ema(const int64_t *rows, int64_t nrows, int pdtype, float *total, int first,
                 double decay, int fused, int nthreads) {
    if (bad_dtype(pdtype)) return -1;
    ema_fn fn = EMA[pdtype];
    /* torch rounds a Python scalar to the tensor's dtype; 1 - decay is taken in double,
     * as Python computes it. */
    float d = (float)decay, a = (float)(1.0 - decay);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < nrows; r++) {
        const int64_t *row = rows + 3 * r;
        fn((const void *)(intptr_t)row[0], total + row[1], first, fused, d, a, row[2]);
    }
    return 0;
}

/* mode 0: param = round(total) (EMA); 1: round(total), the mean of count = min(k, pushes)
 * slots; 2: the mean of the `count` newest slots after `pushes` pushes (1 <= count <=
 * min(k, pushes)). Modes 1 and 2 read the ring where a mean or a sum is not finite. */
int lawa_cpu_swap_in(const int64_t *rows, int64_t nrows, int pdtype, int hdtype, void *backup,
                     const float *total, const void *ring, int64_t D, int64_t k, int64_t pushes,
                     int mode, int64_t count, int nthreads) {
    if (bad_dtype(pdtype) || bad_dtype(hdtype)) return -1;
    if (mode < 0 || mode > 2 || count < 0 ||
        (mode != 0 && (ring == NULL || count < 1 || count > k || count > pushes)))
        return -2;
    swap_in_fn fn = SWAP_IN[pdtype][hdtype];
    int64_t psize = ELEMENT_SIZE[pdtype], hsize = ELEMENT_SIZE[hdtype];
    const char *ring_bytes = (const char *)ring;
    char *backup_bytes = (char *)backup;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < nrows; r++) {
        const int64_t *row = rows + 3 * r;
        fn((void *)(intptr_t)row[0], backup_bytes + row[1] * psize, total + row[1],
           ring_bytes == NULL ? NULL : ring_bytes + row[1] * hsize, D, k, pushes, mode, count,
           row[2]);
    }
    return 0;
}

/* param = the weighted sum of the `count` newest slots after `pushes` pushes, with the
 * float32 coefficients `weights`, newest first (1 <= count <= min(k, pushes)). */
int lawa_cpu_swap_weighted(const int64_t *rows, int64_t nrows, int pdtype, int hdtype,
                           void *backup, const void *ring, int64_t D, int64_t k, int64_t pushes,
                           const float *weights, int64_t count, int nthreads) {
    if (bad_dtype(pdtype) || bad_dtype(hdtype)) return -1;
    if (ring == NULL || weights == NULL || count < 1 || count > k || count > pushes) return -2;
    swap_weighted_fn fn = SWAP_WEIGHTED[pdtype][hdtype];
    int64_t psize = ELEMENT_SIZE[pdtype], hsize = ELEMENT_SIZE[hdtype];
    const char *ring_bytes = (const char *)ring;
    char *backup_bytes = (char *)backup;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < nrows; r++) {
        const int64_t *row = rows + 3 * r;
        fn((void *)(intptr_t)row[0], backup_bytes + row[1] * psize, ring_bytes + row[1] * hsize, D, k,
           pushes, weights, count, row[2]);
    }
    return 0;
}

int lawa_cpu_swap_back(const int64_t *rows, int64_t nrows, int pdtype, const void *backup,
                       int nthreads) {
    if (bad_dtype(pdtype)) return -1;
    int64_t psize = ELEMENT_SIZE[pdtype];
    const char *backup_bytes = (const char *)backup;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < nrows; r++) {
        const int64_t *row = rows + 3 * r;
        copy_streaming((char *)(intptr_t)row[0], backup_bytes + row[1] * psize, (size_t)(row[2] * psize));
    }
    return 0;
}

/* rows: nrows quadruples (parameter address, offset into the flat buffers, count, index of
 * the first block). Push number n (0-based) of an 8-bit history of k - 1 delta slots of D
 * codes and nb scales each. */
int lawa_cpu_push_int8(const int64_t *rows, int64_t nrows, int pdtype, int8_t *ring, float *scales,
                       int64_t D, int64_t nb, int64_t k, int64_t n, float *anchor, int nthreads) {
    if (bad_dtype(pdtype)) return -1;
    if (k < 1 || n < 0) return -2;
    push_int8_fn fn = PUSH_INT8[pdtype];
    int first = n == 0 || k == 1;
    int64_t s = first ? 0 : (n - 1) % (k - 1);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < nrows; r++) {
        const int64_t *row = rows + 4 * r;
        fn((const void *)(intptr_t)row[0], anchor + row[1], first ? NULL : ring + s * D + row[1],
           first ? NULL : scales + s * nb + row[3], first, row[2]);
    }
    return 0;
}

/* param = the swap-in of an 8-bit history after `pushes` pushes with the float32
 * coefficients `coef` of the anchor and the m - 1 newest deltas (1 <= m <= min(k, pushes)). */
int lawa_cpu_swap_int8(const int64_t *rows, int64_t nrows, int pdtype, void *backup,
                       const float *anchor, const int8_t *ring, const float *scales, int64_t D,
                       int64_t nb, int64_t k, int64_t pushes, const float *coef, int64_t m,
                       int nthreads) {
    if (bad_dtype(pdtype)) return -1;
    if (coef == NULL || m < 1 || m > k || m > pushes) return -2;
    swap_int8_fn fn = SWAP_INT8[pdtype];
    int64_t psize = ELEMENT_SIZE[pdtype];
    char *backup_bytes = (char *)backup;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < nrows; r++) {
        const int64_t *row = rows + 4 * r;
        fn((void *)(intptr_t)row[0], backup_bytes + row[1] * psize, anchor + row[1], ring + row[1],
           scales + row[3], D, nb, k, pushes, coef, m, row[2]);
    }
    return 0;
}

/* The in-place swap of a float32 running mean (total) with parameters of dtype pdtype
 * (float32 or bfloat16; -1 for another): back = 0 swaps the mean in, 1 swaps it out. */
static void exchange_f32(void *param_, void *total_, int back, int64_t n) {
    (void)back; /* a plain exchange is its own inverse */
    uint32_t *restrict param = param_, *restrict total = total_;
    for (int64_t i = 0; i < n; i++) {
        uint32_t w = param[i];
        param[i] = total[i];
        total[i] = w;
    }
}
static void exchange_bf16(void *param_, void *total_, int back, int64_t n) {
    uint16_t *restrict param = param_;
    uint32_t *restrict total = total_;
    if (!back) {
        for (int64_t i = 0; i < n; i++) {
            uint32_t m = total[i], w = param[i];
            param[i] = (uint16_t)((m + 0x8000u) >> 16);
            total[i] = (w << 16) | (m & 0xffffu);
        }
    } else {
        for (int64_t i = 0; i < n; i++) {
            uint32_t word = total[i], low = word & 0xffffu;
            uint32_t high = ((uint32_t)param[i] - (low >> 15)) & 0xffffu;
            param[i] = (uint16_t)(word >> 16);
            total[i] = (high << 16) | low;
        }
    }
}

int lawa_cpu_exchange(const int64_t *rows, int64_t nrows, int pdtype, void *total, int back,
                      int nthreads) {
    if (pdtype != LAWA_F32 && pdtype != LAWA_BF16) return -1;
    void (*fn)(void *, void *, int, int64_t) = pdtype == LAWA_F32 ? exchange_f32 : exchange_bf16;
    char *total_bytes = (char *)total;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < nrows; r++) {
        const int64_t *row = rows + 3 * r;
        fn((void *)(intptr_t)row[0], total_bytes + row[1] * 4, back, row[2]);
    }
    return 0;
}

/* 1 when every one of the n float32 values at x is finite, else 0: the in-place swap
 * exchanges a finite mean only. One read, no allocation. */
int lawa_cpu_all_finite(const void *x, int64_t n) {
    const uint32_t *restrict bits = x;
    uint32_t bad = 0;
    for (int64_t i = 0; i < n; i++) bad |= (bits[i] & 0x7f800000u) == 0x7f800000u;
    return bad == 0;
}

/* The power-function EMAs of mode="phema" (EDM2) over one row: for each of the E rows
 * of emas (stride D), ema = param where alpha == 1 (the first step), else
 * ema + alpha * (param - ema), each operation rounded once. The row's weights are widened
 * block by block into a buffer that every EMA then reads from L1: the parameters are
 * read from memory once whatever E. */
#define DEFINE_PHEMA(P)                                                                     \
    static void phema_##P(const void *src_, float *emas, int64_t D, int64_t E,              \
                          const float *restrict alphas, int64_t n) {                        \
        const P##_t *restrict src = src_;                                                   \
        float theta[BLOCK];                                                                 \
        for (int64_t b = 0; b < n; b += BLOCK) {                                            \
            int64_t m = min64(BLOCK, n - b);                                                \
            for (int64_t i = 0; i < m; i++) theta[i] = P##_to_f(src[b + i]);                \
            for (int64_t e = 0; e < E; e++) {                                               \
                float *restrict ema = emas + e * D + b;                                     \
                float a = alphas[e];                                                        \
                if (a == 1.0f) {                                                            \
                    memcpy(ema, theta, (size_t)m * sizeof(float));                          \
                } else {                                                                    \
                    for (int64_t i = 0; i < m; i++) ema[i] = ema[i] + a * (theta[i] - ema[i]); \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
    }

DEFINE_PHEMA(f32)
DEFINE_PHEMA(bf16)
DEFINE_PHEMA(f16)

typedef void (*phema_fn)(const void *, float *, int64_t, int64_t, const float *, int64_t);
static const phema_fn PHEMA[3] = {phema_f32, phema_bf16, phema_f16};

/* emas: E rows of D float32; alphas: E float32 coefficients 1 - beta_e(t). */
int lawa_cpu_phema(const int64_t *rows, int64_t nrows, int pdtype, float *emas, int64_t D,
                   int64_t E, const float *alphas, int nthreads) {
    if (bad_dtype(pdtype)) return -1;
    if (E < 1 || emas == NULL || alphas == NULL) return -2;
    phema_fn fn = PHEMA[pdtype];
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < nrows; r++) {
        const int64_t *row = rows + 3 * r;
        fn((const void *)(intptr_t)row[0], emas + row[1], D, E, alphas, row[2]);
    }
    return 0;
}
