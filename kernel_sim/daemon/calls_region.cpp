// Region calls: create (a sealed memfd charged to a bank) and map (a descriptor with the cap's
// rights; see region.h for how a read-only cap stays read-only).
#include "syscalls.h"

namespace agate::kernel::daemon {

void createRegion(CallContext& ctx, wire::Syscall::CreateRegion::Reader call) {
  const Handle bank{call.getBank()};
  const uint64_t pages = call.getPages();
  auto r = ctx.kernel.tryCreateRegion(ctx.pid, bank, pages);
  if (!r) return ctx.fail(r.error());
  ctx.reply.setHandle(r->raw);
}

void mapRegion(CallContext& ctx, wire::Syscall::MapRegion::Reader call) {
  const Handle region{call.getRegion()};
  const bool writable = call.getWritable();
  auto r = ctx.kernel.tryMapRegion(ctx.pid, region, writable);
  if (!r) return ctx.fail(r.error());
  auto out = ctx.reply.initRegion();
  out.setBytes(r->bytes);
  out.setWritable(r->writable);
  ctx.fds.push_back(std::move(r->fd));
}

}  // namespace agate::kernel::daemon
