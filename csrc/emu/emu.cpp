// emu.cpp: the emulated device behind cuda_emu.h and cuda_runtime.h (see cuda_emu.h for the execution model).
//
// Device memory is host memory from mmap: every allocation sits between two PROT_NONE guard pages, its last byte
// next to the back one, and starts filled with 0xFF (NaN, -1), as a GPU never zeroes cudaMalloc. A fault in a
// kernel (a read or write past an allocation, the dynamic shared memory, a thread's stack) stops the block and the
// launch fails with a message that names the kernel, the block, the thread and the allocation. Streams run
// synchronously in order; stream capture records launches and async copies into a graph that cudaGraphLaunch
// replays with the captured arguments; the calls CUDA refuses while a stream captures are refused here too.
#include <dlfcn.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "cuda_emu.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace emu {
unsigned cur_lane = 0;

namespace {

constexpr size_t kPage = 4096;
constexpr size_t kStack = 128 * 1024;        // per thread of a block
constexpr size_t kMaxDynSmem = 227 * 1024;   // H100: opt-in maximum per block
constexpr size_t kDefaultDynSmem = 48 * 1024;  // without cudaFuncAttributeMaxDynamicSharedMemorySize

// ---- fibers: a 6-register switch on x86-64 (ucontext elsewhere) ----
#if defined(__x86_64__)
extern "C" void emu_switch(void** save_sp, void* to_sp);
extern "C" void emu_fiber_start();
asm(R"(
.text
.p2align 4
.hidden emu_switch
.globl emu_switch
.type emu_switch,@function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size emu_switch,.-emu_switch
.hidden emu_fiber_start
.globl emu_fiber_start
.type emu_fiber_start,@function
emu_fiber_start:
  movq %r12, %rdi
  callq *%r13
  ud2
.size emu_fiber_start,.-emu_fiber_start
)");
struct Ctx {
  void* sp = nullptr;
};
void ctx_init(Ctx& c, char* stack_top, void (*fn)(void*), void* arg) {
  void** sp = reinterpret_cast<void**>(stack_top - 72);  // 16-byte aligned at emu_fiber_start's call
  sp[0] = sp[1] = nullptr;                                // r15, r14
  sp[2] = reinterpret_cast<void*>(fn);                    // r13
  sp[3] = arg;                                            // r12
  sp[4] = sp[5] = nullptr;                                // rbx, rbp
  sp[6] = reinterpret_cast<void*>(&emu_fiber_start);      // return address
  c.sp = sp;
}
inline void ctx_switch(Ctx& from, Ctx& to) { emu_switch(&from.sp, to.sp); }
#else
struct Ctx {
  ucontext_t uc;
};
void ctx_init(Ctx& c, char* stack_top, void (*fn)(void*), void* arg) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack_top - kStack;
  c.uc.uc_stack.ss_size = kStack;
  c.uc.uc_link = nullptr;
  (void)arg;  // fiber_main takes no argument
  makecontext(&c.uc, reinterpret_cast<void (*)()>(fn), 0);
}
inline void ctx_switch(Ctx& from, Ctx& to) { swapcontext(&from.uc, &to.uc); }
#endif

enum State : uint8_t { READY, WAIT_BLOCK, WAIT_WARP, DONE };

struct Copy {  // a cp.async in flight
  void* dst;
  const void* src;
  unsigned n, src_n, group;
};

struct Fiber {
  Ctx ctx;
  char* stack_lo = nullptr;  // lowest usable byte
  uint3 tid{};
  unsigned lin = 0;
  std::vector<Copy> copies;
  unsigned commits = 0;
};

struct Warp {
  unsigned arrived = 0, mask = 0;
  unsigned gone = 0;  // lanes that do not exist (block size) or have exited
  int kind = 0;
  CollectiveFn fn = nullptr;
  uint64_t val[32];
  uint64_t res[32];
  int src[32];
  void* arg[32];
};

struct Block {
  std::vector<Fiber> f;
  std::vector<State> st;  // per thread, apart from the fibers: scanned on every switch
  std::vector<Warp> warps;
  unsigned n = 0, live = 0, bar_arrived = 0;
  std::vector<unsigned> run;
  size_t pos = 0;
  Ctx sched;
  const void* kernel = nullptr;
  Thunk thunk = nullptr;
  const void* args = nullptr;
  bool failed = false;
  std::string why;
  uint64_t epoch = 0;
  bool pdl = false;     // launched as a programmatic dependent: every block must run griddepcontrol.wait
  bool waited = false;  // this block has
};

Block g_blk;
Fiber* g_cur = nullptr;
std::vector<char*> g_stacks;
int g_order = 0;  // 0 asc, 1 desc, 2 random
uint64_t g_seed = 1;
Stats g_stats{};
std::recursive_mutex g_mtx;
cudaError_t g_last = cudaSuccess, g_async = cudaSuccess;
std::string g_last_msg;
std::map<const void*, int> g_max_dyn_smem;
const char* g_kfile = "";
int g_kline = 0;
bool g_execute = true;
bool g_log_on = false;
using LaunchKey = std::tuple<const void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, size_t, bool>;
std::map<LaunchKey, uint64_t> g_log;  // ordered: the log reads the same in every run

// dynamic shared memory ends at a guard page: reading past the launch's size faults
char* g_dyn_region = nullptr;
unsigned char* g_dyn = nullptr;
size_t g_dyn_size = 0;

struct SharedVar {
  unsigned char* p;
  size_t n;
  uint64_t epoch;
};
std::vector<SharedVar> g_shared;  // [0] is the dynamic region; then every __shared__ array met so far

char* map_guarded(size_t body) {  // [guard][body][guard], body page-rounded; returns the body
  const size_t b = (body + kPage - 1) / kPage * kPage;
  char* m = static_cast<char*>(mmap(nullptr, b + 2 * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS |
                                    MAP_NORESERVE, -1, 0));
  if (m == MAP_FAILED) return nullptr;
  mprotect(m, kPage, PROT_NONE);
  mprotect(m + kPage + b, kPage, PROT_NONE);
  return m + kPage;
}

char* stack_top(unsigned i) {
  while (g_stacks.size() <= i) {
    char* s = map_guarded(kStack);
    if (!s) {
      std::perror("emulated device: fiber stack");
      std::abort();
    }
    g_stacks.push_back(s);
  }
  return g_stacks[i] + kStack;
}

[[noreturn]] void leave_block();

void fail(const std::string& why) {
  if (!g_blk.failed) {
    g_blk.failed = true;
    g_blk.why = why;
  }
}

std::string where() {
  std::string s = "thread (" + std::to_string(threadIdx.x) + "," + std::to_string(threadIdx.y) + "," +
                  std::to_string(threadIdx.z) + ")";
  return s;
}

// ---- the block scheduler ----
void resume(Fiber* nx) {
  g_cur = nx;
  threadIdx = nx->tid;
  cur_lane = nx->lin & 31u;
  ++g_stats.switches;
}

// The running fiber gives way: to the next ready fiber of this round, or to the scheduler.
void block_wait() {
  Block& b = g_blk;
  Fiber* me = g_cur;
  for (++b.pos; b.pos < b.run.size(); ++b.pos) {
    if (b.st[b.run[b.pos]] == READY) {
      Fiber* nx = &b.f[b.run[b.pos]];
      resume(nx);
      ctx_switch(me->ctx, nx->ctx);
      return;
    }
  }
  ctx_switch(me->ctx, b.sched);
}

void release_barrier() {
  Block& b = g_blk;
  for (unsigned i = 0; i < b.n; ++i)
    if (b.st[i] == WAIT_BLOCK) b.st[i] = READY;
  b.bar_arrived = 0;
}

void land(Fiber& f, unsigned upto_group) {  // copies of groups < upto_group land, in issue order
  size_t k = 0;
  for (size_t i = 0; i < f.copies.size(); ++i) {
    const Copy& c = f.copies[i];
    if (c.group < upto_group) {
      std::memcpy(c.dst, c.src, c.src_n);
      if (c.n > c.src_n) std::memset(static_cast<char*>(c.dst) + c.src_n, 0, c.n - c.src_n);
    } else {
      f.copies[k++] = c;
    }
  }
  f.copies.resize(k);
}

void fiber_main(void*) {
  Block& b = g_blk;
  b.thunk(b.kernel, b.args);
  Fiber* me = g_cur;
  land(*me, ~0u);  // copies never waited for land by the end of the thread
  b.st[me->lin] = DONE;
  --b.live;
  Warp& w = b.warps[me->lin >> 5];
  w.gone |= 1u << (me->lin & 31);
  if (w.arrived && (w.mask >> (me->lin & 31) & 1))
    fail("thread " + std::to_string(me->lin) + " exited while its warp waits for it at a warp operation");
  if (b.bar_arrived && b.bar_arrived == b.live) release_barrier();  // exited threads count as arrived
  if (b.failed) leave_block();
  block_wait();  // never resumed
  std::abort();
}

[[noreturn]] void leave_block() {
  Ctx dead;
  ctx_switch(dead, g_blk.sched);
  std::abort();
}

const char* state_name(State s) {
  return s == READY ? "running" : s == WAIT_BLOCK ? "__syncthreads" : s == WAIT_WARP ? "a warp operation" : "exited";
}

bool run_block(std::mt19937_64& rng) {
  Block& b = g_blk;
  ++b.epoch;
  b.live = b.n;
  b.bar_arrived = 0;
  b.waited = false;
  for (unsigned w = 0; w < (b.n + 31) / 32; ++w) {
    b.warps[w].arrived = 0;
    const unsigned lanes = b.n - 32 * w < 32 ? b.n - 32 * w : 32;
    b.warps[w].gone = lanes == 32 ? 0u : ~0u << lanes;
  }
  for (unsigned i = 0; i < b.n; ++i) {
    Fiber& f = b.f[i];
    f.lin = i;
    f.tid = uint3{i % blockDim.x, (i / blockDim.x) % blockDim.y, i / (blockDim.x * blockDim.y)};
    b.st[i] = READY;
    f.copies.clear();
    f.commits = 0;
    char* top = stack_top(i);
    f.stack_lo = top - kStack;
    ctx_init(f.ctx, top, &fiber_main, nullptr);
  }
  for (;;) {
    b.run.clear();
    for (unsigned i = 0; i < b.n; ++i)
      if (b.st[i] == READY) b.run.push_back(i);
    if (b.run.empty()) {
      if (b.live == 0) break;
      std::string s = "deadlock: no thread can run;";
      for (unsigned t = 0; t < b.n; ++t)
        if (t == 0 || b.st[t] != b.st[t - 1]) s += std::string(" from thread ") + std::to_string(t) + " at " +
                                                  state_name(b.st[t]) + ";";
      fail(s);
      break;
    }
    if (g_order == 1) std::reverse(b.run.begin(), b.run.end());
    if (g_order == 2) std::shuffle(b.run.begin(), b.run.end(), rng);
    b.pos = 0;
    Fiber* first = &b.f[b.run[0]];
    resume(first);
    ctx_switch(b.sched, first->ctx);
    if (b.failed) break;
  }
  g_cur = nullptr;
  if (!b.failed && b.pdl && !b.waited) {
    b.failed = true;
    b.why = "a block of a kernel launched as a programmatic dependent (cudaLaunchAttributeProgrammaticStream"
            "Serialization) exited without griddepcontrol.wait: on a GPU it may read its predecessor's output early";
  }
  return !b.failed;
}

// ---- device memory ----
struct Alloc {
  size_t n;
  bool pinned;
};
std::map<uintptr_t, Alloc> g_allocs;  // data start -> size

void* guarded_alloc(size_t n, bool pinned) {
  const size_t body = (n + 15) / 16 * 16;
  const size_t pages = (body + kPage - 1) / kPage * kPage;
  char* m = map_guarded(pages ? pages : kPage);
  if (!m) return nullptr;
  char* p = m + (pages ? pages : kPage) - body;  // the last byte touches the back guard page (16-byte aligned)
  std::memset(p, 0xff, body);                    // never-written device memory reads as NaN / -1
  g_allocs[reinterpret_cast<uintptr_t>(p)] = Alloc{n, pinned};
  return p;
}
bool guarded_free(void* p) {
  auto it = g_allocs.find(reinterpret_cast<uintptr_t>(p));
  if (it == g_allocs.end()) return false;
  const size_t body = (it->second.n + 15) / 16 * 16;
  const size_t pages = (body + kPage - 1) / kPage * kPage;
  const size_t len = (pages ? pages : kPage);
  char* m = static_cast<char*>(p) + body - len - kPage;
  munmap(m, len + 2 * kPage);  // a later use of p faults
  g_allocs.erase(it);
  return true;
}
// The allocation that holds p (or whose guard pages are within a page of it); nullptr for host memory.
const std::pair<const uintptr_t, Alloc>* find_alloc(const void* p, size_t slack = 0) {
  const uintptr_t u = reinterpret_cast<uintptr_t>(p);
  auto it = g_allocs.upper_bound(u + slack);
  if (it == g_allocs.begin()) return nullptr;
  --it;
  if (u + slack < it->first || u >= it->first + it->second.n + slack) return nullptr;
  return &*it;
}

// ---- faults inside kernels ----
void* g_altstack = nullptr;
struct sigaction g_old_segv, g_old_bus;

std::string describe_address(uintptr_t a) {
  for (size_t i = 0; i < g_stacks.size(); ++i) {
    const uintptr_t lo = reinterpret_cast<uintptr_t>(g_stacks[i]);
    if (a >= lo - kPage && a < lo) return "overflow of the stack of thread " + std::to_string(i);
  }
  const uintptr_t dyn_end = reinterpret_cast<uintptr_t>(g_dyn) + g_dyn_size;
  if (g_dyn && a >= dyn_end && a < dyn_end + kPage)
    return "past the end of the dynamic shared memory (" + std::to_string(g_dyn_size) + " bytes)";
  if (auto* al = find_alloc(reinterpret_cast<void*>(a), kPage)) {
    const uintptr_t s = al->first;
    char buf[200];
    if (a >= s + al->second.n)
      std::snprintf(buf, sizeof buf, "%zu bytes past the end of a device allocation of %zu bytes",
                    static_cast<size_t>(a - s - al->second.n), al->second.n);
    else
      std::snprintf(buf, sizeof buf, "%zu bytes before the start of a device allocation of %zu bytes",
                    static_cast<size_t>(s - a), al->second.n);
    return buf;
  }
  return "not device memory (freed, or never allocated)";
}

void on_fault(int sig, siginfo_t* si, void* uctx) {
  if (g_cur == nullptr) {  // not a kernel: the previous handler (e.g. Python's faulthandler) reports it
    sigaction(sig, sig == SIGSEGV ? &g_old_segv : &g_old_bus, nullptr);
    return;
  }
  const uintptr_t a = reinterpret_cast<uintptr_t>(si->si_addr);
  char buf[64];
  std::snprintf(buf, sizeof buf, "illegal address 0x%lx: ", static_cast<unsigned long>(a));
  fail(std::string(buf) + describe_address(a) + ", " + where());
  leave_block();  // out of the handler (its frame on the alternate stack is abandoned)
}

void install_fault_handler() {
  static bool done = false;
  static thread_local bool alt = false;
  if (!alt) {
    stack_t ss{};
    ss.ss_size = 64 * 1024;
    ss.ss_sp = std::malloc(ss.ss_size);
    sigaltstack(&ss, nullptr);
    alt = true;
  }
  if (done) return;
  done = true;
  struct sigaction sa {};
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &g_old_segv);
  sigaction(SIGBUS, &sa, &g_old_bus);
}

// ---- stream capture ----
struct GraphOp {
  bool kernel;  // else a copy or memset
  std::function<void()> run;
};
struct GraphRec {
  std::vector<GraphOp> ops;
  bool invalidated = false;
  std::string why;
};
std::map<cudaStream_t, GraphRec*> g_capturing;

cudaError_t capture_violation(const std::string& what) {
  ++g_stats.violations;
  std::fprintf(stderr, "emulated device: %s while a stream is capturing (CUDA refuses it)\n", what.c_str());
  for (auto& kv : g_capturing) {
    kv.second->invalidated = true;
    kv.second->why = what;
  }
  g_last_msg = what + " while a stream is capturing";
  return cudaErrorStreamCaptureUnsupported;
}

// Records fn into the graph if `s` captures. Work on the legacy default stream while any stream captures is an
// error on CUDA (it would synchronise with the capturing stream).
bool record(cudaStream_t s, std::function<void()> fn, cudaError_t* err, bool kernel = false) {
  *err = cudaSuccess;
  if (g_capturing.empty()) return false;
  auto it = g_capturing.find(s);
  if (it == g_capturing.end()) {
    if (s == nullptr) {
      *err = capture_violation("work on the legacy default stream");
      return true;
    }
    return false;
  }
  it->second->ops.push_back(GraphOp{kernel, std::move(fn)});
  return true;
}

bool g_in_graph = false;

// A failed eager launch reports at once (the launcher's cudaGetLastError); one inside a graph replay at the next
// synchronisation, as on a GPU.
void set_error(cudaError_t e, const std::string& msg) {
  (g_in_graph ? g_async : g_last) = e;
  g_last_msg = msg;
  std::fprintf(stderr, "emulated device: %s\n", msg.c_str());
}

void launch_now(const void* kernel, Thunk thunk, const void* args, dim3 grid, dim3 block, size_t smem,
                const char* file, int line, bool pdl) {
  std::lock_guard<std::recursive_mutex> lk(g_mtx);
  install_fault_handler();
  ++g_stats.launches;
  g_stats.pdl_launches += pdl;
  char at[512];
  std::snprintf(at, sizeof at, "kernel launched at %s:%d", file, line);
  const uint64_t nt = uint64_t(block.x) * block.y * block.z;
  if (nt == 0 || nt > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    set_error(cudaErrorInvalidConfiguration, std::string("invalid launch configuration (grid ") +
                                                 std::to_string(grid.x) + "x" + std::to_string(grid.y) + "x" +
                                                 std::to_string(grid.z) + ", block " + std::to_string(block.x) + "x" +
                                                 std::to_string(block.y) + "x" + std::to_string(block.z) + "): " + at);
    return;
  }
  auto lim = g_max_dyn_smem.find(kernel);
  const size_t limit = lim == g_max_dyn_smem.end() ? kDefaultDynSmem : static_cast<size_t>(lim->second);
  if (smem > limit) {
    set_error(cudaErrorInvalidValue, std::to_string(smem) + " bytes of dynamic shared memory above the kernel's " +
                                         std::to_string(limit) + " (cudaFuncAttributeMaxDynamicSharedMemorySize): " + at);
    return;
  }
  if (g_log_on) ++g_log[LaunchKey{kernel, grid.x, grid.y, grid.z, block.x, block.y, block.z, smem, pdl}];
  if (!g_execute) return;  // checked and logged only (set_execute)
  if (!g_dyn_region) {
    g_dyn_region = map_guarded(kMaxDynSmem);
    g_shared.insert(g_shared.begin(), SharedVar{nullptr, 0, 0});
  }
  g_dyn_size = (smem + 15) / 16 * 16;
  g_dyn = reinterpret_cast<unsigned char*>(g_dyn_region) + kMaxDynSmem - g_dyn_size;
  g_shared[0] = SharedVar{g_dyn, g_dyn_size, 0};
  Block& b = g_blk;
  b.n = static_cast<unsigned>(nt);
  if (b.f.size() < b.n) b.f.resize(b.n), b.st.resize(b.n);
  if (b.warps.size() < (b.n + 31) / 32) b.warps.resize((b.n + 31) / 32);
  b.kernel = kernel, b.thunk = thunk, b.args = args, b.failed = false, b.pdl = pdl;
  blockDim = block, gridDim = grid;
  g_kfile = file, g_kline = line;
  std::mt19937_64 rng(g_seed * 0x9e3779b97f4a7c15ull + g_stats.launches);
  // Blocks run one after another, in the schedule's order: a GPU completes them in any order, so a result that
  // depends on which block finished first (a merge by the last block to arrive, an atomic) shows under desc/random.
  std::vector<uint3> blocks;
  blocks.reserve(static_cast<size_t>(grid.x) * grid.y * grid.z);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.push_back(uint3{x, y, z});
  if (g_order == 1) std::reverse(blocks.begin(), blocks.end());
  if (g_order == 2) std::shuffle(blocks.begin(), blocks.end(), rng);
  for (const uint3& bi : blocks) {
    blockIdx = bi;
    std::memset(g_dyn, 0xff, g_dyn_size);  // uninitialised shared memory reads as NaN
    ++g_stats.blocks;
    if (!run_block(rng)) {
      char blk[96];
      std::snprintf(blk, sizeof blk, " in block (%u,%u,%u)", bi.x, bi.y, bi.z);
      set_error(cudaErrorLaunchFailure, b.why + blk + " of the " + at);
      return;
    }
  }
}

}  // namespace

// ---- device-side entry points ----
void syncthreads() {
  Block& b = g_blk;
  if (++b.bar_arrived == b.live) {  // the last thread to arrive releases the others and goes on
    release_barrier();
    return;
  }
  b.st[g_cur->lin] = WAIT_BLOCK;
  block_wait();
}

static Warp& arrive(int kind, unsigned mask, CollectiveFn fn) {
  Block& b = g_blk;
  Fiber* me = g_cur;
  const unsigned lane = me->lin & 31;
  Warp& w = b.warps[me->lin >> 5];
  if (!(mask >> lane & 1)) trap("a warp operation called by a lane that its mask leaves out");
  if (w.arrived == 0) {
    w.kind = kind, w.mask = mask, w.fn = fn;
    if (mask & w.gone) trap("a warp operation names a lane that does not exist or has exited");
  } else if (w.kind != kind || w.mask != mask || w.fn != fn) {
    trap("the lanes of a warp disagree: they wait at different warp operations or with different masks");
  }
  return w;
}

static void complete_or_wait(Warp& w, unsigned lane) {
  Block& b = g_blk;
  w.arrived |= 1u << lane;
  if (w.arrived != w.mask) {
    b.st[g_cur->lin] = WAIT_WARP;
    block_wait();
    return;
  }
  const unsigned base = g_cur->lin & ~31u;
  if (w.kind == kShfl) {
    for (unsigned l = 0; l < 32; ++l) {
      if (!(w.mask >> l & 1)) continue;  // (a lane outside the mask may not have read its last result yet)
      const int s = w.src[l];
      // a lane outside the mask: undefined on the GPU, a NaN here
      w.res[l] = (s >= 0 && s < 32 && (w.mask >> s & 1)) ? w.val[s] : 0x7fbadbad7fbadbadull;
    }
  } else if (w.kind == kVote) {
    uint64_t ballot = 0;
    for (unsigned l = 0; l < 32; ++l)
      if ((w.mask >> l & 1) && w.val[l]) ballot |= 1ull << l;
    for (unsigned l = 0; l < 32; ++l)
      if (w.mask >> l & 1) w.res[l] = ballot;
  } else if (w.kind == kCollective) {
    w.fn(w.arg, w.mask);
  }
  State* st = &b.st[base];
  for (unsigned l = 0; l < 32; ++l)
    if (w.mask >> l & 1) st[l] = READY;
  w.arrived = 0;
}

uint64_t warp_op(int kind, unsigned mask, uint64_t mine, int src) {
  Warp& w = arrive(kind, mask, nullptr);
  const unsigned lane = g_cur->lin & 31;
  w.val[lane] = mine;
  w.src[lane] = src;
  complete_or_wait(w, lane);
  return w.res[lane];
}

void warp_collective(CollectiveFn run, void* arg) {
  Warp& w = arrive(kCollective, 0xffffffffu, run);
  const unsigned lane = g_cur->lin & 31;
  w.arg[lane] = arg;
  complete_or_wait(w, lane);
}

ptrdiff_t stack_offset(const void* p) { return static_cast<const char*>(p) - g_cur->stack_lo; }

unsigned char* dynamic_smem() { return g_dyn; }

void shared_init(void* p, size_t bytes) {
  for (size_t i = 1; i < g_shared.size(); ++i) {
    SharedVar& v = g_shared[i];
    if (v.p != p) continue;
    if (v.epoch != g_blk.epoch) {
      std::memset(p, 0xff, bytes);
      v.epoch = g_blk.epoch;
    }
    return;
  }
  if (g_shared.empty()) g_shared.push_back(SharedVar{nullptr, 0, 0});
  g_shared.push_back(SharedVar{static_cast<unsigned char*>(p), bytes, g_blk.epoch});
  std::memset(p, 0xff, bytes);
}

// Shared addresses: (index of the shared array + 1) << 24 | offset, index 0 the dynamic shared memory.
uint32_t cvta_shared(const void* p) {
  const unsigned char* q = static_cast<const unsigned char*>(p);
  for (size_t i = 0; i < g_shared.size(); ++i) {
    const SharedVar& v = g_shared[i];
    if (v.p && q >= v.p && q < v.p + v.n) return static_cast<uint32_t>((i + 1) << 24 | (q - v.p));
  }
  trap("__cvta_generic_to_shared of an address that is not shared memory");
}
void* shared_ptr(uint32_t s) {
  const size_t i = (s >> 24) - 1;
  if (s >> 24 == 0 || i >= g_shared.size()) trap("a shared-memory address that no __cvta_generic_to_shared made");
  return g_shared[i].p + (s & 0xffffffu);
}

void cp_async(uint32_t dst, const void* src, unsigned n, unsigned src_n) {
  if ((n != 4 && n != 8 && n != 16) || src_n > n) trap("cp.async: copy size must be 4, 8 or 16 and src-size <= it");
  if (reinterpret_cast<uintptr_t>(src) % n || dst % n) trap("cp.async: misaligned address");
  Fiber* f = g_cur;
  f->copies.push_back(Copy{shared_ptr(dst), src, n, src_n, f->commits});
  if (src_n) {  // the global read happens (and faults) now, as the GPU's would be issued now
    volatile char c = *static_cast<const volatile char*>(src);
    c = *(static_cast<const volatile char*>(src) + src_n - 1);
    (void)c;
  }
}
void cp_async_commit() { ++g_cur->commits; }
void cp_async_wait(unsigned keep) { land(*g_cur, g_cur->commits >= keep ? g_cur->commits - keep : 0); }

[[noreturn]] void trap(const char* why) {
  if (!g_cur) {
    std::fprintf(stderr, "emulated device: %s outside a kernel\n", why);
    std::abort();
  }
  fail(std::string(why) + ", " + where());
  leave_block();
}

void launch(const void* kernel, Thunk thunk, std::shared_ptr<const void> args, dim3 grid, dim3 block, size_t smem,
            cudaStream_t stream, const char* file, int line, bool pdl) {
  std::lock_guard<std::recursive_mutex> lk(g_mtx);
  cudaError_t err;
  if (record(stream, [=] { launch_now(kernel, thunk, args.get(), grid, block, smem, file, line, pdl); }, &err,
             /*kernel=*/true)) {
    if (err != cudaSuccess) g_last = err;
    return;
  }
  launch_now(kernel, thunk, args.get(), grid, block, smem, file, line, pdl);
}

void pdl_wait() {
  if (!g_cur) trap("griddepcontrol.wait");
  g_blk.waited = true;
}

void set_schedule(int order, uint64_t seed) {
  g_order = order;
  g_seed = seed;
}
int schedule_order() { return g_order; }
Stats stats() { return g_stats; }

void set_launch_log(bool on) {
  std::lock_guard<std::recursive_mutex> lk(g_mtx);
  g_log.clear();
  g_log_on = on;
}

std::vector<LaunchRec> launch_log() {
  std::lock_guard<std::recursive_mutex> lk(g_mtx);
  std::vector<LaunchRec> out;
  for (const auto& [k, count] : g_log) {
    const void* fn = std::get<0>(k);
    Dl_info info{};
    const uintptr_t base = dladdr(fn, &info) && info.dli_fbase ? reinterpret_cast<uintptr_t>(info.dli_fbase) : 0;
    LaunchRec r{};
    r.kernel = reinterpret_cast<uintptr_t>(fn) - base;
    r.grid[0] = std::get<1>(k), r.grid[1] = std::get<2>(k), r.grid[2] = std::get<3>(k);
    r.block[0] = std::get<4>(k), r.block[1] = std::get<5>(k), r.block[2] = std::get<6>(k);
    r.smem = std::get<7>(k);
    r.pdl = std::get<8>(k);
    r.count = count;
    out.push_back(r);
  }
  return out;
}

void set_execute(bool on) {
  std::lock_guard<std::recursive_mutex> lk(g_mtx);
  g_execute = on;
}
bool executes() { return g_execute; }

}  // namespace emu

// ---- the runtime API ----
using emu::g_capturing;

cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::g_last;
  emu::g_last = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return emu::g_last; }
const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorIllegalState: return "cudaErrorIllegalState";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorStreamCaptureUnsupported: return "cudaErrorStreamCaptureUnsupported";
    case cudaErrorStreamCaptureInvalidated: return "cudaErrorStreamCaptureInvalidated";
    default: return "cudaErrorUnknown";
  }
}
const char* cudaGetErrorString(cudaError_t e) {
  // The emulator's own description of the last failure (which kernel, block, thread, address) where it has one.
  static thread_local std::string s;
  s = std::string(cudaGetErrorName(e)) + " on the emulated device";
  if (e != cudaSuccess && !emu::g_last_msg.empty()) s += ": " + emu::g_last_msg;
  return s.c_str();
}
cudaError_t cudaSetDevice(int) { return cudaSuccess; }
cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr == cudaDevAttrComputeCapabilityMajor) *value = 9;
  else if (attr == cudaDevAttrComputeCapabilityMinor) *value = 0;
  else return cudaErrorInvalidValue;
  return cudaSuccess;
}
cudaError_t cudaMemGetInfo(size_t* f, size_t* t) {
  const long pages = sysconf(_SC_AVPHYS_PAGES), total = sysconf(_SC_PHYS_PAGES);
  *f = static_cast<size_t>(pages) * emu::kPage;
  *t = static_cast<size_t>(total) * emu::kPage;
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > emu::kMaxDynSmem) return cudaErrorInvalidValue;
    emu::g_max_dyn_smem[func] = value;
  }
  return cudaSuccess;
}
static cudaError_t refused_while_capturing(const char* what) {
  return g_capturing.empty() ? cudaSuccess : emu::capture_violation(what);
}
cudaError_t cudaMalloc(void** p, size_t n) {
  if (cudaError_t e = refused_while_capturing("cudaMalloc")) return e;
  *p = emu::guarded_alloc(n, false);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaFree(void* p) {
  if (cudaError_t e = refused_while_capturing("cudaFree")) return e;
  if (p && !emu::guarded_free(p)) return cudaErrorInvalidValue;
  return cudaSuccess;
}
cudaError_t cudaMallocHost(void** p, size_t n) {
  if (cudaError_t e = refused_while_capturing("cudaMallocHost")) return e;
  *p = emu::guarded_alloc(n, true);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaFreeHost(void* p) {
  if (cudaError_t e = refused_while_capturing("cudaFreeHost")) return e;
  if (p && !emu::guarded_free(p)) return cudaErrorInvalidValue;
  return cudaSuccess;
}
// A copy that runs past the allocation holding one of its ends is an error (CUDA: cudaErrorInvalidValue).
static bool in_bounds(const void* p, size_t n) {
  auto* a = emu::find_alloc(p);
  return a == nullptr || reinterpret_cast<uintptr_t>(p) + n <= a->first + a->second.n;
}
static cudaError_t copy_checked(void* d, const void* s, size_t n, const char* what) {
  if (!in_bounds(d, n) || !in_bounds(s, n)) {
    emu::set_error(cudaErrorInvalidValue, std::string(what) + " of " + std::to_string(n) +
                                              " bytes runs past the end of a device allocation");
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) {
  if (cudaError_t e = refused_while_capturing("cudaMemcpy (synchronous)")) return e;
  if (cudaError_t e = copy_checked(d, s, n, "cudaMemcpy")) return e;
  std::memmove(d, s, n);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind, cudaStream_t st) {
  if (cudaError_t e = copy_checked(d, s, n, "cudaMemcpyAsync")) return e;
  if (g_capturing.count(st) && (!emu::find_alloc(d) || !emu::find_alloc(s)))
    return emu::capture_violation("cudaMemcpyAsync from or to pageable host memory");
  cudaError_t err;
  if (emu::record(st, [=] { std::memmove(d, s, n); }, &err)) return err;
  std::memmove(d, s, n);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* d, int v, size_t n) {
  if (cudaError_t e = refused_while_capturing("cudaMemset (synchronous)")) return e;
  if (cudaError_t e = copy_checked(d, d, n, "cudaMemset")) return e;
  std::memset(d, v, n);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* d, int v, size_t n, cudaStream_t st) {
  if (cudaError_t e = copy_checked(d, d, n, "cudaMemsetAsync")) return e;
  cudaError_t err;
  if (emu::record(st, [=] { std::memset(d, v, n); }, &err)) return err;
  std::memset(d, v, n);
  return cudaSuccess;
}
cudaError_t cudaStreamCreate(cudaStream_t* s) {
  *s = reinterpret_cast<cudaStream_t>(new char);
  return cudaSuccess;
}
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) { return cudaStreamCreate(s); }
cudaError_t cudaStreamDestroy(cudaStream_t s) {
  if (g_capturing.count(s)) return cudaErrorIllegalState;
  delete reinterpret_cast<char*>(s);
  return cudaSuccess;
}
static cudaError_t async_error() {  // errors of earlier asynchronous work surface at a synchronisation
  const cudaError_t e = emu::g_async;
  emu::g_async = cudaSuccess;
  return e;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) {
  if (cudaError_t e = refused_while_capturing("cudaStreamSynchronize")) return e;
  return async_error();
}
cudaError_t cudaDeviceSynchronize() {
  if (cudaError_t e = refused_while_capturing("cudaDeviceSynchronize")) return e;
  return async_error();
}
cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned) { return cudaSuccess; }
cudaError_t cudaEventCreate(cudaEvent_t* e) {
  *e = reinterpret_cast<cudaEvent_t>(new char);
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t) { return cudaSuccess; }  // streams are synchronous
cudaError_t cudaEventSynchronize(cudaEvent_t) {
  if (cudaError_t e = refused_while_capturing("cudaEventSynchronize")) return e;
  return async_error();
}
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete reinterpret_cast<char*>(e);
  return cudaSuccess;
}
cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode) {
  if (s == nullptr || g_capturing.count(s)) return cudaErrorIllegalState;  // the legacy stream cannot capture
  g_capturing[s] = new emu::GraphRec;
  return cudaSuccess;
}
cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t* g) {
  auto it = g_capturing.find(s);
  if (it == g_capturing.end()) return cudaErrorIllegalState;
  emu::GraphRec* rec = it->second;
  g_capturing.erase(it);
  if (rec->invalidated) {
    emu::g_last_msg = "capture invalidated by " + rec->why;
    delete rec;
    *g = nullptr;
    return cudaErrorStreamCaptureInvalidated;
  }
  *g = reinterpret_cast<cudaGraph_t>(rec);
  return cudaSuccess;
}
cudaError_t cudaGraphInstantiate(cudaGraphExec_t* e, cudaGraph_t g, unsigned long long) {
  if (!g) return cudaErrorInvalidValue;
  *e = reinterpret_cast<cudaGraphExec_t>(new emu::GraphRec(*reinterpret_cast<emu::GraphRec*>(g)));
  return cudaSuccess;
}
cudaError_t cudaGraphLaunch(cudaGraphExec_t e, cudaStream_t s) {
  std::lock_guard<std::recursive_mutex> lk(emu::g_mtx);
  if (!e) return cudaErrorInvalidValue;
  if (g_capturing.count(s)) return emu::capture_violation("cudaGraphLaunch into a capturing stream");
  ++emu::g_stats.graph_launches;
  emu::g_in_graph = true;
  for (auto& op : reinterpret_cast<emu::GraphRec*>(e)->ops) {
    ++(op.kernel ? emu::g_stats.graph_kernels : emu::g_stats.graph_copies);
    op.run();
  }
  emu::g_in_graph = false;
  return cudaSuccess;  // kernel failures surface at the next synchronisation, as on a GPU
}
cudaError_t cudaGraphDestroy(cudaGraph_t g) {
  delete reinterpret_cast<emu::GraphRec*>(g);
  return cudaSuccess;
}
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t e) {
  delete reinterpret_cast<emu::GraphRec*>(e);
  return cudaSuccess;
}
