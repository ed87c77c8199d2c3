// Promise<T>: the one asynchronous type of Agate.
//
// A Promise<T> is the consumer's handle on a value of type Result<T> that will exist later.
// It is move-only, single-consumer and `[[nodiscard]]`. Errors are values (`Errc`), never
// exceptions. A Promise is produced by one of:
//
//  * a coroutine returning Promise<T>. Coroutines start EAGERLY: calling one runs its body up to
//    its first suspension, so work starts when it is called (as with KJ promises), and a child
//    that completes without suspending costs no trip through the loop. `co_return value;`,
//    `co_return error;` (an Error or Errc) both end it. A Promise<void> coroutine ends with
//    `co_return {};` (success) or `co_return error;` — flowing off its end is undefined behaviour,
//    as for any coroutine with `return_value`.
//  * a Fulfiller<T> (`auto [promise, fulfiller] = newPromiseAndFulfiller<T>();`) that a loop
//    callback, a ring or a worker completes later.
//  * an operation of an EventLoop (sleep, read, futex wait, ...).
//
// Consuming: `Result<T> r = co_await promise;` inside a coroutine, `loop.run(promise)` at top
// level, `loop.spawn(promise)` to detach, or `std::move(promise).then(f)`.
//
// Cancellation: dropping a Promise cancels its producer. A coroutine's frame is destroyed (its
// locals run their destructors, so the promises it was awaiting are dropped in turn, down the
// chain); a timer deregisters; an I/O operation is cancelled in the kernel (see event_loop.h for
// when a caller's buffer is released). A Fulfiller sees `isCancelled()`. A Fulfiller destroyed
// without fulfilling resolves its promise to Errc::CANCELLED: a promise never hangs because its
// producer vanished.
//
// Resumption: a producer that completes while a coroutine waits resumes it either through the
// loop's run queue (fulfillers and loop operations: never re-entrantly inside `fulfill()`), or,
// for a coroutine finishing, by symmetric transfer — bounded to a few dozen in a row per loop
// task so that long chains cannot grow the native stack even where the compiler does not turn the
// transfer into a tail call (g++ at -O0 and under sanitizers does not).
//
// Threading: a Promise, its producer and its consumer belong to one loop's thread. To complete a
// promise from another thread, post a Task to its loop with `EventLoop::postFromAnyThread` and
// fulfil there.
//
// Memory: coroutine frames, fulfiller nodes and loop operation nodes come from the current loop's
// FrameArena, so a steady-state `co_await` round trip allocates nothing.
#pragma once

#include <coroutine>
#include <exception>
#include <optional>
#include <type_traits>
#include <utility>

#include <kj/exception.h>

#include "agate/runtime/frame_arena.h"
#include "agate/runtime/result.h"
#include "agate/runtime/task.h"

namespace agate {

template <class T>
class Promise;
template <class T>
class Fulfiller;

namespace detail {

// Implemented in event_loop.cpp. Both require the calling thread to have a current loop.
void postToCurrentLoop(Task& task) noexcept;
// True if a finishing coroutine may resume its waiter by symmetric transfer now; false when this
// loop task already did so many times in a row (then the waiter goes through the run queue).
bool mayTransferSymmetrically() noexcept;

// The state shared by a promise's producer and consumer. The consumer holds it through
// Promise<T>; the producer is whoever derives from it. The node is a Task: when it completes
// while a coroutine waits, it posts itself and run() resumes the waiter.
class PromiseNodeBase : public Task {
 public:
  bool isReady() const noexcept { return ready_; }

  // The coroutine to resume on completion. One waiter at most.
  void setWaiter(std::coroutine_handle<> waiter) noexcept {
    AGATE_ASSERT(!waiter_, "a promise was awaited by two coroutines at once");
    waiter_ = waiter;
  }
  // Forgets the waiter, and a resumption already queued for it.
  void clearWaiter() noexcept {
    waiter_ = {};
    unlinkFromRunQueue();
  }
  // The consumer is gone: forget it, then let the producer cancel or free itself.
  void dropConsumer() noexcept {
    clearWaiter();
    onConsumerDropped();
  }

 protected:
  PromiseNodeBase() noexcept = default;
  ~PromiseNodeBase() override = default;

  // Schedules the waiter, if any, on the current loop. Never resumes it re-entrantly.
  void wakeWaiter() noexcept {
    if (waiter_) postToCurrentLoop(*this);
  }
  // Called once when the consumer drops its Promise. The node may delete itself.
  virtual void onConsumerDropped() noexcept = 0;

  std::coroutine_handle<> waiter_;
  bool ready_ = false;

 private:
  void run() noexcept override {
    if (std::coroutine_handle<> waiter = std::exchange(waiter_, {})) waiter.resume();
  }
};

template <class T>
class PromiseNode : public PromiseNodeBase {
 public:
  // Moves the result out. A promise's result can be taken once.
  Result<T> takeResult() {
    AGATE_REQUIRE(ready_, "the promise is not ready yet");
    AGATE_REQUIRE(result_.has_value(), "the promise's result was already taken");
    Result<T> r = std::move(*result_);
    result_.reset();
    return r;
  }

 protected:
  PromiseNode() noexcept = default;
  ~PromiseNode() override = default;

  void setResult(Result<T>&& r) {
    AGATE_ASSERT(!ready_, "a promise was completed twice");
    result_.emplace(std::move(r));
    ready_ = true;
  }

  std::optional<Result<T>> result_;
};

// The promise_type of a coroutine returning Promise<T>. The frame itself is the node.
template <class T>
class CoroutinePromise final : public PromiseNode<T> {
 public:
  static void* operator new(size_t size) { return FrameArena::allocateFromCurrent(size); }
  static void operator delete(void* p, size_t size) noexcept {
    FrameArena::deallocateToCurrent(p, size);
  }

  Promise<T> get_return_object() noexcept;
  std::suspend_never initial_suspend() noexcept { return {}; }  // eager start

  struct FinalAwaiter {
    bool await_ready() noexcept { return false; }
    std::coroutine_handle<> await_suspend(std::coroutine_handle<CoroutinePromise> self) noexcept {
      CoroutinePromise& p = self.promise();
      if (!p.waiter_) return std::noop_coroutine();
      if (mayTransferSymmetrically()) return std::exchange(p.waiter_, {});
      postToCurrentLoop(p);  // run() resumes the waiter from the loop, on a fresh stack
      return std::noop_coroutine();
    }
    void await_resume() noexcept {}
  };
  FinalAwaiter final_suspend() noexcept { return {}; }

  void return_value(Result<T> r) { this->setResult(std::move(r)); }
  // Agate reports errors as values. The one exception a coroutine may meet is Cap'n Proto
  // refusing to read content another process sent (kj::Exception: it does not match the schema
  // it is read with, or reading it again spent the reader's traversal budget): the coroutine
  // then ends with PROTOCOL_ERROR, its locals already destroyed by the unwinding. Any other
  // exception escaping a coroutine is a bug.
  void unhandled_exception() noexcept {
    try {
      throw;
    } catch (const kj::Exception&) {
      this->setResult(Error(Errc::PROTOCOL_ERROR,
                            "content could not be read (it does not match its schema, or was "
                            "read past its traversal budget)"));
    } catch (...) {
      std::terminate();
    }
  }

 private:
  // Destroying the frame runs the destructors of everything the coroutine holds, which drops the
  // promises it awaits and so cancels the whole chain below it.
  void onConsumerDropped() noexcept override {
    std::coroutine_handle<CoroutinePromise>::from_promise(*this).destroy();
  }
};

// The node shared by a Promise and its Fulfiller. Freed when both sides are gone.
template <class T>
class FulfillerNode final : public PromiseNode<T> {
 public:
  static void* operator new(size_t size) { return FrameArena::allocateFromCurrent(size); }
  static void operator delete(void* p, size_t size) noexcept {
    FrameArena::deallocateToCurrent(p, size);
  }

  bool consumerGone() const noexcept { return consumerGone_; }

  void fulfill(Result<T>&& r) {
    AGATE_REQUIRE(!this->ready_, "a fulfiller was fulfilled twice");
    if (consumerGone_) return;
    this->setResult(std::move(r));
    this->wakeWaiter();
  }
  // Starts ready, with no fulfiller.
  void completeWithoutFulfiller(Result<T>&& r) {
    this->setResult(std::move(r));
    producerGone_ = true;
  }
  void dropProducer() noexcept {
    if (!this->ready_ && !consumerGone_) {
      fulfill(Error(Errc::CANCELLED, "fulfiller destroyed without fulfilling"));
    }
    producerGone_ = true;
    if (consumerGone_) delete this;
  }

 private:
  void onConsumerDropped() noexcept override {
    consumerGone_ = true;
    if (producerGone_) delete this;
  }
  bool consumerGone_ = false;
  bool producerGone_ = false;
};

}  // namespace detail

template <class T>
class [[nodiscard]] Promise {
 public:
  using promise_type = detail::CoroutinePromise<T>;
  using ValueType = T;

  // Takes the consumer's reference on `node` (producers use this; users get promises from
  // coroutines, fulfillers and loops).
  explicit Promise(detail::PromiseNode<T>* node) noexcept : node_(node) {}
  Promise(Promise&& other) noexcept : node_(std::exchange(other.node_, nullptr)) {}
  Promise& operator=(Promise&& other) noexcept {
    if (this != &other) {
      reset();
      node_ = std::exchange(other.node_, nullptr);
    }
    return *this;
  }
  Promise(const Promise&) = delete;
  Promise& operator=(const Promise&) = delete;
  // Dropping an unfinished promise cancels its producer (see the overview).
  ~Promise() { reset(); }

  // False only for a moved-from promise.
  bool isValid() const noexcept { return node_ != nullptr; }
  bool isReady() const noexcept {
    AGATE_REQUIRE(node_ != nullptr, "use of a moved-from promise");
    return node_->isReady();
  }
  // The result of a ready promise (precondition: isReady()). Taken once.
  Result<T> takeResult() {
    AGATE_REQUIRE(isReady(), "takeResult() on a promise that is not ready");
    return node_->takeResult();
  }

  struct Awaiter {
    detail::PromiseNode<T>* node;
    bool await_ready() const noexcept { return node->isReady(); }
    void await_suspend(std::coroutine_handle<> waiter) noexcept { node->setWaiter(waiter); }
    Result<T> await_resume() { return node->takeResult(); }
  };
  Awaiter operator co_await() & noexcept {
    AGATE_REQUIRE(node_ != nullptr, "co_await on a moved-from promise");
    return Awaiter{node_};
  }
  Awaiter operator co_await() && noexcept {
    AGATE_REQUIRE(node_ != nullptr, "co_await on a moved-from promise");
    return Awaiter{node_};
  }

  // Continuation: a promise of f(Result<T>), where f returns Result<U> (or anything a Result<U>
  // converts from; then U is named explicitly: `then<U>(f)`). Runs on the loop when this promise
  // completes. Dropping the returned promise cancels this one.
  template <class U = void, class F>
  auto then(F f) && {
    using R = std::invoke_result_t<F, Result<T>>;
    if constexpr (std::is_void_v<U> && IsResult<R>::value) {
      return thenImpl<typename IsResult<R>::Value>(std::move(*this), std::move(f));
    } else {
      return thenImpl<U>(std::move(*this), std::move(f));
    }
  }

  // The node (for awaiters and adapters inside the runtime).
  detail::PromiseNode<T>* node() const noexcept { return node_; }

 private:
  template <class R>
  struct IsResult : std::false_type {};
  template <class V>
  struct IsResult<Result<V>> : std::true_type {
    using Value = V;
  };

  template <class U, class F>
  static Promise<U> thenImpl(Promise<T> self, F f) {
    co_return f(co_await self);
  }

  void reset() noexcept {
    if (detail::PromiseNode<T>* n = std::exchange(node_, nullptr)) n->dropConsumer();
  }

  detail::PromiseNode<T>* node_;
};

// The producer side of a promise made by newPromiseAndFulfiller(). Move-only. Used on the
// promise's loop thread only.
template <class T>
class Fulfiller {
 public:
  explicit Fulfiller(detail::FulfillerNode<T>* node) noexcept : node_(node) {}
  Fulfiller(Fulfiller&& other) noexcept : node_(std::exchange(other.node_, nullptr)) {}
  Fulfiller& operator=(Fulfiller&& other) noexcept {
    if (this != &other) {
      reset();
      node_ = std::exchange(other.node_, nullptr);
    }
    return *this;
  }
  Fulfiller(const Fulfiller&) = delete;
  Fulfiller& operator=(const Fulfiller&) = delete;
  // An unfulfilled promise resolves to Errc::CANCELLED ("fulfiller destroyed without
  // fulfilling").
  ~Fulfiller() { reset(); }

  // Completes the promise with a value or an error and schedules its waiter. A no-op when the
  // promise was dropped (isCancelled()); fulfilling twice is a precondition violation.
  void fulfill(Result<T> r) {
    AGATE_REQUIRE(node_ != nullptr, "use of a moved-from fulfiller");
    node_->fulfill(std::move(r));
  }
  // True once the consumer dropped the promise: the work it stood for is no longer wanted.
  bool isCancelled() const noexcept {
    AGATE_REQUIRE(node_ != nullptr, "use of a moved-from fulfiller");
    return node_->consumerGone();
  }
  bool isFulfilled() const noexcept {
    AGATE_REQUIRE(node_ != nullptr, "use of a moved-from fulfiller");
    return node_->isReady();
  }

 private:
  void reset() noexcept {
    if (detail::FulfillerNode<T>* n = std::exchange(node_, nullptr)) n->dropProducer();
  }
  detail::FulfillerNode<T>* node_;
};

template <class T>
struct PromiseAndFulfiller {
  Promise<T> promise;
  Fulfiller<T> fulfiller;
};

// A promise and the fulfiller that completes it: `auto [promise, fulfiller] = ...`.
template <class T>
PromiseAndFulfiller<T> newPromiseAndFulfiller() {
  auto* node = new detail::FulfillerNode<T>();
  return PromiseAndFulfiller<T>{Promise<T>(node), Fulfiller<T>(node)};
}

// A promise that is already complete.
template <class T>
Promise<T> readyPromise(Result<T> r) {
  auto* node = new detail::FulfillerNode<T>();
  node->completeWithoutFulfiller(std::move(r));
  return Promise<T>(node);
}

template <class T>
Promise<T> detail::CoroutinePromise<T>::get_return_object() noexcept {
  return Promise<T>(this);
}

}  // namespace agate

// Inside a coroutine: if `expr` (a Result or Status) holds an error, co_return that error.
#define AGATE_CO_TRY(expr)                                        \
  do {                                                            \
    auto&& agate_co_try_r_ = (expr);                              \
    if (!agate_co_try_r_.ok()) co_return agate_co_try_r_.error(); \
  } while (0)
