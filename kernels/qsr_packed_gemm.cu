// qsr_packed_gemm.cu -- packed W2/W4 x A2/A4/A8 convolution (any kh x kw, stride 1, zero padding) and
// linear layers as one implicit GEMM over channels-last tiles.
//
// GEMM view:  D[m, o] = sum_k A[m, k] * B[k, o]
//   m = output pixel (n, oy, ox) flattened, M = N*HO*WO  (a linear layer is N = rows, H = W = 1, 1x1 kernel)
//   k = (tap, channel) in the packed row order: tap = ky*KW + kx, code index j = tap*C + ch  (OHWI rows)
//   A[m, k] = activation code of input pixel (n, oy+ky-PH, ox+kx-PW), channel ch; 0 outside the image
//   B[k, o] = 2*u[o, j] - 2*zero  (int8, zero folded in, see qsr_fold_zero), so D = 2 * sum (u - zero) * c
// Epilogue (float): y = D * 0.5 * w_scale[o] * a_step  (+ bias[o]) (ReLU) (+ residual[m, o]),
//   then y (float NHWC) and/or the next layer's codes clamp(rint((y + shift[o]) / step), qmin, qmax).
//
// Tiling: block = 128 threads (4 warps) computes a 64 (pixels) x 64 (out channels) tile of D.
// K loop: one step = 32 channels of one tap (channels >= C are zero), so a tap never straddles a step.
//   Shared memory: As[64][48] (pixel rows, 32 code bytes + 16 pad), Bs[64][48] (out-channel rows, 32 int8).
//   The 48-byte row stride (12 words) spreads the 8 rows one fragment load touches over distinct banks.
//   Loader role of thread tid: row tid>>1, 16-byte half tid&1 of both As and Bs.
//     A: one 16-byte vector load when C % 16 == 0, else bytes with bounds checks (odd channel counts).
//     B: 16 codes starting on a byte boundary -> 1 or 2 words (aligned word loads when possible, else
//        bytes), unpacked in registers (qsr_unpack_u4x8 / qsr_unpack_u2x16); else code by code.
// Compute, tensor-core path (sm_80+): warp w owns pixels 32*(w>>1)..+31 and channels 32*(w&1)..+31 =
//   2 (m16) x 4 (n8) mma.m16n8k32 tiles, 32 int32 accumulators per thread (layout in qsr_common.cuh).
// Compute, dp4a path (sm_61+, and the readable reference): thread owns pixels (tid>>3) + 16i (i < 4) and
//   channels (tid&7) + 8j (j < 8); 8 dp4a per (pixel, channel) and step.
// Not done yet (needs a GPU to tune): cp.async double buffering, larger tiles, fusing whole blocks.
#include "qsr_common.cuh"

#define QSR_BM 64
#define QSR_BN 64
#define QSR_BK 32
#define QSR_THREADS 128
#define QSR_SROW 48

struct QsrGemm {
  const qsr_u8* x;          // activation codes (N, H, W, C), one byte each
  const qsr_u8* qw;         // packed weight rows (O, row_bytes)
  const float* w_scale;     // (1,) or (O,)
  const float* bias;        // (O,)            if QSR_HAS_BIAS
  const float* residual;    // (M, O) float    if QSR_HAS_RES
  float* y;                 // (M, O) float    if QSR_OUT_FLOAT
  qsr_u8* y_codes;          // (M, O) codes    if QSR_OUT_CODES
  const float* next_shift;  // (O,)            if QSR_HAS_NEXT_SHIFT
  int N, H, W, C, O, KH, KW, PH, PW, HO, WO, row_bytes, zero2;
  float a_step, next_step;
  int next_qmin, next_qmax, flags;
};

__device__ __forceinline__ qsr_u32 qsr_ld32(const qsr_u8* p) { return *reinterpret_cast<const qsr_u32*>(p); }

__device__ __forceinline__ qsr_u32 qsr_bytes4(const qsr_u8* p) {
  return (qsr_u32)p[0] | ((qsr_u32)p[1] << 8) | ((qsr_u32)p[2] << 16) | ((qsr_u32)p[3] << 24);
}

__device__ __forceinline__ void qsr_st128(qsr_u8* dst, qsr_u32 a, qsr_u32 b, qsr_u32 c, qsr_u32 d) {
  uint4 v;
  v.x = a; v.y = b; v.z = c; v.w = d;
  *reinterpret_cast<uint4*>(dst) = v;
}

// 16 activation codes (channels c..c+15 of one input pixel) -> dst (16 bytes of an As row).
__device__ __forceinline__ void qsr_load_a(qsr_u8* dst, const qsr_u8* pix, int c, int C, bool ok, bool vec) {
  if (ok && vec && c + 16 <= C) {
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(pix + c);
    return;
  }
  qsr_u32 w[4] = {0u, 0u, 0u, 0u};
  if (ok) {
    QSR_UNROLL
    for (int i = 0; i < 16; ++i)
      if (c + i < C) w[i >> 2] |= (qsr_u32)pix[c + i] << (8 * (i & 3));
  }
  qsr_st128(dst, w[0], w[1], w[2], w[3]);
}

// 16 weight codes j..j+15 of one packed row (channels c..c+15 of a tap) -> dst as int8 (2u - zero2).
template <int WBITS>
__device__ __forceinline__ void qsr_load_b(qsr_u8* dst, const qsr_u8* row, int j, int c, int C, bool ok,
                                           qsr_u32 k4) {
  qsr_u32 u[4] = {0u, 0u, 0u, 0u};
  if (ok) {
    const int bit = j * WBITS;
    if (c + 16 <= C && (bit & 7) == 0) {
      const qsr_u8* src = row + (bit >> 3);
      const bool aligned = (((unsigned long long)src) & 3ull) == 0ull;
      if constexpr (WBITS == 4) {
        const qsr_u32 w0 = aligned ? qsr_ld32(src) : qsr_bytes4(src);
        const qsr_u32 w1 = aligned ? qsr_ld32(src + 4) : qsr_bytes4(src + 4);
        qsr_unpack_u4x8(w0, u[0], u[1]);
        qsr_unpack_u4x8(w1, u[2], u[3]);
      } else {
        qsr_unpack_u2x16(aligned ? qsr_ld32(src) : qsr_bytes4(src), u);
      }
    } else {
      QSR_UNROLL
      for (int i = 0; i < 16; ++i)
        if (c + i < C) u[i >> 2] |= qsr_code_at<WBITS>(row, j + i) << (8 * (i & 3));
    }
  }
  qsr_st128(dst, qsr_fold_zero(u[0], k4), qsr_fold_zero(u[1], k4), qsr_fold_zero(u[2], k4),
            qsr_fold_zero(u[3], k4));
}

// Tensor-core step: the warp's 32x32 sub-tile, 2 x 4 mma.m16n8k32 (fragment layout: qsr_common.cuh).
template <bool A_UNSIGNED>
__device__ __forceinline__ void qsr_step_mma(const qsr_u8* As, const qsr_u8* Bs, int* acc) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int wm = warp >> 1, wn = warp & 1;
  qsr_u32 a[2][4], b[4][2];
  QSR_UNROLL
  for (int mi = 0; mi < 2; ++mi) {
    const qsr_u8* pa = As + (wm * 32 + mi * 16 + g) * QSR_SROW + 4 * t;
    a[mi][0] = qsr_ld32(pa);
    a[mi][1] = qsr_ld32(pa + 8 * QSR_SROW);
    a[mi][2] = qsr_ld32(pa + 16);
    a[mi][3] = qsr_ld32(pa + 8 * QSR_SROW + 16);
  }
  QSR_UNROLL
  for (int ni = 0; ni < 4; ++ni) {
    const qsr_u8* pb = Bs + (wn * 32 + ni * 8 + g) * QSR_SROW + 4 * t;
    b[ni][0] = qsr_ld32(pb);
    b[ni][1] = qsr_ld32(pb + 16);
  }
  QSR_UNROLL
  for (int mi = 0; mi < 2; ++mi)
    QSR_UNROLL
    for (int ni = 0; ni < 4; ++ni) qsr_mma_16832<A_UNSIGNED>(acc + (mi * 4 + ni) * 4, a[mi], b[ni]);
}

// dp4a step: pixels (tid>>3) + 16i, channels (tid&7) + 8j, acc[i*8 + j].
template <bool A_UNSIGNED>
__device__ __forceinline__ void qsr_step_dp4a(const qsr_u8* As, const qsr_u8* Bs, int* acc) {
  const int tm = threadIdx.x >> 3, tn = threadIdx.x & 7;
  QSR_UNROLL
  for (int kw = 0; kw < QSR_BK / 4; ++kw) {
    qsr_u32 a[4];
    QSR_UNROLL
    for (int i = 0; i < 4; ++i) a[i] = qsr_ld32(As + (tm + 16 * i) * QSR_SROW + 4 * kw);
    QSR_UNROLL
    for (int j = 0; j < 8; ++j) {
      const qsr_u32 b = qsr_ld32(Bs + (tn + 8 * j) * QSR_SROW + 4 * kw);
      QSR_UNROLL
      for (int i = 0; i < 4; ++i) acc[i * 8 + j] = qsr_dp4a<A_UNSIGNED>(a[i], b, acc[i * 8 + j]);
    }
  }
}

// One output element: scales, bias, ReLU, residual, float and/or code store.
__device__ __forceinline__ void qsr_epilogue(const QsrGemm& p, int M, int m, int o, int acc) {
  if (m >= M || o >= p.O) return;
  const int f = p.flags;
  const float s = p.w_scale[(f & QSR_W_PER_CHANNEL) ? o : 0];
  float v = (float)acc * (0.5f * s * p.a_step);
  if (f & QSR_HAS_BIAS) v += p.bias[o];
  if (f & QSR_RELU) v = fmaxf(v, 0.0f);
  const long long idx = (long long)m * p.O + o;
  if (f & QSR_HAS_RES) v += p.residual[idx];
  if (f & QSR_OUT_FLOAT) p.y[idx] = v;
  if (f & QSR_OUT_CODES) {
    const float sh = (f & QSR_HAS_NEXT_SHIFT) ? p.next_shift[o] : 0.0f;
    p.y_codes[idx] = (qsr_u8)(qsr_quant_code(v, sh, p.next_step, p.next_qmin, p.next_qmax) & 0xFF);
  }
}

template <bool USE_MMA, int WBITS, bool A_UNSIGNED>
__device__ __forceinline__ void qsr_gemm_body(const QsrGemm& p) {
  __shared__ __align__(16) qsr_u8 As[QSR_BM * QSR_SROW];
  __shared__ __align__(16) qsr_u8 Bs[QSR_BN * QSR_SROW];
  const int tid = threadIdx.x;
  const int M = p.N * p.HO * p.WO;
  const int m0 = blockIdx.x * QSR_BM, o0 = blockIdx.y * QSR_BN;

  // Loader role: row lr of As (pixel m) and of Bs (out channel o), 16-byte half lh.
  const int lr = tid >> 1, lh = tid & 1;
  const int m = m0 + lr;
  const bool m_ok = m < M;
  int n = 0, oy = 0, ox = 0;
  if (m_ok) {
    ox = m % p.WO;
    const int r = m / p.WO;
    oy = r % p.HO;
    n = r / p.HO;
  }
  const int o = o0 + lr;
  const bool o_ok = o < p.O;
  const qsr_u8* wrow = p.qw + (long long)(o_ok ? o : 0) * p.row_bytes;
  const qsr_u32 k4 = (qsr_u32)(128 - p.zero2) * 0x01010101u;
  const bool vec_a = (p.C & 15) == 0;

  int acc[32];
  QSR_UNROLL
  for (int i = 0; i < 32; ++i) acc[i] = 0;

  const int taps = p.KH * p.KW;
  for (int tap = 0; tap < taps; ++tap) {
    const int ky = tap / p.KW, kx = tap - ky * p.KW;
    const int iy = oy + ky - p.PH, ix = ox + kx - p.PW;
    const bool a_ok = m_ok && iy >= 0 && iy < p.H && ix >= 0 && ix < p.W;
    const qsr_u8* pix = a_ok ? p.x + (((long long)n * p.H + iy) * p.W + ix) * p.C : p.x;
    for (int c0 = 0; c0 < p.C; c0 += QSR_BK) {
      const int c = c0 + 16 * lh;
      qsr_load_a(As + lr * QSR_SROW + 16 * lh, pix, c, p.C, a_ok, vec_a);
      qsr_load_b<WBITS>(Bs + lr * QSR_SROW + 16 * lh, wrow, tap * p.C + c, c, p.C, o_ok, k4);
      __syncthreads();
      if constexpr (USE_MMA)
        qsr_step_mma<A_UNSIGNED>(As, Bs, acc);
      else
        qsr_step_dp4a<A_UNSIGNED>(As, Bs, acc);
      __syncthreads();
    }
  }

  if constexpr (USE_MMA) {
    const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int wm = warp >> 1, wn = warp & 1;
    QSR_UNROLL
    for (int mi = 0; mi < 2; ++mi)
      QSR_UNROLL
      for (int ni = 0; ni < 4; ++ni)
        QSR_UNROLL
        for (int e = 0; e < 4; ++e)
          qsr_epilogue(p, M, m0 + wm * 32 + mi * 16 + g + 8 * (e >> 1), o0 + wn * 32 + ni * 8 + 2 * t + (e & 1),
                       acc[(mi * 4 + ni) * 4 + e]);
  } else {
    const int tm = tid >> 3, tn = tid & 7;
    QSR_UNROLL
    for (int i = 0; i < 4; ++i)
      QSR_UNROLL
      for (int j = 0; j < 8; ++j) qsr_epilogue(p, M, m0 + tm + 16 * i, o0 + tn + 8 * j, acc[i * 8 + j]);
  }
}

// Kernel entry points: qsr_conv_{mma|dp4a}_w{2|4}_{s8|u8} (s8/u8 = signed/unsigned activation codes).
// Launch: grid (ceil(M / 64), ceil(O / 64)), block 128. Linear layers use the same kernels.
// Compiling with -DQSR_SELECT -DQSR_WANT_<name> emits only that entry (the cupy backend builds one
// module per kernel it needs: a few seconds of NVRTC instead of all eight).
#define QSR_GEMM_ENTRY(NAME, MMA, WB, AU)                                                                  \
  extern "C" __global__ void __launch_bounds__(QSR_THREADS, 4) NAME(                                       \
      const qsr_u8* __restrict__ x, const qsr_u8* __restrict__ qw, const float* __restrict__ w_scale,      \
      const float* __restrict__ bias, const float* __restrict__ residual, float* __restrict__ y,           \
      qsr_u8* __restrict__ y_codes, const float* __restrict__ next_shift, int N, int H, int W, int C,      \
      int O, int KH, int KW, int PH, int PW, int HO, int WO, int row_bytes, int zero2, float a_step,       \
      float next_step, int next_qmin, int next_qmax, int flags) {                                          \
    const QsrGemm p = {x,  qw, w_scale, bias, residual, y,  y_codes, next_shift, N, H, W, C, O, KH, KW,    \
                       PH, PW, HO, WO, row_bytes, zero2, a_step, next_step, next_qmin, next_qmax, flags};  \
    qsr_gemm_body<MMA, WB, AU>(p);                                                                         \
  }

#if !defined(QSR_SELECT) || defined(QSR_WANT_qsr_conv_mma_w4_s8)
QSR_GEMM_ENTRY(qsr_conv_mma_w4_s8, true, 4, false)
#endif
#if !defined(QSR_SELECT) || defined(QSR_WANT_qsr_conv_mma_w4_u8)
QSR_GEMM_ENTRY(qsr_conv_mma_w4_u8, true, 4, true)
#endif
#if !defined(QSR_SELECT) || defined(QSR_WANT_qsr_conv_mma_w2_s8)
QSR_GEMM_ENTRY(qsr_conv_mma_w2_s8, true, 2, false)
#endif
#if !defined(QSR_SELECT) || defined(QSR_WANT_qsr_conv_mma_w2_u8)
QSR_GEMM_ENTRY(qsr_conv_mma_w2_u8, true, 2, true)
#endif
#if !defined(QSR_SELECT) || defined(QSR_WANT_qsr_conv_dp4a_w4_s8)
QSR_GEMM_ENTRY(qsr_conv_dp4a_w4_s8, false, 4, false)
#endif
#if !defined(QSR_SELECT) || defined(QSR_WANT_qsr_conv_dp4a_w4_u8)
QSR_GEMM_ENTRY(qsr_conv_dp4a_w4_u8, false, 4, true)
#endif
#if !defined(QSR_SELECT) || defined(QSR_WANT_qsr_conv_dp4a_w2_s8)
QSR_GEMM_ENTRY(qsr_conv_dp4a_w2_s8, false, 2, false)
#endif
#if !defined(QSR_SELECT) || defined(QSR_WANT_qsr_conv_dp4a_w2_u8)
QSR_GEMM_ENTRY(qsr_conv_dp4a_w2_u8, false, 2, true)
#endif
