// A torch-free check of the CPU kernels' bits: fixed inputs (a xorshift generator), every kernel of every path this
// CPU runs, one FNV-1a hash of the output bits per (check, path). All paths of one machine must print the same
// hashes (the exit status says whether they do), and tests/test_cpu_neon.py compares this program's output on x86
// with the same program cross-compiled for aarch64 and run under qemu-user (the neon and portable paths there):
// the same bits on every path of every architecture.
//
//   kernel_check [--paths a,b,...]     (default: every path this CPU runs)
//
// Output: one line per check, "name hash path1=hash path2=hash ..." when they agree, "MISMATCH" otherwise.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "../../common/fixed_math.h"
#include "../kernels.h"
#include "../lanes.h"

using namespace adadecode::cpu;

namespace {

struct Rng {
  uint64_t s;
  uint64_t next() {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    return s;
  }
  float uniform() { return static_cast<float>(next() >> 40) * 0x1p-24f; }  // [0, 1)
  float normal() {  // a sum of 4 uniforms, centred: enough for kernel inputs
    return (uniform() + uniform() + uniform() + uniform() - 2.f) * 1.7f;
  }
};

float bf16_round(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) u = 0x7fff0000u;
  else u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  std::memcpy(&x, &u, 4);
  return x;
}
uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return static_cast<uint16_t>(u >> 16);
}

struct Hash {
  uint64_t h = 1469598103934665603ull;
  void bytes(const void* p, size_t n) {
    const unsigned char* c = static_cast<const unsigned char*>(p);
    for (size_t i = 0; i < n; ++i) h = (h ^ c[i]) * 1099511628211ull;
  }
  template <class T>
  void vec(const std::vector<T>& v) { bytes(v.data(), v.size() * sizeof(T)); }
};

// One check: a function of the kernels giving a hash.
struct Check {
  std::string name;
  std::function<uint64_t(const Kernels&)> run;
};

// values * 2^scale_exp rounded to bf16 (scale_exp very negative: tiny and subnormal values)
std::vector<float> bf16_values(Rng& g, size_t n, float sd, int scale_exp = 0) {
  std::vector<float> v(n);
  for (auto& x : v) x = bf16_round(std::ldexp(g.normal() * sd, scale_exp));
  return v;
}

uint64_t dot_check(const Kernels& k, int K, int R, int C, uint64_t seed, int wexp, int xexp) {
  Rng g{seed};
  const LaneLayout L(K, skinny_lanes(K));
  const std::vector<float> w = bf16_values(g, static_cast<size_t>(C) * K, 0.05f, wexp);
  const std::vector<float> x = bf16_values(g, static_cast<size_t>(R) * K, 1.f, xexp);
  std::vector<uint16_t> packed(static_cast<size_t>(C) * K);
  for (int c = 0; c < C; ++c)
    for (int j = 0; j < K; ++j) packed[static_cast<size_t>(c) * K + j] = bf16_bits(w[static_cast<size_t>(c) * K + L.wsrc[j]]);
  std::vector<float> row(K + 1, 0.f), xp(static_cast<size_t>(R) * L.xlen + 16, 0.f);
  for (int r = 0; r < R; ++r) {
    std::memcpy(row.data(), x.data() + static_cast<size_t>(r) * K, K * sizeof(float));
    k.permute_x(L, row.data(), xp.data() + static_cast<size_t>(r) * L.xlen);
  }
  std::vector<const uint16_t*> ptrs(C);
  for (int c = 0; c < C; ++c) ptrs[c] = packed.data() + static_cast<size_t>(c) * K;
  std::vector<float> out(static_cast<size_t>(R) * C);
  k.dot_tile(L, ptrs.data(), C, xp.data(), L.xlen, R, out.data(), bf16_exp_range(packed.data(), packed.size()));
  Hash h;
  h.vec(out);
  return h.h;
}

std::vector<Check> checks() {
  std::vector<Check> cs;
  // dot products: tails (K = 8, 72 chunks on 32 lanes), 1-4 warps, row counts across every tile shape
  for (int K : {8, 576, 1024, 1536, 2056, 4096})
    for (int R : {1, 2, 3, 4, 5, 7, 8, 13})
      cs.push_back({"dot K=" + std::to_string(K) + " R=" + std::to_string(R),
                    [=](const Kernels& k) { return dot_check(k, K, R, 19, 1000 + K * 31 + R, 0, 0); }});
  // tiny values (the bf16 dot-product instruction would flush them: its path falls back to the FMA chains)
  cs.push_back({"dot tiny weights", [](const Kernels& k) { return dot_check(k, 576, 4, 9, 77, -118, 0); }});
  cs.push_back({"dot subnormal weights", [](const Kernels& k) { return dot_check(k, 576, 3, 9, 78, -128, 0); }});
  cs.push_back({"dot tiny both", [](const Kernels& k) { return dot_check(k, 1536, 5, 7, 79, -60, -60); }});
  cs.push_back({"dot f32", [](const Kernels& k) {
                   Rng g{5};
                   Hash h;
                   for (int K : {576, 64, 1536}) {
                     const LaneLayout L(K, 32);
                     std::vector<float> x = bf16_values(g, K, 1.f), a(L.xlen), b(L.xlen);
                     x.push_back(0.f);
                     k.permute(L, x.data(), a.data());
                     std::vector<float> y = bf16_values(g, K, 1.f);
                     y.push_back(0.f);
                     k.permute(L, y.data(), b.data());
                     const float s1 = k.dot_f32(L, a.data(), a.data()), s2 = k.dot_f32(L, a.data(), b.data());
                     h.bytes(&s1, 4), h.bytes(&s2, 4);
                   }
                   return h.h;
                 }});
  cs.push_back({"elementwise", [](const Kernels& k) {
                   Rng g{9};
                   Hash h;
                   for (int n : {1, 15, 16, 17, 576, 1000}) {
                     std::vector<float> x(n), y(n), o(n), o2(n);
                     for (auto& v : x) v = g.normal() * 3.f;
                     for (auto& v : y) v = g.normal() * 3.f;
                     std::vector<uint16_t> gw(n), hb(n);
                     for (auto& v : gw) v = bf16_bits(bf16_round(g.normal()));
                     for (auto& v : hb) v = bf16_bits(bf16_round(g.normal()));
                     k.round_bf16(x.data(), o.data(), n);
                     h.vec(o);
                     k.norm_apply(x.data(), 0.37f, gw.data(), o.data(), n);
                     h.vec(o);
                     k.silu_mul(x.data(), y.data(), o.data(), n);
                     h.vec(o);
                     k.residual_add(y.data(), hb.data(), n);
                     h.vec(hb);
                     k.bf16_to_f32(hb.data(), o.data(), n);
                     h.vec(o);
                     k.round_bf16(o.data(), o2.data(), n);
                     std::vector<uint16_t> back(n);
                     k.f32_to_bf16(o2.data(), back.data(), n);
                     h.vec(back);
                     float best = -INFINITY;
                     int idx = -1;
                     const bool ok = k.argmax(o2.data(), n, 100, &best, &idx);
                     h.bytes(&best, 4), h.bytes(&idx, 4), h.bytes(&ok, 1);
                   }
                   return h.h;
                 }});
  cs.push_back({"exp exp2", [](const Kernels& k) {
                   std::vector<float> x;
                   for (float v : {NAN, INFINITY, -INFINITY, 0.f, -0.f, 88.72f, 88.8f, -103.f, -126.f, -125.5f, 127.5f, 128.f})
                     x.push_back(v);
                   for (int i = 0; i <= 20000; ++i) x.push_back(-140.f + 0.014f * static_cast<float>(i));
                   std::vector<float> y(x.size());
                   Hash h;
                   k.exp(x.data(), y.data(), static_cast<int>(x.size()));
                   h.vec(y);
                   k.exp2(x.data(), y.data(), static_cast<int>(x.size()));
                   h.vec(y);
                   return h.h;
                 }});
  cs.push_back({"rope", [](const Kernels& k) {
                   Rng g{11};
                   Hash h;
                   for (int hd : {64, 128, 48}) {
                     std::vector<float> y = bf16_values(g, hd, 1.f), c(hd / 2), s(hd / 2), o(hd);
                     for (int i = 0; i < hd / 2; ++i) c[i] = g.uniform() * 2.f - 1.f, s[i] = g.uniform() * 2.f - 1.f;  // no libm: the same inputs on every machine
                     k.rope(y.data(), c.data(), s.data(), hd, o.data());
                     h.vec(o);
                   }
                   return h.h;
                 }});
  // attention: 3 kv heads x 3 heads each, head_dim 64, rows at positions 150..158 over a 300-position cache
  // (3 chunks), with and without a sliding window
  for (int window : {0, 100})
    cs.push_back({"attention window=" + std::to_string(window), [window](const Kernels& k) {
                     Rng g{13};
                     const int Hkv = 3, H = 9, hd = 64, max_seq = 300, R = 9, first = 150;
                     const int nkb = (max_seq + kKBlock - 1) / kKBlock, nch = (max_seq + kAttnChunk - 1) / kAttnChunk;
                     std::vector<uint16_t> kb(static_cast<size_t>(Hkv) * nkb * hd * kKBlock), v(static_cast<size_t>(Hkv) * max_seq * hd);
                     for (auto& e : kb) e = bf16_bits(bf16_round(g.normal()));
                     for (auto& e : v) e = bf16_bits(bf16_round(g.normal()));
                     std::vector<float> q = bf16_values(g, static_cast<size_t>(R) * H * hd, 1.f);
                     std::vector<float> po(static_cast<size_t>(R) * H * nch * hd), pm(static_cast<size_t>(R) * H * nch * 2),
                         out(static_cast<size_t>(R) * H * hd);
                     AttnArgs a;
                     a.q = q.data(), a.k_blocks = kb.data(), a.v = v.data(), a.part_o = po.data(), a.part_ml = pm.data();
                     a.out = out.data(), a.R = R, a.first = first, a.n_heads = H, a.n_kv_heads = Hkv, a.head_dim = hd;
                     a.max_seq = max_seq, a.n_chunks = nch, a.window = window, a.qscale = 1.4426950408889634f / 8.f;
                     const int last = first + R - 1;
                     for (int kh = 0; kh < Hkv; ++kh)
                       for (int c = attn_lo(first, window) / kAttnChunk; c <= last / kAttnChunk; ++c) k.attn_chunk(a, kh, c, 0, R);
                     for (int r = 0; r < R; ++r)
                       for (int hh = 0; hh < H; ++hh) k.attn_merge(a, r, hh);
                     Hash h;
                     h.vec(out);
                     return h.h;
                   }});
  return cs;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> paths;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], "--paths") == 0) {
      std::string s = argv[i + 1];
      for (size_t p = 0; p <= s.size();) {
        const size_t q = s.find(',', p);
        paths.push_back(s.substr(p, q == std::string::npos ? std::string::npos : q - p));
        if (q == std::string::npos) break;
        p = q + 1;
      }
    }
  if (paths.empty())
    for (const char* const* p = supported_isas(); *p; ++p) paths.emplace_back(*p);
  std::vector<const Kernels*> ks;
  for (const auto& p : paths) {
    const Kernels* k = kernels_for(p.c_str());
    if (!k) {
      std::fprintf(stderr, "kernel_check: path %s does not run here\n", p.c_str());
      return 2;
    }
    ks.push_back(k);
  }
  int bad = 0;
  for (const Check& c : checks()) {
    std::vector<uint64_t> hs;
    for (const Kernels* k : ks) hs.push_back(c.run(*k));
    bool same = true;
    for (uint64_t x : hs) same = same && x == hs[0];
    std::printf("%s\t%016llx", c.name.c_str(), static_cast<unsigned long long>(hs[0]));
    for (size_t i = 0; i < ks.size(); ++i) std::printf("\t%s=%016llx", ks[i]->name, static_cast<unsigned long long>(hs[i]));
    std::printf("%s\n", same ? "" : "\tMISMATCH");
    bad += !same;
  }
  return bad ? 1 : 0;
}
