// LoRA side paths of a projection (adapters/bank.py), called by qmatmul.c's qmm_parts inside its
// parallel region when qmm_opts.lora is set and this forward has column weights:
//   u[r, c] = (x_in[r] . A[c]) * w[r, c]     lora_down (x_in: the row the projection multiplies)
//   y[r, j] += sum_c u[r, c] * B[j, c]       lora_up, before the bias / post-norm / residual add
// all f32. A rank column c whose weight w[r, c] is 0 is skipped for row r (neither product is
// computed), so a row's result depends on its own weights only (batch invariance) and a row that
// uses no adapter keeps the base projection's bits. Every stacked adapter's columns of every
// module fused into the projection (q|k|v, gate|up) are one R: column c writes only the outputs
// [lo[c], hi[c]) of its module, and B keeps only those values (column by column, contiguous).
#include <stdint.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

typedef struct {
    const float *w;  // this forward's column weights, (T x ld) row-major, or NULL: no adapter on any row
    int64_t ld;
} lora_fw;

typedef struct {
    int64_t R;                        // rank columns
    const float *A;                   // R x k
    const float *B;                   // column c's outputs lo[c]..hi[c] at B + off[c]
    const int64_t *lo, *hi, *off;
    const lora_fw *fw;                // shared by every projection of the model
    int64_t col;                      // this projection's first column in fw's rows
} qmm_lora;

#define SPAN 256  // output columns per unit of lora_up

// qmatmul.c sees a qmm_lora as an opaque pointer
int lora_active(const void *p) { const qmm_lora *l = p; return l->fw && l->fw->w != 0; }
int64_t lora_rank(const void *p) { return ((const qmm_lora *)p)->R; }

static float dot(const float *a, const float *b, int64_t k) {
    int64_t j = 0;
    float s = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (; j + 16 <= k; j += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), s1);
    }
    float t[8];
    _mm256_storeu_ps(t, _mm256_add_ps(s0, s1));
    s = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
#endif
    for (; j < k; j++) s += a[j] * b[j];
    return s;
}

// u (m x R) for rows x (m x k, row stride ldx); work-shared, no barrier at its end
void lora_down(const void *p, const float *x, int64_t ldx, int64_t k, int64_t m, float *u) {
    const qmm_lora *l = p;
    const int64_t R = l->R;
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < m * R; i++) {
        const int64_t r = i / R, c = i % R;
        const float w = l->fw->w[r * l->fw->ld + l->col + c];
        u[i] = w != 0.0f ? dot(x + r * ldx, l->A + c * k, k) * w : 0.0f;
    }
}

// y (m x n, row stride ldy) += u B^T, in spans of SPAN output columns; work-shared, no barrier
void lora_up(const void *p, const float *u, int64_t m, float *y, int64_t ldy, int64_t n) {
    const qmm_lora *l = p;
    const int64_t R = l->R, spans = (n + SPAN - 1) / SPAN;
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < m * spans; i++) {
        const int64_t r = i / spans, c0 = (i % spans) * SPAN, c1 = c0 + SPAN < n ? c0 + SPAN : n;
        const float *w = l->fw->w + r * l->fw->ld + l->col;
        float acc[SPAN];
        int any = 0;
        for (int64_t c = 0; c < R; c++) {
            const int64_t a = l->lo[c] > c0 ? l->lo[c] : c0, e = l->hi[c] < c1 ? l->hi[c] : c1;
            if (w[c] == 0.0f || a >= e) continue;
            if (!any) {
                for (int64_t j = c0; j < c1; j++) acc[j - c0] = 0.0f;
                any = 1;
            }
            const float uc = u[r * R + c], *b = l->B + l->off[c] - l->lo[c];
            for (int64_t j = a; j < e; j++) acc[j - c0] += uc * b[j];
        }
        if (any)
            for (int64_t j = c0; j < c1; j++) y[r * ldy + j] += acc[j - c0];
    }
}
