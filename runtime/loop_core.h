// Private to the runtime: the inside of an EventLoop and the interface of its I/O backends.
#pragma once

#include <atomic>
#include <boost/intrusive/list.hpp>
#include <boost/intrusive/set.hpp>
#include <memory>
#include <optional>

#include "agate/runtime/event_loop.h"

namespace agate::detail {

// A timer: a promise node in the loop's timer tree, keyed by deadline.
class TimerNode final : public PromiseNode<void> {
 public:
  static void* operator new(size_t size) { return FrameArena::allocateFromCurrent(size); }
  static void operator delete(void* p, size_t size) noexcept {
    FrameArena::deallocateToCurrent(p, size);
  }
  explicit TimerNode(TimePoint when) noexcept : when_(when) {}

  void fire() noexcept {
    hook_.unlink();
    setResult(Status{});
    wakeWaiter();
  }
  TimePoint when() const noexcept { return when_; }

  using Hook =
      boost::intrusive::set_member_hook<boost::intrusive::link_mode<boost::intrusive::auto_unlink>>;
  Hook hook_;

 private:
  void onConsumerDropped() noexcept override { delete this; }  // the hook unlinks: never fires
  TimePoint when_;
};

struct TimerOrder {
  bool operator()(const TimerNode& a, const TimerNode& b) const noexcept {
    return a.when() < b.when();
  }
};
using TimerTree = boost::intrusive::multiset<
    TimerNode, boost::intrusive::member_hook<TimerNode, TimerNode::Hook, &TimerNode::hook_>,
    boost::intrusive::compare<TimerOrder>, boost::intrusive::constant_time_size<false>>;

// A kernel operation: the parameters a backend needs, and its in-flight state. Always allocated
// from the loop's arena by the loop; freed by the loop once both the kernel and the consumer are
// done with it.
class IoOp {
 public:
  enum class Kind : uint8_t { OP_READ, OP_WRITE, OP_POLL, OP_FUTEX_WAIT };

  Kind kind = Kind::OP_READ;
  int fd = -1;
  void* buf = nullptr;
  uint32_t len = 0;
  int64_t offset = 0;
  uint32_t events = 0;                          // POLL
  const std::atomic<uint32_t>* word = nullptr;  // FUTEX_WAIT
  uint32_t expected = 0;                        // FUTEX_WAIT
  bool shared = false;                          // FUTEX_WAIT
  bool inFlight = false;                        // the backend (kernel) still references this op
  bool consumerGone = false;                    // the promise was dropped while in flight
  bool completedEarly = false;  // FUTEX_WAIT resolved by the loop's backstop re-check

  using Hook = boost::intrusive::list_member_hook<
      boost::intrusive::link_mode<boost::intrusive::auto_unlink>>;
  Hook hook;  // in the loop's list of live ops (or of polled futex waits)
  using List = boost::intrusive::list<IoOp, boost::intrusive::member_hook<IoOp, Hook, &IoOp::hook>,
                                      boost::intrusive::constant_time_size<false>>;

  // Delivers the kernel's result (>= 0, or -errno) to the promise.
  virtual void complete(int32_t res) noexcept = 0;
  virtual void destroy() noexcept = 0;

 protected:
  IoOp() = default;
  virtual ~IoOp() = default;
};

// What the loop needs from a backend. Every method runs on the loop's thread except wake().
class IoBackend {
 public:
  virtual ~IoBackend() = default;
  virtual Backend kind() const noexcept = 0;
  virtual bool hasNativeFutexWait() const noexcept = 0;
  // Starts `op` (op.inFlight is set by the backend while it references op). May complete it at
  // once through LoopCore::finish.
  virtual void start(IoOp& op) noexcept = 0;
  // The consumer dropped `op` while in flight. READ/WRITE: returns only once the kernel no longer
  // touches op.buf. The op is finished later (LoopCore::finish frees it).
  virtual void cancel(IoOp& op) noexcept = 0;
  // Submits pending work and waits for completions up to `timeout` (nullopt: no limit; zero: do
  // not block), dispatching each to LoopCore::finish. One system call in the common case.
  virtual void wait(std::optional<Duration> timeout) noexcept = 0;
  // Any thread: interrupts a wait in progress (or makes the next one return at once).
  virtual void wake() noexcept = 0;
};

// io_uring backend; Errc::UNSUPPORTED / SYSTEM_ERROR when the ring cannot be set up.
Result<std::unique_ptr<IoBackend>> tryCreateUringBackend(LoopCore& core,
                                                         const LoopOptions& options);
Result<std::unique_ptr<IoBackend>> tryCreateEpollBackend(LoopCore& core);

class LoopCore {
 public:
  explicit LoopCore(const LoopOptions& options) noexcept;
  ~LoopCore();

  static LoopCore& of(EventLoop& loop) noexcept { return *loop.core_; }
  Status init(const LoopOptions& options);
  void post(Task& task) noexcept { runQueue_.push_back(task); }
  void postBeforeWait(Task& task) noexcept { flushQueue_.push_back(task); }
  // Runs every task postBeforeWait() queued (and any they queue) now.
  void runFlushes() noexcept;
  bool inTurn() const noexcept { return inTurn_; }
  void postFromAnyThread(Task& task) noexcept;
  // One turn of the loop (see event_loop.h). Never blocks when `mayBlock` is false, Tasks are
  // queued, or `awaited` is ready.
  void turn(const PromiseNodeBase* awaited, bool mayBlock = true);
  bool idle() const noexcept {
    return runQueue_.empty() && !remoteHead_.load(std::memory_order_acquire);
  }
  // See EventLoop::busyPollShouldYield. Loop thread only.
  bool busyPollShouldYield() const noexcept {
    return !inTurn_ || !idle() || (awaited_ != nullptr && awaited_->isReady());
  }
  bool consumeTransferBudget() noexcept { return ++transfers_ <= MAX_SYMMETRIC_TRANSFERS; }

  void addTimer(TimerNode& t) noexcept { timers_.insert(t); }
  void startIo(IoOp& op) noexcept;
  void dropIo(IoOp& op) noexcept;
  // Called by a backend when it no longer references `op`; `res` is the kernel result.
  void finish(IoOp& op, int32_t res) noexcept;

  IoBackend& backend() noexcept { return *backend_; }
  void shutdown() noexcept;

  DetachedFrame::List detached_;

 private:
  static constexpr uint32_t MAX_SYMMETRIC_TRANSFERS = 32;
  static constexpr uint32_t MAX_TASKS_PER_TURN = 1024;

  void drainRemote() noexcept;
  void runTasks() noexcept;
  void fireTimers(TimePoint now) noexcept;
  void pollFutexes() noexcept;
  void recheckNativeFutexes(TimePoint now) noexcept;

  Duration futexPollInterval_;
  Duration futexBackstop_;
  Task::RunQueue runQueue_;
  Task::RunQueue flushQueue_;  // postBeforeWait(): run after each turn's tasks, before any wait
  TimerTree timers_;
  IoOp::List polledFutexes_;  // waits the backend cannot do natively: re-read every turn
  IoOp::List liveOps_;        // every other op the loop allocated and not yet freed
  uint32_t transfers_ = 0;
  const PromiseNodeBase* awaited_ = nullptr;  // what the current turn's run() waits for, or null
  bool inTurn_ = false;  // run()/runUntilIdle() must not be called from a Task or coroutine
  uint32_t nativeFutexWaits_ = 0;  // FUTEX_WAIT ops in the kernel (not completed early)
  TimePoint nextFutexRecheck_{};
  std::unique_ptr<IoBackend> backend_;

  // Cross-thread inbox: a lock-free LIFO stack that the loop empties all at once (so no ABA) and
  // reverses into FIFO order.
  alignas(64) std::atomic<Task*> remoteHead_{nullptr};
  // Set (seq_cst) by the loop just before it blocks, then re-checks remoteHead_; a poster pushes
  // (seq_cst) then exchanges this to false and writes the wake fd only if it was true. Dekker's
  // pattern: at least one side sees the other, so a post is never left sleeping.
  alignas(64) std::atomic<bool> sleeping_{false};
};

}  // namespace agate::detail
