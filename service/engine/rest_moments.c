/* The temperature model's row sums on the CPU, and with labels the whole row pass of a record
 * (native.py builds this, moments.py calls it; curve.py uses the sums).
 *
 * For each row z of an [n, c] float32 block: m = max z, a = the first index of m, m2 = max over c != a,
 * x_c = z_c - m2 (<= 0 outside a), and for each output grid point b:
 *
 *     S0 = sum_{c != a} exp(b x_c),  S1 = sum_{c != a} x_c exp(b x_c),  S2 = sum_{c != a} x_c^2 exp(b x_c)
 *
 * Why a hand-written loop: the sums need every grid point's power of every class, and PyTorch (eager:
 * one pass over the block per operation; inductor: the shared powers recomputed inside each of the 33
 * reductions) costs 10-20x this single loop, which computes each power once per class and feeds all
 * three sums from registers.
 *
 * The powers follow a plan (moments.py): op i is exp(scale_i x) when a_i < 0, else v_{a_i} * v_{b_i}
 * (a product of two earlier ops). The default grid b = 0.05 k, k = 1, 2, 3, 5, 10, 20, 30, 50, 100, 200,
 * 400, is one exponential and ten products. A product chain to k rounds about k/2 ulps into the power;
 * its largest term is exp(0) = 1 exactly, so sums are >= 1.
 *
 * Subnormal powers are flushed to zero (MXCSR, restored on return): their terms are below 1e-38 of a
 * sum that is >= 1, and x86 computes with them ~100x slower.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#define W 16
typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));

static const vi LANES = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

static inline vf blend(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

static inline vf splat(float v) { return (vf){} + v; }

static inline vi splat_i(int32_t v) { return (vi){} + v; }

/* exp(x) for finite x <= ~0: 2^n p(r) with Cephes' degree-6 polynomial (~1 ulp); 0 below -87.
 * exp(0) is exactly 1, so the largest term of every sum is exact. */
static inline vf vexp(vf x) {
    vi under = x < splat(-87.0f);
    x = blend(under, splat(-87.0f), x);
    vf fx = x * 1.44269504088896341f + 0.5f;
    vi n = __builtin_convertvector(fx, vi);
    vf fn = __builtin_convertvector(n, vf);
    n -= (vi)(fn > fx) & 1; /* floor */
    fn = __builtin_convertvector(n, vf);
    vf r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
    vf r2 = r * r;
    vf p = splat(1.9875691500E-4f);
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * r2 + r + 1.0f;
    vf out = p * (vf)((n + 127) << 23);
    return (vf)((vi)out & ~under);
}

typedef uint16_t vh __attribute__((vector_size(W * 2)));

/* float16 is read in place where the machine converts it in hardware (x86's F16C, ARMv8); elsewhere
 * row_pass_f16 is absent and the caller upcasts (native.py asks rest_moments_has_f16). On x86 the
 * intrinsics: GCC turns a converted _Float16 vector into one scalar conversion a lane (~0.9x the
 * upcast path), the vector instruction converts 16 lanes at once. */
#if defined(__F16C__)
#include <immintrin.h>
#define HAS_F16 1
static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
static inline vf widen_half(const uint16_t *p) {
#if defined(__AVX512F__)
    return (vf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#else
    __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8)));
    vf v;
    memcpy(&v, &lo, sizeof lo);
    memcpy((char *)&v + sizeof lo, &hi, sizeof hi);
    return v;
#endif
}
#elif defined(__aarch64__) && defined(__FLT16_MAX__)
#define HAS_F16 1
typedef _Float16 vhf __attribute__((vector_size(W * 2)));
static inline float half_to_float(uint16_t h) {
    _Float16 f;
    memcpy(&f, &h, sizeof f);
    return (float)f;
}
static inline vf widen_half(const uint16_t *p) {
    vhf h;
    memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, vf);
}
#else
#define HAS_F16 0
#endif
enum { F32 = 0, BF16 = 1, F16 = 2 };

/* Scores are float32, bfloat16 (the upper half of a float32: widened by a shift) or float16 (widened
 * by the hardware's conversion), both read at half width and widened exactly; ``half`` is a constant
 * at each call, so each exported function has one loader. */
static inline float scalar(const void *row, int64_t j, int half) {
    if (half == F32) return ((const float *)row)[j];
#if HAS_F16
    if (half == F16) return half_to_float(((const uint16_t *)row)[j]);
#endif
    uint32_t bits = (uint32_t)((const uint16_t *)row)[j] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline __attribute__((always_inline)) vf load(const void *row, int64_t j, int64_t c, float fill, int half) {
    vf v = splat(fill);
    if (j + W <= c) {
        if (half == BF16) {
            vh h;
            memcpy(&h, (const uint16_t *)row + j, sizeof h);
            v = (vf)(__builtin_convertvector(h, vi) << 16);
#if HAS_F16
        } else if (half == F16) {
            v = widen_half((const uint16_t *)row + j);
#endif
        } else {
            memcpy(&v, (const float *)row + j, sizeof v);
        }
    } else {
        for (int64_t l = 0; j + l < c; l++) v[l] = scalar(row, j + l, half);
    }
    return v;
}

static float hmax(vf v) {
    float m = v[0];
    for (int l = 1; l < W; l++) m = v[l] > m ? v[l] : m;
    return m;
}

/* The plan is compiled in (moments.py passes it as macros, one library per plan):
 *   NOPS, NOUT            ops and output grid points
 *   PLAN                  statements v[i] = EXP(scale) or v[i] = v[a] * v[b], in order
 *   OUTS                  the comma-separated op index of each output grid point
 * so the compiler unrolls the ops and keeps the sums in registers (a runtime plan costs ~2x). */
#ifndef NOPS
#define NOPS 12
#define NOUT 11
#define PLAN                                                                                              \
    v[0] = EXP(0.05f); v[1] = v[0] * v[0]; v[2] = v[1] * v[0]; v[3] = v[2] * v[1]; v[4] = v[3] * v[3];      \
    v[5] = v[4] * v[4]; v[6] = v[5] * v[4]; v[7] = v[6] * v[5]; v[8] = v[7] * v[7]; v[9] = v[8] * v[8];       \
    v[10] = v[9] * v[9]; v[11] = v[5] * v[5];
#define OUTS 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
#define ONE_OUT 5
#define TWO_OP 11
#endif
/* ONE_OUT: the output index of b = 1 and TWO_OP: the op of b = 2 (-1 where the plan has none: then
 * the row pass is not available, only the sums). */
#define EXP(scale) ((vf)((vi)vexp(x * (scale)) & keep))

static const int OUT_OPS[NOUT] = {OUTS};

int rest_moments_nout(void) { return NOUT; }

int rest_moments_has_rows(void) { return ONE_OUT >= 0 && TWO_OP >= 0; }

static inline int32_t hsum_i(vi v) {
    int32_t t = 0;
    for (int l = 0; l < W; l++) t += v[l];
    return t;
}

static inline float hsum(vf v) {
    float t = 0.0f;
    for (int l = 0; l < W; l++) t += v[l];
    return t;
}

/* ``labels`` not NULL: the whole row pass too (stats [n, 4]: nll, confidence, brier, entropy; ints [n, 3]:
 * pred, rank, ties; lse [n]), from the sums at b = 1 and b = 2 and two counts a class. */
static inline __attribute__((always_inline)) void kernel(const void *z, int64_t n, int64_t c, float *sums,
                                                        float *row_max, float *rest_max, int32_t *argmax, int half,
                                                        const int64_t *labels, float *stats, int32_t *ints,
                                                        float *lse) {
#if defined(__SSE__)
    unsigned csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040); /* flush-to-zero and denormals-are-zero */
#endif
    for (int64_t i = 0; i < n; i++) {
        const void *row = (const char *)z + i * c * (half ? 2 : 4);
        /* One pass for the maximum, its first index and the largest other score: per lane the top
         * two and the first index of the top (a tie at the top makes it the second too). */
        vf top = splat(-INFINITY), second = splat(-INFINITY);
        vi at = splat_i(0);
        for (int64_t j = 0; j < c; j += W) {
            vf v = load(row, j, c, -INFINITY, half);
            vi above = v > top;
            second = blend(above, top, blend(v > second, v, second));
            at = (vi)blend(above, (vf)(LANES + (int32_t)j), (vf)at);
            top = blend(above, v, top);
        }
        float m = hmax(top);
        int lane = -1;
        for (int l = 0; l < W; l++)
            if (top[l] == m && (lane < 0 || at[l] < at[lane])) lane = l;
        float m2 = -INFINITY;
        for (int l = 0; l < W; l++) {
            if (second[l] > m2) m2 = second[l];
            if (l != lane && top[l] > m2) m2 = top[l];
        }
        int64_t a = lane < 0 ? 0 : at[lane];
        row_max[i] = m;
        rest_max[i] = m2;
        argmax[i] = (int32_t)a;
        float *out = sums + i * 3 * (int64_t)NOUT;
        const int full = labels != NULL;
        const float zy = full ? scalar(row, labels[i], half) : 0.0f;
        vf s0[NOUT], s1[NOUT], s2[NOUT], v[NOPS];
        vf two = splat(0.0f), probe = splat(0.0f); /* probe: NaN once a score is NaN or infinite */
        vi above = splat_i(0), equal = splat_i(0);
        for (int k = 0; k < NOUT; k++) s0[k] = s1[k] = s2[k] = splat(0.0f);
        for (int64_t j = 0; c >= 2 && j < c; j += W) {
            vf zv = load(row, j, c, m2, half);
            vf x = zv - m2;
            vi inside = LANES + (int32_t)j < (int32_t)c;
            /* outside the row and at the row's first maximum: x = 0 (finite) and every power 0 */
            vi keep = (LANES + (int32_t)j != (int32_t)a) & inside;
            x = blend(keep, x, splat(0.0f));
            x = blend(x < splat(-1e15f), splat(-1e15f), x); /* x^2 stays finite; its power is 0 */
            vf xx = x * x;
            PLAN
            for (int k = 0; k < NOUT; k++) {
                vf p = v[OUT_OPS[k]];
                s0[k] += p;
                s1[k] += x * p;
                s2[k] += xx * p;
            }
#if TWO_OP >= 0
            if (full) {
                two += v[TWO_OP];
                probe += zv * 0.0f;
                above -= (zv > zy) & inside;
                equal -= (zv == zy) & inside;
            }
#endif
        }
        for (int k = 0; k < NOUT; k++) {
            out[3 * k] = hsum(s0[k]);
            out[3 * k + 1] = hsum(s1[k]);
            out[3 * k + 2] = hsum(s2[k]);
        }
#if ONE_OUT >= 0 && TWO_OP >= 0
        if (full) {
            /* S = sum_c exp(z_c - m) = 1 + r E1 with r = exp(m2 - m) and E_b the rest's sums at b. */
            float r = c >= 2 ? expf(m2 - m) : 0.0f;
            float e1 = out[3 * ONE_OUT], e1x = out[3 * ONE_OUT + 1], e2 = hsum(two);
            float total = 1.0f + r * e1;
            float log_s = logf(total);
            float p_y = expf(zy - m) / total;
            float sum_p2 = (1.0f + r * r * e2) / (total * total);
            stats[4 * i] = (m - zy) + log_s;
            stats[4 * i + 1] = 1.0f / total;
            stats[4 * i + 2] = sum_p2 - 2.0f * p_y + 1.0f;
            /* sum_c p_c (z_c - m): z_c - m = x_c + (m2 - m) on the rest, 0 at the maximum */
            stats[4 * i + 3] = c >= 2 ? log_s - r * (e1x + (m2 - m) * e1) / total : 0.0f;
            /* a non-finite score makes the NLL and entropy non-finite, so the chunk is refused */
            float nonfinite = hsum(probe) + zy * 0.0f + m * 0.0f;
            stats[4 * i] += nonfinite;
            stats[4 * i + 3] += nonfinite;
            ints[3 * i] = (int32_t)a;
            ints[3 * i + 1] = c >= 2 ? hsum_i(above) : 0;
            ints[3 * i + 2] = c >= 2 ? hsum_i(equal) - 1 : 0;
            lse[i] = m + log_s;
        }
#endif
    }
#if defined(__SSE__)
    _mm_setcsr(csr);
#endif
}

/* float32 scores [n, c], row-major. ``labels`` NULL: the model's sums only (stats, ints, lse unused). */
void row_pass(const float *z, const int64_t *labels, int64_t n, int64_t c, float *sums, float *row_max,
              float *rest_max, int32_t *argmax, float *stats, int32_t *ints, float *lse) {
    kernel(z, n, c, sums, row_max, rest_max, argmax, F32, labels, stats, ints, lse);
}

/* bfloat16 scores [n, c], row-major (as uint16 bit patterns). */
void row_pass_bf16(const uint16_t *z, const int64_t *labels, int64_t n, int64_t c, float *sums, float *row_max,
                   float *rest_max, int32_t *argmax, float *stats, int32_t *ints, float *lse) {
    kernel(z, n, c, sums, row_max, rest_max, argmax, BF16, labels, stats, ints, lse);
}

int rest_moments_has_f16(void) { return HAS_F16; }

#if HAS_F16
/* float16 scores [n, c], row-major (as uint16 bit patterns). */
void row_pass_f16(const uint16_t *z, const int64_t *labels, int64_t n, int64_t c, float *sums, float *row_max,
                  float *rest_max, int32_t *argmax, float *stats, int32_t *ints, float *lse) {
    kernel(z, n, c, sums, row_max, rest_max, argmax, F16, labels, stats, ints, lse);
}
#endif
