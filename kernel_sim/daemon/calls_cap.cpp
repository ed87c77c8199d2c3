// Cap calls: copy (mint), delete, revoke, transfer, inspect, destroy the named object; the
// caller's receive limit on caps other processes push to it.
#include "syscalls.h"

namespace agate::kernel::daemon {
namespace {

TransferMode toKernel(wire::TransferMode mode, bool& known) {
  known = true;
  switch (mode) {
    case wire::TransferMode::MOVE:
      return TransferMode::MOVE;
    case wire::TransferMode::COPY:
      return TransferMode::COPY;
  }
  known = false;
  return TransferMode::COPY;
}

}  // namespace

void copyCap(CallContext& ctx, wire::Syscall::CopyCap::Reader call) {
  const Handle cap{call.getCap()};
  const auto rights = static_cast<Rights>(call.getRights());
  const uint64_t badge = call.getBadge();
  auto r = ctx.kernel.tryCopyCap(ctx.pid, cap, rights, badge);
  if (!r) return ctx.fail(r.error());
  ctx.reply.setHandle(r->raw);
}

void deleteCap(CallContext& ctx, wire::Syscall::DeleteCap::Reader call) {
  const Handle cap{call.getCap()};
  auto r = ctx.kernel.tryDeleteCap(ctx.pid, cap);
  if (!r) return ctx.fail(r.error());
  ctx.reply.setDone();
}

void revokeCap(CallContext& ctx, wire::Syscall::RevokeCap::Reader call) {
  const Handle cap{call.getCap()};
  auto r = ctx.kernel.tryRevokeCap(ctx.pid, cap);
  if (!r) return ctx.fail(r.error());
  ctx.reply.setCount(*r);
}

void transferCap(CallContext& ctx, wire::Syscall::TransferCap::Reader call) {
  const Handle cap{call.getCap()};
  const ProcessId to = call.getTo();
  bool known = false;
  const TransferMode mode = toKernel(call.getMode(), known);
  if (!known) return ctx.fail(Error(Errc::INVALID_ARGUMENT, "unknown transfer mode"));
  auto r = ctx.kernel.tryTransferCap(ctx.pid, cap, to, mode);
  if (!r) return ctx.fail(r.error());
  ctx.reply.setHandle(r->raw);
}

void setReceiveLimit(CallContext& ctx, wire::Syscall::SetReceiveLimit::Reader call) {
  const uint32_t limit = call.getLimit();
  auto r = ctx.kernel.trySetReceiveLimit(ctx.pid, limit);
  if (!r) return ctx.fail(r.error());
  ctx.reply.setCount(*r);
}

void inspectCap(CallContext& ctx, wire::Syscall::InspectCap::Reader call) {
  const Handle cap{call.getCap()};
  auto r = ctx.kernel.tryInspectCap(ctx.pid, cap);
  if (!r) return ctx.fail(r.error());
  auto info = ctx.reply.initCapInfo();
  info.setKoid(r->koid);
  info.setType(static_cast<uint16_t>(r->type));
  info.setRights(static_cast<uint32_t>(r->rights));
  info.setBadge(r->badge);
}

void destroyObject(CallContext& ctx, wire::Syscall::DestroyObject::Reader call) {
  const Handle cap{call.getCap()};
  auto r = ctx.kernel.tryDestroyObject(ctx.pid, cap);
  if (!r) return ctx.fail(r.error());
  ctx.reply.setDone();
}

}  // namespace agate::kernel::daemon
