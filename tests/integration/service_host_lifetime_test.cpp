// What a served client's objects outlive, through a real agate-kernel and a forked server: an
// object a client got from the server (charged to that client's quota) or the client's own
// bootstrap object, passed on to another client, keeps working for that one after its owner
// hangs up, and the server carries on (the owner's quota and ServedClient stay until it goes:
// ServedClient::referenced, RpcConnection::sharedObjectsAlive). A host destroyed without stop()
// unregisters its service. Watchdogs: 60 s each.
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "agate/client/main.h"
#include "agate/client/service_host.h"
#include "agate/client/session.h"
#include "agate/rpc/cap_pointer.h"
#include "kernel_fixture.h"
#include "rpc_test.capnp.h"
#include "session_harness.h"
#include "support/watchdog.h"

namespace agate::client {
namespace {

using namespace std::chrono_literals;
using agate::testing::KernelProcess;
using agate::testing::Watchdog;
using rpc::CallContext;
using rpc::RemoteCap;
using rpc::ServerObject;
using rpc::test::CapAndValue;
using rpc::test::CapParam;
using rpc::test::Value;
using test::describe;

constexpr uint64_t IFACE = 0x1234;
enum : uint16_t { REGISTER = 0, GET_LISTENER = 1, MAKE = 2, PING = 3, KEEP = 4 };

// A per-client object whose bytes are charged to the client that made it.
class Thing final : public ServerObject {
 public:
  explicit Thing(StateCharge c) : charge_(std::move(c)) {}
  Promise<void> dispatch(uint64_t, uint16_t, CallContext&) override {
    return readyPromise<void>(Status{});
  }

 private:
  StateCharge charge_;
};

class Hub;
struct HubShared {
  Hub* registered = nullptr;
};

// One per client (the bootstrap object): a tiny pub/sub hub. A client registers a listener; any
// client may fetch the registered listener (a capability of another client: a proxy).
class Hub final : public ServerObject {
 public:
  Hub(ServedClient& c, HubShared& s) : client_(c), shared_(s) {}
  ~Hub() override {
    if (shared_.registered == this) shared_.registered = nullptr;
  }
  Promise<void> dispatch(uint64_t, uint16_t method, CallContext& ctx) override {
    switch (method) {
      case REGISTER: {
        Result<rpc::ReceivedCap> cap = Error(Errc::INVALID_ARGUMENT, "no params");
        Status read =
            ctx.tryReadParams<CapParam>([&](CapParam::Reader p) { cap = ctx.capAt(p, 0); });
        if (!read) return readyPromise<void>(read.error());
        if (!cap) return readyPromise<void>(cap.error());
        listener_ = cap->remote;
        shared_.registered = this;
        return readyPromise<void>(Status{});
      }
      case GET_LISTENER: {
        if (shared_.registered == nullptr)
          return readyPromise<void>(Error(Errc::NOT_FOUND, "none"));
        auto out = ctx.initResultsAs<CapAndValue>(32);
        if (!out) return readyPromise<void>(out.error());
        auto index = ctx.addResultCap(shared_.registered->listener_);
        if (!index) return readyPromise<void>(index.error());
        rpc::writeCapPointer(*out, 0, *index);
        return readyPromise<void>(Status{});
      }
      case MAKE:
        return make(ctx);
      case PING: {
        auto out = ctx.initResultsAs<Value>(16);
        if (!out) return readyPromise<void>(out.error());
        out->setValue(7);
        return readyPromise<void>(Status{});
      }
      default:
        return readyPromise<void>(Error(Errc::UNSUPPORTED, "no such method"));
    }
  }

 private:
  Promise<void> make(CallContext& ctx) {
    Result<StateCharge> charge = co_await client_.quota().charge(100);
    AGATE_CO_TRY(charge);
    auto out = ctx.initResultsAs<CapAndValue>(32);
    AGATE_CO_TRY(out);
    auto index = ctx.addResultCap(std::make_unique<Thing>(std::move(*charge)));
    AGATE_CO_TRY(index);
    rpc::writeCapPointer(*out, 0, *index);
    co_return {};
  }

  ServedClient& client_;
  HubShared& shared_;
  RemoteCap listener_;
};

// The client side listener: keeps every capability it is handed.
class Listener final : public ServerObject {
 public:
  std::vector<RemoteCap> kept;
  Promise<void> dispatch(uint64_t, uint16_t method, CallContext& ctx) override {
    if (method != KEEP) return readyPromise<void>(Error(Errc::UNSUPPORTED, "no such method"));
    Result<rpc::ReceivedCap> cap = Error(Errc::INVALID_ARGUMENT, "no params");
    Status read = ctx.tryReadParams<CapParam>([&](CapParam::Reader p) { cap = ctx.capAt(p, 0); });
    if (!read) return readyPromise<void>(read.error());
    if (!cap) return readyPromise<void>(cap.error());
    kept.push_back(cap->remote);
    return readyPromise<void>(Status{});
  }
};

pid_t startHub(const std::string& home) {
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid != 0) return pid;
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() != parent) ::_exit(1);
  ::alarm(60);
  HubShared shared;
  std::string homeArg = home;
  char name[] = "hub";
  char homeFlag[] = "--home";
  char* argv[] = {name, homeFlag, homeArg.data(), nullptr};
  const int rc = serveService(
      3, argv, "hub", [&](ServedClient& c) { return std::make_unique<Hub>(c, shared); },
      ServiceOptions{});
  ::_exit(rc);
}

rpc::Request callOf(const RemoteCap& cap, uint16_t method) {
  return cap.newCall(IFACE, method, 64);
}

// A call of `method` on `target` whose params carry one capability: a RemoteCap, or an object of
// this side's exported with the call. Or why the capability could not be added.
template <class Cap>
Result<rpc::Request> callWithCap(const RemoteCap& target, uint16_t method, Cap&& cap) {
  rpc::Request req = callOf(target, method);
  auto p = req.params().initAs<CapParam>();
  Result<uint32_t> index = req.addCap(std::forward<Cap>(cap));
  if (!index) return index.error();
  rpc::writeCapPointer(p, 0, *index);
  return req;
}

enum class Passed { MADE_OBJECT, OWN_BOOTSTRAP };

// Client A passes a capability of its own to client B's listener, through the proxy the server
// gives A (the server's Forwarder passes A's object on to B's connection), then hangs up. The
// object is one the server made for A and charged to A's quota (MADE_OBJECT), or A's bootstrap
// object (OWN_BOOTSTRAP). B's reference still works after A hung up, and so does B's own
// connection: the server did not go down with A.
void passOnThenHangUp(Passed passed) {
  KernelProcess kernel;
  const pid_t server = startHub(kernel.home());
  Watchdog dog("an object passed on outlives its client", 60s, server);
  EventLoop loop;
  auto ka = std::move(caps::KernelConnection::tryAttach(loop, kernel.home(), "client-a")).value();
  auto kb = std::move(caps::KernelConnection::tryAttach(loop, kernel.home(), "client-b")).value();
  Listener listener;
  Status keptAfter, pingAfter;
  {
    Session sa(*ka), sb(*kb);
    Status done = loop.run(loop.deadline(
        [&]() -> Promise<void> {
          AGATE_CO_TRY(co_await sb.waitForService("hub"));
          Result<OpenedBushel> ob = co_await sb.openBushel("hub");
          AGATE_CO_TRY(ob);
          RemoteCap hubB = ob->connection->bootstrap();
          {
            Result<rpc::Request> req =
                callWithCap(hubB, REGISTER, static_cast<ServerObject&>(listener));
            AGATE_CO_TRY(req);
            AGATE_CO_TRY(co_await req->send());
          }
          Result<OpenedBushel> oa = co_await sa.openBushel("hub");
          AGATE_CO_TRY(oa);
          {
            RemoteCap hubA = oa->connection->bootstrap();
            RemoteCap passedOn = hubA, proxy;
            if (passed == Passed::MADE_OBJECT) {
              Result<rpc::Response> made = co_await callOf(hubA, MAKE).send();
              AGATE_CO_TRY(made);
              passedOn = made->getCap(0)->remote;
            }
            Result<rpc::Response> got = co_await callOf(hubA, GET_LISTENER).send();
            AGATE_CO_TRY(got);
            proxy = got->getCap(0)->remote;
            Result<rpc::Request> req = callWithCap(proxy, KEEP, passedOn);
            AGATE_CO_TRY(req);
            AGATE_CO_TRY(co_await req->send());
          }
          EXPECT_EQ(listener.kept.size(), 1u);
          AGATE_CO_TRY(co_await sa.close(oa->koid));  // A hangs up
          (void)co_await loop.sleep(300ms);           // the server drops A meanwhile
          Result<rpc::Response> kept = co_await callOf(listener.kept.at(0), PING).send();
          keptAfter = kept ? Status{} : Status(kept.error());
          Result<rpc::Response> ping = co_await callOf(hubB, PING).send();
          pingAfter = ping ? Status{} : Status(ping.error());
          listener.kept.clear();  // the last reference: the server drops A's object now
          (void)co_await loop.sleep(100ms);
          ping = co_await callOf(hubB, PING).send();
          if (!ping) pingAfter = ping.error();
          co_return {};
        }(),
        20s));
    EXPECT_TRUE(done.ok()) << describe(done.error());
  }
  EXPECT_TRUE(keptAfter.ok()) << "B's call on A's object: " << describe(keptAfter.error());
  EXPECT_TRUE(pingAfter.ok()) << "B's call after A hung up: " << describe(pingAfter.error());
  int status = 0;
  const pid_t r = ::waitpid(server, &status, WNOHANG);
  EXPECT_EQ(r, 0) << "the server died: "
                  << (WIFSIGNALED(status) ? strsignal(WTERMSIG(status)) : "exited");
  ::kill(server, SIGKILL);
  if (r == 0) test::reap(server);
}

TEST(ServiceHostLifetime, AnObjectChargedToAClientAndPassedOnOutlivesTheClientsHangUp) {
  passOnThenHangUp(Passed::MADE_OBJECT);
}

TEST(ServiceHostLifetime, AClientsBootstrapObjectPassedOnOutlivesTheClientsHangUp) {
  passOnThenHangUp(Passed::OWN_BOOTSTRAP);
}

// A hub served in this process, on a real agate-kernel: the tests below read the host's and
// the sessions' state between steps. attach() adds a client process's kernel connection.
class InProcessHubTest : public ::testing::Test {
 protected:
  void SetUp() override {
    server_ = std::move(caps::KernelConnection::tryAttach(loop_, kernel_.home(), "server")).value();
    host_ = std::move(loop_.run(ServiceHost::create(*server_, "hub", [&](ServedClient& c) {
              return std::make_unique<Hub>(c, shared_);
            }))).value();
    serving_.emplace(host_->run());
  }
  void TearDown() override {
    host_->stop();
    EXPECT_TRUE(loop_.run(std::move(*serving_)).ok());
  }
  std::unique_ptr<caps::KernelConnection> attach(const char* name) {
    return std::move(caps::KernelConnection::tryAttach(loop_, kernel_.home(), name)).value();
  }

  KernelProcess kernel_;
  Watchdog dog_{"an in-process hub", 60s};
  EventLoop loop_;
  std::unique_ptr<caps::KernelConnection> server_;
  HubShared shared_;
  std::unique_ptr<ServiceHost> host_;
  std::optional<Promise<void>> serving_;
};

// Client A registers a listener; client B fetches it, so B's connection at the server holds a
// proxy (a Forwarder with a reference on A's connection). A hangs up: the host drops A but keeps
// its connection for the proxy (retired). Once B lets the proxy go, the host frees A's
// connection at once, with no other event to prompt it (RpcConnection::postWhenUnreferenced).
TEST_F(InProcessHubTest, AClientKeptForAProxyGoesAsSoonAsTheProxyDoes) {
  EventLoop& loop = loop_;
  ServiceHost* host = host_.get();
  auto ka = attach("client-a");
  auto kb = attach("client-b");
  Listener listener;
  size_t retiredWithProxy = 0, retiredAfter = 1;
  {
    Session sa(*ka), sb(*kb);
    Status done = loop.run(loop.deadline(
        [&]() -> Promise<void> {
          Result<OpenedBushel> oa = co_await sa.openBushel("hub");
          AGATE_CO_TRY(oa);
          {
            Result<rpc::Request> req = callWithCap(oa->connection->bootstrap(), REGISTER,
                                                   static_cast<ServerObject&>(listener));
            AGATE_CO_TRY(req);
            AGATE_CO_TRY(co_await req->send());
          }
          Result<OpenedBushel> ob = co_await sb.openBushel("hub");
          AGATE_CO_TRY(ob);
          RemoteCap proxy;
          {
            Result<rpc::Response> got =
                co_await callOf(ob->connection->bootstrap(), GET_LISTENER).send();
            AGATE_CO_TRY(got);
            proxy = got->getCap(0)->remote;
          }
          AGATE_CO_TRY(co_await sa.close(oa->koid));  // A hangs up
          for (int i = 0; i < 2000 && host->clientCount() != 1; ++i)
            AGATE_CO_TRY(co_await loop.sleep(1ms));
          retiredWithProxy = host->retiredCount();
          proxy = RemoteCap();  // B's Release reaches the server: the Forwarder goes
          for (int i = 0; i < 2000 && host->retiredCount() != 0; ++i)
            AGATE_CO_TRY(co_await loop.sleep(1ms));
          retiredAfter = host->retiredCount();
          co_return {};
        }(),
        20s));
    EXPECT_TRUE(done.ok()) << describe(done.error());
  }
  EXPECT_EQ(retiredWithProxy, 1u) << "A's connection is kept while the proxy refers to it";
  EXPECT_EQ(retiredAfter, 0u) << "A's connection is freed once the proxy goes";
}

// A promise pipelined on a call of bushel A is passed on bushel B of the same session (B's
// export of it refers to A's question), then A is closed with nothing else left on it: the
// session keeps A while B's export refers to it, and frees both once B is closed too. The
// promise breaks (A closed before its answer came), and a call through it fails, touching
// nothing freed.
TEST_F(InProcessHubTest, AClosedBushelAnotherBushelStillRefersToIsKeptUntilThatOneGoes) {
  EventLoop& loop = loop_;
  auto kc = attach("client");
  size_t heldWhileReferred = 0, heldAtEnd = 99;
  Status through, registered;
  {
    Session s(*kc);
    auto settle = [&]() -> Promise<void> {
      for (int i = 0; i < 20; ++i) AGATE_CO_TRY(co_await loop.sleep(1ms));
      co_return {};
    };
    Status done = loop.run(loop.deadline(
        [&]() -> Promise<void> {
          Result<OpenedBushel> oa = co_await s.openBushel("hub");
          AGATE_CO_TRY(oa);
          Result<OpenedBushel> ob = co_await s.openBushel("hub");
          AGATE_CO_TRY(ob);
          const caps::Koid koidA = oa->koid, koidB = ob->koid;
          RemoteCap hubB = ob->connection->bootstrap();
          std::optional<rpc::RemotePromise> registering;
          {
            RemoteCap hubA = oa->connection->bootstrap();
            // Nothing is registered yet, so GET_LISTENER would fail: its answer never matters.
            rpc::RemotePromise pending = callOf(hubA, GET_LISTENER).send();
            Result<rpc::Request> req = callWithCap(hubB, REGISTER, pending.pipeline({0}));
            AGATE_CO_TRY(req);
            registering.emplace(req->send());
          }
          oa = Error(Errc::CANCELLED, "dropped");
          AGATE_CO_TRY(co_await s.close(koidA));
          AGATE_CO_TRY(co_await settle());
          heldWhileReferred = s.heldCount();
          Result<rpc::Response> r = co_await std::move(*registering);
          registered = r ? Status{} : Status(r.error());
          r = Error(Errc::CANCELLED, "dropped");
          registering.reset();
          Result<rpc::Response> got = co_await callOf(hubB, GET_LISTENER).send();
          if (got) {
            Result<rpc::Response> ping = co_await callOf(got->getCap(0)->remote, PING).send();
            through = ping ? Status{} : Status(ping.error());
          } else {
            through = got.error();
          }
          got = Error(Errc::CANCELLED, "dropped");
          hubB = RemoteCap();
          ob = Error(Errc::CANCELLED, "dropped");
          AGATE_CO_TRY(co_await s.close(koidB));
          AGATE_CO_TRY(co_await settle());
          heldAtEnd = s.heldCount();
          co_return {};
        }(),
        20s));
    EXPECT_TRUE(done.ok()) << describe(done.error());
  }
  EXPECT_EQ(heldWhileReferred, 2u) << "A is kept while B's export refers to it";
  EXPECT_EQ(heldAtEnd, 0u) << "both go once B is closed too";
  EXPECT_TRUE(registered.ok()) << describe(registered.error());
  EXPECT_FALSE(through.ok()) << "a call through the broken promise fails";
}

// A host destroyed without stop() (here: it never ran) takes its service out of the registry,
// and a client that opened a bushel to it meanwhile is told (its call fails DISCONNECTED, not a
// hang).
TEST(ServiceHostLifetime, AHostDestroyedWithoutStopUnregistersItsService) {
  KernelProcess kernel;
  Watchdog dog("a host destroyed without stop", 60s);
  EventLoop loop;
  auto ks = std::move(caps::KernelConnection::tryAttach(loop, kernel.home(), "server")).value();
  auto kc = std::move(caps::KernelConnection::tryAttach(loop, kernel.home(), "client")).value();
  std::unique_ptr<ServiceHost> host =
      std::move(loop.run(ServiceHost::create(*ks, "store", [](ServedClient&) {
        return std::unique_ptr<ServerObject>();
      }))).value();
  Session s(*kc);
  Result<OpenedBushel> opened = loop.run(s.openBushel("store"));
  ASSERT_TRUE(opened.ok()) << describe(opened.error());
  RemoteCap root = opened->connection->bootstrap();
  host.reset();
  Result<rpc::Response> call = loop.run(loop.deadline(
      [](RemoteCap cap) -> Promise<rpc::Response> {
        co_return co_await callOf(cap, PING).send();
      }(root),
      10s));
  EXPECT_EQ(call.code(), Errc::DISCONNECTED) << errcName(call.code());
  EXPECT_TRUE(agate::testing::eventually(
      [&] { return kc->sync().lookupService(kc->registry(), "store").code() == Errc::NOT_FOUND; }));
}

}  // namespace
}  // namespace agate::client
