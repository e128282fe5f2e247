// The emulator's launch machinery (see runtime.h for what it guarantees and checks).
//
// Synchronisation: all barrier and warp-collective state of the live block is guarded by one mutex (one
// block runs at a time). Each thread is ready, blocked (at a barrier or a warp collective) or exited; when
// no thread is ready but some are blocked, nothing can ever release them: a deadlock, reported with where
// every thread waits instead of hanging.
//
// Schedules (set_schedule / XVERSE_EMU_SCHEDULE):
//   "alternate" (default): one thread runs at a time, in reverse thread order in even blocks and forward
//       order in odd ones; the running thread keeps going until it blocks or exits. Deterministic, and a
//       read of another thread's shared-memory write without a barrier between them sees the poison (or a
//       stale value) whenever the reader is scheduled first: with both orders, whichever thread writes.
//   "forward" / "reverse": the same in one order.
//   "concurrent": every thread runs freely (what ThreadSanitizer needs to see the races itself).
#include "emu/runtime.h"

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdlib>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace xverse::emu {
namespace {

constexpr unsigned char kPoison = 0xFF;  // all-ones: NaN as fp32 / bf16 / fp16, -1 as an integer
constexpr size_t kMaxDefaultDynamicSmem = 48 * 1024;  // above this a GPU launch needs cudaFuncSetAttribute

struct Abort {};  // unwinds a kernel thread after the launch failed

struct AsyncCopy {
  void* dst;
  const void* src;
  int src_bytes;
  int total_bytes;
};

enum class Schedule { kAlternate, kForward, kReverse, kConcurrent };

Schedule schedule_from_env() {
  const char* env = std::getenv("XVERSE_EMU_SCHEDULE");
  const std::string name = env ? env : "alternate";
  if (name == "forward") return Schedule::kForward;
  if (name == "reverse") return Schedule::kReverse;
  if (name == "concurrent") return Schedule::kConcurrent;
  return Schedule::kAlternate;
}
std::atomic<Schedule> g_schedule{schedule_from_env()};

struct WarpState {
  unsigned arrived = 0;   // lanes waiting in the current collective
  unsigned mask = 0;      // its member mask
  unsigned exited = 0;    // lanes that finished the kernel (or do not exist: a partial last warp)
  uint64_t generation = 0;
  const char* what = nullptr;
  Site site;
  unsigned char slots[2][32][kExchangeBytes];  // double-buffered by generation parity
};

enum class State { kReady, kBlocked, kExited };
constexpr int kBlockBarrier = -1;  // ThreadState::blocked_on: the block barrier, or a warp index

struct ThreadState {
  int tid = 0;
  State state = State::kReady;
  int blocked_on = 0;
  std::condition_variable cv;
  uint64_t barriers = 0;      // __syncthreads passed in this block
  uint64_t barrier_hash = 0;  // and where: a hash of their sites
  Site last_barrier;
  const char* waiting_at = nullptr;  // for deadlock reports
  Site waiting_site;
  std::vector<AsyncCopy> uncommitted;
  std::deque<std::vector<AsyncCopy>> committed;
};

// Every static __shared__ variable executed so far (register_shared): poisoned at each block start.
struct SharedRegistry {
  std::mutex mutex;
  std::vector<std::pair<unsigned char*, size_t>> ranges;
};
SharedRegistry& shared_registry() {
  static SharedRegistry registry;
  return registry;
}

class Launch;
thread_local Launch* t_launch = nullptr;
thread_local ThreadState* t_thread = nullptr;

std::string where(const Site& s) { return std::string(s.file_name()) + ":" + std::to_string(s.line()); }

std::string dim_str(const dim3& d) {
  return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

class Launch {
 public:
  Launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body)
      : grid_(grid), block_(block), body_(body),
        num_threads_(static_cast<int>(block.x * block.y * block.z)),
        num_warps_((num_threads_ + 31) / 32),
        num_blocks_(static_cast<uint64_t>(grid.x) * grid.y * grid.z),
        dynamic_smem_(smem),
        dynamic_buffer_(smem > 0 ? static_cast<unsigned char*>(::operator new(smem, std::align_val_t(128))) : nullptr),
        warps_(num_warps_), threads_(num_threads_),
        schedule_(g_schedule.load()), control_(num_threads_, Between{this}) {}

  ~Launch() {
    if (dynamic_buffer_) ::operator delete(dynamic_buffer_, std::align_val_t(128));
  }

  void run() {
    std::vector<std::thread> pool;
    pool.reserve(num_threads_);
    for (int t = 0; t < num_threads_; ++t) pool.emplace_back([this, t] { thread_main(t); });
    for (auto& th : pool) th.join();
    if (failed_) throw std::runtime_error(error_);
  }

  // ---- barriers ---------------------------------------------------------------------------------------
  void block_barrier(const Site& site) {
    ThreadState& me = *t_thread;
    std::unique_lock lock(mutex_);
    check_failed();
    me.barriers += 1;
    me.barrier_hash = me.barrier_hash * 1000003u + reinterpret_cast<uintptr_t>(site.file_name()) * 31u + site.line();
    me.last_barrier = site;
    ++bar_arrived_;
    if (bar_arrived_ == live_) {
      complete_block_barrier();
      return;
    }
    wait(lock, kBlockBarrier, "__syncthreads", site);
  }

  const unsigned char* warp_exchange(unsigned mask, const void* in, size_t bytes, const char* what, const Site& site) {
    const int tid = t_thread->tid;
    const int lane = tid % 32;
    WarpState& w = warps_[tid / 32];
    std::unique_lock lock(mutex_);
    check_failed();
    const unsigned bit = 1u << lane;
    if (!(mask & bit)) fail_locked(what, site, "the calling lane " + std::to_string(lane) + " is not in the member mask " + hex(mask));
    if (mask & w.exited) {
      fail_locked(what, site, "member mask " + hex(mask) + " names lane(s) " + hex(mask & w.exited) +
                                  " of warp " + std::to_string(tid / 32) + " that have exited (or do not exist)");
    }
    if (w.arrived == 0) {
      w.mask = mask;
      w.what = what;
      w.site = site;
    } else if (w.mask != mask || std::strcmp(w.what, what) != 0) {
      fail_locked(what, site, "lane " + std::to_string(lane) + " joins with mask " + hex(mask) + " while lanes " +
                                  hex(w.arrived) + " wait in " + w.what + " at " + where(w.site) + " with mask " +
                                  hex(w.mask) + " (divergent warp collectives)");
    }
    const int parity = static_cast<int>(w.generation & 1);
    if (bytes) std::memcpy(w.slots[parity][lane], in, bytes);
    w.arrived |= bit;
    if (w.arrived == mask) {
      w.arrived = 0;
      w.generation += 1;
      release(tid / 32);
    } else {
      wait(lock, tid / 32, what, site);
    }
    return &w.slots[parity][0][0];
  }

  [[noreturn]] void fail(const char* what, const Site& site, const std::string& message) {
    std::unique_lock lock(mutex_);
    fail_locked(what, site, message);
  }

  bool in_shared(const void* ptr, size_t bytes) const {
    const auto* p = static_cast<const unsigned char*>(ptr);
    if (dynamic_buffer_ && p >= dynamic_buffer_ && p + bytes <= dynamic_buffer_ + dynamic_smem_) return true;
    SharedRegistry& registry = shared_registry();
    std::lock_guard guard(registry.mutex);
    for (const auto& [begin, size] : registry.ranges) {
      if (p >= begin && p + bytes <= begin + size) return true;
    }
    return false;
  }

  void* dynamic_buffer() const { return dynamic_buffer_; }

 private:
  // The completion step between blocks (runs in one thread while all others wait): checks the block that
  // just ended, then prepares the next one.
  struct Between {
    Launch* launch;
    void operator()() noexcept { launch->between_blocks(); }
  };

  void thread_main(int tid) {
    t_launch = this;
    ThreadState& me = threads_[tid];
    me.tid = tid;
    t_thread = &me;
    blockDim = block_;
    gridDim = grid_;
    threadIdx = make_uint3(tid % block_.x, (tid / block_.x) % block_.y, tid / (block_.x * block_.y));
    control_.arrive_and_wait();  // prepares block 0
    for (uint64_t b = 0; b < num_blocks_ && !stop_; ++b) {
      blockIdx = make_uint3(b % grid_.x, (b / grid_.x) % grid_.y, b / (static_cast<uint64_t>(grid_.x) * grid_.y));
      try {
        wait_for_turn();
        body_();
      } catch (const Abort&) {
      } catch (const std::exception& e) {
        std::unique_lock lock(mutex_);
        if (!failed_) record_failure("kernel threw: " + std::string(e.what()));
      }
      me.uncommitted.clear();  // copies never waited for are never observed
      me.committed.clear();
      exit_block();
      control_.arrive_and_wait();  // checks this block, prepares the next
    }
    t_launch = nullptr;
    t_thread = nullptr;
  }

  void between_blocks() {
    if (started_block_ && !failed_) check_barrier_sequences();
    if (failed_) {
      stop_ = true;
      return;
    }
    if (started_block_) ++current_block_;
    started_block_ = true;
    if (current_block_ >= num_blocks_) return;
    // Reset the block state and poison shared memory.
    live_ = num_threads_;
    ready_ = num_threads_;
    bar_arrived_ = 0;
    serial_ = schedule_ != Schedule::kConcurrent;
    reverse_ = schedule_ == Schedule::kReverse || (schedule_ == Schedule::kAlternate && current_block_ % 2 == 0);
    turn_ = reverse_ ? num_threads_ - 1 : 0;
    for (int w = 0; w < num_warps_; ++w) {
      WarpState& ws = warps_[w];
      ws.arrived = ws.mask = 0;
      const int lanes = std::min(32, num_threads_ - 32 * w);
      ws.exited = lanes == 32 ? 0u : ~((1u << lanes) - 1u);
    }
    for (ThreadState& t : threads_) {
      t.barriers = t.barrier_hash = 0;
      t.waiting_at = nullptr;
      t.state = State::kReady;
    }
    {
      SharedRegistry& registry = shared_registry();
      std::lock_guard guard(registry.mutex);
      for (const auto& [begin, size] : registry.ranges) std::memset(begin, kPoison, size);
    }
    if (dynamic_buffer_) std::memset(dynamic_buffer_, kPoison, dynamic_smem_);
  }

  void check_barrier_sequences() {
    const ThreadState& first = threads_[0];
    for (const ThreadState& t : threads_) {
      if (t.barriers != first.barriers || t.barrier_hash != first.barrier_hash) {
        std::ostringstream msg;
        msg << "divergent __syncthreads in block " << block_str() << ": thread " << first.tid << " passed "
            << first.barriers << " barrier(s)" << (first.barriers ? " (last at " + where(first.last_barrier) + ")" : "")
            << " but thread " << t.tid << " passed " << t.barriers << " barrier(s)"
            << (t.barriers ? " (last at " + where(t.last_barrier) + ")" : "")
            << ": every thread of a block must reach the same barriers (a barrier inside a branch that not "
               "every thread takes, or an early return before a barrier)";
        record_failure(msg.str());
        return;
      }
    }
  }

  // This thread finished the kernel body for the current block.
  void exit_block() {
    std::unique_lock lock(mutex_);
    if (failed_) return;
    const int tid = t_thread->tid;
    WarpState& w = warps_[tid / 32];
    const unsigned bit = 1u << (tid % 32);
    w.exited |= bit;
    --live_;
    --ready_;
    t_thread->state = State::kExited;
    if (w.arrived != 0 && (w.mask & bit)) {
      record_failure("lane " + std::to_string(tid % 32) + " of warp " + std::to_string(tid / 32) + " in block " +
                     block_str() + " exited while lanes " + hex(w.arrived) + " wait for it in " + w.what + " at " +
                     where(w.site) + " (member mask " + hex(w.mask) + ")");
      return;
    }
    // Exited threads no longer count at __syncthreads (as on the GPU); the sequence check above still
    // reports the divergence at the block's end.
    if (bar_arrived_ > 0 && bar_arrived_ == live_) complete_block_barrier();
    if (ready_ == 0 && live_ > 0) {
      record_failure(deadlock_report());
    } else if (serial_ && live_ > 0) {
      pass_turn();
    }
  }

  void complete_block_barrier() {
    bar_arrived_ = 0;
    release(kBlockBarrier);
  }

  // Every thread blocked on `object` (the block barrier or warp w) may run again.
  void release(int object) {
    for (ThreadState& t : threads_) {
      if (t.state == State::kBlocked && t.blocked_on == object) {
        t.state = State::kReady;
        ++ready_;
        if (!serial_) t.cv.notify_one();
      }
    }
  }

  // Serial schedules: hands the turn to the next ready thread in this block's order.
  void pass_turn() {
    for (int step = 1; step <= num_threads_; ++step) {
      const int t = reverse_ ? ((turn_ - step) % num_threads_ + num_threads_) % num_threads_
                             : (turn_ + step) % num_threads_;
      if (threads_[t].state == State::kReady) {
        turn_ = t;
        threads_[t].cv.notify_one();
        return;
      }
    }
  }

  void wait_for_turn() {
    if (!serial_) return;
    std::unique_lock lock(mutex_);
    ThreadState& me = *t_thread;
    me.cv.wait(lock, [&] { return turn_ == me.tid || failed_; });
    check_failed();
  }

  // Blocks the calling thread on `object` until a release (or the launch fails).
  void wait(std::unique_lock<std::mutex>& lock, int object, const char* what, const Site& site) {
    ThreadState& me = *t_thread;
    me.waiting_at = what;
    me.waiting_site = site;
    me.state = State::kBlocked;
    me.blocked_on = object;
    if (--ready_ == 0) {
      record_failure(deadlock_report());
    } else if (serial_) {
      pass_turn();
    }
    me.cv.wait(lock, [&] { return failed_ || (me.state == State::kReady && (!serial_ || turn_ == me.tid)); });
    me.waiting_at = nullptr;
    check_failed();
  }

  void check_failed() const {
    if (failed_) throw Abort{};
  }

  [[noreturn]] void fail_locked(const char* what, const Site& site, const std::string& message) {
    if (!failed_) {
      record_failure(std::string(what) + " at " + where(site) + ", thread " + thread_str() + " of block " +
                     block_str() + ": " + message);
    }
    throw Abort{};
  }

  void record_failure(const std::string& message) {  // caller holds mutex_ (or is the only thread running)
    if (failed_) return;
    error_ = "CUDA emulator: " + message + " [grid " + dim_str(grid_) + ", block " + dim_str(block_) + "]";
    failed_ = true;
    for (ThreadState& t : threads_) t.cv.notify_one();
  }

  std::string deadlock_report() const {
    std::map<std::string, std::vector<int>> stuck;
    for (const ThreadState& t : threads_) {
      if (t.waiting_at) stuck[std::string(t.waiting_at) + " at " + where(t.waiting_site)].push_back(t.tid);
    }
    std::ostringstream msg;
    msg << "deadlock in block " << block_str() << ": every live thread waits and none can release the others "
        << "(a lane named in a member mask never arrives, or threads wait at different barriers):";
    for (const auto& [place, tids] : stuck) {
      msg << " " << tids.size() << " thread(s) [" << tids.front() << (tids.size() > 1 ? ".." + std::to_string(tids.back()) : "")
          << "] in " << place << ";";
    }
    msg << " " << (num_threads_ - live_) << " thread(s) exited";
    return msg.str();
  }

  std::string block_str() const {
    const uint64_t b = current_block_;
    return dim_str(dim3(static_cast<unsigned>(b % grid_.x), static_cast<unsigned>((b / grid_.x) % grid_.y),
                        static_cast<unsigned>(b / (static_cast<uint64_t>(grid_.x) * grid_.y))));
  }
  static std::string thread_str() { return dim_str(dim3(threadIdx.x, threadIdx.y, threadIdx.z)); }
  static std::string hex(unsigned v) {
    std::ostringstream s;
    s << "0x" << std::hex << v;
    return s.str();
  }

  const dim3 grid_, block_;
  const std::function<void()>& body_;
  const int num_threads_, num_warps_;
  const uint64_t num_blocks_;
  const size_t dynamic_smem_;
  unsigned char* const dynamic_buffer_;

  std::mutex mutex_;
  std::vector<WarpState> warps_;
  std::vector<ThreadState> threads_;
  int live_ = 0, ready_ = 0, bar_arrived_ = 0;
  bool failed_ = false;  // guarded by mutex_, also read between blocks (all threads parked)
  std::string error_;

  const Schedule schedule_;
  bool serial_ = true, reverse_ = true;  // this block's schedule
  int turn_ = 0;                         // serial schedules: the one thread allowed to run
  std::barrier<Between> control_;
  uint64_t current_block_ = 0;  // written only in between_blocks()
  bool started_block_ = false;
  bool stop_ = false;
};

std::mutex g_launch_mutex;  // static shared memory is one copy: one launch at a time

Launch& current() {
  if (!t_launch) throw std::runtime_error("CUDA emulator: a device function was called outside a kernel launch");
  return *t_launch;
}

}  // namespace

void launch(dim3 grid, dim3 block, size_t dynamic_smem_bytes, const std::function<void()>& body) {
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0) {
    throw std::runtime_error("CUDA emulator: invalid launch configuration: grid " + dim_str(grid) + ", block " +
                             dim_str(block) + " (every dimension must be >= 1)");
  }
  if (threads > 1024 || block.z > 64 || grid.y > 65535 || grid.z > 65535 || grid.x > 0x7fffffffu) {
    throw std::runtime_error("CUDA emulator: invalid launch configuration: grid " + dim_str(grid) + ", block " +
                             dim_str(block) + " (at most 1024 threads per block, grid.y/z <= 65535)");
  }
  if (dynamic_smem_bytes > kMaxDefaultDynamicSmem) {
    throw std::runtime_error("CUDA emulator: " + std::to_string(dynamic_smem_bytes) +
                             " bytes of dynamic shared memory exceed the 48 KiB a launch gets without "
                             "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  }
  if (t_launch) throw std::runtime_error("CUDA emulator: a kernel launched another kernel (not supported)");
  std::lock_guard guard(g_launch_mutex);
  Launch launch(grid, block, dynamic_smem_bytes, body);
  launch.run();
}

bool set_schedule(const std::string& name) {
  if (name == "alternate") g_schedule = Schedule::kAlternate;
  else if (name == "forward") g_schedule = Schedule::kForward;
  else if (name == "reverse") g_schedule = Schedule::kReverse;
  else if (name == "concurrent") g_schedule = Schedule::kConcurrent;
  else return false;
  return true;
}

std::string schedule() {
  switch (g_schedule.load()) {
    case Schedule::kForward: return "forward";
    case Schedule::kReverse: return "reverse";
    case Schedule::kConcurrent: return "concurrent";
    default: return "alternate";
  }
}

void block_barrier(const Site& site) { current().block_barrier(site); }

void warp_barrier(unsigned mask, const Site& site) { current().warp_exchange(mask, nullptr, 0, "__syncwarp", site); }

const unsigned char* warp_exchange(unsigned mask, const void* in, size_t bytes, const char* what, const Site& site) {
  return current().warp_exchange(mask, in, bytes, what, site);
}

void fail(const char* what, const Site& site, const char* message) { current().fail(what, site, message); }

bool register_shared(void* ptr, size_t bytes) {
  SharedRegistry& registry = shared_registry();
  std::lock_guard guard(registry.mutex);
  registry.ranges.emplace_back(static_cast<unsigned char*>(ptr), bytes);
  std::memset(ptr, kPoison, bytes);  // this block started before the variable was known
  return true;
}

int lane_id() { return t_thread->tid % 32; }

bool in_shared_memory(const void* ptr, size_t bytes) { return current().in_shared(ptr, bytes); }

void* dynamic_shared_memory() { return current().dynamic_buffer(); }

void async_copy(void* dst, const void* src, int src_bytes, int total_bytes, const Site& site) {
  if (src_bytes < 0 || src_bytes > total_bytes) fail("cp.async", site, "src-size must be in [0, cp-size]");
  if (!in_shared_memory(dst, total_bytes)) fail("cp.async", site, "the destination is not inside shared memory");
  if (reinterpret_cast<uintptr_t>(dst) % total_bytes != 0 ||
      (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % total_bytes != 0)) {
    fail("cp.async", site, "source and destination must be aligned to the copy size");
  }
  t_thread->uncommitted.push_back({dst, src, src_bytes, total_bytes});
}

void async_commit() {
  ThreadState& me = *t_thread;
  me.committed.push_back(std::move(me.uncommitted));
  me.uncommitted.clear();
}

namespace {
std::atomic<uint64_t> g_async_copy_source_bytes{0};
}  // namespace

uint64_t async_copy_source_bytes() { return g_async_copy_source_bytes.load(); }

void async_wait(int pending_groups_allowed) {
  ThreadState& me = *t_thread;
  while (static_cast<int>(me.committed.size()) > pending_groups_allowed) {
    for (const AsyncCopy& c : me.committed.front()) {
      auto* dst = static_cast<unsigned char*>(c.dst);
      if (c.src_bytes > 0) std::memcpy(dst, c.src, c.src_bytes);
      g_async_copy_source_bytes.fetch_add(static_cast<uint64_t>(c.src_bytes), std::memory_order_relaxed);
      std::memset(dst + c.src_bytes, 0, c.total_bytes - c.src_bytes);  // zero-fill past src-size
    }
    me.committed.pop_front();
  }
}

}  // namespace xverse::emu
