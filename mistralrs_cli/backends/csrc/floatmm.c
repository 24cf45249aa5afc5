// F32 / F16 / BF16 weights (GGUF files written at full or half precision) times f32 activations.
// qmatmul.c's qmm_parts hands every call whose parts are float types here, with the same parts
// and opts, so the native runtime serves these files through its usual calls (decoder.c's layers,
// the head, the LoRA side paths). Arithmetic is f32 on the file's values: nothing is rounded.
//
// Batch invariance: output (r, i) is one 8-lane FMA accumulator run over k in order, its lanes
// summed in a fixed order, then the k % 8 tail; tiles (4 weight rows x up to 6 activation rows
// with AVX-512VL's 32 vector registers, else 2) only decide which pairs share loads, so a row's
// outputs are bit for bit the same whatever other rows share the call (a verify chunk, a batch).
// A weight tile is read from memory once for all activation rows (each weight row streams once
// per call: a decode step and a verify of a few tokens cost about the same, the bandwidth);
// F16/BF16 values are widened in registers at each load, every row group again (a widened copy
// of the tile in scratch cost more: a 283 MB F16 matrix, 8 rows, 47 vs 66-78 ms). While a tile
// runs, the weight rows PFD rows on are prefetched: one thread's stream then keeps more cache
// misses in flight (measured on 2 shared cores, one thread, CPU time, a 566 MB F32 matrix: 1 row
// 58 -> 47 ms, 6 rows 104 -> 57 ms with the 4 x 6 tile; F16 1 row 50 -> 33, 6 rows 86 -> 43).
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

enum { F_F32 = 0, F_F16 = 1, F_BF16 = 30 };  // GGML ids
#ifndef FMM_TW  // tile: weight rows x activation rows (at most 4 x 6)
#define FMM_TW 4
#endif
#ifndef FMM_TX
#if defined(__AVX512VL__)  // 24 accumulators + 4 weight vectors + 1 activation fit in 32 registers
#define FMM_TX 6
#else
#define FMM_TX 2
#endif
#endif
#ifndef FMM_PFD  // prefetch distance, weight rows
#define FMM_PFD 4
#endif
enum { TW = FMM_TW, TX = FMM_TX, PFD = FMM_PFD, UNIT = 16 };  // UNIT: weight rows per unit of work

typedef struct {  // qmatmul.c's qpart_t
    int type;
    int64_t rows;
    const uint8_t *w;  // rows x k values
} fpart_t;

typedef struct {  // qmatmul.c's qmm_opts, field for field
    const float *norm_w;
    float norm_eps;
    int act;
    const float *bias;
    float *residual;
    int64_t ld_res;
    const float *post_w;
    float post_eps;
    int precise;
    const void *lora;
} fmm_opts;

int lora_active(const void *l);
int64_t lora_rank(const void *l);
void lora_down(const void *l, const float *x, int64_t ldx, int64_t k, int64_t m, float *u);
void lora_up(const void *l, const float *u, int64_t m, float *y, int64_t ldy, int64_t n);

int fmm_type(int type) { return type == F_F32 || type == F_F16 || type == F_BF16; }

static inline int64_t esize(int type) { return type == F_F32 ? 4 : 2; }

static inline float f16_to_f32(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    const uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, f = h & 0x3ff;
    float v;
    if (e == 0) v = ldexpf((float)f, -24);
    else if (e == 31) v = f ? NAN : INFINITY;
    else v = ldexpf((float)(f | 0x400), (int)e - 25);
    uint32_t b;
    memcpy(&b, &v, 4);
    b |= s;
    memcpy(&v, &b, 4);
    return v;
#endif
}

static inline float elem(int type, const uint8_t *p, int64_t j) {
    if (type == F_F32) {
        float v;
        memcpy(&v, p + 4 * j, 4);
        return v;
    }
    const uint16_t h = (uint16_t)(p[2 * j] | (p[2 * j + 1] << 8));
    if (type == F_F16) return f16_to_f32(h);
    const uint32_t b = (uint32_t)h << 16;
    float v;
    memcpy(&v, &b, 4);
    return v;
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define FMM_SIMD 1
static inline __m256 load8(int type, const uint8_t *p) {  // 8 values from p, as f32
    if (type == F_F32) return _mm256_loadu_ps((const float *)p);
    const __m128i h = _mm_loadu_si128((const __m128i *)p);
    if (type == F_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float hsum8(__m256 v) {  // ((0+4) + (2+6)) + ((1+5) + (3+7))
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// y[r * ldy + i] = x_r . w_i for nw weight rows (ldw bytes apart) and nx activation rows; pf (or
// NULL): nw rows to prefetch, ldw bytes apart, one cache line per 16 values
static inline __attribute__((always_inline)) void tile(int type, const uint8_t *w, int64_t ldw, int nw,
                                                       const float *x, int64_t ldx, int nx, int64_t k, float *y,
                                                       int64_t ldy, const uint8_t *pf) {
    __m256 acc[6][4];
    for (int r = 0; r < nx; r++)
        for (int i = 0; i < nw; i++) acc[r][i] = _mm256_setzero_ps();
    const int64_t k8 = k & ~(int64_t)7, es = esize(type);
    for (int64_t j = 0; j < k8; j += 8) {
        __m256 wv[4];
        if (pf && (j & 15) == 0)
            for (int i = 0; i < nw; i++) _mm_prefetch((const char *)(pf + i * ldw + j * es), _MM_HINT_T0);
        for (int i = 0; i < nw; i++) wv[i] = load8(type, w + i * ldw + j * es);
        for (int r = 0; r < nx; r++) {
            __m256 xv = _mm256_loadu_ps(x + r * ldx + j);
            __asm__("" : "+x"(xv));  // one load per row, not one folded into each FMA (loads bound the tile)
            for (int i = 0; i < nw; i++) acc[r][i] = _mm256_fmadd_ps(wv[i], xv, acc[r][i]);
        }
    }
    for (int r = 0; r < nx; r++)
        for (int i = 0; i < nw; i++) {
            float s = hsum8(acc[r][i]);
            for (int64_t j = k8; j < k; j++) s = fmaf(elem(type, w + i * ldw, j), x[r * ldx + j], s);
            y[r * ldy + i] = s;
        }
}
#else
#define FMM_SIMD 0
// the same per-output steps in scalar code (fmaf: fused as the vector FMA, never left to the
// compiler's contraction, which may differ between call sites): the AVX2 build's bits
static void tile(int type, const uint8_t *w, int64_t ldw, int nw, const float *x, int64_t ldx, int nx, int64_t k,
                 float *y, int64_t ldy, const uint8_t *pf) {
    (void)pf;
    const int64_t k8 = k & ~(int64_t)7;
    for (int r = 0; r < nx; r++)
        for (int i = 0; i < nw; i++) {
            float lane[8] = {0};
            for (int64_t j = 0; j < k8; j += 8)
                for (int l = 0; l < 8; l++) lane[l] = fmaf(elem(type, w + i * ldw, j + l), x[r * ldx + j + l], lane[l]);
            float s = ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
            for (int64_t j = k8; j < k; j++) s = fmaf(elem(type, w + i * ldw, j), x[r * ldx + j], s);
            y[r * ldy + i] = s;
        }
}
#endif

// the tile with its type and shape as constants (the accumulators stay in registers)
#define TILE_NX(T, NW)                                                                    \
    switch (nx) {                                                                         \
    case 1: tile(T, w, ldw, NW, x, ldx, 1, k, y, ldy, pf); return;                        \
    case 2: tile(T, w, ldw, NW, x, ldx, 2, k, y, ldy, pf); return;                        \
    case 3: tile(T, w, ldw, NW, x, ldx, 3, k, y, ldy, pf); return;                        \
    case 4: tile(T, w, ldw, NW, x, ldx, 4, k, y, ldy, pf); return;                        \
    case 5: tile(T, w, ldw, NW, x, ldx, 5, k, y, ldy, pf); return;                        \
    default: tile(T, w, ldw, NW, x, ldx, 6, k, y, ldy, pf); return;                       \
    }
#define TILE_CASE(T)                                                                      \
    case T:                                                                               \
        switch (nw) {                                                                     \
        case 1: TILE_NX(T, 1)                                                             \
        case 2: TILE_NX(T, 2)                                                             \
        case 3: TILE_NX(T, 3)                                                             \
        default: TILE_NX(T, 4)                                                            \
        }

static void tile_any(int type, const uint8_t *w, int64_t ldw, int nw, const float *x, int64_t ldx, int nx,
                     int64_t k, float *y, int64_t ldy, const uint8_t *pf) {
    switch (type) {
        TILE_CASE(F_F32)
        TILE_CASE(F_F16)
        TILE_CASE(F_BF16)
    }
}

// weight rows [i0, i1) of part p (output columns col + i) for all m activation rows
static void part_unit(const fpart_t *p, int64_t i0, int64_t i1, int64_t k, const float *x, int64_t ldx,
                      int64_t m, float *y, int64_t ldy) {
    const int64_t ldw = k * esize(p->type);
    for (int64_t i = i0; i < i1; i += TW) {
        const int nw = i1 - i < TW ? (int)(i1 - i) : TW;
        const uint8_t *w = p->w + i * ldw;
        for (int64_t r = 0; r < m; r += TX) {
            const int nx = m - r < TX ? (int)(m - r) : TX;
            // the first row group prefetches the part's rows PFD on
            const uint8_t *pf = r == 0 && i + PFD + nw <= p->rows ? p->w + (i + PFD) * ldw : NULL;
            tile_any(p->type, w, ldw, nw, x + r * ldx, ldx, nx, k, y + r * ldy + i, ldy, pf);
        }
    }
}

static void rms_norm(const float *x, int64_t k, const float *w, float eps, float *out) {
    float ss = 0.0f;
    for (int64_t j = 0; j < k; j++) ss += x[j] * x[j];
    const float r = 1.0f / sqrtf(ss / (float)k + eps);
    for (int64_t j = 0; j < k; j++) out[j] = x[j] * r * w[j];
}

static float act_fn(int act, float g) {
    if (act == 1) return g / (1.0f + expf(-g));
    const float c = 0.7978845608028654f;  // sqrt(2 / pi)
    return 0.5f * g * (1.0f + tanhf(c * (g + 0.044715f * g * g * g)));
}

// input row r as the projection sees it (act(gate) * up over [gate | up], then the norm) into out
static void prologue(const float *x, int64_t k, const fmm_opts *o, float *out) {
    if (o->act) {
        for (int64_t j = 0; j < k; j++) out[j] = act_fn(o->act, x[j]) * x[k + j];
        x = out;
    }
    if (o->norm_w) rms_norm(x, k, o->norm_w, o->norm_eps, out);
}

static void epilogue(float *yr, float *res, int64_t n, const fmm_opts *o) {
    if (o->bias)
        for (int64_t i = 0; i < n; i++) yr[i] += o->bias[i];
    if (res) {
        if (o->post_w) rms_norm(yr, n, o->post_w, o->post_eps, yr);
        for (int64_t i = 0; i < n; i++) res[i] += yr[i];
    }
}

// qmm_parts's contract (see qmatmul.c) for float parts: y[r * ldy + c] = prologue(x_r) . W_c,
// then o's epilogue. Returns 0, or -1 (a part that is not a float type, or out of memory).
int fmm_parts(const fpart_t *parts, int nparts, int64_t k, const float *x, int64_t ldx, int64_t m, float *y,
              int64_t ldy, int n_threads, const fmm_opts *o) {
    int64_t n_total = 0;
    for (int p = 0; p < nparts; p++) {
        if (!fmm_type(parts[p].type)) return -1;
        n_total += parts[p].rows;
    }
    const int pro = o && (o->act || o->norm_w);
    const void *lora = o && o->lora && lora_active(o->lora) ? o->lora : NULL;
    float *xin = pro ? malloc(sizeof(float) * (size_t)(m * k)) : NULL;
    float *lu = lora ? malloc(sizeof(float) * (size_t)(m * lora_rank(lora) + 1)) : NULL;
    if ((pro && !xin) || (lora && !lu)) {
        free(xin);
        free(lu);
        return -1;
    }
    const float *xs = pro ? xin : x;
    const int64_t ldxs = pro ? k : ldx;
#pragma omp parallel num_threads(n_threads)
    {
        if (pro) {
#pragma omp for schedule(static)
            for (int64_t r = 0; r < m; r++) prologue(x + r * ldx, k, o, xin + r * k);
        }
        if (lora) lora_down(lora, xs, ldxs, k, m, lu);  // no barrier: the units below do not read u
        int64_t col = 0;
        for (int p = 0; p < nparts; p++) {
            const fpart_t *pp = &parts[p];
            const int64_t units = (pp->rows + UNIT - 1) / UNIT;
#pragma omp for schedule(QMM_SCHED) nowait
            for (int64_t u = 0; u < units; u++) {
                const int64_t i0 = u * UNIT, i1 = i0 + UNIT < pp->rows ? i0 + UNIT : pp->rows;
                part_unit(pp, i0, i1, k, xs, ldxs, m, y + col, ldy);
            }
            col += pp->rows;
        }
        if (lora) {
#pragma omp barrier
            lora_up(lora, lu, m, y, ldy, n_total);
        }
        if (o && (o->bias || o->residual)) {
#pragma omp barrier
#pragma omp for schedule(static)
            for (int64_t r = 0; r < m; r++)
                epilogue(y + r * ldy, o->residual ? o->residual + r * o->ld_res : NULL, n_total, o);
        }
    }
    free(xin);
    free(lu);
    return 0;
}

int fmm_simd(void) { return FMM_SIMD; }
