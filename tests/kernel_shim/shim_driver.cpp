// shim_driver.cpp -- a command-line launcher for kernels/*.cu compiled on the CPU (tests only).
//
//   qsr_shim --list                 one line per kernel: "<name> <tags>" (P pointer, i int, f float)
//   qsr_shim IN.bin OUT.bin         run one launch described by IN.bin, write every buffer to OUT.bin
//
// IN.bin (little endian): "QSRL", u32 name length, name, u32 grid[3], u32 block[3], u32 dynamic shared
// memory bytes, u32 nargs, then
// per argument a tag byte and its value: 'P' u64 nbytes + bytes | 'i' i32 | 'f' f32.
// OUT.bin: per 'P' argument, in order, u64 nbytes + bytes after the launch.
// Each buffer gets its own exactly-sized allocation, so a sanitizer build catches out-of-bounds access.
// The argument tags are checked against the kernel's C++ signature (a plan/kernel mismatch fails loudly).
#include "cuda_shim.h"

#include "qsr_conv_tc.cu"  // one specialisation per binary: -DQSR_C=... (see kernel_harness.shim_exe_path)
#include "qsr_engine_ops.cu"
#include "qsr_packed_gemm.cu"
#include "qsr_quant_act.cu"

#include <string>
#include <type_traits>
#include <utility>

namespace {

template <class T>
constexpr char tag_of() {
  if constexpr (std::is_pointer_v<T>) return 'P';
  else if constexpr (std::is_same_v<T, int>) return 'i';
  else if constexpr (std::is_same_v<T, float>) return 'f';
  else return '?';
}

struct Entry {
  const char* name;
  std::string tags;
  std::function<void(void**)> call;
};

template <class... A, size_t... I>
void invoke(void (*fn)(A...), void** args, std::index_sequence<I...>) {
  fn(*static_cast<std::remove_cv_t<A>*>(args[I])...);
}

template <class... A>
Entry entry(const char* name, void (*fn)(A...)) {
  return {name, std::string{tag_of<A>()...}, [fn](void** args) { invoke(fn, args, std::index_sequence_for<A...>{}); }};
}

#define QSR_ENTRY(k) entry(#k, k)
#define QSR_STR2(x) #x
#define QSR_STR(x) QSR_STR2(x)
const std::vector<Entry>& table() {
  static const std::vector<Entry> t = {
      QSR_ENTRY(qsr_quantize_act),    QSR_ENTRY(qsr_conv_mma_w4_s8),  QSR_ENTRY(qsr_conv_mma_w4_u8),
      QSR_ENTRY(qsr_conv_mma_w2_s8),  QSR_ENTRY(qsr_conv_mma_w2_u8),  QSR_ENTRY(qsr_conv_dp4a_w4_s8),
      QSR_ENTRY(qsr_conv_dp4a_w4_u8), QSR_ENTRY(qsr_conv_dp4a_w2_s8), QSR_ENTRY(qsr_conv_dp4a_w2_u8),
      entry(QSR_STR(QSR_CONV_NAME), QSR_CONV_NAME),       QSR_ENTRY(qsr_quant_nhwc_f16),  QSR_ENTRY(qsr_channel_stats_f16),
      QSR_ENTRY(qsr_quant_nhwc_f32),  QSR_ENTRY(qsr_channel_stats_f32),
  };
  return t;
}

[[noreturn]] void die(const std::string& msg) {
  fprintf(stderr, "qsr_shim: %s\n", msg.c_str());
  exit(2);
}

struct Reader {
  FILE* f;
  template <class T>
  T get() {
    T v;
    if (fread(&v, sizeof(T), 1, f) != 1) die("truncated launch file");
    return v;
  }
  void bytes(void* dst, size_t n) {
    if (n && fread(dst, 1, n, f) != n) die("truncated launch file");
  }
};

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "--list") {
    for (const Entry& e : table()) printf("%s %s\n", e.name, e.tags.c_str());
    return 0;
  }
  if (argc != 3) die("usage: qsr_shim --list | qsr_shim IN.bin OUT.bin");
  FILE* in = fopen(argv[1], "rb");
  if (!in) die(std::string("cannot open ") + argv[1]);
  Reader r{in};
  char magic[4];
  r.bytes(magic, 4);
  if (memcmp(magic, "QSRL", 4) != 0) die("bad magic");
  std::string name(r.get<unsigned>(), '\0');
  r.bytes(name.data(), name.size());
  dim3 grid, block;
  grid.x = r.get<unsigned>(), grid.y = r.get<unsigned>(), grid.z = r.get<unsigned>();
  block.x = r.get<unsigned>(), block.y = r.get<unsigned>(), block.z = r.get<unsigned>();
  const unsigned smem = r.get<unsigned>();
  const unsigned nargs = r.get<unsigned>();

  struct Arg {
    char tag;
    void* ptr = nullptr;  // 'P': the buffer
    size_t nbytes = 0;
    int i = 0;
    float f = 0.0f;
  };
  std::vector<Arg> args(nargs);
  std::string tags;
  for (Arg& a : args) {
    a.tag = r.get<char>();
    tags += a.tag;
    if (a.tag == 'P') {
      a.nbytes = (size_t)r.get<unsigned long long>();
      if (posix_memalign(&a.ptr, 64, a.nbytes ? a.nbytes : 1) != 0) die("out of memory");
      r.bytes(a.ptr, a.nbytes);
    } else if (a.tag == 'i') {
      a.i = r.get<int>();
    } else if (a.tag == 'f') {
      a.f = r.get<float>();
    } else {
      die(std::string("bad argument tag ") + a.tag);
    }
  }
  fclose(in);

  const Entry* e = nullptr;
  for (const Entry& cand : table())
    if (name == cand.name) e = &cand;
  if (!e) die("unknown kernel " + name);
  if (e->tags != tags) die(name + ": argument tags " + tags + " do not match the signature " + e->tags);

  std::vector<void*> ptrs(nargs);
  for (unsigned k = 0; k < nargs; ++k)
    ptrs[k] = args[k].tag == 'P' ? (void*)&args[k].ptr : args[k].tag == 'i' ? (void*)&args[k].i : (void*)&args[k].f;
  qsr_shim::launch(grid, block, [&] { e->call(ptrs.data()); }, smem);

  FILE* out = fopen(argv[2], "wb");
  if (!out) die(std::string("cannot open ") + argv[2]);
  for (Arg& a : args) {
    if (a.tag != 'P') continue;
    const unsigned long long n = a.nbytes;
    fwrite(&n, sizeof n, 1, out);
    if (n) fwrite(a.ptr, 1, a.nbytes, out);
    free(a.ptr);
  }
  fclose(out);
  return 0;
}
