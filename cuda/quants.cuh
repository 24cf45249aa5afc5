// GGUF block formats, one struct each: QK values in BYTES bytes, and get(block, j) = value j.
// Every value is computed with the operations, in the order, of ggml's reference dequantization
// (mistralrs_cli/quant/dequant.py mirrors it): f16 scales widened to f32, then f32 products; the
// _rn intrinsics stop the compiler fusing a multiply and an add into an FMA, which rounds once
// instead of twice and would break bit-exactness. CuPy compiles with -ftz=true, which flushes f32
// subnormal results; none arise here (f16 scales times small integers stay far above 1e-38).
// Layouts: field@byte offset, from ggml-common.h.
#pragma once
#include <cuda/std/cstdint>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef cuda::std::uint8_t u8;
typedef cuda::std::int8_t i8;
typedef cuda::std::uint16_t u16;
typedef cuda::std::uint32_t u32;
typedef cuda::std::int64_t i64;

// Byte loads: blocks of 18, 22 or 34 bytes leave wider fields unaligned.
__device__ __forceinline__ u32 le16(const u8* p) { return (u32)p[0] | ((u32)p[1] << 8); }
__device__ __forceinline__ u32 le32(const u8* p) { return le16(p) | (le16(p + 2) << 16); }
__device__ __forceinline__ float f16_at(const u8* p) { return __half2float(__ushort_as_half((u16)le16(p))); }
__device__ __forceinline__ float bf16_at(const u8* p) { return __bfloat162float(__ushort_as_bfloat16((u16)le16(p))); }
__device__ __forceinline__ u32 nib(const u8* qs, int j) { return j < 16 ? qs[j] & 15 : qs[j - 16] >> 4; }

__constant__ float kIQ4NL[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

struct F32 { enum { QK = 1, BYTES = 4 };
    static __device__ __forceinline__ float get(const u8* b, int) { return __int_as_float((int)le32(b)); } };
struct F16 { enum { QK = 1, BYTES = 2 };
    static __device__ __forceinline__ float get(const u8* b, int) { return f16_at(b); } };
struct BF16 { enum { QK = 1, BYTES = 2 };
    static __device__ __forceinline__ float get(const u8* b, int) { return bf16_at(b); } };

struct Q4_0 { enum { QK = 32, BYTES = 18 };  // d@0 qs@2
    static __device__ __forceinline__ float get(const u8* b, int j) {
        return __fmul_rn((float)((int)nib(b + 2, j) - 8), f16_at(b)); } };
struct Q4_1 { enum { QK = 32, BYTES = 20 };  // d@0 m@2 qs@4
    static __device__ __forceinline__ float get(const u8* b, int j) {
        return __fadd_rn(__fmul_rn((float)nib(b + 4, j), f16_at(b)), f16_at(b + 2)); } };
struct Q5_0 { enum { QK = 32, BYTES = 22 };  // d@0 qh@2 (bit j = bit 4 of value j) qs@6
    static __device__ __forceinline__ float get(const u8* b, int j) {
        const int q = (int)(nib(b + 6, j) | (((le32(b + 2) >> j) & 1) << 4));
        return __fmul_rn((float)(q - 16), f16_at(b)); } };
struct Q5_1 { enum { QK = 32, BYTES = 24 };  // d@0 m@2 qh@4 qs@8
    static __device__ __forceinline__ float get(const u8* b, int j) {
        const u32 q = nib(b + 8, j) | (((le32(b + 4) >> j) & 1) << 4);
        return __fadd_rn(__fmul_rn((float)q, f16_at(b)), f16_at(b + 2)); } };
struct Q8_0 { enum { QK = 32, BYTES = 34 };  // d@0 qs@2 (int8)
    static __device__ __forceinline__ float get(const u8* b, int j) {
        return __fmul_rn((float)(i8)b[2 + j], f16_at(b)); } };

struct Q2_K { enum { QK = 256, BYTES = 84 };  // scales@0 (lo: scale, hi: min) qs@16 d@80 dmin@82
    static __device__ __forceinline__ float get(const u8* b, int e) {
        // two halves of 128; each a 32-byte run read as four 2-bit planes of 32 values
        const int h = e >> 7, p = (e >> 5) & 3, k = e & 31;
        const u32 q = (b[16 + h * 32 + k] >> (2 * p)) & 3, sc = b[e >> 4];
        const float dl = __fmul_rn(f16_at(b + 80), (float)(sc & 15));
        const float ml = __fmul_rn(f16_at(b + 82), (float)(sc >> 4));
        return __fsub_rn(__fmul_rn((float)q, dl), ml); } };

struct Q3_K { enum { QK = 256, BYTES = 110 };  // hmask@0 qs@32 scales@96 (6-bit packed) d@108
    static __device__ __forceinline__ float get(const u8* b, int e) {
        const int r = e >> 5, k = e & 31, s = e >> 4;
        const u32 low = (b[32 + (r >> 2) * 32 + k] >> (2 * (r & 3))) & 3;
        const u32 high = (b[k] >> r) & 1;  // set bit: no -4 offset, i.e. value = (low | 4) - 4
        const u32 lo = s < 8 ? b[96 + s] & 15 : b[96 + s - 8] >> 4;
        const u32 hi = (b[104 + (s & 3)] >> (2 * (s >> 2))) & 3;
        const float dl = __fmul_rn(f16_at(b + 108), (float)((int)(lo | (hi << 4)) - 32));
        return __fmul_rn((float)((int)(low | (high << 2)) - 4), dl); } };

// Q4_K / Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins packed in 12 bytes at s.
__device__ __forceinline__ float k4_value(const u8* b, int j, u32 q) {
    const u8* s = b + 4;
    const u32 sc = j < 4 ? s[j] & 63 : (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
    const u32 mn = j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    const float dl = __fmul_rn(f16_at(b), (float)sc), ml = __fmul_rn(f16_at(b + 2), (float)mn);
    return __fsub_rn(__fmul_rn((float)q, dl), ml);
}
struct Q4_K { enum { QK = 256, BYTES = 144 };  // d@0 dmin@2 scales@4 qs@16: 4 runs, low then high nibbles
    static __device__ __forceinline__ float get(const u8* b, int e) {
        const int j = e >> 5;
        return k4_value(b, j, (b[16 + (j >> 1) * 32 + (e & 31)] >> (4 * (j & 1))) & 15); } };
struct Q5_K { enum { QK = 256, BYTES = 176 };  // d@0 dmin@2 scales@4 qh@16 qs@48; sub-block j: bit j of qh
    static __device__ __forceinline__ float get(const u8* b, int e) {
        const int j = e >> 5, k = e & 31;
        const u32 q = ((b[48 + (j >> 1) * 32 + k] >> (4 * (j & 1))) & 15) | (((b[16 + k] >> j) & 1) << 4);
        return k4_value(b, j, q); } };

struct Q6_K { enum { QK = 256, BYTES = 210 };  // ql@0 qh@128 scales@192 (int8) d@208
    static __device__ __forceinline__ float get(const u8* b, int e) {
        const int h = e >> 7, r = (e >> 5) & 3, k = e & 31;
        const u32 low = (b[h * 64 + (r & 1) * 32 + k] >> (4 * (r >> 1))) & 15;
        const u32 high = (b[128 + h * 32 + k] >> (2 * r)) & 3;
        const float dl = __fmul_rn(f16_at(b + 208), (float)(i8)b[192 + (e >> 4)]);
        return __fmul_rn((float)((int)(low | (high << 4)) - 32), dl); } };

struct IQ4_NL { enum { QK = 32, BYTES = 18 };  // d@0 qs@2: nibbles index a non-linear table
    static __device__ __forceinline__ float get(const u8* b, int j) {
        return __fmul_rn(kIQ4NL[nib(b + 2, j)], f16_at(b)); } };
struct IQ4_XS { enum { QK = 256, BYTES = 136 };  // d@0 scales_h@2 (u16) scales_l@4 qs@8
    static __device__ __forceinline__ float get(const u8* b, int e) {
        const int i = e >> 5, k = e & 31;
        const u32 lo = (b[4 + (i >> 1)] >> (4 * (i & 1))) & 15, hi = (le16(b + 2) >> (2 * i)) & 3;
        const float dl = __fmul_rn(f16_at(b), (float)((int)(lo | (hi << 4)) - 32));
        return __fmul_rn(kIQ4NL[nib(b + 8 + i * 16, k)], dl); } };

// X(tag, struct): the formats that have kernels; tags are the <qtype> part of kernel names.
#define FOR_EACH_FORMAT(X) X(f32, F32) X(f16, F16) X(bf16, BF16) X(q4_0, Q4_0) X(q4_1, Q4_1) \
    X(q5_0, Q5_0) X(q5_1, Q5_1) X(q8_0, Q8_0) X(q2_k, Q2_K) X(q3_k, Q3_K) X(q4_k, Q4_K) X(q5_k, Q5_K) \
    X(q6_k, Q6_K) X(iq4_nl, IQ4_NL) X(iq4_xs, IQ4_XS)

// The element at column c of a row of blocks.
template <class Q> __device__ __forceinline__ float row_value(const u8* row, int c) {
    return Q::get(row + (c / Q::QK) * Q::BYTES, c % Q::QK);
}
