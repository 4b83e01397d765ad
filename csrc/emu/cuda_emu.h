// cuda_emu.h: the "device compiler" of the emulated device. emu_pp.py puts `#include "cuda_emu.h"` at the top of
// every .cu file of csrc/ it rewrites; g++ then compiles the kernels and the engine runtime for the CPU.
//
// Execution model (emu.cpp): a launch runs its blocks one after another on the calling OS thread (in grid order,
// reversed or shuffled as the schedule says, since a GPU completes blocks in any order); the threads of
// a block are fibers that run until a synchronisation point (__syncthreads, a warp shuffle or vote, __syncwarp, a
// wmma op) or their end. Between synchronisation points they run in ascending, descending or seeded random
// order (emu::set_schedule), so a missing barrier changes the result. __shared__ arrays are function statics
// (blocks never overlap in time), filled with 0xFF (NaN) when a block first reaches them; dynamic shared memory
// likewise. Warp operations are completed by the last lane to arrive, which checks that every lane of the mask
// came to the same operation with the same mask.
#pragma once
#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda_runtime.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __constant__ static
#define __shared__ static  // emu_pp.py rewrites __shared__ declarations; this covers what it does not
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#ifndef __CUDACC__
#define __CUDACC__ 1
#endif
#define __CUDA_ARCH__ 900  // the sm_80+ paths (cp.async, bf16 wmma) run, through the emulated PTX and mma.h

extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;
constexpr int warpSize = 32;

namespace emu {

// ---- launches: emu_pp.py turns `k<<<g, b, s, st>>>(a...)` into `k | ::emu::cfg(__FILE__, __LINE__, g, b, s, st)(a...)`
using Thunk = void (*)(const void* kernel, const void* args);
void launch(const void* kernel, Thunk thunk, std::shared_ptr<const void> args, dim3 grid, dim3 block, size_t smem,
            cudaStream_t stream, const char* file, int line, bool pdl = false);

template <class... A>
struct Pending;
struct Cfg {
  const char* file;
  int line;
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  bool pdl = false;  // a programmatic dependent launch (cudaLaunchKernelEx with the serialization attribute)
  template <class... A>
  Pending<std::decay_t<A>...> operator()(A&&... a) const {
    return Pending<std::decay_t<A>...>{*this, std::tuple<std::decay_t<A>...>(std::forward<A>(a)...)};
  }
};
inline Cfg cfg(const char* file, int line, dim3 g, dim3 b, size_t smem = 0, cudaStream_t s = nullptr) {
  return Cfg{file, line, g, b, smem, s, false};
}
template <class... A>
struct Pending {
  Cfg c;
  std::tuple<A...> args;
};
template <class... P>
void thunk(const void* k, const void* args) {
  auto fn = reinterpret_cast<void (*)(P...)>(const_cast<void*>(k));
  std::apply(fn, *static_cast<const std::tuple<std::decay_t<P>...>*>(args));  // by value: a copy per thread
}
template <class... P, class... A>
void operator|(void (*k)(P...), Pending<A...>&& p) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  // converted to the parameter types once and owned: a captured launch replays these values, as CUDA does
  auto args = std::make_shared<const std::tuple<std::decay_t<P>...>>(std::move(p.args));
  launch(reinterpret_cast<const void*>(k), &thunk<P...>, args, p.c.grid, p.c.block, p.c.smem, p.c.stream, p.c.file,
         p.c.line, p.c.pdl);
}
void pdl_wait();  // griddepcontrol.wait: marks the running block (a programmatic dependent must reach it)

// ---- device side (emu.cpp) ----
extern unsigned cur_lane;  // lane of the running fiber
void syncthreads();
// The warp operation `kind` over `mask`: every lane gives `mine` (and `src`, the lane whose value it wants) and
// gets its result when the last lane of the mask arrives.
enum WarpKind : int { kShfl = 1, kVote = 2, kSync = 3, kCollective = 4 };
uint64_t warp_op(int kind, unsigned mask, uint64_t mine, int src);
// A wmma-style collective: `run` is called once, by the last lane to arrive, with every lane's `arg`.
using CollectiveFn = void (*)(void* const* lane_args, unsigned mask);
void warp_collective(CollectiveFn run, void* arg);
ptrdiff_t stack_offset(const void* p);  // p relative to the running fiber's stack (same slot in every lane?)
unsigned char* dynamic_smem();
void shared_init(void* p, size_t bytes);  // poison a __shared__ array the first time a block reaches it
uint32_t cvta_shared(const void* p);
void* shared_ptr(uint32_t s);
void cp_async(uint32_t dst_shared, const void* src, unsigned bytes, unsigned src_bytes);
void cp_async_commit();
void cp_async_wait(unsigned keep);
[[noreturn]] void trap(const char* why);

template <class T>
inline T* dyn_smem() {
  return reinterpret_cast<T*>(dynamic_smem());
}
template <class T>
inline uint64_t to_bits(const T& v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type wider than 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <class T>
inline T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

// ---- the inline-PTX subset of csrc/ (emu_pp.py turns asm statements into ptx_call) ----
inline bool starts(const char* s, const char* p) { return std::strncmp(s, p, std::strlen(p)) == 0; }
template <class T>
inline uint64_t ptx_in(const T& v) {
  if constexpr (std::is_pointer<T>::value)
    return reinterpret_cast<uint64_t>(v);
  else
    return static_cast<uint64_t>(v);
}
template <class... T>
inline void ptx_call(const char* tmpl, std::tuple<T*...> outs, std::initializer_list<uint64_t> in) {
  const uint64_t* ins = in.begin();
  if (starts(tmpl, "ld.global")) {  // ld.global[.nc][.L1::..].v4.u32 {%0..%3}, [%4]: a plain load here
    const char* src = reinterpret_cast<const char*>(ins[0]);
    std::apply([&](auto*... o) {
      size_t off = 0;
      ((std::memcpy(o, src + off, sizeof(*o)), off += sizeof(*o)), ...);
    }, outs);
  } else if (starts(tmpl, "cp.async.ca.shared.global") || starts(tmpl, "cp.async.cg.shared.global")) {
    // [%0], [%1], BYTES[, %2]: the copy lands at the matching wait_group, not before
    const char* b = std::strchr(std::strchr(tmpl, ']') + 1, ']');
    const unsigned n = static_cast<unsigned>(std::atoi(std::strchr(b, ',') + 1));
    const unsigned src_n = in.size() >= 3 ? static_cast<unsigned>(ins[2]) : n;
    cp_async(static_cast<uint32_t>(ins[0]), reinterpret_cast<const void*>(ins[1]), n, src_n);
  } else if (starts(tmpl, "griddepcontrol.wait")) {  // streams run in order: the predecessor is complete
    pdl_wait();
  } else if (starts(tmpl, "griddepcontrol.launch_dependents") || starts(tmpl, "prefetch.global.L2")) {
    // scheduling hints only
  } else if (starts(tmpl, "cp.async.commit_group")) {
    cp_async_commit();
  } else if (starts(tmpl, "cp.async.wait_group")) {
    cp_async_wait(static_cast<unsigned>(std::atoi(tmpl + std::strlen("cp.async.wait_group"))));
  } else if (starts(tmpl, "cp.async.wait_all")) {
    cp_async_commit();
    cp_async_wait(0);
  } else {
    trap("inline PTX that the emulated device does not implement");
  }
}

}  // namespace emu

// ---- cudaLaunchKernelEx: the launch attributes csrc/ uses (programmatic stream serialization) ----
template <class... P, class... A>
inline cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* c, void (*k)(P...), A&&... a) {
  ::emu::Cfg cfg{"cudaLaunchKernelEx", 0, c->gridDim, c->blockDim, c->dynamicSmemBytes, c->stream, false};
  for (unsigned i = 0; i < c->numAttrs; ++i) {
    if (c->attrs[i].id != cudaLaunchAttributeProgrammaticStreamSerialization) return cudaErrorNotSupported;
    cfg.pdl = c->attrs[i].val.programmaticStreamSerializationAllowed != 0;
  }
  k | cfg(std::forward<A>(a)...);
  return cudaSuccess;  // launch errors: cudaGetLastError, as after <<<>>>
}

// ---- intrinsics ----
inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::warp_op(emu::kSync, mask, 0, 0); }
inline void __threadfence() {}
inline void __threadfence_block() {}

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = warpSize) {
  const int lane = static_cast<int>(emu::cur_lane), base = lane & ~(width - 1);
  return emu::from_bits<T>(emu::warp_op(emu::kShfl, mask, emu::to_bits(v), base + (src & (width - 1))));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
  const int lane = static_cast<int>(emu::cur_lane);
  int src = lane ^ lane_mask;
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;
  return emu::from_bits<T>(emu::warp_op(emu::kShfl, mask, emu::to_bits(v), src));
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  const int lane = static_cast<int>(emu::cur_lane), seg = lane & ~(width - 1), src = lane - static_cast<int>(delta);
  return emu::from_bits<T>(emu::warp_op(emu::kShfl, mask, emu::to_bits(v), src < seg ? lane : src));
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  const int lane = static_cast<int>(emu::cur_lane), seg = lane & ~(width - 1), src = lane + static_cast<int>(delta);
  return emu::from_bits<T>(emu::warp_op(emu::kShfl, mask, emu::to_bits(v), src >= seg + width ? lane : src));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return static_cast<unsigned>(emu::warp_op(emu::kVote, mask, pred != 0, 0));
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }

// Fibers of one OS thread never run at the same time: a plain read-modify-write is atomic.
template <class T>
inline T atomicAdd(T* p, T v) { const T o = *p; *p = o + v; return o; }
template <class T>
inline T atomicMax(T* p, T v) { const T o = *p; *p = o < v ? v : o; return o; }
template <class T>
inline T atomicExch(T* p, T v) { const T o = *p; *p = v; return o; }

template <class T>
inline T __ldg(const T* p) { return *p; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int u; std::memcpy(&u, &f, 4); return u; }
// Correctly rounded on the GPU and here: one IEEE operation, one rounding each (setup.py compiles with
// -ffp-contract=off, so g++ never fuses a*b+c into an FMA; SSE arithmetic, no x87 extended precision).
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dmul_rn(double a, double b) { return a * b; }
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
// Approximations on the GPU (a few ulp): glibc's values here, so never bitwise-comparable with a GPU. The kernels
// call none of them on the decode path (fixed_math.h: exp2_fixed, exp_fixed, log_f32, inv_sqrt instead).
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
[[noreturn]] inline void __trap() { emu::trap("__trap()"); }
inline size_t __cvta_generic_to_shared(const void* p) { return emu::cvta_shared(p); }
