// Weights repacked for the CPU's integer dot products: Q4_0, Q4_1 and Q8_0 rows in groups of 8,
// so one 256-bit register holds 4 bytes of each of 8 rows and one dpbusd (or maddubs + madd)
// adds 4 products into each row's lane. 8 outputs come out side by side: no horizontal sums,
// one scale conversion per 8 rows, several bytes per instruction, so a decode step is bound by
// memory reads rather than by instructions. Same integer sums and f32 scaling as qmatmul.c.
//
// Group layout, per block of 32 (of k / 32): d[8] fp16, (Q4_1: m[8] fp16), then the quants in
// 4-byte chunks, chunk-major: Q4_x chunk c (0..3) = bytes 4c..4c+3 of each row's 16 nibble
// bytes (low nibbles: weights 4c..4c+3, high: 16+4c..), Q8_0 chunk c (0..7) = weights 4c..4c+3
// of each row with 128 added (unsigned), Q5_0 like Q8_0 with its 5-bit codes 0..31 as bytes (50%
// more bytes than its 22-byte blocks, but no bit-plane unpacking on every token). Missing rows
// of the last group are zero.
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q8_0 = 8 };

int packed_block_bytes(int type) {  // per group of 8 rows, per block of 32
    switch (type) {
    case T_Q4_0: return 16 + 128;
    case T_Q4_1: return 32 + 128;
    case T_Q5_0:
    case T_Q8_0: return 16 + 256;
    }
    return 0;
}

static int bytewise(int type) { return type == T_Q8_0 || type == T_Q5_0; }  // one byte per weight

int packed_supported(int type) {
#if defined(__AVX2__) && !(defined(__AVX512VNNI__) && defined(__AVX512VL__))
    if (type == T_Q8_0) return 0;  // maddubs would saturate on 0..255 x -127..127 pairs
#endif
    return packed_block_bytes(type) != 0;
}

// w: n rows of GGUF blocks (k / 32 per row) -> out: ceil(n / 8) groups. Returns 0 or -1.
int repack8(int type, const uint8_t *w, int64_t n, int64_t k, uint8_t *out) {
    const int gb = packed_block_bytes(type);
    if (!packed_supported(type) || k % 32) return -1;
    const int bb = type == T_Q4_0 ? 18 : type == T_Q4_1 ? 20 : type == T_Q5_0 ? 22 : 34;
    const int64_t nb = k / 32, groups = (n + 7) / 8;
    const int head = type == T_Q4_1 ? 32 : 16;
    if (n % 8) memset(out + (groups - 1) * nb * gb, 0, (size_t)(nb * gb));  // the last group's missing rows
    for (int64_t g = 0; g < groups; g++) {
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *o = out + (g * nb + b) * gb;
            for (int r = 0; r < 8 && g * 8 + r < n; r++) {
                const uint8_t *src = w + ((g * 8 + r) * nb + b) * bb;
                memcpy(o + 2 * r, src, 2);                                   // d
                if (type == T_Q4_1) memcpy(o + 16 + 2 * r, src + 2, 2);      // m
                const uint8_t *qs = src + (type == T_Q4_1 ? 4 : type == T_Q5_0 ? 6 : 2);
                if (type == T_Q5_0) {
                    uint32_t qh;
                    memcpy(&qh, src + 2, 4);
                    for (int e = 0; e < 32; e++)  // weight e: its nibble and its fifth bit
                        o[head + ((e / 4) * 8 + r) * 4 + e % 4] =
                            (uint8_t)((e < 16 ? qs[e] & 15 : qs[e - 16] >> 4) | (((qh >> e) & 1) << 4));
                } else {
                    const int chunks = type == T_Q8_0 ? 8 : 4;
                    for (int c = 0; c < chunks; c++) {
                        uint32_t v;
                        memcpy(&v, qs + 4 * c, 4);
                        if (type == T_Q8_0) v ^= 0x80808080u;  // signed -> unsigned codes
                        memcpy(o + head + (c * 8 + r) * 4, &v, 4);
                    }
                }
            }
        }
    }
    return 0;
}

#if defined(__AVX2__)
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
static inline __m256i dp(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(acc, u, s); }
#else
static inline __m256i dp(__m256i acc, __m256i u, __m256i s) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
#endif

static inline __m256i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

#endif


static float h2f_(uint16_t h) {  // fp16 -> f32 (portable)
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (e == 0) {
        if (man == 0) bits = sign;
        else {
            e = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; e--; }
            bits = sign | (e << 23) | ((man & 0x3ff) << 13);
        }
    } else if (e == 31) bits = sign | 0x7f800000 | (man << 13);
    else bits = sign | ((e + 127 - 15) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

__attribute__((unused)) static void packed_rows_scalar(int type, const uint8_t *w, int64_t n, int64_t k, int64_t g0,
        int64_t g1, int64_t m, const int8_t *xq, const float *xd, const float *xs, const int32_t *xi, float *y,
        int64_t ldy) {
    const int gb = packed_block_bytes(type), head = type == T_Q4_1 ? 32 : 16;
    const int64_t nb = k / 32;
    for (int64_t g = g0; g < g1; g++)
        for (int64_t r = 0; r < m; r++)
            for (int lane = 0; lane < 8 && g * 8 + lane < n; lane++) {
                float acc = 0.0f;
                for (int64_t b = 0; b < nb; b++) {
                    const uint8_t *blk = w + (g * nb + b) * gb, *q = blk + head;
                    const int8_t *xr = xq + r * k + b * 32;
                    int32_t s = 0;
                    if (bytewise(type)) {
                        for (int c = 0; c < 8; c++)
                            for (int j = 0; j < 4; j++) s += q[(c * 8 + lane) * 4 + j] * xr[4 * c + j];
                        s -= (type == T_Q8_0 ? 128 : 16) * xi[r * nb + b];
                    } else {
                        for (int c = 0; c < 4; c++)
                            for (int j = 0; j < 4; j++) {
                                const uint8_t v = q[(c * 8 + lane) * 4 + j];
                                s += (v & 15) * xr[4 * c + j] + (v >> 4) * xr[16 + 4 * c + j];
                            }
                        if (type == T_Q4_0) s -= 8 * xi[r * nb + b];
                    }
                    uint16_t dh, mh;
                    memcpy(&dh, blk + 2 * lane, 2);
                    acc += h2f_(dh) * xd[r * nb + b] * (float)s;
                    if (type == T_Q4_1) {
                        memcpy(&mh, blk + 16 + 2 * lane, 2);
                        acc += h2f_(mh) * xs[r * nb + b];
                    }
                }
                y[r * ldy + g * 8 + lane] = acc;
            }
}

// groups [g0, g1) of a packed weight against m activation rows (int8 codes xq (m, k), per-block
// scale xd, d * sum xs (fp16-rounded, as q8_1 keeps it), integer sums xi); y[r * ldy + row].
#if defined(__AVX2__)
// RN rows of 8 outputs (one group's) into y, the last group cut to the rows that exist
static inline __attribute__((always_inline)) void store_tile(const __m256 *acc, const int RN, int64_t n, int64_t g,
                                                             int64_t r0, float *y, int64_t ldy) {
    const int64_t rows = n - g * 8 < 8 ? n - g * 8 : 8;
    for (int r = 0; r < RN; r++) {
        float out[8];
        _mm256_storeu_ps(out, acc[r]);
        memcpy(y + (r0 + r) * ldy + g * 8, out, sizeof(float) * (size_t)rows);
    }
}

// One group of 8 weight rows against RN activation rows from r0; RN and type are constants at
// every call site, so the loops over rows unroll and the sums stay in registers.
static inline __attribute__((always_inline)) void tile(const int type, const int RN, const uint8_t *w, int64_t n,
        int64_t k, int64_t g, int64_t r0, const int8_t *xq, const float *xd, const float *xs, const int32_t *xi,
        float *y, int64_t ldy) {
    const int gb = packed_block_bytes(type), head = type == T_Q4_1 ? 32 : 16;
    const int off = type == T_Q8_0 ? 128 : type == T_Q5_0 ? 16 : type == T_Q4_0 ? 8 : 0;
    const int64_t nb = k / 32;
    const __m256i low = _mm256_set1_epi8(0x0f);
    __m256 acc[8];
    for (int r = 0; r < RN; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + (g * nb + b) * gb, *q = blk + head;
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk));
        __m256i isum[8];
        for (int r = 0; r < RN; r++) isum[r] = _mm256_setzero_si256();
        if (bytewise(type)) {
            for (int c = 0; c < 8; c++) {
                const __m256i wv = _mm256_loadu_si256((const __m256i *)(q + c * 32));
                for (int r = 0; r < RN; r++) isum[r] = dp(isum[r], wv, bcast4(xq + (r0 + r) * k + b * 32 + 4 * c));
            }
        } else {
            for (int c = 0; c < 4; c++) {
                const __m256i wv = _mm256_loadu_si256((const __m256i *)(q + c * 32));
                const __m256i lo = _mm256_and_si256(wv, low), hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), low);
                for (int r = 0; r < RN; r++) {
                    const int8_t *xr = xq + (r0 + r) * k + b * 32;
                    isum[r] = dp(dp(isum[r], lo, bcast4(xr + 4 * c)), hi, bcast4(xr + 16 + 4 * c));
                }
            }
        }
        const __m256 mm = type == T_Q4_1 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16))) : d;
        for (int r = 0; r < RN; r++) {
            const int64_t xb = (r0 + r) * nb + b;
            __m256i s = isum[r];
            if (off) s = _mm256_sub_epi32(s, _mm256_set1_epi32(off * xi[xb]));  // unsigned codes' offset
            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(xd[xb])), _mm256_cvtepi32_ps(s), acc[r]);
            if (type == T_Q4_1) acc[r] = _mm256_fmadd_ps(mm, _mm256_set1_ps(xs[xb]), acc[r]);
        }
    }
    store_tile(acc, RN, n, g, r0, y, ldy);
}

#define TILES(T)                                                                                \
    for (int64_t g = g0; g < g1; g++) {                                                         \
        int64_t r0 = 0;                                                                         \
        for (; r0 + 8 <= m; r0 += 8) tile(T, 8, w, n, k, g, r0, xq, xd, xs, xi, y, ldy);         \
        for (; r0 + 4 <= m; r0 += 4) tile(T, 4, w, n, k, g, r0, xq, xd, xs, xi, y, ldy);         \
        for (; r0 < m; r0++) tile(T, 1, w, n, k, g, r0, xq, xd, xs, xi, y, ldy);                 \
    }
#endif

// groups [g0, g1) of a packed weight against m activation rows (int8 codes xq (m, k), per-block
// scale xd, d * sum xs (fp16-rounded, as q8_1 keeps it), integer sums xi); y[r * ldy + row].
void packed_rows(int type, const uint8_t *w, int64_t n, int64_t k, int64_t g0, int64_t g1, int64_t m,
                 const int8_t *xq, const float *xd, const float *xs, const int32_t *xi, float *y, int64_t ldy) {
#if defined(__AVX2__)
    switch (type) {
    case T_Q4_0: TILES(T_Q4_0) break;
    case T_Q4_1: TILES(T_Q4_1) break;
    case T_Q5_0: TILES(T_Q5_0) break;
    case T_Q8_0: TILES(T_Q8_0) break;
    }
#else
    packed_rows_scalar(type, w, n, k, g0, g1, m, xq, xd, xs, xi, y, ldy);
#endif
}

// ---- K types in 8-row groups, against q8_K activations (codes, f32 scale per 256, sums per 16) ----
// Q4_K per block of 256: scale[8 sub-blocks][8 rows] f32 (d * sc), min[8][8] f32 (dmin * m), then
// nibble chunks: for each 64-group j, chunk c (0..7) = bytes 32j+4c..+3 of each row (low
// nibbles: sub-block 2j, high: 2j+1). Q6_K: scale[16][8] f32 (d * sc), then byte chunks c
// (0..63) = codes 4c..4c+3 (0..63, 32 above the value) of each row.
enum { T_Q4_K = 12, T_Q6_K = 14 };

int packed_k_block_bytes(int type) {
    return type == T_Q4_K ? 512 + 1024 : type == T_Q6_K ? 512 + 2048 : 0;
}

static void k_scale_min_(int j, const uint8_t *q, int *sc, int *m) {
    if (j < 4) { *sc = q[j] & 63; *m = q[j + 4] & 63; }
    else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

int repack8_k(int type, const uint8_t *w, int64_t n, int64_t k, uint8_t *out) {
    const int gb = packed_k_block_bytes(type);
    if (!gb || k % 256) return -1;
    const int bb = type == T_Q4_K ? 144 : 210;
    const int64_t nb = k / 256, groups = (n + 7) / 8;
    memset(out, 0, (size_t)(groups * nb * gb));
    for (int64_t g = 0; g < groups; g++)
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *o = out + (g * nb + b) * gb;
            float *sc = (float *)o;
            for (int r = 0; r < 8 && g * 8 + r < n; r++) {
                const uint8_t *src = w + ((g * 8 + r) * nb + b) * bb;
                uint16_t dh;
                if (type == T_Q4_K) {
                    uint16_t mh;
                    memcpy(&dh, src, 2);
                    memcpy(&mh, src + 2, 2);
                    const float d = h2f_(dh), dmin = h2f_(mh);
                    for (int j = 0; j < 8; j++) {
                        int s, m;
                        k_scale_min_(j, src + 4, &s, &m);
                        sc[j * 8 + r] = d * (float)s;
                        sc[64 + j * 8 + r] = dmin * (float)m;
                    }
                    for (int j = 0; j < 4; j++)
                        for (int c = 0; c < 8; c++)
                            memcpy(o + 512 + ((j * 8 + c) * 8 + r) * 4, src + 16 + 32 * j + 4 * c, 4);
                } else {
                    const uint8_t *ql = src, *qh = src + 128;
                    const int8_t *s8 = (const int8_t *)(src + 192);
                    memcpy(&dh, src + 208, 2);
                    for (int j = 0; j < 16; j++) sc[j * 8 + r] = h2f_(dh) * (float)s8[j];
                    uint8_t v[256];
                    for (int h = 0; h < 2; h++)
                        for (int l = 0; l < 32; l++) {
                            const uint8_t a = ql[64 * h + l], c2 = ql[64 * h + l + 32], q = qh[32 * h + l];
                            v[128 * h + l] = (uint8_t)((a & 15) | ((q & 3) << 4));
                            v[128 * h + l + 32] = (uint8_t)((c2 & 15) | (((q >> 2) & 3) << 4));
                            v[128 * h + l + 64] = (uint8_t)((a >> 4) | (((q >> 4) & 3) << 4));
                            v[128 * h + l + 96] = (uint8_t)((c2 >> 4) | (((q >> 6) & 3) << 4));
                        }
                    for (int c = 0; c < 64; c++) memcpy(o + 512 + (c * 8 + r) * 4, v + 4 * c, 4);
                }
            }
        }
    return 0;
}

#if defined(__AVX2__)
// One group of 8 K-weight rows against RN activation rows from r0 (RN, type constant per call site).
static inline __attribute__((always_inline)) void ktile(const int type, const int RN, const uint8_t *w, int64_t n,
        int64_t k, int64_t g, int64_t r0, const int8_t *kq, const float *kd, const int16_t *kbs, float *y, int64_t ldy) {
    const int gb = packed_k_block_bytes(type);
    const int64_t nb = k / 256;
    __m256 a[8];
    for (int r = 0; r < RN; r++) a[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + (g * nb + b) * gb, *q = blk + 512;
        const float *sc = (const float *)blk;
        if (type == T_Q4_K) {
            const __m256i low = _mm256_set1_epi8(0x0f);
            for (int j = 0; j < 4; j++) {
                __m256i lo_s[8], hi_s[8];
                for (int r = 0; r < RN; r++) lo_s[r] = hi_s[r] = _mm256_setzero_si256();
                for (int c = 0; c < 8; c++) {
                    const __m256i wv = _mm256_loadu_si256((const __m256i *)(q + (j * 8 + c) * 32));
                    const __m256i lo = _mm256_and_si256(wv, low), hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), low);
                    for (int r = 0; r < RN; r++) {
                        const int8_t *x = kq + (r0 + r) * k + b * 256 + 64 * j + 4 * c;
                        lo_s[r] = dp(lo_s[r], lo, bcast4(x));
                        hi_s[r] = dp(hi_s[r], hi, bcast4(x + 32));
                    }
                }
                const __m256 s0 = _mm256_loadu_ps(sc + (2 * j) * 8), s1 = _mm256_loadu_ps(sc + (2 * j + 1) * 8);
                const __m256 m0 = _mm256_loadu_ps(sc + 64 + (2 * j) * 8), m1 = _mm256_loadu_ps(sc + 64 + (2 * j + 1) * 8);
                for (int r = 0; r < RN; r++) {
                    const float xd = kd[(r0 + r) * nb + b];
                    const int16_t *bs = kbs + ((r0 + r) * nb + b) * 16;
                    const __m256 xv = _mm256_set1_ps(xd);
                    a[r] = _mm256_fmadd_ps(_mm256_mul_ps(s0, xv), _mm256_cvtepi32_ps(lo_s[r]), a[r]);
                    a[r] = _mm256_fmadd_ps(_mm256_mul_ps(s1, xv), _mm256_cvtepi32_ps(hi_s[r]), a[r]);
                    a[r] = _mm256_fnmadd_ps(m0, _mm256_set1_ps(xd * (float)(bs[4 * j] + bs[4 * j + 1])), a[r]);
                    a[r] = _mm256_fnmadd_ps(m1, _mm256_set1_ps(xd * (float)(bs[4 * j + 2] + bs[4 * j + 3])), a[r]);
                }
            }
        } else {
            for (int s_ = 0; s_ < 16; s_++) {
                __m256i is[8];
                for (int r = 0; r < RN; r++) is[r] = _mm256_setzero_si256();
                for (int c = 0; c < 4; c++) {
                    const __m256i wv = _mm256_loadu_si256((const __m256i *)(q + (s_ * 4 + c) * 32));
                    for (int r = 0; r < RN; r++) is[r] = dp(is[r], wv, bcast4(kq + (r0 + r) * k + b * 256 + 16 * s_ + 4 * c));
                }
                const __m256 sv = _mm256_loadu_ps(sc + s_ * 8);
                for (int r = 0; r < RN; r++) {
                    const int16_t *bs = kbs + ((r0 + r) * nb + b) * 16;
                    const __m256i t = _mm256_sub_epi32(is[r], _mm256_set1_epi32(32 * bs[s_]));
                    a[r] = _mm256_fmadd_ps(_mm256_mul_ps(sv, _mm256_set1_ps(kd[(r0 + r) * nb + b])), _mm256_cvtepi32_ps(t), a[r]);
                }
            }
        }
    }
    store_tile(a, RN, n, g, r0, y, ldy);
}

#define KTILES(T)                                                                               \
    for (int64_t g = g0; g < g1; g++) {                                                         \
        int64_t r0 = 0;                                                                         \
        for (; r0 + 4 <= m; r0 += 4) ktile(T, 4, w, n, k, g, r0, kq, kd, kbs, y, ldy);           \
        for (; r0 < m; r0++) ktile(T, 1, w, n, k, g, r0, kq, kd, kbs, y, ldy);                   \
    }
#endif

// groups [g0, g1) of a packed K weight against m rows of q8_K activations; y[r * ldy + row].
void packed_k_rows(int type, const uint8_t *w, int64_t n, int64_t k, int64_t g0, int64_t g1, int64_t m,
                   const int8_t *kq, const float *kd, const int16_t *kbs, float *y, int64_t ldy) {
#if defined(__AVX2__)
    if (type == T_Q4_K) { KTILES(T_Q4_K) } else { KTILES(T_Q6_K) }
#else
    const int gb = packed_k_block_bytes(type);
    const int64_t nb = k / 256;
    for (int64_t g = g0; g < g1; g++)
        for (int64_t r = 0; r < m; r++) {
            float acc[8] = {0};
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *blk = w + (g * nb + b) * gb, *q = blk + 512;
                const float *sc = (const float *)blk;
                const int8_t *x = kq + r * k + b * 256;
                const int16_t *bs = kbs + (r * nb + b) * 16;
                const float xd = kd[r * nb + b];
                for (int lane = 0; lane < 8; lane++) {
                    if (type == T_Q4_K) {
                        for (int j = 0; j < 4; j++) {
                            int lo = 0, hi = 0;
                            for (int c = 0; c < 8; c++)
                                for (int e = 0; e < 4; e++) {
                                    const uint8_t v = q[((j * 8 + c) * 8 + lane) * 4 + e];
                                    lo += (v & 15) * x[64 * j + 4 * c + e];
                                    hi += (v >> 4) * x[64 * j + 32 + 4 * c + e];
                                }
                            acc[lane] += sc[(2 * j) * 8 + lane] * xd * (float)lo + sc[(2 * j + 1) * 8 + lane] * xd * (float)hi;
                            acc[lane] -= sc[64 + (2 * j) * 8 + lane] * (xd * (float)(bs[4 * j] + bs[4 * j + 1]));
                            acc[lane] -= sc[64 + (2 * j + 1) * 8 + lane] * (xd * (float)(bs[4 * j + 2] + bs[4 * j + 3]));
                        }
                    } else {
                        for (int s_ = 0; s_ < 16; s_++) {
                            int is = 0;
                            for (int c = 0; c < 4; c++)
                                for (int e = 0; e < 4; e++) is += q[((s_ * 4 + c) * 8 + lane) * 4 + e] * x[16 * s_ + 4 * c + e];
                            acc[lane] += sc[s_ * 8 + lane] * xd * (float)(is - 32 * bs[s_]);
                        }
                    }
                }
            }
            const int64_t rows = n - g * 8 < 8 ? n - g * 8 : 8;
            memcpy(y + r * ldy + g * 8, acc, sizeof(float) * (size_t)rows);
        }
#endif
}
