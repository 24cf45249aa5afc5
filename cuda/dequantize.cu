// dequantize_<qtype>_<dtype>: GGUF block rows -> dense rows of f32, f16 or bf16.
// Launch: block (256), grid (rows, ceil(cols / 256)); one thread per value, so a block reads
// consecutive bytes of one row (coalesced) and no index needs more than 32 bits per row.
#include "quants.cuh"

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

template <class Q, class T>
__device__ __forceinline__ void dequantize_rows(const u8* __restrict__ w, T* __restrict__ y, int rows,
                                                int cols, int row_bytes) {
    const int r = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x;
    if (r >= rows || c >= cols) return;
    store(y + (i64)r * cols + c, row_value<Q>(w + (i64)r * row_bytes, c));
}

#define DEQUANTIZE(tag, Q, dtype, T)                                                                   \
    extern "C" __global__ void dequantize_##tag##_##dtype(const u8* __restrict__ w, T* __restrict__ y, \
                                                          int rows, int cols, int row_bytes) {         \
        dequantize_rows<Q, T>(w, y, rows, cols, row_bytes);                                            \
    }
#define DEQUANTIZE_ALL(tag, Q) DEQUANTIZE(tag, Q, f32, float) DEQUANTIZE(tag, Q, f16, __half) \
    DEQUANTIZE(tag, Q, bf16, __nv_bfloat16)
FOR_EACH_FORMAT(DEQUANTIZE_ALL)
