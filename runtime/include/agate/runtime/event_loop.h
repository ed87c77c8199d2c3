// EventLoop: one per thread; runs Tasks and coroutines and owns the thread's I/O backend.
//
//   EventLoop loop;                                   // io_uring, or epoll where it is disabled
//   Promise<int> answer() { co_await EventLoop::current()->sleep(1ms); co_return 42; }
//   Result<int> r = loop.run(answer());
//
// The loop is the thread's "current loop" from construction to destruction: a thread_local
// pointer, the one piece of process-wide mutable state Agate accepts. It exists so that
// coroutine frames (which cannot be handed an allocator) draw from the loop's FrameArena, and
// so that promise nodes can post to the loop they run on. Everything else takes the loop
// explicitly. One loop per thread; a loop is used only on the thread that created it, except
// postFromAnyThread().
//
// One turn of the loop: move cross-thread posts into the run queue, run queued Tasks (bounded, so
// I/O is never starved), fire due timers, then submit every queued kernel operation and wait for
// completions in ONE system call (io_uring_submit_and_wait_timeout / epoll_pwait), with a timeout
// when timers are pending, without one when idle, and without blocking when Tasks are queued.
//
// Backends (LoopOptions::backend):
//  * URING: one io_uring per loop (liburing). Optional SQPOLL (off by default: the kernel thread
//    burns a CPU while idle).
//  * EPOLL: epoll + eventfd. Chosen by AUTO, with one line on stderr, where io_uring cannot be set
//    up (kernel.io_uring_disabled, seccomp: EPERM / ENOSYS).
//
// I/O cancellation (dropping the promise of an operation in flight):
//  * read / write use the caller's buffer. Dropping their promise cancels the operation
//    SYNCHRONOUSLY (io_uring's synchronous cancel): when the Promise's destructor returns the
//    kernel no longer touches the buffer, so the caller may free it at once. On epoll, reads and
//    writes run inside the call or when the fd becomes ready, so nothing is in flight.
//  * poll, futex wait: cancelled asynchronously; the loop keeps the operation's node until the
//    kernel reports it, then frees it. They hold no caller memory.
//  * sleep: the timer is removed from the loop's timer tree at once; it never fires.
//
// Futex waits (waitFutex): resolve when the word was woken or no longer equals `expected`
// (at once if it differs already). As with any futex, a waiter re-checks its condition.
//  * URING with IORING_OP_FUTEX_WAIT (probed at start, kernel >= 6.7): a real kernel wait. The
//    loop pins the process to the global futex hash while it has no private one (Linux 6.16+
//    would otherwise strand io_uring waits queued before the first thread is created), and
//    re-reads the words every LoopOptions::futexBackstopInterval as a backstop.
//  * otherwise (EPOLL, or an older kernel): the loop re-reads the word every
//    LoopOptions::futexPollInterval (1 ms by default) while such waits exist, and sleeps with at
//    most that timeout. A wake costs up to one interval of latency; no thread spins.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

#include "agate/runtime/frame_arena.h"
#include "agate/runtime/promise.h"
#include "agate/runtime/result.h"
#include "agate/runtime/task.h"

namespace agate {

using Duration = std::chrono::nanoseconds;
using TimePoint = std::chrono::steady_clock::time_point;

enum class Backend : uint8_t { AUTO, URING, EPOLL };
const char* backendName(Backend b) noexcept;

struct LoopOptions {
  Backend backend = Backend::AUTO;
  uint32_t ringEntries = 256;  // io_uring submission queue size
  bool sqpoll = false;         // io_uring SQPOLL kernel thread
  uint32_t sqThreadIdleMs = 10;
  Duration futexPollInterval = std::chrono::milliseconds(1);  // polled futex fallback period
  // Native futex waits: the loop re-reads their words this often anyway (a backstop against a
  // wake the kernel loses, see uring_backend.cpp).
  Duration futexBackstopInterval = std::chrono::milliseconds(100);
  // Tests only: behave as if io_uring_queue_init failed with this errno (0: don't).
  int simulateUringInitErrno = 0;
};

template <class T>
class CrossThreadFulfiller;
template <class T>
struct PromiseAndCrossThreadFulfiller;

namespace detail {
class LoopCore;
class DetachedFrame;
struct DetachedCoroutine;
}  // namespace detail

class EventLoop {
 public:
  // Makes this loop current on the calling thread (which must have none). Aborts with a clear
  // message if no backend can be set up (see tryCreate for the checked form).
  explicit EventLoop(LoopOptions options = {});
  // The checked constructor: Errc::UNSUPPORTED when the forced backend is unavailable,
  // Errc::SYSTEM_ERROR when a descriptor cannot be created.
  static Result<std::unique_ptr<EventLoop>> tryCreate(LoopOptions options = {});
  // Destroys every spawned promise (cancelling its work), then the backend. Promises of this
  // loop's operations must not outlive it (precondition, checked).
  ~EventLoop();
  EventLoop(const EventLoop&) = delete;
  EventLoop& operator=(const EventLoop&) = delete;

  // The calling thread's loop, or null.
  static EventLoop* current() noexcept;

  Backend backend() const noexcept;
  bool hasNativeFutexWait() const noexcept;
  FrameArena& arena() noexcept { return arena_; }

  // --- Tasks -----------------------------------------------------------------------------------
  // Queues `task` to run on this loop (loop thread only). FIFO with other posts.
  void post(Task& task) noexcept;
  // Thread-safe and lock-free: queues `task` and wakes the loop if it sleeps (a plain write() to
  // an eventfd, only when the loop announced it is about to sleep). `task` must stay alive and
  // unposted elsewhere until it has run.
  void postFromAnyThread(Task& task) noexcept;
  // Queues `task` to run before this loop's thread can wait for anything: after the tasks of
  // the current turn (all of them, or those before run()'s promise turned ready), before the
  // turn waits for I/O and before run() returns. Loop thread only; once per post. For work that
  // batches what a turn's tasks did and must happen before anyone waits for its effect, such as
  // one doorbell ring for every message a turn sent (Sender::commitWithoutRing).
  void postBeforeWait(Task& task) noexcept;
  // True while this loop runs a turn (inside run() or runUntilIdle(), on its thread): code that
  // postBeforeWait()s from outside a turn should do its work at once instead.
  bool inTurn() const noexcept;

  // Whether a coroutine busy-polling on this loop's thread must yield now rather than spin on:
  // it runs outside a turn (started eagerly: its caller waits to get control back), Tasks are
  // queued (posted here or from another thread), or the promise run() waits for is ready. Such
  // a coroutine spins only while this is false, so it never starves other work nor holds back
  // run() or its own starter.
  bool busyPollShouldYield() const noexcept;

  // Runs the loop until `promise` completes; returns its result as soon as it is ready (Tasks
  // still queued then run at the next turn). Not re-entrant.
  template <class T>
  Result<T> run(Promise<T> promise) {
    AGATE_REQUIRE(promise.isValid(), "run() of a moved-from promise");
    if (promise.isReady()) runBeforeWaitTasks();  // no turn runs them: the thread leaves now
    while (!promise.isReady()) turn(promise.node());
    return promise.takeResult();
  }
  // Runs without blocking until no Task is queued and no completion is pending.
  void runUntilIdle();
  // Detaches `promise`: the loop keeps it until it completes (an error other than CANCELLED is
  // reported on stderr) or until the loop is destroyed, which cancels it.
  template <class T>
  void spawn(Promise<T> promise);

  // A promise of this loop, and a fulfiller that any thread may complete (a worker pool, a
  // ring's reader thread). See CrossThreadFulfiller.
  template <class T>
  PromiseAndCrossThreadFulfiller<T> newCrossThreadPromise();

  // --- Timers ----------------------------------------------------------------------------------
  Promise<void> sleep(Duration d);
  Promise<void> sleepUntil(TimePoint when);
  // `promise`, or Errc::TIMED_OUT (and `promise` dropped, hence cancelled) after `d`.
  template <class T>
  Promise<T> deadline(Promise<T> promise, Duration d);

  // An awaitable that reschedules the calling coroutine behind everything queued now.
  class YieldAwaiter;
  YieldAwaiter yield() noexcept;

  // --- I/O -------------------------------------------------------------------------------------
  static constexpr int64_t CURRENT_POSITION = -1;
  // Reads up to buf.size() bytes at `offset` (CURRENT_POSITION: the fd's position). Resolves to
  // the byte count (0 at end of file). `buf` must stay valid until the promise completes or is
  // dropped; dropping it cancels synchronously (see the overview).
  Promise<size_t> read(int fd, std::span<std::byte> buf, int64_t offset = CURRENT_POSITION);
  Promise<size_t> write(int fd, std::span<const std::byte> buf, int64_t offset = CURRENT_POSITION);
  // Resolves to the ready events (POLLIN, ...) once `fd` has one of `events`.
  Promise<uint32_t> waitReady(int fd, uint32_t events);
  // Resolves when `word` was woken or differs from `expected` (see the overview). `shared`: the
  // word may be woken from another process (a MAP_SHARED mapping).
  Promise<void> waitFutex(const std::atomic<uint32_t>& word, uint32_t expected, bool shared);

  // Internal, for spawn(): keeps a detached frame for destruction at shutdown; reports an error
  // a detached promise ended with.
  void linkDetached(detail::DetachedFrame& frame) noexcept;
  static void reportDetachedError(const Error& e) noexcept;

 private:
  friend class detail::LoopCore;
  EventLoop(LoopOptions options, Status* status);
  // One turn; blocks for completions only if no Task is queued and `awaited` (if any) is not
  // ready yet.
  void turn(const detail::PromiseNodeBase* awaited);
  void runBeforeWaitTasks() noexcept;
  template <class T>
  static Promise<T> deadlineImpl(Promise<T> promise, Promise<void> timer);

  FrameArena arena_;
  std::unique_ptr<detail::LoopCore> core_;
};

// Wakes up to `count` waiters of `word` (a plain futex system call; callable from any thread or
// process). Returns the number woken.
Result<uint32_t> futexWake(const std::atomic<uint32_t>& word, uint32_t count, bool shared);

// --- templates and small classes ----------------------------------------------------------------

class EventLoop::YieldAwaiter final : public Task {
 public:
  explicit YieldAwaiter(EventLoop& loop) noexcept : loop_(loop) {}
  bool await_ready() const noexcept { return false; }
  void await_suspend(std::coroutine_handle<> h) noexcept {
    waiter_ = h;
    loop_.post(*this);
  }
  void await_resume() const noexcept {}

 private:
  void run() noexcept override { waiter_.resume(); }
  EventLoop& loop_;
  std::coroutine_handle<> waiter_;
};

inline EventLoop::YieldAwaiter EventLoop::yield() noexcept { return YieldAwaiter(*this); }

namespace detail {

// The frame of a detached (spawned) coroutine: starts eagerly, frees itself when it finishes, and
// is linked into its loop so the loop can destroy (cancel) it at shutdown.
class DetachedFrame {
 public:
  using Hook = boost::intrusive::list_member_hook<
      boost::intrusive::link_mode<boost::intrusive::auto_unlink>>;
  Hook hook;
  using List = boost::intrusive::list<
      DetachedFrame, boost::intrusive::member_hook<DetachedFrame, Hook, &DetachedFrame::hook>,
      boost::intrusive::constant_time_size<false>>;
  std::coroutine_handle<> handle;
};

// The return type of a detached coroutine.
struct DetachedCoroutine {
  struct promise_type;
};

struct DetachedCoroutine::promise_type {
  DetachedFrame frame;
  template <class... Args>
  explicit promise_type(EventLoop& loop, Args&...) noexcept {
    frame.handle = std::coroutine_handle<promise_type>::from_promise(*this);
    loop.linkDetached(frame);
  }
  static void* operator new(size_t size) { return FrameArena::allocateFromCurrent(size); }
  static void operator delete(void* p, size_t size) noexcept {
    FrameArena::deallocateToCurrent(p, size);
  }
  DetachedCoroutine get_return_object() noexcept { return {}; }
  std::suspend_never initial_suspend() noexcept { return {}; }
  std::suspend_never final_suspend() noexcept { return {}; }  // the frame frees itself
  void return_void() noexcept {}
  void unhandled_exception() noexcept { std::terminate(); }
};

template <class T>
DetachedCoroutine runDetached(EventLoop& loop, Promise<T> promise) {
  Result<T> r = co_await promise;
  if (!r.ok() && r.code() != Errc::CANCELLED) EventLoop::reportDetachedError(r.error());
  (void)loop;
}

}  // namespace detail

namespace detail {

// The node of a cross-thread promise. Lives in the loop's arena and is freed on the loop thread
// once both the consumer has dropped its Promise and the fulfiller's delivery has run there.
template <class T>
class CrossThreadNode final : public PromiseNode<T> {
 public:
  static void* operator new(size_t size) { return FrameArena::allocateFromCurrent(size); }
  static void operator delete(void* p, size_t size) noexcept {
    FrameArena::deallocateToCurrent(p, size);
  }
  explicit CrossThreadNode(EventLoop& loop) noexcept : loop_(loop), delivery_(*this) {}

  // Fulfilling thread: stores the result and hands the node back to the loop. The node must not
  // be touched by this thread afterwards.
  void post(Result<T>&& r) {
    pending_.emplace(std::move(r));
    loop_.postFromAnyThread(delivery_);  // release: publishes pending_ to the loop thread
  }
  bool isCancelled() const noexcept {
    // acquire: pairs with the release store in onConsumerDropped; advisory only (the result of a
    // cancelled promise is dropped on the loop thread whatever this returns).
    return cancelled_.load(std::memory_order_acquire);
  }

 private:
  class Delivery final : public Task {
   public:
    explicit Delivery(CrossThreadNode& node) noexcept : node_(node) {}

   private:
    void run() noexcept override { node_.deliver(); }
    CrossThreadNode& node_;
  };

  // Loop thread, after the fulfiller posted.
  void deliver() noexcept {
    delivered_ = true;
    if (consumerGone_) {
      delete this;
      return;
    }
    this->setResult(std::move(*pending_));
    pending_.reset();
    this->wakeWaiter();
  }
  // Loop thread.
  void onConsumerDropped() noexcept override {
    consumerGone_ = true;
    cancelled_.store(true, std::memory_order_release);
    if (delivered_) delete this;
  }

  EventLoop& loop_;
  Delivery delivery_;
  std::optional<Result<T>> pending_;  // written by the fulfilling thread before its post
  std::atomic<bool> cancelled_{false};
  bool consumerGone_ = false;  // loop thread only
  bool delivered_ = false;     // loop thread only
};

}  // namespace detail

// The producer side of EventLoop::newCrossThreadPromise(). Move-only; may be moved to, used on
// and destroyed on any thread. fulfill() is one-shot: it hands the result to the loop and leaves
// the fulfiller empty. Destroyed unfulfilled, it resolves the promise to Errc::CANCELLED. The
// loop must outlive every cross-thread fulfiller made from it (precondition).
template <class T>
class CrossThreadFulfiller {
 public:
  explicit CrossThreadFulfiller(detail::CrossThreadNode<T>* node) noexcept : node_(node) {}
  CrossThreadFulfiller(CrossThreadFulfiller&& other) noexcept
      : node_(std::exchange(other.node_, nullptr)) {}
  CrossThreadFulfiller& operator=(CrossThreadFulfiller&& other) noexcept {
    if (this != &other) {
      reset();
      node_ = std::exchange(other.node_, nullptr);
    }
    return *this;
  }
  CrossThreadFulfiller(const CrossThreadFulfiller&) = delete;
  CrossThreadFulfiller& operator=(const CrossThreadFulfiller&) = delete;
  ~CrossThreadFulfiller() { reset(); }

  // Delivers `r` to the promise on its loop (which wakes if it sleeps).
  void fulfill(Result<T> r) {
    AGATE_REQUIRE(node_ != nullptr, "a cross-thread fulfiller was fulfilled twice or moved from");
    std::exchange(node_, nullptr)->post(std::move(r));
  }
  // True once the consumer dropped the promise: the work is no longer wanted (advisory: it may
  // turn true just after a check).
  bool isCancelled() const noexcept {
    AGATE_REQUIRE(node_ != nullptr, "use of an empty cross-thread fulfiller");
    return node_->isCancelled();
  }
  bool isPending() const noexcept { return node_ != nullptr; }

 private:
  void reset() noexcept {
    if (node_ != nullptr) fulfill(Error(Errc::CANCELLED, "fulfiller destroyed without fulfilling"));
  }
  detail::CrossThreadNode<T>* node_;
};

template <class T>
struct PromiseAndCrossThreadFulfiller {
  Promise<T> promise;
  CrossThreadFulfiller<T> fulfiller;
};

template <class T>
PromiseAndCrossThreadFulfiller<T> EventLoop::newCrossThreadPromise() {
  AGATE_REQUIRE(current() == this, "newCrossThreadPromise() on its loop's thread");
  auto* node = new detail::CrossThreadNode<T>(*this);
  return PromiseAndCrossThreadFulfiller<T>{Promise<T>(node), CrossThreadFulfiller<T>(node)};
}

template <class T>
void EventLoop::spawn(Promise<T> promise) {
  AGATE_REQUIRE(current() == this, "spawn() on a loop that is not the calling thread's");
  detail::runDetached(*this, std::move(promise));
}

template <class T>
Promise<T> EventLoop::deadline(Promise<T> promise, Duration d) {
  return deadlineImpl(std::move(promise), sleep(d));
}

template <class T>
Promise<T> EventLoop::deadlineImpl(Promise<T> promise, Promise<void> timer) {
  // Waits on both nodes with one coroutine; the first to complete resumes it, and the other
  // promise is then dropped (a fired timer is forgotten; an unfinished promise is cancelled).
  struct Race {
    detail::PromiseNode<T>* work;
    detail::PromiseNode<void>* timer;
    bool await_ready() const noexcept { return work->isReady() || timer->isReady(); }
    void await_suspend(std::coroutine_handle<> h) noexcept {
      work->setWaiter(h);
      timer->setWaiter(h);
    }
    bool await_resume() noexcept {
      work->clearWaiter();
      timer->clearWaiter();
      return work->isReady();
    }
  };
  // Locals, not the parameters (which live as long as the frame): both are dropped as soon as
  // the race is decided, so the timer leaves the loop's timer tree at once.
  {
    Promise<T> work = std::move(promise);
    Promise<void> clock = std::move(timer);
    if (co_await Race{work.node(), clock.node()}) co_return work.takeResult();
  }
  co_return Error(Errc::TIMED_OUT, "deadline passed");
}

}  // namespace agate
