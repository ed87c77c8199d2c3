// Typed RPC over bushels a real agate-kernel opens (client/: Session, ServiceHost): a client opens
// a service by name and pipelines; the bushel is paid from the bank the client names; the server
// charges per-client state to that bank (a flooding client gets QUOTA_EXCEEDED, others carry
// on); clients are served fairly; closing a bushel, or killing the client, drops its state on
// the server with no pages left behind; killing the server fails every pending call
// DISCONNECTED promptly.
//
// Processes: the kernel (KernelProcess), the server (a forked child serving "store" through
// client::serveService, dying with the test), clients in the test process and in forked children.
// Children are forked before the test process makes its loop (kernel_fixture.h). Watchdogs: the
// Watchdog per test (started after the forks), alarm() in every child, ctest's TIMEOUT.
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "agate/client/main.h"
#include "agate/client/service_host.h"
#include "agate/client/session.h"
#include "agate/kernel/bushel.h"
#include "agate/kernel/space_bank.h"
#include "bushel_rpc_test.agate.h"
#include "kernel_fixture.h"
#include "session_harness.h"
#include "support/proc_self.h"
#include "support/watchdog.h"

namespace agate::client {
namespace {

using namespace std::chrono_literals;
using agate::testing::KernelProcess;
using agate::testing::Watchdog;
using caps::Cap;
using caps::KernelConnection;
using caps::SpaceBank;
using test::describe;
using test::reap;
using test::runSession;
using test::startClient;
using Store = busheltest::stubs::Store;
using Item = busheltest::stubs::Item;

// ---------------------------------------------------------------------------------------------
// The server (runs in a forked child)

struct Shared {
  uint64_t served = 0;
  uint64_t totalHeld = 0;
  uint32_t hanging = 0;
  uint32_t clients = 0;
  uint64_t dropped = 0;  // StoreImpls destroyed: clients whose state the host dropped
};

class ItemImpl final : public Item::Server {
 public:
  ItemImpl(uint32_t bytes, StateCharge charge, Shared& shared)
      : bytes_(bytes), charge_(std::move(charge)), shared_(shared) {
    shared_.totalHeld += bytes_;
  }
  ~ItemImpl() override { shared_.totalHeld -= bytes_; }
  Promise<void> measure(MeasureContext context) override {
    auto results = context.initResults();
    if (!results) return readyPromise<void>(results.error());
    results->setBytes(bytes_);
    return readyPromise<void>(Status{});
  }

 private:
  uint32_t bytes_;
  StateCharge charge_;
  Shared& shared_;
};

class StoreImpl final : public Store::Server {
 public:
  StoreImpl(ServedClient& client, Shared& shared) : client_(client), shared_(shared) {
    ++shared_.clients;
  }
  ~StoreImpl() override {
    --shared_.clients;
    ++shared_.dropped;
  }

  Promise<void> hold(HoldContext context) override {
    const uint32_t bytes = context.params().getBytes();
    if (bytes == 0) co_return Error(Errc::INVALID_ARGUMENT, "hold 0 bytes");
    Result<StateCharge> charge = co_await client_.quota().charge(bytes);
    if (!charge) co_return charge.error();
    auto results = context.initResults();
    if (!results) co_return results.error();
    co_return setItem(context, *results,
                      std::make_unique<ItemImpl>(bytes, std::move(*charge), shared_));
  }
  Promise<void> ping(PingContext context) override {
    const auto work = std::chrono::microseconds(context.params().getWork());
    // Blocks the server's thread (a slow service) without taking a CPU from the clients: on a
    // machine with few CPUs, a busy server would starve the flooder it is meant to be flooded by.
    if (work.count() > 0) std::this_thread::sleep_for(std::min(work, 1000us));
    auto results = context.initResults();
    if (!results) return readyPromise<void>(results.error());
    results->setServed(++shared_.served);
    return readyPromise<void>(Status{});
  }
  Promise<void> hang(HangContext) override {
    struct Counted {
      Shared& shared;
      ~Counted() { --shared.hanging; }
    };
    ++shared_.hanging;
    Counted counted{shared_};
    (void)co_await EventLoop::current()->sleep(std::chrono::hours(1));
    co_return {};
  }
  Promise<void> misbehave(MisbehaveContext) override {
    client_.disconnect(Error(Errc::PROTOCOL_ERROR, "the client broke the store's rules"));
    return readyPromise<void>(Status{});
  }
  Promise<void> stats(StatsContext context) override {
    auto results = context.initResults();
    if (!results) return readyPromise<void>(results.error());
    results->setClients(shared_.clients);
    results->setMine(client_.quota().objectBytes());
    results->setConnection(client_.quota().connectionBytes());
    results->setAllowancePages(client_.quota().allowancePages());
    results->setTotalHeld(shared_.totalHeld);
    results->setHanging(shared_.hanging);
    results->setDropped(shared_.dropped);
    return readyPromise<void>(Status{});
  }

 private:
  ServedClient& client_;
  Shared& shared_;
};

// Forks the server: it registers "store" and serves until SIGTERM, dying with the test.
pid_t startServer(const std::string& home, uint32_t messagesPerTurn = 16,
                  bool chargeConnections = true) {
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid != 0) return pid;
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() != parent) ::_exit(1);
  ::alarm(60);
  Shared shared;
  ServiceOptions options;
  options.messagesPerTurn = messagesPerTurn;
  options.stateGrowthPages = 4;
  options.chargeConnections = chargeConnections;
  std::string homeArg = home;
  char name[] = "bushel-store";
  char homeFlag[] = "--home";
  char* argv[] = {name, homeFlag, homeArg.data(), nullptr};
  const int rc = serveService(
      3, argv, "store",
      [&](ServedClient& client) { return std::make_unique<StoreImpl>(client, shared); }, options);
  ::_exit(rc);
}

template <class T>
Promise<T> awaitTyped(T value) {
  co_return std::move(value);
}

struct StatsView {
  uint32_t clients = 0;
  uint64_t mine = 0;
  uint64_t allowancePages = 0;
  uint64_t totalHeld = 0;
  uint32_t hanging = 0;
  uint64_t dropped = 0;
  uint64_t connection = 0;
};

// Holds `count` items of `bytes` each from `store`, adding them to `items`.
Promise<void> holdItems(const Store::Client& store, int count, uint32_t bytes,
                        std::vector<Item::Client>& items) {
  for (int i = 0; i < count; ++i) {
    auto held = co_await store.hold([bytes](auto p) { p.setBytes(bytes); });
    if (!held) co_return held.error();
    items.push_back(getItem(*held, held->results())->remote);
  }
  co_return {};
}

Promise<StatsView> statsOf(const Store::Client& store) {
  auto r = co_await store.stats();
  if (!r) co_return r.error();
  auto s = r->results();
  co_return StatsView{s.getClients(), s.getMine(),    s.getAllowancePages(), s.getTotalHeld(),
                      s.getHanging(), s.getDropped(), s.getConnection()};
}

// Polls stats until `done` holds (the server learns of closes and deaths asynchronously).
template <class Done>
Promise<StatsView> statsWhen(EventLoop& loop, const Store::Client& store, Done done,
                             Duration limit = 5s) {
  const auto end = std::chrono::steady_clock::now() + limit;
  for (;;) {
    Result<StatsView> s = co_await statsOf(store);
    if (!s) co_return s.error();
    if (done(*s) || std::chrono::steady_clock::now() > end) co_return *s;
    (void)co_await loop.sleep(2ms);
  }
}

Promise<uint64_t> usedOf(KernelConnection& k, Cap<SpaceBank> bank) {
  auto credit = co_await k.readBank(bank);
  if (!credit) co_return credit.error();
  co_return credit->used;
}

// A bushel to "store" paid from a bank of its own, and what the bushel alone costs that bank.
struct PaidBushel {
  Cap<SpaceBank> bank;
  OpenedBushel opened;
  uint64_t rings = 0;
};
Promise<PaidBushel> openPaidBushel(Session& s) {
  Result<Cap<SpaceBank>> bank = co_await s.kernel().createBank(s.bank(), 1000);
  if (!bank) co_return bank.error();
  Result<OpenedBushel> opened = co_await s.openBushel("store", *bank);
  if (!opened) co_return opened.error();
  Result<uint64_t> rings = co_await usedOf(s.kernel(), *bank);
  if (!rings) co_return rings.error();
  co_return PaidBushel{*bank, std::move(*opened), *rings};
}

class BushelRpcTest : public ::testing::Test {
 protected:
  KernelProcess kernel_;
};

// ---------------------------------------------------------------------------------------------

// agate::run (and agate::serve) take every descriptor the hard limit allows before attaching: a
// server holds two per client, and the usual soft limit of 1024 must not be what bounds them.
TEST(ProgramMainTest, RunRaisesTheDescriptorLimitToItsHardLimit) {
  Watchdog dog("descriptor limit", 30s);
  KernelProcess kernel;
  rlimit before{};
  ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &before), 0);
  ASSERT_GE(before.rlim_max, rlim_t{64});
  rlimit lowered = before;
  lowered.rlim_cur = 64;
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &lowered), 0);
  std::string program = "limits", homeFlag = "--home", home = kernel.home();
  char* argv[] = {program.data(), homeFlag.data(), home.data(), nullptr};
  rlim_t seen = 0;
  const int rc = agate::client::runSession(3, argv, [&](Session&) -> Promise<void> {
    rlimit now{};
    ::getrlimit(RLIMIT_NOFILE, &now);
    seen = now.rlim_cur;
    co_return {};
  });
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &before), 0);
  EXPECT_EQ(rc, 0);
  EXPECT_EQ(seen, before.rlim_max);
}

// A state charge larger than one growth may be (sizes often come from the client: count x size)
// is refused before anything else, so `used + bytes` cannot wrap and no kernel call goes out.
TEST(ClientQuotaTest, AChargeLargerThanOneGrowthIsRefusedAtOnce) {
  Watchdog dog("huge charge", 30s);
  KernelProcess kernel;
  EventLoop loop;
  auto conn = std::move(KernelConnection::tryAttach(loop, kernel.home(), "quota")).value();
  ClientQuota quota(*conn, Cap<caps::Service>{}, 0, 1);
  for (uint64_t bytes : {kernel::Bushel::MAX_STATE_GROWTH * kernel::PAGE_BYTES + 1, ~uint64_t{0}}) {
    Result<StateCharge> charge = loop.run(quota.charge(bytes));
    ASSERT_FALSE(charge.ok());
    EXPECT_EQ(charge.code(), Errc::INVALID_ARGUMENT);
    EXPECT_STREQ(charge.error().detail, "a state charge larger than one growth may be");
    EXPECT_EQ(quota.usedBytes(), 0u);
  }
}

TEST_F(BushelRpcTest, ATypedClientOpensAServiceByNameAndAPipelinedChainTakesOneRoundTrip) {
  const pid_t server = startServer(kernel_.home());
  Watchdog dog("open and pipeline", 60s, server);
  runSession(kernel_.home(), [&](Session& s) -> Promise<void> {
    AGATE_CO_TRY(co_await s.waitForService("store"));
    Result<Store::Client> store = co_await s.open<Store>("store");
    CO_CHECK(store.ok());
    rpc::RpcConnection& connection = *store->cap().connection();
    const rpc::RpcStats before = connection.stats();
    // hold(...).item.measure(): the second call is targeted at the first's promised answer.
    auto held = store->hold([](auto p) { p.setBytes(100); });
    auto measured = held.getItem().measure();
    CO_CHECK(connection.stats().callsSent == before.callsSent + 2);
    CO_CHECK(connection.stats().returnsReceived == before.returnsReceived);
    auto r = co_await measured;
    CO_CHECK(r.ok());
    CO_CHECK(r->results().getBytes() == 100);
    auto ping = co_await store->ping();
    CO_CHECK(ping.ok() && ping->results().getServed() == 1);
    CO_CHECK(s.openCount() == 1);
    co_return {};
  });
  ::kill(server, SIGTERM);
  EXPECT_EQ(reap(server), 0) << "the server unregisters and exits cleanly on SIGTERM";
}

TEST_F(BushelRpcTest, OpeningAnUnknownServiceIsNotFoundAndChargesNothing) {
  Watchdog dog("unknown service", 60s);
  runSession(kernel_.home(), [&](Session& s) -> Promise<void> {
    Result<uint64_t> before = co_await usedOf(s.kernel(), s.bank());
    CO_CHECK(before.ok());
    Result<Store::Client> store = co_await s.open<Store>("no-such-service");
    CO_CHECK(store.code() == Errc::NOT_FOUND);
    CO_CHECK((co_await usedOf(s.kernel(), s.bank())).value() == *before);
    CO_CHECK(s.openCount() == 0);
    Status waited = co_await s.waitForService("no-such-service", 50ms);
    CO_CHECK(waited.code() == Errc::TIMED_OUT);
    co_return {};
  });
}

TEST_F(BushelRpcTest, TheBushelAndTheStateItCausesArePaidFromTheClientsBankAndComeBackOnClose) {
  const pid_t server = startServer(kernel_.home());
  Watchdog dog("client-paid state", 60s, server);
  runSession(kernel_.home(), [&](Session& s) -> Promise<void> {
    AGATE_CO_TRY(co_await s.waitForService("store"));
    Result<PaidBushel> paid = co_await openPaidBushel(s);
    CO_CHECK(paid.ok());
    const Cap<SpaceBank> bank = paid->bank;
    OpenedBushel* opened = &paid->opened;
    const uint64_t rings = paid->rings;
    CO_CHECK(rings > 2);  // the record and both rings
    Store::Client store(opened->connection->bootstrap());
    {
      std::vector<Item::Client> items;
      CO_CHECK((co_await holdItems(store, 10, 4000, items)).ok());
      Result<StatsView> st = co_await statsOf(store);
      // The connection's buffers and table entries are paid from the same quota.
      CO_CHECK(st.ok() && st->mine == 40000 && st->connection > 0);
      CO_CHECK(st->allowancePages * 4096 >= st->mine + st->connection);
      CO_CHECK((co_await usedOf(s.kernel(), bank)).value() == rings + st->allowancePages);
    }  // the Items are released: their bytes go back to the quota (the allowance stays)
    Result<StatsView> st = co_await statsWhen(s.loop(), store, [](auto v) { return v.mine == 0; });
    CO_CHECK(st.ok() && st->mine == 0 && st->totalHeld == 0);
    store = Store::Client();
    AGATE_CO_TRY(co_await s.close(opened->koid));
    CO_CHECK(s.openCount() == 0);
    // The kernel tears the bushel down: its rings and its state pages return to the bank.
    for (int i = 0; i < 500 && (co_await usedOf(s.kernel(), bank)).value() != 0; ++i)
      (void)co_await s.loop().sleep(2ms);
    CO_CHECK((co_await usedOf(s.kernel(), bank)).value() == 0);
    co_return {};
  });
  ::kill(server, SIGTERM);
  EXPECT_EQ(reap(server), 0);
}

// ServiceOptions::chargeConnections off: the client's connection takes nothing from its quota
// (no floor either), and its objects are charged as before.
TEST_F(BushelRpcTest, WithConnectionChargesOffOnlyTheObjectsArePaidFromTheClientsBank) {
  const pid_t server = startServer(kernel_.home(), 16, /*chargeConnections=*/false);
  Watchdog dog("connection charges off", 60s, server);
  runSession(kernel_.home(), [&](Session& s) -> Promise<void> {
    AGATE_CO_TRY(co_await s.waitForService("store"));
    Result<PaidBushel> paid = co_await openPaidBushel(s);
    CO_CHECK(paid.ok());
    Store::Client store(paid->opened.connection->bootstrap());
    std::vector<Item::Client> items;
    CO_CHECK((co_await holdItems(store, 3, 1000, items)).ok());
    Result<StatsView> st = co_await statsOf(store);
    CO_CHECK(st.ok() && st->mine == 3000 && st->connection == 0);
    // One growth (stateGrowthPages) pays for the three items: no floor was added to it.
    CO_CHECK(st->allowancePages == 4);
    CO_CHECK((co_await usedOf(s.kernel(), paid->bank)).value() == paid->rings + 4);
    co_return {};
  });
  ::kill(server, SIGTERM);
  EXPECT_EQ(reap(server), 0);
}

TEST_F(BushelRpcTest, AFloodingClientRunsIntoItsOwnQuotaWhileOtherClientsAndTheServerCarryOn) {
  constexpr uint64_t STATE_PAGES = 16;
  const uint64_t FLOOR = ServiceOptions{}.connectionFloorBytes;
  ASSERT_EQ(FLOOR, 8u * 4096u);
  const pid_t server = startServer(kernel_.home());
  Watchdog dog("quota exhaustion", 60s, server);
  runSession(kernel_.home(), [&](Session& s) -> Promise<void> {
    AGATE_CO_TRY(co_await s.waitForService("store"));
    Result<Cap<SpaceBank>> tight = co_await s.kernel().createBank(s.bank(), 1000);
    Result<Cap<SpaceBank>> roomy = co_await s.kernel().createBank(s.bank(), 1000);
    CO_CHECK(tight.ok() && roomy.ok());
    Result<OpenedBushel> a = co_await s.openBushel("store", *tight);
    Result<OpenedBushel> b = co_await s.openBushel("store", *roomy);
    CO_CHECK(a.ok() && b.ok());
    // The flooder's bank: what the bushel costs plus 16 pages of server state (8 of them the
    // floor its objects leave to its connection).
    const uint64_t rings = (co_await usedOf(s.kernel(), *tight)).value();
    AGATE_CO_TRY(co_await s.kernel().setBankLimit(*tight, rings + STATE_PAGES));
    Store::Client flooder(a->connection->bootstrap());
    Store::Client other(b->connection->bootstrap());

    std::vector<Item::Client> hoard;
    Error refused;
    for (int i = 0; i < 200 && refused.code == Errc::OK; ++i) {
      auto held = co_await flooder.hold([](auto p) { p.setBytes(1000); });
      if (held) {
        hoard.push_back(getItem(*held, held->results())->remote);
      } else {
        refused = held.error();
      }
    }
    CO_CHECK(refused.code == Errc::QUOTA_EXCEEDED);
    CO_CHECK((co_await usedOf(s.kernel(), *tight)).value() == rings + STATE_PAGES);
    // 16 pages of 1000-byte items, less the floor left to the connection (or what it holds
    // beyond it): the hold refused did not fit in what was left.
    Result<StatsView> mine = co_await statsOf(flooder);
    CO_CHECK(mine.ok() && mine->mine == hoard.size() * 1000 && mine->connection > 0);
    const uint64_t kept = mine->mine + std::max<uint64_t>(mine->connection, FLOOR);
    CO_CHECK(kept <= STATE_PAGES * 4096);
    CO_CHECK(kept + 1000 > STATE_PAGES * 4096);
    // The floor is the connection's: calls at once, more than it ever made, each a new entry,
    // are served.
    std::vector<Promise<void>> pings;
    for (int i = 0; i < 16; ++i)
      pings.push_back([](Store::Client c) -> Promise<void> {
        auto r = co_await c.ping();
        AGATE_CO_TRY(r);
        co_return {};
      }(flooder));
    for (Promise<void>& p : pings) CO_CHECK((co_await p).ok());
    CO_CHECK(a->connection->isOpen());
    // The flooder's connection is fine (only its hold was refused), and so is everyone else.
    CO_CHECK((co_await flooder.ping()).ok());
    auto otherHeld = co_await other.hold([](auto p) { p.setBytes(1000); });
    CO_CHECK(otherHeld.ok());
    Result<StatsView> st = co_await statsOf(other);
    CO_CHECK(st.ok() && st->clients == 2 && st->mine == 1000);
    // Released state is reusable within the allowance: no new pages needed.
    const uint64_t hoarded = hoard.size() * 1000;
    hoard.pop_back();
    st = co_await statsWhen(s.loop(), flooder, [&](auto v) { return v.mine < hoarded; });
    CO_CHECK(st.ok() && st->mine == hoarded - 1000);
    auto again = co_await flooder.hold([](auto p) { p.setBytes(1000); });
    CO_CHECK(again.ok());
    co_return {};
  });
  ::kill(server, SIGTERM);
  EXPECT_EQ(reap(server), 0);
}

TEST_F(BushelRpcTest, ClosingABushelDropsThatClientsStateOnTheServer) {
  const pid_t server = startServer(kernel_.home());
  Watchdog dog("close drops state", 60s, server);
  runSession(kernel_.home(), [&](Session& s) -> Promise<void> {
    AGATE_CO_TRY(co_await s.waitForService("store"));
    Result<OpenedBushel> a = co_await s.openBushel("store");
    Result<OpenedBushel> b = co_await s.openBushel("store");
    CO_CHECK(a.ok() && b.ok());
    Store::Client leaving(a->connection->bootstrap());
    Store::Client staying(b->connection->bootstrap());
    auto held = co_await leaving.hold([](auto p) { p.setBytes(3000); });
    CO_CHECK(held.ok());
    auto hung = leaving.hang();
    Result<StatsView> st =
        co_await statsWhen(s.loop(), staying, [](auto v) { return v.hanging == 1; });
    CO_CHECK(st.ok() && st->clients == 2 && st->totalHeld == 3000 && st->hanging == 1);

    AGATE_CO_TRY(co_await s.close(a->koid));
    auto r = co_await hung;
    CO_CHECK(r.code() == Errc::DISCONNECTED);  // the pending call fails as the client hangs up
    CO_CHECK((co_await leaving.ping()).code() == Errc::DISCONNECTED);
    st = co_await statsWhen(s.loop(), staying, [](auto v) { return v.clients == 1; });
    CO_CHECK(st.ok() && st->clients == 1 && st->totalHeld == 0 && st->hanging == 0 &&
             st->dropped == 1);
    CO_CHECK(s.close(a->koid).isReady());  // closing twice is a no-op
    Status unknown = co_await s.close(a->koid + 1000);
    CO_CHECK(unknown.code() == Errc::NOT_FOUND);
    co_return {};
  });
  ::kill(server, SIGTERM);
  EXPECT_EQ(reap(server), 0);
}

// A closed bushel's rings (descriptors, mappings) and connection stay while anything refers to
// them, and go once nothing does: a client that opens and closes bushels for ever holds no more.
TEST_F(BushelRpcTest, AClosedBushelIsFreedOnceNothingRefersToItSoOpeningAndClosingLeaksNothing) {
  const pid_t server = startServer(kernel_.home());
  Watchdog dog("closed bushels freed", 60s, server);
  runSession(kernel_.home(), [&](Session& s) -> Promise<void> {
    AGATE_CO_TRY(co_await s.waitForService("store"));
    auto cycle = [&]() -> Promise<void> {
      Result<OpenedBushel> opened = co_await s.openBushel("store");
      AGATE_CO_TRY(opened);
      Store::Client store(opened->connection->bootstrap());
      AGATE_CO_TRY(co_await store.ping());
      co_return co_await s.close(opened->koid);
    };
    auto settled = [&]() -> Promise<void> {  // a few turns: the sweep is posted
      for (int i = 0; i < 3; ++i) AGATE_CO_TRY(co_await s.loop().sleep(1ms));
      co_return {};
    };
    AGATE_CO_TRY(co_await cycle());  // the first opening's one-off costs come before the count
    AGATE_CO_TRY(co_await settled());
    CO_CHECK(s.heldCount() == 0);
    const int fds = agate::testing::openFdCount();
    const int maps = agate::testing::mappingCount();
    CO_CHECK(fds > 0 && maps > 0);
    for (int i = 0; i < 100; ++i) AGATE_CO_TRY(co_await cycle());
    AGATE_CO_TRY(co_await settled());
    CO_CHECK(s.heldCount() == 0 && s.openCount() == 0);
    CO_CHECK(agate::testing::openFdCount() == fds);
    CO_CHECK(agate::testing::mappingCount() == maps);

    // A closed bushel something still refers to is kept, safe to use (calls fail DISCONNECTED)
    // and to drop; it goes once the last reference does.
    Result<OpenedBushel> kept = co_await s.openBushel("store");
    CO_CHECK(kept.ok());
    Store::Client held(kept->connection->bootstrap());
    AGATE_CO_TRY(co_await held.ping());
    const caps::Koid koid = kept->koid;
    kept = Error(Errc::CANCELLED, "dropped");  // the OpenedBushel's reference goes; `held` stays
    AGATE_CO_TRY(co_await s.close(koid));
    AGATE_CO_TRY(co_await settled());
    CO_CHECK(s.heldCount() == 1 && s.openCount() == 0);
    CO_CHECK((co_await held.ping()).code() == Errc::DISCONNECTED);
    CO_CHECK((co_await s.close(koid)).ok());  // closing it again changes nothing
    held = Store::Client();  // the last reference: the session frees the link by itself
    AGATE_CO_TRY(co_await settled());
    CO_CHECK(s.heldCount() == 0);
    CO_CHECK(agate::testing::openFdCount() == fds);
    CO_CHECK((co_await s.close(koid)).code() == Errc::NOT_FOUND);  // let go: no longer held
    co_return {};
  });
  ::kill(server, SIGTERM);
  EXPECT_EQ(reap(server), 0);
}

TEST_F(BushelRpcTest, KillingAClientDropsItsStateOnTheServerAndLeaksNoPages) {
  const pid_t server = startServer(kernel_.home());
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t victim = startClient(kernel_.home(), [&](Session& s) -> Promise<void> {
    AGATE_CO_TRY(co_await s.waitForService("store"));
    Result<Store::Client> store = co_await s.open<Store>("store");
    if (!store) co_return store.error();
    std::vector<Item::Client> items;
    for (int i = 0; i < 5; ++i) {
      auto held = co_await store->hold([](auto p) { p.setBytes(2000); });
      if (!held) co_return held.error();
      items.push_back(getItem(*held, held->results())->remote);
    }
    auto hung = store->hang();  // the parent waits until the server runs it
    const char byte = 1;
    if (::write(ready[1], &byte, 1) != 1) co_return Error(Errc::SYSTEM_ERROR, "pipe");
    (void)co_await s.loop().sleep(std::chrono::hours(1));  // until killed
    co_return {};
  });
  Watchdog dog("client kill -9", 60s, server);
  char byte = 0;
  ASSERT_EQ(::read(ready[0], &byte, 1), 1) << "the victim did not get going";
  runSession(kernel_.home(), [&](Session& s) -> Promise<void> {
    Result<Store::Client> store = co_await s.open<Store>("store");
    CO_CHECK(store.ok());
    Result<StatsView> st = co_await statsWhen(s.loop(), *store, [](auto v) {
      return v.clients == 2 && v.totalHeld == 10000 && v.hanging == 1;
    });
    CO_CHECK(st.ok() && st->clients == 2 && st->totalHeld == 10000 && st->hanging == 1);
    Result<std::vector<caps::ProcessInfo>> procs = co_await s.kernel().listProcesses();
    CO_CHECK(procs.ok());
    auto bankOf = [&](const char* name) -> caps::Koid {
      for (const auto& p : *procs)
        if (p.name == name) return p.bank;
      return 0;
    };
    const caps::Koid serverBank = bankOf("bushel-store");
    auto serverUsed = [&]() -> Promise<uint64_t> {
      auto banks = co_await s.kernel().listBanks();
      if (!banks) co_return banks.error();
      for (const auto& b : *banks)
        if (b.koid == serverBank) co_return b.used;
      co_return Error(Errc::NOT_FOUND, "no server bank");
    };
    const uint64_t serverBefore = (co_await serverUsed()).value();

    CO_CHECK(::kill(victim, SIGKILL) == 0);
    st = co_await statsWhen(s.loop(), *store, [](auto v) { return v.clients == 1; });
    CO_CHECK(st.ok() && st->clients == 1 && st->totalHeld == 0 && st->hanging == 0 &&
             st->dropped == 1);
    // The victim's bank, bushel and state pages are gone with it; the server paid for nothing.
    auto after = co_await s.kernel().listProcesses();
    CO_CHECK(after.ok() && after->size() == 2);  // the server and this process
    CO_CHECK((co_await serverUsed()).value() == serverBefore);
    co_return {};
  });
  EXPECT_EQ(reap(victim), 128 + SIGKILL);
  ::kill(server, SIGTERM);
  EXPECT_EQ(reap(server), 0);
}

TEST_F(BushelRpcTest, KillingTheServerFailsEveryPendingCallDisconnectedPromptly) {
  const pid_t server = startServer(kernel_.home());
  Watchdog dog("server kill -9", 60s, server);
  runSession(kernel_.home(), [&](Session& s) -> Promise<void> {
    AGATE_CO_TRY(co_await s.waitForService("store"));
    const uint64_t usedBefore = (co_await usedOf(s.kernel(), s.bank())).value();
    Result<Store::Client> store = co_await s.open<Store>("store");
    CO_CHECK(store.ok());
    CO_CHECK((co_await usedOf(s.kernel(), s.bank())).value() > usedBefore);  // the bushel
    auto hung1 = store->hang();
    auto hung2 = store->hang();
    auto held = store->hold([](auto p) { p.setBytes(10); });
    Result<StatsView> st =
        co_await statsWhen(s.loop(), *store, [](auto v) { return v.hanging == 2; });
    CO_CHECK(st.ok() && st->hanging == 2);
    auto hung3 = held.getItem().measure();  // a pipelined call, answered already or not
    auto hung4 = store->hang();

    const auto killed = std::chrono::steady_clock::now();
    CO_CHECK(::kill(server, SIGKILL) == 0);
    CO_CHECK((co_await hung1).code() == Errc::DISCONNECTED);
    CO_CHECK((co_await hung2).code() == Errc::DISCONNECTED);
    CO_CHECK((co_await hung4).code() == Errc::DISCONNECTED);
    const auto failed = std::chrono::steady_clock::now() - killed;
    CO_CHECK(failed < 2s);
    auto r3 = co_await hung3;
    CO_CHECK(r3.ok() || r3.code() == Errc::DISCONNECTED);
    // Later calls fail at once; the service is gone from the registry.
    CO_CHECK((co_await store->ping()).code() == Errc::DISCONNECTED);
    CO_CHECK(s.openCount() == 0);
    Result<Store::Client> again = co_await s.open<Store>("store");
    CO_CHECK(again.code() == Errc::NOT_FOUND);
    // The bushel this client paid for (its record and rings) comes back to its bank.
    CO_CHECK((co_await usedOf(s.kernel(), s.bank())).value() == usedBefore);
    co_return {};
  });
  EXPECT_EQ(reap(server), 128 + SIGKILL);
}

TEST_F(BushelRpcTest, StoppingTheServerUnregistersItAndItsClientsSeeDisconnected) {
  const pid_t server = startServer(kernel_.home());
  Watchdog dog("server stop", 60s, server);
  runSession(kernel_.home(), [&](Session& s) -> Promise<void> {
    AGATE_CO_TRY(co_await s.waitForService("store"));
    Result<Store::Client> store = co_await s.open<Store>("store");
    CO_CHECK(store.ok());
    auto hung = store->hang();
    CO_CHECK((co_await statsWhen(s.loop(), *store, [](auto v) {
               return v.hanging == 1;
             }))->hanging == 1);
    CO_CHECK(::kill(server, SIGTERM) == 0);
    CO_CHECK((co_await hung).code() == Errc::DISCONNECTED);
    Result<caps::Koid> gone = co_await s.kernel().lookupService(s.kernel().registry(), "store");
    CO_CHECK(gone.code() == Errc::NOT_FOUND);
    co_return {};
  });
  EXPECT_EQ(reap(server), 0);
}

TEST_F(BushelRpcTest, AClientThatBreaksTheProtocolIsDroppedAndTheOthersCarryOn) {
  const pid_t server = startServer(kernel_.home());
  Watchdog dog("hostile client", 60s, server);
  runSession(kernel_.home(), [&](Session& s) -> Promise<void> {
    AGATE_CO_TRY(co_await s.waitForService("store"));
    Result<Store::Client> store = co_await s.open<Store>("store");
    CO_CHECK(store.ok());
    // A second bushel, written by hand: a frame that is not a Cap'n Proto message.
    Result<Cap<SpaceBank>> bank = co_await s.kernel().createBank(s.bank(), 1000);
    CO_CHECK(bank.ok());
    Result<Cap<caps::Bushel>> raw =
        co_await s.kernel().openBushel(s.kernel().registry(), "store", *bank);
    CO_CHECK(raw.ok());
    CO_CHECK((co_await usedOf(s.kernel(), *bank)).value() > 2);  // the record and both rings
    Result<caps::BushelRings> rings = co_await s.kernel().bushelRings(*raw);
    CO_CHECK(rings.ok());
    auto request = Channel::openShared(std::move(rings->request));
    CO_CHECK(request.ok());
    auto sender = (*request)->attachSender();
    CO_CHECK(sender.ok());
    Result<StatsView> st =
        co_await statsWhen(s.loop(), *store, [](auto v) { return v.clients == 2; });
    CO_CHECK(st.ok() && st->clients == 2);
    const std::byte garbage[24] = {std::byte{0xff}, std::byte{0xff}, std::byte{0xff},
                                   std::byte{0x7f}};
    CO_CHECK(sender->trySend(garbage).ok());
    st = co_await statsWhen(s.loop(), *store, [](auto v) { return v.clients == 1; });
    CO_CHECK(st.ok() && st->clients == 1 && st->dropped == 1);
    CO_CHECK((co_await store->ping()).ok());
    // The server closed the bushel in the kernel: the hostile client's cap is gone, its bank has
    // its pages back, and the ring it wrote has no reader any more.
    for (int i = 0; i < 500 && (co_await s.kernel().inspectCap(*raw)).ok(); ++i)
      (void)co_await s.loop().sleep(2ms);
    CO_CHECK((co_await s.kernel().inspectCap(*raw)).code() == Errc::INVALID_HANDLE);
    CO_CHECK((co_await usedOf(s.kernel(), *bank)).value() == 0);
    CO_CHECK(sender->trySend(garbage).code() == Errc::DISCONNECTED);
    CO_CHECK((co_await s.kernel().deleteCap(*raw)).code() == Errc::INVALID_HANDLE);
    CO_CHECK((co_await store->ping()).ok());
    co_return {};
  });
  ::kill(server, SIGTERM);
  EXPECT_EQ(reap(server), 0);
}

TEST_F(BushelRpcTest, AServerDisconnectsAMisbehavingClientWhoseCallsFailAndWhosePagesComeBack) {
  const pid_t server = startServer(kernel_.home());
  Watchdog dog("server disconnects a client", 60s, server);
  runSession(kernel_.home(), [&](Session& s) -> Promise<void> {
    AGATE_CO_TRY(co_await s.waitForService("store"));
    // Two clients of the store: `bad` paid from a bank of its own, `good` from the process bank.
    Result<Cap<SpaceBank>> bank = co_await s.kernel().createBank(s.bank(), 1000);
    CO_CHECK(bank.ok());
    Result<OpenedBushel> opened = co_await s.openBushel("store", *bank);
    CO_CHECK(opened.ok());
    Store::Client bad(opened->connection->bootstrap());
    Result<Store::Client> good = co_await s.open<Store>("store");
    CO_CHECK(good.ok());
    const uint64_t rings = (co_await usedOf(s.kernel(), *bank)).value();
    auto held = co_await bad.hold([](auto p) { p.setBytes(20000); });  // state pages, paid
    CO_CHECK(held.ok());
    CO_CHECK((co_await usedOf(s.kernel(), *bank)).value() >= rings + 5);
    Item::Client item = getItem(*held, held->results())->remote;
    auto hung = bad.hang();
    Result<StatsView> st = co_await statsWhen(
        s.loop(), *good, [](auto v) { return v.hanging == 1 && v.clients == 2; });
    CO_CHECK(st.ok() && st->hanging == 1 && st->clients == 2);

    const auto asked = std::chrono::steady_clock::now();
    auto misbehaved = bad.misbehave();
    CO_CHECK((co_await hung).code() == Errc::DISCONNECTED);
    CO_CHECK((co_await misbehaved).code() == Errc::DISCONNECTED);
    CO_CHECK(std::chrono::steady_clock::now() - asked < 2s);
    CO_CHECK((co_await bad.ping()).code() == Errc::DISCONNECTED);
    CO_CHECK((co_await item.measure()).code() == Errc::DISCONNECTED);

    // The kernel closed the bushel: the cap is gone, the session heard BUSHEL_CLOSED, and the
    // rings and state pages are back in the bank, without the client doing anything.
    for (int i = 0; i < 500 && (co_await usedOf(s.kernel(), *bank)).value() != 0; ++i)
      (void)co_await s.loop().sleep(2ms);
    CO_CHECK((co_await usedOf(s.kernel(), *bank)).value() == 0);
    CO_CHECK((co_await s.kernel().inspectCap(opened->cap)).code() == Errc::INVALID_HANDLE);
    CO_CHECK(s.openCount() == 1);
    CO_CHECK((co_await s.close(opened->koid)).ok());  // closing it again changes nothing

    // The other client carries on, and the server dropped the first one's state.
    CO_CHECK((co_await good->ping()).ok());
    st = co_await statsWhen(s.loop(), *good, [](auto v) { return v.clients == 1; });
    CO_CHECK(st.ok() && st->clients == 1 && st->dropped == 1 && st->hanging == 0 &&
             st->totalHeld == 0);
    // The disconnected client may come back: a new bushel is a new client.
    Result<OpenedBushel> again = co_await s.openBushel("store", *bank);
    CO_CHECK(again.ok());
    Store::Client back(again->connection->bootstrap());
    CO_CHECK((co_await back.ping()).ok());
    co_return {};
  });
  ::kill(server, SIGTERM);
  EXPECT_EQ(reap(server), 0);
}

TEST_F(BushelRpcTest, AClientFloodingTheServerDoesNotStarveAnotherClient) {
  const pid_t server = startServer(kernel_.home());
  const pid_t flooder = startClient(kernel_.home(), [&](Session& s) -> Promise<void> {
    AGATE_CO_TRY(co_await s.waitForService("store"));
    Result<Store::Client> store = co_await s.open<Store>("store");
    if (!store) co_return store.error();
    // Keeps 120 pings in flight (about as many as its 16 KiB request ring holds; its reply
    // space allows 127), forever, each costing the server 1 ms: it refills its request ring
    // far faster than the server drains it (a ping costs the flooder well under 1 ms of CPU,
    // even unoptimized, under a sanitizer and sharing two CPUs with everyone else), so its ring
    // is never empty, and a reader without a budget would never let go of it.
    std::deque<Store::PingPromise> inFlight;
    for (;;) {
      while (inFlight.size() < 120)
        inFlight.push_back(store->ping([](auto p) { p.setWork(1000); }));
      auto r = co_await inFlight.front();
      if (!r) co_return r.error();
      inFlight.pop_front();
    }
  });
  Watchdog dog("fairness", 60s, server);
  runSession(kernel_.home(), [&](Session& s) -> Promise<void> {
    AGATE_CO_TRY(co_await s.waitForService("store"));
    Result<Store::Client> store = co_await s.open<Store>("store");
    CO_CHECK(store.ok());
    // Wait until the flood is on: the server's count grows by over ten between our pings.
    uint64_t last = 0;
    bool flooding = false;
    for (int i = 0; i < 500 && !flooding; ++i) {
      auto r = co_await store->ping();
      CO_CHECK(r.ok());
      const uint64_t served = r->results().getServed();
      flooding = last != 0 && served - last > 10;
      last = served;
      (void)co_await s.loop().sleep(20ms);
    }
    CO_CHECK(flooding);
    last = (co_await store->ping())->results().getServed();
    std::vector<uint64_t> gaps;  // the flooder's calls served between two of ours
    for (int i = 0; i < 100; ++i) {
      auto r = co_await store->ping();
      CO_CHECK(r.ok());
      const uint64_t served = r->results().getServed();
      gaps.push_back(served - last - 1);
      last = served;
    }
    // Round robin with 16 messages a turn (8 of the flooder's calls, each with its Finish):
    // between two of our calls, at most about one turn of the flooder's, never its backlog
    // (with no budget our calls wait for hundreds). Often none: our reader may get several
    // turns in a row while the flooder's waits for the loop's next turn. The 90th percentile,
    // not the worst: a moment in which this process is not scheduled at all (a loaded machine)
    // lets the server serve the flooder meanwhile, as it should. How a reader's budget orders
    // the calls it serves is checked exactly, on one loop, by tests/rpc/rpc_fairness_test.cpp;
    // this test checks the end to end outcome between processes.
    uint64_t flooderServed = 0;
    for (uint64_t g : gaps) flooderServed += g;
    std::sort(gaps.begin(), gaps.end());
    EXPECT_LE(gaps[gaps.size() * 9 / 10], 48u) << "the flooder's calls between two of ours";
    EXPECT_GE(flooderServed, 20u) << "the flooder was served meanwhile: the flood was on";
    co_return {};
  });
  ::kill(flooder, SIGKILL);
  EXPECT_EQ(reap(flooder), 128 + SIGKILL);
  ::kill(server, SIGTERM);
  EXPECT_EQ(reap(server), 0);
}

}  // namespace
}  // namespace agate::client
