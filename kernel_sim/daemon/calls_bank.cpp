// Space bank calls: create a child, change a limit, read the credit, map the credit page (read
// only, see credit_page.h), and bind a notification rung when pages come back.
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

void mapBankCredit(CallContext& ctx, wire::Syscall::MapBankCredit::Reader call) {
  const Handle bank{call.getBank()};
  auto r = ctx.kernel.tryMapBankCredit(ctx.pid, bank);
  if (!r) return ctx.fail(r.error());
  ctx.reply.setCreditPage(sizeof(BankCreditPage));
  ctx.fds.push_back(std::move(*r));
}

void bindBankNotification(CallContext& ctx, wire::Syscall::BindBankNotification::Reader call) {
  const Handle bank{call.getBank()};
  const Handle notification{call.getNotification()};
  auto r = ctx.kernel.tryBindBankNotification(ctx.pid, bank, notification);
  if (!r) return ctx.fail(r.error());
  ctx.reply.setDone();
}

void unbindBankNotification(CallContext& ctx, wire::Syscall::UnbindBankNotification::Reader call) {
  const Handle bank{call.getBank()};
  const Handle notification{call.getNotification()};
  auto r = ctx.kernel.tryUnbindBankNotification(ctx.pid, bank, notification);
  if (!r) return ctx.fail(r.error());
  ctx.reply.setDone();
}

}  // namespace agate::kernel::daemon
