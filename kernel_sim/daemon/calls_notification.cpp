// Notification calls: create (a doorbell page, and a wake pipe when asked for), fetch the
// descriptors to wait on (and, with WRITE, to ring) it, and have the kernel ring it.
#include "syscalls.h"

namespace agate::kernel::daemon {

void putNotificationFds(CallContext& ctx, NotificationFds& fds,
                        wire::NotificationInfo::Builder out) {
  // The order is the schema's: page, then wake, then ring (each only if present).
  out.setBytes(fds.bytes);
  out.setWake(fds.wakeFd.valid());
  out.setRing(fds.ringFd.valid());
  ctx.fds.push_back(std::move(fds.page));
  if (fds.wakeFd.valid()) ctx.fds.push_back(std::move(fds.wakeFd));
  if (fds.ringFd.valid()) ctx.fds.push_back(std::move(fds.ringFd));
}

void createNotification(CallContext& ctx, wire::Syscall::CreateNotification::Reader call) {
  const Handle bank{call.getBank()};
  const bool wakeFd = call.getWakeFd();
  auto r = ctx.kernel.tryCreateNotification(ctx.pid, bank, wakeFd);
  if (!r) return ctx.fail(r.error());
  ctx.reply.setHandle(r->raw);
}

void notificationFds(CallContext& ctx, wire::Syscall::NotificationFds::Reader call) {
  const Handle notification{call.getNotification()};
  auto r = ctx.kernel.tryNotificationFds(ctx.pid, notification);
  if (!r) return ctx.fail(r.error());
  putNotificationFds(ctx, *r, ctx.reply.initNotification());
}

void signalNotification(CallContext& ctx, wire::Syscall::Signal::Reader call) {
  const Handle notification{call.getNotification()};
  auto r = ctx.kernel.trySignal(ctx.pid, notification);
  if (!r) return ctx.fail(r.error());
  ctx.reply.setDone();
}

}  // namespace agate::kernel::daemon
