// qsr_conv_tc.cu -- the engine's packed convolution: persistent, tensor-core implicit GEMM (sm_80+).
//
// One kernel per layer shape, specialised at compile time (NVRTC, -D defines; defaults below compile the
// 64->64 3x3 case for the CI checks):
//   QSR_C      input channels (multiple of 16)          QSR_KS     kernel size, 1 or 3 (stride 1, "same" padding)
//   QSR_OT     output channels per CTA (multiple of 16, <= 64); grid.y = ceil(O / QSR_OT) slices
//   QSR_WARPS  warps per CTA (1..8)                     QSR_WM     m16 fragments per warp (1..4)
//   QSR_A_SIGNED  activation codes int8 (1) or uint8 (0)
//   QSR_YF32   1: the float output and the residual are float32 (else binary16)
//
// GEMM: D[m, o] = sum_k A[m, k] W[o, k], m = output pixel (n, y, x), k = tap * C + c (OHWI rows),
// A = activation codes (dense NHWC bytes, code 0 = the zero padding), W = int8 weights 2u - 2zero prepared on
// the host (so D = 2 * sum (u - zero) c exactly; the host folds the 1/2 into the scale).
//
// Shared memory (dynamic, sizes mirrored by quantsr_cli/backends/cupy_plan.py conv_tc_smem_bytes):
//   W  [QSR_OT][KROW]            the CTA's weight rows, loaded once (the kernel is persistent: grid <= SMs x k)
//   A  [2][HALO][PROW]           double-buffered input tiles, loaded with cp.async while the other is used
//   P  [4][QSR_OT] float         scale, bias, shift of output 1, shift of output 2
//   S  [WARPS][16*WM][20] int32  each warp's accumulators, 16 channels at a time, for the epilogue
// KROW, PROW are padded to an odd number of 16-byte chunks: the 8 rows one ldmatrix reads hit 8 distinct
// bank groups, whatever the row.
// Tiles: 3x3: (WM*WARPS) rows x 16 columns of output pixels, input halo (WM*WARPS+2) x 18; warp w owns tile
// rows WM*w .. WM*w+WM-1 (one m16 fragment each). 1x1: 16*WM*WARPS consecutive pixels, 16*WM per warp.
// A warp's accumulator tile is (16*WM) x QSR_OT: WM = 4 halves the shared-memory traffic per MMA of WM = 2.
// Per K step (32 channels of one tap): A via ldmatrix.x4 per m16, W via ldmatrix.x4 per pair of n8 blocks,
// mma.m16n8k32; a 16-channel remainder (C % 32 == 16, e.g. IMDN's 48) uses ldmatrix.x2 + mma.m16n8k16.
//
// Epilogue, per output (m, o), with v = acc * scale[o] + bias[o]:
//   act 1: v = max(v, 0); act 2: v = v >= 0 ? v : v * slope          (LeakyReLU)
//   HAS_RES: v += res_coef * res[m * res_ld + res_off + o]            (residual of the float output's type)
//   OUT_F:   yf[m * yf_ld + yf_off + (o - yf_c0)] = v               for yf_c0 <= o < yf_c1
//   OUT_Q1:  q1[m * q1_ld + q1_off + (o - q1_c0)] = clamp(rint((v + shift1[o - q1_c0]) * q1_inv), q1_qmin, q1_qmax)
//            for q1_c0 <= o < q1_c1 (the next layer's activation codes); OUT_Q2 likewise (a second consumer).
//            q1_inv = float32(1 / step): a multiply, not the IEEE division of the training quantizer, whose
//            slow-path call would force the accumulators into local memory. The two differ only when the
//            quotient lies within an ulp of a rounding boundary (a code off by one, rarely).
// Every channel range bound, ld and offset is even (checked on the host): each thread stores channel pairs.
#include "qsr_common.cuh"

#ifndef QSR_C
#define QSR_C 64
#endif
#ifndef QSR_KS
#define QSR_KS 3
#endif
#ifndef QSR_OT
#define QSR_OT 64
#endif
#ifndef QSR_WARPS
#define QSR_WARPS 4
#endif
#ifndef QSR_WM
#define QSR_WM 2
#endif
#ifndef QSR_A_SIGNED
#define QSR_A_SIGNED 0
#endif
#ifndef QSR_YF32
#define QSR_YF32 0
#endif
#ifndef QSR_CONV_NAME
#define QSR_CONV_NAME qsr_conv_tc
#endif

#define QSR_TC_HAS_BIAS 1
#define QSR_TC_HAS_RES 2
#define QSR_TC_OUT_F 4
#define QSR_TC_OUT_Q1 8
#define QSR_TC_Q1_SHIFT 16
#define QSR_TC_OUT_Q2 32
#define QSR_TC_Q2_SHIFT 64

#define QSR_TC_K (QSR_KS * QSR_KS * QSR_C)
#define QSR_TC_KROW ((((QSR_TC_K / 16) & 1) != 0) ? QSR_TC_K : QSR_TC_K + 16)
#define QSR_TC_PROW ((((QSR_C / 16) & 1) != 0) ? QSR_C : QSR_C + 16)
#define QSR_TC_THREADS (32 * QSR_WARPS)
#define QSR_TC_NB (QSR_OT / 8)
#if QSR_KS == 3
#define QSR_TC_TH (QSR_WM * QSR_WARPS)
#define QSR_TC_HW 18
#define QSR_TC_HALO ((QSR_TC_TH + 2) * QSR_TC_HW)
#else
#define QSR_TC_HALO (16 * QSR_WM * QSR_WARPS)
#endif
#define QSR_TC_SROW 20  // staging row stride in int32 (16 channels + 4: fewer bank conflicts)
#define QSR_TC_SMEM \
  (QSR_OT * QSR_TC_KROW + 2 * QSR_TC_HALO * QSR_TC_PROW + 16 * QSR_OT + QSR_WARPS * 16 * QSR_WM * QSR_TC_SROW * 4)

#if QSR_C % 16 != 0 || QSR_OT % 16 != 0 || QSR_OT > 64 || (QSR_KS != 1 && QSR_KS != 3) || QSR_WARPS < 1 || QSR_WARPS > 8 || QSR_WM < 1 || QSR_WM > 4
#error "qsr_conv_tc: unsupported specialisation"
#endif

#if QSR_YF32
typedef float qsr_tc_out;
#else
typedef qsr_f16 qsr_tc_out;
#endif

struct QsrTcOut {  // one code output of the epilogue
  qsr_u8* dst;
  const float* shift;  // smem copy (indexed by local channel), valid when the flag says so
  int ld, off, c0, c1, qmin, qmax;
  float inv_step;
};

__device__ __forceinline__ void qsr_tc_store_codes(const QsrTcOut& q, long long m, int o, float v0, float v1,
                                                   float sh0, float sh1) {
  if (o < q.c0 || o >= q.c1) return;
  const float lo = (float)q.qmin, hi = (float)q.qmax;
  const int c0 = (int)fminf(fmaxf(rintf((v0 + sh0) * q.inv_step), lo), hi);
  const int c1 = (int)fminf(fmaxf(rintf((v1 + sh1) * q.inv_step), lo), hi);
  const unsigned short pair = (unsigned short)((c0 & 0xFF) | ((c1 & 0xFF) << 8));
  *reinterpret_cast<unsigned short*>(q.dst + m * q.ld + q.off + (o - q.c0)) = pair;
}

struct QsrTcEpi {  // the float part of the epilogue
  int flags, act, res_ld, res_off, yf_ld, yf_off, yf_c0, yf_c1;
  float slope, res_coef;
};

// One output pixel m, channels o, o+1 (local index ol in the CTA's slice) from the int32 accumulators.
__device__ __forceinline__ void qsr_tc_epilogue(long long m, int o, int ol, int a0, int a1, const float* sp,
                                                const QsrTcEpi& ep, const qsr_tc_out* res, qsr_tc_out* yf,
                                                const QsrTcOut& out1, const QsrTcOut& out2) {
  float v0 = (float)a0 * sp[ol] + sp[QSR_OT + ol];
  float v1 = (float)a1 * sp[ol + 1] + sp[QSR_OT + ol + 1];
  if (ep.act == 1) {
    v0 = fmaxf(v0, 0.0f);
    v1 = fmaxf(v1, 0.0f);
  } else if (ep.act == 2) {
    v0 = v0 >= 0.0f ? v0 : v0 * ep.slope;
    v1 = v1 >= 0.0f ? v1 : v1 * ep.slope;
  }
  if (ep.flags & QSR_TC_HAS_RES) {
    const qsr_tc_out* r = res + m * ep.res_ld + ep.res_off + o;
#if QSR_YF32
    v0 += ep.res_coef * r[0];
    v1 += ep.res_coef * r[1];
#else
    const qsr_u32 rr = *reinterpret_cast<const qsr_u32*>(r);
    v0 += ep.res_coef * qsr_h2f((qsr_f16)(rr & 0xFFFFu));
    v1 += ep.res_coef * qsr_h2f((qsr_f16)(rr >> 16));
#endif
  }
  if ((ep.flags & QSR_TC_OUT_F) && o >= ep.yf_c0 && o < ep.yf_c1) {
    qsr_tc_out* dst = yf + m * ep.yf_ld + ep.yf_off + (o - ep.yf_c0);
#if QSR_YF32
    dst[0] = v0;
    dst[1] = v1;
#else
    *reinterpret_cast<qsr_u32*>(dst) = (qsr_u32)qsr_f2h(v0) | ((qsr_u32)qsr_f2h(v1) << 16);
#endif
  }
  if (ep.flags & QSR_TC_OUT_Q1) qsr_tc_store_codes(out1, m, o, v0, v1, out1.shift[ol], out1.shift[ol + 1]);
  if (ep.flags & QSR_TC_OUT_Q2) qsr_tc_store_codes(out2, m, o, v0, v1, out2.shift[ol], out2.shift[ol + 1]);
}

// Issue the cp.async loads of one input tile (3x3: the halo around the output tile; 1x1: the pixel rows).
__device__ __forceinline__ void qsr_tc_load_tile(qsr_u8* sa, const qsr_u8* x, int tile, int H, int W, long long M) {
  constexpr int CH = QSR_C / 16;  // 16-byte chunks per pixel
#if QSR_KS == 3
  const int ntx = (W + 15) / 16, nty = (H + QSR_TC_TH - 1) / QSR_TC_TH;
  const int tx = tile % ntx, rest = tile / ntx, ty = rest % nty, n = rest / nty;
  const int y0 = ty * QSR_TC_TH - 1, x0 = tx * 16 - 1;
  for (int i = threadIdx.x; i < QSR_TC_HALO * CH; i += QSR_TC_THREADS) {
    const int p = i / CH, q = i - p * CH;
    const int hy = p / QSR_TC_HW, hx = p - hy * QSR_TC_HW;
    const int gy = y0 + hy, gx = x0 + hx;
    const bool ok = gy >= 0 && gy < H && gx >= 0 && gx < W;
    const qsr_u8* src = ok ? x + ((((long long)n * H + gy) * W + gx) * QSR_C + q * 16) : x;
    qsr_cp_async16(sa + p * QSR_TC_PROW + q * 16, src, ok ? 16 : 0);
  }
#else
  (void)H;
  (void)W;
  const long long m0 = (long long)tile * QSR_TC_HALO;
  for (int i = threadIdx.x; i < QSR_TC_HALO * CH; i += QSR_TC_THREADS) {
    const int p = i / CH, q = i - p * CH;
    const bool ok = m0 + p < M;
    const qsr_u8* src = ok ? x + ((m0 + p) * QSR_C + q * 16) : x;
    qsr_cp_async16(sa + p * QSR_TC_PROW + q * 16, src, ok ? 16 : 0);
  }
#endif
}

// Byte offset in the A tile of the row this lane addresses for m16 fragment `mi` (3x3: at tap ky, kx).
__device__ __forceinline__ int qsr_tc_a_row(int warp, int lane, int mi, int ky, int kx) {
  const int px = (lane & 7) + 8 * ((lane >> 3) & 1);  // pixel of the m16 fragment this lane's address is for
#if QSR_KS == 3
  return ((QSR_WM * warp + mi + ky) * QSR_TC_HW + px + kx) * QSR_TC_PROW;
#else
  (void)ky;
  (void)kx;
  return (16 * (QSR_WM * warp + mi) + px) * QSR_TC_PROW;
#endif
}

extern "C" __global__ void __launch_bounds__(QSR_TC_THREADS) QSR_CONV_NAME(
    const qsr_u8* __restrict__ x, const qsr_u8* __restrict__ wq, const float* __restrict__ scale,
    const float* __restrict__ bias, const qsr_tc_out* __restrict__ res, qsr_tc_out* __restrict__ yf,
    qsr_u8* __restrict__ q1, const float* __restrict__ shift1, qsr_u8* __restrict__ q2,
    const float* __restrict__ shift2, int N, int H, int W, int O, int flags, int act, float slope, float res_coef,
    int res_ld, int res_off, int yf_ld, int yf_off, int yf_c0, int yf_c1, int q1_ld, int q1_off, int q1_c0,
    int q1_c1, float q1_inv, int q1_qmin, int q1_qmax, int q2_ld, int q2_off, int q2_c0, int q2_c1,
    float q2_inv, int q2_qmin, int q2_qmax) {
  QSR_DYNAMIC_SMEM(smem);
  if (qsr_dynamic_smem_bytes() < (qsr_u32)QSR_TC_SMEM) __trap();
  qsr_u8* sw = smem;
  qsr_u8* sa = smem + QSR_OT * QSR_TC_KROW;
  float* sp = reinterpret_cast<float*>(sa + 2 * QSR_TC_HALO * QSR_TC_PROW);
  int* sg = reinterpret_cast<int*>(sp + 4 * QSR_OT);  // per-warp epilogue staging
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int o_base = blockIdx.y * QSR_OT;
  const long long M = (long long)N * H * W;
#if QSR_KS == 3
  const int ntx = (W + 15) / 16, nty = (H + QSR_TC_TH - 1) / QSR_TC_TH;
  const int ntiles = N * nty * ntx;
#else
  const int ntiles = (int)((M + QSR_TC_HALO - 1) / QSR_TC_HALO);
#endif

  // Weights of this CTA's channel slice (rows past O are zero) and the per-channel epilogue constants.
  for (int i = tid; i < QSR_OT * (QSR_TC_K / 16); i += QSR_TC_THREADS) {
    const int o = i / (QSR_TC_K / 16), q = i - o * (QSR_TC_K / 16);
    const bool ok = o_base + o < O;
    qsr_cp_async16(sw + o * QSR_TC_KROW + q * 16, ok ? wq + ((long long)(o_base + o) * QSR_TC_K + q * 16) : wq,
                   ok ? 16 : 0);
  }
  for (int i = tid; i < QSR_OT; i += QSR_TC_THREADS) {
    const int o = o_base + i;
    const bool ok = o < O;
    sp[i] = ok ? scale[o] : 0.0f;
    sp[QSR_OT + i] = ok && (flags & QSR_TC_HAS_BIAS) ? bias[o] : 0.0f;
    sp[2 * QSR_OT + i] =
        ok && (flags & QSR_TC_Q1_SHIFT) && o >= q1_c0 && o < q1_c1 ? shift1[o - q1_c0] : 0.0f;
    sp[3 * QSR_OT + i] =
        ok && (flags & QSR_TC_Q2_SHIFT) && o >= q2_c0 && o < q2_c1 ? shift2[o - q2_c0] : 0.0f;
  }
  qsr_cp_async_commit();

  const QsrTcOut out1 = {q1, sp + 2 * QSR_OT, q1_ld, q1_off, q1_c0, q1_c1, q1_qmin, q1_qmax, q1_inv};
  const QsrTcOut out2 = {q2, sp + 3 * QSR_OT, q2_ld, q2_off, q2_c0, q2_c1, q2_qmin, q2_qmax, q2_inv};
  const QsrTcEpi ep = {flags, act, res_ld, res_off, yf_ld, yf_off, yf_c0, yf_c1, slope, res_coef};
  constexpr int TAPS = QSR_KS * QSR_KS;
  constexpr int K32 = QSR_C / 32;
  constexpr bool K16 = (QSR_C % 32) != 0;

  int tile = blockIdx.x;
  if (tile < ntiles) qsr_tc_load_tile(sa, x, tile, H, W, M);
  qsr_cp_async_commit();
  for (int it = 0; tile < ntiles; ++it, tile += gridDim.x) {
    const int next = tile + gridDim.x;
    if (next < ntiles) qsr_tc_load_tile(sa + ((it + 1) & 1) * QSR_TC_HALO * QSR_TC_PROW, x, next, H, W, M);
    qsr_cp_async_commit();
    qsr_cp_async_wait<1>();  // the weights and this tile have landed (only the next tile may be in flight)
    __syncthreads();
    const qsr_u8* at = sa + (it & 1) * QSR_TC_HALO * QSR_TC_PROW;

    int acc[QSR_WM][QSR_TC_NB][4];
    QSR_UNROLL
    for (int mi = 0; mi < QSR_WM; ++mi)
      QSR_UNROLL
      for (int j = 0; j < QSR_TC_NB; ++j)
        QSR_UNROLL
        for (int e = 0; e < 4; ++e) acc[mi][j][e] = 0;

    QSR_NO_UNROLL  // a fully unrolled 9-tap loop keeps too many fragments live (spills); kc stays unrolled
    for (int tap = 0; tap < TAPS; ++tap) {
      const int ky = tap / QSR_KS, kx = tap % QSR_KS;
      int arow[QSR_WM];
      QSR_UNROLL
      for (int mi = 0; mi < QSR_WM; ++mi) arow[mi] = qsr_tc_a_row(warp, lane, mi, ky, kx);
#if defined(__CUDA_ARCH__)
#pragma unroll 2
#endif
      for (int kc = 0; kc < K32; ++kc) {
        const int kb = tap * QSR_C + kc * 32;  // byte offset of this K step in a weight row
        qsr_u32 a[QSR_WM][4];
        QSR_UNROLL
        for (int mi = 0; mi < QSR_WM; ++mi) qsr_ldsm_x4(a[mi], at + arow[mi] + kc * 32 + 16 * (lane >> 4));
        QSR_UNROLL
        for (int jp = 0; jp < QSR_TC_NB / 2; ++jp) {
          const int mat = lane >> 3;
          qsr_u32 b[4];  // b[0], b[1]: n8 block 2jp (k 0-15, 16-31); b[2], b[3]: block 2jp+1
          qsr_ldsm_x4(b, sw + (8 * (2 * jp + (mat >> 1)) + (lane & 7)) * QSR_TC_KROW + kb + 16 * (mat & 1));
          QSR_UNROLL
          for (int mi = 0; mi < QSR_WM; ++mi) {
            qsr_mma_16832<!QSR_A_SIGNED>(acc[mi][2 * jp], a[mi], b);
            qsr_mma_16832<!QSR_A_SIGNED>(acc[mi][2 * jp + 1], a[mi], b + 2);
          }
        }
      }
      if constexpr (K16) {
        const int kb = tap * QSR_C + K32 * 32;
        qsr_u32 a[QSR_WM][2];
        QSR_UNROLL
        for (int mi = 0; mi < QSR_WM; ++mi) qsr_ldsm_x2(a[mi], at + arow[mi] + K32 * 32);
        QSR_UNROLL
        for (int jp = 0; jp < QSR_TC_NB / 2; ++jp) {
          qsr_u32 b[2];  // b[0]: n8 block 2jp, b[1]: block 2jp+1 (k 0-15)
          qsr_ldsm_x2(b, sw + (8 * (2 * jp + ((lane >> 3) & 1)) + (lane & 7)) * QSR_TC_KROW + kb);
          QSR_UNROLL
          for (int mi = 0; mi < QSR_WM; ++mi) {
            qsr_mma_16816<!QSR_A_SIGNED>(acc[mi][2 * jp], a[mi], b);
            qsr_mma_16816<!QSR_A_SIGNED>(acc[mi][2 * jp + 1], a[mi], b + 1);
          }
        }
      }
    }

    // Epilogue, 16 channels (two n8 blocks) at a time: the warp stages its int32 accumulators in its own
    // shared-memory slice, then each lane takes channel pairs (8 lanes = one pixel's 16 channels, so stores
    // are contiguous) through a short loop: compact code, and no accumulator is live across the divisions.
    int* stg = sg + warp * (16 * QSR_WM * QSR_TC_SROW);
    QSR_UNROLL
    for (int jp = 0; jp < QSR_TC_NB / 2; ++jp) {
      QSR_UNROLL
      for (int mi = 0; mi < QSR_WM; ++mi)
        QSR_UNROLL
        for (int jj = 0; jj < 2; ++jj)
          QSR_UNROLL
          for (int half = 0; half < 2; ++half) {
            int* dst = stg + (16 * mi + g + 8 * half) * QSR_TC_SROW + 8 * jj + 2 * t;
            dst[0] = acc[mi][2 * jp + jj][2 * half];
            dst[1] = acc[mi][2 * jp + jj][2 * half + 1];
          }
      qsr_syncwarp();
      for (int pq = lane; pq < 16 * QSR_WM * 8; pq += 32) {
        const int px = pq >> 3, ol = 16 * jp + 2 * (pq & 7), o = o_base + ol;
#if QSR_KS == 3
        const int tx = tile % ntx, rest = tile / ntx, ty = rest % nty, n = rest / nty;
        const int oy = ty * QSR_TC_TH + QSR_WM * warp + (px >> 4), ox = tx * 16 + (px & 15);
        const bool ok = oy < H && ox < W && o < O;
        const long long m = ((long long)n * H + oy) * W + ox;
#else
        const long long m = (long long)tile * QSR_TC_HALO + 16 * QSR_WM * warp + px;
        const bool ok = m < M && o < O;
#endif
        if (ok)
          qsr_tc_epilogue(m, o, ol, stg[px * QSR_TC_SROW + 2 * (pq & 7)], stg[px * QSR_TC_SROW + 2 * (pq & 7) + 1],
                          sp, ep, res, yf, out1, out2);
      }
      qsr_syncwarp();
    }
    __syncthreads();  // everyone is done with this buffer before the load two tiles ahead overwrites it
  }
  qsr_cp_async_wait<0>();
}
