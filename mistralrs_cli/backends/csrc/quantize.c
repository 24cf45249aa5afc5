/* Float rows -> GGUF block bytes for --isq: Q8_0, Q4_K, Q5_K, Q6_K.
 *
 * The same arithmetic as llama.cpp's quantize_row_*_ref (and quant/kquants.py, its vectorized
 * port): every search sums left to right in float, and each expression rounds where C's would,
 * so the bytes equal libggml-base's. That needs plain multiplies and adds: no fused
 * multiply-add (the build's -march=native would otherwise contract them), hence the pragma.
 * Written from the algorithm's description; rows are split over OpenMP threads.
 */
#pragma GCC optimize("fp-contract=off")
#pragma GCC diagnostic ignored "-Wpsabi" /* static helpers pass 32-byte vectors; no ABI crosses */
#ifdef __clang__
#pragma clang fp contract(off)
#endif
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { T_Q8_0 = 8, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14 };
#define GROUP_EPS 1e-15f

/* round half to even through the float adder, valid for |v| < 2^22 (as ggml's nearest_int) */
static inline int rint_small(float v) {
    float t = v + 12582912.f;
    int32_t i;
    memcpy(&i, &t, 4);
    return (i & 0x007fffff) - 0x00400000;
}

static inline int clampi(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

/* IEEE binary16, round to nearest even (infinities and NaN kept) */
static uint16_t to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7fffffff;
    if (ax > 0x7f800000) return (uint16_t)(sign | 0x7e00);
    if (ax >= 0x477ff000) return (uint16_t)(sign | 0x7c00); /* rounds past 65504 */
    if (ax < 0x38800000) {                                   /* a half subnormal or zero */
        if (ax < 0x33000000) return (uint16_t)sign;           /* under half the smallest */
        uint32_t e = ax >> 23, m = (ax & 0x7fffff) | 0x800000;
        uint32_t shift = 126 - e;                            /* 14 + (112 - e) + 1 - 1 */
        uint32_t q = m >> shift, rest = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rest > half || (rest == half && (q & 1))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t q = ((ax - 0x38000000) >> 13), rest = ax & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (q & 1))) q++;
    return (uint16_t)(sign | q);
}

static float from_half(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 0x3ff, x;
    if (e == 0) {
        float v = ldexpf((float)m, -24);
        return sign ? -v : v;
    }
    x = e == 31 ? (sign | 0x7f800000 | (m << 13)) : (sign | ((e + 112) << 23) | (m << 13));
    float f;
    memcpy(&f, &x, 4);
    return f;
}

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }

/* Sixteen sub-blocks searched at once, one per lane (GCC vector extensions: AVX-512 or pairs of
 * AVX registers): two super-blocks of Q4_K / Q5_K, one of Q6_K. Each lane runs the scalar
 * search's operations in the scalar order, so its result is the same float for float; branches
 * become masks. The searches' sums are chains of dependent adds: 16 lanes keep two in flight. */
#define NL 16
typedef float vf __attribute__((vector_size(4 * NL)));
typedef int32_t vi __attribute__((vector_size(4 * NL)));

static inline vf splat(float f) { vf z = {0}; return z + f; }
static inline vi splati(int v) { vi z = {0}; return z + v; }
static inline vf sel(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
static inline vi seli(vi m, vi a, vi b) { return (a & m) | (b & ~m); }
static inline vf vabs(vf a) { return (vf)((vi)a & splati(0x7fffffff)); }
static inline vf tof(vi a) { return __builtin_convertvector(a, vf); }
static inline vi vrint_clamp(vf v, int lo, int hi) {
    vi i = (vi)(v + splat(12582912.f));
    i = (i & splati(0x007fffff)) - splati(0x00400000);
    i = seli(i < splati(lo), splati(lo), i);
    return seli(i > splati(hi), splati(hi), i);
}

/* --- Q8_0: 34 bytes per 32 values ------------------------------------------------------------- */
static void row_q8_0(const float *x, int64_t n, uint8_t *out) {
    for (int64_t b = 0; b < n / 32; b++, x += 32, out += 34) {
        float amax = 0.f;
        for (int j = 0; j < 32; j++) { float a = fabsf(x[j]); amax = amax > a ? amax : a; }
        float d = amax / 127, id = d != 0.f ? 1.f / d : 0.f;
        put16(out, to_half(d));
        for (int j = 0; j < 32; j++) out[2 + j] = (uint8_t)(int8_t)roundf(x[j] * id);
    }
}

/* --- Q4_K / Q5_K: x ~ scale * L - min, a weighted least-squares fit over nstep+1 ranges ---- */
/* the 8 sub-blocks of 32 of two super-blocks at once: X[i], W[i] hold element i of each. From the
 * plain range (min clipped to 0), each candidate range starts at the best fit's min so far. */
static void fit_scale_min_v(const vf *X, const vf *W, int nmax, float rmin, float rdelta, int nstep,
                           vi *L, vf *scale_out, vf *min_out) {
    vf lo = X[0], hi = X[0], sw = W[0], sx = W[0] * X[0];
    for (int i = 1; i < 32; i++) {
        lo = sel(X[i] < lo, X[i], lo);
        hi = sel(X[i] > hi, X[i], hi);
        sw += W[i];
        sx += W[i] * X[i];
    }
    lo = sel(lo > splat(0.f), splat(0.f), lo);
    vi flat = hi == lo;
    vf lo0 = lo, is = splat((float)nmax) / (hi - lo), scale = splat(1.f) / is, best = splat(0.f);
    for (int i = 0; i < 32; i++) {
        L[i] = vrint_clamp(is * (X[i] - lo), 0, nmax);
        vf e = scale * tof(L[i]) + lo - X[i];
        best += W[i] * (e * e);
    }
    vi cand[32];
    for (int s = 0; s <= nstep; s++) {
        float c = rmin + rdelta * s;
        c = c + nmax;
        is = splat(c) / (hi - lo);
        vf sl = splat(0.f), sl2 = sl, sxl = sl;
        for (int i = 0; i < 32; i++) {
            cand[i] = vrint_clamp(is * (X[i] - lo), 0, nmax);
            vf l = tof(cand[i]);
            sl += W[i] * l;
            sl2 += W[i] * l * l;
            sxl += W[i] * l * X[i];
        }
        vf D = sw * sl2 - sl * sl;
        vf sc = (sw * sxl - sx * sl) / D, mn = (sl2 * sx - sl * sxl) / D;
        vi pos = mn > splat(0.f);
        sc = sel(pos, sxl / sl2, sc);
        mn = sel(pos, splat(0.f), mn);
        vf err = splat(0.f);
        for (int i = 0; i < 32; i++) {
            vf e = sc * tof(cand[i]) + mn - X[i];
            err += W[i] * (e * e);
        }
        vi better = (D > splat(0.f)) & (err < best) & ~flat;
        for (int i = 0; i < 32; i++) L[i] = seli(better, cand[i], L[i]);
        best = sel(better, err, best);
        scale = sel(better, sc, scale);
        lo = sel(better, mn, lo);
    }
    for (int i = 0; i < 32; i++) L[i] = seli(flat, splati(0), L[i]);
    *scale_out = sel(flat, splat(0.f), scale);
    *min_out = sel(flat, -lo0, -lo);
}

/* the 8 sub-blocks of 32: packed 6-bit scales and mins, d, dmin, and the final levels */
/* the searches of super-blocks x[0..255] and x2[0..255] (lanes 0-7 and 8-15) */
typedef struct { float scales[NL], mins[NL]; uint8_t L[NL][32]; } k4_fits;

static void k4_search(const float *x, const float *x2, int nmax, float rmin, float rdelta, int nstep, k4_fits *f) {
    vf X[32], W[32], vs, vm, s2 = splat(0.f);
    vi VL[32];
    for (int i = 0; i < 32; i++) {
        for (int j = 0; j < NL; j++) X[i][j] = (j < 8 ? x : x2 - 256)[32 * j + i];
        s2 += X[i] * X[i];
    }
    for (int j = 0; j < NL; j++) s2[j] = sqrtf(s2[j] / 32);
    for (int i = 0; i < 32; i++) W[i] = s2 + vabs(X[i]);
    fit_scale_min_v(X, W, nmax, rmin, rdelta, nstep, VL, &vs, &vm);
    for (int j = 0; j < NL; j++) {
        f->scales[j] = vs[j];
        f->mins[j] = vm[j];
        for (int i = 0; i < 32; i++) f->L[j][i] = (uint8_t)VL[i][j];
    }
}

/* one super-block from its 8 searched sub-blocks (fits lanes 8h..8h+7) */
static void k4_block(const float *x, int nmax, const k4_fits *f, int h, uint8_t *head, uint8_t *L) {
    float scales[8], mins[8], max_scale = 0, max_min = 0;
    for (int j = 0; j < 8; j++) {
        scales[j] = f->scales[8 * h + j];
        mins[j] = f->mins[8 * h + j];
        memcpy(L + 32 * j, f->L[8 * h + j], 32);
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    float inv_s = max_scale > 0 ? 63.f / max_scale : 0.f, inv_m = max_min > 0 ? 63.f / max_min : 0.f;
    uint8_t ls[8], lm[8], *sc = head + 4;
    for (int j = 0; j < 8; j++) {
        uint8_t a = (uint8_t)rint_small(inv_s * scales[j]), b = (uint8_t)rint_small(inv_m * mins[j]);
        ls[j] = a < 63 ? a : 63;
        lm[j] = b < 63 ? b : 63;
    }
    for (int j = 0; j < 4; j++) {
        sc[j] = (uint8_t)(ls[j] | ((ls[j + 4] >> 4) << 6));
        sc[j + 4] = (uint8_t)(lm[j] | ((lm[j + 4] >> 4) << 6));
        sc[j + 8] = (uint8_t)((ls[j + 4] & 15) | ((lm[j + 4] & 15) << 4));
    }
    uint16_t hd = to_half(max_scale / 63.f), hm = to_half(max_min / 63.f);
    put16(head, hd);
    put16(head + 2, hm);
    float d0 = from_half(hd), m0 = from_half(hm);
    for (int j = 0; j < 8; j++) {
        float d = d0 * ls[j];
        if (d == 0.f) continue;
        float dm = m0 * lm[j];
        for (int i = 0; i < 32; i++) L[32 * j + i] = (uint8_t)clampi(rint_small((x[32 * j + i] + dm) / d), 0, nmax);
    }
}

static void row_q4_k(const float *x, int64_t n, uint8_t *out) {
    uint8_t L[256];
    k4_fits f;
    for (int64_t b = 0; b < n / 256; b++, x += 256, out += 144) {
        if (b % 2 == 0) k4_search(x, b + 1 < n / 256 ? x + 256 : x, 15, -1.f, 0.1f, 20, &f);
        k4_block(x, 15, &f, (int)(b % 2), out, L);
        for (int r = 0; r < 4; r++)
            for (int l = 0; l < 32; l++) out[16 + 32 * r + l] = (uint8_t)(L[64 * r + l] | (L[64 * r + 32 + l] << 4));
    }
}

static void row_q5_k(const float *x, int64_t n, uint8_t *out) {
    uint8_t L[256];
    k4_fits f;
    for (int64_t b = 0; b < n / 256; b++, x += 256, out += 176) {
        if (b % 2 == 0) k4_search(x, b + 1 < n / 256 ? x + 256 : x, 31, -0.5f, 0.1f, 15, &f);
        k4_block(x, 31, &f, (int)(b % 2), out, L);
        uint8_t *qh = out + 16, *qs = out + 48;
        memset(qh, 0, 32);
        for (int r = 0; r < 4; r++)
            for (int l = 0; l < 32; l++) {
                int a = L[64 * r + l], c = L[64 * r + 32 + l];
                qh[l] |= (uint8_t)(((a >> 4) << (2 * r)) | ((c >> 4) << (2 * r + 1)));
                qs[32 * r + l] = (uint8_t)((a & 15) | ((c & 15) << 4));
            }
    }
}

/* --- Q6_K: symmetric sub-blocks of 16, weights x^2, 19 candidate scales around -32 / max ------- */
/* the 16 sub-blocks of 16 of a super-block: x ~ scale * (L - 32), weights x^2; the first fit from -32 / max, then 18
 * more around it, keeping the one with the largest sumlx^2 / suml2 */
static void fit_symmetric_v(const vf *X, vi *L, vf *scale_out) {
    const int nmax = 32;
    vf mx = splat(0.f), amax = splat(0.f), best = mx, scale = mx, W[16];
    for (int i = 0; i < 16; i++) {
        vf a = vabs(X[i]);
        vi m = a > amax;
        amax = sel(m, a, amax);
        mx = sel(m, X[i], mx);
        W[i] = X[i] * X[i];
    }
    vi zero = amax < splat(GROUP_EPS);
    mx = sel(zero, splat(1.f), mx);
    for (int s = 0;; s = s == 0 ? -9 : s == -1 ? 1 : s + 1) {
        float c = s == 0 ? (float)-nmax : -(nmax + 0.1f * s);
        vf is = splat(c) / mx, slx = splat(0.f), sl2 = slx;
        vi cand[16];
        for (int i = 0; i < 16; i++) {
            vi l = vrint_clamp(is * X[i], -nmax, nmax - 1);
            cand[i] = l + splati(nmax);
            vf lf = tof(l);
            slx += W[i] * X[i] * lf;
            sl2 += W[i] * lf * lf;
        }
        vi take;
        if (s == 0) {
            scale = sel(sl2 != splat(0.f), slx / sl2, splat(0.f));
            best = scale * slx;
            take = splati(-1);
        } else {
            take = (sl2 > splat(0.f)) & (slx * slx > best * sl2);
            vf ns = slx / sl2;
            scale = sel(take, ns, scale);
            best = sel(take, ns * slx, best);
        }
        for (int i = 0; i < 16; i++) L[i] = seli(take, cand[i], L[i]);
        if (s == 9) break;
    }
    for (int i = 0; i < 16; i++) L[i] = seli(zero, splati(0), L[i]);
    *scale_out = sel(zero, splat(0.f), scale);
}

static void row_q6_k(const float *x, int64_t n, uint8_t *out) {
    int8_t L[256];
    float scales[16];
    for (int64_t b = 0; b < n / 256; b++, x += 256, out += 210) {
        float max_scale = 0, max_abs = 0;
        vf X[16], vs;
        vi VL[16];
        for (int i = 0; i < 16; i++)
            for (int j = 0; j < 16; j++) X[i][j] = x[16 * j + i];
        fit_symmetric_v(X, VL, &vs);
        for (int j = 0; j < 16; j++) {
            scales[j] = vs[j];
            for (int i = 0; i < 16; i++) L[16 * j + i] = (int8_t)VL[i][j];
        }
        for (int j = 0; j < 16; j++) {
            float a = fabsf(scales[j]);
            if (a > max_abs) { max_abs = a; max_scale = scales[j]; }
        }
        if (max_abs < GROUP_EPS) {
            memset(out, 0, 210);
            continue;
        }
        uint8_t *ql = out, *qh = out + 128;
        int8_t *sc = (int8_t *)(out + 192);
        float is = -128.f / max_scale;
        uint16_t hd = to_half(1 / is);
        put16(out + 208, hd);
        float d0 = from_half(hd);
        for (int j = 0; j < 16; j++) {
            int v = rint_small(is * scales[j]);
            sc[j] = (int8_t)(v < 127 ? v : 127);
        }
        for (int j = 0; j < 16; j++) {
            float d = d0 * sc[j];
            if (d == 0.f) continue;
            for (int i = 0; i < 16; i++) L[16 * j + i] = (int8_t)(clampi(rint_small(x[16 * j + i] / d), -32, 31) + 32);
        }
        for (int h = 0; h < 2; h++) {
            const int8_t *Lh = L + 128 * h;
            for (int l = 0; l < 32; l++) {
                int a = Lh[l], c = Lh[l + 32], e = Lh[l + 64], g = Lh[l + 96];
                ql[64 * h + l] = (uint8_t)((a & 15) | ((e & 15) << 4));
                ql[64 * h + 32 + l] = (uint8_t)((c & 15) | ((g & 15) << 4));
                qh[32 * h + l] = (uint8_t)((a >> 4) | ((c >> 4) << 2) | ((e >> 4) << 4) | ((g >> 4) << 6));
            }
        }
    }
}

/* bytes of one row of n values, or 0 for a type this file does not quantize */
int64_t quantize_row_bytes(int type, int64_t n) {
    switch (type) {
    case T_Q8_0: return n % 32 ? 0 : n / 32 * 34;
    case T_Q4_K: return n % 256 ? 0 : n / 256 * 144;
    case T_Q5_K: return n % 256 ? 0 : n / 256 * 176;
    case T_Q6_K: return n % 256 ? 0 : n / 256 * 210;
    default: return 0;
    }
}

/* rows x n f32 (row-major) -> rows x quantize_row_bytes(type, n) bytes; 0 on success, -1 for an
 * unsupported type or a row length that is not whole blocks */
int quantize_rows(int type, const float *x, int64_t rows, int64_t n, uint8_t *out, int n_threads) {
    int64_t width = quantize_row_bytes(type, n);
    if (width == 0) return -1;
    void (*fn)(const float *, int64_t, uint8_t *) =
        type == T_Q8_0 ? row_q8_0 : type == T_Q4_K ? row_q4_k : type == T_Q5_K ? row_q5_k : row_q6_k;
    if (n_threads < 1) n_threads = 1;
#pragma omp parallel for schedule(dynamic, 16) num_threads(n_threads) if (n_threads > 1 && rows > 1)
    for (int64_t r = 0; r < rows; r++) fn(x + r * n, n, out + r * width);
    return 0;
}
