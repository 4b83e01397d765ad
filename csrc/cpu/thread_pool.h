// The CPU engine's thread pool: a job is n items, claimed one at a time by whichever thread is free (the caller
// included); it ends when every item is done, whether or not every worker took part. Thread k first claims the
// items of its own contiguous share (a weight job then reads one sequential stream per thread), then those left in
// the others' shares.
//
// Why this shape: on a shared 2-core machine a worker may not run for milliseconds. A pool that splits a job into
// fixed per-thread shares, or waits for every worker to arrive at a barrier, then waits for the slowest thread
// each step (torch's OpenMP pool went from 68 to ~900 ms/token under load). Here a late worker finds the items
// taken and does nothing; the caller waits only for items in progress. Items never split a reduction (kernels.h),
// so which thread runs an item changes no bit.
//
// A job's result must be a function of its items' indices alone, never of which thread ran an item or in what order
// (a merge across items breaks ties by index: engine.cpp, docs/cpu.md). A test-only schedule (set_schedule) runs a
// job's items on the caller, in reversed or seeded shuffled order, each under the thread index that stealing could
// give it (reversed: thread T-1-k runs share k; shuffled: any thread), so the tests see every interleaving that
// matters for such a merge without relying on a race.
//
// Waiting: workers spin (pause) for kSpinMicros after their last item, then sleep on a futex; the caller spins as
// long for items in flight, then sleeps. Between the jobs of one token the workers stay awake; between tokens
// (Python runs the driver) they go to sleep and cost nothing.
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <thread>
#include <vector>

namespace adadecode::cpu {

class ThreadPool {
 public:
  // fn(ctx, thread, item, first): run item `item` on thread `thread` (0 = the caller); `first` is true for the
  // first item that thread runs in this job (per-thread set-up: each thread prepares its own inputs).
  using ItemFn = void (*)(void* ctx, int thread, int item, bool first);

  explicit ThreadPool(int n_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  // kNatural: the real threads as above. kReverse / kShuffle: the test schedules (the header's comment); seed picks
  // the shuffles (each job draws its own from seed and the job count).
  enum class Schedule { kNatural, kReverse, kShuffle };
  void set_schedule(Schedule s, uint64_t seed) { schedule_ = s, seed_ = seed; }
  Schedule schedule() const { return schedule_; }
  // Runs items 0..n_items-1 and returns when all are done. Not reentrant: one job at a time. bytes: what the job
  // reads; below kInlineBytes the caller runs it alone (waking a thread costs more than such a job).
  void run(int n_items, ItemFn fn, void* ctx, size_t bytes = SIZE_MAX);

  static constexpr size_t kInlineBytes = 128 << 10;

  static constexpr int kSpinMicros = 200;
  static constexpr int kMaxItems = (1 << 24) - 1;

 private:
  void worker(int index);
  // Claims the next item of job `id` for `thread` (its share first), or returns -1 when job `id` has no item left
  // (or is no longer the live job).
  int claim(uint32_t id, int thread);
  void work(uint32_t id, int thread);
  void run_scheduled(int n_items, ItemFn fn, void* ctx);

  int n_threads_;
  std::vector<std::thread> threads_;
  // One cursor per thread's share: job id (16 bits) | end of the share (24) | next item (24). One word, so that a claim
  // sees the job it claims in. Padded to a cache line each: the threads claim concurrently.
  struct alignas(64) Cursor {
    std::atomic<uint64_t> word{0};
  };
  std::vector<Cursor> cursors_;
  int n_items_ = 0;  // the live job's items (read only by a thread holding one of its items)
  std::atomic<uint32_t> gen_{0};       // bumped per job and at shutdown (the workers' futex word)
  std::atomic<uint32_t> done_{0};      // items finished in the live job (the caller's futex word)
  std::atomic<int> sleepers_{0};       // workers asleep on gen_
  std::atomic<int> caller_asleep_{0};  // the caller asleep on done_
  std::atomic<bool> stop_{false};
  ItemFn fn_ = nullptr;
  void* ctx_ = nullptr;
  uint32_t id_ = 0;
  Schedule schedule_ = Schedule::kNatural;
  uint64_t seed_ = 0, jobs_ = 0;
};

}  // namespace adadecode::cpu
