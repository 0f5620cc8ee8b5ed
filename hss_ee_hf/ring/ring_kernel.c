/* Exact ring product y = x . w^T mod 2^64 with 16-bit weights, read as 2 bytes each.
 *
 * Built and loaded by hss_ee_hf/ring/native.py (ctypes); see that file and DESIGN.md section 4.
 *
 * The weight is stored offset, u = w + 2^15 in [1, 2^16 - 1], so every product is of two
 * unsigned numbers:  x * w = x * u - 2^15 * x  (mod 2^64).
 * A 64-bit x is xl + 2^32 * xh (both unsigned 32-bit), so
 *     x * u = xl * u + 2^32 * (xh * u)   (mod 2^64)
 * where xl * u < 2^48 is exact in 64 bits, and only xh * u mod 2^32 matters. AVX2's
 * vpmuludq multiplies the low 32 bits of each 64-bit lane into a full 64-bit product, so
 * both halves are one instruction per four lanes. Sums wrap mod 2^64, which is the ring.
 *
 * Nothing here allocates per call beyond the x_hi scratch the caller passes, and the
 * function holds no state: concurrent calls are safe.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

typedef struct {
    const uint64_t *x;   /* (n, in) shares */
    const uint64_t *xh;  /* (n, in) x >> 32 */
    const uint64_t *sum; /* (n,) row sums of x mod 2^64 */
    const uint16_t *u;   /* (out, in) offset weights */
    uint64_t *y;         /* (n, out) */
    int64_t n, in, out, o0, o1;
} job_t;

static uint64_t dot_scalar(const uint64_t *x, const uint16_t *u, int64_t from, int64_t in) {
    uint64_t acc = 0;
    for (int64_t i = from; i < in; i++) acc += x[i] * (uint64_t)u[i];
    return acc;
}

#if defined(__AVX2__)
static inline uint64_t hsum(__m256i v) {
    __m128i s = _mm_add_epi64(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    return (uint64_t)_mm_cvtsi128_si64(s) + (uint64_t)_mm_extract_epi64(s, 1);
}

static inline __m256i load_u(const uint16_t *p) {
    return _mm256_cvtepu16_epi64(_mm_loadl_epi64((const __m128i *)p));
}

/* Four output rows against one input row: each weight is loaded once per x row, each x
 * vector feeds four products. */
static void block4(const job_t *j, int64_t r, int64_t o) {
    const int64_t in = j->in;
    const uint64_t *x = j->x + r * in, *xh = j->xh + r * in;
    const uint16_t *u0 = j->u + o * in, *u1 = u0 + in, *u2 = u1 + in, *u3 = u2 + in;
    __m256i l0 = _mm256_setzero_si256(), l1 = l0, l2 = l0, l3 = l0, h0 = l0, h1 = l0, h2 = l0, h3 = l0;
    int64_t i = 0;
    for (; i + 4 <= in; i += 4) {
        __m256i xv = _mm256_loadu_si256((const __m256i *)(x + i));
        __m256i xhv = _mm256_loadu_si256((const __m256i *)(xh + i));
        __m256i w;
        w = load_u(u0 + i); l0 = _mm256_add_epi64(l0, _mm256_mul_epu32(xv, w)); h0 = _mm256_add_epi64(h0, _mm256_mul_epu32(xhv, w));
        w = load_u(u1 + i); l1 = _mm256_add_epi64(l1, _mm256_mul_epu32(xv, w)); h1 = _mm256_add_epi64(h1, _mm256_mul_epu32(xhv, w));
        w = load_u(u2 + i); l2 = _mm256_add_epi64(l2, _mm256_mul_epu32(xv, w)); h2 = _mm256_add_epi64(h2, _mm256_mul_epu32(xhv, w));
        w = load_u(u3 + i); l3 = _mm256_add_epi64(l3, _mm256_mul_epu32(xv, w)); h3 = _mm256_add_epi64(h3, _mm256_mul_epu32(xhv, w));
    }
    const uint64_t corr = j->sum[r] << 15;
    uint64_t *y = j->y + r * j->out + o;
    y[0] = hsum(l0) + (hsum(h0) << 32) + dot_scalar(x, u0, i, in) - corr;
    y[1] = hsum(l1) + (hsum(h1) << 32) + dot_scalar(x, u1, i, in) - corr;
    y[2] = hsum(l2) + (hsum(h2) << 32) + dot_scalar(x, u2, i, in) - corr;
    y[3] = hsum(l3) + (hsum(h3) << 32) + dot_scalar(x, u3, i, in) - corr;
}
#endif

static void *run_job(void *arg) {
    const job_t *j = (const job_t *)arg;
    int64_t o = j->o0;
#if defined(__AVX2__)
    for (; o + 4 <= j->o1; o += 4)
        for (int64_t r = 0; r < j->n; r++) block4(j, r, o);
#endif
    for (; o < j->o1; o++)
        for (int64_t r = 0; r < j->n; r++)
            j->y[r * j->out + o] = dot_scalar(j->x + r * j->in, j->u + o * j->in, 0, j->in) - (j->sum[r] << 15);
    return 0;
}

int hss_ee_kernel_simd(void) {
#if defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

/* y (n, out) = x (n, in) . (u - 2^15)^T mod 2^64, over `threads` threads (output rows split
 * in multiples of four). xh is caller scratch of n * in words. Returns 0, or -1 when memory
 * for the row sums could not be had. A thread that cannot be started is done by the caller. */
int hss_ee_ring_matmul(const uint64_t *x, uint64_t *xh, const uint16_t *u, uint64_t *y, int64_t n, int64_t in,
                       int64_t out, int threads) {
    uint64_t *sum = (uint64_t *)malloc((size_t)(n > 0 ? n : 1) * sizeof(uint64_t));
    if (!sum) return -1;
    for (int64_t r = 0; r < n; r++) {
        uint64_t s = 0;
        for (int64_t i = 0; i < in; i++) {
            s += x[r * in + i];
            xh[r * in + i] = x[r * in + i] >> 32;
        }
        sum[r] = s;
    }
    if (threads < 1) threads = 1;
    if (threads > 64) threads = 64;
    int64_t quads = (out + 3) / 4;
    if (threads > quads) threads = (int)quads;
    job_t jobs[64];
    pthread_t tids[64];
    int64_t per = (quads + threads - 1) / threads * 4, o = 0;
    int started = 0;
    for (int t = 0; t < threads && o < out; t++) {
        int64_t o1 = o + per < out ? o + per : out;
        jobs[t] = (job_t){x, xh, sum, u, y, n, in, out, o, o1};
        o = o1;
        started++;
    }
    for (int t = 1; t < started; t++)
        if (pthread_create(&tids[t], 0, run_job, &jobs[t]) != 0) {
            for (int k = t; k < started; k++) run_job(&jobs[k]); /* do it here instead */
            started = t;
            break;
        }
    run_job(&jobs[0]);
    for (int t = 1; t < started; t++) pthread_join(tids[t], 0);
    free(sum);
    return 0;
}
