// gemm_<qtype>_f32: the same product as gemv for many activation rows (prefill).
// Launch: block (32, 8), grid (ceil(N / 32), ceil(M / 32)), dynamic shared memory
// 2 * 32 * 33 floats. Each step stages a 32x32 tile of x and a dequantized 32x32 tile of W in
// shared memory (rows padded to 33 floats so a warp reading a column hits 32 different banks), so
// every weight value is dequantized once per block instead of once per activation row.
#include "quants.cuh"

#define TILE 32
#define TILE_ROWS 8  // threadIdx.y range: each thread owns TILE / TILE_ROWS outputs of a column

template <class Q>
__device__ __forceinline__ void gemm_tile(const u8* __restrict__ w, const float* __restrict__ x,
                                          float* __restrict__ y, int N, int K, int row_bytes, int M,
                                          int ldy, int col0) {
    extern __shared__ float smem[];
    float* xs = smem;                     // (TILE, TILE + 1): x[m0 + i, k0 + t]
    float* ws = smem + TILE * (TILE + 1);  // (TILE, TILE + 1): W[n0 + i, k0 + t]
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int n0 = blockIdx.x * TILE, m0 = blockIdx.y * TILE;
    float acc[TILE / TILE_ROWS] = {0.f, 0.f, 0.f, 0.f};
    for (int k0 = 0; k0 < K; k0 += TILE) {
        const int k = k0 + tx;
        for (int i = ty; i < TILE; i += TILE_ROWS) {
            const int m = m0 + i, n = n0 + i;
            xs[i * (TILE + 1) + tx] = (m < M && k < K) ? x[(i64)m * K + k] : 0.f;
            ws[i * (TILE + 1) + tx] = (n < N && k < K) ? row_value<Q>(w + (i64)n * row_bytes, k) : 0.f;
        }
        __syncthreads();
        for (int kk = 0; kk < TILE; ++kk) {
            const float v = ws[tx * (TILE + 1) + kk];
#pragma unroll
            for (int j = 0; j < TILE / TILE_ROWS; ++j)
                acc[j] = __fmaf_rn(xs[(ty + TILE_ROWS * j) * (TILE + 1) + kk], v, acc[j]);
        }
        __syncthreads();  // the next step overwrites the tiles this one is still reading
    }
#pragma unroll
    for (int j = 0; j < TILE / TILE_ROWS; ++j) {
        const int m = m0 + ty + TILE_ROWS * j, n = n0 + tx;
        if (m < M && n < N) y[(i64)m * ldy + col0 + n] = acc[j];
    }
}

#define GEMM(tag, Q)                                                                                \
    extern "C" __global__ void gemm_##tag##_f32(const u8* __restrict__ w, const float* __restrict__ x, \
                                                float* __restrict__ y, int N, int K, int row_bytes,  \
                                                int M, int ldy, int col0) {                          \
        gemm_tile<Q>(w, x, y, N, K, row_bytes, M, ldy, col0);                                        \
    }
FOR_EACH_FORMAT(GEMM)
