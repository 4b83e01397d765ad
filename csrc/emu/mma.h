// mma.h of the emulated device (csrc/emu): nvcuda::wmma in plain C++, what csrc/cuda/kernels/gemm_tc.cu uses:
// 16x16x16 fragments (matrix_a / matrix_b of __nv_bfloat16, row or col major; accumulator of float),
// fill_fragment, load_matrix_sync, mma_sync, store_matrix_sync.
//
// Every lane holds the whole 16x16 tile. Each op is a warp collective: the last lane to arrive checks that all
// 32 lanes passed the same fragment (the same stack slot), pointer, leading dimension and layout, does the work
// once and gives every lane the result. Products are fp32 FMAs in increasing k starting from c: the tensor
// cores' internal order is unspecified, so results are within tolerance of a GPU, not bitwise.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
  static constexpr int num_elements = rows * cols;
  T x[num_elements];  // x[i * cols + j]: element (i, j) of the tile
};

namespace detail {
inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float to_f(float v) { return v; }

template <class T>
void check_ptr(const T* p, unsigned ldm, const char* op) {
  // PTX: 256-bit aligned tile address, leading dimension a multiple of 16 bytes
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ldm * sizeof(T)) % 16 != 0) emu::trap(op);
}

template <class F, class T>
struct MemArg {
  F* f;
  T* p;
  unsigned ldm;
  bool col;
  ptrdiff_t slot;
};

template <class F, class T>
MemArg<F, T>* agree(void* const* args, unsigned, const char* op) {
  auto* a = static_cast<MemArg<F, T>*>(args[0]);
  for (int l = 1; l < 32; ++l) {
    auto* b = static_cast<MemArg<F, T>*>(args[l]);
    if (b->p != a->p || b->ldm != a->ldm || b->col != a->col || b->slot != a->slot) emu::trap(op);
  }
  return a;
}
template <class F, class T>
void run_load(void* const* args, unsigned mask) {
  auto* a = agree<F, const T>(args, mask, "wmma::load_matrix_sync: the lanes disagree on fragment, pointer, ldm or layout");
  F& f = *a->f;
  for (int i = 0; i < F::rows; ++i)
    for (int j = 0; j < F::cols; ++j)
      f.x[i * F::cols + j] = a->col ? a->p[static_cast<size_t>(j) * a->ldm + i] : a->p[static_cast<size_t>(i) * a->ldm + j];
  for (int l = 1; l < 32; ++l) std::memcpy(static_cast<void*>(static_cast<MemArg<F, const T>*>(args[l])->f), &f, sizeof(F));
}

template <class F, class T>
void run_store(void* const* args, unsigned mask) {
  auto* a = agree<const F, T>(args, mask, "wmma::store_matrix_sync: the lanes disagree on fragment, pointer, ldm or layout");
  const F& f = *a->f;
  for (int i = 0; i < F::rows; ++i)
    for (int j = 0; j < F::cols; ++j)
      (a->col ? a->p[static_cast<size_t>(j) * a->ldm + i] : a->p[static_cast<size_t>(i) * a->ldm + j]) = f.x[i * F::cols + j];
}

template <class F, class T>
struct FillArg {
  F* f;
  T v;
  ptrdiff_t slot;
};
template <class F, class T>
void run_fill(void* const* args, unsigned) {
  auto* a = static_cast<FillArg<F, T>*>(args[0]);
  for (int l = 1; l < 32; ++l) {
    auto* b = static_cast<FillArg<F, T>*>(args[l]);
    if (b->slot != a->slot || std::memcmp(&b->v, &a->v, sizeof(T)) != 0)
      emu::trap("wmma::fill_fragment: the lanes disagree on fragment or value");
  }
  for (int l = 0; l < 32; ++l) {
    F& f = *static_cast<FillArg<F, T>*>(args[l])->f;
    for (int i = 0; i < F::num_elements; ++i) f.x[i] = a->v;
  }
}

template <class D, class A, class B, class C>
struct MmaArg {
  D* d;
  const A* a;
  const B* b;
  const C* c;
  ptrdiff_t slot[4];
};
template <int M, int N, int K, class D, class A, class B, class C>
void run_mma(void* const* args, unsigned) {
  using Arg = MmaArg<D, A, B, C>;
  const Arg* a0 = static_cast<Arg*>(args[0]);
  for (int l = 1; l < 32; ++l)
    if (std::memcmp(static_cast<Arg*>(args[l])->slot, a0->slot, sizeof a0->slot) != 0)
      emu::trap("wmma::mma_sync: the lanes disagree on the fragments");
  float af[M][K], bf[K][N];
  for (int i = 0; i < M; ++i)
    for (int k = 0; k < K; ++k) af[i][k] = to_f(a0->a->x[i * K + k]);
  for (int k = 0; k < K; ++k)
    for (int j = 0; j < N; ++j) bf[k][j] = to_f(a0->b->x[k * N + j]);
  D out;
  for (int i = 0; i < M; ++i) {
    float s[N];
    for (int j = 0; j < N; ++j) s[j] = a0->c->x[i * N + j];
    for (int k = 0; k < K; ++k)
      for (int j = 0; j < N; ++j) s[j] = std::fmaf(af[i][k], bf[k][j], s[j]);
    for (int j = 0; j < N; ++j) out.x[i * N + j] = s[j];
  }
  for (int l = 0; l < 32; ++l) *static_cast<Arg*>(args[l])->d = out;
}
}  // namespace detail

template <class Use, int M, int N, int K, class T, class L>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, const T& v) {
  using F = fragment<Use, M, N, K, T, L>;
  detail::FillArg<F, T> arg{&f, v, emu::stack_offset(&f)};
  emu::warp_collective(&detail::run_fill<F, T>, &arg);
}

template <class Use, int M, int N, int K, class T, class L>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const T* p, unsigned ldm) {
  static_assert(std::is_same<L, row_major>::value || std::is_same<L, col_major>::value, "layout");
  using F = fragment<Use, M, N, K, T, L>;
  detail::check_ptr(p, ldm, "wmma::load_matrix_sync: pointer not 32-byte aligned or ldm not a multiple of 16 bytes");
  detail::MemArg<F, const T> arg{&f, p, ldm, std::is_same<L, col_major>::value, emu::stack_offset(&f)};
  emu::warp_collective(&detail::run_load<F, T>, &arg);
}

template <int M, int N, int K, class T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T, void>& f, const T* p, unsigned ldm, layout_t lay) {
  using F = fragment<accumulator, M, N, K, T, void>;
  detail::check_ptr(p, ldm, "wmma::load_matrix_sync: pointer not 32-byte aligned or ldm not a multiple of 16 bytes");
  detail::MemArg<F, const T> arg{&f, p, ldm, lay == mem_col_major, emu::stack_offset(&f)};
  emu::warp_collective(&detail::run_load<F, T>, &arg);
}

template <int M, int N, int K, class T>
inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T, void>& f, unsigned ldm, layout_t lay) {
  using F = fragment<accumulator, M, N, K, T, void>;
  detail::check_ptr(p, ldm, "wmma::store_matrix_sync: pointer not 32-byte aligned or ldm not a multiple of 16 bytes");
  detail::MemArg<const F, T> arg{&f, p, ldm, lay == mem_col_major, emu::stack_offset(&f)};
  emu::warp_collective(&detail::run_store<F, T>, &arg);
}

template <int M, int N, int K, class Tab, class LA, class LB>
inline void mma_sync(fragment<accumulator, M, N, K, float, void>& d, const fragment<matrix_a, M, N, K, Tab, LA>& a,
                     const fragment<matrix_b, M, N, K, Tab, LB>& b, const fragment<accumulator, M, N, K, float, void>& c) {
  using D = fragment<accumulator, M, N, K, float, void>;
  using A = fragment<matrix_a, M, N, K, Tab, LA>;
  using B = fragment<matrix_b, M, N, K, Tab, LB>;
  detail::MmaArg<D, A, B, D> arg{&d, &a, &b, &c,
                                 {emu::stack_offset(&d), emu::stack_offset(&a), emu::stack_offset(&b), emu::stack_offset(&c)}};
  emu::warp_collective(&detail::run_mma<M, N, K, D, A, B, D>, &arg);
}

}  // namespace wmma
}  // namespace nvcuda
