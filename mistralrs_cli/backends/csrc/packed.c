// Weights repacked for the CPU's integer dot products: Q4_0, Q4_1, Q5_0 and Q8_0 (and Q4_K /
// Q6_K below) in groups of 8 rows, so one 256-bit register holds 4 bytes of each of 8 rows and
// one dpbusd (or maddubs + madd) adds 4 products into each row's lane. Outputs come out side by
// side: no horizontal sums, one scale conversion per 8 rows, several bytes per instruction.
// Same integer sums and f32 scaling as qmatmul.c.
//
// Group layout, per block of 32 (of k / 32): d[8] fp16, (Q4_1: m[8] fp16), then the quants in
// 4-byte chunks, chunk-major: Q4_x chunk c (0..3) = bytes 4c..4c+3 of each row's 16 nibble
// bytes (low nibbles: weights 4c..4c+3, high: 16+4c..), Q8_0 chunk c (0..7) = weights 4c..4c+3
// of each row with 128 added (unsigned). Q5_0 keeps its GGUF bytes per weight (22 per 32): its
// low four bits as Q4_0's nibble chunks, then its fifth bits as masks over the chunks' bytes, one
// per chunk and nibble (entry 2c + e: chunk c's low (e = 0) or high (e = 1) nibbles, bit 4r + j
// for row r's byte j), 4 bytes each (8 in a pair: bit 32h + 4r + j for half h). A kernel adds
// 16 to the masked codes (AVX-512: one masked byte add per chunk and nibble) and then multiplies
// codes 0..31 as before. One byte per weight would read 55% more on every decode token (Gemma-3:
// 67.4 against 43.6 MB). Missing rows of the last group are zero.
//
// Pairs: groups 2p and 2p+1 are stored interleaved, block by block, so that one 512-bit register
// holds one chunk of 16 rows: a pair's block is, for Q4_1, d[16] (the two groups' d[8] in turn),
// m[16], then each chunk as 32 bytes of group 2p and 32 of group 2p+1; for Q4_0 / Q5_0 / Q8_0
// group 2p's d[8], the chunks, group 2p+1's d[8] (see view8); the K types likewise (every scale
// row and every chunk 16 rows wide). A pair takes the bytes of its two groups (2 * nb *
// group-block bytes) and the last group of an odd count stays alone in the 8-row layout. With
// AVX-512 VNNI one dpbusd then does 64 products and the kernels below keep a tile of 16 weight
// rows x up to 8 activation rows in zmm registers (half the instructions of the 256-bit tile
// for the same products); the 256-bit and scalar paths read either half of a pair with the chunk
// stride doubled. The work unit of packed_rows / packed_k_rows is a pair (or the lone group).
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512F__)
#define ZMM 1
#else
#define ZMM 0
#endif

enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q8_0 = 8 };
enum { T_Q5_0B = 0x1006 };  // internal: a Q5_0 pair expanded to byte codes 0..31 (q5_rows_expanded)

int packed_block_bytes(int type) {  // per group of 8 rows, per block of 32
    switch (type) {
    case T_Q4_0: return 16 + 128;
    case T_Q4_1: return 32 + 128;
    case T_Q5_0: return 16 + 128 + 32;
    case T_Q8_0: return 16 + 256;
    case T_Q5_0B: return 16 + 256;
    }
    return 0;
}

static int bytewise(int type) { return type == T_Q8_0 || type == T_Q5_0B; }  // one byte per weight
static int fifth(int type) { return type == T_Q5_0; }     // nibbles and a mask of fifth bits

int packed_supported(int type) { return type != T_Q5_0B && packed_block_bytes(type) != 0; }

// Where group g's block b lives: the start of its (pair's or own) block, with *h its half of
// the pair (0 alone) and *s 2 for a pair, 1 alone: every offset inside a block scales by s.
static inline const uint8_t *gblock(const uint8_t *w, int64_t groups, int64_t nb, int gb, int64_t g, int64_t b,
                                    int *h, int *s) {
    if ((g | 1) < groups) {
        *h = (int)(g & 1);
        *s = 2;
        return w + ((g & ~(int64_t)1) * nb + 2 * b) * gb;
    }
    *h = 0;
    *s = 1;
    return w + (g * nb + b) * gb;
}

// One group's view of its block b: d[8] (fp16), (Q4_1) m[8], its quants' chunk 0, the chunk
// stride. In a pair of Q4_0 / Q5_0 / Q8_0 groups the second group's d[8] sits after the chunks,
// not next to the first's: the chunks then start 16 bytes into the block (measured here: a
// stream of 64-byte loads at 0 / 32 bytes past line starts, block by block, read ~30% slower
// from memory than at 16 / 48). Q4_1's pair block is d[16], m[16], chunks. Q5_0's masks follow
// its chunks (hb: this group's entry 0, entry i at hb + i * cs / 8).
typedef struct {
    uint8_t *d, *m, *q, *hb;
    int cs;
} gview;

static inline gview view8(int type, const uint8_t *w, int64_t groups, int64_t nb, int64_t g, int64_t b) {
    const int gb = packed_block_bytes(type);
    int h, s;
    uint8_t *blk = (uint8_t *)gblock(w, groups, nb, gb, g, b, &h, &s);
    gview v;
    v.cs = 32 * s;
    if (type == T_Q4_1) {
        v.d = blk + 16 * h;
        v.m = blk + 16 * s + 16 * h;
        v.q = blk + 32 * s + 32 * h;
    } else {
        v.d = blk + (h ? 16 + 2 * (gb - 16) : 0);
        v.m = v.d;
        v.q = blk + 16 + 32 * h;
    }
    v.hb = blk + 16 + 128 * s + 4 * h;  // Q5_0 only
    return v;
}

// Q5_0: the fifth bit of row `lane`'s byte j (0..3) of chunk c, nibble e
static inline int fifth_bit(const gview *gv, int c, int e, int lane, int j) {
    const int i = 4 * lane + j;
    return (gv->hb[(2 * c + e) * (gv->cs / 8) + i / 8] >> (i % 8)) & 1;
}

// w: n rows of GGUF blocks (k / 32 per row) -> out: ceil(n / 8) groups. Returns 0 or -1.
int repack8(int type, const uint8_t *w, int64_t n, int64_t k, uint8_t *out) {
    const int gb = packed_block_bytes(type);
    if (!packed_supported(type) || k % 32) return -1;
    const int bb = type == T_Q4_0 ? 18 : type == T_Q4_1 ? 20 : type == T_Q5_0 ? 22 : 34;
    const int64_t nb = k / 32, groups = (n + 7) / 8;
    if (n % 8) {  // the last group's missing rows (and, if it is half of a pair, the pair's)
        const int64_t g0 = (groups - 1) & ~(int64_t)1;
        memset(out + g0 * nb * gb, 0, (size_t)((groups - g0) * nb * gb));
    }
    for (int64_t g = 0; g < groups; g++) {
        for (int64_t b = 0; b < nb; b++) {
            const gview gv = view8(type, out, groups, nb, g, b);
            const int s = gv.cs / 32;
            uint32_t qh[8] = {0};  // Q5_0: the rows' fifth bits, written as whole mask words below
            for (int r = 0; r < 8 && g * 8 + r < n; r++) {
                const uint8_t *src = w + ((g * 8 + r) * nb + b) * bb;
                memcpy(gv.d + 2 * r, src, 2);                          // d
                if (type == T_Q4_1) memcpy(gv.m + 2 * r, src + 2, 2);  // m
                uint8_t *q = gv.q + 4 * r;  // chunk c at q + 32 * s * c
                const uint8_t *qs = src + (type == T_Q4_1 ? 4 : type == T_Q5_0 ? 6 : 2);
                if (type == T_Q5_0) {
                    memcpy(&qh[r], src + 2, 4);
                    for (int c = 0; c < 4; c++) memcpy(q + c * 32 * s, qs + 4 * c, 4);  // Q4_0's nibble chunks
                } else {
                    const int chunks = type == T_Q8_0 ? 8 : 4;
                    for (int c = 0; c < chunks; c++) {
                        uint32_t v;
                        memcpy(&v, qs + 4 * c, 4);
                        if (type == T_Q8_0) v ^= 0x80808080u;  // signed -> unsigned codes
                        memcpy(q + c * 32 * s, &v, 4);
                    }
                }
            }
            if (type == T_Q5_0)
                for (int i = 0; i < 8; i++) {  // entry 2c + e: weights 16e + 4c.. of row r at bits 4r..
                    const int c = i / 2, e = i % 2;
                    uint32_t word = 0;
                    for (int r = 0; r < 8; r++) word |= ((qh[r] >> (16 * e + 4 * c)) & 15u) << (4 * r);
                    memcpy(gv.hb + i * (gv.cs / 8), &word, 4);
                }
        }
    }
    return 0;
}

#if defined(__AVX2__)
// dp16 adds the products of unsigned u and signed s into acc; wide() gives acc's sums of 4 per
// 32-bit lane. With VNNI acc is int32 (dpbusd). Without it acc holds the maddubs pair sums in
// int16 lanes and wide() does the one madd: a run of dp16 calls between two wide() must stay
// within int16 (each call site says why it does), and then the integer sums are the same as one madd per
// maddubs, with about half the multiply-port instructions.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define VNNI256 1
static inline __m256i dp16(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(acc, u, s); }
static inline __m256i wide(__m256i acc) { return acc; }
#else
#define VNNI256 0
static inline __m256i dp16(__m256i acc, __m256i u, __m256i s) { return _mm256_add_epi16(acc, _mm256_maddubs_epi16(u, s)); }
static inline __m256i wide(__m256i acc) { return _mm256_madd_epi16(acc, _mm256_set1_epi16(1)); }
#endif

static inline __m256i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

// Q5_0: 16 added to the bytes of v (codes 0..15) whose bit is set in the 32-bit mask at p
static inline __m256i add_fifth(__m256i v, const uint8_t *p) {
    uint32_t mk;
    memcpy(&mk, p, 4);
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    return _mm256_mask_add_epi8(v, (__mmask32)mk, v, _mm256_set1_epi8(16));
#else  // byte i takes mask byte i / 8 (each 128-bit lane: 2 of them), then its own bit i % 8
    const __m256i bits = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i by = _mm256_shuffle_epi8(_mm256_set1_epi32((int)mk),
                                           _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL,
                                                              0x0303030303030303LL));
    const __m256i on = _mm256_cmpeq_epi8(_mm256_and_si256(by, bits), bits);
    return _mm256_add_epi8(v, _mm256_and_si256(on, _mm256_set1_epi8(16)));
#endif
}
#endif
#if ZMM
static inline __m512i zbcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

static inline __m512i zadd_fifth(__m512i v, const uint8_t *p) {  // add_fifth, 64 bytes
    uint64_t mk;
    memcpy(&mk, p, 8);
    return _mm512_mask_add_epi8(v, _cvtu64_mask64(mk), v, _mm512_set1_epi8(16));
}

// chunk c of a pair's nibble block q (Q4_0 / Q4_1 / Q5_0) as byte codes: *lo its low nibbles
// (weights 4c..4c+3), *hi its high ones (16 + 4c..), Q5_0's fifth bits added (its masks follow
// the 4 chunks)
static inline void znibbles(int fifth_bits, const uint8_t *q, int c, __m512i *lo, __m512i *hi) {
    const __m512i low = _mm512_set1_epi8(0x0f), wv = _mm512_loadu_si512((const void *)(q + c * 64));
    *lo = _mm512_and_si512(wv, low);
    *hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), low);
    if (fifth_bits) {
        *lo = zadd_fifth(*lo, q + 256 + 16 * c);
        *hi = zadd_fifth(*hi, q + 256 + 16 * c + 8);
    }
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

static inline int64_t first_group(int64_t u) { return 2 * u; }
static inline int64_t end_group(int64_t u, int64_t groups) { return 2 * u + 2 < groups ? 2 * u + 2 : groups; }

__attribute__((unused)) static void packed_rows_scalar(int type, const uint8_t *w, int64_t n, int64_t k, int64_t u0,
        int64_t u1, int64_t m, const int8_t *xq, const float *xd, const float *xs, const int32_t *xi, float *y,
        int64_t ldy) {
    const int64_t nb = k / 32, groups = (n + 7) / 8;
    for (int64_t g = first_group(u0); g < end_group(u1 - 1, groups); g++)
        for (int64_t r = 0; r < m; r++)
            for (int lane = 0; lane < 8 && g * 8 + lane < n; lane++) {
                float acc = 0.0f;
                for (int64_t b = 0; b < nb; b++) {
                    const gview gv = view8(type, w, groups, nb, g, b);
                    const int s = gv.cs / 32;
                    const uint8_t *q = gv.q + 4 * lane;  // chunk c at q + 32 * s * c
                    const int8_t *xr = xq + r * k + b * 32;
                    int32_t sum = 0;
                    if (bytewise(type)) {
                        for (int c = 0; c < 8; c++)
                            for (int j = 0; j < 4; j++) sum += q[c * 32 * s + j] * xr[4 * c + j];
                        sum -= (type == T_Q8_0 ? 128 : 16) * xi[r * nb + b];
                    } else {
                        for (int c = 0; c < 4; c++)
                            for (int j = 0; j < 4; j++) {
                                const uint8_t v = q[c * 32 * s + j];
                                const int f0 = fifth(type) ? 16 * fifth_bit(&gv, c, 0, lane, j) : 0;
                                const int f1 = fifth(type) ? 16 * fifth_bit(&gv, c, 1, lane, j) : 0;
                                sum += ((v & 15) + f0) * xr[4 * c + j] + ((v >> 4) + f1) * xr[16 + 4 * c + j];
                            }
                        if (type == T_Q4_0) sum -= 8 * xi[r * nb + b];
                        if (type == T_Q5_0) sum -= 16 * xi[r * nb + b];
                    }
                    uint16_t dh, mh;
                    memcpy(&dh, gv.d + 2 * lane, 2);
                    acc += h2f_(dh) * xd[r * nb + b] * (float)sum;
                    if (type == T_Q4_1) {
                        memcpy(&mh, gv.m + 2 * lane, 2);
                        acc += h2f_(mh) * xs[r * nb + b];
                    }
                }
                y[r * ldy + g * 8 + lane] = acc;
            }
}

#if defined(__AVX2__)
// RN rows of 8 outputs (one group's) into y, the last group cut to the rows that exist
static inline __attribute__((always_inline)) void store_tile(const __m256 *acc, const int RN, int64_t n, int64_t g,
                                                             int64_t r0, float *y, int64_t ldy) {
    const int64_t rows = n - g * 8 < 8 ? n - g * 8 : 8;
    for (int r = 0; r < RN; r++) {
        if (rows == 8) { _mm256_storeu_ps(y + (r0 + r) * ldy + g * 8, acc[r]); continue; }
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
    const int off = type == T_Q8_0 ? 128 : type == T_Q5_0 ? 16 : type == T_Q4_0 ? 8 : 0;
    const int64_t nb = k / 32, groups = (n + 7) / 8;
    const __m256i low = _mm256_set1_epi8(0x0f);
    __m256 acc[8];
    for (int r = 0; r < RN; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const gview gv = view8(type, w, groups, nb, g, b);
        const uint8_t *q = gv.q;
        const int cs = gv.cs;  // chunk stride
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)gv.d));
        __m256i isum[8], s16[8];
        for (int r = 0; r < RN; r++) isum[r] = s16[r] = _mm256_setzero_si256();
        if (type == T_Q8_0 && !VNNI256) {
            // codes 0..255 would saturate maddubs' pair sums: their two nibbles are multiplied
            // apart (pair sums below 2 * 15 * 127, 8 chunks fit in int16) and joined in the
            // madd, code = 16 * high + low
            for (int c = 0; c < 8; c++) {
                const __m256i wv = _mm256_loadu_si256((const __m256i *)(q + c * cs));
                const __m256i lo = _mm256_and_si256(wv, low), hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), low);
                for (int r = 0; r < RN; r++) {
                    const __m256i xv = bcast4(xq + (r0 + r) * k + b * 32 + 4 * c);
                    s16[r] = dp16(s16[r], lo, xv);
                    isum[r] = dp16(isum[r], hi, xv);  // int16 sums of the high nibbles until the madd
                }
            }
            for (int r = 0; r < RN; r++)
                isum[r] = _mm256_add_epi32(_mm256_madd_epi16(isum[r], _mm256_set1_epi16(16)), wide(s16[r]));
        } else if (bytewise(type)) {  // Q8_0 with VNNI: dpbusd's int32 sums
            for (int c = 0; c < 8; c++) {
                const __m256i wv = _mm256_loadu_si256((const __m256i *)(q + c * cs));
                for (int r = 0; r < RN; r++) s16[r] = dp16(s16[r], wv, bcast4(xq + (r0 + r) * k + b * 32 + 4 * c));
            }
            for (int r = 0; r < RN; r++) isum[r] = s16[r];
        } else {  // nibbles: 8 pair sums below 2 * 15 * 127 fit in int16, the whole block (Q5_0's
                  // codes < 32: 4 of them, two chunks)
            for (int c = 0; c < 4; c++) {
                const __m256i wv = _mm256_loadu_si256((const __m256i *)(q + c * cs));
                __m256i lo = _mm256_and_si256(wv, low), hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), low);
                if (fifth(type)) {
                    lo = add_fifth(lo, gv.hb + 2 * c * (cs / 8));
                    hi = add_fifth(hi, gv.hb + (2 * c + 1) * (cs / 8));
                }
                for (int r = 0; r < RN; r++) {
                    const int8_t *xr = xq + (r0 + r) * k + b * 32;
                    s16[r] = dp16(dp16(s16[r], lo, bcast4(xr + 4 * c)), hi, bcast4(xr + 16 + 4 * c));
                }
                if (fifth(type) && !VNNI256 && c == 1)
                    for (int r = 0; r < RN; r++) {
                        isum[r] = wide(s16[r]);
                        s16[r] = _mm256_setzero_si256();
                    }
            }
            for (int r = 0; r < RN; r++)
                isum[r] = fifth(type) && !VNNI256 ? _mm256_add_epi32(isum[r], wide(s16[r])) : wide(s16[r]);
        }
        const __m256 mm =
            type == T_Q4_1 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)gv.m)) : d;
        for (int r = 0; r < RN; r++) {
            const int64_t xb = (r0 + r) * nb + b;
            __m256i sm = isum[r];
            if (off) sm = _mm256_sub_epi32(sm, _mm256_set1_epi32(off * xi[xb]));  // unsigned codes' offset
            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(xd[xb])), _mm256_cvtepi32_ps(sm), acc[r]);
            if (type == T_Q4_1) acc[r] = _mm256_fmadd_ps(mm, _mm256_set1_ps(xs[xb]), acc[r]);
        }
    }
    store_tile(acc, RN, n, g, r0, y, ldy);
}

#define TILES8(T, G)                                                                            \
    {                                                                                           \
        int64_t r0 = 0;                                                                         \
        for (; r0 + 8 <= m; r0 += 8) tile(T, 8, w, n, k, G, r0, xq, xd, xs, xi, y, ldy);         \
        for (; r0 + 4 <= m; r0 += 4) tile(T, 4, w, n, k, G, r0, xq, xd, xs, xi, y, ldy);         \
        for (; r0 + 2 <= m; r0 += 2) tile(T, 2, w, n, k, G, r0, xq, xd, xs, xi, y, ldy);         \
        for (; r0 < m; r0++) tile(T, 1, w, n, k, G, r0, xq, xd, xs, xi, y, ldy);                 \
    }
#endif

#if ZMM
// 16 outputs (a pair's) of RN activation rows into y, cut to the rows that exist
static inline __attribute__((always_inline)) void zstore(const __m512 *acc, const int RN, int64_t n, int64_t g,
                                                         int64_t r0, float *y, int64_t ldy) {
    const int64_t rows = n - g * 8 < 16 ? n - g * 8 : 16;
    const __mmask16 mask = (__mmask16)((1u << rows) - 1);
    for (int r = 0; r < RN; r++) _mm512_mask_storeu_ps(y + (r0 + r) * ldy + g * 8, mask, acc[r]);
}

// One pair (16 weight rows, groups g and g + 1) against RN activation rows from r0: each chunk
// is one 512-bit load and one dpbusd per activation row. The sums start at minus the unsigned
// codes' offset (the same integer as subtracting it after) and every lane takes the 256-bit
// tile's f32 steps in the same order, so the outputs are bit for bit the same. While a block runs,
// the same block of the pair ZPF pairs on is prefetched: one thread's stream keeps more misses in
// flight (SmolLM2 Q4_1 decode step, one thread, CPU time on 2 shared cores: 12.7 -> 9.4 ms). To L2
// (T1) two pairs on, rather than to L1 one pair on, and in kztile too (it had none): Gemma-3 decode,
// the CLI at both revisions interleaved, 64.4 / 67.1 / 64.9 / 67.3 -> 76.9 / 75.0 / 72.2 / 73.5
// tok/s (its Q8_0 output matrix alone, bench_qmm, 2 threads: 5-6% faster); SmolLM2 unchanged.
#ifndef ZPFH
#define ZPFH _MM_HINT_T1
#endif
#ifndef ZPF
#define ZPF 2
#endif
static inline __attribute__((always_inline)) void ztile(const int type, const int RN, const uint8_t *w, int64_t n,
        int64_t k, int64_t g, int64_t r0, const int8_t *xq, const float *xd, const float *xs, const int32_t *xi,
        float *y, int64_t ldy) {
    const int gb = packed_block_bytes(type);
    const int off = type == T_Q8_0 ? 128 : type == T_Q5_0 || type == T_Q5_0B ? 16 : type == T_Q4_0 ? 8 : 0;
    const int64_t nb = k / 32;
    const uint8_t *pw = w + g * nb * gb;  // the pair's blocks, 2 * gb each
    const int8_t *xr[8];
    for (int r = 0; r < RN; r++) xr[r] = xq + (r0 + r) * k;
    __m512 acc[8];
    for (int r = 0; r < RN; r++) acc[r] = _mm512_setzero_ps();
    const int pf = type != T_Q5_0B && g + 2 * ZPF + 1 < (n + 7) / 8;  // a whole pair ZPF pairs on to prefetch
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = pw + b * 2 * gb, *q = blk + (type == T_Q4_1 ? 64 : 16);
        if (pf)
            for (int l = 0; l < 2 * gb; l += 64) _mm_prefetch((const char *)(blk + ZPF * 2 * nb * gb + l), ZPFH);
        __m512i isum[8];
        for (int r = 0; r < RN; r++)
            isum[r] = off ? _mm512_set1_epi32(-off * xi[(r0 + r) * nb + b]) : _mm512_setzero_si512();
        if (bytewise(type)) {
            for (int c = 0; c < 8; c++) {
                const __m512i wv = _mm512_loadu_si512((const void *)(q + c * 64));
                for (int r = 0; r < RN; r++) isum[r] = _mm512_dpbusd_epi32(isum[r], wv, zbcast4(xr[r] + b * 32 + 4 * c));
            }
        } else {
            for (int c = 0; c < 4; c++) {
                __m512i lo, hi;
                znibbles(fifth(type), q, c, &lo, &hi);
                for (int r = 0; r < RN; r++) {
                    isum[r] = _mm512_dpbusd_epi32(isum[r], lo, zbcast4(xr[r] + b * 32 + 4 * c));
                    isum[r] = _mm512_dpbusd_epi32(isum[r], hi, zbcast4(xr[r] + b * 32 + 16 + 4 * c));
                }
            }
        }
        const __m512 d = _mm512_cvtph_ps(type == T_Q4_1 ? _mm256_loadu_si256((const __m256i *)blk)
                                                         : _mm256_loadu2_m128i((const __m128i *)(blk + 2 * gb - 16),
                                                                               (const __m128i *)blk));
        const __m512 mm = type == T_Q4_1 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 32))) : d;
        for (int r = 0; r < RN; r++) {
            const int64_t xb = (r0 + r) * nb + b;
            acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(xd[xb])), _mm512_cvtepi32_ps(isum[r]), acc[r]);
            if (type == T_Q4_1) acc[r] = _mm512_fmadd_ps(mm, _mm512_set1_ps(xs[xb]), acc[r]);
        }
    }
    zstore(acc, RN, n, g, r0, y, ldy);
}

#define ZTILES(T, G)                                                                            \
    {                                                                                           \
        int64_t r0 = 0;                                                                         \
        for (; r0 + 8 <= m; r0 += 8) ztile(T, 8, w, n, k, G, r0, xq, xd, xs, xi, y, ldy);        \
        for (; r0 + 4 <= m; r0 += 4) ztile(T, 4, w, n, k, G, r0, xq, xd, xs, xi, y, ldy);        \
        for (; r0 + 2 <= m; r0 += 2) ztile(T, 2, w, n, k, G, r0, xq, xd, xs, xi, y, ldy);        \
        for (; r0 < m; r0++) ztile(T, 1, w, n, k, G, r0, xq, xd, xs, xi, y, ldy);                \
    }
#endif

#if ZMM
// Q5_0 against more rows than one tile takes (a prompt): each pair is expanded once per call to
// byte codes (Q8_0's pair layout, codes 0..31, T_Q5_0B) in a scratch buffer and its row tiles
// read that, instead of every tile adding the fifth bits again (Gemma-3's gate+up, 202 rows,
// one thread: 10% slower than byte codes in memory without it). Same integers, same outputs.
static void zexpand_q5(const uint8_t *w, int64_t nb, int64_t g, uint8_t *out) {
    const int gb = packed_block_bytes(T_Q5_0), ob = 2 * packed_block_bytes(T_Q5_0B);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + (g * nb + 2 * b) * gb, *q = blk + 16;
        uint8_t *o = out + b * ob;
        memcpy(o, blk, 16);                           // group g's d[8]
        memcpy(o + ob - 16, blk + 2 * gb - 16, 16);  // group g + 1's
        for (int c = 0; c < 4; c++) {
            __m512i lo, hi;
            znibbles(1, q, c, &lo, &hi);
            _mm512_storeu_si512((void *)(o + 16 + c * 64), lo);        // weights 4c..4c+3
            _mm512_storeu_si512((void *)(o + 16 + (c + 4) * 64), hi);  // 16 + 4c..
        }
    }
}

static void q5_rows_expanded(const uint8_t *w, int64_t n, int64_t k, int64_t u0, int64_t u1, int64_t m,
                             const int8_t *xq, const float *xd, const float *xs, const int32_t *xi, float *y,
                             int64_t ldy) {
    const int64_t nb = k / 32, groups = (n + 7) / 8;
    uint8_t *buf = malloc((size_t)(nb * 2 * packed_block_bytes(T_Q5_0B)));
    for (int64_t u = u0; u < u1; u++) {
        const int64_t g = 2 * u;
        if (g + 1 >= groups) {
            TILES8(T_Q5_0, g)
        } else if (!buf) {
            ZTILES(T_Q5_0, g)
        } else {
            zexpand_q5(w, nb, g, buf);
            // the buffer as the only pair of a weight of the rows from 8g on, written from column 8g
            const int64_t n_left = n - 8 * g;
            float *y_left = y + 8 * g;
            {
                const uint8_t *w = buf;
                const int64_t n = n_left;  // the pair cuts to the rows that exist
                float *y = y_left;
                ZTILES(T_Q5_0B, 0)
            }
        }
    }
    free(buf);
}
#endif

#if defined(__AVX2__)
#if ZMM
#define UNIT(T)                                                                                 \
    for (int64_t u = u0; u < u1; u++) {                                                         \
        const int64_t g = 2 * u;                                                                \
        if (g + 1 < groups) ZTILES(T, g) else TILES8(T, g)                                      \
    }
#else
#define UNIT(T)                                                                                 \
    for (int64_t u = u0; u < u1; u++)                                                           \
        for (int64_t g = 2 * u; g < end_group(u, groups); g++) TILES8(T, g)
#endif
#endif

// units [u0, u1) (unit u: groups 2u and 2u + 1, or the lone last group) of a packed weight
// against m activation rows (int8 codes xq (m, k), per-block scale xd, d * sum xs (fp16-rounded,
// as q8_1 keeps it), integer sums xi); y[r * ldy + row].
void packed_rows(int type, const uint8_t *w, int64_t n, int64_t k, int64_t u0, int64_t u1, int64_t m,
                 const int8_t *xq, const float *xd, const float *xs, const int32_t *xi, float *y, int64_t ldy) {
#if defined(__AVX2__)
    const int64_t groups = (n + 7) / 8;
    switch (type) {
    case T_Q4_0: UNIT(T_Q4_0) break;
    case T_Q4_1: UNIT(T_Q4_1) break;
    case T_Q5_0:
#if ZMM
        if (m > 16) {
            q5_rows_expanded(w, n, k, u0, u1, m, xq, xd, xs, xi, y, ldy);
            break;
        }
#endif
        UNIT(T_Q5_0) break;
    case T_Q8_0: UNIT(T_Q8_0) break;
    }
#else
    packed_rows_scalar(type, w, n, k, u0, u1, m, xq, xd, xs, xi, y, ldy);
#endif
}

// ---- packed weights against 16-bit activations (builds without VNNI) ----
// Without dpbusd a byte code (0..255) times an int8 does not fit maddubs' int16 pair sums, and
// precise's finer rounding would need two 8-bit parts (twice the products, twice the f32 steps,
// a second rounding pass and a sum of the two outputs). Here the weight codes are widened to
// int16 instead (vpmovzxbw; nibbles masked or shifted out of the widened bytes) and multiplied
// by int16 activation codes (vpmaddwd: exact int32 pair sums, |code| <= 32767 times <= 255, 16
// of them within int32). qmatmul.c rounds a row once to 16 bits with a scale per 16 (H = 2
// halves per block of 32, each its own integer sum and f32 step: finer than the two 8-bit
// parts, whose second part adapts to each block's largest remainder). Q8_0 also takes its fast
// rows here (H = 1: the 8-bit codes widened, the 8-bit tiles' integers and f32 steps, so the
// same bits); the other types (packed_wide_precise) only their precise rows: their 8-bit tiles
// are cheaper for fast. The K types' tiles are after packed_k_rows.
// With VNNI the byte tiles above stay (one dpbusd per chunk); tests build -DWIDE_Q8=0 to compare.
#ifndef WIDE_Q8
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define WIDE_Q8 0
#else
#define WIDE_Q8 1
#endif
#endif

enum { T_Q4_K = 12, T_Q6_K = 14 };

int packed_wide(int type) { return WIDE_Q8 && type == T_Q8_0; }  // fast and precise rows

int packed_wide_precise(int type) {  // precise rows only
    return WIDE_Q8 && (type == T_Q8_0 || type == T_Q5_0 || type == T_Q4_0 || type == T_Q4_1 || type == T_Q4_K ||
                       type == T_Q6_K);
}

static int wide_off(int type) {  // the unsigned codes' offset
    return type == T_Q8_0 ? 128 : type == T_Q6_K ? 32 : type == T_Q5_0 ? 16 : type == T_Q4_0 ? 8 : 0;
}

#if defined(__AVX2__) && WIDE_Q8
static inline __m256i bcast8(const int16_t *p) {  // 4 int16 codes in every 64-bit lane
    int64_t v;
    memcpy(&v, p, 8);
    return _mm256_set1_epi64x(v);
}

// NC chunks (chunk c at q + c * cs) of 8 rows' byte codes, nibble nib (-1: whole bytes; 2: both
// nibbles, the low ones against x0 into s0, the high against x1 into s1), against RN rows' 4 *
// NC activation codes (row r's at x0 + r * k; chunk c's 4 at + 4 * c). The unpacks widen each
// 128-bit lane's bytes: rows 0, 1 | 4, 5 and rows 2, 3 | 6, 7 (4 int16 each); madd gives 2
// int32 lanes per row, one hadd of the two sums lane i the row i.
static inline __attribute__((always_inline)) void wsum16(const int RN, const int NC, const int nib0, const uint8_t *q,
        int cs, const int16_t *x0, const int16_t *x1, int64_t k, __m256i *s0, __m256i *s1, const uint8_t *hb) {
    // Q5_0 (hb its masks, nib0 0 or 1): nibble nib0 of each byte and its fifth bit as byte codes
    const int nib = hb ? -1 : nib0;
    const int two = nib == 2;
    __m256i a[4], b[4], c2[4], d2[4];
    for (int r = 0; r < RN; r++) a[r] = b[r] = c2[r] = d2[r] = _mm256_setzero_si256();
    for (int c = 0; c < NC; c++) {
        __m256i wv = _mm256_loadu_si256((const __m256i *)(q + c * cs));
        if (hb) {
            const __m256i l4 = _mm256_set1_epi8(0x0f);
            wv = _mm256_and_si256(nib0 ? _mm256_srli_epi16(wv, 4) : wv, l4);
            wv = add_fifth(wv, hb + (2 * c + nib0) * (cs / 8));
        }
        const __m256i z = _mm256_setzero_si256();
        // an opaque value: the compiler would otherwise share one pass's widened chunks with the
        // next pass over the same chunks (the other nibble) and spill them all to the stack
        __asm__("" : "+x"(wv));
        __m256i wl = _mm256_unpacklo_epi8(wv, z), wh = _mm256_unpackhi_epi8(wv, z), hl = wl, hh = wh;
        if (nib == 1 || two) {
            hl = _mm256_srli_epi16(wl, 4);
            hh = _mm256_srli_epi16(wh, 4);
        }
        if (nib == 0 || two) {
            wl = _mm256_and_si256(wl, _mm256_set1_epi16(15));
            wh = _mm256_and_si256(wh, _mm256_set1_epi16(15));
        }
        if (nib == 1) wl = hl, wh = hh;
        for (int r = 0; r < RN; r++) {
            const __m256i xv = bcast8(x0 + r * k + 4 * c);
            a[r] = _mm256_add_epi32(a[r], _mm256_madd_epi16(wl, xv));
            b[r] = _mm256_add_epi32(b[r], _mm256_madd_epi16(wh, xv));
            __asm__("" : "+x"(a[r]), "+x"(b[r]));  // keeps the sums in registers (no reassociated adds)
            if (two) {
                const __m256i xh = bcast8(x1 + r * k + 4 * c);
                c2[r] = _mm256_add_epi32(c2[r], _mm256_madd_epi16(hl, xh));
                d2[r] = _mm256_add_epi32(d2[r], _mm256_madd_epi16(hh, xh));
                __asm__("" : "+x"(c2[r]), "+x"(d2[r]));
            }
        }
    }
    for (int r = 0; r < RN; r++) {
        s0[r] = _mm256_hadd_epi32(a[r], b[r]);
        if (two) s1[r] = _mm256_hadd_epi32(c2[r], d2[r]);
    }
}

// one f32 step per row: acc[r] += d * xd * (s[r] - off * xo) (+ m * xm for Q4_1, xm = xd * xo as
// the rounding computed it: one load, not a conversion, a product and a broadcast), xb row r0's
// index into xd / xo / xm, rs the row stride of those
static inline __attribute__((always_inline)) void wstep(const int type, const int RN, __m256 *acc, __m256 d, __m256 mm,
        const __m256i *s, const float *xd, const int32_t *xo, const float *xm, int64_t xb, int64_t rs) {
    const int off = wide_off(type);
    for (int r = 0; r < RN; r++, xb += rs) {
        const __m256i sm = off ? _mm256_sub_epi32(s[r], _mm256_set1_epi32(off * xo[xb])) : s[r];
        acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(xd[xb])), _mm256_cvtepi32_ps(sm), acc[r]);
        if (type == T_Q4_1) acc[r] = _mm256_fmadd_ps(mm, _mm256_broadcast_ss(xm + xb), acc[r]);
    }
}

// One group of 8 rows (Q4_0, Q4_1, Q5_0, Q8_0) against RN 16-bit activation rows from r0. Per
// lane the f32 steps are tile()'s (H = 1), one such step per half (H = 2). In a block a half is
// chunks 4e..4e+3 of the byte types, nibble e of chunks 0..3 of the nibble ones (low: weights
// 0-15, high: 16-31; for up to 2 rows both nibbles from one pass over the chunks); H = 1 is for
// Q8_0 (fast). RN <= 4: 2 * RN (4 * RN) integer sums, RN outputs, d and the weights fill the 16 ymm.
static inline __attribute__((always_inline)) void wblock(const int type, const int RN, const int H, const gview *gv,
        int64_t k, int64_t nb, int64_t b, int64_t r0, const int16_t *xw, const float *xd, const int32_t *xo,
        const float *xm, __m256 *acc) {
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)gv->d));
    const __m256 mm = type == T_Q4_1 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)gv->m)) : d;
    const int16_t *x = xw + r0 * k + b * 32;
    __m256i s[4], s1[4];
    if (!bytewise(type) && !fifth(type) && RN <= 2) {
        wsum16(RN, 4, 2, gv->q, gv->cs, x, x + 16, k, s, s1, 0);
        wstep(type, RN, acc, d, mm, s, xd, xo, xm, (r0 * nb + b) * 2, nb * 2);
        wstep(type, RN, acc, d, mm, s1, xd, xo, xm, (r0 * nb + b) * 2 + 1, nb * 2);
        return;
    }
    for (int e = 0; e < H; e++) {  // the block's halves (H = 2), or the whole block
        if (bytewise(type)) wsum16(RN, 8 / H, -1, gv->q + 4 * e * gv->cs, gv->cs, x + 16 * e, x, k, s, s1, 0);
        else wsum16(RN, 4, e, gv->q, gv->cs, x + 16 * e, x, k, s, s1, fifth(type) ? gv->hb : 0);
        wstep(type, RN, acc, d, mm, s, xd, xo, xm, (r0 * nb + b) * H + e, nb * H);
    }
}

static inline __attribute__((always_inline)) void wtile(const int type, const int RN, const int H, const uint8_t *w,
        int64_t n, int64_t k, int64_t g, int64_t r0, const int16_t *xw, const float *xd, const int32_t *xo,
        const float *xm, float *y, int64_t ldy) {
    const int64_t nb = k / 32, groups = (n + 7) / 8;
    __m256 acc[4];
    for (int r = 0; r < RN; r++) acc[r] = _mm256_setzero_ps();
    gview gv = view8(type, w, groups, nb, g, 0);
    const int64_t step = (int64_t)gv.cs / 32 * packed_block_bytes(type);  // block b + 1 is this far on
    for (int64_t b = 0; b < nb; b++, gv.d += step, gv.m += step, gv.q += step, gv.hb += step)
        wblock(type, RN, H, &gv, k, nb, b, r0, xw, xd, xo, xm, acc);
    store_tile(acc, RN, n, g, r0, y, ldy);
}

// One activation row (a decode step) of a byte type against both groups of a pair (g even,
// g + 1 < groups): each output's steps are wtile's, but the two groups' sums are independent
// chains the CPU overlaps, and the pair's blocks are read in one pass
static inline __attribute__((always_inline)) void wtile_pair(const int type, const int H, const uint8_t *w,
        int64_t n, int64_t k, int64_t g, const int16_t *xw, const float *xd, const int32_t *xo, const float *xm,
        float *y) {
    const int64_t nb = k / 32, groups = (n + 7) / 8;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    gview v0 = view8(type, w, groups, nb, g, 0), v1 = view8(type, w, groups, nb, g + 1, 0);
    const int64_t step = (int64_t)v0.cs / 32 * packed_block_bytes(type);
    for (int64_t b = 0; b < nb; b++) {
        wblock(type, 1, H, &v0, k, nb, b, 0, xw, xd, xo, xm, &a0);
        wblock(type, 1, H, &v1, k, nb, b, 0, xw, xd, xo, xm, &a1);
        v0.d += step, v0.m += step, v0.q += step, v0.hb += step, v1.d += step, v1.m += step, v1.q += step;
        v1.hb += step;
    }
    store_tile(&a0, 1, n, g, 0, y, 0);
    store_tile(&a1, 1, n, g + 1, 0, y, 0);
}

#define WTILES(T, H, G)                                                                         \
    {                                                                                           \
        int64_t r0 = 0;                                                                         \
        if (bytewise(T) && m == 1 && !((G) & 1) && (G) + 1 < g_end) {                           \
            wtile_pair(T, H, w, n, k, G, xw, xd, xo, xm, y);                                    \
            G++;                                                                                \
            continue;                                                                           \
        }                                                                                       \
        for (; r0 + 4 <= m; r0 += 4) wtile(T, 4, H, w, n, k, G, r0, xw, xd, xo, xm, y, ldy);         \
        for (; r0 + 2 <= m; r0 += 2) wtile(T, 2, H, w, n, k, G, r0, xw, xd, xo, xm, y, ldy);         \
        for (; r0 < m; r0++) wtile(T, 1, H, w, n, k, G, r0, xw, xd, xo, xm, y, ldy);                 \
    }
#endif

// weight row `lane` of a group's block (view gv): its code of value j (0..31), unsigned
static inline int wcode(int type, const gview *gv, int lane, int j) {
    if (bytewise(type)) return gv->q[(j / 4) * gv->cs + 4 * lane + j % 4];
    const uint8_t v = gv->q[(j % 16 / 4) * gv->cs + 4 * lane + j % 4];
    const int f = fifth(type) ? 16 * fifth_bit(gv, j % 16 / 4, j / 16, lane, j % 4) : 0;
    return (j < 16 ? v & 15 : v >> 4) + f;
}

static inline float fma_(float a, float b, float c) {
#if defined(__FMA__)  // the vector tiles' fmadd (the 8-bit scalar loop's product and add, contracted)
    return fmaf(a, b, c);
#else
    return a * b + c;
#endif
}

void packed_k_rows_w(int type, const uint8_t *w, int64_t n, int64_t k, int64_t u0, int64_t u1, int64_t m,
                     const int16_t *xw, const float *xd, const int32_t *xo, float *y, int64_t ldy);

// units [u0, u1) of a packed weight (packed_wide, or packed_wide_precise for h = 2) against m
// rows of 16-bit activations: codes xw (m, k), per 32 / h values (h = 1 or 2) an f32 scale xd
// and the sum of the codes xo; y[r * ldy + row].
void packed_rows_w(int type, const uint8_t *w, int64_t n, int64_t k, int64_t u0, int64_t u1, int64_t m,
                   const int16_t *xw, const float *xd, const int32_t *xo, int h, float *y, int64_t ldy) {
    const int64_t groups = (n + 7) / 8;
    if (type == T_Q4_K || type == T_Q6_K) {
        packed_k_rows_w(type, w, n, k, u0, u1, m, xw, xd, xo, y, ldy);
        return;
    }
#if defined(__AVX2__) && WIDE_Q8
    const float *xm = xd + 2 * m * (k / 32);  // precise: the products xd * xo after the scales
    const int64_t g_end = end_group(u1 - 1, groups);
    for (int64_t g = first_group(u0); g < g_end; g++) {
        if (h == 1) WTILES(T_Q8_0, 1, g)
        else if (type == T_Q8_0) WTILES(T_Q8_0, 2, g)
        else if (type == T_Q5_0) WTILES(T_Q5_0, 2, g)
        else if (type == T_Q4_0) WTILES(T_Q4_0, 2, g)
        else WTILES(T_Q4_1, 2, g)
    }
#else  // the same integers and, per output, the same f32 steps
    const int64_t nb = k / 32;
    const int off = wide_off(type);
    for (int64_t g = first_group(u0); g < end_group(u1 - 1, groups); g++)
        for (int64_t r = 0; r < m; r++)
            for (int lane = 0; lane < 8 && g * 8 + lane < n; lane++) {
                float acc = 0.0f;
                for (int64_t b = 0; b < nb; b++)
                    for (int e = 0; e < h; e++) {
                        const gview gv = view8(type, w, groups, nb, g, b);
                        const int16_t *xr = xw + r * k + b * 32;
                        const int64_t xb = (r * nb + b) * h + e;
                        int32_t sum = 0;
                        for (int j = e * 32 / h; j < (e + 1) * 32 / h; j++) sum += wcode(type, &gv, lane, j) * xr[j];
                        uint16_t dh;
                        memcpy(&dh, gv.d + 2 * lane, 2);
                        acc = fma_(h2f_(dh) * xd[xb], (float)(sum - off * xo[xb]), acc);
                        if (type == T_Q4_1) {
                            memcpy(&dh, gv.m + 2 * lane, 2);
                            acc = fma_(h2f_(dh), xd[xb] * (float)xo[xb], acc);
                        }
                    }
                y[r * ldy + g * 8 + lane] = acc;
            }
#endif
}

// ---- K types in 8-row groups, against q8_K activations (codes, f32 scale per 256, sums per 16) ----
// Q4_K per block of 256: scale[8 sub-blocks][8 rows] f32 (d * sc), min[8][8] f32 (dmin * m), then
// nibble chunks: for each 64-group j, chunk c (0..7) = bytes 32j+4c..+3 of each row (low
// nibbles: sub-block 2j, high: 2j+1). Q6_K: scale[16][8] f32 (d * sc), then byte chunks c
// (0..63) = codes 4c..4c+3 (0..63, 32 above the value) of each row. In a pair every row of
// scales and every chunk is 16 rows wide (the groups' 8 in turn): offsets scale by s.
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
            int h, s;
            uint8_t *o = (uint8_t *)gblock(out, groups, nb, gb, g, b, &h, &s);
            float *sc = (float *)o + 8 * h;          // sub-block j, row r: sc[j * 8 * s + r]
            uint8_t *qo = o + 512 * s + 32 * h;      // chunk c, row r: qo[c * 32 * s + 4 * r]
            for (int r = 0; r < 8 && g * 8 + r < n; r++) {
                const uint8_t *src = w + ((g * 8 + r) * nb + b) * bb;
                uint16_t dh;
                if (type == T_Q4_K) {
                    uint16_t mh;
                    memcpy(&dh, src, 2);
                    memcpy(&mh, src + 2, 2);
                    const float d = h2f_(dh), dmin = h2f_(mh);
                    for (int j = 0; j < 8; j++) {
                        int sv, mv;
                        k_scale_min_(j, src + 4, &sv, &mv);
                        sc[j * 8 * s + r] = d * (float)sv;
                        sc[64 * s + j * 8 * s + r] = dmin * (float)mv;
                    }
                    for (int j = 0; j < 4; j++)
                        for (int c = 0; c < 8; c++)
                            memcpy(qo + (j * 8 + c) * 32 * s + 4 * r, src + 16 + 32 * j + 4 * c, 4);
                } else {
                    const uint8_t *ql = src, *qh = src + 128;
                    const int8_t *s8 = (const int8_t *)(src + 192);
                    memcpy(&dh, src + 208, 2);
                    for (int j = 0; j < 16; j++) sc[j * 8 * s + r] = h2f_(dh) * (float)s8[j];
                    uint8_t v[256];
                    for (int hh = 0; hh < 2; hh++)
                        for (int l = 0; l < 32; l++) {
                            const uint8_t a = ql[64 * hh + l], c2 = ql[64 * hh + l + 32], q = qh[32 * hh + l];
                            v[128 * hh + l] = (uint8_t)((a & 15) | ((q & 3) << 4));
                            v[128 * hh + l + 32] = (uint8_t)((c2 & 15) | (((q >> 2) & 3) << 4));
                            v[128 * hh + l + 64] = (uint8_t)((a >> 4) | (((q >> 4) & 3) << 4));
                            v[128 * hh + l + 96] = (uint8_t)((c2 >> 4) | (((q >> 6) & 3) << 4));
                        }
                    for (int c = 0; c < 64; c++) memcpy(qo + c * 32 * s + 4 * r, v + 4 * c, 4);
                }
            }
        }
    return 0;
}

#if defined(__AVX2__)
// One group of 8 K-weight rows against RN activation rows from r0 (RN, type constant per call site).
static inline __attribute__((always_inline)) void ktile(const int type, const int RN, const uint8_t *w, int64_t n,
        int64_t k, int64_t g, int64_t r0, const int8_t *kq, const float *kd, const int16_t *kbs, const float *kms,
        float *y, int64_t ldy) {
    const int gb = packed_k_block_bytes(type);
    const int64_t nb = k / 256, groups = (n + 7) / 8;
    __m256 a[8];
    for (int r = 0; r < RN; r++) a[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        int h, s;
        const uint8_t *blk = gblock(w, groups, nb, gb, g, b, &h, &s), *q = blk + 512 * s + 32 * h;
        const float *sc = (const float *)blk + 8 * h;
        const int cs = 32 * s, ss = 8 * s;  // chunk stride (bytes), scale row stride (floats)
        if (type == T_Q4_K) {
            const __m256i low = _mm256_set1_epi8(0x0f);
            for (int j = 0; j < 4; j++) {
                __m256i lo_s[8], hi_s[8];
                for (int r = 0; r < RN; r++) lo_s[r] = hi_s[r] = _mm256_setzero_si256();
                for (int c = 0; c < 8; c++) {
                    const __m256i wv = _mm256_loadu_si256((const __m256i *)(q + (j * 8 + c) * cs));
                    const __m256i lo = _mm256_and_si256(wv, low), hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), low);
                    for (int r = 0; r < RN; r++) {
                        const int8_t *x = kq + (r0 + r) * k + b * 256 + 64 * j + 4 * c;
                        lo_s[r] = dp16(lo_s[r], lo, bcast4(x));  // 8 nibble pair sums: within int16
                        hi_s[r] = dp16(hi_s[r], hi, bcast4(x + 32));
                    }
                }
                const __m256 s0 = _mm256_loadu_ps(sc + (2 * j) * ss), s1 = _mm256_loadu_ps(sc + (2 * j + 1) * ss);
                const __m256 m0 = _mm256_loadu_ps(sc + 8 * ss + (2 * j) * ss),
                             m1 = _mm256_loadu_ps(sc + 8 * ss + (2 * j + 1) * ss);
                for (int r = 0; r < RN; r++) {
                    const float *ms = kms + ((r0 + r) * nb + b) * 8;  // xd * (bsums of each 32)
                    const __m256 xv = _mm256_set1_ps(kd[(r0 + r) * nb + b]);
                    a[r] = _mm256_fmadd_ps(_mm256_mul_ps(s0, xv), _mm256_cvtepi32_ps(wide(lo_s[r])), a[r]);
                    a[r] = _mm256_fmadd_ps(_mm256_mul_ps(s1, xv), _mm256_cvtepi32_ps(wide(hi_s[r])), a[r]);
                    a[r] = _mm256_fnmadd_ps(m0, _mm256_set1_ps(ms[2 * j]), a[r]);
                    a[r] = _mm256_fnmadd_ps(m1, _mm256_set1_ps(ms[2 * j + 1]), a[r]);
                }
            }
        } else {
            for (int s_ = 0; s_ < 16; s_++) {
                __m256i is[8];
                for (int r = 0; r < RN; r++) is[r] = _mm256_setzero_si256();
                // codes < 64: two pair sums (< 2 * 63 * 127 each) fit in int16
                for (int c2 = 0; c2 < 4; c2 += 2) {
                    const __m256i w0 = _mm256_loadu_si256((const __m256i *)(q + (s_ * 4 + c2) * cs));
                    const __m256i w1 = _mm256_loadu_si256((const __m256i *)(q + (s_ * 4 + c2 + 1) * cs));
                    for (int r = 0; r < RN; r++) {
                        const int8_t *x = kq + (r0 + r) * k + b * 256 + 16 * s_ + 4 * c2;
                        is[r] = _mm256_add_epi32(is[r], wide(dp16(dp16(_mm256_setzero_si256(), w0, bcast4(x)), w1, bcast4(x + 4))));
                    }
                }
                const __m256 sv = _mm256_loadu_ps(sc + s_ * ss);
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

#define KTILES8(T, G)                                                                           \
    {                                                                                           \
        int64_t r0 = 0;                                                                         \
        for (; r0 + 4 <= m; r0 += 4) ktile(T, 4, w, n, k, G, r0, kq, kd, kbs, kms, y, ldy);           \
        for (; r0 + 2 <= m; r0 += 2) ktile(T, 2, w, n, k, G, r0, kq, kd, kbs, kms, y, ldy);           \
        for (; r0 < m; r0++) ktile(T, 1, w, n, k, G, r0, kq, kd, kbs, kms, y, ldy);                   \
    }
#endif

#if ZMM
// One pair of K groups (16 weight rows) against RN activation rows, in zmm registers; the same
// integers and, lane by lane, the same f32 steps as ktile.
static inline __attribute__((always_inline)) void kztile(const int type, const int RN, const uint8_t *w, int64_t n,
        int64_t k, int64_t g, int64_t r0, const int8_t *kq, const float *kd, const int16_t *kbs, const float *kms,
        float *y, int64_t ldy) {
    const int gb = packed_k_block_bytes(type);
    const int64_t nb = k / 256;
    const uint8_t *pw = w + g * nb * gb;
    __m512 a[8];
    for (int r = 0; r < RN; r++) a[r] = _mm512_setzero_ps();
    const int pf = g + 2 * ZPF + 1 < (n + 7) / 8;  // as ztile: the same block ZPF pairs on, to L2
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = pw + b * 2 * gb, *q = blk + 1024;
        if (pf)
            for (int l = 0; l < 2 * gb; l += 64) _mm_prefetch((const char *)(blk + ZPF * 2 * nb * gb + l), ZPFH);
        const float *sc = (const float *)blk;  // rows of 16
        const int8_t *xr[8];
        const int16_t *bs[8];
        for (int r = 0; r < RN; r++) {
            xr[r] = kq + (r0 + r) * k + b * 256;
            bs[r] = kbs + ((r0 + r) * nb + b) * 16;
        }
        if (type == T_Q4_K) {
            const __m512i low = _mm512_set1_epi8(0x0f);
            for (int j = 0; j < 4; j++) {
                __m512i lo_s[8], hi_s[8];
                for (int r = 0; r < RN; r++) lo_s[r] = hi_s[r] = _mm512_setzero_si512();
                for (int c = 0; c < 8; c++) {
                    const __m512i wv = _mm512_loadu_si512((const void *)(q + (j * 8 + c) * 64));
                    const __m512i lo = _mm512_and_si512(wv, low), hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), low);
                    for (int r = 0; r < RN; r++) {
                        lo_s[r] = _mm512_dpbusd_epi32(lo_s[r], lo, zbcast4(xr[r] + 64 * j + 4 * c));
                        hi_s[r] = _mm512_dpbusd_epi32(hi_s[r], hi, zbcast4(xr[r] + 64 * j + 32 + 4 * c));
                    }
                }
                const __m512 s0 = _mm512_loadu_ps(sc + (2 * j) * 16), s1 = _mm512_loadu_ps(sc + (2 * j + 1) * 16);
                const __m512 m0 = _mm512_loadu_ps(sc + 128 + (2 * j) * 16), m1 = _mm512_loadu_ps(sc + 128 + (2 * j + 1) * 16);
                for (int r = 0; r < RN; r++) {
                    const float *ms = kms + ((r0 + r) * nb + b) * 8;  // xd * (bsums of each 32)
                    const __m512 xv = _mm512_set1_ps(kd[(r0 + r) * nb + b]);
                    a[r] = _mm512_fmadd_ps(_mm512_mul_ps(s0, xv), _mm512_cvtepi32_ps(lo_s[r]), a[r]);
                    a[r] = _mm512_fmadd_ps(_mm512_mul_ps(s1, xv), _mm512_cvtepi32_ps(hi_s[r]), a[r]);
                    a[r] = _mm512_fnmadd_ps(m0, _mm512_set1_ps(ms[2 * j]), a[r]);
                    a[r] = _mm512_fnmadd_ps(m1, _mm512_set1_ps(ms[2 * j + 1]), a[r]);
                }
            }
        } else {
            for (int s_ = 0; s_ < 16; s_++) {
                __m512i is[8];
                for (int r = 0; r < RN; r++) is[r] = _mm512_set1_epi32(-32 * bs[r][s_]);
                for (int c = 0; c < 4; c++) {
                    const __m512i wv = _mm512_loadu_si512((const void *)(q + (s_ * 4 + c) * 64));
                    for (int r = 0; r < RN; r++) is[r] = _mm512_dpbusd_epi32(is[r], wv, zbcast4(xr[r] + 16 * s_ + 4 * c));
                }
                const __m512 sv = _mm512_loadu_ps(sc + s_ * 16);
                for (int r = 0; r < RN; r++)
                    a[r] = _mm512_fmadd_ps(_mm512_mul_ps(sv, _mm512_set1_ps(kd[(r0 + r) * nb + b])), _mm512_cvtepi32_ps(is[r]), a[r]);
            }
        }
    }
    zstore(a, RN, n, g, r0, y, ldy);
}

#define KZTILES(T, G)                                                                           \
    {                                                                                           \
        int64_t r0 = 0;                                                                         \
        for (; r0 + 8 <= m; r0 += 8) kztile(T, 8, w, n, k, G, r0, kq, kd, kbs, kms, y, ldy);          \
        for (; r0 + 4 <= m; r0 += 4) kztile(T, 4, w, n, k, G, r0, kq, kd, kbs, kms, y, ldy);          \
        for (; r0 + 2 <= m; r0 += 2) kztile(T, 2, w, n, k, G, r0, kq, kd, kbs, kms, y, ldy);          \
        for (; r0 < m; r0++) kztile(T, 1, w, n, k, G, r0, kq, kd, kbs, kms, y, ldy);                  \
    }
#define KUNIT(T)                                                                                \
    for (int64_t u = u0; u < u1; u++) {                                                         \
        const int64_t g = 2 * u;                                                                \
        if (g + 1 < groups) KZTILES(T, g) else KTILES8(T, g)                                    \
    }
#elif defined(__AVX2__)
#define KUNIT(T)                                                                                \
    for (int64_t u = u0; u < u1; u++)                                                           \
        for (int64_t g = 2 * u; g < end_group(u, groups); g++) KTILES8(T, g)
#endif

// units [u0, u1) (pairs of groups, see packed_rows) of a packed K weight against m rows of
// q8_K activations (kms: d * the sums of each 32 codes, qmatmul.c's q8k_mins); y[r * ldy + row].
void packed_k_rows(int type, const uint8_t *w, int64_t n, int64_t k, int64_t u0, int64_t u1, int64_t m,
                   const int8_t *kq, const float *kd, const int16_t *kbs, const float *kms, float *y, int64_t ldy) {
    const int64_t groups = (n + 7) / 8;
#if defined(__AVX2__)
    if (type == T_Q4_K) { KUNIT(T_Q4_K) } else { KUNIT(T_Q6_K) }
#else
    const int gb = packed_k_block_bytes(type);
    const int64_t nb = k / 256;
    for (int64_t g = first_group(u0); g < end_group(u1 - 1, groups); g++)
        for (int64_t r = 0; r < m; r++) {
            float acc[8] = {0};
            for (int64_t b = 0; b < nb; b++) {
                int h, s;
                const uint8_t *blk = gblock(w, groups, nb, gb, g, b, &h, &s), *q = blk + 512 * s + 32 * h;
                const float *sc = (const float *)blk + 8 * h;
                const int cs = 32 * s, ss = 8 * s;
                const int8_t *x = kq + r * k + b * 256;
                const int16_t *bs = kbs + (r * nb + b) * 16;
                const float xd = kd[r * nb + b];
                for (int lane = 0; lane < 8; lane++) {
                    if (type == T_Q4_K) {
                        for (int j = 0; j < 4; j++) {
                            int lo = 0, hi = 0;
                            for (int c = 0; c < 8; c++)
                                for (int e = 0; e < 4; e++) {
                                    const uint8_t v = q[(j * 8 + c) * cs + lane * 4 + e];
                                    lo += (v & 15) * x[64 * j + 4 * c + e];
                                    hi += (v >> 4) * x[64 * j + 32 + 4 * c + e];
                                }
                            acc[lane] += sc[(2 * j) * ss + lane] * xd * (float)lo + sc[(2 * j + 1) * ss + lane] * xd * (float)hi;
                            acc[lane] -= sc[8 * ss + (2 * j) * ss + lane] * (xd * (float)(bs[4 * j] + bs[4 * j + 1]));
                            acc[lane] -= sc[8 * ss + (2 * j + 1) * ss + lane] * (xd * (float)(bs[4 * j + 2] + bs[4 * j + 3]));
                        }
                    } else {
                        for (int s_ = 0; s_ < 16; s_++) {
                            int is = 0;
                            for (int c = 0; c < 4; c++)
                                for (int e = 0; e < 4; e++) is += q[(s_ * 4 + c) * cs + lane * 4 + e] * x[16 * s_ + 4 * c + e];
                            acc[lane] += sc[s_ * ss + lane] * xd * (float)(is - 32 * bs[s_]);
                        }
                    }
                }
            }
            const int64_t rows = n - g * 8 < 8 ? n - g * 8 : 8;
            memcpy(y + r * ldy + g * 8, acc, sizeof(float) * (size_t)rows);
        }
#endif
}

// ---- K types against 16-bit activations (precise rows of builds without VNNI) ----
// The activations as packed_rows_w's (a scale per 16, the codes' sums): a Q6_K sub-block of 16
// is 4 byte chunks (codes 0..63, 32 above the value), a Q4_K sub-block of 32 two halves of 4
// chunks' nibbles (low: sub-block 2j of 64-group j, high: 2j + 1). Per 16 values and row one
// integer sum, times the sub-block's scale (d * sc) and the half's scale; Q4_K's mins take
// dmin * m times the half's scale times its codes' sum.
#if defined(__AVX2__) && WIDE_Q8
// acc[r] += sv * xd * s[r] (Q6_K: s[r] - 32 * xo), Q4_K: - mv * xd * xo; xb row r0's index
static inline __attribute__((always_inline)) void wkstep(const int type, const int RN, __m256 *acc, __m256 sv, __m256 mv,
        const __m256i *s, const float *xd, const int32_t *xo, const float *xm, int64_t xb, int64_t rs) {
    for (int r = 0; r < RN; r++, xb += rs) {
        const __m256i sm = type == T_Q6_K ? _mm256_sub_epi32(s[r], _mm256_set1_epi32(32 * xo[xb])) : s[r];
        acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(sv, _mm256_set1_ps(xd[xb])), _mm256_cvtepi32_ps(sm), acc[r]);
        if (type == T_Q4_K) acc[r] = _mm256_fnmadd_ps(mv, _mm256_broadcast_ss(xm + xb), acc[r]);  // xd * xo
    }
}

// One group of 8 K rows against RN 16-bit activation rows from r0 (Q4_K: for up to 2 rows both
// nibbles, sub-blocks 2j and 2j + 1, from one pass over a half's chunks)
static inline __attribute__((always_inline)) void wktile(const int type, const int RN, const uint8_t *w, int64_t n,
        int64_t k, int64_t g, int64_t r0, const int16_t *xw, const float *xd, const int32_t *xo, const float *xm,
        float *y, int64_t ldy) {
    const int gb = packed_k_block_bytes(type);
    const int64_t nb = k / 256, groups = (n + 7) / 8, n16 = k / 16;
    __m256 a[4];
    for (int r = 0; r < RN; r++) a[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        int h, s;
        const uint8_t *blk = gblock(w, groups, nb, gb, g, b, &h, &s), *q = blk + 512 * s + 32 * h;
        const float *sc = (const float *)blk + 8 * h;
        const int cs = 32 * s, ss = 8 * s;  // chunk stride (bytes), scale row stride (floats)
        const int16_t *x = xw + r0 * k + b * 256;
        const int64_t xb = r0 * n16 + b * 16;  // + the 16-value index i (0..15) in the block
        __m256i s0[4], s1[4];
        if (type == T_Q6_K) {
            for (int i = 0; i < 16; i++) {
                wsum16(RN, 4, -1, q + 4 * i * cs, cs, x + 16 * i, x, k, s0, s1, 0);
                wkstep(type, RN, a, _mm256_loadu_ps(sc + i * ss), a[0], s0, xd, xo, xm, xb + i, n16);
            }
            continue;
        }
        for (int j = 0; j < 4; j++)  // 64-group j: sub-blocks 2j (low nibbles), 2j + 1 (high)
            for (int e = 0; e < 2; e++) {
                const uint8_t *qc = q + (j * 8 + 4 * e) * cs;
                const float *s0p = sc + 2 * j * ss, *s1p = s0p + ss;  // the sub-blocks' scales; mins 8 rows on
                const int16_t *x0 = x + 64 * j + 16 * e;
                if (RN <= 2) {
                    wsum16(RN, 4, 2, qc, cs, x0, x0 + 32, k, s0, s1, 0);
                } else {
                    wsum16(RN, 4, 0, qc, cs, x0, x0, k, s0, s1, 0);
                    wkstep(type, RN, a, _mm256_loadu_ps(s0p), _mm256_loadu_ps(s0p + 8 * ss), s0, xd, xo, xm, xb + 4 * j + e, n16);
                    wsum16(RN, 4, 1, qc, cs, x0 + 32, x0, k, s1, s0, 0);
                    wkstep(type, RN, a, _mm256_loadu_ps(s1p), _mm256_loadu_ps(s1p + 8 * ss), s1, xd, xo, xm, xb + 4 * j + 2 + e, n16);
                    continue;
                }
                wkstep(type, RN, a, _mm256_loadu_ps(s0p), _mm256_loadu_ps(s0p + 8 * ss), s0, xd, xo, xm, xb + 4 * j + e, n16);
                wkstep(type, RN, a, _mm256_loadu_ps(s1p), _mm256_loadu_ps(s1p + 8 * ss), s1, xd, xo, xm, xb + 4 * j + 2 + e, n16);
            }
    }
    store_tile(a, RN, n, g, r0, y, ldy);
}

#define WKTILES(T, G)                                                                           \
    {                                                                                           \
        int64_t r0 = 0;                                                                         \
        for (; r0 + 4 <= m; r0 += 4) wktile(T, 4, w, n, k, G, r0, xw, xd, xo, xm, y, ldy);           \
        for (; r0 + 2 <= m; r0 += 2) wktile(T, 2, w, n, k, G, r0, xw, xd, xo, xm, y, ldy);           \
        for (; r0 < m; r0++) wktile(T, 1, w, n, k, G, r0, xw, xd, xo, xm, y, ldy);                   \
    }
#endif

// packed_rows_w for Q4_K / Q6_K (per 16 values xd, xo; k / 16 of them per row)
void packed_k_rows_w(int type, const uint8_t *w, int64_t n, int64_t k, int64_t u0, int64_t u1, int64_t m,
                     const int16_t *xw, const float *xd, const int32_t *xo, float *y, int64_t ldy) {
    const int64_t groups = (n + 7) / 8;
#if defined(__AVX2__) && WIDE_Q8
    const float *xm = xd + m * (k / 16);  // the products xd * xo after the scales
    for (int64_t g = first_group(u0); g < end_group(u1 - 1, groups); g++) {
        if (type == T_Q4_K) WKTILES(T_Q4_K, g)
        else WKTILES(T_Q6_K, g)
    }
#else  // the same integers and, per output, the same f32 steps
    const int gb = packed_k_block_bytes(type);
    const int64_t nb = k / 256, n16 = k / 16;
    for (int64_t g = first_group(u0); g < end_group(u1 - 1, groups); g++)
        for (int64_t r = 0; r < m; r++)
            for (int lane = 0; lane < 8 && g * 8 + lane < n; lane++) {
                float acc = 0.0f;
                for (int64_t b = 0; b < nb; b++) {
                    int h, s;
                    const uint8_t *blk = gblock(w, groups, nb, gb, g, b, &h, &s), *q = blk + 512 * s + 32 * h;
                    const float *sc = (const float *)blk + 8 * h;
                    const int cs = 32 * s, ss = 8 * s;
                    for (int o = 0; o < 16; o++) {  // the tiles' order: Q4_K's 64-group, half, nibble
                        const int i = type == T_Q6_K ? o : 2 * (o / 4 * 2 + o % 2) + o / 2 % 2;
                        const int64_t xb = r * n16 + b * 16 + i;
                        const int16_t *x = xw + r * k + b * 256 + 16 * i;
                        const int sb = type == T_Q6_K ? i : i / 2;
                        int32_t sum = 0;
                        for (int j = 0; j < 16; j++) {
                            const int c = type == T_Q6_K ? 4 * i + j / 4 : sb / 2 * 8 + i % 2 * 4 + j / 4;
                            const uint8_t v = q[c * cs + 4 * lane + j % 4];
                            sum += (type == T_Q6_K ? v : sb % 2 ? v >> 4 : v & 15) * x[j];
                        }
                        if (type == T_Q6_K) sum -= 32 * xo[xb];
                        acc = fma_(sc[sb * ss + lane] * xd[xb], (float)sum, acc);
                        if (type == T_Q4_K) acc = fma_(-sc[8 * ss + sb * ss + lane], xd[xb] * (float)xo[xb], acc);
                    }
                }
                y[r * ldy + g * 8 + lane] = acc;
            }
#endif
}

// ---- a model's repacks in one call ----
// One call for every slice a model repacks, so that the whole of it runs without Python's lock
// (ctypes lets it go for the call): the loader reads the tokenizer on another core meanwhile.
// Slices are handed out one at a time to the threads; a slice read from the file mapping
// (release) has its whole pages dropped once repacked (clean file pages: read again on demand),
// so the file's pages and their repacked copies are not all resident at once.
#include <sys/mman.h>
#include <unistd.h>

typedef struct {
    int k_kind;  // repack8_k (Q4_K / Q6_K) or repack8
    int type;
    const uint8_t *w;
    int64_t n, k;
    uint8_t *out;
    int64_t wbytes;
    int release;
    int rc;  // out: the repack's result
} repack_job;

int repack_jobs(repack_job *jobs, int njobs, int n_threads) {
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    int bad = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads) reduction(+ : bad)
    for (int j = 0; j < njobs; j++) {
        repack_job *b = &jobs[j];
        b->rc = b->k_kind ? repack8_k(b->type, b->w, b->n, b->k, b->out) : repack8(b->type, b->w, b->n, b->k, b->out);
        bad += b->rc != 0;
        if (b->release) {
            const uintptr_t lo = ((uintptr_t)b->w + page - 1) & ~(page - 1);
            const uintptr_t hi = ((uintptr_t)b->w + (uintptr_t)b->wbytes) & ~(page - 1);
            if (hi > lo) madvise((void *)lo, hi - lo, MADV_DONTNEED);
        }
    }
    return bad;
}
