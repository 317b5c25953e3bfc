// Runtime of the CUDA emulation (declarations and overview in cuda_emu_runtime.h).
//
// Fibers. Each thread of a block runs on its own stack; a hand-rolled context switch (x86-64; a
// ucontext fallback elsewhere) moves between the scheduler and a fiber. A fiber runs until it
// reaches __syncthreads, a warp collective or its end. The scheduler resumes ready fibers in thread
// order until none is ready; then either every live thread waits at the same __syncthreads (the
// barrier completes: a new epoch begins and all resume; if some threads had exited, as bar.sync
// allows, the non-uniform __syncthreads is reported) or the block is stuck and the run reports why
// (threads at different __syncthreads, a collective waiting on lanes that are elsewhere or exited)
// and abandons the block. A fatal fault (out of bounds, misaligned) abandons it too.
//
// Warp collectives. A lane deposits its operands in its warp's slot and waits; the lane completing
// the set (same operation, line and mask for all) computes every lane's result, writes each into
// that lane's output and makes the others ready. mma.sync gathers the 32 lanes' A, B, C fragments
// by the PTX ISA's tables, computes D = A B + C in fp32 and scatters D the same way. ldmatrix: each
// lane reads the 16-byte row it addresses as it arrives (a checked shared read by that lane); the
// completing lane hands every lane its registers by the ISA's table (with .trans, the transpose).
//
// Asynchronous copies (cp.async.cg.shared.global, 16 bytes). At issue the source is read and the
// destination counts as written by the issuing thread in that barrier interval (a race with another
// thread's access there is reported), and its bytes become "in flight": any access to them by any
// thread before the copy completes is reported (cp_async_in_flight), and they keep their old bytes.
// cp.async.commit_group closes the thread's open copies into a group; cp.async.wait_group n
// completes all but the n most recent groups: only then are the bytes written, as a write by the
// issuing thread in the waiting interval, so another thread still needs a barrier to read them.
//
// Memory checkers (the kernel translation unit is compiled with -fsanitize=thread, so GCC calls
// __tsan_readN / __tsan_writeN(addr) before each of its loads and stores; those hooks are here):
// - the thread's own stack is local memory: never checked;
// - shared memory (the arena behind extern __shared__): an access outside [0, dynamic size) of the
//   launch is fatal (the kernel is stopped, as a GPU would fault); a read of a byte no thread of the
//   block has written is reported; two different threads touching one byte between two barriers
//   (one epoch), at least one of them writing, is a race (atomics excluded). Shadow per byte: the
//   last writer and its epoch, the last reader, its epoch and whether several threads read it;
// - the parameter block is read-only;
// - global memory, once buffers are registered: an access outside every registered buffer is fatal;
//   within a launch, two accesses to one byte by different threads that no barrier orders (another
//   block, or the same block in the same epoch), one a plain write, are a race; atomics do not race
//   with each other;
// - accesses must be naturally aligned (fatal otherwise).
#include "cuda_emu_runtime.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <deque>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#if !defined(__x86_64__) || defined(RA_EMU_UCONTEXT)
#define RA_EMU_USE_UCONTEXT 1
#include <ucontext.h>
#endif

// A new fiber's first function (its argument: the fiber); runs the thread, never returns.
extern "C" __attribute__((visibility("hidden"), used)) void ra_emu_fiber_entry(void* fiber);
#if !defined(RA_EMU_USE_UCONTEXT)
extern "C" void ra_emu_switch(void** save_sp, void* load_sp);  // defined in assembly below
extern "C" void ra_emu_trampoline();
#endif

namespace ringattn_emu {
namespace {

// ---- device limits (sm_89: the architecture attn_cuda.cu sizes its tiles for) --------------------

constexpr size_t kDefaultSmem = 48 * 1024;  // dynamic shared memory without the opt-in attribute
constexpr size_t kMaxSmemOptin = 101376;    // cudaDevAttrMaxSharedMemoryPerBlockOptin on sm_89
constexpr unsigned kMaxThreads = 1024;
constexpr size_t kStackBytes = 256 * 1024;  // per fiber, plus a guard page below
constexpr size_t kMessagesPerCategory = 8;

enum Err : int {
  kOk = 0,
  kInvalidValue = 1,
  kInvalidConfiguration = 9,
  kIllegalAddress = 700,
  kMisalignedAddress = 716,
  kLaunchFailure = 719,
};

// ---- report ----------------------------------------------------------------------------------------

struct Report {
  std::map<std::string, size_t> counts;
  std::vector<std::string> messages;
  std::map<std::string, size_t> messages_per_category;
  std::vector<std::string> launches;
};
Report g_report;
int g_last_error = kOk;
bool g_dry_run = false;  // check launch configurations, run no block
std::map<const void*, size_t> g_max_smem;  // kernel -> cudaFuncAttributeMaxDynamicSharedMemorySize

void report(const char* category, const std::string& message) {
  g_report.counts[category]++;
  if (g_report.messages_per_category[category]++ < kMessagesPerCategory) {
    g_report.messages.push_back(std::string(category) + ": " + message);
  }
}

template <class... Args>
std::string format(const char* fmt, Args... args) {
  char buf[1024];
  std::snprintf(buf, sizeof buf, fmt, args...);
  return buf;
}

std::string json_escape(const std::string& s) {
  std::string out;
  for (char ch : s) {
    if (ch == '"' || ch == '\\') {
      out += '\\';
      out += ch;
    } else if (static_cast<unsigned char>(ch) < 0x20) {
      out += format("\\u%04x", ch);
    } else {
      out += ch;
    }
  }
  return out;
}

// ---- context switching -------------------------------------------------------------------------

#if !defined(RA_EMU_USE_UCONTEXT)
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores
// the stack pointer in *save_sp, then restores the same from load_sp. A new fiber's stack is
// prepared (init_stack) so that this "returns" into ra_emu_trampoline with the fiber in r12.
asm(R"(
    .text
    .p2align 4
    .globl ra_emu_switch
    .hidden ra_emu_switch
    .type ra_emu_switch, @function
ra_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size ra_emu_switch, .-ra_emu_switch

    .p2align 4
    .globl ra_emu_trampoline
    .hidden ra_emu_trampoline
    .type ra_emu_trampoline, @function
ra_emu_trampoline:
    movq %r12, %rdi
    call ra_emu_fiber_entry
    ud2
    .size ra_emu_trampoline, .-ra_emu_trampoline
)");
#endif

enum class St : uint8_t { Ready, Barrier, Warp, Done };

struct CpCopy {  // one cp.async: 16 bytes to `dst` (shared), its source's bytes read at issue
  unsigned char* dst;
  unsigned char data[16];
};

struct Fiber {
  void* sp = nullptr;
#if defined(RA_EMU_USE_UCONTEXT)
  ucontext_t uc;
#endif
  unsigned char* lo = nullptr;  // usable stack [lo, hi)
  unsigned char* hi = nullptr;
  unsigned tid = 0;
  St state = St::Ready;
  const char* wait_file = "";
  int wait_line = 0;
  const char* last_barrier_file = "";
  int last_barrier_line = 0;  // 0: none passed yet (kernel start)
  // > 0 while emulator code runs on this fiber: its memory accesses are not the kernel's. (Inline
  // library code such as std::string may be the instrumented copy from the kernel's translation
  // unit: the linker keeps one copy of each.)
  int in_emulator = 0;
  std::vector<CpCopy> cp_open;                // issued, not yet committed
  std::deque<std::vector<CpCopy>> cp_groups;  // committed, oldest first
};

constexpr int kShfl = 1, kMma = 2, kLdm = 3;

struct MmaIn {
  uint32_t a[4], b[2];
  float c[4];
};
struct ShflIn {
  uint64_t bits;
  int arg;
};
struct LdmIn {
  uint16_t row[4][8];  // the rows this lane addressed, one per matrix it addresses (lane 8 m + r: matrix m)
};
union LaneIn {
  MmaIn mma;
  ShflIn shfl;
  LdmIn ldm;
};

struct WarpSlot {
  uint32_t arrived = 0;  // lanes waiting in the current collective
  uint32_t mask = 0;
  int op = 0, line = 0, mode = 0, width = 0;
  const char* ptx = "";
  LaneIn in[32];
  void* out[32];
};

struct Run {
  LaunchConfig cfg;
  void (*thread_main)(void*) = nullptr;
  void* ctx = nullptr;
  unsigned threads = 0;
  Dim3 block{0, 0, 0};
  uint64_t block_linear = 0;
  std::vector<Fiber> fibers;
  std::vector<WarpSlot> warps;
  void* sched_sp = nullptr;
#if defined(RA_EMU_USE_UCONTEXT)
  ucontext_t sched_uc;
#endif
  bool abort = false;
  int abort_error = kOk;
  uint64_t atomics = 0;  // atomic accesses of the whole grid (the launch record's "atomics")
};

Run* g_run = nullptr;
Fiber* g_cur = nullptr;
uintptr_t g_stack_lo = 0, g_stack_size = 0;  // the running fiber's stack (hot path)
uint32_t g_epoch = 1;                         // barrier intervals, monotonic over all blocks
uint32_t g_block_epoch0 = 1;                  // the running block's first epoch
uint32_t g_launch_id = 0;

// All fiber stacks live in one mapping, so "another thread's stack" is one range test.
unsigned char* g_pool = nullptr;
constexpr size_t kPageBytes = 4096;
constexpr size_t kSlotBytes = kStackBytes + kPageBytes;

unsigned char* stack_pool() {
  if (g_pool == nullptr) {
    void* p = mmap(nullptr, kSlotBytes * kMaxThreads, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      std::fprintf(stderr, "ringattn_emu: cannot map fiber stacks\n");
      std::abort();
    }
    g_pool = static_cast<unsigned char*>(p);
    for (unsigned i = 0; i < kMaxThreads; ++i) mprotect(g_pool + i * kSlotBytes, kPageBytes, PROT_NONE);
  }
  return g_pool;
}

bool in_pool(uintptr_t a) {
  return g_pool != nullptr && a - reinterpret_cast<uintptr_t>(g_pool) < kSlotBytes * kMaxThreads;
}

#if !defined(RA_EMU_USE_UCONTEXT)
void* init_stack(Fiber& f) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(f.hi) & ~uintptr_t{15}) - 16;  // rsp after the first ret
  uint64_t* sp = reinterpret_cast<uint64_t*>(top - 64);
  uint32_t mxcsr = __builtin_ia32_stmxcsr();
  uint16_t fpcw = 0;
  asm volatile("fnstcw %0" : "=m"(fpcw));
  sp[0] = mxcsr | (static_cast<uint64_t>(fpcw) << 32);
  sp[1] = sp[2] = sp[3] = 0;                       // r15, r14, r13
  sp[4] = reinterpret_cast<uint64_t>(&f);          // r12: the trampoline's argument
  sp[5] = sp[6] = 0;                               // rbx, rbp
  sp[7] = reinterpret_cast<uint64_t>(&ra_emu_trampoline);
  return sp;
}

void switch_to_fiber(Run& r, Fiber& f) { ra_emu_switch(&r.sched_sp, f.sp); }
void switch_to_scheduler(Run& r, Fiber& f) { ra_emu_switch(&f.sp, r.sched_sp); }
#else
void uc_entry(unsigned hi, unsigned lo) {
  ra_emu_fiber_entry(reinterpret_cast<void*>((static_cast<uintptr_t>(hi) << 32) | lo));
}
void* init_stack(Fiber& f) {
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = f.lo;
  f.uc.uc_stack.ss_size = static_cast<size_t>(f.hi - f.lo);
  f.uc.uc_link = nullptr;
  const uintptr_t p = reinterpret_cast<uintptr_t>(&f);
  makecontext(&f.uc, reinterpret_cast<void (*)()>(&uc_entry), 2, static_cast<unsigned>(p >> 32),
              static_cast<unsigned>(p & 0xffffffffu));
  return &f.uc;
}
void switch_to_fiber(Run& r, Fiber& f) { swapcontext(&r.sched_uc, &f.uc); }
void switch_to_scheduler(Run& r, Fiber& f) { swapcontext(&f.uc, &r.sched_uc); }
#endif

void resume(Run& r, Fiber& f) {
  g_cur = &f;
  g_stack_lo = reinterpret_cast<uintptr_t>(f.lo);
  g_stack_size = static_cast<uintptr_t>(f.hi - f.lo);
  switch_to_fiber(r, f);
  g_cur = nullptr;
  g_stack_lo = g_stack_size = 0;
}

struct EmulatorScope {
  Fiber* f;
  EmulatorScope() : f(g_cur) {
    if (f != nullptr) ++f->in_emulator;
  }
  ~EmulatorScope() {
    if (f != nullptr) --f->in_emulator;
  }
};

// From inside a fiber: back to the scheduler (returns when the scheduler resumes this fiber).
void yield() { switch_to_scheduler(*g_run, *g_cur); }

const char* file_name(const char* path) {
  const char* slash = std::strrchr(path, '/');
  return slash != nullptr ? slash + 1 : path;
}

// "block (x,y,z) thread t (warp w lane l) after <file:line of the last barrier passed>; launched by <site>".
std::string where() {
  const Run& r = *g_run;
  std::string s = format("block (%u,%u,%u)", r.block.x, r.block.y, r.block.z);
  if (g_cur != nullptr) {
    s += format(" thread %u (warp %u lane %u) ", g_cur->tid, g_cur->tid / 32, g_cur->tid % 32);
    s += g_cur->last_barrier_line == 0 ? std::string("before its first __syncthreads")
                                       : format("after the __syncthreads at %s:%d", file_name(g_cur->last_barrier_file),
                                                g_cur->last_barrier_line);
  }
  return s + "; launched by " + r.cfg.site;
}

// A fault that stops the kernel (a GPU would trap): report, then never resume this fiber.
[[noreturn]] void fatal(const char* category, const std::string& message, int err) {
  report(category, message + " [" + where() + "]");
  Run& r = *g_run;
  r.abort = true;
  r.abort_error = err;
  yield();
  std::abort();  // unreachable: an aborted fiber is never resumed
}

// ---- shared-memory shadow ------------------------------------------------------------------------

constexpr uint16_t kAtomicTid = 0xffff;

struct SharedCell {
  uint32_t w_epoch = 0, r_epoch = 0;
  uint16_t w_tid = 0, r_tid = 0;
  uint8_t r_multi = 0;
};
std::vector<SharedCell> g_shared_shadow;
// Per shared byte: 1 + the thread whose cp.async into it has not completed, 0 when none.
std::vector<uint16_t> g_in_flight;

// ---- global buffers and their shadow -------------------------------------------------------------

struct Access {  // who touched a byte: ordered with another access if same thread or barrier between
  uint32_t block = 0, epoch = 0;
  uint16_t tid = 0;
  bool valid = false;
};

struct GlobalCell {
  uint32_t launch = 0;
  Access w, r, a;
};

struct Buffer {
  uintptr_t lo = 0, hi = 0;
  std::string name;
  std::vector<GlobalCell> shadow;  // allocated at the first checked access
};
std::vector<Buffer> g_buffers;  // sorted by lo

bool ordered(const Access& x, const Access& y) {
  return x.block == y.block && (x.tid == y.tid || x.epoch != y.epoch);
}

enum Kind { kRead = 0, kWrite = 1, kAtomic = 2 };
const char* kind_name(int kind) { return kind == kRead ? "read" : kind == kWrite ? "write" : "atomic"; }

void shared_access(uintptr_t a, size_t n, int kind) {
  const Run& r = *g_run;
  const uintptr_t base = reinterpret_cast<uintptr_t>(r.cfg.arena);
  if (a < base || a + n > base + r.cfg.smem_bytes) {
    fatal("shared_out_of_bounds",
          format("%s of %zu bytes at shared offset %" PRIdPTR " outside the launch's %zu bytes of dynamic shared "
                 "memory",
                 kind_name(kind), n, static_cast<intptr_t>(a - base), r.cfg.smem_bytes),
          kIllegalAddress);
  }
  const uint16_t tid = static_cast<uint16_t>(g_cur->tid);
  const size_t off = a - base;
  for (size_t i = 0; i < n; ++i) {
    if (g_in_flight[off + i] == 0) continue;
    report("cp_async_in_flight",
           format("%s of %zu bytes at shared offset %zu while thread %u's cp.async into it is in flight (not "
                  "completed by a cp.async.wait_group)",
                  kind_name(kind), n, off, g_in_flight[off + i] - 1u) +
               " [" + where() + "]");
    break;
  }
  bool race = false, uninit = false;
  uint16_t other = 0;
  for (size_t i = 0; i < n; ++i) {
    SharedCell& c = g_shared_shadow[off + i];
    if (kind == kAtomic) {
      c.w_epoch = g_epoch;
      c.w_tid = kAtomicTid;
      continue;
    }
    const bool w_now = c.w_epoch == g_epoch && c.w_tid != kAtomicTid;
    if (kind == kRead) {
      if (c.w_epoch < g_block_epoch0) uninit = true;
      if (w_now && c.w_tid != tid) race = true, other = c.w_tid;
      if (c.r_epoch != g_epoch) {
        c.r_epoch = g_epoch;
        c.r_tid = tid;
        c.r_multi = 0;
      } else if (c.r_tid != tid) {
        c.r_multi = 1;
      }
    } else {
      if (w_now && c.w_tid != tid) race = true, other = c.w_tid;
      if (c.r_epoch == g_epoch && (c.r_multi || c.r_tid != tid)) race = true, other = c.r_tid;
      c.w_epoch = g_epoch;
      c.w_tid = tid;
    }
  }
  if (race) {
    report("shared_race",
           format("%s of %zu bytes at shared offset %zu conflicts with thread %u in the same barrier interval",
                  kind_name(kind), n, off, other) +
               " [" + where() + "]");
  }
  if (uninit) {
    report("shared_uninitialized_read",
           format("read of %zu bytes at shared offset %zu that no thread of the block has written", n, off) + " [" +
               where() + "]");
  }
}

Buffer* find_buffer(uintptr_t a) {
  auto it = std::upper_bound(g_buffers.begin(), g_buffers.end(), a,
                             [](uintptr_t x, const Buffer& b) { return x < b.lo; });
  if (it == g_buffers.begin()) return nullptr;
  --it;
  return a < it->hi ? &*it : nullptr;
}

void global_access(uintptr_t a, size_t n, int kind) {
  Buffer* b = find_buffer(a);
  if (b == nullptr || a + n > b->hi) {
    std::string near = "no registered buffer";
    if (b != nullptr) {
      near = format("buffer '%s' ends %" PRIdPTR " bytes before the access end", b->name.c_str(),
                    static_cast<intptr_t>(a + n - b->hi));
    } else {
      for (const Buffer& x : g_buffers) {
        if (a >= x.hi && a - x.hi < 65536) near = format("%zu bytes past the end of '%s'", a - x.hi, x.name.c_str());
        if (a < x.lo && x.lo - a < 65536) near = format("%zu bytes before '%s'", x.lo - a, x.name.c_str());
      }
    }
    fatal("global_out_of_bounds", format("%s of %zu bytes at %#" PRIxPTR ": %s", kind_name(kind), n, a, near.c_str()),
          kIllegalAddress);
  }
  if (b->shadow.empty()) b->shadow.resize(b->hi - b->lo);
  const Run& r = *g_run;
  Access me;
  me.block = static_cast<uint32_t>(r.block_linear);
  me.epoch = g_epoch;
  me.tid = static_cast<uint16_t>(g_cur->tid);
  me.valid = true;
  bool race = false;
  Access other;
  for (size_t i = 0; i < n; ++i) {
    GlobalCell& c = b->shadow[a - b->lo + i];
    if (c.launch != g_launch_id) c = GlobalCell{g_launch_id, {}, {}, {}};
    auto conflicts = [&](const Access& x) {
      if (x.valid && !ordered(x, me)) {
        race = true;
        other = x;
      }
    };
    if (kind == kRead) {
      conflicts(c.w);
      c.r = me;
    } else if (kind == kWrite) {
      conflicts(c.w);
      conflicts(c.r);
      conflicts(c.a);
      c.w = me;
    } else {
      conflicts(c.w);
      conflicts(c.r);
      c.a = me;
    }
  }
  if (race) {
    report("global_race",
           format("%s of %zu bytes at offset %zu of '%s' conflicts with block #%u thread %u (no barrier orders them)",
                  kind_name(kind), n, static_cast<size_t>(a - b->lo), b->name.c_str(), other.block, other.tid) +
               " [" + where() + "]");
  }
}

__attribute__((noinline)) void check_access(uintptr_t a, size_t n, int kind) {
  EmulatorScope scope;
  Run& r = *g_run;
  if (n > 1 && n <= 16 && (a & (n - 1)) != 0) {
    fatal("misaligned_access",
          format("%s of %zu bytes at %#" PRIxPTR " is not %zu-byte aligned", kind_name(kind), n, a, n),
          kMisalignedAddress);
  }
  const uintptr_t arena = reinterpret_cast<uintptr_t>(r.cfg.arena);
  // The arena and 64 KiB below it count as shared memory: a negative offset is out of bounds too.
  if (a + 65536 >= arena && a < arena + r.cfg.arena_bytes) return shared_access(a, n, kind);
  const uintptr_t params = reinterpret_cast<uintptr_t>(r.cfg.params);
  if (a - params < r.cfg.params_bytes) {
    if (kind != kRead) fatal("parameter_write", "the kernel wrote to its parameter block", kIllegalAddress);
    return;
  }
  if (in_pool(a)) fatal("foreign_local_access", "access to another thread's local memory", kIllegalAddress);
  if (!g_buffers.empty()) global_access(a, n, kind);
}

inline void on_access(const void* p, size_t n, int kind) {
  if (g_cur == nullptr || g_cur->in_emulator) return;  // host code, or the emulator's own
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a - g_stack_lo < g_stack_size) return;  // the thread's own local memory
  check_access(a, n, kind);
}

// ---- warp collectives ------------------------------------------------------------------------------

uint32_t warp_lanes(const Run& r, unsigned warp) {
  const unsigned first = warp * 32, n = std::min(32u, r.threads - first);
  return n == 32 ? 0xffffffffu : ((1u << n) - 1u);
}

float decode(bool bf16, uint32_t bits16) {
  return bf16 ? bf16_to_f32(static_cast<uint16_t>(bits16)) : f16_to_f32(static_cast<uint16_t>(bits16));
}

// PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type" (.f16/.bf16 A and B, .f32
// C/D). groupID = laneid >> 2, threadID_in_group = laneid % 4. Element i of a fragment sits in
// register i / 2, low half for even i ("Elements (low to high)").
//   A a0..a7: row = groupID for i < 2 or 4 <= i < 6, else groupID + 8;
//             col = threadID_in_group * 2 + (i & 1), + 8 for i >= 4.
//   B b0..b3: row = threadID_in_group * 2 + (i & 1), + 8 for i >= 2; col = groupID.
//   C c0..c3: row = groupID, + 8 for i >= 2; col = threadID_in_group * 2 + (i & 1).
void a_element(int lane, int i, int* row, int* col) {
  const int g = lane >> 2, t = lane % 4;
  *row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
  *col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
}
void b_element(int lane, int i, int* row, int* col) {
  const int g = lane >> 2, t = lane % 4;
  *row = t * 2 + (i & 1) + (i >= 2 ? 8 : 0);
  *col = g;
}
void c_element(int lane, int i, int* row, int* col) {
  const int g = lane >> 2, t = lane % 4;
  *row = i < 2 ? g : g + 8;
  *col = t * 2 + (i & 1);
}

// Every element of A (16x16), B (16x8) and C (16x8) is held by exactly one (lane, index).
bool fragment_tables_are_bijections() {
  int a[16][16] = {}, b[16][8] = {}, c[16][8] = {};
  for (int lane = 0; lane < 32; ++lane) {
    int row, col;
    for (int i = 0; i < 8; ++i) a_element(lane, i, &row, &col), a[row][col]++;
    for (int i = 0; i < 4; ++i) b_element(lane, i, &row, &col), b[row][col]++;
    for (int i = 0; i < 4; ++i) c_element(lane, i, &row, &col), c[row][col]++;
  }
  for (int r = 0; r < 16; ++r) {
    for (int k = 0; k < 16; ++k) {
      if (a[r][k] != 1) return false;
    }
    for (int n = 0; n < 8; ++n) {
      if (b[r][n] != 1 || c[r][n] != 1) return false;
    }
  }
  return true;
}


// D = A B + C for one warp: fragments gathered from all 32 lanes, fp32 arithmetic (the products
// of two bf16 or two fp16 values are exact in fp32; they are added to C in k order, rounding each
// sum to nearest even), D scattered back into each lane's c[4].
void complete_mma(WarpSlot& w) {
  static const bool tables_ok = fragment_tables_are_bijections();
  if (!tables_ok) fatal("emulator_error", "the mma fragment tables are not bijections", kLaunchFailure);
  const bool bf16 = std::strstr(w.ptx, ".bf16.bf16.") != nullptr;
  float A[16][16], B[16][8], C[16][8];
  int row, col;
  for (int lane = 0; lane < 32; ++lane) {
    const MmaIn& in = w.in[lane].mma;
    for (int i = 0; i < 8; ++i) {
      a_element(lane, i, &row, &col);
      A[row][col] = decode(bf16, (in.a[i / 2] >> (16 * (i & 1))) & 0xffffu);
    }
    for (int i = 0; i < 4; ++i) {
      b_element(lane, i, &row, &col);
      B[row][col] = decode(bf16, (in.b[i / 2] >> (16 * (i & 1))) & 0xffffu);
    }
    for (int i = 0; i < 4; ++i) {
      c_element(lane, i, &row, &col);
      C[row][col] = in.c[i];
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    float* d = static_cast<float*>(w.out[lane]);
    for (int i = 0; i < 4; ++i) {
      c_element(lane, i, &row, &col);
      float acc = C[row][col];
      for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
      d[i] = acc;
    }
  }
}

// PTX ISA, "Warp-level matrix load instruction: ldmatrix" (m8n8, .b16): lane 8 m + r addresses row r
// of matrix m; register m of lane l holds row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1 (low half
// first). .trans loads each matrix transposed: register m of lane l holds elements l / 4 of rows
// 2 (l % 4) and 2 (l % 4) + 1. w.mode = matrices * 2 + trans.
void complete_ldmatrix(WarpSlot& w) {
  const int matrices = w.mode / 2;
  const bool trans = w.mode & 1;
  for (int lane = 0; lane < 32; ++lane) {
    uint32_t* regs = static_cast<uint32_t*>(w.out[lane]);
    const int g = lane / 4, t = lane % 4;
    for (int m = 0; m < matrices; ++m) {
      uint16_t lo, hi;
      if (trans) {
        lo = w.in[8 * m + 2 * t].ldm.row[m][g];
        hi = w.in[8 * m + 2 * t + 1].ldm.row[m][g];
      } else {
        lo = w.in[8 * m + g].ldm.row[m][2 * t];
        hi = w.in[8 * m + g].ldm.row[m][2 * t + 1];
      }
      regs[m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  }
}

void complete_shfl(const Run& r, WarpSlot& w, unsigned warp) {
  const int width = w.width;
  for (int lane = 0; lane < 32; ++lane) {
    if (!((w.mask >> lane) & 1u)) continue;
    const int base = lane & ~(width - 1), arg = w.in[lane].shfl.arg;
    int src = lane;
    switch (w.mode) {
      case 0:  // idx: srcLane modulo width, within the lane's group
        src = base + (arg & (width - 1));
        break;
      case 1:  // up: lane - delta, unchanged below the group
        src = lane - arg >= base ? lane - arg : lane;
        break;
      case 2:  // down: lane + delta, unchanged past the group
        src = lane + arg < base + width ? lane + arg : lane;
        break;
      default:  // xor: earlier groups are reachable, later ones give the lane's own value
        src = (lane ^ arg) < base + width ? (lane ^ arg) : lane;
        break;
    }
    if (src < 0 || src > 31 || !((w.mask >> src) & 1u)) {
      const Fiber& f = r.fibers[warp * 32 + lane];
      report("shfl_inactive_source",
             format("lane %d of warp %u reads lane %d, which is not in the mask %#x (line %d)", lane, warp, src,
                    w.mask, w.line) +
                 format(" [thread %u]", f.tid));
      src = lane;
    }
    *static_cast<uint64_t*>(w.out[lane]) = w.in[src].shfl.bits;
  }
}

// The running lane joins its warp's collective; returns once the collective has completed (the
// lane's output written). The first lane to arrive fixes the operation; every other must match.
void collective(int op, unsigned mask, const LaneIn& in, void* out, const char* file, int line, int mode, int width,
                const char* ptx) {
  EmulatorScope scope;
  Run& r = *g_run;
  Fiber& f = *g_cur;
  const unsigned warp = f.tid / 32, lane = f.tid % 32;
  const uint32_t lanes = warp_lanes(r, warp);
  auto op_name = [](int o) { return o == kMma ? "mma.sync" : o == kLdm ? "ldmatrix" : "__shfl_*_sync"; };
  const char* name = op_name(op);
  if (!((mask >> lane) & 1u) || (mask & ~lanes) != 0) {
    fatal("warp_divergence",
          format("%s at line %d: mask %#x must include the calling lane %u and only lanes of the block", name, line,
                 mask, lane),
          kLaunchFailure);
  }
  if ((op == kMma || op == kLdm) && mask != 0xffffffffu) {
    fatal("warp_divergence", format("%s.aligned needs all 32 lanes of a full warp", name), kLaunchFailure);
  }
  if (op == kShfl && (width < 1 || width > 32 || (width & (width - 1)) != 0)) {
    fatal("warp_divergence", format("shuffle width %d is not a power of two <= 32", width), kLaunchFailure);
  }
  WarpSlot& w = r.warps[warp];
  if (w.arrived == 0) {
    w.op = op;
    w.mask = mask;
    w.line = line;
    w.mode = mode;
    w.width = width;
    w.ptx = ptx;
  } else if (w.op != op || w.mask != mask || w.line != line || w.mode != mode || w.width != width ||
             std::strcmp(w.ptx, ptx) != 0) {
    fatal("warp_divergence",
          format("lane %u reached %s at %s:%d (mask %#x) while lanes %#x wait in %s at line %d (mask %#x)", lane,
                 name, file_name(file), line, mask, w.arrived, op_name(w.op), w.line,
                 w.mask),
          kLaunchFailure);
  }
  w.in[lane] = in;
  w.out[lane] = out;
  w.arrived |= 1u << lane;
  if (w.arrived != mask) {
    f.state = St::Warp;
    f.wait_file = file;
    f.wait_line = line;
    yield();
    return;
  }
  if (op == kMma) {
    complete_mma(w);
  } else if (op == kLdm) {
    complete_ldmatrix(w);
  } else {
    complete_shfl(r, w, warp);
  }
  for (unsigned l = 0; l < 32; ++l) {
    if (l != lane && ((mask >> l) & 1u)) r.fibers[warp * 32 + l].state = St::Ready;
  }
  w.arrived = 0;
}

// ---- the scheduler ---------------------------------------------------------------------------------

// Where each warp's lanes are, e.g. "; warp 0: 31 lanes (1..31) in a warp collective at x.cu:92, 1 lane (0) exited".
std::string describe_waits(const Run& r) {
  std::string s;
  for (unsigned warp = 0; warp * 32 < r.threads; ++warp) {
    std::map<std::string, std::vector<unsigned>> groups;
    for (unsigned t = warp * 32; t < std::min(r.threads, warp * 32 + 32); ++t) {
      const Fiber& f = r.fibers[t];
      const std::string at = format("%s:%d", file_name(f.wait_file), f.wait_line);
      groups[f.state == St::Done      ? "exited"
             : f.state == St::Barrier ? "at __syncthreads " + at
             : f.state == St::Warp    ? "in a warp collective at " + at
                                      : "ready"]
          .push_back(t % 32);
    }
    s += format("; warp %u:", warp);
    const char* sep = " ";
    for (const auto& [what, lanes] : groups) {
      s += format("%s%zu lane%s (%u..%u) %s", sep, lanes.size(), lanes.size() == 1 ? "" : "s", lanes.front(),
                  lanes.back(), what.c_str());
      sep = ", ";
    }
  }
  return s;
}

void stuck(Run& r, const char* category, const std::string& why) {
  report(category, why + describe_waits(r) +
                       format(" [block (%u,%u,%u); launched by %s]", r.block.x, r.block.y, r.block.z, r.cfg.site));
  r.abort = true;
  r.abort_error = kLaunchFailure;
}

void run_block(Run& r) {
  ++g_epoch;
  g_block_epoch0 = g_epoch;
  std::memset(r.cfg.arena, 0xff, r.cfg.smem_bytes);  // NaN in every float format
  std::fill(g_in_flight.begin(), g_in_flight.end(), 0);  // copies a previous block never waited for
  unsigned char* pool = stack_pool();
  for (unsigned t = 0; t < r.threads; ++t) {
    Fiber& f = r.fibers[t];
    f = Fiber();
    f.tid = t;
    f.lo = pool + t * kSlotBytes + kPageBytes;
    f.hi = f.lo + kStackBytes;
    f.sp = init_stack(f);
  }
  for (WarpSlot& w : r.warps) w.arrived = 0;
  for (;;) {
    bool ran = true;
    while (ran) {
      ran = false;
      for (Fiber& f : r.fibers) {
        if (f.state != St::Ready) continue;
        resume(r, f);
        ran = true;
        if (r.abort) return;
      }
    }
    unsigned done = 0, barrier = 0, warp = 0;
    for (const Fiber& f : r.fibers) {
      done += f.state == St::Done;
      barrier += f.state == St::Barrier;
      warp += f.state == St::Warp;
    }
    if (done == r.threads) return;
    if (warp > 0) return stuck(r, "deadlock", "warp collectives wait on lanes that never arrive");
    const Fiber* first = nullptr;
    for (const Fiber& f : r.fibers) {
      if (f.state != St::Barrier) continue;
      if (first == nullptr) first = &f;
      if (f.wait_line != first->wait_line || std::strcmp(f.wait_file, first->wait_file) != 0) {
        return stuck(r, "barrier_divergence", "threads wait at different __syncthreads");
      }
    }
    if (done > 0) {
      // bar.sync waits for the non-exited threads only, so the hardware goes on; but __syncthreads
      // must be reached by the whole block (its condition is not uniform): reported, then released.
      report("barrier_divergence",
             format("%u threads reached the __syncthreads at %s:%d after %u threads of the block exited", barrier,
                    file_name(first->wait_file), first->wait_line, done) +
                 format(" [block (%u,%u,%u); launched by %s]", r.block.x, r.block.y, r.block.z, r.cfg.site));
    }
    ++g_epoch;  // the barrier completes: a new interval begins
    for (Fiber& f : r.fibers) {
      if (f.state != St::Barrier) continue;
      f.last_barrier_file = f.wait_file;
      f.last_barrier_line = f.wait_line;
      f.state = St::Ready;
    }
  }
}

}  // namespace
}  // namespace ringattn_emu

extern "C" void ra_emu_fiber_entry(void* fiber) {
  using namespace ringattn_emu;
  Fiber& f = *static_cast<Fiber*>(fiber);
  Run& r = *g_run;
  r.thread_main(r.ctx);
  f.state = St::Done;
  switch_to_scheduler(r, f);
  std::abort();  // a finished fiber is never resumed
}

namespace ringattn_emu {

// ---- public API ----------------------------------------------------------------------------------------

int run_grid(const LaunchConfig& cfg, void (*thread_main)(void*), void* ctx) {
  const uint64_t threads = uint64_t{cfg.block.x} * cfg.block.y * cfg.block.z;
  const uint64_t blocks = uint64_t{cfg.grid.x} * cfg.grid.y * cfg.grid.z;
  std::string launch = format("{\"site\": \"%s\", \"line\": %d, \"grid\": [%u, %u, %u], \"block\": [%u, %u, %u], "
                              "\"smem\": %zu",
                              json_escape(cfg.site).c_str(), cfg.line, cfg.grid.x, cfg.grid.y, cfg.grid.z, cfg.block.x,
                              cfg.block.y, cfg.block.z, cfg.smem_bytes);
  auto finish = [&](int err, const std::string& why) {
    if (err != kOk) {
      g_last_error = err;
      if (!why.empty()) report("launch_error", why + " [" + cfg.site + "]");
    }
    g_report.launches.push_back(launch + format(", \"error\": %d}", err));
    return err;
  };
  if (threads == 0 || threads > kMaxThreads || cfg.block.x > 1024 || cfg.block.y > 1024 || cfg.block.z > 64) {
    return finish(kInvalidConfiguration, format("block (%u, %u, %u) is not a valid block shape", cfg.block.x,
                                                cfg.block.y, cfg.block.z));
  }
  if (blocks == 0 || cfg.grid.x > 2147483647u || cfg.grid.y > 65535 || cfg.grid.z > 65535) {
    return finish(kInvalidConfiguration,
                  format("grid (%u, %u, %u) is empty or exceeds (2^31 - 1, 65535, 65535)", cfg.grid.x, cfg.grid.y,
                         cfg.grid.z));
  }
  const auto attr = g_max_smem.find(cfg.kernel);
  const size_t limit = attr == g_max_smem.end() ? kDefaultSmem : attr->second;
  if (cfg.smem_bytes > limit || cfg.smem_bytes > cfg.arena_bytes) {
    return finish(kInvalidValue, format("%zu bytes of dynamic shared memory exceed the kernel's limit of %zu",
                                        cfg.smem_bytes, limit));
  }
  if (g_run != nullptr) return finish(kLaunchFailure, "a kernel launched another kernel");
  if (g_dry_run) {
    launch += ", \"blocks_run\": 0";
    return finish(kOk, "");
  }
  Run r;
  r.cfg = cfg;
  r.thread_main = thread_main;
  r.ctx = ctx;
  r.threads = static_cast<unsigned>(threads);
  r.fibers.resize(r.threads);
  r.warps.resize((r.threads + 31) / 32);
  if (g_shared_shadow.size() < cfg.arena_bytes) g_shared_shadow.resize(cfg.arena_bytes);
  if (g_in_flight.size() < cfg.arena_bytes) g_in_flight.resize(cfg.arena_bytes);
  ++g_launch_id;
  g_run = &r;
  uint64_t n = 0;
  for (unsigned z = 0; z < cfg.grid.z && !r.abort; ++z) {
    for (unsigned y = 0; y < cfg.grid.y && !r.abort; ++y) {
      for (unsigned x = 0; x < cfg.grid.x && !r.abort; ++x) {
        r.block = {x, y, z};
        r.block_linear = n++;
        run_block(r);
      }
    }
  }
  g_run = nullptr;
  launch += format(", \"blocks_run\": %" PRIu64 ", \"atomics\": %" PRIu64, n, r.atomics);
  return finish(r.abort ? r.abort_error : kOk, "");
}

int set_max_dynamic_smem(const void* kernel, int bytes) {
  if (bytes < 0 || static_cast<size_t>(bytes) > kMaxSmemOptin) {
    report("launch_error", format("cudaFuncSetAttribute: %d bytes of dynamic shared memory exceed sm_89's %zu",
                                  bytes, kMaxSmemOptin));
    return kInvalidValue;
  }
  g_max_smem[kernel] = static_cast<size_t>(bytes);
  return kOk;
}

int get_last_error(bool reset) {
  const int err = g_last_error;
  if (reset) g_last_error = kOk;
  return err;
}

const char* error_string(int err) {
  switch (err) {
    case kOk:
      return "no error";
    case kInvalidValue:
      return "invalid argument";
    case kInvalidConfiguration:
      return "invalid configuration argument";
    case kIllegalAddress:
      return "an illegal memory access was encountered (emulator)";
    case kMisalignedAddress:
      return "misaligned address (emulator)";
    case kLaunchFailure:
      return "unspecified launch failure (emulator: deadlock or barrier divergence)";
    default:
      return "unknown error";
  }
}

Dim3 thread_idx() {
  const Run& r = *g_run;
  const unsigned t = g_cur->tid, bx = r.cfg.block.x, by = r.cfg.block.y;
  return {t % bx, (t / bx) % by, t / (bx * by)};
}
Dim3 block_idx() { return g_run->block; }
Dim3 block_dim() { return g_run->cfg.block; }
Dim3 grid_dim() { return g_run->cfg.grid; }

void syncthreads(const char* file, int line) {
  if (g_cur == nullptr) {
    report("launch_error", format("__syncthreads outside a kernel (%s:%d)", file, line));
    return;
  }
  EmulatorScope scope;
  g_cur->state = St::Barrier;
  g_cur->wait_file = file;
  g_cur->wait_line = line;
  yield();
}

uint64_t shfl_sync(int mode, unsigned mask, uint64_t bits, int arg, int width, const char* file, int line) {
  if (g_cur == nullptr) return bits;
  LaneIn in;
  in.shfl = {bits, arg};
  uint64_t out = bits;
  collective(kShfl, mask, in, &out, file, line, mode, width, "");
  return out;
}

void mma_sync(const char* ptx, float c[4], const uint32_t a[4], const uint32_t b[2], const char* file, int line) {
  static const char* const kSupported[] = {
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
  };
  bool ok = false;
  for (const char* s : kSupported) ok = ok || std::strcmp(s, ptx) == 0;
  if (g_cur == nullptr) return;
  EmulatorScope scope;
  if (!ok) fatal("emulator_error", std::string("unsupported instruction ") + ptx, kLaunchFailure);
  LaneIn in;
  std::memcpy(in.mma.a, a, sizeof in.mma.a);
  std::memcpy(in.mma.b, b, sizeof in.mma.b);
  std::memcpy(in.mma.c, c, sizeof in.mma.c);
  float d[4];
  collective(kMma, 0xffffffffu, in, d, file, line, 0, 0, ptx);
  std::memcpy(c, d, sizeof d);
}

void ldmatrix(const char* ptx, uint32_t* regs, const void* row, const char* file, int line) {
  if (g_cur == nullptr) return;
  EmulatorScope scope;
  int matrices = 0;
  for (int n : {1, 2, 4}) {
    for (bool trans : {false, true}) {
      if (format("ldmatrix.sync.aligned.m8n8.x%d%s.shared.b16", n, trans ? ".trans" : "") == ptx) {
        matrices = n * 2 + trans;
      }
    }
  }
  if (matrices == 0) fatal("emulator_error", std::string("unsupported instruction ") + ptx, kLaunchFailure);
  const unsigned lane = g_cur->tid % 32;
  LaneIn in;
  std::memset(&in, 0, sizeof in);
  // Lanes 0 .. 8 n - 1 address the rows of the n matrices; other lanes' addresses are not used.
  if (static_cast<int>(lane) < 8 * (matrices / 2)) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(row);
    const uintptr_t arena = reinterpret_cast<uintptr_t>(g_run->cfg.arena);
    if (a % 16 != 0) {
      fatal("misaligned_access", format("ldmatrix row address %#" PRIxPTR " is not 16-byte aligned", a),
            kMisalignedAddress);
    }
    if (a < arena || a >= arena + g_run->cfg.arena_bytes) {
      fatal("shared_out_of_bounds", "ldmatrix row address is not in shared memory", kIllegalAddress);
    }
    check_access(a, 16, kRead);
    std::memcpy(in.ldm.row[lane / 8], row, 16);
  }
  uint32_t out[4] = {};
  collective(kLdm, 0xffffffffu, in, out, file, line, matrices, 0, ptx);
  std::memcpy(regs, out, sizeof(uint32_t) * (matrices / 2));
}

// The PTX text of each asynchronous-copy hook (attn_cuda.cu's asm names the same).
void require_ptx(const char* ptx, const char* expected) {
  if (std::strcmp(ptx, expected) != 0) {
    fatal("emulator_error", std::string("unsupported instruction ") + ptx + " (emulated: " + expected + ")",
          kLaunchFailure);
  }
}

void cp_async(const char* ptx, void* dst, const void* src, int src_bytes, const char* file, int line) {
  if (g_cur == nullptr) return;
  EmulatorScope scope;
  require_ptx(ptx, "cp.async.cg.shared.global");
  const uintptr_t d = reinterpret_cast<uintptr_t>(dst), s = reinterpret_cast<uintptr_t>(src);
  const uintptr_t arena = reinterpret_cast<uintptr_t>(g_run->cfg.arena);
  if (d % 16 != 0 || (src_bytes > 0 && s % 16 != 0)) {
    fatal("misaligned_access", format("cp.async of 16 bytes %#" PRIxPTR " <- %#" PRIxPTR " is not 16-byte aligned "
                                      "(%s:%d)", d, s, file_name(file), line),
          kMisalignedAddress);
  }
  if (src_bytes < 0 || src_bytes > 16) {
    fatal("emulator_error", format("cp.async src-size %d is not in [0, 16]", src_bytes), kLaunchFailure);
  }
  if (d < arena || d >= arena + g_run->cfg.arena_bytes) {
    fatal("shared_out_of_bounds", "cp.async destination is not in shared memory", kIllegalAddress);
  }
  CpCopy c;
  c.dst = static_cast<unsigned char*>(dst);
  std::memset(c.data, 0, sizeof c.data);  // bytes past src-size are zero-filled
  if (src_bytes > 0) {
    check_access(s, static_cast<size_t>(src_bytes), kRead);
    std::memcpy(c.data, src, static_cast<size_t>(src_bytes));
  }
  check_access(d, 16, kWrite);  // a write some time in this interval (or until the wait)
  for (size_t i = 0; i < 16; ++i) g_in_flight[d - arena + i] = static_cast<uint16_t>(g_cur->tid + 1);
  g_cur->cp_open.push_back(c);
}

void cp_async_commit(const char* ptx) {
  if (g_cur == nullptr) return;
  EmulatorScope scope;
  require_ptx(ptx, "cp.async.commit_group");
  g_cur->cp_groups.push_back(std::move(g_cur->cp_open));
  g_cur->cp_open.clear();
}

void cp_async_wait(const char* ptx, int pending) {
  if (g_cur == nullptr) return;
  EmulatorScope scope;
  require_ptx(ptx, "cp.async.wait_group");
  const uintptr_t arena = reinterpret_cast<uintptr_t>(g_run->cfg.arena);
  while (g_cur->cp_groups.size() > static_cast<size_t>(pending)) {
    for (const CpCopy& c : g_cur->cp_groups.front()) {
      const uintptr_t d = reinterpret_cast<uintptr_t>(c.dst);
      for (size_t i = 0; i < 16; ++i) g_in_flight[d - arena + i] = 0;
      check_access(d, 16, kWrite);
      std::memcpy(c.dst, c.data, 16);
    }
    g_cur->cp_groups.pop_front();
  }
}

void note_atomic(const void* addr, size_t bytes) {
  if (g_cur == nullptr) return;
  ++g_run->atomics;
  check_access(reinterpret_cast<uintptr_t>(addr), bytes, kAtomic);
}

void register_buffer(const void* ptr, size_t bytes, const char* name) {
  if (bytes == 0) return;
  Buffer b;
  b.lo = reinterpret_cast<uintptr_t>(ptr);
  b.hi = b.lo + bytes;
  b.name = name;
  auto it = std::upper_bound(g_buffers.begin(), g_buffers.end(), b.lo,
                             [](uintptr_t x, const Buffer& y) { return x < y.lo; });
  g_buffers.insert(it, std::move(b));
}

void clear_buffers() { g_buffers.clear(); }

void set_dry_run(bool on) { g_dry_run = on; }

void reset_report() {
  g_report = Report();
  g_last_error = kOk;
}

size_t total_errors() {
  size_t n = 0;
  for (const auto& [category, count] : g_report.counts) n += count;
  return n;
}

size_t report_json(char* buf, size_t len) {
  std::string s = "{\"counts\": {";
  bool first = true;
  for (const auto& [category, count] : g_report.counts) {
    s += format("%s\"%s\": %zu", first ? "" : ", ", category.c_str(), count);
    first = false;
  }
  s += "}, \"messages\": [";
  for (size_t i = 0; i < g_report.messages.size(); ++i) {
    s += (i ? ", \"" : "\"") + json_escape(g_report.messages[i]) + "\"";
  }
  s += "], \"launches\": [";
  for (size_t i = 0; i < g_report.launches.size(); ++i) s += (i ? ", " : "") + g_report.launches[i];
  s += "]}";
  if (buf != nullptr && len > 0) {
    const size_t n = std::min(len - 1, s.size());
    std::memcpy(buf, s.data(), n);
    buf[n] = '\0';
  }
  return s.size() + 1;
}

namespace {
struct MmaTest {
  const char* ptx;
  const uint32_t *a, *b;
  float* c;
};
void mma_test_thread(void* ctx) {
  const MmaTest& m = *static_cast<const MmaTest*>(ctx);
  const unsigned lane = thread_idx().x;
  uint32_t a[4], b[2];
  float c[4];
  std::memcpy(a, m.a + 4 * lane, sizeof a);
  std::memcpy(b, m.b + 2 * lane, sizeof b);
  std::memcpy(c, m.c + 4 * lane, sizeof c);
  mma_sync(m.ptx, c, a, b, __FILE__, __LINE__);
  std::memcpy(m.c + 4 * lane, c, sizeof c);
}
alignas(16) unsigned char g_test_arena[16];
}  // namespace

int mma_warp_test(const char* ptx, const uint32_t* a, const uint32_t* b, float* c) {
  MmaTest m{ptx, a, b, c};
  LaunchConfig cfg;
  cfg.block = {32, 1, 1};
  cfg.site = "mma_warp_test";
  cfg.arena = g_test_arena;
  cfg.arena_bytes = sizeof g_test_arena;
  return run_grid(cfg, &mma_test_thread, &m);
}

}  // namespace ringattn_emu

// ---- ThreadSanitizer instrumentation hooks (called by the kernel translation unit) ---------------------

#define RA_EMU_HOOKS(n)                                                                                   \
  extern "C" void __tsan_read##n(void* p) { ringattn_emu::on_access(p, n, ringattn_emu::kRead); }           \
  extern "C" void __tsan_write##n(void* p) { ringattn_emu::on_access(p, n, ringattn_emu::kWrite); }         \
  extern "C" void __tsan_unaligned_read##n(void* p) { ringattn_emu::on_access(p, n, ringattn_emu::kRead); } \
  extern "C" void __tsan_unaligned_write##n(void* p) { ringattn_emu::on_access(p, n, ringattn_emu::kWrite); }
RA_EMU_HOOKS(1)
RA_EMU_HOOKS(2)
RA_EMU_HOOKS(4)
RA_EMU_HOOKS(8)
RA_EMU_HOOKS(16)
#undef RA_EMU_HOOKS
extern "C" void __tsan_read_range(void* p, unsigned long n) { ringattn_emu::on_access(p, n, ringattn_emu::kRead); }
extern "C" void __tsan_write_range(void* p, unsigned long n) { ringattn_emu::on_access(p, n, ringattn_emu::kWrite); }
extern "C" void __tsan_init() {}
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}
