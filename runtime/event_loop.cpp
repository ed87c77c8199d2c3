#include "agate/runtime/event_loop.h"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdio>

#include "loop_core.h"

namespace agate {
namespace {

// The calling thread's loop: the one thread_local of Agate (see event_loop.h).
thread_local EventLoop* tCurrentLoop = nullptr;

constexpr bool isFutexWakeOutcome(int32_t res) noexcept {
  // 0: woken. EAGAIN: the word no longer held `expected` at submission. EINTR: interrupted;
  // futex waiters re-check their condition anyway.
  return res >= 0 || res == -EAGAIN || res == -EINTR;
}

}  // namespace

namespace detail {

void postToCurrentLoop(Task& task) noexcept {
  EventLoop* loop = tCurrentLoop;
  AGATE_REQUIRE(loop != nullptr,
                "a promise completed while a coroutine waits on it, on a thread with no loop");
  loop->post(task);
}

bool mayTransferSymmetrically() noexcept {
  EventLoop* loop = tCurrentLoop;
  return loop == nullptr || LoopCore::of(*loop).consumeTransferBudget();
}

// The promise node of one kernel operation.
template <class T>
class IoOpNode final : public PromiseNode<T>, public IoOp {
 public:
  static void* operator new(size_t size) { return FrameArena::allocateFromCurrent(size); }
  static void operator delete(void* p, size_t size) noexcept {
    FrameArena::deallocateToCurrent(p, size);
  }
  explicit IoOpNode(LoopCore& core) noexcept : core_(core) {}

  void complete(int32_t res) noexcept override {
    this->setResult(convert(res));
    this->wakeWaiter();
  }
  void destroy() noexcept override { delete this; }

 private:
  Result<T> convert(int32_t res) const noexcept {
    if (res == -ECANCELED) return Error(Errc::CANCELLED, "operation cancelled");
    if constexpr (std::is_void_v<T>) {
      if (isFutexWakeOutcome(res)) return Status{};
      return Error::fromErrno(-res, "futex wait");
    } else {
      if (res < 0) return Error::fromErrno(-res, kind == Kind::OP_POLL ? "poll" : "read/write");
      return static_cast<T>(res);
    }
  }
  void onConsumerDropped() noexcept override { core_.dropIo(*this); }

  LoopCore& core_;
};

// --- LoopCore ----------------------------------------------------------------------------------

LoopCore::LoopCore(const LoopOptions& options) noexcept
    : futexPollInterval_(options.futexPollInterval),
      futexBackstop_(options.futexBackstopInterval) {}

LoopCore::~LoopCore() { shutdown(); }

Status LoopCore::init(const LoopOptions& options) {
  if (options.backend == Backend::URING || options.backend == Backend::AUTO) {
    Result<std::unique_ptr<IoBackend>> uring = tryCreateUringBackend(*this, options);
    if (uring.ok()) {
      backend_ = std::move(uring.value());
      return {};
    }
    if (options.backend == Backend::URING) return uring.error();
    char why[160];
    fprintf(stderr, "agate: io_uring unavailable (%s); event loop falls back to epoll\n",
            uring.error().describe(why, sizeof why));
  }
  Result<std::unique_ptr<IoBackend>> epoll = tryCreateEpollBackend(*this);
  if (!epoll.ok()) return epoll.error();
  backend_ = std::move(epoll.value());
  return {};
}

void LoopCore::shutdown() noexcept {
  // Cancel detached work first: destroying a frame drops what it awaits, which may still need
  // the backend (synchronous cancel of reads and writes).
  while (!detached_.empty()) detached_.front().handle.destroy();
  runQueue_.clear();
  flushQueue_.clear();
  // Destroying the backend cancels what is still in the kernel and finishes every op it held.
  backend_.reset();
  while (!polledFutexes_.empty()) {
    IoOp& op = polledFutexes_.front();
    op.hook.unlink();
    liveOps_.push_back(op);
  }
  size_t held = 0;
  for (IoOp& op : liveOps_) held += op.consumerGone ? 0 : 1;
  AGATE_REQUIRE(held == 0, "%zu promise(s) of this loop's I/O operations outlive the loop", held);
  while (!liveOps_.empty()) liveOps_.front().destroy();
  timers_.clear();
}

void LoopCore::postFromAnyThread(Task& task) noexcept {
  Task* old = remoteHead_.load(std::memory_order_relaxed);
  do {
    task.remoteNext_ = old;
    // seq_cst: publishes task (release) and orders this push before the load of sleeping_ below
    // (see sleeping_).
  } while (!remoteHead_.compare_exchange_weak(old, &task, std::memory_order_seq_cst,
                                              std::memory_order_relaxed));
  if (sleeping_.exchange(false, std::memory_order_seq_cst)) backend_->wake();
}

void LoopCore::drainRemote() noexcept {
  // acquire: pairs with the posters' CAS, so each Task's contents are visible.
  Task* head = remoteHead_.exchange(nullptr, std::memory_order_acquire);
  Task* reversed = nullptr;
  while (head != nullptr) {
    Task* next = head->remoteNext_;
    head->remoteNext_ = reversed;
    reversed = head;
    head = next;
  }
  while (reversed != nullptr) {
    Task* next = reversed->remoteNext_;
    reversed->remoteNext_ = nullptr;
    runQueue_.push_back(*reversed);
    reversed = next;
  }
}

void LoopCore::runTasks() noexcept {
  // Stops early once run()'s promise is ready: run() returns at once, the rest stays queued.
  for (uint32_t n = 0; n < MAX_TASKS_PER_TURN && !runQueue_.empty(); ++n) {
    if (awaited_ != nullptr && awaited_->isReady()) return;
    Task& task = runQueue_.front();
    runQueue_.pop_front();
    transfers_ = 0;
    task.run();
  }
}

void LoopCore::runFlushes() noexcept {
  while (!flushQueue_.empty()) {
    Task& task = flushQueue_.front();
    flushQueue_.pop_front();
    task.run();
  }
}

void LoopCore::fireTimers(TimePoint now) noexcept {
  while (!timers_.empty() && timers_.begin()->when() <= now) timers_.begin()->fire();
}

void LoopCore::pollFutexes() noexcept {
  for (auto it = polledFutexes_.begin(); it != polledFutexes_.end();) {
    IoOp& op = *it++;
    // acquire: a waker's writes before its store to the word are visible to the resumed waiter.
    if (op.word->load(std::memory_order_acquire) == op.expected) continue;
    op.hook.unlink();
    liveOps_.push_back(op);
    finish(op, 0);
  }
}

void LoopCore::recheckNativeFutexes(TimePoint now) noexcept {
  if (nativeFutexWaits_ == 0 || now < nextFutexRecheck_) return;
  nextFutexRecheck_ = now + futexBackstop_;
  for (IoOp& op : liveOps_) {
    if (op.kind != IoOp::Kind::OP_FUTEX_WAIT || !op.inFlight || op.completedEarly) continue;
    if (op.word->load(std::memory_order_acquire) == op.expected) continue;
    // The word changed but no completion came: resolve now, and cancel the kernel's wait (its
    // CQE then only frees or releases the op).
    op.completedEarly = true;
    --nativeFutexWaits_;
    backend_->cancel(op);
    op.complete(0);
  }
}

void LoopCore::turn(const PromiseNodeBase* awaited, bool mayBlock) {
  AGATE_REQUIRE(!inTurn_, "run() or runUntilIdle() called from inside the loop it runs");
  inTurn_ = true;
  awaited_ = awaited;
  drainRemote();
  runTasks();
  runFlushes();  // before the wait below, and before run() returns if its promise is ready
  // The clock is read only while something is timed (a timer, a native futex wait to recheck):
  // a busy loop with neither pays nothing for it.
  std::optional<TimePoint> clock;
  auto now = [&] {
    if (!clock) clock = std::chrono::steady_clock::now();
    return *clock;
  };
  if (!timers_.empty()) fireTimers(now());
  pollFutexes();

  std::optional<Duration> timeout;
  if (!mayBlock || !runQueue_.empty() || (awaited != nullptr && awaited->isReady())) {
    timeout = Duration::zero();
  } else {
    if (!timers_.empty()) timeout = std::max(Duration::zero(), timers_.begin()->when() - now());
    if (!polledFutexes_.empty()) {
      timeout = timeout ? std::min(*timeout, futexPollInterval_) : futexPollInterval_;
    }
    if (nativeFutexWaits_ > 0) {
      Duration untilRecheck = std::max(Duration::zero(), nextFutexRecheck_ - now());
      timeout = timeout ? std::min(*timeout, untilRecheck) : untilRecheck;
    }
    sleeping_.store(true, std::memory_order_seq_cst);
    if (remoteHead_.load(std::memory_order_seq_cst) != nullptr) timeout = Duration::zero();
  }
  backend_->wait(timeout);
  sleeping_.store(false, std::memory_order_relaxed);

  drainRemote();
  clock.reset();  // the wait took time
  if (!timers_.empty()) fireTimers(now());
  pollFutexes();
  if (nativeFutexWaits_ > 0) recheckNativeFutexes(now());
  runFlushes();  // completions and timers resume nothing synchronously today; cheap insurance
  awaited_ = nullptr;
  inTurn_ = false;
}

void LoopCore::startIo(IoOp& op) noexcept {
  if (op.kind == IoOp::Kind::OP_FUTEX_WAIT && !backend_->hasNativeFutexWait()) {
    polledFutexes_.push_back(op);
    pollFutexes();  // a word that already differs resolves at once
    return;
  }
  liveOps_.push_back(op);
  if (op.kind == IoOp::Kind::OP_FUTEX_WAIT && nativeFutexWaits_++ == 0) {
    nextFutexRecheck_ = std::chrono::steady_clock::now() + futexBackstop_;
  }
  backend_->start(op);
}

void LoopCore::dropIo(IoOp& op) noexcept {
  if (!op.inFlight) {
    op.destroy();  // also leaves polledFutexes_ / liveOps_ (auto-unlink)
    return;
  }
  op.consumerGone = true;
  if (op.kind == IoOp::Kind::OP_FUTEX_WAIT && !op.completedEarly) {
    op.completedEarly = true;  // no longer counted as a live wait
    --nativeFutexWaits_;
  }
  backend_->cancel(op);
}

void LoopCore::finish(IoOp& op, int32_t res) noexcept {
  bool wasInFlight = op.inFlight;
  op.inFlight = false;
  if (op.kind == IoOp::Kind::OP_FUTEX_WAIT && wasInFlight && !op.completedEarly) {
    --nativeFutexWaits_;
  }
  if (op.consumerGone) {
    op.destroy();
    return;
  }
  if (op.completedEarly) return;  // the consumer already has its result
  op.complete(res);
}

}  // namespace detail

// --- EventLoop ---------------------------------------------------------------------------------

const char* backendName(Backend b) noexcept {
  switch (b) {
    case Backend::AUTO:
      return "auto";
    case Backend::URING:
      return "io_uring";
    case Backend::EPOLL:
      return "epoll";
  }
  return "unknown";
}

EventLoop::EventLoop(LoopOptions options) : EventLoop(options, nullptr) {}

EventLoop::EventLoop(LoopOptions options, Status* status) {
  AGATE_REQUIRE(tCurrentLoop == nullptr, "this thread already has an event loop");
  tCurrentLoop = this;
  core_ = std::make_unique<detail::LoopCore>(options);
  Status s = core_->init(options);
  if (status != nullptr) {
    *status = s;
    if (!s.ok()) {
      core_.reset();
      tCurrentLoop = nullptr;
    }
    return;
  }
  if (!s.ok()) {
    char why[160];
    AGATE_REQUIRE(s.ok(), "cannot create an event loop (backend %s): %s",
                  backendName(options.backend), s.error().describe(why, sizeof why));
  }
}

Result<std::unique_ptr<EventLoop>> EventLoop::tryCreate(LoopOptions options) {
  Status s;
  std::unique_ptr<EventLoop> loop(new EventLoop(options, &s));
  if (!s.ok()) return s.error();
  return loop;
}

EventLoop::~EventLoop() {
  if (core_ == nullptr) return;
  core_->shutdown();
  core_.reset();
  tCurrentLoop = nullptr;
}

EventLoop* EventLoop::current() noexcept { return tCurrentLoop; }

Backend EventLoop::backend() const noexcept { return core_->backend().kind(); }
bool EventLoop::busyPollShouldYield() const noexcept { return core_->busyPollShouldYield(); }

bool EventLoop::hasNativeFutexWait() const noexcept {
  return core_->backend().hasNativeFutexWait();
}

void EventLoop::post(Task& task) noexcept {
  AGATE_REQUIRE(!task.isQueued(), "post() of a Task that is already queued");
  core_->post(task);
}

void EventLoop::postFromAnyThread(Task& task) noexcept { core_->postFromAnyThread(task); }

void EventLoop::postBeforeWait(Task& task) noexcept {
  AGATE_REQUIRE(!task.isQueued(), "postBeforeWait() of a Task that is already queued");
  core_->postBeforeWait(task);
}

bool EventLoop::inTurn() const noexcept { return core_->inTurn(); }

void EventLoop::runBeforeWaitTasks() noexcept {
  AGATE_REQUIRE(tCurrentLoop == this, "a loop runs only on the thread that created it");
  if (!core_->inTurn()) core_->runFlushes();  // inside a turn, the turn runs them
}

void EventLoop::turn(const detail::PromiseNodeBase* awaited) {
  AGATE_REQUIRE(tCurrentLoop == this, "a loop runs only on the thread that created it");
  core_->turn(awaited);
}

void EventLoop::runUntilIdle() {
  AGATE_REQUIRE(tCurrentLoop == this, "a loop runs only on the thread that created it");
  do {
    core_->turn(nullptr, /*mayBlock=*/false);
  } while (!core_->idle());
}

void EventLoop::linkDetached(detail::DetachedFrame& frame) noexcept {
  core_->detached_.push_back(frame);
}

void EventLoop::reportDetachedError(const Error& e) noexcept {
  char why[160];
  fprintf(stderr, "agate: a spawned promise failed: %s\n", e.describe(why, sizeof why));
}

Promise<void> EventLoop::sleep(Duration d) {
  return sleepUntil(std::chrono::steady_clock::now() + d);
}

Promise<void> EventLoop::sleepUntil(TimePoint when) {
  AGATE_REQUIRE(tCurrentLoop == this, "timers are created on their loop's thread");
  auto* timer = new detail::TimerNode(when);
  core_->addTimer(*timer);
  return Promise<void>(timer);
}

namespace {
template <class T>
detail::IoOpNode<T>* newOp(EventLoop* self, detail::LoopCore& core, detail::IoOp::Kind kind,
                           int fd) {
  AGATE_REQUIRE(EventLoop::current() == self, "I/O is started on its loop's thread");
  auto* op = new detail::IoOpNode<T>(core);
  op->kind = kind;
  op->fd = fd;
  return op;
}
}  // namespace

Promise<size_t> EventLoop::read(int fd, std::span<std::byte> buf, int64_t offset) {
  auto* op = newOp<size_t>(this, *core_, detail::IoOp::Kind::OP_READ, fd);
  op->buf = buf.data();
  op->len = static_cast<uint32_t>(std::min<size_t>(buf.size(), INT32_MAX));
  op->offset = offset;
  core_->startIo(*op);
  return Promise<size_t>(op);
}

Promise<size_t> EventLoop::write(int fd, std::span<const std::byte> buf, int64_t offset) {
  auto* op = newOp<size_t>(this, *core_, detail::IoOp::Kind::OP_WRITE, fd);
  op->buf = const_cast<std::byte*>(buf.data());  // the kernel only reads it
  op->len = static_cast<uint32_t>(std::min<size_t>(buf.size(), INT32_MAX));
  op->offset = offset;
  core_->startIo(*op);
  return Promise<size_t>(op);
}

Promise<uint32_t> EventLoop::waitReady(int fd, uint32_t events) {
  auto* op = newOp<uint32_t>(this, *core_, detail::IoOp::Kind::OP_POLL, fd);
  op->events = events;
  core_->startIo(*op);
  return Promise<uint32_t>(op);
}

Promise<void> EventLoop::waitFutex(const std::atomic<uint32_t>& word, uint32_t expected,
                                   bool shared) {
  auto* op = newOp<void>(this, *core_, detail::IoOp::Kind::OP_FUTEX_WAIT, -1);
  op->word = &word;
  op->expected = expected;
  op->shared = shared;
  core_->startIo(*op);
  return Promise<void>(op);
}

Result<uint32_t> futexWake(const std::atomic<uint32_t>& word, uint32_t count, bool shared) {
  int op = FUTEX_WAKE | (shared ? 0 : FUTEX_PRIVATE_FLAG);
  int n = static_cast<int>(std::min<uint32_t>(count, INT_MAX));
  long r = syscall(SYS_futex, &word, op, n, nullptr, nullptr, 0);
  if (r < 0) return Error::fromErrno(errno, "futex wake");
  return static_cast<uint32_t>(r);
}

}  // namespace agate
