// Space bank calls: create a child, change a limit, read the credit.
#include "syscalls.h"

namespace agate::kernel::daemon {

void createBank(CallContext& ctx, wire::Syscall::CreateBank::Reader call) {
  const Handle bank{call.getBank()};
  const uint64_t limit = call.getLimit();
  auto r = ctx.kernel.tryCreateBank(ctx.pid, bank, limit);
  if (!r) return ctx.fail(r.error());
  ctx.reply.setHandle(r->raw);
}

void setBankLimit(CallContext& ctx, wire::Syscall::SetBankLimit::Reader call) {
  const Handle bank{call.getBank()};
  const uint64_t limit = call.getLimit();
  auto r = ctx.kernel.trySetBankLimit(ctx.pid, bank, limit);
  if (!r) return ctx.fail(r.error());
  ctx.reply.setDone();
}

void readBank(CallContext& ctx, wire::Syscall::ReadBank::Reader call) {
  const Handle bank{call.getBank()};
  auto r = ctx.kernel.tryReadBank(ctx.pid, bank);
  if (!r) return ctx.fail(r.error());
  auto credit = ctx.reply.initCredit();
  credit.setUsed(r->used);
  credit.setLimit(r->limit);
  credit.setReturned(r->returned);
  credit.setDestroyed(r->destroyed);
}

}  // namespace agate::kernel::daemon
