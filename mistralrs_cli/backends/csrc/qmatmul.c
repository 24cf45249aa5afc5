// Quantized matmul on the CPU, activations rounded as llama.cpp rounds them (fast; precise adds a
// second 8-bit part): y = x W^T where W stays in GGUF blocks.
//
// Each activation row is rounded to 8-bit blocks of 32 (scale max|x|/127 kept as fp16; for the
// Q4_1 weights also the block sum d*sum(q) as fp16), then every weight block is an integer dot
// product with its activation block, scaled in f32. Loop order: weight row, block, activation
// row, so a weight block is read from memory once however many activation rows there are.
// Q5_1 also takes that block sum (llama.cpp's q8_1); IQ4_NL takes plain q8_0. The K types (Q2_K,
// Q3_K, Q4_K, Q5_K, Q6_K) and IQ4_XS multiply against llama.cpp's q8_K rounding instead: 8-bit
// blocks of 256 with an f32 scale and sums per 16. qmm_parts also fuses what sits around a projection
// in a decoder layer (an RMSNorm or a gated activation before it, a bias, a norm and a residual
// add after it), so one call does what took the torch path a dozen ops.
// Built at first use by native.py (cc -O3 -march=native -fopenmp); AVX2 where the CPU has it.
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#ifndef QMM_SCHED
#define QMM_SCHED guided
#endif

enum { QK = 32 };
enum { QKK = 256 };

typedef struct {
    int type;          // GGML type id, | PACKED for packed.c's layout
    int64_t rows;
    const uint8_t *w;  // rows x (k / block) blocks, or the packed groups
} qpart_t;
enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8, T_Q2_K = 10, T_Q3_K = 11, T_Q4_K = 12, T_Q5_K = 13,
       T_Q6_K = 14, T_IQ4_NL = 20, T_IQ4_XS = 23 };  // GGML ids

// IQ4_NL's and IQ4_XS's 16 non-linear levels (the nibble picks one)
static const int8_t IQ4_LEVELS[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

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
int packed_block_bytes(int type);
int packed_k_block_bytes(int type);
void packed_k_rows(int type, const uint8_t *w, int64_t n, int64_t k, int64_t g0, int64_t g1, int64_t m,
                   const int8_t *kq, const float *kd, const int16_t *kbs, const float *kms, float *y, int64_t ldy);
void packed_rows(int type, const uint8_t *w, int64_t n, int64_t k, int64_t g0, int64_t g1, int64_t m,
                 const int8_t *xq, const float *xd, const float *xs, const int32_t *xi, float *y, int64_t ldy);
int packed_wide(int type);
int packed_wide_precise(int type);
void packed_rows_w(int type, const uint8_t *w, int64_t n, int64_t k, int64_t g0, int64_t g1, int64_t m,
                   const int16_t *xw, const float *xd, const int32_t *xi, int h, float *y, int64_t ldy);
enum { PACKED = 0x100 };  // qpart.type flag: weights in packed.c's 8-row groups

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define Z512 1
#else
#define Z512 0
#endif

#if defined(__AVX2__) && !Z512
static inline float hmax8(__m256 v) {
    __m128 r = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_max_ps(r, _mm_movehl_ps(r, r));
    r = _mm_max_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

static inline int hsum8_i32(__m256i v) {
    __m128i r = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0x4e));
    r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0xb1));
    return _mm_cvtsi128_si32(r);
}

// 32 int32 codes (each within int8) -> 32 bytes in order (the packs interleave the 128-bit
// lanes; the permute puts them back)
static inline void store_codes32(const __m256i *v, int8_t *q) {
    const __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}
#endif

// precise: s is d * sum(codes) with the fp16 d actually used, unrounded (the two-part activations
// of qmm_opts.precise, below)
static void quantize_row(const float *x, int64_t k, int8_t *q, float *d, float *s, int32_t *isum, int precise) {
#if Z512
    // the scalar loop below, 16 lanes at a time: max, one product and round-to-nearest-even per
    // value are exact operations, so the codes and scales come out the same
    for (int64_t b = 0; b < k / QK; b++) {
        const __m512 a0 = _mm512_loadu_ps(x + b * QK), a1 = _mm512_loadu_ps(x + b * QK + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a0), _mm512_abs_ps(a1)));
        const float db = amax / 127.0f, id = amax != 0.0f ? 127.0f / amax : 0.0f;
        const __m512 iv = _mm512_set1_ps(id);
        const __m512i v0 = _mm512_cvtps_epi32(_mm512_mul_ps(a0, iv)), v1 = _mm512_cvtps_epi32(_mm512_mul_ps(a1, iv));
        _mm_storeu_si128((__m128i *)(q + b * QK), _mm512_cvtepi32_epi8(v0));
        _mm_storeu_si128((__m128i *)(q + b * QK + 16), _mm512_cvtepi32_epi8(v1));
        const int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(v0, v1));
        d[b] = round_h(db);
        s[b] = precise ? d[b] * (float)sum : round_h(db * (float)sum);
        isum[b] = sum;
    }
    return;
#elif defined(__AVX2__)
    // the same, 8 lanes at a time (the scalar loop calls fmaxf per value: on an AVX2-only CPU
    // the rounding of a prefill's activations took longer than its products)
    const __m256 nosign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t b = 0; b < k / QK; b++) {
        __m256 a[4], mx = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            a[i] = _mm256_loadu_ps(x + b * QK + 8 * i);
            mx = _mm256_max_ps(mx, _mm256_and_ps(a[i], nosign));
        }
        const float amax = hmax8(mx);
        const float db = amax / 127.0f, id = amax != 0.0f ? 127.0f / amax : 0.0f;
        const __m256 iv = _mm256_set1_ps(id);
        __m256i v[4];
        for (int i = 0; i < 4; i++) v[i] = _mm256_cvtps_epi32(_mm256_mul_ps(a[i], iv));
        store_codes32(v, q + b * QK);
        const int sum = hsum8_i32(_mm256_add_epi32(_mm256_add_epi32(v[0], v[1]), _mm256_add_epi32(v[2], v[3])));
        d[b] = round_h(db);
        s[b] = precise ? d[b] * (float)sum : round_h(db * (float)sum);
        isum[b] = sum;
    }
    return;
#endif
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
        s[b] = precise ? d[b] * (float)sum : round_h(db * (float)sum);
        isum[b] = sum;
    }
}

// x (K floats) -> 16-bit codes per 16 values: scale amax / 32767 (f32, not rounded to fp16),
// codes rint(x * 32767 / amax), their sum (packed_rows_w's activations, precise). Per 16,
// not 32: the steps are then finer than the two 8-bit parts' (see packed.c).
static void quantize_row16(const float *x, int64_t k, int16_t *q, float *d, int32_t *off) {
    for (int64_t b = 0; b < k / 16; b++) {
        const float *xb = x + b * 16;
#if defined(__AVX2__) && !Z512  // the scalar loop 8 lanes at a time: the same codes
        const __m256 nosign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        const __m256 a0 = _mm256_loadu_ps(xb), a1 = _mm256_loadu_ps(xb + 8);
        const float amax = hmax8(_mm256_max_ps(_mm256_and_ps(a0, nosign), _mm256_and_ps(a1, nosign)));
        const __m256 iv = _mm256_set1_ps(amax != 0.0f ? 32767.0f / amax : 0.0f);
        const __m256i v0 = _mm256_cvtps_epi32(_mm256_mul_ps(a0, iv)), v1 = _mm256_cvtps_epi32(_mm256_mul_ps(a1, iv));
        // packs interleaves the 128-bit lanes; the permute undoes it
        _mm256_storeu_si256((__m256i *)(q + b * 16), _mm256_permute4x64_epi64(_mm256_packs_epi32(v0, v1), 0xd8));
        const int sum = hsum8_i32(_mm256_add_epi32(v0, v1));
#else
        float amax = 0.0f;
        for (int j = 0; j < 16; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float id = amax != 0.0f ? 32767.0f / amax : 0.0f;
        int sum = 0;
        for (int j = 0; j < 16; j++) {
            const int v = (int)nearbyintf(xb[j] * id);
            q[b * 16 + j] = (int16_t)v;
            sum += v;
        }
#endif
        d[b] = amax / 32767.0f;
        off[b] = sum;
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
        } else if (type == T_Q5_1) {  // nibble | bit4 << 4, unsigned 0..31
            q = _mm256_or_si256(nibbles32(w + 8), _mm256_and_si256(bits32(w + 4), _mm256_set1_epi8(0x10)));
            is_unsigned = 1;
            wm = h2f(rd16(w + 2));
        } else if (type == T_IQ4_NL) {  // nibble -> level by a byte shuffle of the table
            const __m256i lv = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)IQ4_LEVELS));
            q = _mm256_shuffle_epi8(lv, nibbles32(w + 2));
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

// sum of (code - offset) * x over a Q5_0 / Q5_1 block: code j = its nibble | bit j of qh << 4
__attribute__((unused)) static int q5_dot(const uint8_t *qh_bytes, const uint8_t *qs, int offset, const int8_t *xq) {
    uint32_t qh;
    memcpy(&qh, qh_bytes, 4);
    int s = 0;
    for (int j = 0; j < 16; j++) {
        const int lo = (qs[j] & 15) | (((qh >> j) & 1) << 4);
        const int hi = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
        s += (lo - offset) * xq[j] + (hi - offset) * xq[j + 16];
    }
    return s;
}

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
    case T_Q5_0:
        s = q5_dot(w + 2, w + 6, 16, xq);
        break;
    case T_Q5_1:
        *wm = h2f(rd16(w + 2));
        s = q5_dot(w + 4, w + 8, 0, xq);
        break;
    case T_Q8_0:
        for (int j = 0; j < QK; j++) s += (int8_t)w[2 + j] * xq[j];
        break;
    case T_IQ4_NL:
        for (int j = 0; j < 16; j++) s += IQ4_LEVELS[w[2 + j] & 15] * xq[j] + IQ4_LEVELS[w[2 + j] >> 4] * xq[j + 16];
        break;
    }
    return s;
}

static int block_bytes(int type) {
    if (type & PACKED) return packed_block_bytes(type & ~PACKED) || packed_k_block_bytes(type & ~PACKED);
    switch (type) {
    case T_Q4_0: return 18;
    case T_Q4_1: return 20;
    case T_Q5_0: return 22;
    case T_Q5_1: return 24;
    case T_Q8_0: return 34;
    case T_IQ4_NL: return 18;
    case T_Q2_K: return 84;
    case T_Q3_K: return 110;
    case T_IQ4_XS: return 136;
    case T_Q4_K: return 144;
    case T_Q5_K: return 176;
    case T_Q6_K: return 210;
    }
    return 0;
}

static int is_k(int type) {  // rounded as q8_K (llama.cpp's vec_dot_type for the type)
    return type == T_Q2_K || type == T_Q3_K || type == T_Q4_K || type == T_Q5_K || type == T_Q6_K || type == T_IQ4_XS;
}

// work units: weight rows, or (packed) pairs of 8-row groups, see packed.c
static int64_t units(const qpart_t *p) { return p->type & PACKED ? ((p->rows + 7) / 8 + 1) / 2 : p->rows; }

int qmm_supported(int type) { return block_bytes(type) != 0; }

// ---- K types: llama.cpp's q8_K activations (codes, f32 scale, sums of 16) ----

// an all-zero q8_K block: codes, sums and scale all 0 (the scale would divide by zero); 1 if so
static inline int zero_kblock(float amax, int8_t *qb, float *d, int16_t *bsums) {
    if (amax != 0.0f) return 0;
    *d = 0.0f;
    memset(qb, 0, QKK);
    memset(bsums, 0, 32);
    return 1;
}

static void quantize_row_k(const float *x, int64_t k, int8_t *q, float *d, int16_t *bsums) {
#if Z512
    // as the scalar loop below: the first value of the largest magnitude sets the scale; the
    // same products and rounding per value
    for (int64_t b = 0; b < k / QKK; b++) {
        const float *xb = x + b * QKK;
        __m512 m = _mm512_setzero_ps();
        for (int i = 0; i < 16; i++) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(xb + 16 * i)));
        const float amax = _mm512_reduce_max_ps(m);
        int8_t *qb = q + b * QKK;
        if (zero_kblock(amax, qb, d + b, bsums + b * 16)) continue;
        float mx = 0.0f;
        const __m512 av = _mm512_set1_ps(amax);
        for (int i = 0; i < 16; i++) {
            const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_loadu_ps(xb + 16 * i)), av, _CMP_EQ_OQ);
            if (hit) { mx = xb[16 * i + __builtin_ctz((unsigned)hit)]; break; }
        }
        const float iscale = -127.0f / mx;
        const __m512 iv = _mm512_set1_ps(iscale);
        const __m512i cap = _mm512_set1_epi32(127);
        for (int i = 0; i < 16; i++) {
            const __m512i v = _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(iv, _mm512_loadu_ps(xb + 16 * i))), cap);
            _mm_storeu_si128((__m128i *)(qb + 16 * i), _mm512_cvtepi32_epi8(v));
            bsums[b * 16 + i] = (int16_t)_mm512_reduce_add_epi32(v);
        }
        d[b] = 1.0f / iscale;
    }
    return;
#elif defined(__AVX2__)
    // the same, 8 lanes at a time
    const __m256 nosign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t b = 0; b < k / QKK; b++) {
        const float *xb = x + b * QKK;
        __m256 m = _mm256_setzero_ps();
        for (int i = 0; i < 32; i++) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(xb + 8 * i), nosign));
        const float amax = hmax8(m);
        int8_t *qb = q + b * QKK;
        if (zero_kblock(amax, qb, d + b, bsums + b * 16)) continue;
        float mx = 0.0f;
        const __m256 av = _mm256_set1_ps(amax);
        for (int i = 0; i < 32; i++) {
            const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_and_ps(_mm256_loadu_ps(xb + 8 * i), nosign), av, _CMP_EQ_OQ));
            if (hit) { mx = xb[8 * i + __builtin_ctz((unsigned)hit)]; break; }
        }
        const float iscale = -127.0f / mx;
        const __m256 iv = _mm256_set1_ps(iscale);
        const __m256i cap = _mm256_set1_epi32(127);
        for (int i = 0; i < 8; i++) {
            __m256i v[4];
            for (int j = 0; j < 4; j++)
                v[j] = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(iv, _mm256_loadu_ps(xb + 32 * i + 8 * j))), cap);
            store_codes32(v, qb + 32 * i);
            bsums[b * 16 + 2 * i] = (int16_t)hsum8_i32(_mm256_add_epi32(v[0], v[1]));
            bsums[b * 16 + 2 * i + 1] = (int16_t)hsum8_i32(_mm256_add_epi32(v[2], v[3]));
        }
        d[b] = 1.0f / iscale;
    }
    return;
#endif
    for (int64_t b = 0; b < k / QKK; b++) {
        const float *xb = x + b * QKK;
        float amax = 0.0f, mx = 0.0f;
        for (int j = 0; j < QKK; j++) {
            if (fabsf(xb[j]) > amax) { amax = fabsf(xb[j]); mx = xb[j]; }
        }
        int8_t *qb = q + b * QKK;
        if (zero_kblock(amax, qb, d + b, bsums + b * 16)) continue;
        const float iscale = -127.0f / mx;
        for (int j = 0; j < QKK; j++) {
            int v = (int)nearbyintf(iscale * xb[j]);
            qb[j] = (int8_t)(v > 127 ? 127 : v);
        }
        for (int g = 0; g < 16; g++) {
            int s = 0;
            for (int j = 0; j < 16; j++) s += qb[g * 16 + j];
            bsums[b * 16 + g] = (int16_t)s;
        }
        d[b] = 1.0f / iscale;
    }
}

// per q8_K block and sub-block of 32: d * (sum of its 32 codes), the factor of Q4_K's mins
// (computed once per call, not once per weight group as the tiles did)
static void q8k_mins(const float *d, const int16_t *bsums, int64_t nbk, float *out) {
    for (int64_t b = 0; b < nbk; b++)
        for (int i = 0; i < 8; i++)
            out[b * 8 + i] = d[b] * (float)(bsums[b * 16 + 2 * i] + bsums[b * 16 + 2 * i + 1]);
}

static inline void k_scale_min(int j, const uint8_t *q, int *sc, int *m) {  // Q4_K / Q5_K 6-bit fields
    if (j < 4) { *sc = q[j] & 63; *m = q[j + 4] & 63; }
    else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

static inline int dot32(const int8_t *a, const int8_t *b) {
    int s = 0;
    for (int l = 0; l < 32; l++) s += a[l] * b[l];
    return s;
}

static inline int dot16(const int8_t *a, const int8_t *b) {
    int s = 0;
    for (int l = 0; l < 16; l++) s += a[l] * b[l];
    return s;
}

#ifdef __AVX2__
static inline int hsum_i32(__m256i v) {
    __m128i r = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0x4e));
    r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0xb1));
    return _mm_cvtsi128_si32(r);
}

// 16-bit pair sums of 32 products times scale a in the low 16 values, b in the high 16: int32s
static inline __m256i scale_pairs(__m256i p16, int a, int b) {
    return _mm256_madd_epi16(p16, _mm256_set_m128i(_mm_set1_epi16((short)b), _mm_set1_epi16((short)a)));
}
#endif

// Q2_K {scales[16] (low nibble scale, high nibble min), qs[64] (2 bits), d, dmin}: codes 0..3 in
// 16 sub-blocks of 16; value i of 128-half h is bits 2s..2s+1 of qs[32h + i % 32], s = i / 32 % 4
static float q2k_dot(const uint8_t *w, const int8_t *xq, float xd, const int16_t *bs) {
    int isum = 0, msum = 0;
#ifdef __AVX2__
    // the same integer sums: 32 values (two sub-blocks) per step, exact in int16 / int32
    __m256i acc = _mm256_setzero_si256();
    for (int h = 0; h < 2; h++) {
        const __m256i q = _mm256_loadu_si256((const __m256i *)(w + 16 + 32 * h));
        for (int sh = 0; sh < 4; sh++) {
            const int j = 8 * h + 2 * sh;
            const __m256i v = _mm256_and_si256(_mm256_srli_epi16(q, 2 * sh), _mm256_set1_epi8(3));
            const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + 16 * j));
            acc = _mm256_add_epi32(acc, scale_pairs(_mm256_maddubs_epi16(v, x), w[j] & 15, w[j + 1] & 15));
        }
    }
    isum = hsum_i32(acc);
    for (int j = 0; j < 16; j++) msum += (w[j] >> 4) * bs[j];
#else
    for (int j = 0; j < 16; j++) {
        const uint8_t *q = w + 16 + 32 * (j / 8) + 16 * (j % 2);
        const int shift = 2 * (j / 2 % 4);
        int8_t v[16];
        for (int l = 0; l < 16; l++) v[l] = (int8_t)((q[l] >> shift) & 3);
        isum += (w[j] & 15) * dot16(v, xq + 16 * j);
        msum += (w[j] >> 4) * bs[j];
    }
#endif
    const float dall = xd * h2f(rd16(w + 80)), dmin = xd * h2f(rd16(w + 82));
    return dall * (float)isum - dmin * (float)msum;
}

// Q3_K {hmask[32], qs[64] (2 low bits, as Q2_K), scales[12] (16 6-bit, offset 32), d}: code =
// low bits - 4 where the value's hmask bit (bit i / 32 of hmask[i % 32]) is clear
static float q3k_dot(const uint8_t *w, const int8_t *xq, float xd) {
    const uint8_t *hm = w, *qs = w + 32, *sc = w + 96;
    int isum = 0;
#ifdef __AVX2__
    int scales[16];
    for (int j = 0; j < 16; j++)
        scales[j] = (((sc[j % 8] >> (4 * (j / 8))) & 15) | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32;
    const __m256i hv = _mm256_loadu_si256((const __m256i *)hm), one = _mm256_set1_epi8(1);
    __m256i acc = _mm256_setzero_si256();
    for (int h = 0; h < 2; h++) {
        const __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * h));
        for (int sh = 0; sh < 4; sh++) {
            const int j = 8 * h + 2 * sh;
            const __m256i v = _mm256_and_si256(_mm256_srli_epi16(q, 2 * sh), _mm256_set1_epi8(3));
            // code = v - off with off 4 where the hmask bit is clear: dot(v, x) - dot(off, x)
            const __m256i hb = _mm256_and_si256(_mm256_srli_epi16(hv, 4 * h + sh), one);
            const __m256i off = _mm256_slli_epi16(_mm256_xor_si256(hb, one), 2);
            const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + 16 * j));
            const __m256i p = _mm256_sub_epi16(_mm256_maddubs_epi16(v, x), _mm256_maddubs_epi16(off, x));
            acc = _mm256_add_epi32(acc, scale_pairs(p, scales[j], scales[j + 1]));
        }
    }
    isum = hsum_i32(acc);
#else
    for (int j = 0; j < 16; j++) {
        const int scale = ((sc[j % 8] >> (4 * (j / 8))) & 15) | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4);
        const uint8_t *q = qs + 32 * (j / 8) + 16 * (j % 2), *h = hm + 16 * (j % 2);
        const int shift = 2 * (j / 2 % 4), bit = j / 2;
        int8_t v[16];
        for (int l = 0; l < 16; l++) v[l] = (int8_t)(((q[l] >> shift) & 3) - ((h[l] >> bit) & 1 ? 0 : 4));
        isum += (scale - 32) * dot16(v, xq + 16 * j);
    }
#endif
    return h2f(rd16(w + 108)) * xd * (float)isum;
}

// IQ4_XS {d, scales_h (2 high bits per sub-block), scales_l[4] (4 low bits), qs[128]}: 8
// sub-blocks of 32 as IQ4_NL's, each with a 6-bit scale offset by 32
static float iq4xs_dot(const uint8_t *w, const int8_t *xq, float xd) {
    const int sh = rd16(w + 2);
    int isum = 0;
#ifdef __AVX2__
    const __m256i lv = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)IQ4_LEVELS));
    __m256i acc = _mm256_setzero_si256();
    for (int j = 0; j < 8; j++) {
        const int scale = (((w[4 + j / 2] >> (4 * (j % 2))) & 15) | (((sh >> (2 * j)) & 3) << 4)) - 32;
        const __m256i q = _mm256_shuffle_epi8(lv, nibbles32(w + 8 + 16 * j));
        const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + 32 * j));
        const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q));  // |q| * ±x
        acc = _mm256_add_epi32(acc, scale_pairs(p, scale, scale));
    }
    isum = hsum_i32(acc);
#else
    for (int j = 0; j < 8; j++) {
        const int scale = ((w[4 + j / 2] >> (4 * (j % 2))) & 15) | (((sh >> (2 * j)) & 3) << 4);
        const uint8_t *q = w + 8 + 16 * j;
        const int8_t *x = xq + 32 * j;
        int s = 0;
        for (int l = 0; l < 16; l++) s += IQ4_LEVELS[q[l] & 15] * x[l] + IQ4_LEVELS[q[l] >> 4] * x[l + 16];
        isum += (scale - 32) * s;
    }
#endif
    return h2f(rd16(w)) * xd * (float)isum;
}

// one K block against one q8_K block: d_w * d_x * sum(scale * int dot) - dmin * d_x * sum(min * bsum)
static float kblock_dot(int type, const uint8_t *w, const int8_t *xq, float xd, const int16_t *bs) {
    if (type == T_Q2_K) return q2k_dot(w, xq, xd, bs);
    if (type == T_Q3_K) return q3k_dot(w, xq, xd);
    if (type == T_IQ4_XS) return iq4xs_dot(w, xq, xd);
    int8_t v[QKK];
    if (type == T_Q6_K) {
        const uint8_t *ql = w, *qh = w + 128;
        const int8_t *sc = (const int8_t *)(w + 192);
        for (int n = 0; n < 2; n++) {
            int8_t *y = v + n * 128;
            const uint8_t *l_ = ql + n * 64, *h_ = qh + n * 32;
            for (int l = 0; l < 32; l++) {
                y[l] = (int8_t)(((l_[l] & 0xF) | (((h_[l] >> 0) & 3) << 4)) - 32);
                y[l + 32] = (int8_t)(((l_[l + 32] & 0xF) | (((h_[l] >> 2) & 3) << 4)) - 32);
                y[l + 64] = (int8_t)(((l_[l] >> 4) | (((h_[l] >> 4) & 3) << 4)) - 32);
                y[l + 96] = (int8_t)(((l_[l + 32] >> 4) | (((h_[l] >> 6) & 3) << 4)) - 32);
            }
        }
        int isum = 0;
        for (int g = 0; g < 16; g++) {
            int s = 0;
            for (int l = 0; l < 16; l++) s += v[g * 16 + l] * xq[g * 16 + l];
            isum += sc[g] * s;
        }
        return h2f(rd16(w + 208)) * xd * (float)isum;
    }
    const uint8_t *scales = w + 4, *qs = type == T_Q4_K ? w + 16 : w + 48, *qh = w + 16;
    for (int j = 0; j < 4; j++) {
        for (int l = 0; l < 32; l++) {
            int lo = qs[32 * j + l] & 0xF, hi = qs[32 * j + l] >> 4;
            if (type == T_Q5_K) {
                lo |= ((qh[l] >> (2 * j)) & 1) << 4;
                hi |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
            }
            v[64 * j + l] = (int8_t)lo;
            v[64 * j + 32 + l] = (int8_t)hi;
        }
    }
    int isum = 0, msum = 0;
    for (int j = 0; j < 8; j++) {
        int sc, m;
        k_scale_min(j, scales, &sc, &m);
        isum += sc * dot32(v + 32 * j, xq + 32 * j);
        msum += m * (bs[2 * j] + bs[2 * j + 1]);
    }
    return xd * (h2f(rd16(w)) * (float)isum - h2f(rd16(w + 2)) * (float)msum);
}

// ---- the driver ----


typedef struct {
    const float *norm_w;   // RMSNorm of each input row first (weights incl. Gemma's +1), or NULL
    float norm_eps;
    int act;               // 1: silu(gate) * up, 2: gelu_tanh(gate) * up over input rows [gate | up] of 2k
    const float *bias;     // added to the outputs (sum of rows), or NULL
    float *residual;       // NULL: y = outputs; else residual += outputs (after post_w's norm)
    int64_t ld_res;
    const float *post_w;   // RMSNorm of the outputs before the residual add, or NULL
    float post_eps;
    int precise;           // two-part activations (see qmm_parts): ~16-bit instead of 8-bit rounding
    const void *lora;      // LoRA side paths (lora.c's qmm_lora), or NULL
} qmm_opts;

// lora.c: the side paths, work-shared inside qmm_parts's parallel region
int lora_active(const void *l);
int64_t lora_rank(const void *l);
void lora_down(const void *l, const float *x, int64_t ldx, int64_t k, int64_t m, float *u);
void lora_up(const void *l, const float *u, int64_t m, float *y, int64_t ldy, int64_t n);

static void rms_scale_row(const float *x, int64_t k, const float *w, float eps, float ss, float *out) {
    const float r = 1.0f / sqrtf(ss / (float)k + eps);
    for (int64_t j = 0; j < k; j++) out[j] = x[j] * r * w[j];
}

static void rms_norm_row(const float *x, int64_t k, const float *w, float eps, float *out) {
    float ss = 0.0f;
    for (int64_t j = 0; j < k; j++) ss += x[j] * x[j];
    rms_scale_row(x, k, w, eps, ss, out);
}

// Rows' sums of squares NORM_ROWS at a time (Z512): lane i sums row i's squares in order from
// the first, each square rounded before its add, as rms_norm_row's loop is compiled here (the
// squares vectorized, then added one by one: one dependent add per value, ~4 cycles each); 16
// rows' chains side by side instead of one after another, so the same sums.
#define NORM_ROWS (Z512 ? 16 : 1)
static void sumsq_rows(const float *x, int64_t ld, int n, int64_t k, float *ss) {
#if Z512
    const __mmask16 mask = (__mmask16)((1u << n) - 1);
    const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32((int)ld));
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < k; j++) {
        const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, idx, x + j, 4);
        __m512 sq = _mm512_mul_ps(v, v);
        __asm__("" : "+v"(sq));  // kept apart from the add: no fused multiply-add
        acc = _mm512_add_ps(acc, sq);
    }
    _mm512_mask_storeu_ps(ss, mask, acc);
#else
    for (int i = 0; i < n; i++) {
        float a = 0.0f;
        for (int64_t j = 0; j < k; j++) a += x[i * ld + j] * x[i * ld + j];
        ss[i] = a;
    }
#endif
}

static float act_fn(int act, float g) {
    if (act == 1) return g / (1.0f + expf(-g));
    const float c = 0.7978845608028654f;  // sqrt(2 / pi)
    return 0.5f * g * (1.0f + tanhf(c * (g + 0.044715f * g * g * g)));
}

#if Z512 && defined(__AVX512DQ__)
// tanh of 8 doubles to ~1e-15 relative: (e - 1) / (e + 1) with e = exp(2|u|) (argument reduction
// by ln 2, degree-13 Taylor polynomial, exponent by scalef), an odd polynomial below 1e-3, the
// sign copied back. Rounded to float this is tanhf correctly rounded but for ~1e-8 of inputs
// (glibc's tanhf is within an ulp of it).
// exp of 8 doubles (|x| <= 700) to ~1e-16 relative: x = k ln2 + r, |r| <= ln2 / 2, a degree-13
// Taylor polynomial of r, times 2^k by scalef
static inline __m512d exp_pd(__m512d x) {
    const __m512d kf = _mm512_roundscale_pd(_mm512_mul_pd(x, _mm512_set1_pd(1.4426950408889634)), 0);
    __m512d r = _mm512_fnmadd_pd(kf, _mm512_set1_pd(6.93147180369123816490e-01), x);
    r = _mm512_fnmadd_pd(kf, _mm512_set1_pd(1.90821492927058770002e-10), r);
    static const double inv_fact[] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
                                      1.0 / 362880.0, 1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0,
                                      1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0};
    __m512d p = _mm512_set1_pd(inv_fact[0]);
    for (int i = 1; i < 14; i++) p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(inv_fact[i]));
    return _mm512_scalef_pd(p, kf);
}

static inline __m512d tanh_pd(__m512d u) {
    const __m512d sign = _mm512_castsi512_pd(_mm512_set1_epi64((long long)0x8000000000000000ull));
    const __m512d a = _mm512_min_pd(_mm512_andnot_pd(sign, u), _mm512_set1_pd(20.0));
    const __m512d e = exp_pd(_mm512_add_pd(a, a)), one = _mm512_set1_pd(1.0);
    __m512d t = _mm512_div_pd(_mm512_sub_pd(e, one), _mm512_add_pd(e, one));
    const __m512d a2 = _mm512_mul_pd(a, a);
    __m512d sp = _mm512_set1_pd(62.0 / 2835.0);
    sp = _mm512_fmadd_pd(sp, a2, _mm512_set1_pd(-17.0 / 315.0));
    sp = _mm512_fmadd_pd(sp, a2, _mm512_set1_pd(2.0 / 15.0));
    sp = _mm512_fmadd_pd(sp, a2, _mm512_set1_pd(-1.0 / 3.0));
    sp = _mm512_fmadd_pd(_mm512_mul_pd(sp, a2), a, a);
    t = _mm512_mask_blend_pd(_mm512_cmp_pd_mask(a, _mm512_set1_pd(1e-3), _CMP_LT_OQ), t, sp);
    return _mm512_or_pd(t, _mm512_and_pd(u, sign));
}

// gelu_tanh(g) * up for 16 lanes (mask: the lanes that exist): the scalar act_fn's f32 steps
// (as compiled: the cube's last product fused into the add) around the tanh above
static inline void gelu_mul16(const float *g_, const float *up_, float *out, __mmask16 mask) {
    const __m512 g = _mm512_maskz_loadu_ps(mask, g_), up = _mm512_maskz_loadu_ps(mask, up_);
    const __m512 inner = _mm512_fmadd_ps(g, _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), g), g), g);
    const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f), inner);
    const __m256 t0 = _mm512_cvtpd_ps(tanh_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(u))));
    const __m256 t1 = _mm512_cvtpd_ps(tanh_pd(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(u), 1)))));
    const __m512 t = _mm512_insertf32x8(_mm512_castps256_ps512(t0), t1, 1);
    const __m512 a = _mm512_mul_ps(_mm512_add_ps(_mm512_set1_ps(1.0f), t), _mm512_mul_ps(_mm512_set1_ps(0.5f), g));
    _mm512_mask_storeu_ps(out, mask, _mm512_mul_ps(a, up));
}

// silu(g) * up for 16 lanes: g / (1 + e^-g) in f32 as act_fn, e^-g (expf) from exp_pd rounded
// to float (correctly rounded but for ~1e-8 of inputs, as glibc's expf is within its 0.5 ulp)
static inline __m256 expf_neg8(__m256 g) {
    const __m512d x = _mm512_max_pd(_mm512_min_pd(_mm512_cvtps_pd(g), _mm512_set1_pd(200.0)), _mm512_set1_pd(-200.0));
    return _mm512_cvtpd_ps(exp_pd(_mm512_sub_pd(_mm512_setzero_pd(), x)));
}

static inline void silu_mul16(const float *g_, const float *up_, float *out, __mmask16 mask) {
    const __m512 g = _mm512_maskz_loadu_ps(mask, g_), up = _mm512_maskz_loadu_ps(mask, up_);
    const __m256 e0 = expf_neg8(_mm512_castps512_ps256(g));
    const __m256 e1 = expf_neg8(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(g), 1)));
    const __m512 e = _mm512_insertf32x8(_mm512_castps256_ps512(e0), e1, 1);
    const __m512 a = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
    _mm512_mask_storeu_ps(out, mask, _mm512_mul_ps(a, up));
}
#endif

#if defined(__AVX2__) && defined(__FMA__) && !Z512
// The AVX-512 gated activations above, 4 doubles / 8 floats at a time: the same polynomial
// steps, 2^k built from its exponent bits (exact, as scalef is in this range), so the outputs
// are the AVX-512 build's bit for bit (within an ulp of glibc's tanhf / expf as there).
static inline __m256d exp_pd4(__m256d x) {
    const __m256d kf = _mm256_round_pd(_mm256_mul_pd(x, _mm256_set1_pd(1.4426950408889634)),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256d r = _mm256_fnmadd_pd(kf, _mm256_set1_pd(6.93147180369123816490e-01), x);
    r = _mm256_fnmadd_pd(kf, _mm256_set1_pd(1.90821492927058770002e-10), r);
    static const double inv_fact[] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
                                      1.0 / 362880.0, 1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0,
                                      1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0};
    __m256d p = _mm256_set1_pd(inv_fact[0]);
    for (int i = 1; i < 14; i++) p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(inv_fact[i]));
    const __m256i e = _mm256_slli_epi64(_mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(kf)),
                                                         _mm256_set1_epi64x(1023)), 52);
    return _mm256_mul_pd(p, _mm256_castsi256_pd(e));
}

static inline __m256d tanh_pd4(__m256d u) {
    const __m256d sign = _mm256_set1_pd(-0.0);
    const __m256d a = _mm256_min_pd(_mm256_andnot_pd(sign, u), _mm256_set1_pd(20.0));
    const __m256d e = exp_pd4(_mm256_add_pd(a, a)), one = _mm256_set1_pd(1.0);
    __m256d t = _mm256_div_pd(_mm256_sub_pd(e, one), _mm256_add_pd(e, one));
    const __m256d a2 = _mm256_mul_pd(a, a);
    __m256d sp = _mm256_set1_pd(62.0 / 2835.0);
    sp = _mm256_fmadd_pd(sp, a2, _mm256_set1_pd(-17.0 / 315.0));
    sp = _mm256_fmadd_pd(sp, a2, _mm256_set1_pd(2.0 / 15.0));
    sp = _mm256_fmadd_pd(sp, a2, _mm256_set1_pd(-1.0 / 3.0));
    sp = _mm256_fmadd_pd(_mm256_mul_pd(sp, a2), a, a);
    t = _mm256_blendv_pd(t, sp, _mm256_cmp_pd(a, _mm256_set1_pd(1e-3), _CMP_LT_OQ));
    return _mm256_or_pd(t, _mm256_and_pd(u, sign));
}

static inline __m256 tanh_ps8(__m256 u) {
    const __m128 lo = _mm256_cvtpd_ps(tanh_pd4(_mm256_cvtps_pd(_mm256_castps256_ps128(u))));
    const __m128 hi = _mm256_cvtpd_ps(tanh_pd4(_mm256_cvtps_pd(_mm256_extractf128_ps(u, 1))));
    return _mm256_set_m128(hi, lo);
}

static inline __m256 expf_neg4x2(__m256 g) {  // e^-g, g clamped to +-200 as expf_neg8
    __m128 h[2];
    for (int i = 0; i < 2; i++) {
        const __m128 gi = i ? _mm256_extractf128_ps(g, 1) : _mm256_castps256_ps128(g);
        const __m256d x = _mm256_max_pd(_mm256_min_pd(_mm256_cvtps_pd(gi), _mm256_set1_pd(200.0)), _mm256_set1_pd(-200.0));
        h[i] = _mm256_cvtpd_ps(exp_pd4(_mm256_sub_pd(_mm256_setzero_pd(), x)));
    }
    return _mm256_set_m128(h[1], h[0]);
}

static inline void gated8(int act, const float *g_, const float *up_, float *out) {
    const __m256 g = _mm256_loadu_ps(g_), up = _mm256_loadu_ps(up_);
    __m256 a;
    if (act == 2) {
        const __m256 inner = _mm256_fmadd_ps(g, _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), g), g), g);
        const __m256 t = tanh_ps8(_mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f), inner));
        a = _mm256_mul_ps(_mm256_add_ps(_mm256_set1_ps(1.0f), t), _mm256_mul_ps(_mm256_set1_ps(0.5f), g));
    } else {
        a = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), expf_neg4x2(g)));
    }
    _mm256_storeu_ps(out, _mm256_mul_ps(a, up));
}
#endif

// the input row as the projection sees it: normed and/or gated, into tmp (k floats)
static const float *input_row(const float *x, int64_t k, const qmm_opts *o, float *tmp) {
    if (o && o->act) {
#if Z512 && defined(__AVX512DQ__)
        if (o->act == 1 || o->act == 2) {
            for (int64_t j = 0; j < k; j += 16) {
                const __mmask16 mask = k - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (k - j)) - 1);
                if (o->act == 2) gelu_mul16(x + j, x + k + j, tmp + j, mask);
                else silu_mul16(x + j, x + k + j, tmp + j, mask);
            }
        } else
#elif defined(__AVX2__) && defined(__FMA__)
        if ((o->act == 1 || o->act == 2) && k % 8 == 0) {
            for (int64_t j = 0; j < k; j += 8) gated8(o->act, x + j, x + k + j, tmp + j);
        } else
#endif
        for (int64_t j = 0; j < k; j++) tmp[j] = act_fn(o->act, x[j]) * x[k + j];
        x = tmp;
    }
    if (o && o->norm_w) {
        rms_norm_row(x, k, o->norm_w, o->norm_eps, tmp);
        x = tmp;
    }
    return x;
}

static void part_rows(const qpart_t *p, int64_t i0, int64_t i1, int64_t k, int64_t m, const int8_t *xq,
                      const float *xd, const float *xs, const int32_t *xi, const int8_t *kq, const float *kd,
                      const int16_t *kbs, const float *kms, float *y, int64_t ldy) {
    if (p->type & PACKED) {  // units are pairs of groups of 8 rows
        const int t = p->type & ~PACKED;
        if (is_k(t)) packed_k_rows(t, p->w, p->rows, k, i0, i1, m, kq, kd, kbs, kms, y, ldy);
        else packed_rows(t, p->w, p->rows, k, i0, i1, m, xq, xd, xs, xi, y, ldy);
        return;
    }
    const int bb = block_bytes(p->type);
    if (is_k(p->type)) {
        const int64_t nb = k / QKK;
        for (int64_t i = i0; i < i1; i++) {
            const uint8_t *wr = p->w + i * nb * bb;
            for (int64_t r = 0; r < m; r++) {
                float acc = 0.0f;
                for (int64_t b = 0; b < nb; b++)
                    acc += kblock_dot(p->type, wr + b * bb, kq + r * k + b * QKK, kd[r * nb + b], kbs + (r * nb + b) * 16);
                y[r * ldy + i] = acc;
            }
        }
        return;
    }
    const int64_t nb = k / QK;
    for (int64_t i = i0; i < i1; i++) {
        const uint8_t *wr = p->w + i * nb * bb;
        for (int64_t r0 = 0; r0 < m; r0 += 8) {  // up to 8 activation rows share each weight block
            const int64_t rn = m - r0 < 8 ? m - r0 : 8;
            float out[8];
#ifdef __AVX2__
            row_avx2(p->type, wr, nb, bb, xq + r0 * k, xd + r0 * nb, xs + r0 * nb, k, rn, out);
#else
            for (int64_t r = 0; r < rn; r++) out[r] = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                float wd, wm;
                for (int64_t r = 0; r < rn; r++) {
                    const int64_t row = r0 + r;
                    const int si = block_dot(p->type, wr + b * bb, xq + row * k + b * QK, &wd, &wm);
                    out[r] += wd * xd[row * nb + b] * (float)si + wm * xs[row * nb + b];
                }
            }
#endif
            for (int64_t r = 0; r < rn; r++) y[(r0 + r) * ldy + i] = out[r];
        }
    }
}

// output row r: + bias, then (post-norm and) the residual add
static void epilogue_row(float *y, int64_t r, int64_t n, int64_t ldy, const qmm_opts *o) {
    float *yr = y + r * ldy;
    if (o->bias)
        for (int64_t i = 0; i < n; i++) yr[i] += o->bias[i];
    if (o->residual) {
        float *res = o->residual + r * o->ld_res;
        if (o->post_w) rms_norm_row(yr, n, o->post_w, o->post_eps, yr);
        for (int64_t i = 0; i < n; i++) res[i] += yr[i];
    }
}

// epilogue_row for rows r0 .. r0 + nr - 1 (nr <= NORM_ROWS), their post-norms' sums side by side
static void epilogue_rows(float *y, int64_t r0, int nr, int64_t n, int64_t ldy, const qmm_opts *o) {
    if (nr < 2 || !o->residual || !o->post_w) {
        for (int i = 0; i < nr; i++) epilogue_row(y, r0 + i, n, ldy, o);
        return;
    }
    float ss[16];
    if (o->bias)
        for (int i = 0; i < nr; i++)
            for (int64_t j = 0; j < n; j++) y[(r0 + i) * ldy + j] += o->bias[j];
    sumsq_rows(y + r0 * ldy, ldy, nr, n, ss);
    for (int i = 0; i < nr; i++) {
        float *yr = y + (r0 + i) * ldy, *res = o->residual + (r0 + i) * o->ld_res;
        rms_scale_row(yr, n, o->post_w, o->post_eps, ss[i], yr);
        for (int64_t j = 0; j < n; j++) res[j] += yr[j];
    }
}

// Two-part activations (qmm_opts.precise): each input row x is rounded as usual (hi), then what
// that rounding lost, r = x - dequant(hi), scaled by LO_SCALE (a power of two: exact, and it keeps
// the second part's scales in the first's range), is rounded the same way (lo). The kernels see
// 2m rows, hi and lo side by side, so each weight block is still read once; y = y_hi + y_lo /
// LO_SCALE. The activation error drops from 1/254 of a block's largest value to ~1/64500 of it
// (about 16 bits), for twice the integer products and the same weight bytes.
// Where packed.c has no VNNI, a packed part takes 16-bit activations instead (is_wide): one row
// per input row, rounded once to 16 bits with a scale per 16 (precise, every packed type of
// packed_wide_precise: finer than the two parts, half the products or fewer) or, for Q8_0 only
// (packed_wide), the 8-bit codes widened (fast); it writes y directly.
#define LO_SCALE 256.0f

typedef struct {  // where slot s (an activation row as the kernels see it) is rounded to
    int8_t *xq, *kq;
    float *xd, *xs, *kd, *kms;
    int32_t *xi;
    int16_t *kbs;
    int64_t k, nb, nbk;
    int need_a, need_k, precise;
    int16_t *xw;  // 16-bit rows (one per input row) for the wide parts, scale xwd, sum xwi
    float *xwd;   // (per 16 precise: 2 * nb per row; per 32 fast)
    int32_t *xwi;
    int need_w;
    float *xwm;   // precise: xwd * xwi per 16 (the Q4_1 / Q4_K mins' factor), where packed.c expects
} prep_t;         // them: after all m rows' scales (xwd + 2 * m * nb)

// a part that takes the 16-bit rows: packed Q8_0 (fast too), or precise and packed_wide_precise
static int is_wide(const qpart_t *p, int precise) {
    return (p->type & PACKED) && (precise ? packed_wide_precise : packed_wide)(p->type & ~PACKED);
}

static void prep_w(const prep_t *c, const float *row, int64_t r) {
    int16_t *q = c->xw + r * c->k;
    if (c->precise) {
        const float *d = c->xwd + r * 2 * c->nb;
        const int32_t *o = c->xwi + r * 2 * c->nb;
        quantize_row16(row, c->k, q, c->xwd + r * 2 * c->nb, c->xwi + r * 2 * c->nb);
        for (int64_t j = 0; j < 2 * c->nb; j++) c->xwm[r * 2 * c->nb + j] = d[j] * (float)o[j];
        return;
    }
    for (int64_t j = 0; j < c->k; j++) q[j] = c->xq[r * c->k + j];  // slot r's 8-bit rounding (prep_a)
    memcpy(c->xwd + r * c->nb, c->xd + r * c->nb, sizeof(float) * (size_t)c->nb);
    for (int64_t b = 0; b < c->nb; b++) c->xwi[r * c->nb + b] = c->xi[r * c->nb + b];
}

static void prep_a(const prep_t *c, const float *row, int64_t s) {
    quantize_row(row, c->k, c->xq + s * c->k, c->xd + s * c->nb, c->xs + s * c->nb, c->xi + s * c->nb, c->precise);
}

static void prep_k(const prep_t *c, const float *row, int64_t s) {
    quantize_row_k(row, c->k, c->kq + s * c->k, c->kd + s * c->nbk, c->kbs + s * c->nbk * 16);
    q8k_mins(c->kd + s * c->nbk, c->kbs + s * c->nbk * 16, c->nbk, c->kms + s * c->nbk * 8);
}

#if Z512
// res = (row - q * d) * LO_SCALE per value, d one scale per blk values: the scalar loops in
// prep_row 16 lanes at a time, with the fused multiply-subtract the compiler makes of them there
// (one rounding, then an exact product by a power of two), so the same floats
static void lo_part(const float *row, const int8_t *q, const float *d, int64_t k, int64_t blk, float *res) {
    const __m512 lo = _mm512_set1_ps(LO_SCALE);
    for (int64_t b = 0; b < k / blk; b++) {
        const __m512 dv = _mm512_set1_ps(d[b]);
        for (int64_t j = b * blk; j < (b + 1) * blk; j += 16) {
            const __m512 qf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + j))));
            _mm512_storeu_ps(res + j, _mm512_mul_ps(_mm512_fnmadd_ps(qf, dv, _mm512_loadu_ps(row + j)), lo));
        }
    }
}
#endif

// input row r (after the prologue) into its slot(s); res: k floats of scratch
static void prep_row(const prep_t *c, const float *row, int64_t r, float *res) {
    const int64_t k = c->k;
    if (c->need_w) {
        if (!c->precise) prep_a(c, row, r);
        prep_w(c, row, r);
    }
    if (!c->precise) {
        if (c->need_a && !c->need_w) prep_a(c, row, r);
        if (c->need_k) prep_k(c, row, r);
        return;
    }
    if (c->need_a) {
        prep_a(c, row, 2 * r);
        const int8_t *q = c->xq + 2 * r * k;
        const float *d = c->xd + 2 * r * c->nb;
#if Z512
        lo_part(row, q, d, k, QK, res);
#else
        for (int64_t j = 0; j < k; j++) res[j] = (row[j] - (float)q[j] * d[j / QK]) * LO_SCALE;
#endif
        prep_a(c, res, 2 * r + 1);
    }
    if (c->need_k) {
        prep_k(c, row, 2 * r);
        const int8_t *q = c->kq + 2 * r * k;
        const float *d = c->kd + 2 * r * c->nbk;
#if Z512
        lo_part(row, q, d, k, QKK, res);
#else
        for (int64_t j = 0; j < k; j++) res[j] = (row[j] - (float)q[j] * d[j / QKK]) * LO_SCALE;
#endif
        prep_k(c, res, 2 * r + 1);
    }
}

// y = y_hi + y_lo / LO_SCALE for columns [c0, c1) of m rows; yt: each row's two slots' outputs,
// rows ld apart, column c at c - cofs (the whole call's yt: ld n_total, cofs 0; a thread's panel
// scratch: ld its width, cofs the panel's first column). The product is exact (a power of two):
// one fused multiply-add, as the compiler makes of the scalar expression.
static void sum_parts(const float *yt, int64_t ld, int64_t cofs, float *y, int64_t ldy, int64_t m, int64_t c0,
                      int64_t c1) {
#if Z512
    const __m512 f = _mm512_set1_ps(1.0f / LO_SCALE);
    for (int64_t r = 0; r < m; r++)
        for (int64_t c = c0; c < c1; c += 16) {  // a unit's 16 columns, or a panel's units in turn
            const __mmask16 mask = c1 - c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (c1 - c)) - 1);
            const float *hi = yt + 2 * r * ld + (c - cofs), *lo = hi + ld;
            _mm512_mask_storeu_ps(y + r * ldy + c, mask,
                                  _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, lo), f, _mm512_maskz_loadu_ps(mask, hi)));
        }
#else
    for (int64_t r = 0; r < m; r++) {
        const float *hi = yt + 2 * r * ld, *lo = hi + ld;
        for (int64_t c = c0; c < c1; c++) y[r * ldy + c] = hi[c - cofs] + lo[c - cofs] * (1.0f / LO_SCALE);
    }
#endif
}

// ---- timers for scripts/decode_budget.py: only in a build with -DNATIVE_PROF (native.py makes
// one when MISTRALRS_CLI_NATIVE_PROF=1), so the ordinary build has no trace of them ----
// Per role (decoder.c says which projection a call is: PROF_QKV..; 0 for calls from Python, the
// output head) and field: calls, wall, prologue (master: region start to the end of the rows'
// rounding), kernel time summed over threads, the slowest thread's kernel time, epilogue
// (master), threads, barrier wait before the epilogue summed over threads. decoder.c adds the
// rope, kv_store and attention walls (calls, wall) and its own total.
enum { PROF_ROLES = 9, PROF_FIELDS = 8 };
#ifdef NATIVE_PROF
double prof_acc[PROF_ROLES][PROF_FIELDS];
int prof_role;
#endif

// Copies the timers into out (PROF_ROLES x PROF_FIELDS doubles), zeroes them when reset; returns
// how many doubles, 0 in a build without them.
int native_prof(double *out, int reset) {
#ifdef NATIVE_PROF
    if (out) memcpy(out, prof_acc, sizeof prof_acc);
    if (reset) memset(prof_acc, 0, sizeof prof_acc);
    return PROF_ROLES * PROF_FIELDS;
#else
    (void)out, (void)reset;
    return 0;
#endif
}

// floatmm.c: parts of F32 / F16 / BF16 weights (same parts and opts)
int fmm_type(int type);
int fmm_parts(const void *parts, int nparts, int64_t k, const float *x, int64_t ldx, int64_t m, float *y,
              int64_t ldy, int n_threads, const void *opts);

// A prompt against wide rows: every unit reads all of a call's rounded activation slots, which
// past ~1 MB (512 rows of 4096, precise: 4 MB) no longer stay in the core's L2 beside the unit
// and come from the shared L3 once per unit (a 4096 x 22016 Q4_K weight: 1376 units x 4 MB). Then
// the units go in panels of ~512 KB of weights and each panel takes the slots in blocks of ~1 MB
// (at least 64): the panel stays in L2 across the blocks, the block across the panel's units.
// Same integer sums and steps per output, so the same bits (tests/test_qmm_tiles.py builds with
// small blocks against whole calls). 1: units one at a time over all slots, as before.
// LLaVA-1.5-7B's Q4_K layers (qkv, o, gate+up, silu+down; scripts/bench_qmm.py --model llava),
// 512 rows, precise, 2 threads, against the whole calls interleaved in one process, three runs:
// 903 -> 851, 900 -> 820, 855 -> 790 ms (6-9%). Rows of 640 (Gemma-3, SmolLM2) are never
// panelled below ~800 rows.
#ifndef QMM_SLOT_BLOCK_BYTES
#define QMM_SLOT_BLOCK_BYTES (1 << 20)
#endif
#ifndef QMM_SLOT_BLOCK_MIN
#define QMM_SLOT_BLOCK_MIN 64
#endif
#ifndef QMM_PANEL_BYTES
#define QMM_PANEL_BYTES (512 << 10)
#endif
static int64_t panel_units(const qpart_t *p, int64_t k, int64_t ms, int64_t *slots_per_block) {
    *slots_per_block = ms;
    if (ms * k <= QMM_SLOT_BLOCK_BYTES || !(p->type & PACKED)) return 1;
    const int t = p->type & ~PACKED;
    const int64_t unit = 16 * (is_k(t) ? k / QKK * block_bytes(t) : k / QK * block_bytes(t));  // ~ its bytes
    int64_t sb = QMM_SLOT_BLOCK_BYTES / k;
    if (sb < QMM_SLOT_BLOCK_MIN) sb = QMM_SLOT_BLOCK_MIN;
    *slots_per_block = sb;
    return unit > 0 && QMM_PANEL_BYTES / unit > 1 ? QMM_PANEL_BYTES / unit : 1;
}

// y[r * ldy + c] for rows r < m: input rows x[r * ldx ...] through o's prologue, times the
// parts' weights stacked by rows (c runs over all parts' rows in turn), then o's epilogue.
// Returns 0, or -1 for an unsupported call (a type, or k not whole blocks).
int qmm_parts(const qpart_t *parts, int nparts, int64_t k, const float *x, int64_t ldx, int64_t m,
              float *y, int64_t ldy, int n_threads, const qmm_opts *o) {
    if (nparts > 0 && fmm_type(parts[0].type)) return fmm_parts(parts, nparts, k, x, ldx, m, y, ldy, n_threads, o);
#ifdef NATIVE_PROF
    const double p_t0 = omp_get_wtime();
    double p_busy[64] = {0}, p_wait[64] = {0}, p_prep = 0, p_epi = 0;
    int p_nt = 1;
#endif
    const int precise = o && o->precise;
    int need_a = 0, need_k = 0, need_w = 0;  // 8-bit rows (fast: also the wide parts'), q8_K, 16-bit
    int64_t n_total = 0;
    for (int p = 0; p < nparts; p++) {
        if (!block_bytes(parts[p].type)) return -1;
        if (is_wide(&parts[p], precise)) need_w = 1, need_a |= !precise;
        else if (is_k(parts[p].type & ~PACKED)) need_k = 1;
        else need_a = 1;
        n_total += parts[p].rows;
    }
    if (((need_a || need_w) && k % QK) || (need_k && k % QKK)) return -1;
    const int two_part = precise && (need_a || need_k);  // some part multiplies hi and lo slots
    int summed = 1;  // every two-part part is packed: its units sum their own columns' parts
    for (int p = 0; p < nparts; p++) summed &= is_wide(&parts[p], precise) || (parts[p].type & PACKED) != 0;
    const int64_t nb = k / QK, nbk = k / QKK, ms = precise ? 2 * m : m;  // ms: slots, the kernels' rows
    int8_t *xq = need_a ? malloc((size_t)(ms * k)) : NULL, *kq = need_k ? malloc((size_t)(ms * k)) : NULL;
    float *xd = malloc(sizeof(float) * (size_t)(ms * nb + 1)), *xs = malloc(sizeof(float) * (size_t)(ms * nb + 1));
    float *kd = malloc(sizeof(float) * (size_t)(ms * nbk + 1)), *tmp = malloc(sizeof(float) * (size_t)k);
    float *res = malloc(sizeof(float) * (size_t)k);
    int32_t *xi = malloc(sizeof(int32_t) * (size_t)(ms * nb + 1));
    int16_t *kbs = malloc(sizeof(int16_t) * (size_t)(ms * nbk * 16 + 1));
    float *kms = malloc(sizeof(float) * (size_t)(ms * nbk * 8 + 1));  // q8_K: d * (sum of 32 codes), see q8k_mins
    // the slots' outputs: a packed part's go to its thread's scratch, a panel at a time (ms rows of
    // the panel's columns), summed from there into y while in cache; only the other two-part parts
    // (not packed) write the call-wide yt (a prompt's yt was ~2 x its y, written to memory and
    // read back: Gemma-3's gate+up, 202 rows, 6.6 MB a call)
    float *yt = two_part && !summed ? malloc(sizeof(float) * (size_t)(ms * n_total)) : NULL;
    int64_t scratch = 0;  // floats of each thread's panel scratch
    for (int p = 0; two_part && p < nparts; p++)
        if ((parts[p].type & PACKED) && !is_wide(&parts[p], precise)) {
            int64_t sb;
            const int64_t pu = panel_units(&parts[p], k, ms, &sb), w = 16 * (pu < units(&parts[p]) ? pu : units(&parts[p]));
            if (w * ms > scratch) scratch = w * ms;
        }
    int16_t *xw = need_w ? malloc(sizeof(int16_t) * (size_t)(m * k)) : NULL;
    float *xwd = malloc(sizeof(float) * (size_t)(4 * m * nb + 1));  // precise: the scales, then xwm
    int32_t *xwi = malloc(sizeof(int32_t) * (size_t)(2 * m * nb + 1));
    // LoRA: the input rows as the projection sees them (kept when a prologue changes them) and u
    const void *lora = o && o->lora && lora_active(o->lora) ? o->lora : NULL;
    float *xin = lora && (o->act || o->norm_w) ? malloc(sizeof(float) * (size_t)(m * k)) : NULL;
    float *lu = lora ? malloc(sizeof(float) * (size_t)(m * lora_rank(lora) + 1)) : NULL;
    int rc = 0;
    if ((need_a && !xq) || (need_k && !kq) || !xd || !xs || !xi || !kd || !tmp || !res || !kbs || !kms ||
        (two_part && !summed && !yt) || (need_w && !xw) || !xwd || !xwi || (lora && !lu) ||
        (lora && (o->act || o->norm_w) && !xin)) { rc = -1; goto done; }
    const prep_t pc = {xq, kq, xd, xs, kd, kms, xi, kbs, k, nb, nbk, need_a, need_k, precise, xw, xwd, xwi, need_w,
                       xwd + 2 * m * nb};
    float *yk = precise ? yt : y;  // where the two-part kernels write, with row stride ldk
    const int64_t ldk = precise ? n_total : ldy;
    // one parallel region (a fork and a join per call, which a decode step makes ~100 of): the
    // prologue (norm / activation, then rounding to 8 bits) row by row, a prompt chunk's rows in
    // parallel (its GELUs and SiLUs are a noticeable share of a prefill), a few rows on one
    // thread; then, after the barrier, the weight units, and the epilogue row by row
    // a decode step's few rows against only 16-bit parts (precise), no LoRA: see own_prep below
    const int own_prep = m < 4 && precise && need_w && !need_a && !need_k && !lora;
    int own_fail = 0;
#pragma omp parallel num_threads(n_threads)
    {
        prep_t mine = pc;  // own_prep: this thread's rounded rows (thread 0 uses the shared ones)
        float *own_tmp = tmp;
        float *ts = scratch ? malloc(sizeof(float) * (size_t)scratch) : NULL;  // this thread's panel outputs
        if (scratch && !ts) {
#pragma omp atomic write
            own_fail = 1;  // (read after the region; this thread computes nothing)
        }
        if (m >= 4) {
            const int main_thread = omp_get_thread_num() == 0;
            float *row_tmp = main_thread ? tmp : malloc(sizeof(float) * (size_t)k);
            float *row_res = main_thread || !precise ? res : malloc(sizeof(float) * (size_t)k);
            // a norm alone (no activation): NORM_ROWS rows' sums of squares at a time
            const int batch = o && o->norm_w && !o->act && NORM_ROWS > 1 ? NORM_ROWS : 1;
#pragma omp for schedule(static)
            for (int64_t rb = 0; rb < (m + batch - 1) / batch; rb++) {
                const int nr = m - rb * batch < batch ? (int)(m - rb * batch) : batch;
                float ss[16];
                if (batch > 1) sumsq_rows(x + rb * batch * ldx, ldx, nr, k, ss);
                for (int i = 0; i < nr; i++) {
                    const int64_t r = rb * batch + i;
                    float *dst = xin ? xin + r * k : row_tmp;
                    const float *in = x + r * ldx;
                    if (batch > 1) rms_scale_row(in, k, o->norm_w, o->norm_eps, ss[i], dst);
                    prep_row(&pc, batch > 1 ? dst : input_row(in, k, o, dst), r, row_res);
                }
            }
            if (row_tmp != tmp) free(row_tmp);
            if (row_res != res) free(row_res);
        } else if (own_prep) {
            // every thread rounds the few rows itself, into its own buffers: the same function of
            // the same input, so the same codes, with no barrier before the units (one thread did
            // it while the others waited there: the same wall time, one barrier fewer per call)
            if (omp_get_thread_num()) {
                mine.xw = malloc(sizeof(int16_t) * (size_t)(m * k));
                mine.xwd = malloc(sizeof(float) * (size_t)(4 * m * nb));
                mine.xwm = mine.xwd + 2 * m * nb;
                mine.xwi = malloc(sizeof(int32_t) * (size_t)(2 * m * nb));
                own_tmp = malloc(sizeof(float) * (size_t)k);
            }
            if (!mine.xw || !mine.xwd || !mine.xwi || !own_tmp) {
#pragma omp atomic write
                own_fail = 1;  // (read after the region; this thread computes nothing)
            } else {
                for (int64_t r = 0; r < m; r++) prep_row(&mine, input_row(x + r * ldx, k, o, own_tmp), r, NULL);
            }
        } else {
#pragma omp single
            for (int64_t r = 0; r < m; r++) prep_row(&pc, input_row(x + r * ldx, k, o, xin ? xin + r * k : tmp), r, res);
        }
#ifdef NATIVE_PROF
        const int p_me = omp_get_thread_num() & 63;
        const double p_b = omp_get_wtime();
        if (p_me == 0) p_prep = p_b - p_t0, p_nt = omp_get_num_threads();
#endif
        if (lora) lora_down(lora, xin ? xin : x, xin ? k : ldx, k, m, lu);  // no barrier: the units follow
        // units handed out in chunks as threads free up (guided: big chunks first, then smaller):
        // on a shared machine a thread the OS sets aside for a time slice then holds the others
        // up only for its current chunk, not for its whole static share. Same results: every
        // unit is computed the same way whichever thread takes it.
        int64_t col = 0;
        for (int p = 0; p < nparts; p++) {
            const qpart_t *pp = &parts[p];
            if (is_wide(pp, precise)) {
#pragma omp for schedule(QMM_SCHED) nowait
                for (int64_t i = 0; i < units(pp); i++)
                    if (!own_fail)
                        packed_rows_w(pp->type & ~PACKED, pp->w, pp->rows, k, i, i + 1, m, mine.xw, mine.xwd, mine.xwi,
                                      precise ? 2 : 1, y + col, ldy);
            } else {
                int64_t sb;
                const int64_t pu = panel_units(pp, k, ms, &sb), np = (units(pp) + pu - 1) / pu;
#pragma omp for schedule(QMM_SCHED) nowait
                for (int64_t q = 0; q < np; q++) {
                    const int64_t i0 = q * pu, i1 = i0 + pu < units(pp) ? i0 + pu : units(pp);
                    const int own = two_part && (pp->type & PACKED);  // into ts, then summed into y
                    if (own && !ts) continue;
                    // ts: the panel's columns from 16 * i0 on, rows ld apart (part_rows writes unit
                    // i's at column 16 * i of the pointer it gets)
                    const int64_t ld = own ? 16 * (i1 - i0) : ldk;
                    for (int64_t s0 = 0; s0 < ms; s0 += sb) {  // (one block unless panelled)
                        const int64_t sn = ms - s0 < sb ? ms - s0 : sb;
                        float *out = own ? ts + s0 * ld - 16 * i0 : yk + col + s0 * ldk;
                        part_rows(pp, i0, i1, k, sn, xq ? xq + s0 * k : NULL, xd + s0 * nb, xs + s0 * nb,
                                  xi + s0 * nb, kq ? kq + s0 * k : NULL, kd + s0 * nbk, kbs + s0 * nbk * 16,
                                  kms + s0 * nbk * 8, out, ld);
                    }
                    if (own) {  // its columns' two parts summed while in cache
                        const int64_t c1 = 16 * i1 < pp->rows ? 16 * i1 : pp->rows;
                        sum_parts(ts, ld, 16 * i0, y + col, ldy, m, 16 * i0, c1);
                    }
                }
            }
            col += pp->rows;
        }
#ifdef NATIVE_PROF
        const double p_c = omp_get_wtime();
        p_busy[p_me] = p_c - p_b;
#endif
        if (two_part && !summed) {  // the rest: in column spans of 1024 (a decode step has one row)
#pragma omp barrier
            const int64_t spans = (n_total + 1023) / 1024;
#pragma omp for schedule(static)
            for (int64_t u = 0; u < m * spans; u++) {
                const int64_t r = u / spans, c0 = (u % spans) * 1024, c1 = c0 + 1024 < n_total ? c0 + 1024 : n_total;
                const float *hi = yt + 2 * r * n_total, *lo = hi + n_total;
                float *out = y + r * ldy;
                int64_t p0 = 0;  // the two-part parts' columns in [c0, c1): the wide ones wrote y
                for (int p = 0; p < nparts; p0 += parts[p++].rows) {
                    if (is_wide(&parts[p], precise) || (parts[p].type & PACKED)) continue;  // (done)
                    const int64_t a = p0 > c0 ? p0 : c0, e = p0 + parts[p].rows < c1 ? p0 + parts[p].rows : c1;
                    for (int64_t c = a; c < e; c++) out[c] = hi[c] + lo[c] * (1.0f / LO_SCALE);
                }
            }
        }
        if (lora) {  // y += u B^T once all columns (and u) are done, before the bias and residual add
            if (!two_part || summed) {  // (the two parts' sum above ended with a barrier)
#pragma omp barrier
            }
            lora_up(lora, lu, m, y, ldy, n_total);  // no barrier: the epilogue's or the region's end follows
        }
        if (o && (o->bias || o->residual)) {  // rows are independent: in parallel once all columns are done
#pragma omp barrier
#ifdef NATIVE_PROF
            const double p_d = omp_get_wtime();
            p_wait[p_me] = p_d - p_c;
#endif
#pragma omp for schedule(static) nowait
            for (int64_t rb = 0; rb < (m + NORM_ROWS - 1) / NORM_ROWS; rb++)  // (the region's end waits)
                epilogue_rows(y, rb * NORM_ROWS, m - rb * NORM_ROWS < NORM_ROWS ? (int)(m - rb * NORM_ROWS) : NORM_ROWS,
                              n_total, ldy, o);
#ifdef NATIVE_PROF
            if (p_me == 0) p_epi = omp_get_wtime() - p_d;
#endif
        }
        if (mine.xw != xw) free(mine.xw), free(mine.xwd), free(mine.xwi), free(own_tmp);
        free(ts);
    }
    if (own_fail) rc = -1;
#ifdef NATIVE_PROF
    {
        double *a = prof_acc[prof_role], mx = 0;
        a[0] += 1, a[1] += omp_get_wtime() - p_t0, a[2] += p_prep, a[5] += p_epi, a[6] += p_nt;
        for (int t = 0; t < p_nt && t < 64; t++) a[3] += p_busy[t], a[7] += p_wait[t], mx = p_busy[t] > mx ? p_busy[t] : mx;
        a[4] += mx;
    }
#endif
done:
    free(xq); free(kq); free(xd); free(xs); free(xi); free(kd); free(tmp); free(res); free(kbs); free(kms); free(yt);
    free(xw); free(xwd); free(xwi); free(xin); free(lu);
    return rc;
}

// One weight of one type, no fusion: y[r * ldy + i] = sum_k x[r, k] W[i, k].
int qmm(int type, const uint8_t *w, int64_t n, int64_t k, const float *x, int64_t m, float *y, int64_t ldy,
        int n_threads) {
    qpart_t p = {type, n, w};
    return qmm_parts(&p, 1, k, x, k, m, y, ldy, n_threads, NULL);
}
