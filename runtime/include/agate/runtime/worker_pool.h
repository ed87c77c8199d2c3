// WorkerPool: a fixed set of threads for blocking or CPU-bound work, answered on an event loop.
//
//   WorkerPool pool(4);
//   Result<int> r = co_await pool.run(loop, [] { return crunch(); });   // pooled job record
//   WorkerJob<int> job;                                                  // caller's job record
//   Result<int> s = co_await pool.run(loop, job, [] { return crunch(); });
//
// `run(loop, fn)` queues `fn` for a worker thread and returns a Promise<R> of `loop` (called on
// the loop's thread); the result is delivered back on the loop's thread through
// EventLoop::postFromAnyThread. `fn` returns R or Result<R> (an error it returns is the
// promise's). It runs on a worker: it must not touch the loop or its promises.
//
// Job records: a job lives in a node that the queue links intrusively (Boost.Intrusive).
//  * `WorkerJob<R, FN_CAPACITY>`: the caller provides the node (a member, a stack object, an
//    array slot); the callable is moved into an inline buffer of FN_CAPACITY bytes (checked at
//    compile time). Submitting it allocates nothing. It is reusable once its promise completed
//    (or was dropped and the worker let go: see busy()). Destroying a busy node waits for the
//    worker to finish with it (bounded by the job's running time); destroying one whose promise
//    is still alive is a bug (checked).
//  * `run(loop, fn)`: the node comes from the pool's free list of fixed-size blocks
//    (POOLED_BLOCK_SIZE bytes). A block is allocated with operator new only when the list is
//    empty (warm-up) or the node is bigger than a block; it returns to the list when released.
//
// Cancellation (dropping the promise, on the loop thread):
//  * job still queued: it is unlinked from the queue, under the pool's lock, and never runs.
//  * job running: the worker finishes it, then discards the result on its own thread and never
//    touches the loop. The node is released by the worker (pooled) or becomes idle (WorkerJob).
//  * result already posted to the loop: the loop's delivery discards it.
//
// Shutdown: `shutdown()` (also run by the destructor) is deterministic: queued jobs are
// CANCELLED — never run — and their promises complete with Errc::CANCELLED on their loops;
// running jobs finish and deliver normally; then every worker is joined. Later run() calls
// return a promise already completed with CANCELLED. Call it from any thread but a worker.
//
// Lifetimes:
//  * pool vs. promises: the pool's bookkeeping (lock, queue, free list) is reference-counted by
//    every job attached to it, so the WorkerPool object may be destroyed while promises it
//    returned are still alive (they complete with CANCELLED or their finished result).
//  * loop vs. jobs: a worker posts a result only while the job's promise is alive, and it posts
//    under the pool's lock, which dropping a promise also takes. Promises must not outlive their
//    loop (event_loop.h), so a loop destroyed after its promises were dropped is never touched by
//    a worker. A result posted to a loop that is then destroyed before it runs the delivery is
//    lost with the loop, and a WorkerJob caught that way stays busy (do not destroy a loop with
//    worker results in flight if the nodes must be reused).
//
// Threading: a mutex + condition variable queue. That is the right tool for blocking work
// (jobs take microseconds or more; idle workers sleep in the kernel, never spin); it is not
// meant for nanosecond-scale tasks. The lock is held for queue operations and for the
// postFromAnyThread of a result (which may write() the loop's eventfd).
#pragma once

#include <boost/intrusive/list.hpp>
#include <condition_variable>
#include <cstddef>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "agate/runtime/event_loop.h"
#include "agate/runtime/promise.h"
#include "agate/runtime/result.h"
#include "agate/runtime/task.h"

namespace agate {

class WorkerPool;
template <class R, size_t FN_CAPACITY = 64>
class WorkerJob;

namespace detail {

template <class T>
struct UnwrapResult {
  using type = T;
};
template <class T>
struct UnwrapResult<Result<T>> {
  using type = T;
};

// What run() promises for a callable `F`: R for `R f()` and for `Result<R> f()`.
template <class F>
struct WorkerResultOf {
  using type = typename UnwrapResult<std::invoke_result_t<F&>>::type;
};

using WorkerJobHook =
    boost::intrusive::list_member_hook<boost::intrusive::link_mode<boost::intrusive::safe_link>>;

class WorkerPoolCore;

// The part of a job the pool sees. All fields but the result slot are guarded by the core's
// mutex once the job is submitted.
class WorkerJobBase {
 public:
  enum class Phase : uint8_t {
    IDLE,     // not attached to a pool
    QUEUED,   // on the pool's queue
    RUNNING,  // a worker runs it
    POSTED,   // its result was posted to the loop, delivery pending
    DONE,     // the result is in the promise; the consumer still holds it
  };

  WorkerJobHook hook;

 protected:
  WorkerJobBase() noexcept : delivery_(*this) {}
  virtual ~WorkerJobBase() = default;

  // Worker thread, outside the lock: runs the callable and stores its result.
  virtual void execute() noexcept = 0;
  // Stores CANCELLED as the result (shutdown), under the lock.
  virtual void cancelResult() noexcept = 0;
  // Loop thread: moves the stored result into the promise and wakes its waiter.
  virtual void complete() noexcept = 0;
  // Destroys the stored result (worker thread, consumer gone).
  virtual void discardResult() noexcept = 0;
  // The job is detached from everything: a pooled node frees itself, a WorkerJob turns idle.
  // Called under the lock (core kept alive by the caller).
  virtual void release() noexcept = 0;

  // Loop thread: the job's promise was dropped.
  void consumerLeft() noexcept;

  friend class WorkerPoolCore;
  friend class agate::WorkerPool;
  template <class R, size_t N>
  friend class agate::WorkerJob;

  class Delivery final : public Task {
   public:
    explicit Delivery(WorkerJobBase& job) noexcept : job_(job) {}

   private:
    void run() noexcept override;
    WorkerJobBase& job_;
  };

  // Set by submission. A pooled node drops it when it frees itself; a WorkerJob keeps it (so
  // busy() can take the lock) until it is destroyed or submitted to another pool.
  std::shared_ptr<WorkerPoolCore> core_;
  EventLoop* loop_ = nullptr;
  Phase phase_ = Phase::IDLE;
  bool consumerGone_ = false;
  Delivery delivery_;
};

// A job's promise node: WorkerJobBase plus the Result<R> in flight.
template <class R>
class WorkerJobNode : public PromiseNode<R>, public WorkerJobBase {
 protected:
  WorkerJobNode() noexcept = default;
  ~WorkerJobNode() override = default;

  virtual Result<R> invoke() noexcept = 0;

  // A reused WorkerJob starts again as a pending promise node.
  void rearm() noexcept {
    this->ready_ = false;
    this->result_.reset();
    pending_.reset();
  }

 private:
  void execute() noexcept final { pending_.emplace(invoke()); }
  void cancelResult() noexcept final {
    pending_.emplace(Error(Errc::CANCELLED, "worker pool shut down before the job ran"));
  }
  void discardResult() noexcept final { pending_.reset(); }
  void complete() noexcept final {
    this->setResult(std::move(*pending_));
    pending_.reset();
    this->wakeWaiter();
  }
  void onConsumerDropped() noexcept final { consumerLeft(); }

  friend class agate::WorkerPool;

  // Written by the worker (or shutdown) before the delivery is posted; read by the loop after.
  std::optional<Result<R>> pending_;
};

// Calls `f` and turns its return into Result<R>.
template <class R, class F>
Result<R> invokeForResult(F& f) noexcept {
  if constexpr (std::is_void_v<std::invoke_result_t<F&>>) {
    f();
    return Result<R>();
  } else {
    return Result<R>(f());
  }
}

// A pooled job record holding the callable by value.
template <class R, class F>
class PooledWorkerJob final : public WorkerJobNode<R> {
 public:
  PooledWorkerJob(F&& f, bool fromBlock) noexcept : fn_(std::move(f)), fromBlock_(fromBlock) {}

 private:
  Result<R> invoke() noexcept override { return invokeForResult<R>(fn_); }
  void release() noexcept override;

  F fn_;
  bool fromBlock_;
};

}  // namespace detail

// A caller-provided job record (see the overview). Not copyable or movable: the queue and the
// promise point at it.
template <class R, size_t FN_CAPACITY>
class WorkerJob final : public detail::WorkerJobNode<R> {
 public:
  WorkerJob() noexcept = default;
  WorkerJob(const WorkerJob&) = delete;
  WorkerJob& operator=(const WorkerJob&) = delete;
  // Waits until no worker uses the node. Required: its promise was dropped or completed.
  ~WorkerJob() override;

  // True from run() until the node may be reused: its promise completed and was dropped, or it
  // was dropped and the worker let go. Loop thread.
  bool busy() const noexcept;

 private:
  friend class WorkerPool;

  template <class F>
  void store(F&& f) noexcept {
    using Fn = std::decay_t<F>;
    static_assert(sizeof(Fn) <= FN_CAPACITY, "callable larger than the WorkerJob's FN_CAPACITY");
    static_assert(alignof(Fn) <= alignof(std::max_align_t), "over-aligned callable");
    static_assert(std::is_nothrow_move_constructible_v<Fn>, "callable must move without throwing");
    new (fn_) Fn(std::forward<F>(f));
    invoke_ = [](void* p) noexcept { return detail::invokeForResult<R>(*static_cast<Fn*>(p)); };
    destroy_ = [](void* p) noexcept { static_cast<Fn*>(p)->~Fn(); };
  }
  Result<R> invoke() noexcept override { return invoke_(fn_); }
  void release() noexcept override {
    if (destroy_ != nullptr) destroy_(fn_);
    destroy_ = nullptr;
    invoke_ = nullptr;
  }

  alignas(std::max_align_t) std::byte fn_[FN_CAPACITY];
  Result<R> (*invoke_)(void*) noexcept = nullptr;
  void (*destroy_)(void*) noexcept = nullptr;
};

namespace detail {

// The pool's shared bookkeeping. Outlives the WorkerPool while jobs are attached.
class WorkerPoolCore {
 public:
  static constexpr size_t POOLED_BLOCK_SIZE = 256;

  ~WorkerPoolCore();

  // Queues `job` (loop thread). False after shutdown (nothing changed).
  bool trySubmit(const std::shared_ptr<WorkerPoolCore>& self, WorkerJobBase& job,
                 EventLoop& loop) noexcept;
  void workerMain() noexcept;
  void stop() noexcept;

  void* takeBlock();
  void giveBlock(void* block) noexcept;  // under mutex_

  std::mutex mutex_;
  std::condition_variable work_;  // signalled when a job is queued or the pool stops
  std::condition_variable idle_;  // signalled when a running job whose consumer left finishes
  boost::intrusive::list<WorkerJobBase, boost::intrusive::member_hook<WorkerJobBase, WorkerJobHook,
                                                                      &WorkerJobBase::hook>>
      queue_;
  std::vector<void*> freeBlocks_;
  bool stopping_ = false;
};

}  // namespace detail

class WorkerPool {
 public:
  static constexpr size_t POOLED_BLOCK_SIZE = detail::WorkerPoolCore::POOLED_BLOCK_SIZE;

  // Starts `threads` workers (at least one). Aborts if a thread cannot be started.
  explicit WorkerPool(size_t threads);
  // shutdown(): cancels queued jobs, finishes running ones, joins the workers.
  ~WorkerPool();
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  size_t threadCount() const noexcept { return threads_.size(); }

  // Runs `fn` on a worker with a pooled job record. Loop thread of `loop` (its current loop).
  template <class F>
  [[nodiscard]] Promise<typename detail::WorkerResultOf<std::decay_t<F>>::type> run(EventLoop& loop,
                                                                                    F&& fn);

  // Runs `fn` on a worker with the caller's job record, which must be idle (!busy()).
  template <class R, size_t N, class F>
  [[nodiscard]] Promise<R> run(EventLoop& loop, WorkerJob<R, N>& job, F&& fn);

  // See the overview. Idempotent; any thread but a worker.
  void shutdown() noexcept;

 private:
  template <class R>
  Promise<R> submit(EventLoop& loop, detail::WorkerJobNode<R>& node);

  std::shared_ptr<detail::WorkerPoolCore> core_;
  std::vector<std::thread> threads_;
};

// --- implementation ------------------------------------------------------------------------------

namespace detail {

template <class R, class F>
void PooledWorkerJob<R, F>::release() noexcept {
  const bool fromBlock = fromBlock_;
  WorkerPoolCore& core = *this->core_;
  this->~PooledWorkerJob();
  if (fromBlock) {
    core.giveBlock(this);
  } else {
    ::operator delete(this);
  }
}

}  // namespace detail

template <class R, size_t N>
WorkerJob<R, N>::~WorkerJob() {
  std::shared_ptr<detail::WorkerPoolCore> core;
  {
    // No promise refers to an IDLE node or to one whose consumer left; anything else is a bug.
    if (this->core_ != nullptr) {
      core = this->core_;
      std::unique_lock lock(core->mutex_);
      AGATE_REQUIRE(this->phase_ == detail::WorkerJobBase::Phase::IDLE || this->consumerGone_,
                    "a WorkerJob destroyed while its promise is alive");
      core->idle_.wait(lock, [&] { return this->phase_ != detail::WorkerJobBase::Phase::RUNNING; });
      AGATE_REQUIRE(this->phase_ == detail::WorkerJobBase::Phase::IDLE,
                    "a WorkerJob destroyed with its result still in flight to its loop");
    }
  }
  release();
}

template <class R, size_t N>
bool WorkerJob<R, N>::busy() const noexcept {
  std::shared_ptr<detail::WorkerPoolCore> core = this->core_;
  if (core == nullptr) return false;
  std::lock_guard lock(core->mutex_);
  return this->phase_ != detail::WorkerJobBase::Phase::IDLE;
}

template <class F>
Promise<typename detail::WorkerResultOf<std::decay_t<F>>::type> WorkerPool::run(EventLoop& loop,
                                                                                F&& fn) {
  using Fn = std::decay_t<F>;
  using R = typename detail::WorkerResultOf<Fn>::type;
  using Node = detail::PooledWorkerJob<R, Fn>;
  const bool fits =
      sizeof(Node) <= POOLED_BLOCK_SIZE && alignof(Node) <= __STDCPP_DEFAULT_NEW_ALIGNMENT__;
  void* memory = fits ? core_->takeBlock() : ::operator new(sizeof(Node));
  auto* node = new (memory) Node(Fn(std::forward<F>(fn)), fits);
  return submit<R>(loop, *node);
}

template <class R, size_t N, class F>
Promise<R> WorkerPool::run(EventLoop& loop, WorkerJob<R, N>& job, F&& fn) {
  static_assert(std::is_same_v<typename detail::WorkerResultOf<std::decay_t<F>>::type, R>,
                "the callable's result does not match the WorkerJob's");
  AGATE_REQUIRE(!job.busy(), "WorkerPool::run() with a busy WorkerJob");
  job.release();  // the previous callable, if any
  job.store(std::forward<F>(fn));
  return submit<R>(loop, job);
}

template <class R>
Promise<R> WorkerPool::submit(EventLoop& loop, detail::WorkerJobNode<R>& node) {
  AGATE_REQUIRE(EventLoop::current() == &loop, "WorkerPool::run() off its loop's thread");
  node.rearm();
  Promise<R> promise(&node);
  if (!core_->trySubmit(core_, node, loop)) {
    // Shut down: complete at once, on this (the loop's) thread.
    node.cancelResult();
    node.complete();
    std::lock_guard lock(core_->mutex_);
    node.phase_ = detail::WorkerJobBase::Phase::DONE;
    node.core_ = core_;
  }
  return promise;
}

}  // namespace agate
