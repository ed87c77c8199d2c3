// ServiceHost: a server process's side of bushels — register a name, serve each client over its
// own bushel, drop that client's state when it goes, and charge the state to the client.
//
// Overview for a newcomer:
//
//   class CalculatorImpl final : public calc::stubs::Calculator::Server {
//    public:
//     explicit CalculatorImpl(client::ServedClient& client);   // one per client
//     ...
//   };
//   int main(int argc, char** argv) { return agate::serve<CalculatorImpl>(argc, argv,
//   "calculator"); }
//
// or by hand, on a loop and a KernelConnection:
//
//   auto host = co_await ServiceHost::create(kernel, "calculator",
//       [](ServedClient& c) { return std::make_unique<CalculatorImpl>(c); });
//   co_await (*host)->run();     // until stop(), or the kernel goes
//
// Clients. The kernel tells the server of each bushel a client opens (BUSHEL_OPENED, with the
// two ring descriptors). The host then makes a ServedClient: a per-client bootstrap object from
// the factory, a ClientQuota, and a BushelLink (one RpcConnection over the bushel's rings, with
// that object as export 0). Per-client objects are the natural home of per-client state: they
// die with the client.
//
// Many clients. Nothing scans: every connection's reader parks on its own inbound ring doorbell
// (one io_uring futex wait each; a parked client costs no CPU), and a doorbell the client rings
// completes exactly that wait, which queues that reader on the loop's FIFO run queue. That run
// queue is the ready set. Fairness: each reader handles at most ServiceOptions::messagesPerTurn
// messages, then yields to the back of the queue (RpcOptions::messagesPerTurn), so the ready
// clients are served round robin and one that keeps its ring full cannot starve the others.
//
// Paying for state. Pages of server state are charged to the bank that paid for the bushel (the
// client's): ClientQuota::charge(bytes) takes bytes from the bushel's state allowance and, when
// it runs out, asks the kernel for `stateGrowthPages` more (growBushelState, charged to that
// bank). When the bank cannot pay, the charge fails with QUOTA_EXCEEDED: that client's call
// fails, nothing else does. The allowance comes back to the client's bank when the bushel dies.
// The kernel only accounts (the Genode "session quota" model): the server keeps a client's
// state within what that client paid, so a flooding client exhausts its own bank, not the
// server's memory. The connection's own tables are bounded per client by RpcOptions
// (maxAnswers, maxImports).
//
// Dropping a client: on BUSHEL_CLOSED (the client hung up or died: the kernel notices a death at
// once), or when its connection fails (it detached, or broke the protocol), the host shuts the
// connection down (cancelling its running calls; every object the connection owned goes, and
// each StateCharge is refunded), destroys its bootstrap object and then the connection. If the
// server passed a capability of that client on to another connection (a proxy through this
// server, held by a server it is a client of), that connection still refers to the dead one:
// it is kept, closed, until the proxy lets go (calls through it fail DISCONNECTED), then
// destroyed; one still referred to when the host is destroyed is handed to the router
// (KernelEvents::keepUntil), which keeps it until the reference goes or the router does.
//
// Disconnecting a client. When the host drops a client whose connection failed (or whose rings
// it could not open), it also closes the client's bushel in the kernel (closeBushel): a client
// that broke the protocol would otherwise keep its bushel, its rings and the state pages its
// bank paid for, and a hostile one would never be told. The kernel then tears the bushel down
// as if the client had hung up: the client gets BUSHEL_CLOSED (a Session fails every pending and
// later call on it DISCONNECTED), its cap to the bushel goes, and the rings' and state's pages
// return to its bank. Server code disconnects a client it judges misbehaving the same way with
// ServedClient::disconnect(reason), also from inside one of that client's calls. The closes run
// one at a time on a coroutine the host owns; a close that finds the bushel gone (the client
// hung up first: NOT_FOUND) or the kernel gone is not an error.
//
// stop() ends run(): every client is dropped and the service is unregistered (DESTROY on the
// Service cap: the kernel tells the clients, whose pending calls fail DISCONNECTED).
//
// Events. The host hears of its clients through a KernelEvents router: its own (create(kernel,
// ...): the host is then the connection's only event consumer) or one shared with a Session,
// other hosts and a KernelVats (create(events, ...)), so one process can serve and be a client
// on one kernel connection. Clients that open bushels before run() are kept by the router and
// served once it runs. With ServiceOptions::network (a KernelVats), each client's connection
// names the client's kernel ProcessId as its peer vat: capabilities can be handed off through it.
//
// Threading: the kernel connection's loop thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "agate/caps/kernel_connection.h"
#include "agate/client/bushel_link.h"
#include "agate/client/kernel_events.h"
#include "agate/rpc/connection.h"
#include "agate/runtime/promise.h"
#include "agate/runtime/result.h"
#include "agate/runtime/task.h"

namespace agate::client {

class ClientQuota;

// Bytes of one client's server state, charged to its quota. Move-only; refunds on destruction.
// Keep it inside the object it pays for. Must not outlive its quota (the ServedClient): objects
// the connection owns, and the client's bootstrap object, are destroyed before it.
class [[nodiscard]] StateCharge {
 public:
  StateCharge() = default;
  StateCharge(StateCharge&& o) noexcept
      : quota_(std::exchange(o.quota_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  StateCharge& operator=(StateCharge&& o) noexcept;
  StateCharge(const StateCharge&) = delete;
  StateCharge& operator=(const StateCharge&) = delete;
  ~StateCharge() { reset(); }

  uint64_t bytes() const noexcept { return bytes_; }
  void reset() noexcept;

 private:
  friend class ClientQuota;
  StateCharge(ClientQuota* quota, uint64_t bytes) noexcept : quota_(quota), bytes_(bytes) {}
  ClientQuota* quota_ = nullptr;  // not owned
  uint64_t bytes_ = 0;
};

// The server state one client pays for: an allowance in pages, granted by the kernel from the
// bank that paid for the bushel, and the bytes charged against it: by the server's objects
// (charge(), a StateCharge each) and by the client's connection (as its rpc::StateBudget: the
// buffers and table entries it allocates for the client, given back when it goes).
class ClientQuota final : public rpc::StateBudget {
 public:
  // `connectionFloor`: bytes the objects' charges leave for the connection (beyond what it has
  // taken), so that a client whose objects took all its bank pays for still has its connection.
  ClientQuota(caps::KernelConnection& kernel, caps::Cap<caps::Service> service, caps::Koid bushel,
              uint64_t growthPages, uint64_t connectionFloor = 0) noexcept
      : kernel_(kernel),
        service_(service),
        bushel_(bushel),
        growthPages_(growthPages),
        connectionFloor_(connectionFloor) {}
  ~ClientQuota() override;  // asserts every charge came back
  ClientQuota(const ClientQuota&) = delete;
  ClientQuota& operator=(const ClientQuota&) = delete;

  // `bytes` of state for this client. Ready at once while the allowance covers it; otherwise
  // one kernel call grows the allowance by max(growthPages, what is missing) first.
  // QUOTA_EXCEEDED when the client's bank (or an ancestor) cannot pay; INVALID_ARGUMENT for 0
  // bytes; DISCONNECTED if the kernel connection died. Nothing is charged on failure.
  Promise<StateCharge> charge(uint64_t bytes);

  uint64_t usedBytes() const noexcept { return used_; }  // by objects and connection together
  uint64_t connectionBytes() const noexcept { return connection_; }  // of which the connection's
  uint64_t objectBytes() const noexcept { return used_ - connection_; }  // and the objects'
  uint64_t allowanceBytes() const noexcept;
  uint64_t allowancePages() const noexcept { return pages_; }
  caps::KernelConnection& kernel() const noexcept { return kernel_; }

  // rpc::StateBudget, for the client's connection. grow() asks the kernel as charge() does
  // (growthPages at least, in growths of at most MAX_STATE_GROWTH pages). One kernel call at a
  // time: a charge or a growth that needs more while one is asked waits for it, then looks again.
  size_t available() const noexcept override;
  bool take(size_t bytes) noexcept override;
  void give(size_t bytes) noexcept override;
  Promise<void> grow(size_t bytes) override;

 private:
  friend class StateCharge;
  void refund(uint64_t bytes) noexcept;
  // Grows the allowance until `bytes` more fit, asking at most MAX_STATE_GROWTH pages per
  // kernel call.
  Promise<void> makeRoom(uint64_t bytes);
  // What an object's charge must leave free: the part of the floor the connection has not taken.
  uint64_t floorLeft() const noexcept {
    return connection_ < connectionFloor_ ? connectionFloor_ - connection_ : 0;
  }
  void growthDone() noexcept;

  caps::KernelConnection& kernel_;
  caps::Cap<caps::Service> service_;
  caps::Koid bushel_;
  uint64_t growthPages_;
  uint64_t pages_ = 0;       // granted by the kernel (the bushel's statePages)
  uint64_t used_ = 0;        // bytes charged, <= pages_ * page size
  uint64_t connection_ = 0;  // of which taken by the connection (rpc::StateBudget)
  uint64_t connectionFloor_;
  bool growing_ = false;  // a kernel call is asked (makeRoom)
  std::vector<Fulfiller<void>> growthWaiters_;
};

class ServedClient;
class KernelVats;

// Makes one client's bootstrap object. Runs before the client's connection exists: keep the
// ServedClient (for quota(), bushel(), peer()), use connection() only from calls.
using ClientFactory = std::function<std::unique_ptr<rpc::ServerObject>(ServedClient&)>;

struct ServiceOptions {
  // Pays for the Service record. Invalid (default): the process bank.
  caps::Cap<caps::SpaceBank> bank = {};
  // Per client; `bootstrap`, `network` and `peerVat` are ignored (the factory's object, the
  // field `network` below and the kernel's word are), and messagesPerTurn is set from the field
  // below.
  rpc::RpcOptions rpc = defaultRpcOptions();
  // Fairness budget: messages one client's connection handles before the others get a turn.
  uint32_t messagesPerTurn = 16;
  // Pages asked of a client's bank each time its state outgrows its allowance.
  uint64_t stateGrowthPages = 4;
  // Bytes of a client's allowance its objects' charges leave to its connection (ClientQuota):
  // a client whose objects took all its bank pays for can still make this much of calls in
  // progress, replies and tables (a call in progress holds about 1.3 KiB). Paid by the client's
  // bank like the rest, once its objects need it.
  uint64_t connectionFloorBytes = 32 * 1024;
  // Charge each client's connection to its quota (rpc::RpcOptions::budget): the message
  // buffers and table entries it allocates for the client, as it allocates them. A client whose
  // bank cannot pay has a call that would wait here refused (QUOTA_EXCEEDED), or, for anything
  // else, is disconnected with QUOTA_EXCEEDED. Off: the bounds of `rpc` alone limit what the
  // server holds for a client.
  bool chargeConnections = true;
  // The vat the clients' connections belong to (three-party handoff), or none. Not owned.
  KernelVats* network = nullptr;
  // serveService only: run a KernelVats of its own as `network` (clients may hand the service
  // capabilities of other services, which it then calls directly).
  bool handoff = false;

  // Bounds the per-client tables, and the bytes of a client's calls kept to deliver later
  // (pipelined on an answer still running): memory the server holds for a client outside its
  // quota, so kept small. The wait policy stays RpcOptions' (spin briefly after a message, then
  // park): an idle client's reader is parked and costs nothing, and spinning yields whenever
  // other clients' work is queued.
  static rpc::RpcOptions defaultRpcOptions() {
    rpc::RpcOptions o;
    o.maxAnswers = 1024;
    o.maxImports = 4096;
    o.maxQueuedCallBytes = 256 * 1024;
    return o;
  }
};

// One client of a service: its bushel, its quota, its bootstrap object and its connection.
class ServedClient {
 public:
  ServedClient(caps::KernelConnection& kernel, caps::Cap<caps::Service> service, caps::Koid bushel,
               caps::ProcessId peer, uint64_t growthPages, uint64_t connectionFloor = 0) noexcept
      : bushel_(bushel),
        peer_(peer),
        quota_(kernel, service, bushel, growthPages, connectionFloor) {}
  ~ServedClient();
  ServedClient(const ServedClient&) = delete;
  ServedClient& operator=(const ServedClient&) = delete;

  caps::Koid bushel() const noexcept { return bushel_; }
  caps::ProcessId peer() const noexcept { return peer_; }  // the client's kernel process id
  ClientQuota& quota() noexcept { return quota_; }
  caps::KernelConnection& kernel() const noexcept { return quota_.kernel(); }
  // Precondition: the connection exists (not inside the factory).
  rpc::RpcConnection& connection() noexcept { return link_->connection(); }
  bool connected() const noexcept { return link_ && link_->connection().isOpen(); }
  // Disconnects this client (see the overview): its connection closes with `reason` (its calls
  // in flight are cancelled, its pending questions fail), and at the loop's next turns the host
  // drops its state and closes its bushel in the kernel. Callable from one of the client's own
  // calls (that call is cancelled). Idempotent; nothing once the connection is closed.
  void disconnect(Error reason) noexcept;

 private:
  friend class ServiceHost;
  // Shuts the connection down (its calls cancelled, the objects it owns destroyed), then drops
  // the bootstrap object (it may hold references into the connection). The destructor does it.
  void shutDown() noexcept;
  // Something outside still holds a handle on the (shut down) connection (a capability of this
  // client that the server passed on, proxied, on another connection), or shares an object its
  // connection exported (the bootstrap object or one a method made, passed on to another
  // client or handed off): the quota and this client stay until nothing does.
  bool referenced() noexcept;

  caps::Koid bushel_;
  caps::ProcessId peer_;
  // Destroyed in reverse: the link (and what the connection owns) first, then the bootstrap
  // object, then the quota their charges go back to. shutDown() runs first, so the objects
  // the connection owns and the bootstrap object go before the connection does.
  ClientQuota quota_;
  // Owned jointly with the connection, and with any connection it is passed on to.
  std::shared_ptr<rpc::ServerObject> bootstrap_;
  KernelVats* network_ = nullptr;  // the link's connection is registered there
  std::unique_ptr<BushelLink> link_;
  std::optional<Promise<void>> watcher_;  // onDisconnect: tells the host to drop this client
};

class ServiceHost final : private KernelEventListener {
 public:
  // Registers `name` (the kernel's registerService errors: ALREADY_EXISTS, INVALID_ARGUMENT,
  // QUOTA_EXCEEDED, ...). The host serves once run() runs. This form makes a router of its own.
  static Promise<std::unique_ptr<ServiceHost>> create(caps::KernelConnection& kernel,
                                                      std::string name, ClientFactory factory,
                                                      ServiceOptions options = {});
  // The same on a router shared with other listeners (a Session, other hosts, a KernelVats).
  static Promise<std::unique_ptr<ServiceHost>> create(KernelEvents& events, std::string name,
                                                      ClientFactory factory,
                                                      ServiceOptions options = {});
  // Drops every client (the service stays registered unless run() ended through stop()).
  ~ServiceHost();
  ServiceHost(const ServiceHost&) = delete;
  ServiceHost& operator=(const ServiceHost&) = delete;

  // Serves until stop() (then unregisters and completes OK) or until the kernel connection dies
  // (DISCONNECTED). One run at a time.
  Promise<void> run();
  // Ends run() at the loop's next turn. Idempotent.
  void stop() noexcept;

  const std::string& name() const noexcept { return name_; }
  caps::Cap<caps::Service> service() const noexcept { return service_; }
  size_t clientCount() const noexcept { return clients_.size(); }
  // The client on bushel `koid`, or null.
  ServedClient* findClient(caps::Koid koid) noexcept;
  uint64_t clientsOpened() const noexcept { return opened_; }
  uint64_t clientsDropped() const noexcept { return dropped_; }
  // BUSHEL_OPENED events whose rings could not be opened, or never arrived because this
  // process's descriptor table was full (the client is not served: its bushel is closed).
  uint64_t clientsRefused() const noexcept { return refused_; }
  // Bushels this host closed in the kernel (clients it disconnected, see the overview).
  uint64_t bushelsClosed() const noexcept { return closed_; }
  // Dropped clients kept because another connection still refers to theirs (a capability of the
  // client this server passed on: a proxy holds it), or shares an object of theirs; each goes
  // as soon as its last handle does (or, for a shared object, at the host's next event).
  size_t retiredCount() const noexcept { return retired_.size(); }

 private:
  ServiceHost(std::unique_ptr<KernelEvents> ownEvents, KernelEvents& events, std::string name,
              ClientFactory factory, ServiceOptions options, caps::Cap<caps::Service> service,
              caps::Koid serviceKoid);
  static Promise<std::unique_ptr<ServiceHost>> make(std::unique_ptr<KernelEvents> ownEvents,
                                                    KernelEvents& events, std::string name,
                                                    ClientFactory factory, ServiceOptions options);

  void kernelEvent(caps::KernelEvent& event) noexcept override;
  void kernelGone(const Error& why) noexcept override;
  void accept(caps::KernelEvent& event);
  Promise<void> watch(ServedClient& client);
  void drop(caps::Koid koid) noexcept;
  void reap() noexcept;
  void retire(std::unique_ptr<ServedClient> client) noexcept;
  void sweepRetired() noexcept;
  // Queues the kernel close of bushel `koid` and starts the closer if it is idle.
  void closeBushel(caps::Koid koid);
  Promise<void> closeQueued();

  std::unique_ptr<KernelEvents> ownEvents_;  // create(kernel, ...) only; first: destroyed last
  KernelEvents& events_;
  caps::KernelConnection& kernel_;
  std::string name_;
  ClientFactory factory_;
  ServiceOptions options_;
  caps::Cap<caps::Service> service_;
  caps::Koid serviceKoid_;
  std::vector<std::unique_ptr<ServedClient>> clients_;
  // Dropped clients whose connection is shut down but still referenced from elsewhere (a
  // capability of the client that this server passed on, proxied, on another connection):
  // destroyed once nothing refers to them (retire()).
  std::vector<std::unique_ptr<ServedClient>> retired_;
  uint64_t opened_ = 0;
  uint64_t dropped_ = 0;
  uint64_t refused_ = 0;
  uint64_t closed_ = 0;
  std::optional<Fulfiller<void>> stopped_;  // while run() runs
  MemberTask<&ServiceHost::reap> reapTask_{*this};
  std::deque<caps::Koid> closing_;       // bushels to close in the kernel, oldest first
  bool closerRunning_ = false;           // closeQueued() is working through closing_
  std::optional<Promise<void>> closer_;  // closeQueued(), kept so the host can cancel it
};

}  // namespace agate::client
