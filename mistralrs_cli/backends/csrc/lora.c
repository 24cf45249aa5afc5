// LoRA side paths of a projection (adapters/bank.py), called by qmatmul.c's qmm_parts inside its
// parallel region when qmm_opts.lora is set and this forward has column weights:
//   u[r, c] = (x_in[r] . A[c]) * w[r, c]     lora_down (x_in: the row the projection multiplies)
//   y[r, j] += sum_c u[r, c] * B[j, c]       lora_up, before the bias / post-norm / residual add
// f32 arithmetic on factors stored as f16: A's rows and B's columns are scaled by powers of two
// first (native_lora.py, folded back into w), so each value keeps 11 significant bits; the side
// paths stream half the bytes (a decode step is memory bound: in f32 an r=16 adapter on all seven
// targets of SmolLM2-135M adds 20 MB per token to its 66 MB of layer weights).
// A rank column c whose weight w[r, c] is 0 is skipped for row r (neither product is
// computed; in lora_up, a block whose columns all are), so a row's result depends on its own
// weights only (batch invariance) and a row that uses no adapter keeps the base projection's
// bits. Every stacked adapter's columns of every module fused into the projection (q|k|v,
// gate|up) are one R; a block (one adapter's columns of one module) writes only the outputs
// [lo, hi) of its module, and B keeps only those values.
#include <math.h>
#include <stdint.h>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

typedef struct {
    const float *w;  // this forward's adapter weights, (T x ld) row-major: T x (slot, adapter) pairs, or
                     // NULL: no adapter on any row
    int64_t ld;
} lora_fw;

typedef struct {
    int64_t R;                        // rank columns
    const uint16_t *A;                // R x k, f16
    int64_t nblk;                     // blocks of columns: one adapter's columns of one module
    const int64_t *blk;               // per block: c0, c1 (its columns), lo, hi (its outputs), off (in B)
    const uint16_t *B;                // a block's B values in tiles of 8 outputs: [tile][column][8], 0-padded, f16
    const lora_fw *fw;                // shared by every projection of the model
    const int64_t *pair;              // per column: its (slot, adapter) pair's index in fw's rows
    const float *scale;               // per column: its adapter's scaling
} qmm_lora;

#define SPAN 64  // outputs per unit of lora_up (a multiple of 8)

// column c's weight on row r, w[r, c] above
static inline float colw(const qmm_lora *l, int64_t r, int64_t c) {
    return l->fw->w[r * l->fw->ld + l->pair[c]] * l->scale[c];
}

// qmatmul.c sees a qmm_lora as an opaque pointer
int lora_active(const void *p) { const qmm_lora *l = p; return l->fw && l->fw->w != 0; }
int64_t lora_rank(const void *p) { return ((const qmm_lora *)p)->R; }

static inline float half(uint16_t h) {  // f16 -> f32, exact (subnormals included)
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    const uint32_t e = (h >> 10) & 31, f = h & 1023;
    const float v = e == 0 ? ldexpf((float)f, -24) : e == 31 ? (f ? NAN : INFINITY) : ldexpf((float)(f | 1024), (int)e - 25);
    return h & 0x8000 ? -v : v;
#endif
}

static float dot(const float *a, const uint16_t *b, int64_t k) {
    int64_t j = 0;
    float s = 0.0f;
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (; j + 16 <= k; j += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + j))), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + j + 8))),
                             s1);
    }
    float t[8];
    _mm256_storeu_ps(t, _mm256_add_ps(s0, s1));
    s = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
#endif
    for (; j < k; j++) s += a[j] * half(b[j]);
    return s;
}

// out[i] = dot(x + i * ldx, b, k) for 4 rows, each row's sum formed exactly as dot() forms it (the
// same products in the same order: a row's u never depends on the rows beside it); b's values
// are decoded once for the 4
static void dot4(const float *x, int64_t ldx, const uint16_t *b, int64_t k, float *out) {
    int64_t j = 0;
    float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    __m256 s0[4], s1[4];
    for (int i = 0; i < 4; i++) s0[i] = s1[i] = _mm256_setzero_ps();
    for (; j + 16 <= k; j += 16) {
        const __m256 b0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + j)));
        const __m256 b1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + j + 8)));
        for (int i = 0; i < 4; i++) {
            s0[i] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * ldx + j), b0, s0[i]);
            s1[i] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * ldx + j + 8), b1, s1[i]);
        }
    }
    for (int i = 0; i < 4; i++) {
        float t[8];
        _mm256_storeu_ps(t, _mm256_add_ps(s0[i], s1[i]));
        s[i] = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
    }
#endif
    for (int i = 0; i < 4; i++) {
        for (int64_t jj = j; jj < k; jj++) s[i] += x[i * ldx + jj] * half(b[jj]);
        out[i] = s[i];
    }
}

// s8[q] = sum_c u[c] * bt[c * 8 + q]: one tile of 8 outputs
static inline void tile8(const float *u, const uint16_t *bt, int64_t rb, float *s8) {
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    __m256 acc = _mm256_setzero_ps();
    for (int64_t c = 0; c < rb; c++)
        acc = _mm256_fmadd_ps(_mm256_set1_ps(u[c]), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(bt + c * 8))), acc);
    _mm256_storeu_ps(s8, acc);
#else
    for (int q = 0; q < 8; q++) s8[q] = 0.0f;
    for (int64_t c = 0; c < rb; c++)
        for (int q = 0; q < 8; q++) s8[q] += u[c] * half(bt[c * 8 + q]);
#endif
}

// u (m x R) for rows x (m x k, row stride ldx), 4 rows per unit (a prompt's rows decode each A
// row once per 4); work-shared, no barrier at its end
void lora_down(const void *p, const float *x, int64_t ldx, int64_t k, int64_t m, float *u) {
    const qmm_lora *l = p;
    const int64_t R = l->R, groups = (m + 3) / 4;
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < groups * R; i++) {
        const int64_t r0 = i / R * 4, c = i % R, nr = m - r0 < 4 ? m - r0 : 4;
        float d[4], w[4];
        int used = 0;
        for (int64_t r = 0; r < nr; r++) used += (w[r] = colw(l, r0 + r, c)) != 0.0f;
        if (used == 4) dot4(x + r0 * ldx, ldx, l->A + c * k, k, d);
        else
            for (int64_t r = 0; r < nr; r++) d[r] = w[r] != 0.0f ? dot(x + (r0 + r) * ldx, l->A + c * k, k) : 0.0f;
        for (int64_t r = 0; r < nr; r++) u[(r0 + r) * R + c] = w[r] != 0.0f ? d[r] * w[r] : 0.0f;
    }
}

// tile8 for 4 rows of u (row stride ldu), B's tile decoded once: each row's sums as tile8 forms them
static inline void tile8x4(const float *u, int64_t ldu, const uint16_t *bt, int64_t rb, float (*s8)[8]) {
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    __m256 acc[4];
    for (int i = 0; i < 4; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t c = 0; c < rb; c++) {
        const __m256 b = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(bt + c * 8)));
        for (int i = 0; i < 4; i++) acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(u[i * ldu + c]), b, acc[i]);
    }
    for (int i = 0; i < 4; i++) _mm256_storeu_ps(s8[i], acc[i]);
#else
    for (int i = 0; i < 4; i++) tile8(u + i * ldu, bt, rb, s8[i]);
#endif
}

// y (m x n, row stride ldy) += u B^T, a unit being 4 rows x SPAN outputs; work-shared, no barrier.
// B is read front to back, 8 outputs at a time (one vector) times each of a block's columns.
void lora_up(const void *p, const float *u, int64_t m, float *y, int64_t ldy, int64_t n) {
    const qmm_lora *l = p;
    const int64_t R = l->R, spans = (n + SPAN - 1) / SPAN, groups = (m + 3) / 4;
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < groups * spans; i++) {
        const int64_t r0 = i / spans * 4, nr = m - r0 < 4 ? m - r0 : 4;
        const int64_t j0 = (i % spans) * SPAN, j1 = j0 + SPAN < n ? j0 + SPAN : n;
        float acc[4][SPAN];
        int any[4] = {0, 0, 0, 0};
        for (int64_t b = 0; b < l->nblk; b++) {
            const int64_t *bk = l->blk + 5 * b, c0 = bk[0], c1 = bk[1], lo = bk[2], hi = bk[3];
            const int64_t a = lo > j0 ? lo : j0, e = hi < j1 ? hi : j1;
            if (a >= e) continue;
            int used[4] = {0, 0, 0, 0}, n_used = 0;
            for (int64_t r = 0; r < nr; r++) {
                for (int64_t c = c0; c < c1; c++) used[r] |= colw(l, r0 + r, c) != 0.0f;
                n_used += used[r];
                if (used[r] && !any[r]) {
                    for (int64_t j = 0; j < SPAN; j++) acc[r][j] = 0.0f;
                    any[r] = 1;
                }
            }
            if (!n_used) continue;
            const int64_t rb = c1 - c0;
            for (int64_t t = (a - lo) / 8; lo + 8 * t < e; t++) {
                const uint16_t *bt = l->B + bk[4] + t * rb * 8;
                float s8[4][8];
                if (n_used == 4) tile8x4(u + r0 * R + c0, R, bt, rb, s8);
                else
                    for (int64_t r = 0; r < nr; r++)
                        if (used[r]) tile8(u + (r0 + r) * R + c0, bt, rb, s8[r]);
                for (int64_t r = 0; r < nr; r++) {
                    if (!used[r]) continue;
                    for (int q = 0; q < 8; q++) {
                        const int64_t j = lo + 8 * t + q;
                        if (j >= a && j < e) acc[r][j - j0] += s8[r][q];
                    }
                }
            }
        }
        for (int64_t r = 0; r < nr; r++)
            if (any[r])
                for (int64_t j = j0; j < j1; j++) y[(r0 + r) * ldy + j] += acc[r][j - j0];
    }
}
