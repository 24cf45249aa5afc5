// CPU emulation of the CUDA C device language, enough for cuda/*.cu to compile with g++ unchanged.
// Every CUDA thread is a fiber (runtime.cpp); anything that needs other threads (barriers, warp
// collectives) parks the fiber and lets the scheduler resolve it once every live thread arrived.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace cuda { namespace std {
using ::int8_t; using ::uint8_t; using ::int16_t; using ::uint16_t;
using ::int32_t; using ::uint32_t; using ::int64_t; using ::uint64_t;
} }

struct dim3 { unsigned x = 1, y = 1, z = 1; };

namespace emu {
enum WarpOp { OP_IDX, OP_DOWN, OP_UP, OP_XOR, OP_BALLOT, OP_ANY, OP_ALL, OP_SYNCWARP };
extern thread_local dim3 t_blockIdx, t_blockDim, t_gridDim;
const dim3& thread_idx();
void syncthreads();
uint64_t warp_op(int op, unsigned mask, uint64_t value, int arg, int width);
void* dyn_smem();

template <class T> T shfl(int op, unsigned mask, T v, int arg, int width) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    bits = warp_op(op, mask, bits, arg, width);
    T r;
    std::memcpy(&r, &bits, sizeof(T));
    return r;
}
}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::t_blockIdx)
#define blockDim (::emu::t_blockDim)
#define gridDim (::emu::t_gridDim)
#define __global__ __attribute__((visibility("default")))
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
// Blocks run one after another on a worker, so a block's shared memory is a static of that worker.
#define __shared__ static thread_local
#define __constant__
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
static const int warpSize = 32;

inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::warp_op(emu::OP_SYNCWARP, mask, 0, 0, 32); }
template <class T> T __shfl_sync(unsigned m, T v, int src, int w = 32) { return emu::shfl(emu::OP_IDX, m, v, src, w); }
template <class T> T __shfl_down_sync(unsigned m, T v, unsigned d, int w = 32) { return emu::shfl(emu::OP_DOWN, m, v, (int)d, w); }
template <class T> T __shfl_up_sync(unsigned m, T v, unsigned d, int w = 32) { return emu::shfl(emu::OP_UP, m, v, (int)d, w); }
template <class T> T __shfl_xor_sync(unsigned m, T v, int lm, int w = 32) { return emu::shfl(emu::OP_XOR, m, v, lm, w); }
inline unsigned __ballot_sync(unsigned m, int p) { return (unsigned)emu::warp_op(emu::OP_BALLOT, m, p != 0, 0, 32); }
inline int __any_sync(unsigned m, int p) { return (int)emu::warp_op(emu::OP_ANY, m, p != 0, 0, 32); }
inline int __all_sync(unsigned m, int p) { return (int)emu::warp_op(emu::OP_ALL, m, p != 0, 0, 32); }

// --- 2-byte floats: bit patterns in a struct, conversions rounding to nearest even -----------------
struct __half { unsigned short __x; };
struct __nv_bfloat16 { unsigned short __x; };
inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.__x, 2); return (float)f; }
inline __half __float2half_rn(float v) { _Float16 f = (_Float16)v; __half h; std::memcpy(&h.__x, &f, 2); return h; }
inline __half __float2half(float v) { return __float2half_rn(v); }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline float __bfloat162float(__nv_bfloat16 b) {
    uint32_t u = (uint32_t)b.__x << 16; float f; std::memcpy(&f, &u, 4); return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
    uint32_t u; std::memcpy(&u, &v, 4);
    if (std::isnan(v)) return __nv_bfloat16{(unsigned short)((u >> 16) | 0x40)};
    return __nv_bfloat16{(unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(float v) { return __float2bfloat16_rn(v); }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
// cuda_fp16.h / cuda_bf16.h arithmetic: computed in f32, rounded back once (as sm_80+ does)
#define EMU_HALF_OPS(T, TO, FROM)                                                                  \
    inline T operator+(T a, T b) { return FROM(TO(a) + TO(b)); }                                   \
    inline T operator-(T a, T b) { return FROM(TO(a) - TO(b)); }                                   \
    inline T operator*(T a, T b) { return FROM(TO(a) * TO(b)); }                                   \
    inline T operator/(T a, T b) { return FROM(TO(a) / TO(b)); }                                   \
    inline bool operator<(T a, T b) { return TO(a) < TO(b); }                                      \
    inline bool operator>(T a, T b) { return TO(a) > TO(b); }                                      \
    inline bool operator==(T a, T b) { return TO(a) == TO(b); }
EMU_HALF_OPS(__half, __half2float, __float2half_rn)
EMU_HALF_OPS(__nv_bfloat16, __bfloat162float, __float2bfloat16_rn)
#undef EMU_HALF_OPS

// --- arithmetic intrinsics (the .so is built with -ffp-contract=off, so these round each step) ----
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
template <class T> T __ldg(const T* p) { return *p; }
inline int __dp4a(int a, int b, int c) {
    for (int i = 0; i < 4; ++i) c += (int)(int8_t)(a >> (8 * i)) * (int)(int8_t)(b >> (8 * i));
    return c;
}
inline unsigned __dp4a(unsigned a, unsigned b, unsigned c) {
    for (int i = 0; i < 4; ++i) c += ((a >> (8 * i)) & 255u) * ((b >> (8 * i)) & 255u);
    return c;
}

// --- atomics: fibers switch only at barriers and collectives, so a plain update is atomic --------
template <class T> T atomicAdd(T* p, T v) { T o = *p; *p = o + v; return o; }
template <class T> T atomicSub(T* p, T v) { T o = *p; *p = o - v; return o; }
template <class T> T atomicMax(T* p, T v) { T o = *p; *p = o > v ? o : v; return o; }
template <class T> T atomicMin(T* p, T v) { T o = *p; *p = o < v ? o : v; return o; }
template <class T> T atomicExch(T* p, T v) { T o = *p; *p = v; return o; }
template <class T> T atomicOr(T* p, T v) { T o = *p; *p = o | v; return o; }
template <class T> T atomicAnd(T* p, T v) { T o = *p; *p = o & v; return o; }
template <class T> T atomicCAS(T* p, T cmp, T v) { T o = *p; if (o == cmp) *p = v; return o; }
template <class T> T min(T a, T b) { return b < a ? b : a; }
template <class T> T max(T a, T b) { return a < b ? b : a; }
