#include "agate/kernel/notification.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <new>

#include "agate/kernel/event_buffer.h"

namespace agate::kernel {

static_assert(sizeof(DoorbellWord) <= KernelPage::BYTES);

NotificationBell::NotificationBell(KernelPage page, Fd wakeRead, Fd kernelWrite) noexcept
    : page_(std::move(page)),
      wakeRead_(std::move(wakeRead)),
      kernelWrite_(std::move(kernelWrite)),
      // The page is zero-filled by the memfd: a DoorbellWord of {0, 0} is its initial state.
      word_(std::launder(reinterpret_cast<DoorbellWord*>(page_.data()))),
      doorbell_(word_, /*processShared=*/true, kernelWrite_.get()) {}

void NotificationBell::countEnd() noexcept {
  // Release: a reader that sees the new count also sees the caps deleted before (it asks the
  // kernel anyway; the order only keeps the hint honest). The ring's RMW orders it for waiters.
  std::atomic_ref<uint32_t>(*endsWord()).fetch_add(1, std::memory_order_release);
  ring();
}

uint32_t NotificationBell::ends() const noexcept {
  return std::atomic_ref<uint32_t>(*endsWord()).load(std::memory_order_acquire);
}

uint32_t* NotificationBell::endsWord() const noexcept {
  return std::launder(reinterpret_cast<uint32_t*>(page_.data() + NOTIFICATION_ENDS_OFFSET));
}

Result<Notification::Parts> Notification::tryCreateParts(bool wantWakeFd) {
  auto page = KernelPage::tryCreate("agate-notification", HolderAccess::READ_WRITE);
  if (!page) return page.error();
  if (!wantWakeFd)
    return Parts{std::make_shared<NotificationBell>(std::move(*page), Fd(), Fd()), Fd()};
  int ends[2];
  if (::pipe2(ends, O_CLOEXEC) != 0) return Error::fromErrno(errno, "pipe2 for a wake fd failed");
  Fd wakeRead(ends[0]);
  Fd wakeWrite(ends[1]);
  // The buffer is charged as WAKE_PIPE_PAGES; a ring is 8 bytes, so one page holds 512 of them.
  if (::fcntl(ends[1], F_SETPIPE_SZ, static_cast<int>(WAKE_PIPE_PAGES * PAGE_BYTES)) < 0)
    return Error::fromErrno(errno, "shrinking a wake pipe failed");
  // The kernel's own open file description of the write end: holders share wakeWrite's (and can
  // change its flags), never this one's.
  char path[64];
  std::snprintf(path, sizeof path, "/proc/self/fd/%d", ends[1]);
  Fd kernelWrite(::open(path, O_WRONLY | O_NONBLOCK | O_CLOEXEC));
  if (!kernelWrite.valid())
    return Error::fromErrno(errno, "opening the kernel's end of a wake pipe failed");
  return Parts{std::make_shared<NotificationBell>(std::move(*page), std::move(wakeRead),
                                                  std::move(kernelWrite)),
               std::move(wakeWrite)};
}

Notification::Notification(Parts parts) noexcept : KernelObject(TYPE), parts_(std::move(parts)) {}

Notification::~Notification() {
  AGATE_ASSERT(watched_.empty() && buffers_.empty(), "notification %lu destroyed while linked",
               static_cast<unsigned long>(koid()));
}

void Notification::signal() noexcept {
  ++signals_;
  parts_.bell->ring();
}

void Notification::bufferEnded() noexcept {
  ++signals_;
  parts_.bell->countEnd();
}

uint32_t Notification::ends() const noexcept { return parts_.bell->ends(); }

Result<NotificationFds> Notification::tryDuplicateFds(bool withRing) const {
  NotificationFds fds;
  auto page = parts_.bell->page().tryDuplicate();
  if (!page) return page.error();
  fds.page = std::move(*page);
  fds.bytes = KernelPage::BYTES;
  if (!hasWakeFd()) return fds;
  fds.wakeFd.reset(::fcntl(parts_.bell->wakeRead().get(), F_DUPFD_CLOEXEC, 0));
  if (!fds.wakeFd.valid()) return Error::fromErrno(errno, "duplicating a wake fd failed");
  if (!withRing) return fds;
  fds.ringFd.reset(::fcntl(parts_.wakeWrite.get(), F_DUPFD_CLOEXEC, 0));
  if (!fds.ringFd.valid()) return Error::fromErrno(errno, "duplicating a ring fd failed");
  return fds;
}

Status Notification::tryWatchBank(SpaceBank& bank) {
  if (std::find(watched_.begin(), watched_.end(), &bank) != watched_.end())
    return Error(Errc::ALREADY_EXISTS, "the notification already watches this bank");
  if (watched_.size() >= MAX_WATCHED_BANKS)
    return Error(Errc::QUOTA_EXCEEDED, "the notification watches as many banks as it may");
  watched_.reserve(watched_.size() + 1);  // may throw bad_alloc before anything changed
  bank.addObserver(*this);
  watched_.push_back(&bank);
  return {};
}

Status Notification::tryUnwatchBank(SpaceBank& bank) noexcept {
  auto it = std::find(watched_.begin(), watched_.end(), &bank);
  if (it == watched_.end()) return Error(Errc::NOT_FOUND, "the notification does not watch it");
  watched_.erase(it);
  bank.removeObserver(*this);
  return {};
}

void Notification::attachBuffer(EventBuffer& buffer) { buffers_.push_back(&buffer); }

void Notification::detachBuffer(EventBuffer& buffer) noexcept { std::erase(buffers_, &buffer); }

bool Notification::hasBuffer(const EventBuffer& buffer) const noexcept {
  return std::find(buffers_.begin(), buffers_.end(), &buffer) != buffers_.end();
}

void Notification::verifyLinks() const {
  for (const SpaceBank* bank : watched_)
    AGATE_ASSERT(bank->hasObserver(*this), "notification %lu watches bank %lu, unobserved",
                 static_cast<unsigned long>(koid()), static_cast<unsigned long>(bank->koid()));
  for (const EventBuffer* buffer : buffers_)
    AGATE_ASSERT(buffer->notification() == this, "notification %lu: buffer %lu points elsewhere",
                 static_cast<unsigned long>(koid()), static_cast<unsigned long>(buffer->koid()));
}

void Notification::teardown() noexcept {
  for (SpaceBank* bank : watched_) bank->removeObserver(*this);
  watched_.clear();
  for (EventBuffer* buffer : buffers_) buffer->notificationGone();
  buffers_.clear();
  // Closes the write end handed to WRITE holders; the bell (the page, the pipe's read end and
  // the kernel's ringer) goes with the last of the buffers that shared it, or now if none did.
  parts_ = Parts{};
}

void Notification::pagesReturned(SpaceBank& /*bank*/, uint64_t /*pages*/) noexcept { signal(); }

void Notification::bankDestroyed(SpaceBank& bank) noexcept {
  // The bank clears its observer list itself once every observer was told.
  std::erase(watched_, &bank);
  signal();  // the holder reads `destroyed` on the credit page
}

}  // namespace agate::kernel
