#include "agate/runtime/worker_pool.h"

namespace agate {
namespace detail {

void WorkerJobBase::consumerLeft() noexcept {
  std::shared_ptr<WorkerPoolCore> keep = core_;
  std::lock_guard lock(keep->mutex_);
  switch (phase_) {
    case Phase::QUEUED:
      // Still waiting: it never runs.
      keep->queue_.erase(keep->queue_.iterator_to(*this));
      phase_ = Phase::IDLE;
      release();
      break;
    case Phase::RUNNING:
    case Phase::POSTED:
      // The worker (RUNNING) or the delivery (POSTED) sees this and discards the result.
      consumerGone_ = true;
      break;
    case Phase::DONE:
      phase_ = Phase::IDLE;
      release();
      break;
    case Phase::IDLE:
      AGATE_ASSERT(false, "a worker job's promise dropped twice");
  }
}

void WorkerJobBase::Delivery::run() noexcept {
  WorkerJobBase& job = job_;
  std::shared_ptr<WorkerPoolCore> keep = job.core_;
  {
    std::lock_guard lock(keep->mutex_);
    AGATE_ASSERT(job.phase_ == Phase::POSTED, "a worker job delivered twice");
    if (job.consumerGone_) {
      job.discardResult();
      job.phase_ = Phase::IDLE;
      job.release();
      return;
    }
    job.phase_ = Phase::DONE;
  }
  job.complete();
}

WorkerPoolCore::~WorkerPoolCore() {
  for (void* block : freeBlocks_) ::operator delete(block);
}

bool WorkerPoolCore::trySubmit(const std::shared_ptr<WorkerPoolCore>& self, WorkerJobBase& job,
                               EventLoop& loop) noexcept {
  {
    std::lock_guard lock(mutex_);
    if (stopping_) return false;
    job.core_ = self;
    job.loop_ = &loop;
    job.consumerGone_ = false;
    job.phase_ = WorkerJobBase::Phase::QUEUED;
    queue_.push_back(job);
  }
  work_.notify_one();
  return true;
}

void WorkerPoolCore::workerMain() noexcept {
  std::unique_lock lock(mutex_);
  for (;;) {
    work_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stopping, and stop() already cancelled what was queued
    WorkerJobBase& job = queue_.front();
    queue_.pop_front();
    job.phase_ = WorkerJobBase::Phase::RUNNING;
    lock.unlock();
    job.execute();
    lock.lock();
    if (job.consumerGone_) {
      // Nobody wants the result: discard it here and never touch the loop.
      job.discardResult();
      job.phase_ = WorkerJobBase::Phase::IDLE;
      std::shared_ptr<WorkerPoolCore> keep = job.core_;  // the worker's core is alive anyway
      job.release();
      idle_.notify_all();
      continue;
    }
    // Posted under the lock: a consumer dropping its promise takes the lock first, so the loop
    // (which the promise must not outlive) is alive for the whole post.
    job.phase_ = WorkerJobBase::Phase::POSTED;
    job.loop_->postFromAnyThread(job.delivery_);
  }
}

void WorkerPoolCore::stop() noexcept {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
    // Queued jobs never run: each promise completes with CANCELLED on its own loop. Their
    // promises are alive (a dropped one is unlinked), so their loops are too.
    while (!queue_.empty()) {
      WorkerJobBase& job = queue_.front();
      queue_.pop_front();
      job.cancelResult();
      job.phase_ = WorkerJobBase::Phase::POSTED;
      job.loop_->postFromAnyThread(job.delivery_);
    }
  }
  work_.notify_all();
}

void* WorkerPoolCore::takeBlock() {
  {
    std::lock_guard lock(mutex_);
    if (!freeBlocks_.empty()) {
      void* block = freeBlocks_.back();
      freeBlocks_.pop_back();
      return block;
    }
  }
  return ::operator new(POOLED_BLOCK_SIZE);  // warm-up: the list grows to the peak in flight
}

void WorkerPoolCore::giveBlock(void* block) noexcept {
  // Under mutex_. push_back may allocate when the list grows past its peak; reserve() keeps
  // that to warm-up.
  freeBlocks_.push_back(block);
}

}  // namespace detail

WorkerPool::WorkerPool(size_t threads) : core_(std::make_shared<detail::WorkerPoolCore>()) {
  AGATE_REQUIRE(threads > 0, "a WorkerPool needs at least one thread");
  threads_.reserve(threads);
  for (size_t i = 0; i < threads; ++i) {
    threads_.emplace_back([core = core_.get()] { core->workerMain(); });
  }
}

WorkerPool::~WorkerPool() { shutdown(); }

void WorkerPool::shutdown() noexcept {
  core_->stop();
  for (std::thread& t : threads_) {
    AGATE_REQUIRE(t.get_id() != std::this_thread::get_id(), "WorkerPool::shutdown() on a worker");
    if (t.joinable()) t.join();
  }
}

}  // namespace agate
