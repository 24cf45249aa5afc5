// gemv_<qtype>_f32: y[m, col0 + n] = sum_k x[m, k] * W[n, k] for a few activation rows (decode).
// Launch: block (32, GEMV_WARPS), grid (ceil(N / GEMV_WARPS)). One warp per output row: the lanes
// walk the row together (neighbouring lanes, neighbouring bytes), dequantizing as they go, keep one
// f32 sum per activation row, and reduce them with shuffles. The weight row is read once for all
// M rows.
#include "quants.cuh"

#define GEMV_MAX_M 8
#define GEMV_WARPS 4
#define GEMV_RUN 8  // consecutive values per lane and step

// Rows of blocks hold whole runs of 8; only the float formats (QK = 1) can end mid-run.
template <class Q> __device__ __forceinline__ bool in_row(int k, int K) { return Q::QK > 1 || k < K; }

template <class Q>
__device__ __forceinline__ void gemv_rows(const u8* __restrict__ w, const float* __restrict__ x,
                                          float* __restrict__ y, int N, int K, int row_bytes, int M,
                                          int ldy, int col0) {
    const int n = blockIdx.x * GEMV_WARPS + threadIdx.y, lane = threadIdx.x;
    if (n >= N) return;  // the whole warp leaves together: no lane is missing from its shuffles
    const u8* row = w + (i64)n * row_bytes;
    float acc[GEMV_MAX_M];
#pragma unroll
    for (int m = 0; m < GEMV_MAX_M; ++m) acc[m] = 0.f;
    // A lane takes 8 consecutive values per step: they share a block and a sub-block scale (QK is
    // 1, 32 or 256 and k0 is a multiple of 8), so after inlining the scale is decoded once.
    for (int k0 = lane * GEMV_RUN; k0 < K; k0 += 32 * GEMV_RUN) {
        float v[GEMV_RUN];
#pragma unroll
        for (int i = 0; i < GEMV_RUN; ++i) v[i] = in_row<Q>(k0 + i, K) ? row_value<Q>(row, k0 + i) : 0.f;
#pragma unroll
        for (int m = 0; m < GEMV_MAX_M; ++m) {
            if (m >= M) break;
            const float* xm = x + (i64)m * K + k0;
#pragma unroll
            for (int i = 0; i < GEMV_RUN; ++i)
                if (in_row<Q>(k0 + i, K)) acc[m] = __fmaf_rn(v[i], xm[i], acc[m]);
        }
    }
    for (int m = 0; m < M; ++m) {
        float s = acc[m];
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        if (lane == 0) y[(i64)m * ldy + col0 + n] = s;
    }
}

#define GEMV(tag, Q)                                                                                \
    extern "C" __global__ void gemv_##tag##_f32(const u8* __restrict__ w, const float* __restrict__ x, \
                                                float* __restrict__ y, int N, int K, int row_bytes,  \
                                                int M, int ldy, int col0) {                          \
        gemv_rows<Q>(w, x, y, N, K, row_bytes, M, ldy, col0);                                        \
    }
FOR_EACH_FORMAT(GEMV)
