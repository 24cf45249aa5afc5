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
    memset(out, 0, (size_t)(groups * nb * gb));
    for (int64_t g = 0; g < groups; g++) {
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *o = out + (g * nb + b) * gb;
            for (int r = 0; r < 8 && g * 8 + r < n; r++) {
                const uint8_t *src = w + ((g * 8 + r) * nb + b) * bb;
                memcpy(o + 2 * r, src, 2);                                   // d
                if (type == T_Q4_1) memcpy(o + 16 + 2 * r, src + 2, 2);      // m
                const uint8_t *qs = src + (type == T_Q4_1 ? 4 : type == T_Q5_0 ? 6 : 2);
                uint32_t qh = 0;
                if (type == T_Q5_0) memcpy(&qh, src + 2, 4);
                const int chunks = bytewise(type) ? 8 : 4;
                for (int c = 0; c < chunks; c++)
                    for (int j = 0; j < 4; j++) {
                        const int e = 4 * c + j;  // weight index in the block
                        uint8_t v;
                        if (type == T_Q8_0) v = (uint8_t)(qs[e] ^ 0x80);
                        else if (type == T_Q5_0)
                            v = (uint8_t)(((e < 16 ? qs[e] & 15 : qs[e - 16] >> 4)) | (((qh >> e) & 1) << 4));
                        else v = qs[e];
                        o[head + (c * 8 + r) * 4 + j] = v;
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

enum { MR = 4 };  // activation rows per pass: each weight chunk is loaded once per MR rows
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
void packed_rows(int type, const uint8_t *w, int64_t n, int64_t k, int64_t g0, int64_t g1, int64_t m,
                 const int8_t *xq, const float *xd, const float *xs, const int32_t *xi, float *y, int64_t ldy) {
#if defined(__AVX2__)
    const int gb = packed_block_bytes(type), head = type == T_Q4_1 ? 32 : 16;
    const int64_t nb = k / 32;
    const __m256i low = _mm256_set1_epi8(0x0f);
    for (int64_t g = g0; g < g1; g++) {
        for (int64_t r0 = 0; r0 < m; r0 += MR) {
            const int rn = m - r0 < MR ? (int)(m - r0) : MR;
            __m256 acc[MR];
            for (int r = 0; r < MR; r++) acc[r] = _mm256_setzero_ps();
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *blk = w + (g * nb + b) * gb;
                const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk));
                __m256i isum[MR];
                for (int r = 0; r < MR; r++) isum[r] = _mm256_setzero_si256();
                const uint8_t *q = blk + head;
                if (bytewise(type)) {
                    for (int c = 0; c < 8; c++) {
                        const __m256i wv = _mm256_loadu_si256((const __m256i *)(q + c * 32));
                        for (int r = 0; r < rn; r++)
                            isum[r] = dp(isum[r], wv, bcast4(xq + (r0 + r) * k + b * 32 + 4 * c));
                    }
                } else {
                    for (int c = 0; c < 4; c++) {
                        const __m256i wv = _mm256_loadu_si256((const __m256i *)(q + c * 32));
                        const __m256i lo = _mm256_and_si256(wv, low), hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), low);
                        for (int r = 0; r < rn; r++) {
                            const int8_t *xr = xq + (r0 + r) * k + b * 32;
                            isum[r] = dp(dp(isum[r], lo, bcast4(xr + 4 * c)), hi, bcast4(xr + 16 + 4 * c));
                        }
                    }
                }
                for (int r = 0; r < rn; r++) {
                    const int64_t xb = (r0 + r) * nb + b;
                    // unsigned codes: subtract the offset times the activations' integer sum
                    const int off = type == T_Q8_0 ? 128 : type == T_Q5_0 ? 16 : type == T_Q4_0 ? 8 : 0;
                    __m256i s = isum[r];
                    if (off) s = _mm256_sub_epi32(s, _mm256_set1_epi32(off * xi[xb]));
                    const __m256 sd = _mm256_mul_ps(d, _mm256_set1_ps(xd[xb]));
                    acc[r] = _mm256_fmadd_ps(sd, _mm256_cvtepi32_ps(s), acc[r]);
                    if (type == T_Q4_1) {
                        const __m256 mm = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16)));
                        acc[r] = _mm256_fmadd_ps(mm, _mm256_set1_ps(xs[xb]), acc[r]);
                    }
                }
            }
            for (int r = 0; r < rn; r++) {
                float out[8];
                _mm256_storeu_ps(out, acc[r]);
                const int64_t rows = n - g * 8 < 8 ? n - g * 8 : 8;
                memcpy(y + (r0 + r) * ldy + g * 8, out, sizeof(float) * (size_t)rows);
            }
        }
    }
#else
    packed_rows_scalar(type, w, n, k, g0, g1, m, xq, xd, xs, xi, y, ldy);
#endif
}
