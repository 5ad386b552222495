// qsr_quant_act.cu -- activation quantizer: float tensor -> channels-last int8/uint8 codes.
//
//   c[n, h, w, ch] = clamp(round_half_even((x[n, ch, h, w] + shift[ch]) / step), qmin, qmax)
//
// i.e. the code c of the fake-quantizer x_hat = step * c (DEVELOPERS.md, ActParams). The input is read
// through element strides (sn, sc, sh, sw), so NCHW-contiguous, channels-last or a (M, C) linear input
// (N = M, H = W = 1) all work without a copy; the output is always dense NHWC, one byte per code
// (two's complement for signed codes, plain byte for unsigned ones, 0..255).
// One thread per output element in output order (channel fastest): coalesced writes, and coalesced
// reads whenever the input is channels-last (as the conv kernels' outputs are).
#include "qsr_common.cuh"

extern "C" __global__ void __launch_bounds__(256) qsr_quantize_act(
    const float* __restrict__ x,          // input, 4-D view through the strides below
    qsr_u8* __restrict__ codes,           // output (N, H, W, C) codes
    const float* __restrict__ shift,      // (C,) when has_shift, else ignored
    int N, int C, int H, int W,
    int sn, int sc, int sh, int sw,       // element strides of x for n, c, h, w
    float step, int qmin, int qmax, int has_shift) {
  const long long total = (long long)N * H * W * C;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int ch = (int)(i % C);
    long long p = i / C;
    const int w = (int)(p % W);
    p /= W;
    const int h = (int)(p % H);
    const int n = (int)(p / H);
    const float v = x[(long long)n * sn + (long long)ch * sc + (long long)h * sh + (long long)w * sw];
    const int q = qsr_quant_code(v, has_shift ? shift[ch] : 0.0f, step, qmin, qmax);
    codes[i] = (qsr_u8)(q & 0xFF);
  }
}
