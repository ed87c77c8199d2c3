// Event buffer calls: create (slots charged to a bank, bound to a notification) and map (the
// writer's view with the notification's ring end, or a reader's read-only view with its wake
// end; see event_buffer.h for "writers first").
#include "syscalls.h"

namespace agate::kernel::daemon {

void createEventBuffer(CallContext& ctx, wire::Syscall::CreateEventBuffer::Reader call) {
  const Handle bank{call.getBank()};
  const uint32_t slots = call.getSlots();
  const Handle notification{call.getNotification()};
  auto r = ctx.kernel.tryCreateEventBuffer(ctx.pid, bank, slots, notification);
  if (!r) return ctx.fail(r.error());
  ctx.reply.setHandle(r->raw);
}

void mapEventBuffer(CallContext& ctx, wire::Syscall::MapEventBuffer::Reader call) {
  const Handle buffer{call.getBuffer()};
  const bool writable = call.getWritable();
  auto r = ctx.kernel.tryMapEventBuffer(ctx.pid, buffer, writable);
  if (!r) return ctx.fail(r.error());
  auto out = ctx.reply.initEventBuffer();
  out.setBytes(r->bytes);
  out.setSlots(r->slots);
  out.setWritable(r->writable);
  ctx.fds.push_back(std::move(r->fd));
  if (r->hasNotification) putNotificationFds(ctx, r->notification, out.initNotification());
}

}  // namespace agate::kernel::daemon
