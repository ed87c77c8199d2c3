// Kernel: the trusted object model of agate-kernel, as a pure single-threaded library.
//
// Overview for a newcomer. The daemon (agate-kernel) owns one Kernel. It decodes each syscall
// frame a process writes into its ring and calls one `try*` method here with the caller's
// ProcessId and the decoded arguments; the method checks everything first (handles, types,
// rights, quotas — "decode") and only then changes state ("invoke"), so every failure returns a
// clear Errc and leaves the whole kernel exactly as it was. Nothing here does I/O, takes a lock
// or spawns a thread.
//
// The objects (each its own header):
//  * SpaceBank (space_bank.h): page quotas in a tree; every object is allocated from one and
//    dies with it. The system bank is the root and holds every page the kernel may hand out.
//  * CSpace (cspace.h): a process's caps, named by generation-checked handles; derivation tree
//    for revoke.
//  * Region (region.h): page-granular shared memory, a sealed memfd; read-only caps stay
//    read-only (the write-seal mechanism is explained there).
//  * Registry, Service (registry.h): the name service.
//  * Bushel (bushel.h): a client's two SHARED rings to a service.
//  * Notification (notification.h): a doorbell word in a shared page, and a wake descriptor.
//  * EventBuffer (event_buffer.h, event_slot.h): coalescing seqlocked slots, server-written,
//    client-read, with a notification.
//  * Process (process.h): a CSpace plus the bank the process owns.
//
// What dies when. Bushels die when the last cap to them is deleted (the Kernel queues them as
// the cap goes and destroys them once the call's state is final), with their bank or their
// service, and when their server closes them (tryCloseBushel). Banks, regions, services,
// notifications and event buffers live until destroyed (DESTROY) or until their bank goes; deleting
// their last cap leaves them charged to their bank (KeyKOS: the bank owner reclaims them by
// destroying the bank). The registry lives as long as the Kernel.
//
// Events (kernel_event.h): BUSHEL_OPENED / BUSHEL_CLOSED / SERVICE_GONE are queued per process;
// the daemon drains them with takeEvents(pid) after each call.
//
// Death: tryKillProcess() first destroys every service the process serves, whichever bank paid
// for it (its name is free at once, its clients get SERVICE_GONE and BUSHEL_CLOSED, its pages go
// back to that bank), then the process bank: the CSpace (so every cap the process held, with
// derived caps handed to their parents), every object allocated from the process bank or its
// descendants (so every cap to them, in every other process), and refunds it all to the system
// bank. Other objects the process allocated from banks it was given by others survive: they
// belong to those banks (KeyKOS semantics).
//
// Threading: one thread. Observers (space_bank.h) are called synchronously and must not call
// back in.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "agate/kernel/bushel.h"
#include "agate/kernel/credit_page.h"
#include "agate/kernel/cspace.h"
#include "agate/kernel/event_buffer.h"
#include "agate/kernel/kernel_event.h"
#include "agate/kernel/notification.h"
#include "agate/kernel/object.h"
#include "agate/kernel/process.h"
#include "agate/kernel/region.h"
#include "agate/kernel/registry.h"
#include "agate/kernel/rights.h"
#include "agate/kernel/space_bank.h"
#include "agate/runtime/result.h"

namespace agate::kernel {

// Stable values: they travel in syscall frames.
enum class TransferMode : uint8_t {
  MOVE = 0,  // the cap leaves the sender's CSpace and keeps its place in the derivation tree
  COPY = 1,  // the receiver gets a cap derived from the sender's
};

struct Attached {
  ProcessId pid = 0;
  Handle bank;  // the process bank, with Kernel::PROCESS_BANK rights
};

// What a cap names and allows; no right is needed to ask about one's own cap.
struct CapInfo {
  Koid koid = 0;
  ObjectType type = ObjectType::ANY;
  Rights rights = Rights::NONE;
  uint64_t badge = 0;
  friend bool operator==(const CapInfo&, const CapInfo&) = default;
};

// Every observable piece of kernel state, for the CLI and for tests asserting that a failed call
// changed nothing.
struct KernelSnapshot {
  struct Bank {
    Koid koid = 0;
    Koid parent = 0;  // 0 for the system bank
    uint64_t used = 0;
    uint64_t limit = 0;
    uint64_t ownPages = 0;
    uint64_t objects = 0;
    uint32_t caps = 0;
    uint32_t observers = 0;     // BankObservers, i.e. notifications watching it
    bool creditMemory = false;  // its credit page is kernel memory holders may map
    friend bool operator==(const Bank&, const Bank&) = default;
  };
  struct Cap {
    uint64_t handle = 0;
    Koid koid = 0;
    Rights rights = Rights::NONE;
    uint64_t badge = 0;
    uint64_t parentHandle = 0;  // derivation parent's handle (0: root) ...
    ProcessId parentPid = 0;    // ... in this process's CSpace
    friend bool operator==(const Cap&, const Cap&) = default;
  };
  struct Proc {
    ProcessId pid = 0;
    Koid bank = 0;
    uint32_t capacity = 0;
    uint32_t received = 0;      // caps other processes pushed in, held now (cspace.h) ...
    uint32_t receiveLimit = 0;  // ... and the most it accepts
    std::vector<Cap> caps;      // in slot order
    friend bool operator==(const Proc&, const Proc&) = default;
  };
  std::vector<Bank> banks;            // every bank, parents before children
  std::vector<Proc> processes;        // by pid
  uint64_t objects = 0;               // every object but the system bank
  std::vector<std::string> services;  // registered names, sorted
  uint64_t pendingEvents = 0;         // queued for all processes
  friend bool operator==(const KernelSnapshot&, const KernelSnapshot&) = default;
};

// One page of an introspection listing (Kernel::listProcesses and the like): the entries whose
// key is at least the cursor, in key order, at most the limit, and whether any entry follows.
template <class T>
struct Listing {
  std::vector<T> entries;
  bool more = false;
};

struct ProcessSummary {
  ProcessId pid = 0;
  Koid bank = 0;      // the process bank
  uint32_t caps = 0;  // held in its CSpace
  // The services it serves (registered and alive), sorted by name: the first
  // SERVICES_LISTED of them, and how many in all.
  std::vector<std::string> services;
  uint32_t serviceCount = 0;
  static constexpr size_t SERVICES_LISTED = 8;
};

struct CapSummary {
  KernelSnapshot::Cap cap;
  ObjectType type = ObjectType::ANY;
};

class Kernel final : private LifecycleObserver {
 public:
  // Rights of the cap a process gets to its own bank.
  static constexpr Rights PROCESS_BANK = Rights::ALL & ~(Rights::DESTROY | Rights::SET_LIMIT);
  // Rights of the cap to an object the caller just created.
  static constexpr Rights CREATOR = Rights::ALL;
  // Caps others may push into a new process before it says otherwise: 32 chunk pages at most.
  static constexpr uint32_t DEFAULT_RECEIVE_LIMIT = 1024;

  struct Options {
    uint64_t systemPages = 1u << 20;       // the system bank's limit
    uint32_t maxGeneration = UINT32_MAX;   // per slot; lowered by tests only
    uint64_t bushelRingBytes = 16 * 1024;  // data area of each bushel ring (power of two)
    // Each new process's receive limit: how many caps other processes may have pushed into its
    // CSpace at once (cspace.h); the process changes it with trySetReceiveLimit.
    uint32_t receiveLimit = DEFAULT_RECEIVE_LIMIT;
  };

  explicit Kernel(Options options);
  Kernel() : Kernel(Options{}) {}
  // Kills every process still attached.
  ~Kernel();
  Kernel(const Kernel&) = delete;
  Kernel& operator=(const Kernel&) = delete;

  // --- Processes (called by the daemon on attach and on hang-up / pidfd) ---

  // A new process with a bank of `bankLimit` pages carved from the system bank, a CSpace paid
  // from it, and a cap to the bank. QUOTA_EXCEEDED if the system bank (or bankLimit) cannot pay
  // for the bank record, the CSpace record and its first slot chunk.
  Result<Attached> tryAttachProcess(uint64_t bankLimit);
  // Death (any cause): see the overview (its services end, then its bank). NOT_FOUND if `pid`
  // is not attached.
  Status tryKillProcess(ProcessId pid);

  // --- Syscalls: `pid` is the caller; handles are in its CSpace ---

  // A copy of a cap with a subset of its rights (PERMISSION_DENIED if `rights` adds any) and,
  // if `badge` != 0, that badge (PERMISSION_DENIED if the cap already has another: a badge is
  // set once). Derived from the source: revoking the source deletes it.
  Result<Handle> tryCopyCap(ProcessId pid, Handle cap, Rights rights, uint64_t badge = 0);
  // Deletes a cap; caps derived from it are handed to its parent. The object stays (it belongs
  // to its bank), except a bushel whose last cap this was: it is torn down (see the overview).
  Status tryDeleteCap(ProcessId pid, Handle cap);
  // Deletes every cap derived from `cap`, transitively, in every CSpace; returns how many.
  Result<uint64_t> tryRevokeCap(ProcessId pid, Handle cap);
  // Moves or copies a cap into process `to`'s CSpace (needs GRANT; NOT_FOUND if `to` is not
  // attached; QUOTA_EXCEEDED if `to`'s CSpace cannot grow or, for another process, already
  // holds as many pushed caps as its receive limit allows). Returns the handle in `to`.
  Result<Handle> tryTransferCap(ProcessId pid, Handle cap, ProcessId to, TransferMode mode);
  // Sets how many caps other processes may have pushed into the caller's CSpace at once
  // (transfers, introductions, passed registry caps; cspace.h "Received caps"). Any value up to
  // CSpace::MAX_SLOTS (INVALID_ARGUMENT above), also below what it holds now: that refuses new
  // pushes and deletes nothing. Returns how many pushed caps the caller holds now.
  Result<uint32_t> trySetReceiveLimit(ProcessId pid, uint32_t limit);
  Result<CapInfo> tryInspectCap(ProcessId pid, Handle cap) const;

  // A child of `bank` (needs CREATE_CHILD) with `limit` (may exceed what `bank` has left).
  Result<Handle> tryCreateBank(ProcessId pid, Handle bank, uint64_t limit);
  // A region of `pages` (1..Region::MAX_PAGES) charged to `bank` (needs ALLOCATE): a memfd
  // sealed against grow and shrink. SYSTEM_ERROR if the memfd cannot be made.
  Result<Handle> tryCreateRegion(ProcessId pid, Handle bank, uint64_t pages);
  // Needs SET_LIMIT; INVALID_ARGUMENT if below the bank's used.
  Status trySetBankLimit(ProcessId pid, Handle bank, uint64_t limit);
  // Needs READ.
  Result<BankCredit> tryReadBank(ProcessId pid, Handle bank) const;
  // A descriptor to map a region (needs READ, and WRITE for `writable`). The first read-only map
  // write-seals the region for good; a writable map after that is PERMISSION_DENIED (see
  // region.h for the guarantee and its limits). SYSTEM_ERROR if no descriptor can be made.
  Result<RegionMapping> tryMapRegion(ProcessId pid, Handle region, bool writable);

  // Registers `name` (Registry::checkName: INVALID_ARGUMENT; taken: ALREADY_EXISTS) for the
  // caller as server; needs WRITE on `registry` and ALLOCATE on `bank`, which pays for the
  // Service record. Returns the caller's cap to the Service (DESTROY on it unregisters).
  Result<Handle> tryRegisterService(ProcessId pid, Handle registry, std::string_view name,
                                    Handle bank);
  // The koid of the service registered as `name` (needs READ on `registry`; NOT_FOUND).
  Result<Koid> tryLookupService(ProcessId pid, Handle registry, std::string_view name) const;
  // Opens a bushel from the caller (client) to the service `name` (needs READ on `registry`,
  // ALLOCATE on `bank`, which pays the record and both rings' pages). Returns the client's cap;
  // the server gets BUSHEL_OPENED with its ring descriptors.
  Result<Handle> tryOpenBushel(ProcessId pid, Handle registry, std::string_view name, Handle bank);
  // The client's ring descriptors for a bushel (needs READ): [0] request (the client sends),
  // [1] reply (the client receives). SYSTEM_ERROR if they cannot be duplicated.
  Result<std::vector<Fd>> tryBushelFds(ProcessId pid, Handle bushel) const;
  // The server of the caller's bushel (needs READ), for the client's RPC peer identity.
  Result<ProcessId> tryBushelServer(ProcessId pid, Handle bushel) const;
  // Three-party introduction: process `to` gets a connect-only cap (READ, no GRANT: it cannot
  // pass it on) to the service of the caller's bushel `bushel` (needs GRANT on it), and an
  // INTRODUCED event naming the cap and the service's server. The cap is derived from the
  // server's registration cap (when the server still holds it), so the server's revoke on its
  // Service cap withdraws every introduction; the service's end deletes them all. Idempotent:
  // while `to` holds a READ-only cap to the service, that handle comes back and nothing is
  // queued, so an introducer cannot flood `to`'s CSpace or event queue. `to`'s bank pays the
  // slot (as for a transfer). Errors: INVALID_HANDLE / WRONG_TYPE / PERMISSION_DENIED for the
  // bushel, NOT_FOUND for `to`, INVALID_ARGUMENT when `to` is the service's server,
  // DISCONNECTED when the service has gone, QUOTA_EXCEEDED for `to`'s slot or its receive
  // limit (a new introduction counts as a pushed cap).
  Result<Handle> tryIntroduce(ProcessId pid, Handle bushel, ProcessId to);
  // As tryOpenBushel, to the service `service` names (needs READ on that Service cap) instead
  // of a name.
  Result<Handle> tryOpenBushelVia(ProcessId pid, Handle service, Handle bank);
  // The server of service `service` (needs WRITE) grows the state allowance of its bushel
  // `bushel` (a koid: the server holds no cap to it) by `pages` (1..Bushel::MAX_STATE_GROWTH,
  // else INVALID_ARGUMENT), charged to the bank that paid for the bushel (QUOTA_EXCEEDED if it or
  // an ancestor cannot pay; nothing changed). NOT_FOUND if the bushel is not the service's.
  // Returns the bushel's state pages after the call.
  Result<uint64_t> tryGrowBushelState(ProcessId pid, Handle service, Koid bushel, uint64_t pages);
  // The server of service `service` (needs WRITE) closes its bushel `bushel` (a koid), e.g. a
  // client that broke the protocol: the bushel is destroyed exactly as when its client deletes
  // its last cap (the client's caps to it go, the kernel closes and unmaps its rings, both sides
  // get BUSHEL_CLOSED, the rings and state pages are refunded to the bank that paid). The
  // processes' own mappings stay, so the server must also mark its rings closed for the client
  // to stop waiting (client/: ServiceHost). NOT_FOUND if the bushel is not (or no longer) the
  // service's, so a second close is NOT_FOUND and changes nothing.
  Status tryCloseBushel(ProcessId pid, Handle service, Koid bushel);

  // A read-only descriptor of the bank's credit page (needs READ): one page holding a
  // BankCreditPage (credit_page.h) the kernel republishes at every change of used/limit, and a
  // last time with `destroyed` set; read it with tryReadCredit, no kernel call. The first call
  // backs the page with a sealed memfd charged one page to the bank itself (QUOTA_EXCEEDED if the
  // bank or an ancestor cannot pay); holders can never map it writable (F_SEAL_FUTURE_WRITE,
  // sealed_memory.h). SYSTEM_ERROR if no memfd or descriptor can be made.
  Result<Fd> tryMapBankCredit(ProcessId pid, Handle bank);

  // A notification charged to `bank` (needs ALLOCATE): one page for its doorbell word plus its
  // record; `wantWakeFd` adds a wake pipe (notification.h says why not an eventfd) and the page
  // of its buffer. Returns the creator's cap. SYSTEM_ERROR if the page or pipe cannot be made.
  Result<Handle> tryCreateNotification(ProcessId pid, Handle bank, bool wantWakeFd);
  // Descriptors to wait on a notification (needs READ); with WRITE also its ring end.
  Result<NotificationFds> tryNotificationFds(ProcessId pid, Handle notification) const;
  // The kernel rings the notification (needs WRITE).
  Status trySignal(ProcessId pid, Handle notification);
  // The kernel rings `notification` (needs WRITE) whenever pages come back to `bank` (needs READ)
  // or below it, and when the bank is destroyed. ALREADY_EXISTS if bound already; QUOTA_EXCEEDED
  // past Notification::MAX_WATCHED_BANKS banks per notification.
  Status tryBindBankNotification(ProcessId pid, Handle bank, Handle notification);
  // Undoes a bind (the same rights); NOT_FOUND if they are not bound.
  Status tryUnbindBankNotification(ProcessId pid, Handle bank, Handle notification);

  // An event buffer of `slots` slots (1..EventBuffer::MAX_SLOTS) charged to `bank` (needs
  // ALLOCATE), whose writers ring `notification` (needs WRITE). Returns the creator's cap
  // (ALL rights: it maps the writable view, then hands out READ copies). SYSTEM_ERROR if the
  // memfd cannot be made.
  Result<Handle> tryCreateEventBuffer(ProcessId pid, Handle bank, uint32_t slots,
                                      Handle notification);
  // Descriptors to use an event buffer: `writable` needs READ|WRITE, else READ. Writers first,
  // as for regions (event_buffer.h); PERMISSION_DENIED for a writable map after the first
  // read-only one.
  Result<EventBufferMapping> tryMapEventBuffer(ProcessId pid, Handle buffer, bool writable);

  // Destroys the object (needs DESTROY): every cap to it goes; a bank takes everything allocated
  // from it and from its descendants along. Pages go back to the object's bank.
  Status tryDestroyObject(ProcessId pid, Handle cap);

  // --- Trusted access for the daemon (credit pages, observers, events) and the CLI ---

  // Gives process `pid` a cap to the registry with `rights` (the daemon does it for the
  // processes it trusts to name services, e.g. init). NOT_FOUND, INVALID_ARGUMENT for undefined
  // rights, QUOTA_EXCEEDED if the CSpace cannot grow. The registry's koid is 0: it is the
  // kernel's own object, charged to no bank.
  Result<Handle> tryGrantRegistry(ProcessId pid, Rights rights);
  // The grantRegistry syscall: process `pid` passes a registry cap with `rights` to process `to`
  // (itself included). Needs a registry cap (WRONG_TYPE) holding GRANT and every right passed
  // (PERMISSION_DENIED); INVALID_ARGUMENT for undefined rights, NOT_FOUND for `to`,
  // QUOTA_EXCEEDED if `to`'s CSpace cannot grow or is at its receive limit (for another
  // process, the new cap counts as pushed). The new cap is a root, as tryGrantRegistry's.
  Result<Handle> tryPassRegistry(ProcessId pid, Handle registry, ProcessId to, Rights rights);
  // Takes every event queued for `pid`, oldest first (empty if none or not attached).
  std::vector<KernelEvent> takeEvents(ProcessId pid);
  const Registry& registry() const noexcept { return *registry_; }

  // The bank a process's handle names, with `need` rights.
  Result<SpaceBank*> tryFindBank(ProcessId pid, Handle bank, Rights need) const;
  SpaceBank& systemBank() const noexcept { return *systemBank_; }
  const Process* findProcess(ProcessId pid) const noexcept;
  size_t processCount() const noexcept { return processes_.size(); }
  // Objects in the whole tree, the system bank excluded. O(objects).
  uint64_t objectCount() const;
  KernelSnapshot snapshot() const;
  // Paged introspection for the CLI. Each page costs O(log n + limit), whatever the kernel holds
  // (a snapshot costs all of it): processes by pid, banks by koid (parents before children: a
  // bank is always made after its parent), one process's caps by slot index (NOT_FOUND if `pid`
  // is not attached). `limit` 0 is treated as 1.
  Listing<ProcessSummary> listProcesses(uint64_t fromPid, uint32_t limit) const;
  Listing<KernelSnapshot::Bank> listBanks(uint64_t fromKoid, uint32_t limit) const;
  Result<Listing<CapSummary>> listCaps(ProcessId pid, uint64_t fromSlot, uint32_t limit) const;
  // Checks every accounting and linkage invariant; a violation is a bug and aborts. O(state).
  void verifyInvariants() const;

  // True while any process has events queued (O(1)): the daemon checks it after each call and
  // drains takeEvents() only then.
  bool hasPendingEvents() const noexcept { return !events_.empty(); }

 private:
  Result<CSpace*> findCSpace(ProcessId pid) const noexcept;
  // Indexes a new bank for listBanks and watches for its destruction.
  void trackBank(SpaceBank& bank);
  // LifecycleObserver: queue last-cap objects; turn destructions into events.
  void lastCapGone(KernelObject& object) noexcept override;
  void objectDestroyed(KernelObject& object) noexcept override;
  void trimWanted(CSpace& cspace) noexcept override;
  // Destroys every object queued by lastCapGone / a service's death, then trims the CSpaces
  // that asked (trimWanted). Run at the end of each call that can delete caps or destroy
  // objects, once its own changes are done.
  void reap() noexcept;
  void queueEvent(ProcessId pid, KernelEvent event);
  // tryOpenBushel and tryOpenBushelVia once their caps are checked.
  Result<Handle> openBushelTo(ProcessId pid, CSpace& cspace, Service& service, SpaceBank& from);

  Options options_;
  std::unique_ptr<SpaceBank> systemBank_;
  std::unique_ptr<Registry> registry_;  // the kernel's own; outlives every Service
  std::vector<KernelObject*> doomed_;   // to destroy in reap(); never dangling (see
                                        // objectDestroyed)
  std::vector<CSpace*> trimmable_;      // to trim in reap(); never dangling, as doomed_
  std::map<ProcessId, std::vector<KernelEvent>> events_;
  std::map<ProcessId, std::unique_ptr<Process>> processes_;
  // Every live service under its server, so a server's death ends its services in O(its own),
  // whichever bank paid for them. Entries go in objectDestroyed.
  std::multimap<ProcessId, Service*> servedBy_;
  // Indexes for the paged listings: every bank by koid (entries go in objectDestroyed), and the
  // process each CSpace belongs to (a cap's derivation parent names its process by it).
  std::map<Koid, const SpaceBank*> banks_;
  std::map<const CSpace*, ProcessId> pidOf_;
  ProcessId nextPid_ = 1;
};

}  // namespace agate::kernel
