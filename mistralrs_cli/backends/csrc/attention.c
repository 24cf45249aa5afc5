// The rest of a decoder layer's decode step on the CPU, beside qmatmul.c's projections:
// per-head q/k RMSNorm + rotary embedding in place, and attention of a few query rows over a
// sequence's cached keys and values. Same math as models/layers.py (its torch path is the
// reference these are tested against), in one call each instead of a dozen small torch ops.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

// qkv rows (T, ldq): q heads [0, nq), k heads [nq, nq + nkv), each hd wide. Per head of q and k:
// optional RMSNorm (qn / kn weights incl. any +1, eps), then rotate-half rotary over the first
// rot dims with this row's cos/sin (T, rot) tables.
// one head's norm (with its sum of squares ss) and rotation
static inline __attribute__((always_inline)) void rope_head(float *x, int hd, int half, const float *c, const float *s,
                                                            const float *nw, float ss, float eps) {
    if (nw) {
        const float r = 1.0f / sqrtf(ss / (float)hd + eps);
        for (int j = 0; j < hd; j++) x[j] = x[j] * r * nw[j];
    }
    for (int j = 0; j < half; j++) {
        const float a = x[j], b = x[j + half];
        x[j] = a * c[j] - b * s[j];
        x[j + half] = b * c[j + half] + a * s[j + half];
    }
}

void rope_rows(float *qkv, int64_t T, int64_t ldq, int nq, int nkv, int hd, int rot,
               const float *cos_t, const float *sin_t, const float *qn, const float *kn, float eps) {
    const int half = rot / 2, H = nq + nkv;
#if defined(__AVX512F__)
    // the norms' sums of squares of 16 heads (of one or more rows) at once: lane i sums head i's
    // squares in order, each rounded before its add, as the loop below is compiled here (squares
    // vectorized, added one by one), so the same sums without one dependent add after another
    if ((qn || kn) && ldq * 16 < INT32_MAX) {
        const int64_t n = T * H;
        for (int64_t i0 = 0; i0 < n; i0 += 16) {
            const int cnt = n - i0 < 16 ? (int)(n - i0) : 16;
            int32_t off[16] = {0};
            for (int i = 0; i < cnt; i++) off[i] = (int32_t)(((i0 + i) / H - i0 / H) * ldq + (int64_t)((i0 + i) % H) * hd);
            const float *base = qkv + (i0 / H) * ldq;
            const __mmask16 mask = (__mmask16)((1u << cnt) - 1);
            const __m512i idx = _mm512_loadu_si512((const void *)off);
            __m512 acc = _mm512_setzero_ps();
            for (int j = 0; j < hd; j++) {
                __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, idx, base + j, 4);
                v = _mm512_mul_ps(v, v);
                __asm__("" : "+v"(v));  // kept apart from the add: no fused multiply-add
                acc = _mm512_add_ps(acc, v);
            }
            float ss[16];
            _mm512_storeu_ps(ss, acc);
            for (int i = 0; i < cnt; i++) {
                const int64_t t = (i0 + i) / H;
                const int h = (int)((i0 + i) % H);
                rope_head(qkv + t * ldq + (int64_t)h * hd, hd, half, cos_t + t * rot, sin_t + t * rot,
                          h < nq ? qn : kn, ss[i], eps);
            }
        }
        return;
    }
#endif
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_t + t * rot, *s = sin_t + t * rot;
        for (int h = 0; h < H; h++) {
            float *x = qkv + t * ldq + (int64_t)h * hd;
            const float *nw = h < nq ? qn : kn;
            float ss = 0.0f;
            if (nw)
                for (int j = 0; j < hd; j++) ss += x[j] * x[j];
            rope_head(x, hd, half, c, s, nw, ss, eps);
        }
    }
}

// Keys and values are f32, or f16 (kv16: the native runtime's cache, half the bytes to stream;
// llama.cpp's cache type). Every function below takes the element type as a constant the
// compiler specializes on, and does the same float arithmetic for both: the f16 values are
// exactly the f32 values an f32 cache of f16-rounded numbers holds, so results are identical.
static inline float h2f(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal: normalize
            exp = 113;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

static inline float ld1(const void *x, int64_t i, const int kv16) {
    return kv16 ? h2f(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

#if defined(__AVX2__) && defined(__F16C__)
#define VEC8 1
static inline __m256 ld8(const void *x, int64_t i, const int kv16) {
    return kv16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + i)))
                : _mm256_loadu_ps((const float *)x + i);
}
#endif

#if defined(__AVX512F__) && defined(VEC8)
#define VEC16 1
static inline __m512 ld16(const void *x, int64_t i, const int kv16) {
    return kv16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i)))
                : _mm512_loadu_ps((const float *)x + i);
}
#endif

// q . k over n dims: 32 running sums (lane l takes dims l, l + 32, ...; then 8 lanes), folded
// as ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)); the tail one by one.
static inline __attribute__((always_inline)) float dot_t(const float *a, const void *b, int n, const int kv16) {
    int e = 0;
    float s;
#if defined(VEC8)
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (; e + 32 <= n; e += 32)
        for (int c = 0; c < 4; c++) acc[c] = _mm256_fmadd_ps(_mm256_loadu_ps(a + e + 8 * c), ld8(b, e + 8 * c, kv16), acc[c]);
    for (; e + 8 <= n; e += 8) acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a + e), ld8(b, e, kv16), acc[0]);
    const __m256 f = _mm256_add_ps(acc[0], _mm256_add_ps(_mm256_add_ps(acc[1], acc[2]), acc[3]));
    float t[8];
    _mm256_storeu_ps(t, f);
    s = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
#else
    float acc[32] = {0};
    for (; e + 32 <= n; e += 32)
        for (int l = 0; l < 32; l++) acc[l] = fmaf(a[e + l], ld1(b, e + l, kv16), acc[l]);
    for (; e + 8 <= n; e += 8)
        for (int l = 0; l < 8; l++) acc[l] = fmaf(a[e + l], ld1(b, e + l, kv16), acc[l]);
    for (int l = 0; l < 8; l++) acc[l] += (acc[l + 8] + acc[l + 16]) + acc[l + 24];
    s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
#endif
    for (; e < n; e++) s = fmaf(a[e], ld1(b, e, kv16), s);
    return s;
}

#if defined(__AVX2__)
// exp of 8 floats (Cephes' expf: 2^n times a degree-6 polynomial on [-ln2/2, ln2/2], ~1 ulp):
// the softmax's exps, which glibc's scalar expf made the slowest part of a decode step
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.3365478515625f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500E-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

// p[i] = exp(p[i] - mx) for i < n; returns their sum
static float exp_sum(float *p, int64_t n, float mx) {
    float sum = 0.0f;
    int64_t i = 0;
#if defined(__AVX2__)
    __m256 acc = _mm256_setzero_ps();
    const __m256 m = _mm256_set1_ps(mx);
    for (; i + 8 <= n; i += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + i), m));
        _mm256_storeu_ps(p + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    float t[8];
    _mm256_storeu_ps(t, acc);
    sum = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
#endif
    for (; i < n; i++) { p[i] = expf(p[i] - mx); sum += p[i]; }
    return sum;
}

// o[e] += sum_i p[i] v_i[e] over c rows v (stride ld, f16 or f32), each o[e] summed in key
// order; 64 output dims at a time stay in registers
static inline __attribute__((always_inline)) void accumulate_t(const float *p, const void *v, int64_t ld, int c,
                                                               int hd, float *o, const int kv16) {
    int e0 = 0;
#if defined(VEC8)
    for (; e0 + 64 <= hd; e0 += 64) {
        __m256 acc[8];
        for (int q = 0; q < 8; q++) acc[q] = _mm256_loadu_ps(o + e0 + 8 * q);
        for (int i = 0; i < c; i++) {
            const __m256 w = _mm256_set1_ps(p[i]);
            for (int q = 0; q < 8; q++) acc[q] = _mm256_fmadd_ps(w, ld8(v, i * ld + e0 + 8 * q, kv16), acc[q]);
        }
        for (int q = 0; q < 8; q++) _mm256_storeu_ps(o + e0 + 8 * q, acc[q]);
    }
#endif
    for (int e = e0; e < hd; e++) {
        float a = o[e];
        for (int i = 0; i < c; i++) a = fmaf(p[i], ld1(v, i * ld + e, kv16), a);
        o[e] = a;
    }
}

#if defined(VEC16)
// lane r of the result = the sum of v[r]'s 16 lanes: a transpose-and-add tree (31 adds/shuffles
// for 16 dot products instead of a horizontal reduction of each)
static inline __m512 sum16x16(const __m512 *v) {
    __m512 t[8], u[4];
    for (int i = 0; i < 8; i++)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)  // per 128-bit lane: keys 4i..4i+3, that lane's share of each
        u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(w0, w1, _MM_SHUFFLE(3, 1, 3, 1)));
}
#endif

#if defined(VEC8) && !defined(VEC16)
// lane r of the result = the sum of v[r]'s 8 lanes (three levels of pairwise adds)
static inline __m256 sum8x8(const __m256 *v) {
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

// p[j - lo] = (q . k_j) * scale for keys lo..hi. With hd a multiple of the vector width, keys go
// 16 (AVX-512) or 8 (AVX2) at a time, each key's dims summed lane-wise then across lanes
// (lo, lo + 8, ...: the grouping depends only on lo and hi, so a row's scores do not depend on
// how its prompt was chunked or batched); the rest one by one.
static inline __attribute__((always_inline)) void scores_t(const float *qh, const void *kh, int64_t ss, int hd,
                                                           int64_t lo, int64_t hi, float scale, float *p,
                                                           const int kv16) {
    int64_t j = lo;
#if defined(VEC16)
    if (hd % 16 == 0) {
        const __m512 sc = _mm512_set1_ps(scale);
        for (; j + 15 <= hi; j += 16) {
            __m512 acc[16];
            for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
            for (int e = 0; e < hd; e += 16) {
                const __m512 q = _mm512_loadu_ps(qh + e);
                for (int r = 0; r < 16; r++) acc[r] = _mm512_fmadd_ps(q, ld16(kh, (j + r) * ss + e, kv16), acc[r]);
            }
            _mm512_storeu_ps(p + (j - lo), _mm512_mul_ps(sum16x16(acc), sc));
        }
    }
#elif defined(VEC8)
    if (hd % 8 == 0) {
        const __m256 sc = _mm256_set1_ps(scale);
        for (; j + 7 <= hi; j += 8) {
            __m256 acc[8];
            for (int r = 0; r < 8; r++) acc[r] = _mm256_setzero_ps();
            for (int e = 0; e < hd; e += 8) {
                const __m256 q = _mm256_loadu_ps(qh + e);
                for (int r = 0; r < 8; r++) acc[r] = _mm256_fmadd_ps(q, ld8(kh, (j + r) * ss + e, kv16), acc[r]);
            }
            _mm256_storeu_ps(p + (j - lo), _mm256_mul_ps(sum8x8(acc), sc));
        }
    }
#endif
    for (; j <= hi; j++) {
        const void *kj = kv16 ? (const void *)((const uint16_t *)kh + j * ss) : (const void *)((const float *)kh + j * ss);
        p[j - lo] = dot_t(qh, kj, hd, kv16) * scale;
    }
}

#include "attention.h"

// Attention reads each kv head's keys and values in blocks of KB keys (counted from the first
// key a row sees), for all the query heads that share that kv head (GQA) while the block is in
// cache (so memory sees it once). Per block and query head: the block's max score m,
// s = sum exp(score - m), o = sum exp(score - m) v; then the blocks are combined in order. The
// blocks are fixed by the row alone, so a row's result does not depend on how rows, blocks or
// threads are split; a row of at most KB keys is computed exactly as one softmax pass.
#define KB 256

// Keys b0 .. b1 (at most KB) of one kv head for the rep query heads of its group (q: rep rows, hd
// apart). st: per query head {m, s, o[hd]} as above. p: rep * KB scores.
static inline __attribute__((always_inline)) void attend_block_t(const float *q, int rep, const void *kh,
                                                                 const void *vh, int64_t ss, int hd, int64_t b0,
                                                                 int64_t b1, float scale, float softcap, float *p,
                                                                 float *st, const int kv16) {
    const int n = (int)(b1 - b0 + 1);
    for (int r = 0; r < rep; r++) scores_t(q + (int64_t)r * hd, kh, ss, hd, b0, b1, scale, p + r * KB, kv16);
    const void *v0 = kv16 ? (const void *)((const uint16_t *)vh + b0 * ss) : (const void *)((const float *)vh + b0 * ss);
    for (int r = 0; r < rep; r++) {
        float *pr = p + r * KB, *o = st + (int64_t)r * (hd + 2), mx = -INFINITY;
        for (int j = 0; j < n; j++) {
            if (softcap > 0.0f) pr[j] = tanhf(pr[j] / softcap) * softcap;
            if (pr[j] > mx) mx = pr[j];
        }
        o[0] = mx;
        o[1] = exp_sum(pr, n, mx);
        memset(o + 2, 0, sizeof(float) * (size_t)hd);
        accumulate_t(pr, v0, ss, n, hd, o + 2, kv16);
    }
}

#if defined(VEC16)
// attend_block_t's arithmetic with AVX-512, up to 4 query heads of the group at a time, so each
// key and value vector is loaded (and, from an f16 cache, converted) once for all of them
// instead of once per head. Every sum is the same chain in the same order as there: a score's
// 16 lanes summed over the dims from zero, then sum16x16 (keys in 16s from b0, the tail by
// dot_t); an output dim summed over the keys in order from zero. So the bits are attend_block_t's.

// scores of G heads (q: G rows qs apart) against keys b0..b1 into p (G rows KB apart)
static inline __attribute__((always_inline)) void zscores(const int G, const float *q, int64_t qs, const void *kh,
                                                          int64_t ss, int hd, int64_t b0, int64_t b1, float scale,
                                                          float *p, const int kv16) {
    __attribute__((aligned(64))) float part[4][16][16];  // per head, per key of the 16: its 16 lanes
    const __m512 sc = _mm512_set1_ps(scale);
    int64_t j = b0;
    for (; j + 15 <= b1; j += 16) {
        for (int k4 = 0; k4 < 16; k4 += 4) {
            __m512 acc[4][4];
            for (int g = 0; g < G; g++)
                for (int c = 0; c < 4; c++) acc[g][c] = _mm512_setzero_ps();
            for (int e = 0; e < hd; e += 16) {
                __m512 kv[4];
                for (int c = 0; c < 4; c++) kv[c] = ld16(kh, (j + k4 + c) * ss + e, kv16);
                for (int g = 0; g < G; g++) {
                    const __m512 qv = _mm512_loadu_ps(q + (int64_t)g * qs + e);
                    for (int c = 0; c < 4; c++) acc[g][c] = _mm512_fmadd_ps(qv, kv[c], acc[g][c]);
                }
            }
            for (int g = 0; g < G; g++)
                for (int c = 0; c < 4; c++) _mm512_store_ps(part[g][k4 + c], acc[g][c]);
        }
        for (int g = 0; g < G; g++) {
            __m512 v[16];
            for (int r = 0; r < 16; r++) v[r] = _mm512_load_ps(part[g][r]);
            _mm512_storeu_ps(p + (int64_t)g * KB + (j - b0), _mm512_mul_ps(sum16x16(v), sc));
        }
    }
    for (; j <= b1; j++) {
        const void *kj = kv16 ? (const void *)((const uint16_t *)kh + j * ss) : (const void *)((const float *)kh + j * ss);
        for (int g = 0; g < G; g++) p[(int64_t)g * KB + (j - b0)] = dot_t(q + (int64_t)g * qs, kj, hd, kv16) * scale;
    }
}

// o_g[e] += sum_i p_g[i] v_i[e] for G heads (o: G rows ostride apart, p: G rows KB apart), NC
// vectors of 16 dims from e0
static inline __attribute__((always_inline)) void zaccum(const int G, const int NC, const float *p, const void *v,
                                                         int64_t ld, int c, int e0, float *o, int64_t ostride,
                                                         const int kv16) {
    __m512 acc[4][4];
    for (int g = 0; g < G; g++)
        for (int x = 0; x < NC; x++) acc[g][x] = _mm512_loadu_ps(o + g * ostride + e0 + 16 * x);
    for (int i = 0; i < c; i++) {
        __m512 vv[4];
        for (int x = 0; x < NC; x++) vv[x] = ld16(v, i * ld + e0 + 16 * x, kv16);
        for (int g = 0; g < G; g++) {
            const __m512 w = _mm512_set1_ps(p[(int64_t)g * KB + i]);
            for (int x = 0; x < NC; x++) acc[g][x] = _mm512_fmadd_ps(w, vv[x], acc[g][x]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int x = 0; x < NC; x++) _mm512_storeu_ps(o + g * ostride + e0 + 16 * x, acc[g][x]);
}

static inline __attribute__((always_inline)) void zaccum_g(const int G, const float *p, const void *v, int64_t ld,
                                                           int c, int hd, float *o, int64_t ostride, const int kv16) {
    int e0 = 0;
    for (; e0 + 64 <= hd; e0 += 64) zaccum(G, 4, p, v, ld, c, e0, o, ostride, kv16);
    for (; e0 < hd; e0 += 16) zaccum(G, 1, p, v, ld, c, e0, o, ostride, kv16);
}

// one query head's n scores pr of a block (softcapped in place first): the stats o = {max, the
// sum of exp(score - max), o[hd] zeroed}, pr = the exps
static inline void zsoftmax(float *pr, int n, float softcap, int hd, float *o) {
    if (softcap > 0.0f)
        for (int j = 0; j < n; j++) pr[j] = tanhf(pr[j] / softcap) * softcap;
    __m512 m16 = _mm512_set1_ps(-INFINITY);  // the max: the same value in any order
    int j = 0;
    for (; j + 16 <= n; j += 16) m16 = _mm512_max_ps(m16, _mm512_loadu_ps(pr + j));
    float mx = _mm512_reduce_max_ps(m16);
    for (; j < n; j++)
        if (pr[j] > mx) mx = pr[j];
    o[0] = mx;
    o[1] = exp_sum(pr, n, mx);
    memset(o + 2, 0, sizeof(float) * (size_t)hd);
}

static inline __attribute__((always_inline)) void zblock_t(const float *q, int rep, const void *kh, const void *vh,
                                                           int64_t ss, int hd, int64_t b0, int64_t b1, float scale,
                                                           float softcap, float *p, float *st, const int kv16) {
    const int n = (int)(b1 - b0 + 1);
    const int64_t os = hd + 2;
    for (int r = 0; r < rep; r += 4) {
        const float *qr = q + (int64_t)r * hd;
        float *pr = p + (int64_t)r * KB;
        switch (rep - r < 4 ? rep - r : 4) {
        case 1: zscores(1, qr, hd, kh, ss, hd, b0, b1, scale, pr, kv16); break;
        case 2: zscores(2, qr, hd, kh, ss, hd, b0, b1, scale, pr, kv16); break;
        case 3: zscores(3, qr, hd, kh, ss, hd, b0, b1, scale, pr, kv16); break;
        default: zscores(4, qr, hd, kh, ss, hd, b0, b1, scale, pr, kv16); break;
        }
    }
    for (int r = 0; r < rep; r++) zsoftmax(p + r * KB, n, softcap, hd, st + (int64_t)r * os);
    const void *v0 = kv16 ? (const void *)((const uint16_t *)vh + b0 * ss) : (const void *)((const float *)vh + b0 * ss);
    for (int r = 0; r < rep; r += 4) {
        const float *pr = p + (int64_t)r * KB;
        float *o = st + (int64_t)r * os + 2;
        switch (rep - r < 4 ? rep - r : 4) {
        case 1: zaccum_g(1, pr, v0, ss, n, hd, o, os, kv16); break;
        case 2: zaccum_g(2, pr, v0, ss, n, hd, o, os, kv16); break;
        case 3: zaccum_g(3, pr, v0, ss, n, hd, o, os, kv16); break;
        default: zaccum_g(4, pr, v0, ss, n, hd, o, os, kv16); break;
        }
    }
}
#endif

#if defined(VEC16)
// A prompt's consecutive query rows of one head (one query head per kv head): R rows (q rows qs
// apart, stats o rows os apart, scores p rows KB apart) against keys b0 .. b1[r] of one block,
// each key and value vector loaded once for all R rows instead of once per row. Row r gets
// zblock_t's bits for (b0, b1[r]) alone: its keys in 16s from b0 (the 16s all rows have, together;
// then its own), its tail by dot_t, its own max and exp sum, each output dim summed over its keys
// in order (the common keys together, then its own, continuing the same sums).
static inline __attribute__((always_inline)) void zrows_t(const int R, const float *q, int64_t qs, const void *kh,
                                                          const void *vh, int64_t ss, int hd, int64_t b0,
                                                          const int64_t *b1, float scale, float softcap, float *p,
                                                          float *o, int64_t os, const int kv16) {
    int64_t full = INT64_MAX, nmin = INT64_MAX;  // the 16s of keys and the keys all R rows have
    for (int r = 0; r < R; r++) {
        const int64_t n = b1[r] - b0 + 1;
        full = n / 16 < full ? n / 16 : full;
        nmin = n < nmin ? n : nmin;
    }
    if (full > 0) zscores(R, q, qs, kh, ss, hd, b0, b0 + 16 * full - 1, scale, p, kv16);
    for (int r = 0; r < R; r++) {
        const int64_t j0 = b0 + 16 * full;
        if (j0 <= b1[r]) zscores(1, q + r * qs, qs, kh, ss, hd, j0, b1[r], scale, p + (int64_t)r * KB + 16 * full, kv16);
    }
    for (int r = 0; r < R; r++) zsoftmax(p + (int64_t)r * KB, (int)(b1[r] - b0 + 1), softcap, hd, o + r * os);
    const void *v0 = kv16 ? (const void *)((const uint16_t *)vh + b0 * ss) : (const void *)((const float *)vh + b0 * ss);
    zaccum_g(R, p, v0, ss, (int)nmin, hd, o + 2, os, kv16);
    const void *vn = kv16 ? (const void *)((const uint16_t *)v0 + nmin * ss) : (const void *)((const float *)v0 + nmin * ss);
    for (int r = 0; r < R; r++)
        if (b1[r] - b0 + 1 > nmin)
            zaccum_g(1, p + (int64_t)r * KB + nmin, vn, ss, (int)(b1[r] - b0 + 1 - nmin), hd, o + r * os + 2, os, kv16);
}

__attribute__((noinline)) static void attend_rows(int R, const float *q, int64_t qs, const void *kh, const void *vh,
                                                  int64_t ss, int hd, int64_t b0, const int64_t *b1, float scale,
                                                  float softcap, int kv16, float *p, float *o, int64_t os) {
#define ZROWS(N) (kv16 ? zrows_t(N, q, qs, kh, vh, ss, hd, b0, b1, scale, softcap, p, o, os, 1) \
                       : zrows_t(N, q, qs, kh, vh, ss, hd, b0, b1, scale, softcap, p, o, os, 0))
    switch (R) {
    case 2: ZROWS(2); break;
    case 3: ZROWS(3); break;
    default: ZROWS(4); break;
    }
#undef ZROWS
}
#endif

__attribute__((noinline)) static void attend_block(const float *q, int rep, const void *kh, const void *vh,
                                                   int64_t ss, int hd, int64_t b0, int64_t b1, float scale,
                                                   float softcap, int kv16, float *p, float *st) {
#if defined(VEC16)
    if (hd % 16 == 0) {
        if (kv16) zblock_t(q, rep, kh, vh, ss, hd, b0, b1, scale, softcap, p, st, 1);
        else zblock_t(q, rep, kh, vh, ss, hd, b0, b1, scale, softcap, p, st, 0);
        return;
    }
#endif
    if (kv16) attend_block_t(q, rep, kh, vh, ss, hd, b0, b1, scale, softcap, p, st, 1);
    else attend_block_t(q, rep, kh, vh, ss, hd, b0, b1, scale, softcap, p, st, 0);
}

// One query head's output from its nb blocks' {m, s, o} (stride floats apart), in block order.
__attribute__((noinline)) static void combine(const float *st, int64_t nb, int64_t stride, int hd, float *out) {
    float M = -INFINITY, sum = 0.0f;
    for (int64_t b = 0; b < nb; b++)
        if (st[b * stride] > M) M = st[b * stride];
    for (int e = 0; e < hd; e++) out[e] = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const float *s = st + b * stride, w = expf(s[0] - M);
        sum += s[1] * w;
        for (int e = 0; e < hd; e++) out[e] += w * s[2 + e];
    }
    const float inv = 1.0f / sum;
    for (int e = 0; e < hd; e++) out[e] *= inv;
}

typedef struct {      // one (sequence, query row, kv head) of an attn_batch call
    const float *q;   // the group's first query head
    float *out;       // its first output head
    const char *k, *v;
    int64_t ss, lo, hi, nb, first;  // key stride, first and last key, blocks, index of its first
    int kv16;                       // block among all units' blocks; f16 keys / values
} attn_unit;

static attn_unit *plan_units(const attn_seq *seqs, int nseq, int64_t ldq, int64_t ldo, int nq, int nkv, int hd,
                             int64_t window, size_t esz, int64_t *n_units, int64_t *n_blocks, int64_t *max_nb) {
    const int rep = nq / nkv;
    int64_t n = 0;
    for (int i = 0; i < nseq; i++) n += seqs[i].n * nkv;
    attn_unit *u = malloc(sizeof(attn_unit) * (size_t)(n > 0 ? n : 1));
    if (!u) return NULL;
    int64_t x = 0, blocks = 0, most = 1;
    for (int i = 0; i < nseq; i++) {
        const attn_seq *sq = &seqs[i];
        for (int64_t t = 0; t < sq->n; t++) {
            int64_t hi = sq->pos[t] < sq->S - 1 ? sq->pos[t] : sq->S - 1;
            const int64_t lo = window > 0 && hi - window + 1 > 0 ? hi - window + 1 : 0;
            // a span's later keys too (the window bounds only the keys before the row: the torch
            // modules' image_mask, window AND (causal OR span))
            if (sq->span_end && sq->span_end[t] > hi) hi = sq->span_end[t] < sq->S - 1 ? sq->span_end[t] : sq->S - 1;
            for (int g = 0; g < nkv; g++, x++) {
                u[x].q = sq->q + t * ldq + (int64_t)g * rep * hd;
                u[x].out = sq->out + t * ldo + (int64_t)g * rep * hd;
                u[x].k = (const char *)sq->k + (size_t)g * (size_t)sq->sh * esz;
                u[x].v = (const char *)sq->v + (size_t)g * (size_t)sq->sh * esz;
                u[x].ss = sq->ss, u[x].lo = lo, u[x].hi = hi, u[x].kv16 = esz == 2;
                u[x].nb = (hi - lo) / KB + 1;
                u[x].first = blocks;
                blocks += u[x].nb;
                if (u[x].nb > most) most = u[x].nb;
            }
        }
    }
    *n_units = n, *n_blocks = blocks, *max_nb = most;
    return u;
}

// block b of unit x: keys lo + b * KB .. up to hi
static void block_of(const attn_unit *x, int64_t b, int rep, int hd, float scale, float softcap, float *p,
                     float *st) {
    const int64_t b0 = x->lo + b * KB, b1 = b0 + KB - 1 < x->hi ? b0 + KB - 1 : x->hi;
    attend_block(x->q, rep, x->k, x->v, x->ss, hd, b0, b1, scale, softcap, x->kv16, p, st);
}

// A prompt's rows read the same keys and values again and again: from an f16 cache, its
// sequences of at least WIDEN_ROWS rows first get f32 copies of the keys and values their rows
// see (at most WIDEN_BYTES in all), converted once instead of once per row. The f32 copies hold
// the same values, and the kernels do the same arithmetic on both, so the results are the same.
#define WIDEN_ROWS 4
#define WIDEN_BYTES ((int64_t)256 << 20)

typedef struct {
    const attn_seq *sq;
    int64_t lo, hi;  // the keys its rows see
    float *k, *v;    // (nkv, hi - lo + 1, hd) each
} widen_t;

// the sequences to widen (returns how many, 0 when none or out of memory), their units repointed
static int plan_widen(const attn_seq *seqs, int nseq, attn_unit *u, int nkv, int hd, widen_t **out, float **buf) {
    widen_t *w = malloc(sizeof(widen_t) * (size_t)(nseq > 0 ? nseq : 1));
    if (!w) return 0;
    int nw = 0;
    int64_t total = 0, x = 0;
    for (int i = 0; i < nseq; i++) {
        const attn_seq *sq = &seqs[i];
        const int64_t units = sq->n * nkv;
        if (sq->n >= WIDEN_ROWS) {
            int64_t lo = INT64_MAX, hi = -1;
            for (int64_t y = x; y < x + units; y++) {
                lo = u[y].lo < lo ? u[y].lo : lo;
                hi = u[y].hi > hi ? u[y].hi : hi;
            }
            const int64_t elems = 2 * (int64_t)nkv * (hi - lo + 1) * hd;
            if (hi >= lo && (total + elems) * 4 <= WIDEN_BYTES) {
                w[nw].sq = sq, w[nw].lo = lo, w[nw].hi = hi, w[nw].k = (float *)(intptr_t)total;  // offsets for now
                for (int64_t y = x; y < x + units; y++) u[y].kv16 = -1 - nw;  // repointed below
                total += elems, nw++;
            }
        }
        x += units;
    }
    float *b = nw ? malloc(sizeof(float) * (size_t)total) : NULL;
    if (!b) {
        for (int64_t y = 0; y < x; y++) u[y].kv16 = u[y].kv16 < 0 ? 1 : u[y].kv16;
        free(w);
        return 0;
    }
    for (int i = 0; i < nw; i++) {
        const int64_t span = w[i].hi - w[i].lo + 1;
        w[i].k = b + (intptr_t)w[i].k, w[i].v = w[i].k + (int64_t)nkv * span * hd;
    }
    for (int64_t y = 0; y < x; y++) {
        if (u[y].kv16 >= 0) continue;
        const widen_t *c = &w[-1 - u[y].kv16];
        const int64_t span = c->hi - c->lo + 1;
        const int g = (int)((u[y].k - (const char *)c->sq->k) / (2 * c->sq->sh));
        // key j of head g at (j - lo) * hd: the base pointer is lo rows before the copy (as an
        // address; only keys lo..hi are read)
        u[y].k = (const char *)((uintptr_t)(c->k + (int64_t)g * span * hd) - (uintptr_t)(c->lo * hd * 4));
        u[y].v = (const char *)((uintptr_t)(c->v + (int64_t)g * span * hd) - (uintptr_t)(c->lo * hd * 4));
        u[y].ss = hd, u[y].kv16 = 0;
    }
    *out = w, *buf = b;
    return nw;
}

// one (sequence, kv head, 64 keys) of the copies: f16 -> f32 (exact)
static void widen_chunk(const widen_t *c, int nkv, int hd, int64_t task) {
    const int64_t span = c->hi - c->lo + 1, chunks = (span + 63) / 64;
    const int g = (int)(task / chunks);
    const int64_t j0 = c->lo + (task % chunks) * 64, j1 = j0 + 64 < c->hi + 1 ? j0 + 64 : c->hi + 1;
    (void)nkv;
    for (int kv = 0; kv < 2; kv++) {
        const uint16_t *src = (const uint16_t *)(kv ? c->sq->v : c->sq->k) + (int64_t)g * c->sq->sh;
        float *dst = (kv ? c->v : c->k) + (int64_t)g * span * hd;
        for (int64_t j = j0; j < j1; j++) {
            const uint16_t *a = src + j * c->sq->ss;
            float *d = dst + (j - c->lo) * hd;
            int e = 0;
#if defined(VEC8)
            for (; e + 8 <= hd; e += 8) _mm256_storeu_ps(d + e, ld8(a, e, 1));
#endif
            for (; e < hd; e++) d[e] = ld1(a, e, 1);
        }
    }
}

// the unit whose blocks hold block index b (units' first blocks ascend)
static int64_t unit_of(const attn_unit *u, int64_t n, int64_t b) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        const int64_t mid = (lo + hi + 1) / 2;
        if (u[mid].first <= b) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// A prompt's rows go in chunks: up to `rows` consecutive rows of a sequence and one kv head per
// task, which takes each block of keys for all its rows in turn (blocks outer, rows inner), so a
// block's keys and values are read from memory once for the chunk while they are in cache, not
// once per row (a row at 8k keys of SmolLM2 streams 4 MB of f32 keys and values per kv head,
// more than the core's L2). With one query head per kv head (rep 1: no group of heads shares a
// key's load) 4 rows of the chunk go together through attend_rows, so each key and value vector
// is also loaded once for the 4. Each row's blocks are its own (from its own first key lo), each
// is computed as for the row alone, and its combine takes them in order: the same bits.
#define ROWS 4
#define CHUNK_BYTES ((int64_t)1 << 20)  // a task's blocks' stats (rows * blocks * sst floats), at most

// rows per chunk: enough tasks for the threads (8 each where the rows allow), at most 32, and at
// most CHUNK_BYTES of stats; a multiple of ROWS from 4 rows on
static int64_t chunk_rows(int64_t rows_all, int nkv, int n_threads, int64_t max_nb, int64_t sst) {
    int64_t c = rows_all * nkv / (8 * (int64_t)(n_threads > 0 ? n_threads : 1));
    const int64_t by_mem = CHUNK_BYTES / (max_nb * sst * 4);
    c = c > 32 ? 32 : c;
    c = c > by_mem ? by_mem : c;
    if (c >= ROWS) c -= c % ROWS;
    return c < 1 ? 1 : c;
}

// rows t0 .. t0 + R - 1 of the sequence whose units start at x, kv head h: every block of each
// row, block by block, then each row's combine. mine: R * max_nb * sst floats (row r's block b
// at (r * max_nb + b) * sst).
static void rows_chunk(const attn_unit *u, int64_t x, int64_t t0, int R, int h, int rep, int nkv, int hd,
                       float scale, float softcap, int64_t max_nb, float *p, float *mine) {
    const int64_t sst = (int64_t)rep * (hd + 2), os = max_nb * sst;
    const attn_unit *row0 = &u[x + t0 * nkv + h];
    int64_t nbmax = 0;
    for (int r = 0; r < R; r++) nbmax = row0[r * nkv].nb > nbmax ? row0[r * nkv].nb : nbmax;
    for (int64_t b = 0; b < nbmax; b++) {
        int r = 0;
#if defined(VEC16)
        if (rep == 1 && hd % 16 == 0)
            for (; r + 1 < R; r += ROWS) {  // rows r .. r + n - 1 together where all have block b
                const int n = R - r < ROWS ? R - r : ROWS;
                const attn_unit *a = &row0[r * nkv];
                int all = n > 1;
                int64_t b1[ROWS];
                const int64_t b0 = a->lo + b * KB;
                for (int i = 0; i < n && all; i++) {
                    const attn_unit *y = &a[i * nkv];
                    all = y->nb > b && y->lo == a->lo && y->k == a->k && y->v == a->v && y->ss == a->ss &&
                          y->kv16 == a->kv16;
                    b1[i] = b0 + KB - 1 < y->hi ? b0 + KB - 1 : y->hi;
                }
                if (all) {
                    attend_rows(n, a->q, a[nkv].q - a->q, a->k, a->v, a->ss, hd, b0, b1, scale, softcap, a->kv16, p,
                                mine + ((int64_t)r * max_nb + b) * sst, os);
                } else {
                    for (int i = 0; i < n; i++)
                        if (a[i * nkv].nb > b)
                            block_of(&a[i * nkv], b, 1, hd, scale, softcap, p, mine + ((int64_t)(r + i) * max_nb + b) * sst);
                }
            }
#endif
        for (; r < R; r++)
            if (row0[r * nkv].nb > b) block_of(&row0[r * nkv], b, rep, hd, scale, softcap, p, mine + ((int64_t)r * max_nb + b) * sst);
    }
    for (int r = 0; r < R; r++) {
        const attn_unit *y = &row0[r * nkv];
        for (int g = 0; g < rep; g++)
            combine(mine + r * os + (int64_t)g * (hd + 2), y->nb, sst, hd, y->out + (int64_t)g * hd);
    }
}

// Attention for every query row of several sequences. Query t at position pos[t] sees keys
// j <= pos[t] (key j is position j), also j <= span_end[t] (its image's rows, seen both ways),
// and, with a window, pos[t] - j < window. Many (row, kv head)
// units (a prompt, a batch of decodes): one task each. Few units (one sequence's decode step):
// the tasks are their blocks, then one combine per query head, so both threads share a long
// context. Tasks are handed out one by one as threads free up (a starved thread holds up the
// others for one task only).
void attn_batch(const attn_seq *seqs, int nseq, int64_t ldq, int64_t ldo, int nq, int nkv, int hd,
                int64_t window, float scale, float softcap, int n_threads, int kv16) {
    const int rep = nq / nkv;
    const int64_t sst = (int64_t)rep * (hd + 2);  // one block's stats
    int64_t nu, nbt, max_nb;
    attn_unit *u = plan_units(seqs, nseq, ldq, ldo, nq, nkv, hd, window, kv16 ? 2 : 4, &nu, &nbt, &max_nb);
    if (!u) return;
    widen_t *wd = NULL;
    float *wbuf = NULL;
    const int nw = kv16 ? plan_widen(seqs, nseq, u, nkv, hd, &wd, &wbuf) : 0;
    const int split = n_threads > 1 && nu < 4 * n_threads && nbt > nu;
    float *st = split ? malloc(sizeof(float) * (size_t)(nbt * sst)) : NULL;
    if (split && !st) {
        free(u), free(wd), free(wbuf);
        return;
    }
    int64_t rows_all = 0;
    for (int i = 0; i < nseq; i++) rows_all += seqs[i].n;
    const int64_t crow = chunk_rows(rows_all, nkv, n_threads, max_nb, sst);  // rows per task (rows_chunk)
    int64_t ntask = 0;
    for (int i = 0; i < nseq; i++) ntask += (seqs[i].n + crow - 1) / crow * nkv;
#pragma omp parallel num_threads(nbt > 1 || nw ? n_threads : 1)
    {
        for (int i = 0; i < nw; i++) {  // (each loop's end waits: the units read the copies)
            const int64_t tasks = (int64_t)nkv * ((wd[i].hi - wd[i].lo + 1 + 63) / 64);
#pragma omp for schedule(static)
            for (int64_t t = 0; t < tasks; t++) widen_chunk(&wd[i], nkv, hd, t);
        }
        float *p = malloc(sizeof(float) * (size_t)((rep > ROWS ? rep : ROWS) * KB));
        float *mine = split ? NULL : malloc(sizeof(float) * (size_t)(max_nb * sst * crow));
        if (split) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t b = 0; b < nbt; b++) {
                const attn_unit *x = &u[unit_of(u, nu, b)];
                block_of(x, b - x->first, rep, hd, scale, softcap, p, st + b * sst);
            }
#pragma omp for schedule(dynamic, 1) nowait
            for (int64_t i = 0; i < nu * rep; i++) {  // (nowait: the region's end waits)
                const attn_unit *x = &u[i / rep];
                const int r = (int)(i % rep);
                combine(st + x->first * sst + (int64_t)r * (hd + 2), x->nb, sst, hd, x->out + (int64_t)r * hd);
            }
        } else {
#pragma omp for schedule(dynamic, 1) nowait
            for (int64_t i = 0; i < ntask; i++) {  // task i: (sequence, row chunk, kv head), in that order
                int64_t j = i, x = 0;
                int sq = 0;
                while (j >= (seqs[sq].n + crow - 1) / crow * nkv) j -= (seqs[sq].n + crow - 1) / crow * nkv, x += seqs[sq++].n * nkv;
                const int64_t t0 = j / nkv * crow;
                const int R = (int)(seqs[sq].n - t0 < crow ? seqs[sq].n - t0 : crow);
                rows_chunk(u, x, t0, R, (int)(j % nkv), rep, nkv, hd, scale, softcap, max_nb, p, mine);
            }
        }
        free(p);
        free(mine);
    }
    free(st);
    free(u);
    free(wd);
    free(wbuf);
}

// x as the nearest IEEE half (ties to even; subnormals, overflow to inf, nan kept).
static inline uint16_t f2h(float f) {
#if defined(__F16C__)
    return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return sign | 0x7e00u;     // nan
    if (ax >= 0x477ff000u) return sign | 0x7c00u;    // 65520 and up (and inf): inf
    if (ax < 0x38800000u) {                          // a subnormal half: multiples of 2^-24
        const float a = nearbyintf(fabsf(f) / 5.9604644775390625e-08f);
        return sign | (uint16_t)a;                   // 1024 (the smallest normal) carries into the exponent
    }
    const uint32_t r = (ax + 0xfffu + ((ax >> 13) & 1u)) >> 13;  // 23 -> 10 mantissa bits, ties to even
    return sign | (uint16_t)(r - (112u << 10));
#endif
}

// Each sequence's new keys and values (its n rows of qkv: the nkv k heads after the nq q heads,
// then the v heads) written at slots [S - n, S) of its caches, which attn_batch then reads: as
// f16 (llama.cpp's cache type: rounded to nearest even) when kv16 is set, else as f32.
void kv_store(const attn_seq *seqs, int nseq, int64_t ldq, int nq, int nkv, int hd, int kv16) {
    for (int i = 0; i < nseq; i++) {
        const attn_seq *s = &seqs[i];
        for (int64_t t = 0; t < s->n; t++) {
            const float *row = s->q + t * ldq;
            const int64_t slot = (s->S - s->n + t) * s->ss;
            for (int h = 0; h < nkv; h++) {
                const float *ks = row + (int64_t)(nq + h) * hd, *vs = row + (int64_t)(nq + nkv + h) * hd;
                if (!kv16) {
                    memcpy((float *)s->k + h * s->sh + slot, ks, sizeof(float) * (size_t)hd);
                    memcpy((float *)s->v + h * s->sh + slot, vs, sizeof(float) * (size_t)hd);
                    continue;
                }
                uint16_t *kd = (uint16_t *)s->k + h * s->sh + slot, *vd = (uint16_t *)s->v + h * s->sh + slot;
                int j = 0;
#if defined(__F16C__) && defined(__AVX__)
                for (; j + 8 <= hd; j += 8) {
                    _mm_storeu_si128((__m128i *)(kd + j), _mm256_cvtps_ph(_mm256_loadu_ps(ks + j), _MM_FROUND_TO_NEAREST_INT));
                    _mm_storeu_si128((__m128i *)(vd + j), _mm256_cvtps_ph(_mm256_loadu_ps(vs + j), _MM_FROUND_TO_NEAREST_INT));
                }
#endif
                for (; j < hd; j++) {
                    kd[j] = f2h(ks[j]);
                    vd[j] = f2h(vs[j]);
                }
            }
        }
    }
}
