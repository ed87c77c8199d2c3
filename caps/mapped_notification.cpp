#include "agate/caps/mapped_notification.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <utility>

#include "agate/kernel/event_slot.h"

namespace agate::caps {
namespace {

// A file description of our own, O_NONBLOCK, for a pipe end the kernel handed out. The received
// descriptor shares its description (and so its O_NONBLOCK flag) with every other holder, who
// could make it blocking; a re-open through /proc gives one nobody else can touch.
Result<Fd> tryReopenNonBlocking(const Fd& end, int access) {
  if (!end.valid()) return Fd();
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/self/fd/%d", end.get());
  Fd own(::open(path, access | O_NONBLOCK | O_CLOEXEC));
  if (!own.valid()) return Error::fromErrno(errno, "cannot re-open a notification's wake pipe");
  return own;
}

}  // namespace

Result<MappedNotification> MappedNotification::tryMap(Fd page, uint64_t bytes, Fd wake, Fd ring) {
  if (!page.valid() || bytes < sizeof(DoorbellWord))
    return Error(Errc::INVALID_ARGUMENT, "no notification page to map");
  auto ownWake = tryReopenNonBlocking(wake, O_RDONLY);
  if (!ownWake) return ownWake.error();
  auto ownRing = tryReopenNonBlocking(ring, O_WRONLY);
  if (!ownRing) return ownRing.error();
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, page.get(), 0);
  if (p == MAP_FAILED) return Error::fromErrno(errno, "mmap of a notification page failed");
  MappedNotification m;
  m.data_ = static_cast<std::byte*>(p);
  m.size_ = bytes;
  m.word_ = reinterpret_cast<DoorbellWord*>(p);
  m.page_ = std::move(page);
  m.wake_ = std::move(*ownWake);  // the received ends close here: ours replace them
  m.ring_ = std::move(*ownRing);
  m.doorbell_ = Doorbell(m.word_, /*processShared=*/true, m.ring_.get());
  return m;
}

MappedNotification& MappedNotification::operator=(MappedNotification&& o) noexcept {
  if (this == &o) return *this;
  reset();
  data_ = std::exchange(o.data_, nullptr);
  size_ = std::exchange(o.size_, 0);
  word_ = std::exchange(o.word_, nullptr);
  page_ = std::move(o.page_);
  wake_ = std::move(o.wake_);
  ring_ = std::move(o.ring_);
  // The doorbell names the word and our ring end; rebuilt, not copied (its counters are ours).
  doorbell_ = word_ != nullptr ? Doorbell(word_, true, ring_.get()) : Doorbell();
  o.doorbell_ = Doorbell();
  return *this;
}

uint32_t MappedNotification::ends() const noexcept {
  AGATE_REQUIRE(mapped(), "ends on an unmapped notification");
  if (size_ < kernel::NOTIFICATION_ENDS_OFFSET + sizeof(uint32_t)) return 0;
  // The mapping is writable (the doorbell protocol needs it), so the word is a plain uint32_t
  // in shared memory read atomically.
  auto* word = reinterpret_cast<uint32_t*>(data_ + kernel::NOTIFICATION_ENDS_OFFSET);
  return std::atomic_ref<uint32_t>(*word).load(std::memory_order_acquire);
}

void MappedNotification::ring() noexcept {
  AGATE_REQUIRE(mapped(), "ring on an unmapped notification");
  doorbell_.ring();
}

void MappedNotification::drainWake() noexcept {
  if (!wake_.valid()) return;
  // Our own O_NONBLOCK description (tryMap): reads until EAGAIN, never blocks.
  uint64_t bytes[8];
  while (::read(wake_.get(), bytes, sizeof(bytes)) > 0) {
  }
}

void MappedNotification::reset() noexcept {
  if (data_ != nullptr) ::munmap(data_, size_);
  data_ = nullptr;
  size_ = 0;
  word_ = nullptr;
  doorbell_ = Doorbell();
  page_.reset();
  wake_.reset();
  ring_.reset();
}

}  // namespace agate::caps
