// cuda_shim.h -- run quantsr's CUDA kernels (kernels/*.cu, unchanged) on the CPU under g++, for tests.
//
// Execution model: blocks run one after another; the threads of a block are fibers (ucontext) on one
// OS thread, deterministic. A fiber runs until it reaches a barrier, then the next runnable fiber runs:
//   * __syncthreads(): a fiber waits until every live thread of the block waits there too;
//   * warp collectives (the emulated mma.sync): the 32 lanes of a warp wait for each other.
// A barrier that can never complete (divergent __syncthreads / mma, exited threads) is reported as an
// error, as is __trap(). `__shared__` becomes `static` (one copy, valid because blocks run one at a time).
// The inline-PTX twins below follow the PTX ISA semantics, written independently of the kernels:
// __byte_perm, dp4a.{u32|s32}.s32 and mma.sync.aligned.m16n8k32.row.col.s32.{u8|s8}.s8.s32 with the
// per-lane fragment layouts of "Matrix Fragments for mma.m16n8k32".
// AddressSanitizer (-fsanitize=address) is told about the fiber stacks, so kernels' out-of-bounds global
// reads/writes are caught in the driver's exactly-sized buffers.
#pragma once
#define QSR_CPU_SHIM 1

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <functional>
#include <memory>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define QSR_SHIM_START_SWITCH(save, bottom, size) __sanitizer_start_switch_fiber(save, bottom, size)
#define QSR_SHIM_FINISH_SWITCH(save, bottom, size) __sanitizer_finish_switch_fiber(save, bottom, size)
#else
#define QSR_SHIM_START_SWITCH(save, bottom, size) ((void)0)
#define QSR_SHIM_FINISH_SWITCH(save, bottom, size) ((void)0)
#endif

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

namespace qsr_shim {

enum State { kRunnable, kWaitBlock, kWaitWarp, kDone };

struct Fiber {
  ucontext_t ctx;
  State st = kRunnable;
  unsigned lin = 0;        // linear thread index in the block
  unsigned mma_calls = 0;  // selects the mma exchange slot (double-buffered)
  dim3 tid;
  void* fake_stack = nullptr;
};

struct MmaSlot {  // one warp's operands of one collective: mma fragments a/b, or ldmatrix row pointers p
  unsigned a[32][4];
  unsigned b[32][2];
  const unsigned char* p[32];
};

struct Sched {
  static constexpr size_t kStack = 64 * 1024;
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::vector<MmaSlot> mma;  // 2 per warp
  std::vector<unsigned char> dyn_smem;  // the launch's dynamic shared memory (blocks run one at a time)
  ucontext_t sched;
  int cur = -1;
  std::function<void()> body;
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
  void* sched_fake = nullptr;
};

inline Sched* g = nullptr;

[[noreturn]] inline void fail(const char* what) {
  fprintf(stderr, "cuda_shim: %s (block %u,%u,%u thread %u)\n", what, blockIdx.x, blockIdx.y, blockIdx.z,
          g && g->cur >= 0 ? g->fibers[g->cur].lin : 0u);
  exit(3);
}

// Called by a fiber: park in state s and return to the scheduler until released.
inline void wait(State s) {
  Fiber& f = g->fibers[g->cur];
  f.st = s;
  QSR_SHIM_START_SWITCH(&f.fake_stack, g->sched_bottom, g->sched_size);
  swapcontext(&f.ctx, &g->sched);
  QSR_SHIM_FINISH_SWITCH(f.fake_stack, &g->sched_bottom, &g->sched_size);
}

inline void fiber_entry() {
  QSR_SHIM_FINISH_SWITCH(nullptr, &g->sched_bottom, &g->sched_size);
  g->body();
  g->fibers[g->cur].st = kDone;
  QSR_SHIM_START_SWITCH(nullptr, g->sched_bottom, g->sched_size);  // this fiber's stack dies
}  // returns through uc_link to the scheduler

// getcontext "returns twice" in the compiler's eyes; keep it out of the scheduler loop's frame.
__attribute__((noinline)) inline void init_fiber(unsigned i) {
  Fiber& f = g->fibers[i];
  f = Fiber();
  f.lin = i;
  f.tid.x = i % blockDim.x;
  f.tid.y = (i / blockDim.x) % blockDim.y;
  f.tid.z = i / (blockDim.x * blockDim.y);
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = g->stacks[i].get();
  f.ctx.uc_stack.ss_size = Sched::kStack;
  f.ctx.uc_link = &g->sched;
  makecontext(&f.ctx, fiber_entry, 0);
}

inline void run_block(unsigned n) {
  for (unsigned i = 0; i < n; ++i) init_fiber(i);
  for (;;) {
    for (unsigned i = 0; i < n; ++i) {
      if (g->fibers[i].st != kRunnable) continue;
      g->cur = (int)i;
      threadIdx = g->fibers[i].tid;
      QSR_SHIM_START_SWITCH(&g->sched_fake, g->stacks[i].get(), Sched::kStack);
      swapcontext(&g->sched, &g->fibers[i].ctx);
      QSR_SHIM_FINISH_SWITCH(g->sched_fake, nullptr, nullptr);
    }
    g->cur = -1;
    unsigned done = 0, at_block = 0;
    for (unsigned i = 0; i < n; ++i) {
      done += g->fibers[i].st == kDone;
      at_block += g->fibers[i].st == kWaitBlock;
    }
    if (done == n) return;
    bool released = false;
    for (unsigned w = 0; w * 32 < n; ++w) {  // warp barriers
      const unsigned end = (w + 1) * 32 < n ? (w + 1) * 32 : n;
      bool all = true;
      for (unsigned i = w * 32; i < end; ++i) all = all && g->fibers[i].st == kWaitWarp;
      if (!all) continue;
      if (end - w * 32 != 32) fail("warp collective in a partial warp");
      for (unsigned i = w * 32; i < end; ++i) g->fibers[i].st = kRunnable;
      released = true;
    }
    if (!released && at_block > 0 && at_block + done == n) {
      if (done > 0) fail("__syncthreads() reached after some threads of the block exited");
      for (unsigned i = 0; i < n; ++i) g->fibers[i].st = kRunnable;
      released = true;
    }
    if (!released) fail("deadlock: threads wait at different barriers (divergent __syncthreads or mma)");
  }
}

// Run body() as every thread of every block of the grid, with `smem` bytes of dynamic shared memory.
inline void launch(dim3 grid, dim3 block, std::function<void()> body, size_t smem = 0) {
  Sched st;
  g = &st;
  st.dyn_smem.assign(smem, 0xA5);  // garbage, as on a GPU: kernels must not rely on zeroed shared memory
  const unsigned n = block.x * block.y * block.z;
  st.fibers.resize(n);
  st.stacks.resize(n);
  for (auto& s : st.stacks) s.reset(new char[Sched::kStack]);
  st.mma.resize(2 * ((n + 31) / 32));
  st.body = std::move(body);
  gridDim = grid;
  blockDim = block;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx.x = x;
        blockIdx.y = y;
        blockIdx.z = z;
        run_block(n);
      }
  g = nullptr;
}

}  // namespace qsr_shim

inline void __syncthreads() { qsr_shim::wait(qsr_shim::kWaitBlock); }
inline unsigned char* qsr_shim_dynamic_smem() {
  return qsr_shim::g->dyn_smem.empty() ? nullptr : qsr_shim::g->dyn_smem.data();
}
inline unsigned qsr_shim_dynamic_smem_bytes() { return (unsigned)qsr_shim::g->dyn_smem.size(); }
[[noreturn]] inline void __trap() { qsr_shim::fail("__trap()"); }

// __byte_perm(a, b, s): byte n of the result = byte ((s >> 4n) & 7) of the 64-bit value (b << 32) | a.
inline unsigned qsr_emu_byte_perm(unsigned a, unsigned b, unsigned s) {
  const unsigned long long v = ((unsigned long long)b << 32) | a;
  unsigned r = 0;
  for (int n = 0; n < 4; ++n) r |= (unsigned)((v >> (8 * ((s >> (4 * n)) & 7u))) & 0xFFu) << (8 * n);
  return r;
}

// dp4a.{u32|s32}.s32: c + sum over the 4 byte lanes of a[i] (u8 or s8) * b[i] (s8).
inline int qsr_emu_dp4a(unsigned a, unsigned b, int c, bool a_unsigned) {
  for (int i = 0; i < 4; ++i) {
    const unsigned ab = (a >> (8 * i)) & 0xFFu;
    const int av = a_unsigned ? (int)ab : (int)(signed char)ab;
    c += av * (int)(signed char)((b >> (8 * i)) & 0xFFu);
  }
  return c;
}

// mma.sync.aligned.m16n8k32.row.col.s32.{u8|s8}.s8.s32, d += A * B, emulated per lane:
// every lane deposits its fragments, the warp meets, then each lane computes its own 4 outputs.
// Layouts (PTX ISA, groupID g = lane >> 2, threadID_in_group t = lane % 4, 4 bytes per register):
//   A(r, k) is in lane 4*(r % 8) + (k % 16) / 4, register (r / 8) + 2 * (k / 16), byte k % 4
//   B(k, n) is in lane 4*n + (k % 16) / 4,       register k / 16,                 byte k % 4
//   d[e] of lane (g, t) is D(g + 8 * (e / 2), 2t + e % 2)
inline void qsr_emu_mma_m16n8k32(int* d, const unsigned* a, const unsigned* b, bool a_unsigned) {
  using namespace qsr_shim;
  Fiber& f = g->fibers[g->cur];
  const unsigned warp = f.lin >> 5, lane = f.lin & 31u;
  MmaSlot& s = g->mma[2 * warp + (f.mma_calls++ & 1u)];
  memcpy(s.a[lane], a, sizeof(s.a[lane]));
  memcpy(s.b[lane], b, sizeof(s.b[lane]));
  wait(kWaitWarp);
  const unsigned gid = lane >> 2, t = lane & 3u;
  for (unsigned e = 0; e < 4; ++e) {
    const unsigned r = gid + 8 * (e >> 1), n = 2 * t + (e & 1u);
    int sum = 0;
    for (unsigned k = 0; k < 32; ++k) {
      const unsigned ab = (s.a[4 * (r % 8) + (k % 16) / 4][r / 8 + 2 * (k / 16)] >> (8 * (k % 4))) & 0xFFu;
      const unsigned bb = (s.b[4 * n + (k % 16) / 4][k / 16] >> (8 * (k % 4))) & 0xFFu;
      sum += (a_unsigned ? (int)ab : (int)(signed char)ab) * (int)(signed char)bb;
    }
    d[e] += sum;
  }
}

// mma.sync.aligned.m16n8k16.row.col.s32.{u8|s8}.s8.s32: A(r, k) in lane 4*(r % 8) + k / 4, register r / 8,
// byte k % 4; B(k, n) in lane 4*n + k / 4, register 0, byte k % 4; D as m16n8k32.
inline void qsr_emu_mma_m16n8k16(int* d, const unsigned* a, const unsigned* b, bool a_unsigned) {
  using namespace qsr_shim;
  Fiber& f = g->fibers[g->cur];
  const unsigned warp = f.lin >> 5, lane = f.lin & 31u;
  MmaSlot& s = g->mma[2 * warp + (f.mma_calls++ & 1u)];
  memcpy(s.a[lane], a, 2 * sizeof(unsigned));
  s.b[lane][0] = b[0];
  wait(kWaitWarp);
  const unsigned gid = lane >> 2, t = lane & 3u;
  for (unsigned e = 0; e < 4; ++e) {
    const unsigned r = gid + 8 * (e >> 1), n = 2 * t + (e & 1u);
    int sum = 0;
    for (unsigned k = 0; k < 16; ++k) {
      const unsigned ab = (s.a[4 * (r % 8) + k / 4][r / 8] >> (8 * (k % 4))) & 0xFFu;
      const unsigned bb = (s.b[4 * n + k / 4][0] >> (8 * (k % 4))) & 0xFFu;
      sum += (a_unsigned ? (int)ab : (int)(signed char)ab) * (int)(signed char)bb;
    }
    d[e] += sum;
  }
}

// ldmatrix.sync.aligned.m8n8.x{2|4}.shared.b16: lanes 8j..8j+7 give the row addresses of matrix j; lane l
// gets bytes 4*(l % 4)..+3 of row l / 4 of matrix j in r[j]. Addresses must be 16-byte aligned.
inline void qsr_emu_ldmatrix(unsigned* r, const void* row, int nmat) {
  using namespace qsr_shim;
  Fiber& f = g->fibers[g->cur];
  const unsigned warp = f.lin >> 5, lane = f.lin & 31u;
  if (((unsigned long long)row & 15ull) != 0ull) fail("ldmatrix row address not 16-byte aligned");
  const unsigned char* lo = g->dyn_smem.data();
  const unsigned char* p = static_cast<const unsigned char*>(row);
  if (lane < 8u * (unsigned)nmat && (g->dyn_smem.empty() || p < lo || p + 16 > lo + g->dyn_smem.size()))
    fail("ldmatrix row outside the dynamic shared memory");
  MmaSlot& s = g->mma[2 * warp + (f.mma_calls++ & 1u)];
  s.p[lane] = p;
  wait(kWaitWarp);
  for (int j = 0; j < nmat; ++j) memcpy(&r[j], s.p[8 * j + (lane >> 2)] + 4 * (lane & 3u), 4);
}

// cp.async 16 bytes: src_bytes (0..16) copied, the rest of the 16 zero-filled. Synchronous here.
inline void qsr_emu_cp_async16(void* dst, const void* src, int src_bytes) {
  if (((unsigned long long)dst & 15ull) != 0ull || (src_bytes > 0 && ((unsigned long long)src & 15ull) != 0ull))
    qsr_shim::fail("cp.async address not 16-byte aligned");
  if (src_bytes < 0 || src_bytes > 16) qsr_shim::fail("cp.async src size out of range");
  if (src_bytes > 0) memcpy(dst, src, (size_t)src_bytes);
  memset(static_cast<unsigned char*>(dst) + src_bytes, 0, (size_t)(16 - src_bytes));
}

// IEEE binary16 <-> float32, round to nearest even (cvt.rn.f16.f32 / cvt.f32.f16).
inline unsigned short qsr_emu_f2h(float f) {
  unsigned x;
  memcpy(&x, &f, 4);
  const unsigned sign = (x >> 16) & 0x8000u;
  const unsigned ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) return (unsigned short)(sign | (ax > 0x7F800000u ? 0x7E00u : 0x7C00u));  // NaN / inf
  if (ax >= 0x477FF000u) return (unsigned short)(sign | 0x7C00u);  // rounds to >= 65520: overflow to inf
  if (ax < 0x38800000u) {  // result subnormal (or zero): value / 2^-24, rounded half to even
    const int e = (int)(ax >> 23);
    if (e < 102) return (unsigned short)sign;  // < 2^-25: rounds to 0
    const unsigned mant = (ax & 0x7FFFFFu) | 0x800000u;
    const int shift = 126 - e;  // value = mant * 2^(e-150); in units of 2^-24: mant >> (126 - e)
    unsigned q = mant >> shift;
    const unsigned rem = mant & ((1u << shift) - 1u), halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
    return (unsigned short)(sign | q);
  }
  unsigned h = ((ax >> 13) - (112u << 10));  // rebias exponent 127 -> 15, keep 10 mantissa bits
  const unsigned rem = ax & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent: still correct
  return (unsigned short)(sign | h);
}

inline float qsr_emu_h2f(unsigned short h) {
  const unsigned sign = ((unsigned)h & 0x8000u) << 16;
  const unsigned e = ((unsigned)h >> 10) & 0x1Fu, m = (unsigned)h & 0x3FFu;
  unsigned x;
  if (e == 0x1Fu) {
    x = sign | 0x7F800000u | (m << 13);
  } else if (e != 0u) {
    x = sign | ((e + 112u) << 23) | (m << 13);
  } else if (m == 0u) {
    x = sign;
  } else {  // subnormal: m * 2^-24
    float v = (float)m * 5.9604644775390625e-08f;
    memcpy(&x, &v, 4);
    x |= sign;
  }
  float f;
  memcpy(&f, &x, 4);
  return f;
}

// __syncwarp(): the 32 lanes of the warp meet.
inline void qsr_emu_syncwarp() {
  using namespace qsr_shim;
  Fiber& f = g->fibers[g->cur];
  ++f.mma_calls;  // keep the collective counter in step with the other lanes
  wait(kWaitWarp);
}
