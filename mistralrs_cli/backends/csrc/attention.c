// The rest of a decoder layer's decode step on the CPU, beside qmatmul.c's projections:
// per-head q/k RMSNorm + rotary embedding in place, and attention of a few query rows over a
// sequence's cached keys and values. Same math as models/layers.py (its torch path is the
// reference these are tested against), in one call each instead of a dozen small torch ops.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

// qkv rows (T, ldq): q heads [0, nq), k heads [nq, nq + nkv), each hd wide. Per head of q and k:
// optional RMSNorm (qn / kn weights incl. any +1, eps), then rotate-half rotary over the first
// rot dims with this row's cos/sin (T, rot) tables.
void rope_rows(float *qkv, int64_t T, int64_t ldq, int nq, int nkv, int hd, int rot,
               const float *cos_t, const float *sin_t, const float *qn, const float *kn, float eps) {
    const int half = rot / 2;
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_t + t * rot, *s = sin_t + t * rot;
        for (int h = 0; h < nq + nkv; h++) {
            float *x = qkv + t * ldq + (int64_t)h * hd;
            const float *nw = h < nq ? qn : kn;
            if (nw) {
                float ss = 0.0f;
                for (int j = 0; j < hd; j++) ss += x[j] * x[j];
                const float r = 1.0f / sqrtf(ss / (float)hd + eps);
                for (int j = 0; j < hd; j++) x[j] = x[j] * r * nw[j];
            }
            for (int j = 0; j < half; j++) {
                const float a = x[j], b = x[j + half];
                x[j] = a * c[j] - b * s[j];
                x[j + half] = b * c[j + half] + a * s[j + half];
            }
        }
    }
}

static inline float dot(const float *a, const float *b, int n) {
    // 32 independent sums (four vectors' worth): vectorized without -ffast-math, and four
    // FMA chains in flight instead of one
    float acc[32] = {0};
    int e = 0;
    for (; e + 32 <= n; e += 32)
        for (int l = 0; l < 32; l++) acc[l] += a[e + l] * b[e + l];
    for (; e + 8 <= n; e += 8)
        for (int l = 0; l < 8; l++) acc[l] += a[e + l] * b[e + l];
    for (int l = 0; l < 8; l++) acc[l] += (acc[l + 8] + acc[l + 16]) + acc[l + 24];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; e < n; e++) s += a[e] * b[e];
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

// o = inv * sum_j p[j - lo] v_j over keys lo..hi; 64 output dims at a time stay in registers
static void weighted_sum(const float *p, int64_t lo, int64_t hi, float inv, const float *vh, int64_t ss,
                         int hd, float *o) {
    int e0 = 0;
#if defined(__AVX2__)
    for (; e0 + 64 <= hd; e0 += 64) {
        __m256 acc[8];
        for (int c = 0; c < 8; c++) acc[c] = _mm256_setzero_ps();
        for (int64_t j = lo; j <= hi; j++) {
            const __m256 w = _mm256_set1_ps(p[j - lo]);
            const float *vj = vh + j * ss + e0;
            for (int c = 0; c < 8; c++) acc[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vj + 8 * c), acc[c]);
        }
        const __m256 s = _mm256_set1_ps(inv);
        for (int c = 0; c < 8; c++) _mm256_storeu_ps(o + e0 + 8 * c, _mm256_mul_ps(acc[c], s));
    }
#endif
    for (int e = e0; e < hd; e++) {
        float a = 0.0f;
        for (int64_t j = lo; j <= hi; j++) a += p[j - lo] * vh[j * ss + e];
        o[e] = a * inv;
    }
}

// One (query row, head) of attention: q (hd), keys/values of one kv head with key stride ss,
// keys lo..hi visible; p: scratch for hi - lo + 1 scores; o: hd outputs.
static void attend_row(const float *qh, const float *kh, const float *vh, int64_t ss, int hd, int64_t lo,
                       int64_t hi, float scale, float softcap, float *p, float *o) {
    float mx = -INFINITY;
    for (int64_t j = lo; j <= hi; j++) {
        float d = dot(qh, kh + j * ss, hd) * scale;
        if (softcap > 0.0f) d = tanhf(d / softcap) * softcap;
        p[j - lo] = d;
        if (d > mx) mx = d;
    }
    weighted_sum(p, lo, hi, 1.0f / exp_sum(p, hi - lo + 1, mx), vh, ss, hd, o);
}

#include "attention.h"

// Attention for every query row of several sequences in one parallel loop over (row, head).
// Query t at position pos[t] sees keys j <= pos[t] (key j is position j) and, with a window,
// pos[t] - j < window.
void attn_batch(const attn_seq *seqs, int nseq, int64_t ldq, int64_t ldo, int nq, int nkv, int hd,
                int64_t window, float scale, float softcap, int n_threads) {
    const int rep = nq / nkv;
    int64_t tasks = 0, max_s = 1;
    for (int i = 0; i < nseq; i++) {
        tasks += seqs[i].n * nq;
        if (seqs[i].S > max_s) max_s = seqs[i].S;
    }
#pragma omp parallel num_threads(tasks > 1 ? n_threads : 1)
    {
        float *p = malloc(sizeof(float) * (size_t)max_s);
        // round-robin: a causal prompt's later rows see more keys, so contiguous halves would
        // leave one thread with three quarters of the work
#pragma omp for schedule(static, 1)
        for (int64_t task = 0; task < tasks; task++) {
            int64_t rest = task / nq;
            int i = 0;
            while (rest >= seqs[i].n) rest -= seqs[i++].n;  // which sequence, which row
            const attn_seq *sq = &seqs[i];
            const int h = (int)(task % nq);
            const int64_t t = rest, hi = sq->pos[t] < sq->S - 1 ? sq->pos[t] : sq->S - 1;
            const int64_t lo = window > 0 && hi - window + 1 > 0 ? hi - window + 1 : 0;
            attend_row(sq->q + t * ldq + (int64_t)h * hd, sq->k + (int64_t)(h / rep) * sq->sh,
                       sq->v + (int64_t)(h / rep) * sq->sh, sq->ss, hd, lo, hi, scale, softcap, p,
                       sq->out + t * ldo + (int64_t)h * hd);
        }
        free(p);
    }
}

// x rounded to the nearest IEEE half (ties to even, subnormals and overflow to inf included) and
// back: what storing it in an f16 cache and reading it again gives.
static inline float round_f16(float f) {
#if defined(__F16C__)
    return _cvtsh_ss(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
#else
    uint32_t x, r;
    memcpy(&x, &f, 4);
    const uint32_t sign = x & 0x80000000u, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return f;  // inf, nan
    if (ax >= 0x477ff000u) {          // 65520 and up round to inf
        r = sign | 0x7f800000u;
        memcpy(&f, &r, 4);
        return f;
    }
    if (ax < 0x38800000u) {  // below 2^-14: a subnormal half, multiples of 2^-24
        const float q = 5.9604644775390625e-08f, a = nearbyintf(fabsf(f) / q) * q;
        return sign ? -a : a;
    }
    r = sign | ((ax + 0xfffu + ((ax >> 13) & 1u)) & 0xffffe000u);  // 23 -> 10 mantissa bits
    memcpy(&f, &r, 4);
    return f;
#endif
}

// Each sequence's new keys and values (its n rows of qkv: the nkv k heads after the nq q heads,
// then the v heads) written at slots [S - n, S) of its caches, which attn_batch then reads;
// rounded through f16 when f16 is set (llama.cpp's f16 cache, kept as f32 here).
void kv_store(const attn_seq *seqs, int nseq, int64_t ldq, int nq, int nkv, int hd, int f16) {
    for (int i = 0; i < nseq; i++) {
        const attn_seq *s = &seqs[i];
        for (int64_t t = 0; t < s->n; t++) {
            const float *row = s->q + t * ldq;
            const int64_t slot = (s->S - s->n + t) * s->ss;
            for (int h = 0; h < nkv; h++) {
                float *kd = (float *)s->k + h * s->sh + slot, *vd = (float *)s->v + h * s->sh + slot;
                const float *ks = row + (int64_t)(nq + h) * hd, *vs = row + (int64_t)(nq + nkv + h) * hd;
                if (!f16) {
                    memcpy(kd, ks, sizeof(float) * (size_t)hd);
                    memcpy(vd, vs, sizeof(float) * (size_t)hd);
                    continue;
                }
                int j = 0;
#if defined(__F16C__) && defined(__AVX__)
                for (; j + 8 <= hd; j += 8) {
                    _mm256_storeu_ps(kd + j, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(ks + j), _MM_FROUND_TO_NEAREST_INT)));
                    _mm256_storeu_ps(vd + j, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(vs + j), _MM_FROUND_TO_NEAREST_INT)));
                }
#endif
                for (; j < hd; j++) {
                    kd[j] = round_f16(ks[j]);
                    vd[j] = round_f16(vs[j]);
                }
            }
        }
    }
}
