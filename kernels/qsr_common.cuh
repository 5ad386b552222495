// qsr_common.cuh -- shared helpers of the quantsr packed-inference kernels.
//
// Compiled three ways from the same text:
//   * NVRTC (cupy.RawModule; quantsr_cli/backends/cupy_backend.py inlines this header into each .cu),
//   * nvcc -ptx (tests/test_kernels.py, compile-only check without a GPU),
//   * g++ behind tests/kernel_shim/cuda_shim.h (QSR_CPU_SHIM defined): the kernel logic runs on the
//     CPU; every inline-PTX site below has a C++ twin with the same per-lane semantics there.
// Header-free on purpose: NVRTC has no <cstdint> etc. (shared/notes/kernels.md section 4).
//
// Data conventions (DEVELOPERS.md "packing"):
//   weight code u (unsigned, 0..2^b-1), dequantized  w = scale * (u - zero), zero integer or half-integer;
//   conv weight rows (O, kh, kw, I) flattened to K = kh*kw*I codes, each row packed LSB first into
//   ceil(K*b/8) bytes: code j sits in byte j / (8/b) at bit (j % (8/b)) * b;
//   activation code c in [qmin, qmax] stored one per byte (int8 when signed, uint8 when unsigned),
//   x_hat = a_step * c.  Zero padding of the conv (x_hat = 0) is code 0.
#pragma once

typedef unsigned int qsr_u32;
typedef unsigned char qsr_u8;

// Epilogue flags (mirrored by quantsr_cli/backends/cupy_plan.py; a test checks they agree).
#define QSR_HAS_BIAS 1          // y += bias[o]
#define QSR_RELU 2              // y = max(y, 0)            (applied before the residual)
#define QSR_HAS_RES 4           // y += residual[m, o]      (float NHWC, same shape as y)
#define QSR_OUT_FLOAT 8         // write y (float NHWC)
#define QSR_OUT_CODES 16        // write next-layer codes clamp(rint((y + shift[o]) / step), qmin, qmax)
#define QSR_HAS_NEXT_SHIFT 32   // shift[o] present (else 0)
#define QSR_W_PER_CHANNEL 64    // w_scale has O entries (else 1)

// Fixed-trip loops over fragments/accumulators must unroll, or the accumulators go to local memory.
#if defined(__CUDA_ARCH__)
#define QSR_UNROLL _Pragma("unroll")
#define QSR_NO_UNROLL _Pragma("unroll 1")
#else
#define QSR_UNROLL
#define QSR_NO_UNROLL
#endif

// ---------------------------------------------------------------------------------------------
// Inline-PTX sites. Device: the instruction. Shim: qsr_emu_* from cuda_shim.h (plain C loops).
// ---------------------------------------------------------------------------------------------

// __byte_perm(a, b, s): result byte n = byte ((s >> 4n) & 7) of the 8-byte value {b:a} (a = bytes 0-3).
__device__ __forceinline__ qsr_u32 qsr_perm(qsr_u32 a, qsr_u32 b, qsr_u32 sel) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(a, b, sel);
#elif defined(QSR_CPU_SHIM)
  return qsr_emu_byte_perm(a, b, sel);
#else
  return 0u;
#endif
}

// dp4a: c + sum_i a.byte[i] * b.byte[i]; a bytes are u8 (A_UNSIGNED) or s8, b bytes are s8.
template <bool A_UNSIGNED>
__device__ __forceinline__ int qsr_dp4a(qsr_u32 a, qsr_u32 b, int c) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 610
  int d;
  if constexpr (A_UNSIGNED)
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  else
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
#elif defined(__CUDA_ARCH__)
  __trap();
  return 0;
#elif defined(QSR_CPU_SHIM)
  return qsr_emu_dp4a(a, b, c, A_UNSIGNED);
#else
  return 0;
#endif
}

// Warp-wide d += A(16x32) * B(32x8), int8 operands, int32 accumulators:
//   mma.sync.aligned.m16n8k32.row.col.s32.{s8|u8}.s8.s32 (PTX ISA "Matrix Fragments for mma.m16n8k32").
// Per lane: g = lane >> 2 (groupID), t = lane & 3 (threadID_in_group); 4 bytes per register, k ascending:
//   A: a[0] = row g,   k 4t..4t+3      a[1] = row g+8, k 4t..4t+3
//      a[2] = row g,   k 16+4t..+3     a[3] = row g+8, k 16+4t..+3
//   B: b[0] = col g,   k 4t..4t+3      b[1] = col g,   k 16+4t..+3
//   D: d[0], d[1] = row g, cols 2t, 2t+1      d[2], d[3] = row g+8, cols 2t, 2t+1
template <bool A_UNSIGNED>
__device__ __forceinline__ void qsr_mma_16832(int* d, const qsr_u32* a, const qsr_u32* b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (A_UNSIGNED)
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(__CUDA_ARCH__)
  __trap();  // the host picks the dp4a kernels below sm_80
#elif defined(QSR_CPU_SHIM)
  qsr_emu_mma_m16n8k32(d, a, b, A_UNSIGNED);
#endif
}

// ---------------------------------------------------------------------------------------------
// Unpacking packed weight codes to int8 lanes in registers (LSB-first rows, see header comment).
// ---------------------------------------------------------------------------------------------

// 8 four-bit codes (code j at bits 4j..4j+3 of w) -> lo = codes 0..3, hi = codes 4..7 (one per byte).
__device__ __forceinline__ void qsr_unpack_u4x8(qsr_u32 w, qsr_u32& lo, qsr_u32& hi) {
  const qsr_u32 even = w & 0x0F0F0F0Fu;         // bytes: codes 0, 2, 4, 6
  const qsr_u32 odd = (w >> 4) & 0x0F0F0F0Fu;   // bytes: codes 1, 3, 5, 7
  lo = qsr_perm(even, odd, 0x5140u);            // even.b0 odd.b0 even.b1 odd.b1 = codes 0 1 2 3
  hi = qsr_perm(even, odd, 0x7362u);            // even.b2 odd.b2 even.b3 odd.b3 = codes 4 5 6 7
}

// 16 two-bit codes (code j at bits 2j..2j+1 of w) -> out[q] = codes 4q..4q+3.
__device__ __forceinline__ void qsr_unpack_u2x16(qsr_u32 w, qsr_u32* out) {
  const qsr_u32 m0 = w & 0x03030303u;           // bytes: codes 0, 4, 8, 12
  const qsr_u32 m1 = (w >> 2) & 0x03030303u;    // codes 1, 5, 9, 13
  const qsr_u32 m2 = (w >> 4) & 0x03030303u;    // codes 2, 6, 10, 14
  const qsr_u32 m3 = (w >> 6) & 0x03030303u;    // codes 3, 7, 11, 15
  const qsr_u32 p01l = qsr_perm(m0, m1, 0x5140u), p01h = qsr_perm(m0, m1, 0x7362u);  // 0 1 4 5 | 8 9 12 13
  const qsr_u32 p23l = qsr_perm(m2, m3, 0x5140u), p23h = qsr_perm(m2, m3, 0x7362u);  // 2 3 6 7 | 10 11 14 15
  out[0] = qsr_perm(p01l, p23l, 0x5410u);       // 0 1 2 3
  out[1] = qsr_perm(p01l, p23l, 0x7632u);       // 4 5 6 7
  out[2] = qsr_perm(p01h, p23h, 0x5410u);       // 8 9 10 11
  out[3] = qsr_perm(p01h, p23h, 0x7632u);       // 12 13 14 15
}

// Code j of a packed row (generic path: odd channel counts, rows not byte-aligned per tap).
template <int WBITS>
__device__ __forceinline__ qsr_u32 qsr_code_at(const qsr_u8* row, int j) {
  const int bit = j * WBITS;
  return ((qsr_u32)row[bit >> 3] >> (bit & 7)) & ((1u << WBITS) - 1u);
}

// Zero-point fold: four unsigned codes u (bytes, u <= 15) -> four int8 (2u - zero2), zero2 = 2 * zero.
// k4 holds (128 - zero2) in every byte; 2u + 128 - zero2 stays in 0..255 (host-checked), so the byte-wise
// add never carries, and flipping bit 7 turns the biased byte into the two's-complement 2u - zero2.
// The integer GEMM then yields acc = 2 * sum (u - zero) * c exactly, also for half-integer zeros.
__device__ __forceinline__ qsr_u32 qsr_fold_zero(qsr_u32 u4, qsr_u32 k4) {
  return ((u4 << 1) + k4) ^ 0x80808080u;
}

// Activation quantizer of the next layer / of an input: clamp(round_half_even((v + shift) / step)).
// Same float32 operations as torch (add, true division, torch.round == rintf), so codes agree bit-exactly
// for identical v.
__device__ __forceinline__ int qsr_quant_code(float v, float shift, float step, int qmin, int qmax) {
  float q = rintf((v + shift) / step);
  q = fminf(fmaxf(q, (float)qmin), (float)qmax);
  return (int)q;
}

// ---------------------------------------------------------------------------------------------
// Helpers of the tensor-core engine (qsr_conv_tc.cu, qsr_engine_ops.cu). sm_80+ on the device.
// ---------------------------------------------------------------------------------------------
typedef unsigned short qsr_f16;  // IEEE binary16 bits (header-free: no cuda_fp16.h under NVRTC)

#if defined(__CUDA_ARCH__)
// Generic -> shared-window address (what __cvta_generic_to_shared returns), without its header.
__device__ __forceinline__ qsr_u32 qsr_smem_addr(const void* p) {
  qsr_u32 a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}
#endif

// float -> binary16 (round to nearest even) and back; the shim twins are exact software conversions.
__device__ __forceinline__ qsr_f16 qsr_f2h(float f) {
#if defined(__CUDA_ARCH__)
  qsr_f16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
#elif defined(QSR_CPU_SHIM)
  return qsr_emu_f2h(f);
#else
  return 0;
#endif
}

__device__ __forceinline__ float qsr_h2f(qsr_f16 h) {
#if defined(__CUDA_ARCH__)
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#elif defined(QSR_CPU_SHIM)
  return qsr_emu_h2f(h);
#else
  return 0.0f;
#endif
}

// Warp-wide d += A(16x16) * B(16x8), int8 operands (mma.sync.aligned.m16n8k16.row.col.s32.{s8|u8}.s8.s32):
//   A: a[0] = row g, k 4t..4t+3;  a[1] = row g+8, k 4t..4t+3.   B: b[0] = col g, k 4t..4t+3.   D as m16n8k32.
template <bool A_UNSIGNED>
__device__ __forceinline__ void qsr_mma_16816(int* d, const qsr_u32* a, const qsr_u32* b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (A_UNSIGNED)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(b[0]));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(b[0]));
#elif defined(__CUDA_ARCH__)
  __trap();
#elif defined(QSR_CPU_SHIM)
  qsr_emu_mma_m16n8k16(d, a, b, A_UNSIGNED);
#endif
}

// ldmatrix.sync.aligned.m8n8.x{4|2}.shared.b16: every lane passes one row address (lanes 8j..8j+7: the 8
// rows of matrix j, 16 bytes each); lane l receives bytes 4*(l%4)..+3 of row l/4 of matrix j in r[j].
__device__ __forceinline__ void qsr_ldsm_x4(qsr_u32* r, const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  const qsr_u32 a = qsr_smem_addr(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
#elif defined(__CUDA_ARCH__)
  __trap();
#elif defined(QSR_CPU_SHIM)
  qsr_emu_ldmatrix(r, row, 4);
#endif
}

__device__ __forceinline__ void qsr_ldsm_x2(qsr_u32* r, const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  const qsr_u32 a = qsr_smem_addr(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
#elif defined(__CUDA_ARCH__)
  __trap();
#elif defined(QSR_CPU_SHIM)
  qsr_emu_ldmatrix(r, row, 2);
#endif
}

// cp.async.cg.shared.global 16 bytes; src_bytes < 16 zero-fills the rest (0 = all zeros, src not read).
__device__ __forceinline__ void qsr_cp_async16(void* dst, const void* src, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const qsr_u32 a = qsr_smem_addr(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a), "l"(src), "r"(src_bytes));
#elif defined(__CUDA_ARCH__)
  __trap();
#elif defined(QSR_CPU_SHIM)
  qsr_emu_cp_async16(dst, src, src_bytes);
#endif
}

// The lanes of a warp meet (shared-memory exchange within a warp).
__device__ __forceinline__ void qsr_syncwarp() {
#if defined(__CUDA_ARCH__)
  __syncwarp();
#elif defined(QSR_CPU_SHIM)
  qsr_emu_syncwarp();
#endif
}

__device__ __forceinline__ void qsr_cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Wait until at most N of this thread's committed cp.async groups are still pending.
template <int N>
__device__ __forceinline__ void qsr_cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Dynamic shared memory of the launch and its size in bytes.
#if defined(__CUDA_ARCH__)
#define QSR_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
__device__ __forceinline__ qsr_u32 qsr_dynamic_smem_bytes() {
  qsr_u32 r;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
  return r;
}
#elif defined(QSR_CPU_SHIM)
#define QSR_DYNAMIC_SMEM(name) unsigned char* name = qsr_shim_dynamic_smem()
__device__ __forceinline__ qsr_u32 qsr_dynamic_smem_bytes() { return qsr_shim_dynamic_smem_bytes(); }
#else
#define QSR_DYNAMIC_SMEM(name) unsigned char* name = nullptr
__device__ __forceinline__ qsr_u32 qsr_dynamic_smem_bytes() { return 0u; }
#endif
