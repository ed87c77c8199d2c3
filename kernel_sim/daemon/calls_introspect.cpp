// Introspection for the agate CLI: attached processes, the bank tree, one process's CSpace.
// Read-only; each answer is built from one KernelSnapshot (O(kernel state): not a hot path).
#include <algorithm>

#include "syscalls.h"

namespace agate::kernel::daemon {

void listProcesses(CallContext& ctx) {
  const KernelSnapshot snap = ctx.kernel.snapshot();
  auto list = ctx.reply.initProcesses(static_cast<unsigned>(snap.processes.size()));
  unsigned i = 0;
  for (const KernelSnapshot::Proc& p : snap.processes) {
    auto out = list[i++];
    out.setPid(p.pid);
    out.setBank(p.bank);
    out.setCaps(static_cast<uint32_t>(p.caps.size()));
    auto it = ctx.sessions.find(p.pid);
    if (it == ctx.sessions.end()) continue;  // attached but not yet announced: no OS identity
    out.setOsPid(it->second->osPid);
    out.setUid(it->second->uid);
    out.setName(it->second->name);
  }
}

void listBanks(CallContext& ctx) {
  const KernelSnapshot snap = ctx.kernel.snapshot();
  auto list = ctx.reply.initBanks(static_cast<unsigned>(snap.banks.size()));
  unsigned i = 0;
  for (const KernelSnapshot::Bank& b : snap.banks) {
    auto out = list[i++];
    out.setKoid(b.koid);
    out.setParent(b.parent);
    out.setUsed(b.used);
    out.setLimit(b.limit);
    out.setOwnPages(b.ownPages);
    out.setObjects(b.objects);
    out.setCaps(b.caps);
  }
}

void listCaps(CallContext& ctx, wire::Syscall::ListCaps::Reader call) {
  const ProcessId pid = call.getPid();
  const KernelSnapshot snap = ctx.kernel.snapshot();
  auto proc = std::find_if(snap.processes.begin(), snap.processes.end(),
                           [&](const KernelSnapshot::Proc& p) { return p.pid == pid; });
  if (proc == snap.processes.end()) return ctx.fail(Error(Errc::NOT_FOUND, "no such process"));
  auto list = ctx.reply.initCaps(static_cast<unsigned>(proc->caps.size()));
  unsigned i = 0;
  for (const KernelSnapshot::Cap& c : proc->caps) {
    auto out = list[i++];
    out.setHandle(c.handle);
    out.setKoid(c.koid);
    auto info = ctx.kernel.tryInspectCap(pid, Handle{c.handle});
    out.setType(info ? static_cast<uint16_t>(info->type) : 0);
    out.setRights(static_cast<uint32_t>(c.rights));
    out.setBadge(c.badge);
    out.setParentHandle(c.parentHandle);
    out.setParentPid(c.parentPid);
  }
}

}  // namespace agate::kernel::daemon
