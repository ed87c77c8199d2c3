// Session: a client program's typed RPC to services, over bushels the kernel opens.
//
// Overview for a newcomer:
//
//   EventLoop loop;
//   auto kernel = caps::KernelConnection::tryAttach(loop, kernel::resolveKernelHome(), "me");
//   client::Session s(**kernel);
//
//   Promise<void> work(client::Session& s) {
//     Result<Calculator::Client> calc = co_await s.open<Calculator>("calculator");
//     auto sum = calc->evaluate(...).getValue().read();    // pipelined: one round trip
//     ...
//   }
//
// (or `return agate::run(argc, argv, work);` from <agate/agate.h>, which does the attaching.)
//
// open<I>(name, bank) opens a bushel to the service registered as `name` (openBushel), paid from
// `bank` (default: bank(), the process bank unless setBank chose another) — the ring pages and
// every page of server state the client causes (ServiceHost's ClientQuota) are charged there.
// It fetches the bushel's rings, opens a BushelLink (an RpcConnection over them) and returns the
// server's bootstrap object as the typed client I::Client. Three kernel calls; the last two go
// out together in one doorbell.
//
// Disconnection. The session hears of its bushels through a KernelEvents router (its own, made
// by `Session(kernel)`, or one shared with ServiceHosts and a KernelVats on the same kernel
// connection, `Session(events)`): when the kernel says a bushel of ours closed or its service
// went (the server unregistered, or died: the kernel notices at once), the connection is closed
// and every pending and later call on it fails with DISCONNECTED. The same happens to every
// bushel when the kernel connection itself dies.
//
// Handoff. With SessionOptions::network (a KernelVats), each connection names the network and
// the server's kernel ProcessId as its peer vat, and the session lends the network its bushel
// caps to introduce other vats with: a capability of one service passed to another is handed
// off, and the receiver calls its host directly (kernel_vats.h).
//
// close(koid) hangs up one bushel: the connection closes and the bushel cap is deleted, so the
// server drops this client's state. A closed bushel's link (its rings, their descriptors and
// mappings, the connection) is kept while anything refers to it — a handle on its connection
// (typed client, promise, response), the OpenedBushel's `connection`, an EventStream from it, an
// object the connection owned that another connection still shares — so those stay safe to
// use and drop. Once none is left the session frees it from a task of its own (never inside a
// call): at the turn after it closed, or after its last handle dropped (a shared object that
// goes later is noticed at the next open() or close()). A session that opens and closes bushels
// for ever holds only the ones still referred to.
//
// Lifetimes: every handle (typed client, promise, response) on a session's bushels must be
// dropped before the Session (RpcConnection's contract, checked). The KernelConnection (and a
// shared router, and the network) outlive the session; with a network, close() it first.
//
// Threading: the kernel connection's loop thread.
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "agate/caps/kernel_connection.h"
#include "agate/client/bushel_link.h"
#include "agate/client/kernel_events.h"
#include "agate/rpc/connection.h"
#include "agate/runtime/promise.h"
#include "agate/runtime/result.h"
#include "agate/runtime/task.h"

namespace agate::client {

class KernelVats;

struct SessionOptions {
  // Per bushel. `bootstrap` is what servers reach when they call the client's bootstrap (none
  // by default; objects passed in calls need none). Its `network` and `peerVat` are ignored:
  // the session sets them per bushel from `network` below and the kernel's word.
  rpc::RpcOptions rpc = {};
  // The vat this session's connections belong to (three-party handoff), or none. Not owned.
  KernelVats* network = nullptr;
};

// A bushel the session opened.
struct OpenedBushel {
  caps::Cap<caps::Bushel> cap;
  caps::Koid koid = 0;
  // The bushel's connection, owned by the session; this counted reference keeps it (and the
  // rings under it) from being freed while the OpenedBushel is kept, even after it closed.
  rpc::ConnectionRef connection;
  caps::ProcessId server = 0;  // the service's server, as the kernel says
};

class Session final : private KernelEventListener {
 public:
  // With a router of its own: the session is this kernel connection's only event consumer.
  explicit Session(caps::KernelConnection& kernel, SessionOptions options = {});
  // On a router shared with other listeners (ServiceHosts, a KernelVats).
  explicit Session(KernelEvents& events, SessionOptions options = {});
  // Closes every connection (handles must be gone). Bushel caps are left to the process's exit
  // or to close(): deleting them needs the loop.
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  caps::KernelConnection& kernel() const noexcept { return kernel_; }
  EventLoop& loop() const noexcept { return kernel_.loop(); }
  // The bank open() pays from when given none.
  caps::Cap<caps::SpaceBank> bank() const noexcept { return bank_; }
  void setBank(caps::Cap<caps::SpaceBank> bank) noexcept { bank_ = bank; }

  // The service `name`'s bootstrap object as an I (a generated interface stub, e.g.
  // calc::stubs::Calculator). Errors: the kernel's for openBushel (NOT_FOUND: no such service;
  // QUOTA_EXCEEDED: the bank cannot pay the rings; ...), DISCONNECTED if the kernel went.
  template <class I>
  Promise<typename I::Client> open(std::string name, caps::Cap<caps::SpaceBank> bank = {}) {
    Result<OpenedBushel> opened = co_await openBushel(std::move(name), bank);
    if (!opened) co_return opened.error();
    co_return typename I::Client(opened->connection->bootstrap());
  }
  // The untyped form: the bushel and its connection (bootstrap() for the server's object).
  Promise<OpenedBushel> openBushel(std::string name, caps::Cap<caps::SpaceBank> bank = {});

  // Waits until a service named `name` is registered (polling lookupService every `interval`),
  // for a client started alongside its server. TIMED_OUT after `timeout`.
  Promise<void> waitForService(std::string name, Duration timeout = std::chrono::seconds(5),
                               Duration interval = std::chrono::milliseconds(5));

  // Hangs up bushel `koid`: closes its connection (pending calls fail DISCONNECTED) and deletes
  // its cap, so the kernel closes it and the server drops this client's state. Closing a closed
  // bushel the session still holds is a no-op; NOT_FOUND if it holds none with that koid (never
  // opened, or closed and freed: see above).
  Promise<void> close(caps::Koid koid);

  // Bushels opened and not yet closed (by close() or by the kernel).
  size_t openCount() const noexcept;
  // Bushels whose links the session holds: the open ones and the closed ones still referred to.
  size_t heldCount() const noexcept { return entries_.size(); }

  // The service name the last openBushel/open/waitForService asked for ("" before any): lets a
  // program's error report say which service was missing.
  const std::string& lastServiceName() const noexcept { return lastServiceName_; }

 private:
  struct Entry {
    caps::Cap<caps::Bushel> cap;
    caps::Koid koid = 0;
    caps::ProcessId server = 0;
    std::unique_ptr<BushelLink> link;
    bool closed = false;  // connection closed; cap deleted (or the kernel closed the bushel)
  };

  void kernelEvent(caps::KernelEvent& event) noexcept override;
  void kernelGone(const Error& why) noexcept override;
  Entry* find(caps::Koid koid) noexcept;
  void closeLocally(Entry& entry, const Error& reason) noexcept;
  // Frees the closed entries nothing refers to any more (see close() above); from sweepTask_
  // only, so that no call of a connection it frees is running.
  void sweep() noexcept;
  void postSweep() noexcept;

  std::unique_ptr<KernelEvents> ownEvents_;  // Session(kernel) only; first: destroyed last
  KernelEvents& events_;
  caps::KernelConnection& kernel_;
  SessionOptions options_;
  caps::Cap<caps::SpaceBank> bank_;
  std::vector<std::unique_ptr<Entry>> entries_;
  std::string lastServiceName_;
  Error kernelGone_{};                            // set when the kernel connection died
  MemberTask<&Session::sweep> sweepTask_{*this};  // unlinks itself from the loop's queue with us
};

}  // namespace agate::client
