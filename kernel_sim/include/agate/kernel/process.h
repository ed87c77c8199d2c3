// Process: what the kernel knows of one attached process — its CSpace and the bank it owns.
//
// The process bank is a child of the system bank, created at attach with the limit the daemon
// chose; the process's CSpace is allocated from it, so a process pays for its own cap table.
// The process's first cap is to that bank, without DESTROY or SET_LIMIT (Kernel::PROCESS_BANK
// rights): only the kernel can destroy it, which it does when the process dies.
#pragma once

#include <cstdint>

#include "agate/kernel/cspace.h"
#include "agate/kernel/space_bank.h"

namespace agate::kernel {

// Never reused within one kernel instance.
using ProcessId = uint32_t;

class Process {
 public:
  Process(ProcessId id, SpaceBank& bank, CSpace& cspace) noexcept
      : id_(id), bank_(&bank), cspace_(&cspace) {}
  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;

  ProcessId id() const noexcept { return id_; }
  // Owned by the system bank; lives exactly as long as the process is attached.
  SpaceBank& bank() const noexcept { return *bank_; }
  // Owned by bank().
  CSpace& cspace() const noexcept { return *cspace_; }

 private:
  ProcessId id_;
  SpaceBank* bank_;  // not owning
  CSpace* cspace_;   // not owning
};

}  // namespace agate::kernel
