#include "thread_pool.h"

#include <chrono>
#include <algorithm>
#include <climits>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace adadecode::cpu {
namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Sleep while *word == expected (spurious returns are fine: callers re-check).
void futex_wait(std::atomic<uint32_t>& word, uint32_t expected) {
#if defined(__linux__)
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAIT_PRIVATE, expected, nullptr, nullptr, 0);
#else
  word.wait(expected);
#endif
}
void futex_wake_all(std::atomic<uint32_t>& word) {
#if defined(__linux__)
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
#else
  word.notify_all();
#endif
}

// Spins until pred() or kSpinMicros have passed; true when pred() held.
template <class P>
bool spin_until(P&& pred) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(ThreadPool::kSpinMicros);
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (pred()) return true;
      cpu_relax();
    }
    if (std::chrono::steady_clock::now() >= until) return pred();
  }
}

constexpr uint64_t kMask24 = (1u << 24) - 1;
inline uint32_t job_of(uint64_t c) { return static_cast<uint32_t>(c >> 48); }
inline int end_of(uint64_t c) { return static_cast<int>((c >> 24) & kMask24); }
inline int next_of(uint64_t c) { return static_cast<int>(c & kMask24); }

}  // namespace

ThreadPool::ThreadPool(int n_threads) : n_threads_(n_threads), cursors_(n_threads < 1 ? 1 : n_threads) {
  // a bound only (the range a caller may ask for is EngineOptions', adadecode/engines/options.py)
  if (n_threads < 1) throw std::invalid_argument("CPU engine: threads = " + std::to_string(n_threads) + " must be >= 1");
  threads_.reserve(n_threads - 1);
  for (int i = 1; i < n_threads; ++i) threads_.emplace_back([this, i] { worker(i); });
}

ThreadPool::~ThreadPool() {
  stop_.store(true);
  gen_.fetch_add(1);
  futex_wake_all(gen_);
  for (auto& t : threads_) t.join();
}

int ThreadPool::claim(uint32_t id, int thread) {
  for (int k = 0; k < n_threads_; ++k) {
    std::atomic<uint64_t>& cur = cursors_[(thread + k) % n_threads_].word;
    uint64_t c = cur.load(std::memory_order_acquire);
    for (;;) {
      if (job_of(c) != (id & 0xffffu)) return -1;  // a later job: this one is done
      if (next_of(c) >= end_of(c)) break;          // this share is used up: the next one
      if (cur.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel, std::memory_order_acquire))
        return next_of(c);
    }
  }
  return -1;
}

void ThreadPool::work(uint32_t id, int thread) {
  // The job's fn, ctx and item count are read only after an item is claimed: the caller does not post the next job
  // before that item is done, so they are this job's.
  bool first = true;
  for (int item; (item = claim(id, thread)) >= 0; first = false) {
    fn_(ctx_, thread, item, first);
    // once the last item is counted the caller may post the next job at once
    if (done_.fetch_add(1) + 1 == static_cast<uint32_t>(n_items_) && caller_asleep_.load()) futex_wake_all(done_);
  }
}

void ThreadPool::worker(int index) {
  // gen_'s value when the pool was made, not when this thread got to run: a job or the shutdown may come first
  uint32_t seen = 0;
  for (;;) {
    if (!spin_until([&] { return gen_.load(std::memory_order_acquire) != seen; })) {
      sleepers_.fetch_add(1);
      while (gen_.load() == seen) futex_wait(gen_, seen);
      sleepers_.fetch_sub(1);
    }
    seen = gen_.load(std::memory_order_acquire);
    if (stop_.load()) return;
    work(static_cast<uint32_t>(job_of(cursors_[index].word.load(std::memory_order_acquire))), index);
  }
}

void ThreadPool::run_scheduled(int n_items, ItemFn fn, void* ctx) {
  const int T = n_threads_;
  std::vector<int> order(n_items), thread(n_items);
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 rng(seed_ * 0x9e3779b97f4a7c15ull + ++jobs_);
  if (schedule_ == Schedule::kReverse) {
    std::reverse(order.begin(), order.end());
    for (int i = 0; i < n_items; ++i) {
      int k = 0;  // the owner of item i: run()'s split [k n / T, (k + 1) n / T)
      while (k + 1 < T && static_cast<int64_t>(n_items) * (k + 1) / T <= i) ++k;
      thread[i] = T - 1 - k;
    }
  } else {
    std::shuffle(order.begin(), order.end(), rng);
    for (int i = 0; i < n_items; ++i) thread[i] = static_cast<int>(rng() % static_cast<uint64_t>(T));
  }
  std::vector<char> started(T, 0);
  for (int item : order) {
    const int t = thread[item];
    fn(ctx, t, item, !started[t]);
    started[t] = 1;
  }
}

void ThreadPool::run(int n_items, ItemFn fn, void* ctx, size_t bytes) {
  if (n_items <= 0) return;
  if (schedule_ != Schedule::kNatural) {  // every job, the small ones too: their merges are the same code
    run_scheduled(n_items, fn, ctx);
    return;
  }
  if (n_threads_ == 1 || bytes < kInlineBytes) {
    for (int i = 0; i < n_items; ++i) fn(ctx, 0, i, i == 0);
    return;
  }
  if (n_items > kMaxItems) throw std::invalid_argument("CPU engine: a job of " + std::to_string(n_items) + " items");
  fn_ = fn;
  ctx_ = ctx;
  id_ = (id_ + 1) & 0xffffu;
  n_items_ = n_items;
  done_.store(0);
  for (int k = 0; k < n_threads_; ++k) {  // thread k's share: [k n / T, (k + 1) n / T)
    const uint64_t begin = static_cast<uint64_t>(n_items) * k / n_threads_;
    const uint64_t end = static_cast<uint64_t>(n_items) * (k + 1) / n_threads_;
    cursors_[k].word.store((static_cast<uint64_t>(id_) << 48) | (end << 24) | begin, std::memory_order_release);
  }
  gen_.fetch_add(1);
  if (sleepers_.load() > 0) futex_wake_all(gen_);
  work(id_, 0);
  const uint32_t n = static_cast<uint32_t>(n_items);
  if (!spin_until([&] { return done_.load(std::memory_order_acquire) == n; })) {
    caller_asleep_.store(1);
    for (uint32_t d; (d = done_.load()) != n;) futex_wait(done_, d);
    caller_asleep_.store(0);
  }
}

}  // namespace adadecode::cpu
