// Three-party handoff over kernel-opened bushels (client/: KernelEvents, KernelVats), with a real
// agate-kernel and three processes: A serves "bank" (counters), B serves "auditor" and is itself
// a client of A once handed a counter, C (the test process, or a forked child) is a client of
// both. C passes A's counter to B; B opens its own bushel to A through the kernel's introduction
// (paid from B's bank) and calls A directly.
//
// Also the event router: B is a server (of C) and a client (of A) on one kernel connection;
// A's death reaches B's client side only, C's death B's server side only.
//
// Children are forked before the test process makes its loop (kernel_fixture.h). Watchdogs: the
// Watchdog per test, alarm() in every child, ctest's TIMEOUT.
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "agate/client/kernel_events.h"
#include "agate/client/kernel_vats.h"
#include "agate/client/service_host.h"
#include "agate/client/session.h"
#include "agate/rpc/cap_pointer.h"
#include "agate/runtime/channel.h"
#include "agate/runtime/message_channel.h"
#include "kernel_fixture.h"
#include "kernel_handoff_test.agate.h"
#include "session_harness.h"
#include "support/watchdog.h"

namespace agate::client {
namespace {

using namespace std::chrono_literals;
using agate::testing::KernelProcess;
using agate::testing::Watchdog;
using caps::KernelConnection;
using test::describe;
using test::reap;
using test::startClient;
using Counter = kvattest::stubs::Counter;
using Bank = kvattest::stubs::Bank;
using Auditor = kvattest::stubs::Auditor;

// ---------------------------------------------------------------------------------------------
// Server processes

// One server process: a router, a vat (unless `network` is false), and a host.
struct Vat {
  KernelConnection& kernel;
  KernelEvents events;
  std::unique_ptr<KernelVats> vats;
  std::vector<ServedClient*> clients;
  explicit Vat(KernelConnection& k, bool network) : kernel(k), events(k) {
    if (network) vats = std::make_unique<KernelVats>(events, KernelVatsOptions{});
  }
};

class CounterImpl final : public Counter::Server {
 public:
  Promise<void> add(AddContext context) override {
    total_ += context.params().getN();
    auto results = context.initResults();
    if (!results) return readyPromise<void>(results.error());
    results->setTotal(total_);
    return readyPromise<void>(Status{});
  }

 private:
  int64_t total_ = 0;
};

class BankImpl final : public Bank::Server {
 public:
  BankImpl(ServedClient& client, Vat& vat) : client_(client), vat_(vat) {
    vat_.clients.push_back(&client_);
  }
  ~BankImpl() override { std::erase(vat_.clients, &client_); }
  Promise<void> open(OpenContext context) override {
    auto results = context.initResults();
    if (!results) return readyPromise<void>(results.error());
    return readyPromise<void>(setCounter(context, *results, std::make_unique<CounterImpl>()));
  }
  Promise<void> seen(SeenContext context) override {
    const caps::ProcessId pid = context.params().getPid();
    uint64_t calls = 0, accepts = 0;
    uint32_t bushels = 0;
    for (ServedClient* c : vat_.clients) {
      if (c->peer() != pid || !c->connected()) continue;
      ++bushels;
      calls += c->connection().stats().callsReceived;
      accepts += c->connection().stats().acceptsReceived;
    }
    auto results = context.initResults();
    if (!results) return readyPromise<void>(results.error());
    results->setCalls(calls);
    results->setAccepts(accepts);
    results->setBushels(bushels);
    results->setProvisions(static_cast<uint32_t>(vat_.vats ? vat_.vats->provisionCount() : 0));
    return readyPromise<void>(Status{});
  }

 private:
  ServedClient& client_;
  Vat& vat_;
};

class AuditorImpl final : public Auditor::Server {
 public:
  AuditorImpl(ServedClient& client, Vat& vat) : client_(client), vat_(vat) {
    vat_.clients.push_back(&client_);
  }
  Promise<void> audit(AuditContext context) override {
    auto counter = getCounter(context, context.params());
    if (!counter) return readyPromise<void>(counter.error());
    return run(std::move(counter->remote), context.params().getTimes(), context);
  }
  Promise<void> keep(KeepContext context) override {
    auto counter = getCounter(context, context.params());
    if (!counter) return readyPromise<void>(counter.error());
    kept_ = std::move(counter->remote);
    return readyPromise<void>(Status{});
  }
  Promise<void> poke(PokeContext context) override {
    auto added = co_await kept_.add([](auto p) { p.setN(1); });
    if (!added) co_return added.error();
    auto results = context.initResults();
    if (!results) co_return results.error();
    results->setTotal(added->results().getTotal());
    co_return {};
  }
  Promise<void> vats(VatsContext context) override {
    auto credit = co_await vat_.kernel.readBank(vat_.kernel.bank());
    if (!credit) co_return credit.error();
    auto results = context.initResults();
    if (!results) co_return results.error();
    results->setOwned(vat_.vats ? static_cast<uint32_t>(vat_.vats->ownedConnections()) : 0);
    results->setIntroductions(vat_.vats ? vat_.vats->introductionsReceived() : 0);
    results->setClients(static_cast<uint32_t>(vat_.clients.size()));
    results->setBankUsed(credit->used);
    co_return {};
  }
  ~AuditorImpl() override { std::erase(vat_.clients, &client_); }

 private:
  static Promise<void> run(Counter::Client counter, uint32_t times, AuditContext context) {
    int64_t first = 0, last = 0;
    for (uint32_t i = 0; i < times; ++i) {
      auto added = co_await counter.add([](auto p) { p.setN(1); });
      if (!added) co_return added.error();
      last = added->results().getTotal();
      if (i == 0) first = last;
    }
    auto results = context.initResults();
    if (!results) co_return results.error();
    results->setFirst(first);
    results->setLast(last);
    co_return {};
  }
  ServedClient& client_;
  Vat& vat_;
  Counter::Client kept_;
};

enum class Role { BANK, AUDITOR, PLAIN_AUDITOR };

// Forks a server: A ("bank"), B ("auditor", with a vat) or an auditor without one ("plain").
// It serves until killed, dying with the test.
pid_t startServer(const std::string& home, Role role) {
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid != 0) return pid;
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() != parent) ::_exit(1);
  ::alarm(90);
  EventLoop loop;
  auto kernel = KernelConnection::tryAttach(loop, home, "handoff-server");
  if (!kernel) ::_exit(2);
  Status served;
  {
    Vat vat(**kernel, role != Role::PLAIN_AUDITOR);
    ServiceOptions options;
    options.network = vat.vats.get();
    const char* name = role == Role::BANK ? "bank" : role == Role::AUDITOR ? "auditor" : "plain";
    auto factory = [&](ServedClient& c) -> std::unique_ptr<rpc::ServerObject> {
      if (role == Role::BANK) return std::make_unique<BankImpl>(c, vat);
      return std::make_unique<AuditorImpl>(c, vat);
    };
    Result<std::unique_ptr<ServiceHost>> host =
        loop.run(ServiceHost::create(vat.events, name, factory, options));
    if (!host) ::_exit(3);
    served = loop.run((*host)->run());
    if (vat.vats) vat.vats->close();
    host->reset();
  }
  ::_exit(served ? 0 : 4);
}

// ---------------------------------------------------------------------------------------------
// The client side (C)

struct C {
  EventLoop loop;
  std::unique_ptr<KernelConnection> kernel;
  std::unique_ptr<KernelEvents> events;
  std::unique_ptr<KernelVats> vats;
  std::unique_ptr<Session> session;
  explicit C(const std::string& home) {
    auto k = KernelConnection::tryAttach(loop, home, "handoff-client");
    EXPECT_TRUE(k.ok()) << describe(k.error());
    if (!k) return;
    kernel = std::move(*k);
    events = std::make_unique<KernelEvents>(*kernel);
    KernelVatsOptions o;
    o.introductionTimeout = 300ms;
    vats = std::make_unique<KernelVats>(*events, o);
    SessionOptions so;
    so.network = vats.get();
    session = std::make_unique<Session>(*events, so);
  }
  ~C() {
    if (vats) vats->close();
    session.reset();
    vats.reset();
    events.reset();
  }
  template <class Body>
  void run(Body body, Duration limit = 30s) {
    ASSERT_TRUE(session != nullptr);
    Status done = loop.run(loop.deadline(body(*this), limit));
    EXPECT_TRUE(done.ok()) << describe(done.error()) << " (" << kernel->lastErrorDetail() << ")";
  }
};

struct Seen {
  uint64_t calls = 0, accepts = 0;
  uint32_t bushels = 0, provisions = 0;
};
Promise<Seen> seenAt(const Bank::Client& bank, caps::ProcessId pid) {
  auto r = co_await bank.seen([&](auto p) { p.setPid(pid); });
  if (!r) co_return r.error();
  auto s = r->results();
  co_return Seen{s.getCalls(), s.getAccepts(), s.getBushels(), s.getProvisions()};
}

struct VatsView {
  uint32_t owned = 0;
  uint64_t introductions = 0;
  uint32_t clients = 0;
  uint64_t bankUsed = 0;
};
Promise<VatsView> vatsOf(const Auditor::Client& auditor) {
  auto r = co_await auditor.vats();
  if (!r) co_return r.error();
  auto v = r->results();
  co_return VatsView{v.getOwned(), v.getIntroductions(), v.getClients(), v.getBankUsed()};
}

class KernelHandoffTest : public ::testing::Test {
 protected:
  KernelProcess kernel_;
};

// ---------------------------------------------------------------------------------------------

// A connect dropped while its bushel to the introduced vat opens (its caller's connection ended
// mid-handoff): the opening belongs to the network and finishes, so the next connect gets that
// connection at once, instead of waiting for a stranded opening and failing NOT_FOUND, and no
// second bushel is opened.
// The provider hangs up on a connection this vat opened for a hand-off (closeBushel): once
// nothing refers to it, it goes with its rings, and its bushel is deleted, its pages back in the
// bank that paid for it, instead of piling up with every such hang-up.
TEST(KernelVatsTest, AClosedHandOffConnectionGoesWithItsRingsAndItsBushel) {
  Watchdog dog("closed hand-off connection", 60s);
  KernelProcess kernel;
  EventLoop loop;
  auto a = std::move(KernelConnection::tryAttach(loop, kernel.home(), "a")).value();
  auto b = std::move(KernelConnection::tryAttach(loop, kernel.home(), "b")).value();
  auto c = std::move(KernelConnection::tryAttach(loop, kernel.home(), "c")).value();
  auto service = a->sync().registerService(a->registry(), "bank", a->bank());
  ASSERT_TRUE(service.ok());
  auto bushel = c->sync().openBushel(c->registry(), "bank", c->bank());
  ASSERT_TRUE(bushel.ok());
  ASSERT_EQ(a->sync().nextEvent()->type, caps::EventType::BUSHEL_OPENED);  // c's
  {
    KernelEvents events(*b);
    KernelVats vats(events, KernelVatsOptions{});
    const uint64_t bankBefore = b->sync().readBank(b->bank())->used;
    ASSERT_TRUE(c->sync().introduce(*bushel, b->pid()).ok());
    Result<rpc::RpcConnection*> conn = loop.run(vats.connect(a->pid()));
    ASSERT_TRUE(conn.ok()) << errcName(conn.code());
    EXPECT_EQ(vats.ownedConnections(), 1u);
    EXPECT_GT(b->sync().readBank(b->bank())->used, bankBefore) << "b paid for its bushel";
    auto opened = a->sync().nextEvent();  // b's bushel, as the provider saw it open
    ASSERT_TRUE(opened.ok());
    ASSERT_EQ(opened->type, caps::EventType::BUSHEL_OPENED);
    ASSERT_TRUE(a->sync().closeBushel(*service, opened->bushel).ok());
    for (int i = 0; i < 500 && vats.ownedConnections() != 0; ++i) (void)loop.run(loop.sleep(10ms));
    EXPECT_EQ(vats.ownedConnections(), 0u) << "the closed connection was kept";
    for (int i = 0; i < 500 && b->sync().readBank(b->bank())->used != bankBefore; ++i)
      (void)loop.run(loop.sleep(10ms));
    EXPECT_EQ(b->sync().readBank(b->bank())->used, bankBefore) << "the bushel was not deleted";
    vats.close();
  }
}

// The opening fails (the bank that pays for this vat's bushels cannot): every connect waiting
// for it gets the kernel's reason at once, nothing is left half open, and a later connect tries
// again.
TEST(KernelVatsTest, AFailedOpeningGivesItsReasonToTheConnectsThatWaited) {
  Watchdog dog("failed opening", 60s);
  KernelProcess kernel;
  EventLoop loop;
  auto a = std::move(KernelConnection::tryAttach(loop, kernel.home(), "a")).value();
  auto b = std::move(KernelConnection::tryAttach(loop, kernel.home(), "b")).value();
  auto c = std::move(KernelConnection::tryAttach(loop, kernel.home(), "c")).value();
  ASSERT_TRUE(a->sync().registerService(a->registry(), "bank", a->bank()).ok());
  auto bushel = c->sync().openBushel(c->registry(), "bank", c->bank());
  ASSERT_TRUE(bushel.ok());
  auto poor = b->sync().createBank(b->bank(), 1);  // one page: no bushel's rings fit
  ASSERT_TRUE(poor.ok());
  {
    KernelEvents events(*b);
    KernelVats vats(events, KernelVatsOptions{.bank = *poor});
    ASSERT_TRUE(c->sync().introduce(*bushel, b->pid()).ok());
    for (int i = 0; i < 500 && vats.knownIntroductions() == 0; ++i)
      (void)loop.run(loop.sleep(10ms));
    ASSERT_EQ(vats.knownIntroductions(), 1u);
    Promise<rpc::RpcConnection*> first = vats.connect(a->pid());
    Promise<rpc::RpcConnection*> second = vats.connect(a->pid());  // waits for the same opening
    const auto t0 = std::chrono::steady_clock::now();
    EXPECT_EQ(loop.run(std::move(first)).code(), Errc::QUOTA_EXCEEDED);
    EXPECT_EQ(loop.run(std::move(second)).code(), Errc::QUOTA_EXCEEDED);
    EXPECT_LT(std::chrono::steady_clock::now() - t0, 2s) << "they waited out the timeout";
    EXPECT_EQ(vats.ownedConnections(), 0u);
    EXPECT_EQ(loop.run(vats.connect(a->pid())).code(), Errc::QUOTA_EXCEEDED) << "tried again";
    vats.close();
  }
}

TEST(KernelVatsTest, AConnectDroppedWhileItOpensLeavesTheOpeningToFinish) {
  Watchdog dog("dropped connect", 60s);
  KernelProcess kernel;
  EventLoop loop;
  auto a = std::move(KernelConnection::tryAttach(loop, kernel.home(), "a")).value();
  auto b = std::move(KernelConnection::tryAttach(loop, kernel.home(), "b")).value();
  auto c = std::move(KernelConnection::tryAttach(loop, kernel.home(), "c")).value();
  ASSERT_TRUE(a->sync().registerService(a->registry(), "bank", a->bank()).ok());
  auto bushel = c->sync().openBushel(c->registry(), "bank", c->bank());
  ASSERT_TRUE(bushel.ok());
  {
    KernelEvents events(*b);
    KernelVats vats(events, KernelVatsOptions{});
    ASSERT_TRUE(c->sync().introduce(*bushel, b->pid()).ok());
    for (int i = 0; i < 500 && vats.knownIntroductions() == 0; ++i)
      (void)loop.run(loop.sleep(10ms));
    ASSERT_EQ(vats.knownIntroductions(), 1u);
    {
      Promise<rpc::RpcConnection*> dropped = vats.connect(a->pid());
      EXPECT_FALSE(dropped.isReady()) << "it waits for the kernel";
    }
    const auto t0 = std::chrono::steady_clock::now();
    Result<rpc::RpcConnection*> conn = loop.run(vats.connect(a->pid()));
    ASSERT_TRUE(conn.ok()) << errcName(conn.code());
    EXPECT_TRUE((*conn)->isOpen());
    EXPECT_LT(std::chrono::steady_clock::now() - t0, 2s) << "it waited for a stranded opening";
    EXPECT_EQ(vats.ownedConnections(), 1u) << "one bushel, the first opening's";
    vats.close();
  }
}

TEST_F(KernelHandoffTest, AHandedOffCounterIsCalledByTheRecipientDirectlyAfterTheIntroducersCalls) {
  const pid_t a = startServer(kernel_.home(), Role::BANK);
  const pid_t b = startServer(kernel_.home(), Role::AUDITOR);
  Watchdog dog("handoff", 60s, a);
  C c(kernel_.home());
  c.run([&](C& self) -> Promise<void> {
    Session& s = *self.session;
    AGATE_CO_TRY(co_await s.waitForService("bank"));
    AGATE_CO_TRY(co_await s.waitForService("auditor"));
    Result<OpenedBushel> toA = co_await s.openBushel("bank");
    Result<OpenedBushel> toB = co_await s.openBushel("auditor");
    CO_CHECK(toA.ok() && toB.ok());
    Bank::Client bank(toA->connection->bootstrap());
    Auditor::Client auditor(toB->connection->bootstrap());
    const caps::ProcessId pidB = toB->server;
    CO_CHECK(pidB != 0 && pidB != toA->server);
    Result<VatsView> before = co_await vatsOf(auditor);
    CO_CHECK(before.ok() && before->owned == 0);

    auto opened = co_await bank.open();
    CO_CHECK(opened.ok());
    Counter::Client counter = getCounter(*opened, opened->results())->remote;
    // Two calls in flight, then the handoff: B's calls reach A after these (E-order).
    auto first = counter.add([](auto p) { p.setN(5); });
    auto second = counter.add([](auto p) { p.setN(5); });
    auto audited = co_await auditor.audit([&](auto params, auto& request) -> Status {
      params.setTimes(100);
      return setCounter(request, params, counter);
    });
    if (!audited)
      ADD_FAILURE() << "audit: " << describe(audited.error()) << " sent "
                    << self.vats->introductionsSent() << " failed "
                    << self.vats->introductionsFailed() << " provides "
                    << toA->connection->stats().providesSent;
    CO_CHECK(audited.ok());
    CO_CHECK(audited->results().getFirst() == 11);
    CO_CHECK(audited->results().getLast() == 110);
    CO_CHECK((co_await first).ok() && (co_await second).ok());
    auto read = co_await counter.add([](auto p) { p.setN(0); });
    CO_CHECK(read.ok() && read->results().getTotal() == 110);

    // A served B's 100 calls on the bushel B opened (from B's process id), after one Accept.
    Result<Seen> seen = co_await seenAt(bank, pidB);
    CO_CHECK(seen.ok());
    CO_CHECK(seen->bushels == 1);
    CO_CHECK(seen->accepts == 1);
    CO_CHECK(seen->calls == 100);
    // C forwarded nothing: it served no call, and sent one Provide.
    CO_CHECK(toB->connection->stats().callsReceived == 0);
    CO_CHECK(toA->connection->stats().providesSent == 1);
    CO_CHECK(self.vats->introductionsSent() == 1);
    Result<VatsView> after = co_await vatsOf(auditor);
    CO_CHECK(after.ok() && after->owned == 1 && after->introductions == 1);
    // B paid for its bushel to A.
    CO_CHECK(after->bankUsed > before->bankUsed);
    // The provision was taken: A keeps none.
    Result<Seen> settled = co_await seenAt(bank, pidB);
    CO_CHECK(settled.ok() && settled->provisions == 0);

    // A second handoff of the same counter reuses B's bushel (no second introduction event).
    auto again = co_await auditor.audit([&](auto params, auto& request) -> Status {
      params.setTimes(1);
      return setCounter(request, params, counter);
    });
    CO_CHECK(again.ok() && again->results().getLast() == 111);
    Result<VatsView> reused = co_await vatsOf(auditor);
    CO_CHECK(reused.ok() && reused->owned == 1 && reused->introductions == 1);
    co_return {};
  });
  ::kill(a, SIGKILL);
  ::kill(b, SIGKILL);
  reap(a);
  reap(b);
}

// C passes A's counter to B while it is still pipelined on C's open() call: B gets a promise,
// whose calls go through C until the counter is known, then (Resolve to a third party, an
// embargoed Accept, Disembargo B -> C -> A) directly to A on B's own bushel.
TEST_F(KernelHandoffTest, APipelinedCounterPassedOnShortensToTheHostAfterAnEmbargo) {
  const pid_t a = startServer(kernel_.home(), Role::BANK);
  const pid_t b = startServer(kernel_.home(), Role::AUDITOR);
  Watchdog dog("handoff-embargo", 60s, a);
  C c(kernel_.home());
  c.run([&](C& self) -> Promise<void> {
    Session& s = *self.session;
    AGATE_CO_TRY(co_await s.waitForService("bank"));
    AGATE_CO_TRY(co_await s.waitForService("auditor"));
    Result<OpenedBushel> toA = co_await s.openBushel("bank");
    Result<OpenedBushel> toB = co_await s.openBushel("auditor");
    CO_CHECK(toA.ok() && toB.ok());
    Bank::Client bank(toA->connection->bootstrap());
    Auditor::Client auditor(toB->connection->bootstrap());
    const caps::ProcessId pidB = toB->server;

    auto opening = bank.open();  // not awaited: the counter is pipelined
    Counter::Client pipelined = opening.getCounter();
    auto kept = co_await auditor.keep([&](auto params, auto& request) -> Status {
      return setCounter(request, params, pipelined);
    });
    CO_CHECK(kept.ok());
    int64_t total = 0;
    auto poke = [&]() -> Promise<bool> {
      auto r = co_await auditor.poke();
      co_return r.ok() && r->results().getTotal() == ++total;
    };
    // A burst of pokes, so that B has calls on the counter in flight while its route changes
    // (the promise resolves to A's counter, the Accept is embargoed, the Disembargo loops back):
    // each poke's total is its place in the burst, so none overtook another.
    std::vector<decltype(auditor.poke())> burst;
    for (int i = 0; i < 10; ++i) burst.push_back(auditor.poke());
    for (auto& p : burst) {
      auto r = co_await p;
      CO_CHECK(r.ok() && r->results().getTotal() == ++total);
    }
    // The route changes: A sees B's Accept on B's own bushel.
    Result<Seen> seen = Error(Errc::NOT_FOUND);
    for (int i = 0; i < 2000; ++i) {
      seen = co_await seenAt(bank, pidB);
      if (!seen || seen->accepts == 1) break;
      (void)co_await s.loop().sleep(1ms);
    }
    CO_CHECK(seen.ok() && seen->accepts == 1 && seen->bushels == 1);
    CO_CHECK(toB->connection->stats().disembargoesReceived == 1);
    CO_CHECK(toA->connection->stats().disembargoesSent == 1);
    CO_CHECK(toA->connection->stats().providesSent == 1);
    // From now on B's calls go to A directly: C forwards none of them.
    const uint64_t forwarded = toB->connection->stats().callsReceived;
    for (int i = 0; i < 10; ++i) CO_CHECK(co_await poke());
    CO_CHECK(toB->connection->stats().callsReceived == forwarded);
    Result<Seen> after = co_await seenAt(bank, pidB);
    CO_CHECK(after.ok() && after->calls >= seen->calls + 10 && after->provisions == 0);
    // B still holds the promise: its export on the bushel to B holds C's references on the
    // bushel to A. The session shuts both down before destroying either (no order needed).
    co_return {};
  });
  ::kill(a, SIGKILL);
  ::kill(b, SIGKILL);
  reap(a);
  reap(b);
}

TEST_F(KernelHandoffTest, TheProvidersDeathFailsTheRecipientsCallsAndReachesOnlyItsClientSide) {
  const pid_t a = startServer(kernel_.home(), Role::BANK);
  const pid_t b = startServer(kernel_.home(), Role::AUDITOR);
  Watchdog dog("provider death", 60s, a);
  C c(kernel_.home());
  c.run([&](C& self) -> Promise<void> {
    Session& s = *self.session;
    AGATE_CO_TRY(co_await s.waitForService("bank"));
    AGATE_CO_TRY(co_await s.waitForService("auditor"));
    Result<OpenedBushel> toA = co_await s.openBushel("bank");
    Result<OpenedBushel> toB = co_await s.openBushel("auditor");
    CO_CHECK(toA.ok() && toB.ok());
    Bank::Client bank(toA->connection->bootstrap());
    Auditor::Client auditor(toB->connection->bootstrap());
    Result<VatsView> baseline = co_await vatsOf(auditor);
    CO_CHECK(baseline.ok());
    {
      auto opened = co_await bank.open();
      CO_CHECK(opened.ok());
      Counter::Client counter = getCounter(*opened, opened->results())->remote;
      auto kept = co_await auditor.keep([&](auto params, auto& request) -> Status {
        return setCounter(request, params, counter);
      });
      CO_CHECK(kept.ok());
      auto poked = co_await auditor.poke();
      CO_CHECK(poked.ok() && poked->results().getTotal() == 1);
    }
    ::kill(a, SIGKILL);
    // C's own bushel to A fails DISCONNECTED once the kernel says so.
    for (int i = 0; i < 2000 && toA->connection->isOpen(); ++i) (void)co_await s.loop().sleep(1ms);
    CO_CHECK(!toA->connection->isOpen());
    // B's calls on the handed-off counter fail DISCONNECTED; B itself serves on.
    Result<VatsView> gone = Error(Errc::FAILED, "not asked");
    for (int i = 0; i < 2000; ++i) {
      auto poked = co_await auditor.poke();
      CO_CHECK(!poked.ok() || i < 1999);
      if (!poked.ok()) {
        CO_CHECK(poked.code() == Errc::DISCONNECTED);
        break;
      }
      (void)co_await s.loop().sleep(1ms);
    }
    // B's bushel to A is gone, and with it the pages B paid for it.
    for (int i = 0; i < 2000; ++i) {
      gone = co_await vatsOf(auditor);
      CO_CHECK(gone.ok());
      if (gone->bankUsed == baseline->bankUsed) break;
      (void)co_await s.loop().sleep(1ms);
    }
    CO_CHECK(gone->bankUsed == baseline->bankUsed);
    CO_CHECK(toB->connection->isOpen());
    co_return {};
  });
  ::kill(b, SIGKILL);
  reap(a);
  reap(b);
}

TEST_F(KernelHandoffTest, TheIntroducersDeathMidHandoffLeavesProviderAndRecipientServing) {
  const pid_t a = startServer(kernel_.home(), Role::BANK);
  const pid_t b = startServer(kernel_.home(), Role::AUDITOR);
  // A C that passes the counter and dies (exits without a goodbye) right after.
  const pid_t dying = ::fork();
  if (dying == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    ::alarm(30);
    C c(kernel_.home());
    c.run([](C& self) -> Promise<void> {
      Session& s = *self.session;
      AGATE_CO_TRY(co_await s.waitForService("bank"));
      AGATE_CO_TRY(co_await s.waitForService("auditor"));
      Result<OpenedBushel> toA = co_await s.openBushel("bank");
      Result<OpenedBushel> toB = co_await s.openBushel("auditor");
      if (!toA || !toB) co_return Error(Errc::FAILED, "open");
      Bank::Client bank(toA->connection->bootstrap());
      Auditor::Client auditor(toB->connection->bootstrap());
      auto opened = co_await bank.open();
      if (!opened) co_return opened.error();
      Counter::Client counter = getCounter(*opened, opened->results())->remote;
      auto audited = auditor.audit([&](auto params, auto& request) -> Status {
        params.setTimes(1000);  // still running when C dies
        return setCounter(request, params, counter);
      });
      // Once B took the counter at A (its Accept arrived), C is gone mid-handoff: its call to
      // B is still running.
      for (int i = 0; i < 5000; ++i) {
        Result<Seen> seen = co_await seenAt(bank, toB->server);
        if (!seen) co_return seen.error();
        if (seen->accepts == 1) ::_exit(0);
        (void)co_await s.loop().sleep(1ms);
      }
      co_return Error(Errc::TIMED_OUT, "B never accepted");
    });
    ::_exit(1);
  }
  Watchdog dog("introducer death", 60s, a);
  EXPECT_EQ(reap(dying), 0);
  C c(kernel_.home());
  c.run([&](C& self) -> Promise<void> {
    Session& s = *self.session;
    Result<OpenedBushel> toA = co_await s.openBushel("bank");
    Result<OpenedBushel> toB = co_await s.openBushel("auditor");
    CO_CHECK(toA.ok() && toB.ok());
    Bank::Client bank(toA->connection->bootstrap());
    Auditor::Client auditor(toB->connection->bootstrap());
    // B had taken the counter at A; its running audit went with its dead client (a dropped
    // client's calls are cancelled), so B's calls on A stop short of 1000. A keeps no provision
    // of the dead introducer.
    Result<Seen> work = co_await seenAt(bank, toB->server);
    CO_CHECK(work.ok() && work->accepts == 1);
    // Settled: no call arrives for 50 ms in a row (within 5 s), and the audit stopped short.
    uint64_t calls = work->calls;
    int quiet = 0;
    for (int i = 0; i < 500 && quiet < 5; ++i) {
      (void)co_await s.loop().sleep(10ms);
      work = co_await seenAt(bank, toB->server);
      CO_CHECK(work.ok());
      quiet = work->calls == calls ? quiet + 1 : 0;
      calls = work->calls;
    }
    CO_CHECK(quiet == 5);
    CO_CHECK(work->calls < 1000);
    Result<Seen> seen = Error(Errc::FAILED, "not asked");
    for (int i = 0; i < 2000; ++i) {
      seen = co_await seenAt(bank, toB->server);
      CO_CHECK(seen.ok());
      if (seen->provisions == 0) break;
      (void)co_await s.loop().sleep(1ms);
    }
    CO_CHECK(seen->provisions == 0);
    // B's server side dropped the dead client; its client side (the bushel to A) is untouched.
    Result<VatsView> atB = co_await vatsOf(auditor);
    for (int i = 0; i < 2000 && atB.ok() && atB->clients != 1; ++i) {
      (void)co_await s.loop().sleep(1ms);
      atB = co_await vatsOf(auditor);
    }
    CO_CHECK(atB.ok() && atB->clients == 1 && atB->owned == 1);
    // Both serve a new handoff.
    auto opened = co_await bank.open();
    CO_CHECK(opened.ok());
    Counter::Client counter = getCounter(*opened, opened->results())->remote;
    auto audited = co_await auditor.audit([&](auto params, auto& request) -> Status {
      params.setTimes(3);
      return setCounter(request, params, counter);
    });
    CO_CHECK(audited.ok() && audited->results().getLast() == 3);
    co_return {};
  });
  ::kill(a, SIGKILL);
  ::kill(b, SIGKILL);
  reap(a);
  reap(b);
}

TEST_F(KernelHandoffTest, ARecipientThatCannotAcceptLetsTheProviderReclaimTheProvision) {
  const pid_t a = startServer(kernel_.home(), Role::BANK);
  const pid_t d = startServer(kernel_.home(), Role::PLAIN_AUDITOR);
  Watchdog dog("never accepted", 60s, a);
  C c(kernel_.home());
  c.run([&](C& self) -> Promise<void> {
    Session& s = *self.session;
    AGATE_CO_TRY(co_await s.waitForService("bank"));
    AGATE_CO_TRY(co_await s.waitForService("plain"));
    Result<OpenedBushel> toA = co_await s.openBushel("bank");
    Result<OpenedBushel> toD = co_await s.openBushel("plain");
    CO_CHECK(toA.ok() && toD.ok());
    Bank::Client bank(toA->connection->bootstrap());
    Auditor::Client plain(toD->connection->bootstrap());
    auto opened = co_await bank.open();
    CO_CHECK(opened.ok());
    Counter::Client counter = getCounter(*opened, opened->results())->remote;
    // The recipient takes no third-party capability: its call fails, its vine goes, C finishes
    // the Provide and A drops the provision.
    auto audited = co_await plain.audit([&](auto params, auto& request) -> Status {
      params.setTimes(1);
      return setCounter(request, params, counter);
    });
    CO_CHECK(!audited.ok());
    CO_CHECK(audited.code() == Errc::UNSUPPORTED);
    Result<Seen> seen = Error(Errc::FAILED, "not asked");
    for (int i = 0; i < 2000; ++i) {
      seen = co_await seenAt(bank, toD->server);
      CO_CHECK(seen.ok());
      if (seen->provisions == 0) break;
      (void)co_await s.loop().sleep(1ms);
    }
    CO_CHECK(seen->provisions == 0 && seen->bushels == 0);
    // The counter still works for C.
    auto read = co_await counter.add([](auto p) { p.setN(1); });
    CO_CHECK(read.ok() && read->results().getTotal() == 1);
    co_return {};
  });
  ::kill(a, SIGKILL);
  ::kill(d, SIGKILL);
  reap(a);
  reap(d);
}

TEST_F(KernelHandoffTest, AVatIdThatNamesNoIntroducedProcessIsAClearErrorAndOpensNothing) {
  Watchdog dog("hostile vat id", 60s);
  C c(kernel_.home());
  c.run([&](C& self) -> Promise<void> {
    KernelVats& vats = *self.vats;
    auto credit = co_await self.kernel->readBank(self.kernel->bank());
    CO_CHECK(credit.ok());
    // Not a process id at all: refused at once.
    Result<rpc::RpcConnection*> forged = co_await vats.connect(uint64_t{1} << 40);
    CO_CHECK(forged.code() == Errc::NOT_FOUND);
    // Itself.
    Result<rpc::RpcConnection*> self_ = co_await vats.connect(vats.vatId());
    CO_CHECK(self_.code() == Errc::INVALID_ARGUMENT);
    // A process id nobody introduced (the kernel's own first process, or any other): NOT_FOUND
    // once the introduction timeout passes, and nothing was opened or charged.
    Result<rpc::RpcConnection*> stranger = co_await vats.connect(vats.vatId() + 1000);
    CO_CHECK(stranger.code() == Errc::NOT_FOUND);
    CO_CHECK(vats.ownedConnections() == 0);
    auto after = co_await self.kernel->readBank(self.kernel->bank());
    CO_CHECK(after.ok() && after->used == credit->used);
    co_return {};
  });
}

// A client of B that speaks the wire protocol itself over a kernel-opened bushel, so that it can
// send what no RpcConnection would: third-party capabilities it was never given.
struct RawClient {
  std::unique_ptr<Channel> requests, replies;
  std::unique_ptr<MessageSender> tx;
  std::unique_ptr<MessageReceiver> rx;

  static Result<std::unique_ptr<RawClient>> open(caps::BushelRings rings) {
    auto raw = std::make_unique<RawClient>();
    auto requests = Channel::openShared(std::move(rings.request));
    if (!requests) return requests.error();
    auto replies = Channel::openShared(std::move(rings.reply));
    if (!replies) return replies.error();
    raw->requests = std::move(*requests);
    raw->replies = std::move(*replies);
    auto sender = raw->requests->attachSender();
    if (!sender) return sender.error();
    auto receiver = raw->replies->attachReceiver();
    if (!receiver) return receiver.error();
    raw->tx = std::make_unique<MessageSender>(std::move(*sender));
    raw->rx = std::make_unique<MessageReceiver>(*raw->replies, std::move(*receiver),
                                                rpc::rpcReceiverOptions());
    return raw;
  }

  // Auditor.audit(counter, times = 1) on B's bootstrap object, as question `q`, where `counter`
  // is a third-party capability: hosted by `vat`, under a provision id nobody provided.
  Status auditForged(uint32_t q, rpc::VatId vat) {
    Result<OutgoingMessage> m = tx->tryStartMessage(1024);
    if (!m) return m.error();
    auto call = m->initRoot<rpc::wire::Message>().initCall();
    call.setQuestionId(q);
    call.getTarget().setImportedCap(0);
    call.setInterfaceId(capnp::typeId<kvattest::Auditor>());
    call.setMethodId(0);  // audit
    rpc::wire::Payload::Builder p = call.initParams();
    auto params = p.getContent().initAs<kvattest::Auditor::AuditParams>();
    params.setTimes(1);
    rpc::writeCapPointer(params, 0, 0);
    rpc::wire::ThirdPartyCapDescriptor::Builder t = p.initCapTable(1)[0].initThirdPartyHosted();
    t.setVatId(vat);
    t.setProvisionId(7);
    t.setVineId(0);
    return m->send();
  }

  // B's answer to question `q` (OK for results, else the exception's errc), skipping what else
  // B sends meanwhile (the vine's Release); an Abort is PROTOCOL_ERROR or its own errc.
  struct Outcome {
    Errc errc;
  };
  Promise<Outcome> returnOf(EventLoop& loop, uint32_t q) {
    for (;;) {
      Result<IncomingMessage> in = co_await rx->receiveAsync(loop);
      if (!in) co_return in.error();
      if (Status valid = in->validate(); !valid) co_return valid.error();
      rpc::wire::Message::Reader m = in->getRoot<rpc::wire::Message>();
      if (m.which() == rpc::wire::Message::ABORT)
        co_return Outcome{static_cast<Errc>(m.getAbort().getErrc())};
      if (m.which() != rpc::wire::Message::RETURN || m.getReturn().getAnswerId() != q) continue;
      if (m.getReturn().which() == rpc::wire::Return::RESULTS) co_return Outcome{Errc::OK};
      co_return Outcome{static_cast<Errc>(m.getReturn().getException().getErrc())};
    }
  }
};

// A forged third-party capability names a provider and a provision the sender never set up. B
// must not be led to open anything or hold anything: the forger's own call fails, B's other
// clients carry on, and a capability claimed to be hosted by B itself is a protocol violation
// that disconnects the forger.
TEST_F(KernelHandoffTest, ForgedThirdPartyCapabilitiesFailOnlyTheForgersCallAndOpenNothing) {
  const pid_t a = startServer(kernel_.home(), Role::BANK);
  const pid_t b = startServer(kernel_.home(), Role::AUDITOR);
  Watchdog dog("forged third-party capabilities", 90s, a);
  C c(kernel_.home());
  c.run(
      [&](C& self) -> Promise<void> {
        Session& s = *self.session;
        KernelConnection& k = *self.kernel;
        AGATE_CO_TRY(co_await s.waitForService("bank"));
        AGATE_CO_TRY(co_await s.waitForService("auditor"));
        Result<OpenedBushel> toA = co_await s.openBushel("bank");
        Result<OpenedBushel> toB = co_await s.openBushel("auditor");
        CO_CHECK(toA.ok() && toB.ok());
        Bank::Client bank(toA->connection->bootstrap());
        Auditor::Client auditor(toB->connection->bootstrap());
        Result<VatsView> before = co_await vatsOf(auditor);
        CO_CHECK(before.ok());

        auto rawBushel = [&]() -> Promise<std::unique_ptr<RawClient>> {
          Result<caps::Cap<caps::Bushel>> cap =
              co_await k.openBushel(k.registry(), "auditor", k.bank());
          AGATE_CO_TRY(cap);
          Result<caps::BushelRings> rings = co_await k.bushelRings(*cap);
          AGATE_CO_TRY(rings);
          co_return RawClient::open(std::move(*rings));
        };
        Result<std::unique_ptr<RawClient>> raw = co_await rawBushel();
        CO_CHECK(raw.ok());

        // Hosted by A, a live process, but nobody introduced B to it: B waits out its
        // introduction timeout, opens nothing, and only this call fails.
        CO_CHECK((*raw)->auditForged(1, toA->server).ok());
        auto first = co_await (*raw)->returnOf(self.loop, 1);
        CO_CHECK(first.ok() && first->errc == Errc::NOT_FOUND);
        // Hosted by no process at all: refused at once, the same way.
        CO_CHECK((*raw)->auditForged(2, uint64_t{1} << 40).ok());
        auto second = co_await (*raw)->returnOf(self.loop, 2);
        CO_CHECK(second.ok() && second->errc == Errc::NOT_FOUND);

        Result<VatsView> after = co_await vatsOf(auditor);
        CO_CHECK(after.ok());
        CO_CHECK(after->owned == before->owned && after->owned == 0);
        CO_CHECK(after->introductions == before->introductions);
        CO_CHECK(after->bankUsed == before->bankUsed);
        CO_CHECK(after->clients == before->clients + 1);  // the raw client is still served
        Result<Seen> seen = co_await seenAt(bank, toB->server);
        CO_CHECK(seen.ok() && seen->bushels == 0 && seen->accepts == 0);

        // Hosted by its receiver, B: a protocol violation. B aborts the forger's connection and
        // drops it; its other client (this session) carries on.
        CO_CHECK((*raw)->auditForged(3, toB->server).ok());
        auto third = co_await (*raw)->returnOf(self.loop, 3);
        CO_CHECK(third.ok() && third->errc == Errc::PROTOCOL_ERROR);
        Result<VatsView> last = Error(Errc::FAILED, "not asked");
        for (int i = 0; i < 2000; ++i) {
          last = co_await vatsOf(auditor);
          CO_CHECK(last.ok());
          if (last->clients == before->clients) break;
          (void)co_await s.loop().sleep(1ms);
        }
        CO_CHECK(last->clients == before->clients && last->owned == 0);
        co_return {};
      },
      60s);
  ::kill(a, SIGKILL);
  ::kill(b, SIGKILL);
  reap(a);
  reap(b);
}

// The event router: this process registers "local" and is a client of A's "bank" on one kernel
// connection. A client X of "local" dies: only the server side hears it. A dies: only the
// client side does.
TEST_F(KernelHandoffTest, OneConnectionServesAndIsAClientAndEachDeathReachesOnlyItsSide) {
  const pid_t a = startServer(kernel_.home(), Role::BANK);
  const pid_t x = startClient(
      kernel_.home(),
      [](Session& s) -> Promise<void> {
        AGATE_CO_TRY(co_await s.waitForService("local"));
        Result<Counter::Client> counter = co_await s.open<Counter>("local");
        if (!counter) co_return counter.error();
        auto added = co_await counter->add([](auto p) { p.setN(1); });
        if (!added) co_return added.error();
        (void)co_await s.loop().sleep(std::chrono::hours(1));  // until killed
        co_return {};
      },
      "local-client");
  Watchdog dog("client and server on one connection", 60s, a);
  EventLoop loop;
  auto kernel = KernelConnection::tryAttach(loop, kernel_.home(), "both");
  ASSERT_TRUE(kernel.ok());
  KernelEvents events(**kernel);
  Status done;
  {
    Session s(events);
    auto host = loop.run(ServiceHost::create(
        events, "local", [](ServedClient&) { return std::make_unique<CounterImpl>(); }));
    ASSERT_TRUE(host.ok()) << describe(host.error());
    ServiceHost& h = **host;
    done = loop.run(loop.deadline(
        [&]() -> Promise<void> {
          Promise<void> serving = h.run();
          AGATE_CO_TRY(co_await s.waitForService("bank"));
          Result<Bank::Client> bank = co_await s.open<Bank>("bank");
          Result<Counter::Client> self = co_await s.open<Counter>("local");  // its own service
          CO_CHECK(bank.ok() && self.ok());
          CO_CHECK((co_await bank->open()).ok());
          CO_CHECK((co_await self->add([](auto p) { p.setN(1); })).ok());
          for (int i = 0; i < 5000 && h.clientCount() < 2; ++i) (void)co_await loop.sleep(1ms);
          CO_CHECK(h.clientCount() == 2);  // X and this process

          ::kill(x, SIGKILL);  // a client of "local": the server side drops it ...
          for (int i = 0; i < 5000 && h.clientsDropped() < 1; ++i) (void)co_await loop.sleep(1ms);
          CO_CHECK(h.clientsDropped() == 1 && h.clientCount() == 1);
          CO_CHECK((co_await bank->open()).ok());  // ... and the client side never hears of it
          CO_CHECK(s.openCount() == 2);

          ::kill(a, SIGKILL);  // the server of "bank": the client side fails DISCONNECTED ...
          rpc::RpcConnection* toA = bank->cap().connection();
          for (int i = 0; i < 5000 && toA->isOpen(); ++i) (void)co_await loop.sleep(1ms);
          auto late = co_await bank->open();
          CO_CHECK(late.code() == Errc::DISCONNECTED);
          CO_CHECK(s.openCount() == 1);
          // ... and the server side serves on.
          auto still = co_await self->add([](auto p) { p.setN(1); });
          CO_CHECK(still.ok() && still->results().getTotal() == 2);
          CO_CHECK(h.clientCount() == 1 && h.clientsDropped() == 1);
          *bank = Bank::Client();
          *self = Counter::Client();
          h.stop();
          co_return co_await serving;
        }(),
        30s));
  }
  EXPECT_TRUE(done.ok()) << describe(done.error());
  EXPECT_EQ(events.unroutedEvents(), 0u);
  reap(x);
  reap(a);
}

// "relay": an Auditor whose keep() passes the client's counter on to another auditor (`next`),
// through this server: the relay is not a client of its client, so the counter goes as a proxy.
class RelayImpl final : public Auditor::Server {
 public:
  explicit RelayImpl(Auditor::Client& next) : next_(next) {}
  Promise<void> keep(KeepContext context) override {
    auto counter = getCounter(context, context.params());
    if (!counter) co_return counter.error();
    Counter::Client passed = std::move(counter->remote);
    auto kept = co_await next_.keep(
        [&](auto params, auto& request) -> Status { return setCounter(request, params, passed); });
    if (!kept) co_return kept.error();
    co_return {};
  }

 private:
  Auditor::Client& next_;
};

// A server passes a capability of one of its clients on to another server (a proxy through
// itself, held by its connection to that server), then the client dies: the server drops the
// client and serves on, the connection stays until the proxy lets go of it, and the other
// server's calls on the capability fail DISCONNECTED.
TEST_F(KernelHandoffTest, AClientWhoseCapabilityWasPassedOnDiesAndItsServerServesOn) {
  const pid_t b = startServer(kernel_.home(), Role::AUDITOR);
  const pid_t x = startClient(
      kernel_.home(),
      [](Session& s) -> Promise<void> {
        AGATE_CO_TRY(co_await s.waitForService("relay"));
        Result<Auditor::Client> relay = co_await s.open<Auditor>("relay");
        if (!relay) co_return relay.error();
        auto kept = co_await relay->keep([](auto params, auto& request) -> Status {
          return setCounter(request, params, std::make_unique<CounterImpl>());
        });
        if (!kept) co_return kept.error();
        (void)co_await s.loop().sleep(std::chrono::hours(1));  // until killed
        co_return {};
      },
      "relay-client");
  Watchdog dog("a passed-on client dies", 60s, b);
  EventLoop loop;
  auto kernel = KernelConnection::tryAttach(loop, kernel_.home(), "relay");
  ASSERT_TRUE(kernel.ok());
  KernelEvents events(**kernel);
  Status done;
  {
    Session s(events);
    Auditor::Client next;
    auto host = loop.run(ServiceHost::create(
        events, "relay", [&](ServedClient&) { return std::make_unique<RelayImpl>(next); }));
    ASSERT_TRUE(host.ok()) << describe(host.error());
    ServiceHost& h = **host;
    done = loop.run(loop.deadline(
        [&]() -> Promise<void> {
          // B first: the relay forwards to it from its first call on (X waits until the
          // relay is served: the router keeps it until run()).
          AGATE_CO_TRY(co_await s.waitForService("auditor"));
          Result<Auditor::Client> auditor = co_await s.open<Auditor>("auditor");
          CO_CHECK(auditor.ok());
          next = *auditor;
          Promise<void> serving = h.run();
          // X's counter reaches B through this process: B's pokes add to it.
          Result<int64_t> total = Error(Errc::NOT_FOUND, "not kept yet");
          for (int i = 0; i < 5000; ++i) {
            auto poked = co_await next.poke();
            if (poked) {
              total = poked->results().getTotal();
              break;
            }
            (void)co_await loop.sleep(1ms);
          }
          CO_CHECK(total.ok() && *total == 1);
          CO_CHECK(h.clientCount() == 1);

          ::kill(x, SIGKILL);  // the relay drops X, whose counter B still holds through it
          for (int i = 0; i < 5000 && h.clientsDropped() < 1; ++i) (void)co_await loop.sleep(1ms);
          CO_CHECK(h.clientsDropped() == 1 && h.clientCount() == 0);
          auto late = co_await next.poke();
          CO_CHECK(late.code() == Errc::DISCONNECTED);
          // The relay serves on: B's connection to it, and new clients.
          Result<Auditor::Client> self = co_await s.open<Auditor>("relay");
          CO_CHECK(self.ok());
          auto again = co_await self->keep([](auto params, auto& request) -> Status {
            return setCounter(request, params, std::make_unique<CounterImpl>());
          });
          CO_CHECK(again.ok());
          auto poked = co_await next.poke();
          CO_CHECK(poked.ok() && poked->results().getTotal() == 1);
          next = Auditor::Client();
          *auditor = Auditor::Client();
          *self = Auditor::Client();
          h.stop();
          co_return co_await serving;
        }(),
        30s));
  }
  // The host went first, while the session's connection to B still held the proxy of X's
  // counter: the router keeps X's connection until it goes with the router, unreferenced now.
  EXPECT_EQ(events.keptCount(), 1u);
  EXPECT_TRUE(done.ok()) << describe(done.error());
  reap(x);
  ::kill(b, SIGKILL);
  reap(b);
}

}  // namespace
}  // namespace agate::client
