// Tasks: the unit of work an EventLoop runs.
//
// A Task is an intrusive node: it lives wherever its owner puts it (inside a promise node, a
// coroutine frame, a user object) and the loop never allocates or frees one. `EventLoop::post`
// links it into the loop's run queue; the loop unlinks it and calls `run()` once, on the loop's
// thread. A Task may be posted again after it has run.
//
// Ownership and lifetime: the poster keeps the Task alive until it has run. Destroying a Task
// that sits in a loop's same-thread run queue is allowed and simply removes it (the hook unlinks
// itself). A Task handed to `postFromAnyThread` must stay alive until it has run: it is not in
// the run queue yet, only in the loop's cross-thread inbox.
#pragma once

#include <boost/intrusive/list.hpp>
#include <utility>

namespace agate {

class EventLoop;
namespace detail {
class LoopCore;
}

class Task {
 public:
  Task(const Task&) = delete;
  Task& operator=(const Task&) = delete;

  // True while the Task waits in a run queue (same-thread queue only; a Task in the cross-thread
  // inbox reports false until the loop moves it over).
  bool isQueued() const noexcept { return hook_.is_linked(); }

 protected:
  Task() noexcept = default;
  // The auto-unlink hook removes a queued Task from its run queue. Virtual only to keep the
  // compiler's polymorphic-destructor check quiet: the loop never deletes a Task.
  virtual ~Task() = default;

  // Removes this Task from the run queue it waits in, if any.
  void unlinkFromRunQueue() noexcept { hook_.unlink(); }

 private:
  friend class detail::LoopCore;

  // Called once per post, on the loop's thread, after the Task was unlinked.
  virtual void run() noexcept = 0;

  using Hook = boost::intrusive::list_member_hook<
      boost::intrusive::link_mode<boost::intrusive::auto_unlink>>;
  Hook hook_;
  // Link in the loop's lock-free cross-thread inbox. Written by the posting thread before the
  // release CAS that publishes the Task, read by the loop after its acquire exchange.
  Task* remoteNext_ = nullptr;

 public:
  // The loop's run queue type (internal; public only so the loop can name the hook).
  using RunQueue =
      boost::intrusive::list<Task, boost::intrusive::member_hook<Task, Hook, &Task::hook_>,
                             boost::intrusive::constant_time_size<false>>;
};

// A Task that calls a callable: `FunctionTask t([&] { ... }); loop.post(t);`. The callable is
// stored inside the Task, so the Task's owner decides where it lives.
template <class F>
class FunctionTask final : public Task {
 public:
  explicit FunctionTask(F f) : f_(std::move(f)) {}

 private:
  void run() noexcept override { f_(); }
  F f_;
};

namespace detail {
template <class M>
struct MemberOwner;
template <class C>
struct MemberOwner<void (C::*)()> {
  using type = C;
};
template <class C>
struct MemberOwner<void (C::*)() noexcept> {
  using type = C;
};
}  // namespace detail

// A Task that calls member function F of its owner, kept as a member of that owner so that it
// lives and dies with it: `MemberTask<&Owner::flush> flushTask_{*this};`, then
// `loop.post(flushTask_)`. F may be private; it must be declared before the task member.
template <auto F>
class MemberTask final : public Task {
 public:
  using Owner = typename detail::MemberOwner<decltype(F)>::type;
  explicit MemberTask(Owner& owner) noexcept : owner_(owner) {}

 private:
  void run() noexcept override { (owner_.*F)(); }
  Owner& owner_;
};

}  // namespace agate
