/* Exact ring product y = x . w^T mod 2^64 with 16-bit weights, read as 2 bytes each.
 *
 * Built and loaded by hss_ee_hf/ring/native.py (ctypes); see that file and DESIGN.md section 4.
 * Which path is compiled in is fixed at build time by the target (-march=native) and reported by
 * hss_ee_kernel_simd(): 4 AVX-512 VNNI, 1 AVX2, 0 scalar (2 and 3 are not used).
 *
 * The weight is stored offset, u = w + 2^15 (uint16), w in [-2^15, 2^15 - 1].
 *
 * Scalar path: every product is of two unsigned numbers, x * w = x * u - 2^15 * x (mod 2^64),
 * in plain 64-bit C arithmetic, whose sums wrap mod 2^64, which is the ring.
 *
 * SIMD paths (AVX-512 VNNI: AVX512BW + AVX512VNNI; AVX2): x is rewritten once per call as five
 * signed digits,  x = d0 + 2^11 d1 + 2^22 d2 + 2^32 d3 + 2^48 d4  (mod 2^64),  with
 * d0, d1 in [-2^10, 2^10), d2 in [-2^9, 2^9) and d3, d4 any int16 (their place values only
 * need the digit mod 2^32 and 2^16). Each digit plane is held as int16, and w is read as
 * int16 (u XOR 0x8000, no offset correction). VNNI's vpdpwssd multiplies 32 int16 pairs and
 * adds each two neighbouring products into a 32-bit lane, wrapping mod 2^32; AVX2's vpmaddwd
 * does the same for 16 pairs (into 8 lanes) and vpaddd accumulates. So, per 32-bit lane:
 *   - for d3, d4 the lane sums are exact mod 2^32, all that 2^32 d3 and 2^48 d4 need;
 *   - for d0, d1, d2 one lane gains at most 2 * 2^10 * 2^15 = 2^26 in magnitude per step
 *     (one vector of inputs), so 31 steps (992 inputs for VNNI, 496 for AVX2) stay below 2^31
 *     and are exact; after each such chunk the lanes are widened to 64 bits and combined as
 *     S0 + 2^11 S1 + 2^22 S2, exactly, mod 2^64.
 * y = (S0 + 2^11 S1 + 2^22 S2) + 2^32 (S3 + 2^16 S4) mod 2^64. The digit planes are padded
 * with zeros to a multiple of the vector's inputs (LANES); the last weight vector of a row is
 * read only up to `in` (VNNI: a masked load; AVX2: a padded copy of each row's tail, made per
 * call), and meets zero digits past it.
 * VNNI: four output rows share each digit load. AVX2 (16 vector registers): two. Rows of x
 * are tiled so their digits stay in L2.
 *
 * Nothing here allocates per call beyond the row sums (scalar), the digit planes (SIMD) and the
 * weight tails (AVX2); the function holds no state: concurrent calls are safe.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define HSS_VNNI 1
#define LANES 32 /* int16 digits per vector; the digit planes are padded to a multiple of it */
#elif defined(__AVX2__)
#define HSS_AVX2_DIGITS 1
#define LANES 16
#endif
#if defined(HSS_VNNI) || defined(HSS_AVX2_DIGITS)
#define HSS_DIGITS 1
#include <immintrin.h>
#endif

#define ND 5            /* digits of x in the SIMD paths */
#define CHUNK_STEPS 31  /* steps (a vector of inputs each) whose low-digit lane sums stay below 2^31 */
#define TILE_BYTES (384 * 1024) /* digit planes of the rows worked on together, kept in L2 */

typedef struct {
    const uint64_t *x;   /* (n, in) shares */
    const uint64_t *sum; /* (n,) row sums of x mod 2^64 */
    const uint16_t *u;   /* (out, in) offset weights */
    uint64_t *y;         /* (n, out) */
    int64_t n, in, out, o0, o1;
    const int16_t *xd;   /* SIMD: (n, ND, inp) digit planes, zero past `in` */
    int64_t inp;         /* SIMD: in rounded up to LANES */
    const int16_t *wt;   /* AVX2: (out, 16) each row's last partial vector of weights as int16, 0 past `in` */
} job_t;

static inline uint64_t dot_scalar(const uint64_t *x, const uint16_t *u, int64_t in) {
    uint64_t acc = 0;
    for (int64_t i = 0; i < in; i++) acc += x[i] * (uint64_t)u[i];
    return acc;
}

#if defined(HSS_AVX2_DIGITS)
static inline uint64_t hsum(__m256i v) {
    __m128i s = _mm_add_epi64(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    return (uint64_t)_mm_cvtsi128_si64(s) + (uint64_t)_mm_extract_epi64(s, 1);
}

static inline __m256i widen_sum(__m256i a) { /* 8 int32 lanes -> 4 int64 lanes, pairwise sums, exact */
    return _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(a)),
                            _mm256_cvtepi32_epi64(_mm256_extracti128_si256(a, 1)));
}

#define AZERO5(A) A##0 = A##1 = A##2 = A##3 = A##4 = _mm256_setzero_si256()
#define AFOLD(A)                                                                                   \
    _mm256_add_epi64(                                                                              \
        _mm256_add_epi64(widen_sum(A##0), _mm256_slli_epi64(widen_sum(A##1), 11)),                \
        _mm256_add_epi64(_mm256_slli_epi64(widen_sum(A##2), 22),                                   \
                         _mm256_slli_epi64(widen_sum(_mm256_add_epi32(A##3, _mm256_slli_epi32(A##4, 16))), 32)))
/* Weight row o's 16 weights at input i as int16; the last, partial step (i >= full) reads the
 * row's padded tail copy, never past `in`. */
static inline __m256i wload(const job_t *j, const uint16_t *row, int64_t o, int64_t i, int64_t full, __m256i flip) {
    return i < full ? _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(row + i)), flip)
                    : _mm256_load_si256((const __m256i *)(j->wt + o * 16));
}

/* one digit plane k at input i against the weight vectors of the block's rows */
#define AXD(k, i) _mm256_load_si256((const __m256i *)(xd + (k) * inp + (i)))
#define AMADD(A, x, w) A = _mm256_add_epi32(A, _mm256_madd_epi16(x, w))

/* Two output rows (o, o+1) against input row r: each digit vector feeds two products (AVX2 has 16
 * vector registers: ten accumulators, a digit vector and two weight vectors). */
static void ablock2(const job_t *j, int64_t r, int64_t o) {
    const int64_t in = j->in, inp = j->inp, full = in & ~(int64_t)15;
    const int16_t *xd = j->xd + r * ND * inp;
    const uint16_t *u0 = j->u + o * in, *u1 = u0 + in;
    const __m256i flip = _mm256_set1_epi16((short)0x8000);
    __m256i s0 = _mm256_setzero_si256(), s1 = s0;
    __m256i x, w0, w1, a0, a1, a2, a3, a4, b0, b1, b2, b3, b4;
    int64_t i = 0;
    while (i < inp) {
        const int64_t end = i + CHUNK_STEPS * 16 < inp ? i + CHUNK_STEPS * 16 : inp;
        AZERO5(a), AZERO5(b);
        for (; i < end; i += 16) {
            w0 = wload(j, u0, o, i, full, flip);
            w1 = wload(j, u1, o + 1, i, full, flip);
            x = AXD(0, i); AMADD(a0, x, w0); AMADD(b0, x, w1);
            x = AXD(1, i); AMADD(a1, x, w0); AMADD(b1, x, w1);
            x = AXD(2, i); AMADD(a2, x, w0); AMADD(b2, x, w1);
            x = AXD(3, i); AMADD(a3, x, w0); AMADD(b3, x, w1);
            x = AXD(4, i); AMADD(a4, x, w0); AMADD(b4, x, w1);
        }
        s0 = _mm256_add_epi64(s0, AFOLD(a));
        s1 = _mm256_add_epi64(s1, AFOLD(b));
    }
    uint64_t *y = j->y + r * j->out + o;
    y[0] = hsum(s0);
    y[1] = hsum(s1);
}

/* One output row o against input row r (an odd row left over). */
static void ablock1(const job_t *j, int64_t r, int64_t o) {
    const int64_t in = j->in, inp = j->inp, full = in & ~(int64_t)15;
    const int16_t *xd = j->xd + r * ND * inp;
    const uint16_t *u0 = j->u + o * in;
    const __m256i flip = _mm256_set1_epi16((short)0x8000);
    __m256i s0 = _mm256_setzero_si256();
    __m256i w0, a0, a1, a2, a3, a4;
    int64_t i = 0;
    while (i < inp) {
        const int64_t end = i + CHUNK_STEPS * 16 < inp ? i + CHUNK_STEPS * 16 : inp;
        AZERO5(a);
        for (; i < end; i += 16) {
            w0 = wload(j, u0, o, i, full, flip);
            AMADD(a0, AXD(0, i), w0);
            AMADD(a1, AXD(1, i), w0);
            AMADD(a2, AXD(2, i), w0);
            AMADD(a3, AXD(3, i), w0);
            AMADD(a4, AXD(4, i), w0);
        }
        s0 = _mm256_add_epi64(s0, AFOLD(a));
    }
    j->y[r * j->out + o] = hsum(s0);
}
#endif

#if defined(HSS_VNNI)
static inline __m512i widen_sum(__m512i a) { /* 16 int32 lanes -> 8 int64 lanes, pairwise sums, exact */
    return _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(a)),
                            _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(a, 1)));
}

/* The five digit vectors of x at input i, and one product step of weight vector w into the
 * accumulators A##0 .. A##4 (one per digit). */
#define XLOAD(i)                                                                                   \
    x0 = _mm512_load_si512((const void *)(xd + (i)));                                              \
    x1 = _mm512_load_si512((const void *)(xd + inp + (i)));                                        \
    x2 = _mm512_load_si512((const void *)(xd + 2 * inp + (i)));                                    \
    x3 = _mm512_load_si512((const void *)(xd + 3 * inp + (i)));                                    \
    x4 = _mm512_load_si512((const void *)(xd + 4 * inp + (i)))
#define DP5(A, w)                                                                                  \
    A##0 = _mm512_dpwssd_epi32(A##0, x0, w);                                                       \
    A##1 = _mm512_dpwssd_epi32(A##1, x1, w);                                                       \
    A##2 = _mm512_dpwssd_epi32(A##2, x2, w);                                                       \
    A##3 = _mm512_dpwssd_epi32(A##3, x3, w);                                                       \
    A##4 = _mm512_dpwssd_epi32(A##4, x4, w)
#define ZERO5(A) A##0 = A##1 = A##2 = A##3 = A##4 = _mm512_setzero_si512()
/* int16 bits of w = u - 2^15: flip the sign bit of u. */
#define WLOAD(p) _mm512_xor_si512(_mm512_maskz_loadu_epi16(m, (const void *)(p)), flip)
/* The five digit sums of one chunk, as 8 int64 lanes whose total is the product mod 2^64:
 * S0 + 2^11 S1 + 2^22 S2 exact, 2^32 (S3 + 2^16 S4) only mod 2^64 (its sum mod 2^32 matters). */
#define FOLD(A)                                                                                    \
    _mm512_add_epi64(                                                                              \
        _mm512_add_epi64(widen_sum(A##0), _mm512_slli_epi64(widen_sum(A##1), 11)),                \
        _mm512_add_epi64(_mm512_slli_epi64(widen_sum(A##2), 22),                                   \
                         _mm512_slli_epi64(widen_sum(_mm512_add_epi32(A##3, _mm512_slli_epi32(A##4, 16))), 32)))

/* Four output rows (o .. o+3) against input row r: every digit vector feeds four products. */
static void vblock4(const job_t *j, int64_t r, int64_t o) {
    const int64_t in = j->in, inp = j->inp, full = in & ~(int64_t)31;
    const int16_t *xd = j->xd + r * ND * inp;
    const uint16_t *u0 = j->u + o * in, *u1 = u0 + in, *u2 = u1 + in, *u3 = u2 + in;
    const __m512i flip = _mm512_set1_epi16((short)0x8000);
    const __mmask32 last = (__mmask32)((1ull << (in & 31)) - 1);
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
    __m512i x0, x1, x2, x3, x4, w;
    __m512i a0, a1, a2, a3, a4, b0, b1, b2, b3, b4, c0, c1, c2, c3, c4, d0, d1, d2, d3, d4;
    int64_t i = 0;
    while (i < inp) {
        const int64_t end = i + CHUNK_STEPS * 32 < inp ? i + CHUNK_STEPS * 32 : inp;
        ZERO5(a), ZERO5(b), ZERO5(c), ZERO5(d);
        for (; i < end; i += 32) {
            const __mmask32 m = i < full ? (__mmask32)~0u : last; /* the last step reads only up to `in` */
            XLOAD(i);
            w = WLOAD(u0 + i); DP5(a, w);
            w = WLOAD(u1 + i); DP5(b, w);
            w = WLOAD(u2 + i); DP5(c, w);
            w = WLOAD(u3 + i); DP5(d, w);
        }
        s0 = _mm512_add_epi64(s0, FOLD(a));
        s1 = _mm512_add_epi64(s1, FOLD(b));
        s2 = _mm512_add_epi64(s2, FOLD(c));
        s3 = _mm512_add_epi64(s3, FOLD(d));
    }
    uint64_t *y = j->y + r * j->out + o;
    y[0] = (uint64_t)_mm512_reduce_add_epi64(s0);
    y[1] = (uint64_t)_mm512_reduce_add_epi64(s1);
    y[2] = (uint64_t)_mm512_reduce_add_epi64(s2);
    y[3] = (uint64_t)_mm512_reduce_add_epi64(s3);
}

/* One output row o against input row r (the rows left over after the blocks of four). */
static void vblock1(const job_t *j, int64_t r, int64_t o) {
    const int64_t in = j->in, inp = j->inp, full = in & ~(int64_t)31;
    const int16_t *xd = j->xd + r * ND * inp;
    const uint16_t *u0 = j->u + o * in;
    const __m512i flip = _mm512_set1_epi16((short)0x8000);
    const __mmask32 last = (__mmask32)((1ull << (in & 31)) - 1);
    __m512i s0 = _mm512_setzero_si512();
    __m512i x0, x1, x2, x3, x4, w, a0, a1, a2, a3, a4;
    int64_t i = 0;
    while (i < inp) {
        const int64_t end = i + CHUNK_STEPS * 32 < inp ? i + CHUNK_STEPS * 32 : inp;
        ZERO5(a);
        for (; i < end; i += 32) {
            const __mmask32 m = i < full ? (__mmask32)~0u : last;
            XLOAD(i);
            w = WLOAD(u0 + i); DP5(a, w);
        }
        s0 = _mm512_add_epi64(s0, FOLD(a));
    }
    j->y[r * j->out + o] = (uint64_t)_mm512_reduce_add_epi64(s0);
}

#endif

#if defined(HSS_DIGITS)
/* x (as uint64) -> ND signed digits, see the header: x = d0 + 2^11 d1 + 2^22 d2 + 2^32 d3 + 2^48 d4 mod 2^64. */
static void digits(const uint64_t *x, int16_t *d, int64_t in, int64_t inp) {
    for (int64_t i = 0; i < in; i++) {
        uint64_t t = x[i];
        const int64_t d0 = (int64_t)(t << 53) >> 53;
        t = (t - (uint64_t)d0) >> 11;
        const int64_t d1 = (int64_t)(t << 53) >> 53;
        t = (t - (uint64_t)d1) >> 11;
        const int64_t d2 = (int64_t)(t << 54) >> 54;
        t = (t - (uint64_t)d2) >> 10;
        const int64_t d3 = (int16_t)(uint16_t)t;
        t = (t - (uint64_t)d3) >> 16;
        d[i] = (int16_t)d0;
        d[inp + i] = (int16_t)d1;
        d[2 * inp + i] = (int16_t)d2;
        d[3 * inp + i] = (int16_t)d3;
        d[4 * inp + i] = (int16_t)(uint16_t)t;
    }
    for (int k = 0; k < ND; k++)
        for (int64_t i = in; i < inp; i++) d[k * inp + i] = 0;
}
#endif

static void *run_job(void *arg) {
    const job_t *j = (const job_t *)arg;
#if defined(HSS_DIGITS)
    int64_t tile = j->inp > 0 ? TILE_BYTES / (ND * j->inp * 2) : j->n;
    if (tile < 1) tile = 1;
    for (int64_t r0 = 0; r0 < j->n; r0 += tile) {
        const int64_t r1 = r0 + tile < j->n ? r0 + tile : j->n;
        int64_t o = j->o0;
#if defined(HSS_VNNI)
        for (; o + 4 <= j->o1; o += 4)
            for (int64_t r = r0; r < r1; r++) vblock4(j, r, o);
        for (; o < j->o1; o++)
            for (int64_t r = r0; r < r1; r++) vblock1(j, r, o);
#else
        for (; o + 2 <= j->o1; o += 2)
            for (int64_t r = r0; r < r1; r++) ablock2(j, r, o);
        for (; o < j->o1; o++)
            for (int64_t r = r0; r < r1; r++) ablock1(j, r, o);
#endif
    }
#else
    for (int64_t o = j->o0; o < j->o1; o++)
        for (int64_t r = 0; r < j->n; r++)
            j->y[r * j->out + o] = dot_scalar(j->x + r * j->in, j->u + o * j->in, j->in) - (j->sum[r] << 15);
#endif
    return 0;
}

int hss_ee_kernel_simd(void) {
#if defined(HSS_VNNI)
    return 4;
#elif defined(HSS_AVX2_DIGITS)
    return 1;
#else
    return 0;
#endif
}

/* y (n, out) = x (n, in) . (u - 2^15)^T mod 2^64, over `threads` threads (output rows split
 * in multiples of four). Returns 0, or -1 when memory for the row sums / digit planes could not
 * be had. A thread that cannot be started
 * is done by the caller. */
int hss_ee_ring_matmul(const uint64_t *x, const uint16_t *u, uint64_t *y, int64_t n, int64_t in,
                       int64_t out, int threads) {
    uint64_t *sum = 0;
    int16_t *xd = 0, *wt = 0;
#if defined(HSS_DIGITS)
    const int64_t inp = (in + LANES - 1) & ~(int64_t)(LANES - 1);
    size_t bytes = ((size_t)(n > 0 ? n : 1) * ND * (size_t)(inp > 0 ? inp : LANES) * 2 + 63) & ~(size_t)63;
    xd = (int16_t *)aligned_alloc(64, bytes);
    if (!xd) return -1;
    for (int64_t r = 0; r < n; r++) digits(x + r * in, xd + r * ND * inp, in, inp);
#if defined(HSS_AVX2_DIGITS)
    if (in & 15) { /* the partial last vector of each weight row, read from here instead of past `in` */
        wt = (int16_t *)aligned_alloc(64, ((size_t)out * 32 + 63) & ~(size_t)63);
        if (!wt) {
            free(xd);
            return -1;
        }
        const int64_t full = in & ~(int64_t)15;
        for (int64_t o = 0; o < out; o++)
            for (int64_t k = 0; k < 16; k++)
                wt[o * 16 + k] = full + k < in ? (int16_t)(u[o * in + full + k] ^ 0x8000) : 0;
    }
#endif
#else
    const int64_t inp = 0;
    sum = (uint64_t *)malloc((size_t)(n > 0 ? n : 1) * sizeof(uint64_t));
    if (!sum) return -1;
    for (int64_t r = 0; r < n; r++) {
        uint64_t s = 0;
        for (int64_t i = 0; i < in; i++) s += x[r * in + i];
        sum[r] = s;
    }
#endif
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
        jobs[t] = (job_t){x, sum, u, y, n, in, out, o, o1, xd, inp, wt};
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
    free(xd);
    free(wt);
    return 0;
}
