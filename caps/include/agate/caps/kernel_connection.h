// KernelConnection: a process's link to agate-kernel, and every syscall as a Promise.
//
// Overview for a newcomer:
//
//   EventLoop loop;
//   auto conn = KernelConnection::tryAttach(loop, resolveKernelHome(), "my-tool");
//   Cap<SpaceBank> bank = *loop.run((*conn)->createBank((*conn)->bank(), 64));   // async
//   Result<Cap<Region>> region = (*conn)->sync().createRegion(bank, 4);          // blocking
//
// Attach (tryAttach) connects to HOME/kernel.sock, sends the process name, and receives the
// process's kernel id, its initial caps (its own bank and a registry cap) and the descriptors of
// its two rings (schemas/kernel.capnp). The kernel learns the pid and uid from the socket's peer
// credentials. Attach blocks the calling thread for at most `timeout`.
//
// Calls. Each call writes one Syscall frame in place into the submission ring and returns a
// Promise completed when the kernel's Completion for it arrives. Calls made in one loop turn are
// batched: the frames are committed deferred and the doorbell rings once, when a flush Task
// posted by the first of them runs (or at flush()). The kernel answers in order; completions are
// read by a pump coroutine that runs while the loop runs (loop.run / co_await). A call that finds
// the submission ring full (or other calls already waiting) queues, FIFO, until a watcher parked
// on the ring's space doorbell sees room; the ring is only ever reserved and committed in one
// synchronous step, so no two reservations are outstanding at once. Refusals come back as Errc
// values (the kernel's error text is kept in lastErrorDetail(): an Error's detail must be static).
// Dropping a call's promise does not cancel the call in the kernel (it has been submitted); its
// completion is read and discarded.
//
// Call ids: (generation << 32) | (slot + 1) into a table of pending calls that grows when every
// slot is busy (the steady state reuses slots and allocates nothing). A completion naming a free
// slot or a stale generation is a kernel protocol error.
//
// Descriptors a completion announces (fdCount) are read from the socket when the completion is
// read: the kernel sends them first (schema, §3). Mapped regions come back as owned mappings
// (MappedRegion), bushel rings as owned descriptors. A packet cut short because this process's
// descriptor table is full (RLIMIT_NOFILE) fails only what it was for: its call with
// OUT_OF_MEMORY (errno EMFILE, "the process's descriptor table is full"), its event delivered
// without the descriptors and with that error (KernelEvent::error); the descriptors that did
// arrive are closed and the connection carries on. The kernel has done the call; repeating it
// once descriptors are free gets them again (a map, bushelRings).
//
// Events (BUSHEL_OPENED / BUSHEL_CLOSED / SERVICE_GONE) arrive as completions with call id 0 and
// queue until nextEvent() takes them.
//
// Calls nobody awaits. A destructor cannot await, yet what it destroys must go: destroyDetached
// and deleteCapDetached write their call at once, or, while the submission ring is full (or
// calls already wait for room), queue it FIFO with the waiting calls and write it when its turn
// comes. Never lost while the connection lives; the answer is read and dropped (refusals are
// counted). A destroy() or deleteCap() whose caller goes while it still waits for room (a
// cancelled close) is not lost either: it stays in its turn as a detached call. A call woken to
// write in its turn keeps it: no later call, detached or not, is written before it, and one that
// finds the ring full again goes back to the front of the queue. A cancelled create:
// CreatedObjects (below) records each cap a create call returns when its completion is read, so
// objects whose caller went mid-call are destroyed too.
//
// Death. When the kernel exits (its pidfd, watched through the completion ring) or breaks the
// protocol, every pending call fails with DISCONNECTED (or PROTOCOL_ERROR), and so does every
// later call. When this process exits, the kernel reclaims everything it held.
//
// Threading: one loop's thread. The KernelConnection must outlive every promise it returned
// (precondition); it is neither copyable nor movable (the pump and the rings point into it).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "agate/caps/cap.h"
#include "agate/caps/mapped_credit_page.h"
#include "agate/caps/mapped_event_buffer.h"
#include "agate/caps/mapped_notification.h"
#include "agate/caps/mapped_region.h"
#include "agate/kernel/credit_page.h"
#include "agate/runtime/channel.h"
#include "agate/runtime/event_loop.h"
#include "agate/runtime/fd.h"
#include "agate/runtime/fd_passing.h"
#include "agate/runtime/message_channel.h"
#include "agate/runtime/promise.h"
#include "agate/runtime/result.h"

namespace agate::caps {

using kernel::BankCredit;

enum class TransferMode : uint8_t { MOVE, COPY };  // see Kernel::tryTransferCap

// What a cap names and allows (inspectCap).
struct CapInfo {
  Koid koid = 0;
  ObjectType type = ObjectType::ANY;
  Rights rights = Rights::NONE;
  uint64_t badge = 0;
};

// A bushel's rings, for its client: [request] the client sends, [reply] the client receives.
struct BushelRings {
  Fd request;
  Fd reply;
  ProcessId server = 0;  // the bushel's server, as the kernel knows it (its RPC peer's identity)
};

// Introspection (the agate CLI).
struct ProcessInfo {
  ProcessId pid = 0;
  int32_t osPid = 0;
  uint32_t uid = 0;
  std::string name;
  Koid bank = 0;
  uint32_t caps = 0;
  // The services it serves, sorted by name: the first few (schemas/kernel.capnp,
  // maxServicesListed) and how many in all.
  std::vector<std::string> services = {};
  uint32_t serviceCount = 0;
};
struct BankInfo {
  Koid koid = 0;
  Koid parent = 0;  // 0 for the system bank
  uint64_t used = 0;
  uint64_t limit = 0;
  uint64_t ownPages = 0;
  uint64_t objects = 0;
  uint32_t caps = 0;
};
struct CapEntry {
  uint64_t handle = 0;
  Koid koid = 0;
  ObjectType type = ObjectType::ANY;
  Rights rights = Rights::NONE;
  uint64_t badge = 0;
  uint64_t parentHandle = 0;  // derivation parent (0: a root) in the CSpace of parentPid
  ProcessId parentPid = 0;
};

// One page of an introspection answer: the entries whose key is >= the cursor asked for, and the
// cursor of the next page (0: this was the last). See schemas/kernel.capnp (listProcessesPage).
template <class T>
struct Page {
  std::vector<T> entries;
  uint64_t nextCursor = 0;
};

enum class EventType : uint16_t {
  BUSHEL_OPENED = 1,
  BUSHEL_CLOSED = 2,
  SERVICE_GONE = 3,
  INTRODUCED = 4,  // `cap`: a connect-only cap to `service`, served by `peer` (introduce())
};
struct KernelEvent {
  EventType type = EventType::BUSHEL_CLOSED;
  Koid bushel = 0;
  Koid service = 0;
  ProcessId peer = 0;
  uint64_t cap = 0;  // INTRODUCED: the handle of a Cap<Service> in this process
  Fd request;        // BUSHEL_OPENED (to a server): the request ring it receives on
  Fd reply;          // ... and the reply ring it sends on
  // OK, or why the descriptors the event carries are missing: OUT_OF_MEMORY (errno EMFILE) when
  // this process's descriptor table was full as they came (the kernel's side is done: a server
  // closes such a bushel, since it cannot serve it).
  Error error;
};

class KernelConnection;

// The objects a sequence of create calls makes for one result, destroyed unless the sequence gets
// as far as keep(): on an error, and when the caller is cancelled mid-call (its coroutine frame,
// which holds this, is destroyed). A create call given the scope records the cap it returns as
// its completion is read, before any caller could lose it, so one still in flight when the scope
// goes is destroyed when it completes. The destroys are detached (never lost), the latest made
// first. Lives on the connection's loop thread; the connection outlives it (precondition).
class CreatedObjects {
 public:
  explicit CreatedObjects(KernelConnection& kernel);
  ~CreatedObjects();
  CreatedObjects(const CreatedObjects&) = delete;
  CreatedObjects& operator=(const CreatedObjects&) = delete;

  // The caller owns what was made, and what calls made with the scope later make.
  void keep() noexcept;
  // Caps recorded so far (completed create calls), oldest first.
  size_t size() const noexcept { return record_->made.size(); }

 private:
  friend class KernelConnection;
  struct Record {
    std::vector<AnyCap> made;
    bool abandoned = false;  // the scope went: later completions destroy what they made
  };
  KernelConnection& kernel_;
  std::shared_ptr<Record> record_;
  bool kept_ = false;
};

namespace detail {
// A notification's part of a completion (wire NotificationInfo).
struct NotificationReply {
  bool present = false;
  uint64_t bytes = 0;
  bool wake = false;
  bool ring = false;
};
// A decoded completion, as the pump hands it to the call that waits for it.
struct Reply {
  uint64_t value = 0;  // handle, count or koid
  CapInfo capInfo;
  BankCredit credit;
  uint64_t bytes = 0;
  bool writable = false;
  uint32_t slots = 0;
  NotificationReply notification;
  uint8_t fdCount = 0;
  Fd fds[MAX_PACKET_FDS];
  std::vector<ProcessInfo> processes;
  std::vector<BankInfo> banks;
  std::vector<CapEntry> caps;
  uint64_t nextCursor = 0;
};
}  // namespace detail

class SyncKernel;

class KernelConnection {
 public:
  // Attaches this process to the kernel serving `home`. DISCONNECTED if none listens there,
  // ATTACH_REFUSED / INVALID_ARGUMENT / PROTOCOL_ERROR as the kernel answered (the Error's
  // detail then carries the kernel's reason, valid until the next refusal on this thread),
  // TIMED_OUT,
  // OUT_OF_MEMORY (errno EMFILE) when the descriptor table cannot take the rings.
  // `completionWait`: how the pump waits for completions while calls are in flight (spin, then
  // park on the ring's doorbell); a latency-bound caller spins longer, a quiet one parks at once.
  // With nothing in flight the pump parks at once (events need no spinning).
  static Result<std::unique_ptr<KernelConnection>> tryAttach(
      EventLoop& loop, const std::string& home, std::string_view name,
      Duration timeout = std::chrono::seconds(5), AsyncWaitPolicy completionWait = {});
  ~KernelConnection();
  KernelConnection(const KernelConnection&) = delete;
  KernelConnection& operator=(const KernelConnection&) = delete;

  ProcessId pid() const noexcept { return pid_; }
  Cap<SpaceBank> bank() const noexcept { return bank_; }
  Cap<Registry> registry() const noexcept { return registry_; }
  pid_t kernelPid() const noexcept { return kernelPid_; }
  EventLoop& loop() const noexcept { return loop_; }

  // --- Caps ---
  // A copy with a subset of the rights (and a badge, if non-zero), derived from `cap`.
  template <class T>
  Promise<Cap<T>> copyCap(Cap<T> cap, Rights rights, uint64_t badge = 0) {
    return castHandle<T>(copyAny(cap, rights, badge));
  }
  Promise<void> deleteCap(AnyCap cap);
  Promise<uint64_t> revokeCap(AnyCap cap);  // how many caps were deleted
  // The cap's handle in process `to` (meaningful only there: send it to that process).
  template <class T>
  Promise<Cap<T>> transferCap(Cap<T> cap, ProcessId to, TransferMode mode) {
    return castHandle<T>(transferAny(cap, to, mode));
  }
  // How many caps other processes may have pushed into this process's CSpace at once (its bank
  // pays their slots): a transfer, introduction or registry grant past it is refused to the
  // sender (QUOTA_EXCEEDED). 0 refuses them all. Returns how many pushed caps it holds now.
  Promise<uint64_t> setReceiveLimit(uint32_t limit);
  Promise<CapInfo> inspectCap(AnyCap cap);
  Promise<void> destroy(AnyCap cap);
  // destroy / deleteCap with no caller to tell: written now or queued until the submission ring
  // has room, never lost while the connection lives (see the overview). Nothing once it died.
  void destroyDetached(AnyCap cap) noexcept;
  void deleteCapDetached(AnyCap cap) noexcept;

  // --- Banks (limits and usage in pages) ---
  Promise<Cap<SpaceBank>> createBank(Cap<SpaceBank> parent, uint64_t limit);
  Promise<void> setBankLimit(Cap<SpaceBank> bank, uint64_t limit);
  Promise<BankCredit> readBank(Cap<SpaceBank> bank);

  // --- Regions ---
  Promise<Cap<Region>> createRegion(Cap<SpaceBank> bank, uint64_t pages);
  Promise<MappedRegion> mapRegion(Cap<Region> region, bool writable);

  // --- Bank credit pages and refund notifications ---
  // The bank's credit page, mapped read-only (needs READ; the first map charges one page to the
  // bank). Read it with MappedCreditPage::tryRead, no kernel call.
  Promise<MappedCreditPage> mapBankCredit(Cap<SpaceBank> bank);
  // The kernel rings `notification` (needs WRITE) whenever pages come back to `bank` (needs READ)
  // or below it, and when it is destroyed. ALREADY_EXISTS if bound; QUOTA_EXCEEDED past 64 banks.
  Promise<void> bindBankNotification(Cap<SpaceBank> bank, Cap<Notification> notification);
  Promise<void> unbindBankNotification(Cap<SpaceBank> bank, Cap<Notification> notification);

  // --- Notifications ---
  // Charged to `bank` (needs ALLOCATE): its doorbell page, its record, and with `wakeFd` a wake
  // pipe for loops that wait on descriptors. `into`: recorded there (see CreatedObjects).
  Promise<Cap<Notification>> createNotification(Cap<SpaceBank> bank, bool wakeFd,
                                                CreatedObjects* into = nullptr);
  // The doorbell page mapped, with the wake descriptor (READ) and its ring end (WRITE).
  Promise<MappedNotification> mapNotification(Cap<Notification> notification);
  // The kernel rings it (needs WRITE).
  Promise<void> signal(Cap<Notification> notification);

  // --- Event buffers ---
  // `slots` 64-byte slots (1..65536) charged to `bank` (needs ALLOCATE), rung through
  // `notification` (needs WRITE). The creator's cap has every right. `into`: as above.
  Promise<Cap<EventBuffer>> createEventBuffer(Cap<SpaceBank> bank, uint32_t slots,
                                              Cap<Notification> notification,
                                              CreatedObjects* into = nullptr);
  // The writer's view (`writable`, needs READ|WRITE; before any reader maps) or a reader's
  // read-only view (READ), each with the notification (the writer gets its ring end).
  Promise<MappedEventBuffer> mapEventBuffer(Cap<EventBuffer> buffer, bool writable);

  // --- Registry and bushels ---
  Promise<Cap<Registry>> grantRegistry(Cap<Registry> registry, ProcessId to, Rights rights);
  Promise<Cap<Service>> registerService(Cap<Registry> registry, std::string_view name,
                                        Cap<SpaceBank> bank);
  Promise<Koid> lookupService(Cap<Registry> registry, std::string_view name);
  Promise<Cap<Bushel>> openBushel(Cap<Registry> registry, std::string_view name,
                                  Cap<SpaceBank> bank);
  Promise<BushelRings> bushelRings(Cap<Bushel> bushel);
  // Gives process `to` a connect-only cap to the service of `bushel` (needs GRANT on it); `to`
  // gets an INTRODUCED event naming it. Returns the cap's handle in `to` (meaningful there only).
  // Kernel::tryIntroduce has the rules (idempotent, revocable by the service's server).
  Promise<Cap<Service>> introduce(Cap<Bushel> bushel, ProcessId to);
  // Opens a bushel to the service `service` names (needs READ; an introduction's cap), paid
  // from `bank`, as openBushel does by name.
  Promise<Cap<Bushel>> openBushelVia(Cap<Service> service, Cap<SpaceBank> bank);
  // A server grows the client-paid state allowance of its bushel `bushel` (the koid of a
  // BUSHEL_OPENED event) by `pages`; returns the bushel's state pages (Kernel::tryGrowBushelState).
  Promise<uint64_t> growBushelState(Cap<Service> service, Koid bushel, uint64_t pages);
  // A server closes its bushel `bushel` (a koid, as above): the client is disconnected, both
  // sides get BUSHEL_CLOSED, the rings and state pages go back to the client's bank. NOT_FOUND
  // if the bushel is not (or no longer) the service's (Kernel::tryCloseBushel).
  Promise<void> closeBushel(Cap<Service> service, Koid bushel);

  // --- Introspection ---
  // Everything, fetched page by page (as many entries per page as fit in a completion frame).
  // Entries that come and go while the pages are fetched may or may not be listed; none twice.
  Promise<std::vector<ProcessInfo>> listProcesses();
  Promise<std::vector<BankInfo>> listBanks();  // parents before children (koid order)
  Promise<std::vector<CapEntry>> listCaps(ProcessId pid);
  // One page from `cursor` (0: the start), at most `limit` entries (0: as many as fit).
  Promise<Page<ProcessInfo>> listProcessesPage(uint64_t cursor, uint32_t limit = 0);
  Promise<Page<BankInfo>> listBanksPage(uint64_t cursor, uint32_t limit = 0);
  Promise<Page<CapEntry>> listCapsPage(ProcessId pid, uint64_t cursor, uint32_t limit = 0);

  // --- Events ---
  // The next kernel event (queued ones first). One waiter at a time (precondition); dropping
  // the promise (e.g. under loop.deadline) loses no event: it stays queued for the next call.
  Promise<KernelEvent> nextEvent();

  // Rings the submission doorbell now for calls committed in this turn (normally done by a Task
  // at the end of the turn).
  void flush() noexcept;
  // Blocking wrappers for tools; not for use inside the loop's own coroutines.
  SyncKernel sync() noexcept;

  // The kernel's text for the last refused call, for people.
  const std::string& lastErrorDetail() const noexcept { return lastErrorDetail_; }
  // Completions with call id 0 and an error: frames the kernel could not read (never sent by
  // this library; tests that write raw frames count them).
  uint64_t unreadableFrameErrors() const noexcept { return unreadableFrameErrors_; }
  // Errc::OK while connected; the reason otherwise.
  Errc state() const noexcept { return dead_.code; }
  // Calls written to the submission ring so far (detached ones included), calls waiting for
  // room in it (detached ones included), and detached calls the kernel refused: for tests and
  // diagnostics.
  uint64_t callsSubmitted() const noexcept { return submitted_; }
  size_t callsQueued() const noexcept { return spaceWaiters_.size(); }
  uint64_t detachedCallsRefused() const noexcept { return detachedRefused_; }
  // The submission ring's sender, for tests that write raw frames (malformed ones included).
  Sender& rawSubmissionSender() noexcept { return tx_->sender(); }

 private:
  explicit KernelConnection(EventLoop& loop) noexcept;

  struct PendingCall {
    std::optional<Fulfiller<detail::Reply>> fulfiller;  // none for a detached call
    std::shared_ptr<CreatedObjects::Record> made;       // records the handle it returns
    uint32_t expect = 0;                                // wire::Completion::Which of the result arm
    uint32_t generation = 1;
    bool busy = false;
    bool detached = false;  // nobody awaits it: its answer is dropped
  };
  enum class DetachedCall : uint8_t { DESTROY, DELETE_CAP };
  // One entry of the FIFO of calls waiting for room in the submission ring: a call's coroutine
  // (woken to reserve), or a detached call (written by the watcher itself).
  struct QueuedCall {
    std::optional<Fulfiller<void>> waiter;
    DetachedCall detached = DetachedCall::DESTROY;
    AnyCap cap;
    uint64_t ticket = 0;  // a waiter's, so the call can find its entry if it is dropped
  };

  class FlushTask final : public Task {
   public:
    explicit FlushTask(KernelConnection& c) noexcept : connection_(c) {}

   private:
    void run() noexcept override;
    KernelConnection& connection_;
  };
  // Restarts a pump that parked while no call was in flight, so that it spins (completionWait_)
  // for the calls just made. Posted, never run inside a call: the spin happens in the loop's
  // turn, after the flush.
  class RestartPumpTask final : public Task {
   public:
    explicit RestartPumpTask(KernelConnection& c) noexcept : connection_(c) {}

   private:
    void run() noexcept override;
    KernelConnection& connection_;
  };

  template <class T>
  static Promise<Cap<T>> castHandle(Promise<uint64_t> p) {
    Result<uint64_t> r = co_await p;
    if (!r) co_return r.error();
    co_return Cap<T>{*r};
  }
  Promise<uint64_t> copyAny(AnyCap cap, Rights rights, uint64_t badge);
  Promise<uint64_t> transferAny(AnyCap cap, ProcessId to, TransferMode mode);
  // Fetches every page of one listing; `fetch(cursor)` asks for one page.
  template <class T, class Fetch>
  static Promise<std::vector<T>> collectPages(Fetch fetch);

  // What a destroy or deleteCap dropped while it waits for room becomes: the same call, detached.
  struct IfDropped {
    DetachedCall call;
    AnyCap cap;
  };
  // Writes one Syscall (filled by `fill`) and awaits its completion with result arm `expect`.
  // `into`: the handle it returns is recorded there (CreatedObjects). `ifDropped`: a call that
  // must go even if its caller goes first (a destroy: a cancelled close() must not leave its
  // objects alive): dropped before it was written, it is queued detached (callDetached).
  template <class Fill>
  Promise<detail::Reply> submit(uint32_t expect, size_t maxBytes, Fill fill,
                                CreatedObjects* into = nullptr,
                                std::optional<IfDropped> ifDropped = std::nullopt);
  // Whether a new call must queue behind others: calls wait for room, or calls woken to write
  // have not written yet (so a new call, detached or not, never overtakes them).
  bool mustQueue() const noexcept { return !spaceWaiters_.empty() || wokenToWrite_ > 0; }
  // Reserves, builds and commits one Syscall in one synchronous step: the call's slot, or
  // WOULD_BLOCK (the ring is full: nothing written), MESSAGE_TOO_LARGE, or the ring's error (the
  // connection is then disconnected).
  template <class Fill>
  Result<uint32_t> tryWrite(uint32_t expect, size_t maxBytes, Fill fill);
  Result<uint32_t> tryWriteDetached(DetachedCall call, AnyCap cap);
  void callDetached(DetachedCall call, AnyCap cap) noexcept;
  // A destroy or deleteCap dropped before it was written (submit's guard): its queue entry
  // (`ticket`) becomes the detached call in place; woken and not yet written, it goes back to
  // the front of the queue; else it is called detached.
  void dropWaiting(uint64_t ticket, IfDropped call) noexcept;
  // Starts watchSpace unless it runs.
  void watchSpaceIfIdle();
  // Waits (FIFO) until the submission ring may have room; see watchSpace. `again`: a call woken
  // in its turn that found the ring full once more keeps its turn, ahead of the calls that
  // queued behind it.
  Promise<void> awaitSpace(bool again = false);
  // Runs while calls wait for ring space: parks on the ring's space doorbell, then wakes a batch
  // of waiters and yields so they can reserve before it looks again.
  Promise<void> watchSpace();
  bool ringHasRoom() noexcept;
  uint32_t allocateCall();
  void freeCall(uint32_t index) noexcept;
  void scheduleFlush() noexcept;
  Promise<void> pump();
  template <class Reader>
  Status complete(Reader completion);
  void disconnect(Error e) noexcept;

  EventLoop& loop_;
  Fd socket_;
  std::unique_ptr<Channel> submissionRing_;
  std::unique_ptr<Channel> completionRing_;
  std::unique_ptr<MessageSender> tx_;
  std::unique_ptr<MessageReceiver> rx_;
  ProcessId pid_ = 0;
  Cap<SpaceBank> bank_;
  Cap<Registry> registry_;
  pid_t kernelPid_ = 0;
  AsyncWaitPolicy completionWait_;
  std::vector<PendingCall> calls_;
  std::vector<uint32_t> freeCalls_;
  std::deque<QueuedCall> spaceWaiters_;      // calls that found the submission ring full
  std::optional<Promise<void>> spaceWatch_;  // watchSpace(), while spaceWaiters_ is not empty
  // Calls watchSpace woke in its current batch (until it looks again), and how many of them went
  // back to the queue's front (they keep their order there).
  uint32_t wokenToWrite_ = 0;
  uint32_t requeuedAhead_ = 0;
  uint64_t nextTicket_ = 1;
  std::deque<KernelEvent> events_;
  std::optional<Fulfiller<KernelEvent>> eventWaiter_;
  Error dead_;  // code OK while connected
  std::string lastErrorDetail_;
  uint64_t unreadableFrameErrors_ = 0;
  uint32_t inFlight_ = 0;  // calls submitted and not completed
  uint64_t submitted_ = 0;
  uint64_t detachedRefused_ = 0;
  bool pumpIdle_ = false;  // the pump parked without spinning: nothing was in flight
  FlushTask flushTask_{*this};
  RestartPumpTask restartPumpTask_{*this};
  // Last: destroyed first, so the pump stops before anything it uses goes.
  std::optional<Promise<void>> pump_;
};

// Blocking forms of every call: each runs the loop until the call completes. For tools and tests
// at top level; never from inside a coroutine on the same loop (the loop is not re-entrant).
class SyncKernel {
 public:
  explicit SyncKernel(KernelConnection& c) noexcept : c_(c) {}

  template <class T>
  Result<Cap<T>> copyCap(Cap<T> cap, Rights rights, uint64_t badge = 0) {
    return run(c_.copyCap(cap, rights, badge));
  }
  Status deleteCap(AnyCap cap) { return run(c_.deleteCap(cap)); }
  Result<uint64_t> revokeCap(AnyCap cap) { return run(c_.revokeCap(cap)); }
  template <class T>
  Result<Cap<T>> transferCap(Cap<T> cap, ProcessId to, TransferMode mode) {
    return run(c_.transferCap(cap, to, mode));
  }
  Result<uint64_t> setReceiveLimit(uint32_t limit) { return run(c_.setReceiveLimit(limit)); }
  Result<CapInfo> inspectCap(AnyCap cap) { return run(c_.inspectCap(cap)); }
  Status destroy(AnyCap cap) { return run(c_.destroy(cap)); }
  Result<Cap<SpaceBank>> createBank(Cap<SpaceBank> parent, uint64_t limit) {
    return run(c_.createBank(parent, limit));
  }
  Status setBankLimit(Cap<SpaceBank> bank, uint64_t limit) {
    return run(c_.setBankLimit(bank, limit));
  }
  Result<BankCredit> readBank(Cap<SpaceBank> bank) { return run(c_.readBank(bank)); }
  Result<Cap<Region>> createRegion(Cap<SpaceBank> bank, uint64_t pages) {
    return run(c_.createRegion(bank, pages));
  }
  Result<MappedRegion> mapRegion(Cap<Region> region, bool writable) {
    return run(c_.mapRegion(region, writable));
  }
  Result<MappedCreditPage> mapBankCredit(Cap<SpaceBank> bank) {
    return run(c_.mapBankCredit(bank));
  }
  Status bindBankNotification(Cap<SpaceBank> bank, Cap<Notification> notification) {
    return run(c_.bindBankNotification(bank, notification));
  }
  Status unbindBankNotification(Cap<SpaceBank> bank, Cap<Notification> notification) {
    return run(c_.unbindBankNotification(bank, notification));
  }
  Result<Cap<Notification>> createNotification(Cap<SpaceBank> bank, bool wakeFd) {
    return run(c_.createNotification(bank, wakeFd));
  }
  Result<MappedNotification> mapNotification(Cap<Notification> notification) {
    return run(c_.mapNotification(notification));
  }
  Status signal(Cap<Notification> notification) { return run(c_.signal(notification)); }
  Result<Cap<EventBuffer>> createEventBuffer(Cap<SpaceBank> bank, uint32_t slots,
                                             Cap<Notification> notification) {
    return run(c_.createEventBuffer(bank, slots, notification));
  }
  Result<MappedEventBuffer> mapEventBuffer(Cap<EventBuffer> buffer, bool writable) {
    return run(c_.mapEventBuffer(buffer, writable));
  }
  Result<Cap<Registry>> grantRegistry(Cap<Registry> registry, ProcessId to, Rights rights) {
    return run(c_.grantRegistry(registry, to, rights));
  }
  Result<Cap<Service>> registerService(Cap<Registry> registry, std::string_view name,
                                       Cap<SpaceBank> bank) {
    return run(c_.registerService(registry, name, bank));
  }
  Result<Koid> lookupService(Cap<Registry> registry, std::string_view name) {
    return run(c_.lookupService(registry, name));
  }
  Result<Cap<Service>> introduce(Cap<Bushel> bushel, ProcessId to) {
    return run(c_.introduce(bushel, to));
  }
  Result<Cap<Bushel>> openBushelVia(Cap<Service> service, Cap<SpaceBank> bank) {
    return run(c_.openBushelVia(service, bank));
  }
  Result<Cap<Bushel>> openBushel(Cap<Registry> registry, std::string_view name,
                                 Cap<SpaceBank> bank) {
    return run(c_.openBushel(registry, name, bank));
  }
  Result<BushelRings> bushelRings(Cap<Bushel> bushel) { return run(c_.bushelRings(bushel)); }
  Result<uint64_t> growBushelState(Cap<Service> service, Koid bushel, uint64_t pages) {
    return run(c_.growBushelState(service, bushel, pages));
  }
  Status closeBushel(Cap<Service> service, Koid bushel) {
    return run(c_.closeBushel(service, bushel));
  }
  Result<std::vector<ProcessInfo>> listProcesses() { return run(c_.listProcesses()); }
  Result<std::vector<BankInfo>> listBanks() { return run(c_.listBanks()); }
  Result<std::vector<CapEntry>> listCaps(ProcessId pid) { return run(c_.listCaps(pid)); }
  Result<Page<ProcessInfo>> listProcessesPage(uint64_t cursor, uint32_t limit = 0) {
    return run(c_.listProcessesPage(cursor, limit));
  }
  Result<Page<BankInfo>> listBanksPage(uint64_t cursor, uint32_t limit = 0) {
    return run(c_.listBanksPage(cursor, limit));
  }
  Result<Page<CapEntry>> listCapsPage(ProcessId pid, uint64_t cursor, uint32_t limit = 0) {
    return run(c_.listCapsPage(pid, cursor, limit));
  }
  Result<KernelEvent> nextEvent() { return run(c_.nextEvent()); }

 private:
  template <class T>
  Result<T> run(Promise<T> p) {
    c_.flush();
    return c_.loop().run(std::move(p));
  }
  KernelConnection& c_;
};

inline SyncKernel KernelConnection::sync() noexcept { return SyncKernel(*this); }

}  // namespace agate::caps
