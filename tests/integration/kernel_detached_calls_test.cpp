// Kernel calls nobody awaits, and creates whose caller went, through a real agate-kernel:
//
//  * a detached destroy / deleteCap (what destructors use) written while the submission ring is
//    full waits in the FIFO of calls waiting for room and is written in its turn, never lost;
//  * an EventPublisher destroyed while the ring is full still destroys its buffer and its
//    notification (the server's bank gets its pages back), and so does one whose close() was
//    cancelled while its destroys waited for room: a destroy or deleteCap dropped before it was
//    written goes detached, in its caller's stead;
//  * a detached call never overtakes calls woken to write before it;
//  * an EventPublisher::create cancelled at each of its kernel steps (the client hung up at that
//    instant) leaves nothing behind, a create still in flight included (CreatedObjects).
//
// The ring is filled for real: the kernel is stopped (SIGSTOP) while calls are written, so none
// is read, until a call queues; then it is let go (SIGCONT). Two connections of one process stand
// for the server and its client (the kernel treats each attach as its own process).
#include <signal.h>

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "../support/watchdog.h"
#include "agate/caps/kernel_connection.h"
#include "agate/client/event_publisher.h"
#include "agate/client/service_host.h"
#include "kernel_client.h"
#include "kernel_fixture.h"

namespace agate::caps {
namespace {

using agate::testing::get;
using agate::testing::KernelProcess;
using agate::testing::Observed;
using agate::testing::Watchdog;
using client::EventPublisher;
using std::chrono::seconds;

// Runs the loop's turns until `done` holds.
Promise<void> until(EventLoop& loop, std::function<bool()> done) {
  while (!done()) co_await loop.yield();
  co_return {};
}

// Stops the kernel (nothing it is sent is read) until released or gone.
class StoppedKernel {
 public:
  explicit StoppedKernel(const KernelProcess& kernel) : pid_(kernel.pid()) {
    EXPECT_EQ(::kill(pid_, SIGSTOP), 0);
  }
  ~StoppedKernel() { release(); }
  void release() {
    if (pid_ > 0) {
      EXPECT_EQ(::kill(std::exchange(pid_, 0), SIGCONT), 0);
    }
  }

 private:
  pid_t pid_;
};

// Writes calls (inspectCap of `cap`) until one finds the ring full and queues; their promises.
std::vector<Promise<CapInfo>> fillRing(KernelConnection& k, AnyCap cap) {
  std::vector<Promise<CapInfo>> calls;
  while (k.callsQueued() == 0) calls.push_back(k.inspectCap(cap));
  return calls;
}

// Runs the loop until every call in `calls` is answered (each must succeed).
void finish(EventLoop& loop, std::vector<Promise<CapInfo>>& calls) {
  for (Promise<CapInfo>& p : calls) EXPECT_TRUE(loop.run(std::move(p)).ok());
  calls.clear();
}

// Two round trips: any call written while the first's answers were read (a detached destroy of
// something a create made) is answered before the second's.
void settle(KernelConnection& k) {
  for (int i = 0; i < 2; ++i) EXPECT_TRUE(k.sync().readBank(k.bank()).ok());
}

// Runs the loop until the calls waiting for room were woken (none queued any more), then `act`
// at once, before they run. Whether they had written nothing yet (`written`: the count of calls
// written before they queued) at that instant.
bool atTheWake(EventLoop& loop, KernelConnection& k, uint64_t written, std::function<void()> act) {
  bool unwritten = false;
  EXPECT_TRUE(loop.run(until(loop,
                             [&] {
                               if (k.callsQueued() != 0) return false;
                               unwritten = k.callsSubmitted() == written;
                               act();
                               return true;
                             }))
                  .ok());
  return unwritten;
}

TEST(KernelDetachedCalls, ADetachedCallQueuedBehindAFullRingIsWrittenInItsTurn) {
  Watchdog dog("detached calls behind a full ring", seconds(30));
  KernelProcess kernel;
  agate::testing::KernelClient c(kernel);
  ASSERT_TRUE(c.conn);
  KernelConnection& k = *c.conn;
  const uint64_t used = get(k.sync().readBank(k.bank())).used;
  Cap<Region> region = get(k.sync().createRegion(k.bank(), 4));
  Cap<Region> copy = get(k.sync().copyCap(region, Rights::READ));
  Cap<Region> other = get(k.sync().createRegion(k.bank(), 4));

  StoppedKernel stopped(kernel);
  std::vector<Promise<CapInfo>> calls = fillRing(k, k.bank());
  // FIFO: a call queued before the detached ones sees the objects, one queued after does not.
  Promise<CapInfo> before = k.inspectCap(region);
  k.deleteCapDetached(copy);
  k.destroyDetached(region);
  Promise<CapInfo> after = k.inspectCap(region);
  EXPECT_EQ(k.callsQueued(), 5u);  // the call that found it full, `before`, two detached, `after`
  stopped.release();

  finish(c.loop, calls);
  EXPECT_EQ(get(c.loop.run(std::move(before))).type, ObjectType::REGION);
  EXPECT_EQ(c.loop.run(std::move(after)).code(), Errc::INVALID_HANDLE);
  EXPECT_EQ(k.sync().inspectCap(copy).code(), Errc::INVALID_HANDLE);
  EXPECT_EQ(k.callsQueued(), 0u);
  EXPECT_EQ(k.detachedCallsRefused(), 0u);
  EXPECT_EQ(k.state(), Errc::OK);

  // A detached call the kernel refuses (a stale handle) is counted, nothing else happens.
  k.destroyDetached(region);
  settle(k);
  EXPECT_EQ(k.detachedCallsRefused(), 1u);
  EXPECT_EQ(get(k.sync().inspectCap(other)).type, ObjectType::REGION);
  k.destroyDetached(other);
  settle(k);
  EXPECT_EQ(get(k.sync().readBank(k.bank())).used, used) << "every page came back";
}

TEST(KernelDetachedCalls, DetachedCallsQueuedWhenTheKernelDiesAreDroppedAndLaterOnesToo) {
  Watchdog dog("detached calls and the kernel's death", seconds(30));
  KernelProcess kernel;
  agate::testing::KernelClient c(kernel);
  ASSERT_TRUE(c.conn);
  KernelConnection& k = *c.conn;
  Cap<Region> region = get(k.sync().createRegion(k.bank(), 1));
  std::vector<Promise<CapInfo>> calls;
  {
    StoppedKernel stopped(kernel);
    calls = fillRing(k, k.bank());
    k.destroyDetached(region);
    EXPECT_EQ(k.callsQueued(), 2u);
    ::kill(kernel.pid(), SIGKILL);
  }
  for (Promise<CapInfo>& p : calls) EXPECT_EQ(c.loop.run(std::move(p)).code(), Errc::DISCONNECTED);
  EXPECT_EQ(k.callsQueued(), 0u);
  const uint64_t submitted = k.callsSubmitted();
  k.destroyDetached(region);  // nothing to write to
  EXPECT_EQ(k.callsQueued(), 0u);
  EXPECT_EQ(k.callsSubmitted(), submitted);
  (void)kernel.stop();
}

// A server ("server") with a ServiceHost whose one client ("client") opened a bushel paid from a
// bank of its own; `served` is that client as the host sees it.
struct Served {
  KernelProcess kernel;
  EventLoop loop;
  std::unique_ptr<KernelConnection> server, client;
  std::unique_ptr<client::ServiceHost> host;
  std::optional<Promise<void>> serving;
  client::ServedClient* served = nullptr;
  Cap<SpaceBank> bank;

  Served() {
    server = std::move(KernelConnection::tryAttach(loop, kernel.home(), "server")).value();
    client = std::move(KernelConnection::tryAttach(loop, kernel.home(), "client")).value();
    host = std::move(loop.run(client::ServiceHost::create(*server, "ticker",
                                                          [this](client::ServedClient& c) {
                                                            served = &c;
                                                            return nullptr;
                                                          })))
               .value();
    serving.emplace(host->run());
    bank = get(client->sync().createBank(client->bank(), 1000));
    (void)get(client->sync().openBushel(client->registry(), "ticker", bank));
    EXPECT_TRUE(loop.run(until(loop, [this] { return served != nullptr; })).ok());
  }
  ~Served() {
    host->stop();
    EXPECT_TRUE(loop.run(std::move(*serving)).ok());
  }
  // Every bank's use and object count, and both processes' caps.
  Observed observe() { return agate::testing::observe(*server, {server.get(), client.get()}); }
  // One stream made and dropped: the client's state allowance then covers another (the growth
  // stays with the bushel), so the next create makes no growth call and a baseline taken now is
  // what a stream that went leaves.
  void warmUp() {
    std::unique_ptr<EventPublisher> warm = get(loop.run(EventPublisher::create(*served, 64)));
    EXPECT_TRUE(warm);
    warm.reset();
    settle(*server);
  }
  // What a stream that went leaves (after warmUp).
  Observed baseline() {
    warmUp();
    return observe();
  }
  // A publisher of 64 slots to the client, its calls all answered.
  std::unique_ptr<EventPublisher> publisher() {
    std::unique_ptr<EventPublisher> made = get(loop.run(EventPublisher::create(*served, 64)));
    settle(*server);
    return made;
  }
};

TEST(KernelDetachedCalls, APublisherDestroyedWhileTheRingIsFullStillDestroysItsObjects) {
  Watchdog dog("a publisher's destructor behind a full ring", seconds(30));
  Served s;
  ASSERT_NE(s.served, nullptr);
  const Observed baseline = s.baseline();
  std::unique_ptr<EventPublisher> publisher = s.publisher();
  ASSERT_TRUE(publisher);
  EXPECT_FALSE(s.observe() == baseline);

  StoppedKernel stopped(s.kernel);
  std::vector<Promise<CapInfo>> calls = fillRing(*s.server, s.server->bank());
  publisher.reset();  // its two destroys queue behind the full ring
  EXPECT_EQ(s.server->callsQueued(), 3u);
  stopped.release();
  finish(s.loop, calls);
  settle(*s.server);
  EXPECT_TRUE(s.observe() == baseline) << "the buffer, its notification and the client's cap went";
  EXPECT_EQ(s.server->detachedCallsRefused(), 0u);
}

TEST(KernelDetachedCalls,
     APublisherWhoseCloseIsCancelledWhileTheRingIsFullStillDestroysItsObjects) {
  Watchdog dog("a cancelled close behind a full ring", seconds(30));
  Served s;
  ASSERT_NE(s.served, nullptr);
  const Observed baseline = s.baseline();
  std::unique_ptr<EventPublisher> publisher = s.publisher();
  ASSERT_TRUE(publisher);

  StoppedKernel stopped(s.kernel);
  std::vector<Promise<CapInfo>> calls = fillRing(*s.server, s.server->bank());
  {
    Promise<void> closing = publisher->close();  // its two destroys queue behind the full ring
    EXPECT_EQ(s.server->callsQueued(), 3u);
  }  // and the caller goes (a method cancelled because its client hung up)
  EXPECT_TRUE(publisher->closed());
  publisher.reset();
  stopped.release();
  finish(s.loop, calls);
  settle(*s.server);
  EXPECT_TRUE(s.observe() == baseline) << "the buffer, its notification and the client's cap went";
  EXPECT_EQ(s.server->detachedCallsRefused(), 0u) << "each destroy went once";
}

TEST(KernelDetachedCalls, ADestroyOrDeleteCapDroppedWhileItWaitsForRoomStillGoesInItsTurn) {
  Watchdog dog("dropped destroys behind a full ring", seconds(30));
  KernelProcess kernel;
  agate::testing::KernelClient c(kernel);
  ASSERT_TRUE(c.conn);
  KernelConnection& k = *c.conn;
  const uint64_t used = get(k.sync().readBank(k.bank())).used;
  Cap<Region> region = get(k.sync().createRegion(k.bank(), 4));
  Cap<Region> copy = get(k.sync().copyCap(region, Rights::READ));

  StoppedKernel stopped(kernel);
  std::vector<Promise<CapInfo>> calls = fillRing(k, k.bank());
  Promise<CapInfo> before = k.inspectCap(region);
  { Promise<void> dropped = k.deleteCap(copy); }
  { Promise<void> dropped = k.destroy(region); }
  Promise<CapInfo> after = k.inspectCap(copy);
  EXPECT_EQ(k.callsQueued(), 5u) << "the dropped calls stay in their turn, detached";
  stopped.release();

  finish(c.loop, calls);
  EXPECT_EQ(get(c.loop.run(std::move(before))).type, ObjectType::REGION);
  EXPECT_EQ(c.loop.run(std::move(after)).code(), Errc::INVALID_HANDLE);
  settle(k);
  EXPECT_EQ(k.callsQueued(), 0u);
  EXPECT_EQ(k.detachedCallsRefused(), 0u);
  EXPECT_EQ(get(k.sync().readBank(k.bank())).used, used) << "every page came back";

  // Any other call dropped before it was written is simply not made.
  Cap<Region> kept = get(k.sync().createRegion(k.bank(), 1));
  {
    StoppedKernel again(kernel);
    calls = fillRing(k, k.bank());
    const uint64_t submitted = k.callsSubmitted();
    { Promise<uint64_t> dropped = k.revokeCap(kept); }
    again.release();
    finish(c.loop, calls);
    settle(k);
    EXPECT_EQ(k.callsSubmitted(), submitted + 1 + 2) << "the call that queued, then settle's two";
  }
  EXPECT_EQ(get(k.sync().inspectCap(kept)).type, ObjectType::REGION);
}

TEST(KernelDetachedCalls, ADroppedDestroyKeepsItsTurnAheadOfLaterCallsOnTheSameCap) {
  Watchdog dog("a dropped destroy keeps its turn", seconds(30));
  KernelProcess kernel;
  agate::testing::KernelClient c(kernel);
  ASSERT_TRUE(c.conn);
  KernelConnection& k = *c.conn;
  const uint64_t used = get(k.sync().readBank(k.bank())).used;
  Cap<Region> region = get(k.sync().createRegion(k.bank(), 4));

  StoppedKernel stopped(kernel);
  std::vector<Promise<CapInfo>> calls = fillRing(k, k.bank());
  std::optional<Promise<void>> destroying;
  destroying.emplace(k.destroy(region));
  k.deleteCapDetached(region);  // behind it: refused, the region being gone by then
  destroying.reset();           // the destroy's caller goes after the deleteCap was queued
  stopped.release();
  finish(c.loop, calls);
  settle(k);
  EXPECT_EQ(k.callsQueued(), 0u);
  EXPECT_EQ(k.detachedCallsRefused(), 1u) << "the deleteCap, not the destroy";
  EXPECT_EQ(get(k.sync().readBank(k.bank())).used, used) << "the region's pages came back";
}

// A destroy made the instant the calls waiting for room were woken, before they write (a
// destructor's detached one, or an awaited one): it goes after them, so the call woken before it
// still finds the region.
void destroyAtTheWake(bool detached) {
  Watchdog dog("a destroy behind a woken call", seconds(30));
  KernelProcess kernel;
  agate::testing::KernelClient c(kernel);
  ASSERT_TRUE(c.conn);
  KernelConnection& k = *c.conn;
  Cap<Region> region = get(k.sync().createRegion(k.bank(), 1));

  StoppedKernel stopped(kernel);
  std::vector<Promise<CapInfo>> calls = fillRing(k, k.bank());
  Promise<CapInfo> first = k.inspectCap(region);
  const uint64_t written = k.callsSubmitted();
  stopped.release();
  std::optional<Promise<void>> destroyed;
  ASSERT_TRUE(atTheWake(c.loop, k, written, [&] {
    if (detached) {
      k.destroyDetached(region);
    } else {
      destroyed.emplace(k.destroy(region));
    }
  })) << "the test needs the woken calls not to have written yet";
  finish(c.loop, calls);
  EXPECT_EQ(get(c.loop.run(std::move(first))).type, ObjectType::REGION)
      << "the call woken before the destroy was written before it";
  if (destroyed) {
    EXPECT_TRUE(c.loop.run(std::move(*destroyed)).ok());
  }
  settle(k);
  EXPECT_EQ(k.sync().inspectCap(region).code(), Errc::INVALID_HANDLE);
  EXPECT_EQ(k.detachedCallsRefused(), 0u);
}

TEST(KernelDetachedCalls, ADetachedCallNeverOvertakesACallWokenToWriteBeforeIt) {
  destroyAtTheWake(/*detached=*/true);
}

TEST(KernelDetachedCalls, ANewCallNeverOvertakesACallWokenToWriteBeforeIt) {
  destroyAtTheWake(/*detached=*/false);
}

// Calls woken together that no longer all fit (each carries a long name) go back to the queue's
// front in their order, and the woken calls behind one that went back wait too (the kernel may
// have made room meanwhile): every call is written in the order it was made.
TEST(KernelDetachedCalls, WokenCallsThatFindTheRingFullAgainKeepTheirOrderAheadOfLaterOnes) {
  Watchdog dog("woken calls that go back", seconds(30));
  KernelProcess kernel;
  agate::testing::KernelClient c(kernel);
  ASSERT_TRUE(c.conn);
  KernelConnection& k = *c.conn;
  // Longer than a service name may be: each is refused, but only once the kernel read it.
  const std::string longName(6000, 'n');
  constexpr int LONG_CALLS = 24;  // 24 x ~6 KiB: more than the ring holds at once

  std::vector<int> order;
  auto track = [&order](Promise<Koid> call, int i) -> Promise<void> {
    (void)co_await call;
    order.push_back(i);
    co_return {};
  };
  auto trackInfo = [&order](Promise<CapInfo> call, int i) -> Promise<void> {
    (void)co_await call;
    order.push_back(i);
    co_return {};
  };
  std::vector<Promise<void>> tracked;
  std::vector<Promise<CapInfo>> calls;
  {
    StoppedKernel stopped(kernel);
    calls = fillRing(k, k.bank());
    for (int i = 0; i < LONG_CALLS; ++i)
      tracked.push_back(track(k.lookupService(k.registry(), longName), i));
    tracked.push_back(trackInfo(k.inspectCap(k.bank()), LONG_CALLS));
    EXPECT_EQ(k.callsQueued(), static_cast<size_t>(LONG_CALLS + 2));
  }
  finish(c.loop, calls);
  for (Promise<void>& t : tracked) EXPECT_TRUE(c.loop.run(std::move(t)).ok());
  ASSERT_EQ(order.size(), static_cast<size_t>(LONG_CALLS + 1));
  for (int i = 0; i <= LONG_CALLS; ++i) EXPECT_EQ(order[static_cast<size_t>(i)], i);
  EXPECT_EQ(k.state(), Errc::OK);
}

// create()'s kernel calls on the server's connection, in order: createNotification,
// createEventBuffer, then mapEventBuffer + inspectCap + copyCap in one turn, then transferCap.
// Cancelled once each step's calls are written (and not answered): a create in flight included.
TEST(KernelDetachedCalls, ACreateCancelledAtEachKernelStepLeavesNothingBehind) {
  Watchdog dog("create cancelled at each step", seconds(60));
  Served s;
  ASSERT_NE(s.served, nullptr);
  s.warmUp();

  for (uint64_t step : {1u, 2u, 5u, 6u}) {
    SCOPED_TRACE(step);
    const Observed baseline = s.observe();
    const uint64_t start = s.server->callsSubmitted();
    {
      Promise<std::unique_ptr<EventPublisher>> creating = EventPublisher::create(*s.served, 16);
      ASSERT_TRUE(
          s.loop.run(until(s.loop, [&] { return s.server->callsSubmitted() - start >= step; }))
              .ok());
      ASSERT_EQ(s.server->callsSubmitted() - start, step);
      ASSERT_FALSE(creating.isReady());
    }  // dropped: the client hung up
    settle(*s.server);
    EXPECT_TRUE(s.observe() == baseline) << "objects of a cancelled create were left behind";
    EXPECT_EQ(s.served->quota().usedBytes(), 0u) << "the charge came back";
  }
  // And one that runs to its end still works.
  std::unique_ptr<EventPublisher> publisher =
      get(s.loop.run(EventPublisher::create(*s.served, 16)));
  EXPECT_TRUE(publisher);
  EXPECT_EQ(s.server->detachedCallsRefused(), 0u);
}

}  // namespace
}  // namespace agate::caps
