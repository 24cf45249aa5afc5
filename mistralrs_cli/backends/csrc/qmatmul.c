// Quantized matmul on the CPU with llama.cpp's numerics: y = x W^T where W stays in GGUF blocks.
//
// Each activation row is rounded to 8-bit blocks of 32 (scale max|x|/127 kept as fp16; for the
// Q4_1 weights also the block sum d*sum(q) as fp16), then every weight block is an integer dot
// product with its activation block, scaled in f32. Loop order: weight row, block, activation
// row, so a weight block is read from memory once however many activation rows there are.
// Built at first use by native.py (cc -O3 -march=native -fopenmp); AVX2 where the CPU has it.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

enum { QK = 32 };
enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q8_0 = 8 };  // GGML type ids

#ifdef __F16C__
static inline float h2f(uint16_t h) { return _cvtsh_ss(h); }
#else
static float h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) { bits = sign; }
        else {  // subnormal: normalize
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) { bits = sign | 0x7f800000 | (man << 13); }
    else { bits = sign | ((exp + 127 - 15) << 23) | (man << 13); }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
#endif

static uint16_t f2h(float f) {  // round to nearest even, as the F16C instruction does
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    int32_t exp = (int32_t)((x >> 23) & 0xff) - 127 + 15;
    uint32_t man = x & 0x7fffff;
    if (((x >> 23) & 0xff) == 0xff) return (uint16_t)(sign | 0x7c00 | (man ? 0x200 : 0));
    if (exp >= 31) return (uint16_t)(sign | 0x7c00);
    if (exp <= 0) {
        if (exp < -10) return (uint16_t)sign;
        man |= 0x800000;
        uint32_t shift = (uint32_t)(14 - exp), half = 1u << (shift - 1), rest = man & ((1u << shift) - 1);
        uint32_t r = man >> shift;
        if (rest > half || (rest == half && (r & 1))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = (uint32_t)(exp << 10) | (man >> 13), rest = man & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (r & 1))) r++;
    return (uint16_t)(sign | r);
}

static float round_h(float f) { return h2f(f2h(f)); }

static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

// x (K floats) -> int8 codes, per-block scale d (fp16-rounded) and d*sum(codes) (fp16-rounded)
static void quantize_row(const float *x, int64_t k, int8_t *q, float *d, float *s) {
    for (int64_t b = 0; b < k / QK; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float db = amax / 127.0f, id = amax != 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int j = 0; j < QK; j++) {
            int v = (int)nearbyintf(xb[j] * id);
            q[b * QK + j] = (int8_t)v;
            sum += v;
        }
        d[b] = round_h(db);
        s[b] = round_h(db * (float)sum);
    }
}

#ifdef __AVX2__
static inline __m256i nibbles32(const uint8_t *qs) {  // element j: low nibble of byte j, j+16: high
    const __m128i t = _mm_loadu_si128((const __m128i *)qs);
    const __m256i b = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
    return _mm256_and_si256(b, _mm256_set1_epi8(0x0f));
}

// 8 int32 partial sums of u[j] * s[j] (u unsigned, small), as floats
static inline __m256 dot_u8s8(__m256i u, __m256i s) {
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}

static inline __m256 dot_s8s8(__m256i a, __m256i b) {  // signed x signed via the sign trick
    return dot_u8s8(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
}

static inline float hsum(__m256 v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

static inline __m256i bits32(const uint8_t *qh) {  // 0xff where bit j of the u32 is set
    uint32_t v;
    memcpy(&v, qh, 4);
    const __m256i shuf = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32((int)v), shuf);
    b = _mm256_or_si256(b, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    return _mm256_cmpeq_epi8(b, _mm256_set1_epi64x(-1));
}

// one weight row against up to 8 activation rows, vector accumulators, one hsum per row
static void row_avx2(int type, const uint8_t *wr, int64_t nb, int bb, const int8_t *xq, const float *xd,
                     const float *xs, int64_t k, int64_t rn, float *out) {
    __m256 acc[8];
    float accm[8];
    for (int64_t r = 0; r < rn; r++) { acc[r] = _mm256_setzero_ps(); accm[r] = 0.0f; }
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *w = wr + b * bb;
        const float wd = h2f(rd16(w));
        __m256i q;
        int is_unsigned = 0;
        float wm = 0.0f;
        if (type == T_Q4_0) {
            q = _mm256_sub_epi8(nibbles32(w + 2), _mm256_set1_epi8(8));
        } else if (type == T_Q4_1) {
            q = nibbles32(w + 4);
            is_unsigned = 1;
            wm = h2f(rd16(w + 2));
        } else if (type == T_Q5_0) {
            // (nibble | bit4 << 4) - 16 == nibble | 0xf0 where bit4 is clear (as int8), else nibble
            q = _mm256_or_si256(nibbles32(w + 6), _mm256_andnot_si256(bits32(w + 2), _mm256_set1_epi8((char)0xf0)));
        } else {
            q = _mm256_loadu_si256((const __m256i *)(w + 2));
        }
        for (int64_t r = 0; r < rn; r++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + r * k + b * QK));
            const __m256 p = is_unsigned ? dot_u8s8(q, xv) : dot_s8s8(q, xv);
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(wd * xd[r * nb + b]), p, acc[r]);
            accm[r] += wm * xs[r * nb + b];
        }
    }
    for (int64_t r = 0; r < rn; r++) out[r] = hsum(acc[r]) + accm[r];
}
#endif

// scalar reference: integer dot of one weight block with one activation block
__attribute__((unused)) static int block_dot(int type, const uint8_t *w, const int8_t *xq, float *wd, float *wm) {
    *wm = 0.0f;
    *wd = h2f(rd16(w));
    int s = 0;
    switch (type) {
    case T_Q4_0:
        for (int j = 0; j < 16; j++) s += ((w[2 + j] & 15) - 8) * xq[j] + ((w[2 + j] >> 4) - 8) * xq[j + 16];
        break;
    case T_Q4_1:
        *wm = h2f(rd16(w + 2));
        for (int j = 0; j < 16; j++) s += (w[4 + j] & 15) * xq[j] + (w[4 + j] >> 4) * xq[j + 16];
        break;
    case T_Q5_0: {
        uint32_t qh;
        memcpy(&qh, w + 2, 4);
        for (int j = 0; j < 16; j++) {
            const int lo = (w[6 + j] & 15) | (((qh >> j) & 1) << 4);
            const int hi = (w[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
            s += (lo - 16) * xq[j] + (hi - 16) * xq[j + 16];
        }
        break;
    }
    case T_Q8_0:
        for (int j = 0; j < QK; j++) s += (int8_t)w[2 + j] * xq[j];
        break;
    }
    return s;
}

static int block_bytes(int type) {
    switch (type) {
    case T_Q4_0: return 18;
    case T_Q4_1: return 20;
    case T_Q5_0: return 22;
    case T_Q8_0: return 34;
    }
    return 0;
}

int qmm_supported(int type) { return block_bytes(type) != 0; }

// y[r * ldy + i] = sum_k x[r, k] W[i, k] for rows r < m of x (m, k) and rows i < n of W (n blocks
// per row of k / 32); W given as raw GGUF rows. Returns 0, or -1 for an unsupported call.
int qmm(int type, const uint8_t *w, int64_t n, int64_t k, const float *x, int64_t m, float *y, int64_t ldy,
        int n_threads) {
    const int bb = block_bytes(type);
    if (!bb || k % QK) return -1;
    const int64_t nb = k / QK;
    int8_t *xq = malloc((size_t)(m * k));
    float *xd = malloc(sizeof(float) * (size_t)(m * nb)), *xs = malloc(sizeof(float) * (size_t)(m * nb));
    if (!xq || !xd || !xs) { free(xq); free(xd); free(xs); return -1; }
    for (int64_t r = 0; r < m; r++) quantize_row(x + r * k, k, xq + r * k, xd + r * nb, xs + r * nb);
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *wr = w + i * nb * bb;
        for (int64_t r0 = 0; r0 < m; r0 += 8) {  // up to 8 activation rows share each weight block
            const int64_t rn = m - r0 < 8 ? m - r0 : 8;
            float out[8];
#ifdef __AVX2__
            row_avx2(type, wr, nb, bb, xq + r0 * k, xd + r0 * nb, xs + r0 * nb, k, rn, out);
#else
            for (int64_t r = 0; r < rn; r++) out[r] = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                float wd, wm;
                for (int64_t r = 0; r < rn; r++) {
                    const int64_t row = r0 + r;
                    const int si = block_dot(type, wr + b * bb, xq + row * k + b * QK, &wd, &wm);
                    out[r] += wd * xd[row * nb + b] * (float)si + wm * xs[row * nb + b];
                }
            }
#endif
            for (int64_t r = 0; r < rn; r++) y[(r0 + r) * ldy + i] = out[r];
        }
    }
    free(xq); free(xd); free(xs);
    return 0;
}
