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
//  * Region (region.h): page-granular memory (here: its record and its charge).
//  * Process (process.h): a CSpace plus the bank the process owns.
//
// Death: tryKillProcess() destroys the process bank: the CSpace (so every cap the process held,
// with derived caps handed to their parents), every object allocated from the process bank or
// its descendants (so every cap to them, in every other process), and refunds it all to the
// system bank. Objects the process allocated from banks it was given by others survive: they
// belong to those banks (KeyKOS semantics).
//
// Threading: one thread. Observers (space_bank.h) are called synchronously and must not call
// back in.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "agate/kernel/credit_page.h"
#include "agate/kernel/cspace.h"
#include "agate/kernel/object.h"
#include "agate/kernel/process.h"
#include "agate/kernel/region.h"
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
    std::vector<Cap> caps;  // in slot order
    friend bool operator==(const Proc&, const Proc&) = default;
  };
  std::vector<Bank> banks;      // every bank, parents before children
  std::vector<Proc> processes;  // by pid
  uint64_t objects = 0;         // every object but the system bank
  friend bool operator==(const KernelSnapshot&, const KernelSnapshot&) = default;
};

class Kernel {
 public:
  // Rights of the cap a process gets to its own bank.
  static constexpr Rights PROCESS_BANK = Rights::ALL & ~(Rights::DESTROY | Rights::SET_LIMIT);
  // Rights of the cap to an object the caller just created.
  static constexpr Rights CREATOR = Rights::ALL;

  struct Options {
    uint64_t systemPages = 1u << 20;      // the system bank's limit
    uint32_t maxGeneration = UINT32_MAX;  // per slot; lowered by tests only
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
  // Death (any cause): see the overview. NOT_FOUND if `pid` is not attached.
  Status tryKillProcess(ProcessId pid);

  // --- Syscalls: `pid` is the caller; handles are in its CSpace ---

  // A copy of a cap with a subset of its rights (PERMISSION_DENIED if `rights` adds any) and,
  // if `badge` != 0, that badge (PERMISSION_DENIED if the cap already has another: a badge is
  // set once). Derived from the source: revoking the source deletes it.
  Result<Handle> tryCopyCap(ProcessId pid, Handle cap, Rights rights, uint64_t badge = 0);
  // Deletes a cap; caps derived from it are handed to its parent. The object stays (it belongs
  // to its bank).
  Status tryDeleteCap(ProcessId pid, Handle cap);
  // Deletes every cap derived from `cap`, transitively, in every CSpace; returns how many.
  Result<uint64_t> tryRevokeCap(ProcessId pid, Handle cap);
  // Moves or copies a cap into process `to`'s CSpace (needs GRANT; NOT_FOUND if `to` is not
  // attached; QUOTA_EXCEEDED if `to`'s CSpace cannot grow). Returns the handle in `to`.
  Result<Handle> tryTransferCap(ProcessId pid, Handle cap, ProcessId to, TransferMode mode);
  Result<CapInfo> tryInspectCap(ProcessId pid, Handle cap) const;

  // A child of `bank` (needs CREATE_CHILD) with `limit` (may exceed what `bank` has left).
  Result<Handle> tryCreateBank(ProcessId pid, Handle bank, uint64_t limit);
  // A region of `pages` (1..Region::MAX_PAGES) charged to `bank` (needs ALLOCATE).
  Result<Handle> tryCreateRegion(ProcessId pid, Handle bank, uint64_t pages);
  // Needs SET_LIMIT; INVALID_ARGUMENT if below the bank's used.
  Status trySetBankLimit(ProcessId pid, Handle bank, uint64_t limit);
  // Needs READ.
  Result<BankCredit> tryReadBank(ProcessId pid, Handle bank) const;
  // Destroys the object (needs DESTROY): every cap to it goes; a bank takes everything allocated
  // from it and from its descendants along. Pages go back to the object's bank.
  Status tryDestroyObject(ProcessId pid, Handle cap);

  // --- Trusted access for the daemon (credit pages, observers) and the CLI ---

  // The bank a process's handle names, with `need` rights.
  Result<SpaceBank*> tryFindBank(ProcessId pid, Handle bank, Rights need) const;
  SpaceBank& systemBank() const noexcept { return *systemBank_; }
  const Process* findProcess(ProcessId pid) const noexcept;
  size_t processCount() const noexcept { return processes_.size(); }
  // Objects in the whole tree, the system bank excluded. O(objects).
  uint64_t objectCount() const;
  KernelSnapshot snapshot() const;
  // Checks every accounting and linkage invariant; a violation is a bug and aborts. O(state).
  void verifyInvariants() const;

 private:
  Result<CSpace*> findCSpace(ProcessId pid) const noexcept;

  Options options_;
  std::unique_ptr<SpaceBank> systemBank_;
  std::map<ProcessId, std::unique_ptr<Process>> processes_;
  ProcessId nextPid_ = 1;
};

}  // namespace agate::kernel
