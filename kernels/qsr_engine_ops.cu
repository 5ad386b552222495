// qsr_engine_ops.cu -- the engine's small kernels around qsr_conv_tc (channels-last binary16 tensors).
//
// Each kernel comes in two entries, _f16 (binary16 input) and _f32 (float32 input).
// qsr_quant_nhwc_f16: activation codes of a channels-last tensor, 8 channels per thread:
//   codes[m, c] = clamp(rint((x[m * x_ld + x_off + c] * mul[n, c] + shift[c]) / step), qmin, qmax)
//   for m < M pixels (n = m / HW), c < C; mul (HAS_MUL, float32 (N, C)) is a per-image channel factor
//   (IMDN's contrast-aware channel attention), shift (HAS_SHIFT) the quantizer's per-channel shift.
//   C, x_ld and x_off are multiples of 8; codes are dense (M, C) bytes, 8-byte stores.
// qsr_channel_stats_f16: deterministic per-image channel sums of a channels-last tensor:
//   part[((n * chunks + b) * 2 + 0) * C + c] = sum over the pixels of chunk b of x[n, p, c]   (float32)
//   part[((n * chunks + b) * 2 + 1) * C + c] = sum of squares
//   grid (chunks, N), 256 threads: thread = channel pair (C / 2 per pixel row) x 512 / C pixel rows; the rows
//   are summed in a fixed order, so the result does not depend on scheduling. C even, C <= 512.
#include "qsr_common.cuh"

#define QSR_OPS_HAS_SHIFT 1
#define QSR_OPS_HAS_MUL 2

__device__ __forceinline__ float qsr_ld_f(const qsr_f16* p) { return qsr_h2f(*p); }
__device__ __forceinline__ float qsr_ld_f(const float* p) { return *p; }

template <typename T>
__device__ __forceinline__ void qsr_quant_nhwc(const T* __restrict__ x, qsr_u8* __restrict__ codes,
                                               const float* __restrict__ shift, const float* __restrict__ mul, int M,
                                               int HW, int C, int x_ld, int x_off, float step, int qmin, int qmax,
                                               int flags) {
  const int groups = C / 8;
  const long long total = (long long)M * groups;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const long long m = i / groups;
    const int c0 = (int)(i - m * groups) * 8;
    const T* src = x + m * x_ld + x_off + c0;
    const int n = (int)(m / HW);
    qsr_u32 out[2] = {0u, 0u};
    QSR_UNROLL
    for (int k = 0; k < 8; ++k) {
      const int c = c0 + k;
      float f = qsr_ld_f(src + k);
      if (flags & QSR_OPS_HAS_MUL) f = f * mul[(long long)n * C + c];
      const int q = qsr_quant_code(f, (flags & QSR_OPS_HAS_SHIFT) ? shift[c] : 0.0f, step, qmin, qmax);
      out[k >> 2] |= (qsr_u32)(q & 0xFF) << (8 * (k & 3));
    }
    *reinterpret_cast<unsigned long long*>(codes + m * C + c0) =
        (unsigned long long)out[0] | ((unsigned long long)out[1] << 32);
  }
}

template <typename T>
__device__ __forceinline__ void qsr_channel_stats(const T* __restrict__ x, float* __restrict__ part, int HW, int C,
                                                  int x_ld, int x_off, int chunk, float (*red)[256]) {
  const int pairs = C / 2, rows = 256 / pairs;
  const int tid = threadIdx.x, lane_c = tid % pairs, row = tid / pairs;
  const int n = blockIdx.y, b = blockIdx.x, chunks = gridDim.x;
  float s0 = 0.0f, s1 = 0.0f, q0 = 0.0f, q1 = 0.0f;
  if (row < rows) {
    const int p_end = (b + 1) * chunk < HW ? (b + 1) * chunk : HW;
    for (int p = b * chunk + row; p < p_end; p += rows) {
      const T* src = x + ((long long)n * HW + p) * x_ld + x_off + 2 * lane_c;
      const float a = qsr_ld_f(src), c = qsr_ld_f(src + 1);
      s0 += a;
      s1 += c;
      q0 += a * a;
      q1 += c * c;
    }
  }
  red[0][tid] = s0;
  red[1][tid] = s1;
  red[2][tid] = q0;
  red[3][tid] = q1;
  __syncthreads();
  if (row == 0) {  // rows summed in order 0, 1, 2, ...: deterministic
    for (int r = 1; r < rows; ++r) {
      s0 += red[0][r * pairs + lane_c];
      s1 += red[1][r * pairs + lane_c];
      q0 += red[2][r * pairs + lane_c];
      q1 += red[3][r * pairs + lane_c];
    }
    float* dst = part + ((long long)(n * chunks + b) * 2) * C;
    dst[2 * lane_c] = s0;
    dst[2 * lane_c + 1] = s1;
    dst[C + 2 * lane_c] = q0;
    dst[C + 2 * lane_c + 1] = q1;
  }
}

#define QSR_OPS_ENTRIES(SUFFIX, T)                                                                               \
  extern "C" __global__ void __launch_bounds__(256) qsr_quant_nhwc_##SUFFIX(                                    \
      const T* __restrict__ x, qsr_u8* __restrict__ codes, const float* __restrict__ shift,                    \
      const float* __restrict__ mul, int M, int HW, int C, int x_ld, int x_off, float step, int qmin, int qmax, \
      int flags) {                                                                                              \
    qsr_quant_nhwc<T>(x, codes, shift, mul, M, HW, C, x_ld, x_off, step, qmin, qmax, flags);                    \
  }                                                                                                             \
  extern "C" __global__ void __launch_bounds__(256)                                                            \
      qsr_channel_stats_##SUFFIX(const T* __restrict__ x, float* __restrict__ part, int HW, int C, int x_ld,    \
                                 int x_off, int chunk) {                                                        \
    __shared__ float red[4][256];                                                                               \
    qsr_channel_stats<T>(x, part, HW, C, x_ld, x_off, chunk, red);                                              \
  }

QSR_OPS_ENTRIES(f16, qsr_f16)
QSR_OPS_ENTRIES(f32, float)
