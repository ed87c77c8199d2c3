// Notification: a doorbell word in a page of shared memory, and a pollable wake descriptor when
// asked for. It carries no data: a ring means "look again" at whatever state it announces (an
// event buffer's slots, a bank's credit page).
//
// Memory. One KernelPage (sealed_memory.h) charged to the bank the notification was allocated
// from; its first 8 bytes are a DoorbellWord (runtime/doorbell.h). The kernel keeps the page
// mapped and rings it with the doorbell protocol (trySignal, a bound bank's returned pages).
// Holders map it READ_WRITE: the doorbell protocol needs waiters to announce themselves (an RMW on
// `sleepers`) and ringers to bump `seq`, so a holder that can wait can also ring. A hostile holder
// can thus cause spurious wakeups or hide waiters from ringers; waiters therefore park with a
// finite slice (WaitPolicy::parkSlice) and re-check the state itself, never trusting the word.
//
// The wake descriptor (wantWakeFd at creation). An event loop that cannot wait on a futex
// announces itself as an eventfd waiter (DOORBELL_EVENTFD_WAITER) and polls `wakeFd` for
// readability; ringers write 8 bytes to `ringFd`; the waiter drains `wakeFd` with reads of 8
// bytes (several rings may coalesce, as with an eventfd). It is a pipe, not an eventfd, on
// purpose: an eventfd's counter and O_NONBLOCK flag live in one file description shared by every
// holder, so a hostile holder could clear O_NONBLOCK and saturate the counter, and the kernel's
// next write() would block the kernel forever. The kernel writes the pipe through its own file
// description, opened O_NONBLOCK from /proc/self/fd and never handed out: no holder can make
// it blocking, and a full pipe just answers EAGAIN (it is already readable). The pipe's buffer is
// kernel memory: it is shrunk to one page (F_SETPIPE_SZ) and that page is charged to the bank.
//
// Rights (a cap to a notification):
//  * READ: Kernel::tryNotificationFds gives the page and `wakeFd` (to wait).
//  * WRITE: Kernel::trySignal (the kernel rings it); tryNotificationFds adds `ringFd`; binding it
//    to a bank (Kernel::tryBindBankNotification) or to an event buffer as its doorbell.
//  * GRANT, DESTROY as for every object. It stays (charged to its bank) when its last cap goes.
//
// Sources. A notification may watch up to MAX_WATCHED_BANKS banks (it is a BankObserver: rung
// when pages come back to a watched bank or below it, and when the bank is destroyed) and be the
// doorbell of any number of event buffers. Destroying it unwatches the banks and detaches the
// buffers, which keep its bell (NotificationBell) to count their own end with; a destroyed bank
// drops out of its list.
//
// Threading: single-threaded, as the whole object model.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "agate/kernel/object.h"
#include "agate/kernel/sealed_memory.h"
#include "agate/kernel/space_bank.h"
#include "agate/runtime/doorbell.h"
#include "agate/runtime/fd.h"
#include "agate/runtime/result.h"

namespace agate::kernel {

class EventBuffer;

// The doorbell page of a notification and the kernel's ringer: all it takes to count an event
// buffer's end in the page and ring. The notification and every event buffer bound to it share
// it, so that a buffer destroyed after its notification still counts its end where its readers
// look and wakes them (event_buffer.h, "The end"): the order in which a publisher destroys the
// two never leaves a reader without its end.
//
// The bell holds a read end of the wake pipe as well as the kernel's write end: a write to a pipe
// nobody can read fails with EPIPE (and SIGPIPE), so while the kernel may ring it, it keeps it
// readable, as the notification itself did.
//
// Cost. A notification destroyed while buffers are bound to it gives its pages back to its bank
// at once, but the bell (the page, mapped, and the kernel's two ends of the wake pipe: three
// descriptors) stays until the last of those buffers goes. That is one page per such
// notification, uncharged, and only while a buffer that is itself charged lives: a process
// cannot hold more of them than it holds buffers.
class NotificationBell {
 public:
  // `wakeRead`: the wake pipe's read end (duplicated for READ holders); `kernelWrite`: the
  // kernel's own O_NONBLOCK description of its write end. Both invalid for a notification
  // without a wake descriptor.
  NotificationBell(KernelPage page, Fd wakeRead, Fd kernelWrite) noexcept;
  NotificationBell(const NotificationBell&) = delete;
  NotificationBell& operator=(const NotificationBell&) = delete;

  // Rings the doorbell (futex waiters, and the wake pipe if an eventfd-style waiter announced).
  void ring() noexcept { doorbell_.ring(); }
  // Counts one ended buffer in the page's ends word (NOTIFICATION_ENDS_OFFSET), then rings.
  void countEnd() noexcept;
  // The ends word as the kernel's mapping holds it (any holder may have written it).
  uint32_t ends() const noexcept;
  const DoorbellWord& word() const noexcept { return *word_; }
  const KernelPage& page() const noexcept { return page_; }
  const Fd& wakeRead() const noexcept { return wakeRead_; }

 private:
  uint32_t* endsWord() const noexcept;  // in the kernel's mapping of the page

  KernelPage page_;
  Fd wakeRead_;
  Fd kernelWrite_;
  DoorbellWord* word_;  // in page_, the kernel's mapping
  Doorbell doorbell_;   // process-shared futex, and the wake pipe through kernelWrite_
};

// What a holder needs to wait on (and, with WRITE, ring) a notification. Owned by the caller;
// the daemon passes them with SCM_RIGHTS.
struct NotificationFds {
  Fd page;    // memfd of one page; a DoorbellWord at offset 0; map it MAP_SHARED read-write
  Fd wakeFd;  // read end of the wake pipe (invalid if the notification has none)
  Fd ringFd;  // write end (only with WRITE; invalid if none)
  uint64_t bytes = 0;
};

class Notification final : public KernelObject, private BankObserver {
 public:
  static constexpr ObjectType TYPE = ObjectType::NOTIFICATION;
  static constexpr uint64_t PAGES = 1;            // the doorbell page
  static constexpr uint64_t WAKE_PIPE_PAGES = 1;  // the wake pipe's buffer, shrunk to one page
  // Pages a notification is charged besides its record.
  static constexpr uint64_t pagesFor(bool wantWakeFd) noexcept {
    return PAGES + (wantWakeFd ? WAKE_PIPE_PAGES : 0);
  }
  static constexpr size_t MAX_WATCHED_BANKS = 64;
  static constexpr uint64_t WAKE_BYTES = 8;  // what one ring writes to the wake pipe

  // The resources, made before anything is charged so a failure changes nothing.
  struct Parts {
    std::shared_ptr<NotificationBell> bell;  // the page, the pipe's read end, the ringer
    Fd wakeWrite;                            // handed to WRITE holders (shared file description)
  };
  // SYSTEM_ERROR if the page or the pipe cannot be made (nothing is left behind).
  static Result<Parts> tryCreateParts(bool wantWakeFd);

  explicit Notification(Parts parts) noexcept;
  ~Notification() override;

  bool hasWakeFd() const noexcept { return parts_.bell && parts_.bell->wakeRead().valid(); }
  // The page and ringer, shared with the event buffers bound to it (see NotificationBell).
  const std::shared_ptr<NotificationBell>& bell() const noexcept { return parts_.bell; }
  // Rings the doorbell: wakes futex waiters and, if any eventfd-style waiter announced, writes
  // the wake pipe (never blocks). Counts in signals().
  void signal() noexcept;
  // An event buffer bound to it is being destroyed: counts it in the page's ends word
  // (NOTIFICATION_ENDS_OFFSET, event_slot.h), then signals, so its readers wake and look.
  void bufferEnded() noexcept;
  // The ends word as the kernel's mapping holds it (any holder may have written it).
  uint32_t ends() const noexcept;
  // Times the kernel rang it (trySignal, bank returns); for tests and the CLI.
  uint64_t signals() const noexcept { return signals_; }
  const DoorbellWord& word() const noexcept { return parts_.bell->word(); }

  // New descriptors; `withRing` adds the ring end. SYSTEM_ERROR if one cannot be made.
  Result<NotificationFds> tryDuplicateFds(bool withRing) const;

  // Watching banks (see the overview). ALREADY_EXISTS if watched, QUOTA_EXCEEDED past
  // MAX_WATCHED_BANKS; NOT_FOUND to unwatch one it does not watch. Nothing changes on failure.
  Status tryWatchBank(SpaceBank& bank);
  Status tryUnwatchBank(SpaceBank& bank) noexcept;
  const std::vector<SpaceBank*>& watchedBanks() const noexcept { return watched_; }

  // Event buffers use this notification as their doorbell (event_buffer.h links and unlinks).
  void attachBuffer(EventBuffer& buffer);
  void detachBuffer(EventBuffer& buffer) noexcept;
  size_t bufferCount() const noexcept { return buffers_.size(); }
  bool hasBuffer(const EventBuffer& buffer) const noexcept;

  // Checks that every watched bank has this as an observer and every attached buffer points
  // back; aborts on a violation. O(watched banks x their observers + buffers).
  void verifyLinks() const;

 private:
  void teardown() noexcept override;
  void pagesReturned(SpaceBank& bank, uint64_t pages) noexcept override;
  void bankDestroyed(SpaceBank& bank) noexcept override;

  // The bell rings the wake pipe through the kernel's own description of its write end, so its
  // write() of WAKE_BYTES never blocks (EAGAIN means the pipe is full, hence readable).
  Parts parts_;
  std::vector<SpaceBank*> watched_;    // not owned; each has us as an observer
  std::vector<EventBuffer*> buffers_;  // not owned; each points back at us
  uint64_t signals_ = 0;
};

}  // namespace agate::kernel
