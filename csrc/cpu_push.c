/* Fused CPU ring push of the LAWA history (Kaddour 2022, arXiv:2209.14981).
 *
 * One pass per element: new = cast(param); old = slot; slot = new;
 * total += (float)new - (float)old, the difference rounded to float32 and then added,
 * exactly as lawa_optim.ops specifies. It moves 20 bytes per float32 element; the plain
 * torch code moves 48 in five passes, a torch._foreach_* sub, copy, add 32 in three.
 *
 * Build WITHOUT -ffast-math and with -ffp-contract=off: a fused multiply-add or a
 * reassociated sum would break bit-equality with the torch reference.
 *
 * Work is a table of rows (source address, offset in the flat buffers, element count),
 * each at most a few hundred KiB, shared among OpenMP threads.
 */
#include <stdint.h>
#include <string.h>

enum { LAWA_F32 = 0, LAWA_BF16 = 1, LAWA_F16 = 2 };

typedef float f32_t;
typedef uint16_t bf16_t;
typedef _Float16 f16_t;

static inline float f32_to_f(f32_t x) { return x; }
static inline float f16_to_f(f16_t x) { return (float)x; }
static inline float bf16_to_f(bf16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even on the bit pattern, as torch does; torch maps a NaN to 0xFFFF
 * from float32 but to 0x7FC0 from float16, so the caller says which. */
static inline bf16_t f_to_bf16(float f, bf16_t nan) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return nan;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

/* cast(param) into the history dtype, as Tensor.to does: a bit copy for equal dtypes. */
static inline f32_t cast_f32_f32(f32_t x) { return x; }
static inline bf16_t cast_f32_bf16(f32_t x) { return f_to_bf16(x, 0xffffu); }
static inline f16_t cast_f32_f16(f32_t x) { return (f16_t)x; }
static inline f32_t cast_bf16_f32(bf16_t x) { return bf16_to_f(x); }
static inline bf16_t cast_bf16_bf16(bf16_t x) { return x; }
static inline f16_t cast_bf16_f16(bf16_t x) { return (f16_t)bf16_to_f(x); }
static inline f32_t cast_f16_f32(f16_t x) { return (float)x; }
static inline bf16_t cast_f16_bf16(f16_t x) { return f_to_bf16((float)x, 0x7fc0u); }
static inline f16_t cast_f16_f16(f16_t x) { return x; }

#define DEFINE_PUSH(P, H)                                                                  \
    static void push_##P##_##H(const P##_t *restrict src, H##_t *restrict slot,            \
                               float *restrict total, int64_t n, int full) {               \
        if (full) {                                                                        \
            for (int64_t i = 0; i < n; i++) {                                              \
                H##_t nw = cast_##P##_##H(src[i]);                                             \
                float d = H##_to_f(nw) - H##_to_f(slot[i]);                                \
                slot[i] = nw;                                                              \
                total[i] = total[i] + d;                                                   \
            }                                                                              \
        } else {                                                                           \
            for (int64_t i = 0; i < n; i++) {                                              \
                H##_t nw = cast_##P##_##H(src[i]);                                             \
                slot[i] = nw;                                                              \
                total[i] = total[i] + H##_to_f(nw);                                        \
            }                                                                              \
        }                                                                                  \
    }

DEFINE_PUSH(f32, f32)
DEFINE_PUSH(f32, bf16)
DEFINE_PUSH(f32, f16)
DEFINE_PUSH(bf16, f32)
DEFINE_PUSH(bf16, bf16)
DEFINE_PUSH(bf16, f16)
DEFINE_PUSH(f16, f32)
DEFINE_PUSH(f16, bf16)
DEFINE_PUSH(f16, f16)

typedef void (*push_fn)(const void *, void *, float *, int64_t, int);

static const push_fn PUSH[3][3] = {
    {(push_fn)push_f32_f32, (push_fn)push_f32_bf16, (push_fn)push_f32_f16},
    {(push_fn)push_bf16_f32, (push_fn)push_bf16_bf16, (push_fn)push_bf16_f16},
    {(push_fn)push_f16_f32, (push_fn)push_f16_bf16, (push_fn)push_f16_f16},
};

static const int64_t ELEMENT_SIZE[3] = {4, 2, 2};

/* rows: nrows triples (source address, offset into slot/total in elements, count).
 * full: 1 when the slot holds a snapshot to subtract, 0 while the ring fills.
 * Returns 0, or -1 for a dtype code outside 0..2. */
int lawa_cpu_push(const int64_t *rows, int64_t nrows, int pdtype, int hdtype, void *slot,
                  float *total, int full, int nthreads) {
    if (pdtype < 0 || pdtype > 2 || hdtype < 0 || hdtype > 2) return -1;
    push_fn fn = PUSH[pdtype][hdtype];
    char *slot_bytes = (char *)slot;
    int64_t hsize = ELEMENT_SIZE[hdtype];
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t r = 0; r < nrows; r++) {
        const int64_t *row = rows + 3 * r;
        fn((const void *)(intptr_t)row[0], slot_bytes + row[1] * hsize, total + row[1], row[2], full);
    }
    return 0;
}
