// The syscall handlers of agate-kernel: one decode function per call, grouped one object type
// per file (calls_cap.cpp, calls_bank.cpp, calls_region.cpp, calls_notification.cpp,
// calls_event_buffer.cpp, calls_registry.cpp for the registry and bushels, calls_introspect.cpp for
// the CLI's queries). dispatch.cpp routes a decoded
// Syscall to them.
//
// Contract of every handler (decode, then invoke):
//  1. Read every argument from the Syscall reader into locals. Reading can throw kj::Exception on
//     a message that does not match the schema (dispatch catches it: PROTOCOL_ERROR); nothing has
//     changed yet, so that is safe. Text is checked here (length, content).
//  2. Call exactly one Kernel::try* with those locals. It checks handles, types, rights and
//     quotas before changing anything and returns a Result.
//  3. Write the Result into the reply: the result arm, or ctx.fail(error). Descriptors that go
//     with the reply are moved into ctx.fds. Nothing reads the Syscall after step 2.
//
// Threading: the daemon's one thread.
#pragma once

#include <map>
#include <memory>
#include <vector>

#include "agate/kernel/kernel.h"
#include "agate/runtime/fd.h"
#include "kernel.capnp.h"
#include "session.h"

namespace agate::kernel::daemon {

struct CallContext {
  Kernel& kernel;
  ProcessId pid;  // the caller
  const std::map<ProcessId, std::unique_ptr<Session>>& sessions;
  wire::Completion::Builder reply;
  size_t replyWords;    // the reply frame's capacity (introspection pages are sized to it)
  std::vector<Fd> fds;  // sent on the socket right before the completion

  // Sets the error arm (code and detail).
  void fail(const Error& e);
};

// Cap calls (calls_cap.cpp).
void copyCap(CallContext& ctx, wire::Syscall::CopyCap::Reader call);
void deleteCap(CallContext& ctx, wire::Syscall::DeleteCap::Reader call);
void revokeCap(CallContext& ctx, wire::Syscall::RevokeCap::Reader call);
void transferCap(CallContext& ctx, wire::Syscall::TransferCap::Reader call);
void setReceiveLimit(CallContext& ctx, wire::Syscall::SetReceiveLimit::Reader call);
void inspectCap(CallContext& ctx, wire::Syscall::InspectCap::Reader call);
void destroyObject(CallContext& ctx, wire::Syscall::DestroyObject::Reader call);
// Bank calls (calls_bank.cpp).
void createBank(CallContext& ctx, wire::Syscall::CreateBank::Reader call);
void setBankLimit(CallContext& ctx, wire::Syscall::SetBankLimit::Reader call);
void readBank(CallContext& ctx, wire::Syscall::ReadBank::Reader call);
void mapBankCredit(CallContext& ctx, wire::Syscall::MapBankCredit::Reader call);
void bindBankNotification(CallContext& ctx, wire::Syscall::BindBankNotification::Reader call);
void unbindBankNotification(CallContext& ctx, wire::Syscall::UnbindBankNotification::Reader call);
// Region calls (calls_region.cpp).
void createRegion(CallContext& ctx, wire::Syscall::CreateRegion::Reader call);
void mapRegion(CallContext& ctx, wire::Syscall::MapRegion::Reader call);
// Notification calls (calls_notification.cpp).
void createNotification(CallContext& ctx, wire::Syscall::CreateNotification::Reader call);
void notificationFds(CallContext& ctx, wire::Syscall::NotificationFds::Reader call);
void signalNotification(CallContext& ctx, wire::Syscall::Signal::Reader call);
// Moves a notification's descriptors into ctx.fds in the wire order (page, wake, ring) and
// describes them in `out` (shared with mapEventBuffer).
void putNotificationFds(CallContext& ctx, NotificationFds& fds,
                        wire::NotificationInfo::Builder out);
// Event buffer calls (calls_event_buffer.cpp).
void createEventBuffer(CallContext& ctx, wire::Syscall::CreateEventBuffer::Reader call);
void mapEventBuffer(CallContext& ctx, wire::Syscall::MapEventBuffer::Reader call);
// Registry and bushel calls (calls_registry.cpp).
void grantRegistry(CallContext& ctx, wire::Syscall::GrantRegistry::Reader call);
void registerService(CallContext& ctx, wire::Syscall::RegisterService::Reader call);
void lookupService(CallContext& ctx, wire::Syscall::LookupService::Reader call);
void openBushel(CallContext& ctx, wire::Syscall::OpenBushel::Reader call);
void bushelFds(CallContext& ctx, wire::Syscall::BushelFds::Reader call);
void growBushelState(CallContext& ctx, wire::Syscall::GrowBushelState::Reader call);
void closeBushel(CallContext& ctx, wire::Syscall::CloseBushel::Reader call);
void introduce(CallContext& ctx, wire::Syscall::Introduce::Reader call);
void openBushelVia(CallContext& ctx, wire::Syscall::OpenBushelVia::Reader call);
// Introspection (calls_introspect.cpp).
void listProcesses(CallContext& ctx);
void listBanks(CallContext& ctx);
void listCaps(CallContext& ctx, wire::Syscall::ListCaps::Reader call);
void listProcessesPage(CallContext& ctx, wire::Syscall::ListProcessesPage::Reader call);
void listBanksPage(CallContext& ctx, wire::Syscall::ListBanksPage::Reader call);
void listCapsPage(CallContext& ctx, wire::Syscall::ListCapsPage::Reader call);

// Routes one Syscall (already validated as a Cap'n Proto message) to its handler and fills
// ctx.reply (callId, result or error). A kj::Exception while reading the call becomes
// PROTOCOL_ERROR (dispatch.cpp).
void dispatch(CallContext& ctx, wire::Syscall::Reader call);

}  // namespace agate::kernel::daemon
