// Registry and bushel calls: grant a registry cap, register and look up a service, open a bushel
// to one and fetch its ring descriptors; the server grows a bushel's client-paid state; a client
// introduces another process to a service, which opens a bushel through that introduction.
#include <string>
#include <string_view>

#include "syscalls.h"

namespace agate::kernel::daemon {
namespace {

// Copies a service name out of the (private, COPY_IN) frame. Registry::checkName judges the
// content inside the kernel call; here only the size is bounded so a hostile frame cannot make
// the daemon copy much.
constexpr size_t MAX_NAME_BYTES = 256;

bool readName(CallContext& ctx, capnp::Text::Reader text, std::string& out) {
  if (text.size() > MAX_NAME_BYTES) {
    ctx.fail(Error(Errc::INVALID_ARGUMENT, "service name too long"));
    return false;
  }
  out.assign(text.cStr(), text.size());
  return true;
}

}  // namespace

void grantRegistry(CallContext& ctx, wire::Syscall::GrantRegistry::Reader call) {
  const Handle registry{call.getRegistry()};
  const ProcessId to = call.getTo();
  const auto rights = static_cast<Rights>(call.getRights());
  auto r = ctx.kernel.tryPassRegistry(ctx.pid, registry, to, rights);
  if (!r) return ctx.fail(r.error());
  ctx.reply.setHandle(r->raw);
}

void registerService(CallContext& ctx, wire::Syscall::RegisterService::Reader call) {
  const Handle registry{call.getRegistry()};
  const Handle bank{call.getBank()};
  std::string name;
  if (!readName(ctx, call.getName(), name)) return;
  auto r = ctx.kernel.tryRegisterService(ctx.pid, registry, name, bank);
  if (!r) return ctx.fail(r.error());
  ctx.reply.setHandle(r->raw);
}

void lookupService(CallContext& ctx, wire::Syscall::LookupService::Reader call) {
  const Handle registry{call.getRegistry()};
  std::string name;
  if (!readName(ctx, call.getName(), name)) return;
  auto r = ctx.kernel.tryLookupService(ctx.pid, registry, name);
  if (!r) return ctx.fail(r.error());
  ctx.reply.setKoid(*r);
}

void openBushel(CallContext& ctx, wire::Syscall::OpenBushel::Reader call) {
  const Handle registry{call.getRegistry()};
  const Handle bank{call.getBank()};
  std::string name;
  if (!readName(ctx, call.getName(), name)) return;
  auto r = ctx.kernel.tryOpenBushel(ctx.pid, registry, name, bank);
  if (!r) return ctx.fail(r.error());
  ctx.reply.setHandle(r->raw);
}

void bushelFds(CallContext& ctx, wire::Syscall::BushelFds::Reader call) {
  const Handle bushel{call.getBushel()};
  // Two reads of one bushel, neither changes state: the server, then the descriptors.
  auto server = ctx.kernel.tryBushelServer(ctx.pid, bushel);
  if (!server) return ctx.fail(server.error());
  auto r = ctx.kernel.tryBushelFds(ctx.pid, bushel);
  if (!r) return ctx.fail(r.error());
  for (Fd& fd : *r) ctx.fds.push_back(std::move(fd));
  ctx.reply.setServer(*server);
  ctx.reply.setDone();
}

void growBushelState(CallContext& ctx, wire::Syscall::GrowBushelState::Reader call) {
  const Handle service{call.getService()};
  const Koid bushel = call.getBushel();
  const uint64_t pages = call.getPages();
  auto r = ctx.kernel.tryGrowBushelState(ctx.pid, service, bushel, pages);
  if (!r) return ctx.fail(r.error());
  ctx.reply.setCount(*r);
}

void closeBushel(CallContext& ctx, wire::Syscall::CloseBushel::Reader call) {
  const Handle service{call.getService()};
  const Koid bushel = call.getBushel();
  auto r = ctx.kernel.tryCloseBushel(ctx.pid, service, bushel);
  if (!r) return ctx.fail(r.error());
  ctx.reply.setDone();
}

void introduce(CallContext& ctx, wire::Syscall::Introduce::Reader call) {
  const Handle bushel{call.getBushel()};
  const ProcessId to = call.getTo();
  auto r = ctx.kernel.tryIntroduce(ctx.pid, bushel, to);
  if (!r) return ctx.fail(r.error());
  ctx.reply.setHandle(r->raw);
}

void openBushelVia(CallContext& ctx, wire::Syscall::OpenBushelVia::Reader call) {
  const Handle service{call.getService()};
  const Handle bank{call.getBank()};
  auto r = ctx.kernel.tryOpenBushelVia(ctx.pid, service, bank);
  if (!r) return ctx.fail(r.error());
  ctx.reply.setHandle(r->raw);
}

}  // namespace agate::kernel::daemon
