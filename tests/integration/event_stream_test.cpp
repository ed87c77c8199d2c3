// Event streams over kernel event buffers between real processes (client/: EventPublisher on the
// server, EventStream on the client): a client subscribes and reads coalesced batches; the
// stream is paid from the client's bank; hostile handles are refused with nothing mapped; the
// stream ends DISCONNECTED when the server dies, the bushel closes, or the publisher is dropped
// or closed while the connection lives, for next() and tryNext() alike, whichever of its
// objects the publisher destroys first; a hostile publisher (ring storms, a forged ends word)
// neither ends a stream falsely nor makes the client spin or call the kernel on every poll; a
// killed subscriber's publisher is reclaimed with its pages.
//
// Processes: the kernel (KernelProcess), the server (a forked child serving "ticker" through
// client::serveService), clients in the test process and in forked children. Watchdogs: the
// Watchdog per test, alarm() in every child, ctest's TIMEOUT.
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "agate/client/event_publisher.h"
#include "agate/client/event_stream.h"
#include "agate/client/main.h"
#include "agate/client/service_host.h"
#include "agate/client/session.h"
#include "agate/kernel/space_bank.h"
#include "event_stream_test.agate.h"
#include "kernel_fixture.h"
#include "session_harness.h"
#include "support/alloc_counter.h"
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
using Ticker = streamtest::stubs::Ticker;
using Hostile = streamtest::Ticker::Hostile;
using End = streamtest::Ticker::End;
using Abuse = streamtest::Ticker::Abuse;

constexpr uint64_t CHECK_WORD = 0x5eed5eed5eed5eedull;

// What the ticker posts: the value, its slot, and words derived from both (a torn or misplaced
// read shows).
EventPayload payloadOf(uint32_t slot, uint64_t value) {
  EventPayload p{};
  p[0] = value;
  p[1] = slot;
  for (size_t i = 2; i < p.size(); ++i) p[i] = value ^ (CHECK_WORD + i);
  return p;
}
bool wellFormed(const EventUpdate& u) { return u.words == payloadOf(u.slot, u.words[0]); }

// ---------------------------------------------------------------------------------------------
// The server (runs in a forked child)

struct Shared {
  uint32_t publishers = 0;
};

// A publisher counted in Shared while it lives.
struct Counted {
  Counted(std::unique_ptr<EventPublisher> p, Shared& s) : publisher(std::move(p)), shared(s) {
    ++shared.publishers;
  }
  ~Counted() { --shared.publishers; }
  std::unique_ptr<EventPublisher> publisher;
  Shared& shared;
};

class TickerImpl final : public Ticker::Server {
 public:
  TickerImpl(ServedClient& client, Shared& shared) : client_(client), shared_(shared) {}

  Promise<void> subscribe(SubscribeContext context) override {
    const uint32_t slots = context.params().getSlots();
    auto publisher = co_await EventPublisher::create(client_, slots);
    if (!publisher) co_return publisher.error();
    auto results = context.initResults();
    if (!results) co_return results.error();
    (*publisher)->describe(results->initEvents());
    publishers_.push_back(std::make_unique<Counted>(std::move(*publisher), shared_));
    co_return {};
  }
  Promise<void> post(PostContext context) override {
    const auto p = context.params();
    if (publishers_.empty()) return readyPromise<void>(Error(Errc::NOT_FOUND, "no subscription"));
    EventPublisher& pub = *publishers_.back()->publisher;
    if (p.getSlot() >= pub.slots())
      return readyPromise<void>(Error(Errc::INVALID_ARGUMENT, "no such slot"));
    for (uint64_t i = 0; i < p.getTimes(); ++i)
      pub.post(p.getSlot(), payloadOf(p.getSlot(), p.getFirst() + i));
    return readyPromise<void>(Status{});
  }
  Promise<void> stats(StatsContext context) override {
    auto results = context.initResults();
    if (!results) return readyPromise<void>(results.error());
    results->setPublishers(shared_.publishers);
    if (!publishers_.empty()) {
      results->setPosts(publishers_.back()->publisher->posts());
      results->setRings(publishers_.back()->publisher->rings());
    }
    return readyPromise<void>(Status{});
  }
  Promise<void> unsubscribe(UnsubscribeContext context) override {
    if (publishers_.empty()) co_return Error(Errc::NOT_FOUND, "no subscription");
    if (context.params().getHow() == End::DROP) {
      publishers_.pop_back();
      co_return {};
    }
    co_return co_await publishers_.back()->publisher->close();
  }
  Promise<void> rawStream(RawStreamContext context) override {
    const uint32_t slots = context.params().getSlots();
    caps::KernelConnection& k = client_.kernel();
    auto n = co_await k.createNotification(k.bank(), true);
    if (!n) co_return n.error();
    auto buffer = co_await k.createEventBuffer(k.bank(), slots, *n);
    if (!buffer) co_return buffer.error();
    auto mapped = co_await k.mapEventBuffer(*buffer, /*writable=*/true);
    auto info = co_await k.inspectCap(*buffer);
    auto copy = co_await k.copyCap(*buffer, caps::Rights::READ | caps::Rights::GRANT);
    if (!mapped || !info || !copy) co_return Error(Errc::FAILED, "raw stream");
    auto moved = co_await k.transferCap(*copy, client_.peer(), caps::TransferMode::MOVE);
    if (!moved) co_return moved.error();
    raw_ = Raw{*n, *buffer, std::move(*mapped)};
    auto results = context.initResults();
    if (!results) co_return results.error();
    auto events = results->initEvents();
    events.setHandle(moved->handle);
    events.setKoid(info->koid);
    events.setSlots(slots);
    co_return {};
  }
  Promise<void> abuse(AbuseContext context) override {
    if (!raw_) co_return Error(Errc::NOT_FOUND, "no raw stream");
    caps::KernelConnection& k = client_.kernel();
    switch (context.params().getHow()) {
      case Abuse::WRONG_ORDER:
        AGATE_CO_TRY(co_await k.destroy(raw_->notification));
        AGATE_CO_TRY(co_await k.destroy(raw_->buffer));
        co_return {};
      case Abuse::DROP_NOTIFICATION:
        co_return co_await k.destroy(raw_->notification);
      case Abuse::DROP_BUFFER:
        raw_->mapped.post(0, payloadOf(0, context.params().getMs()));
        co_return co_await k.destroy(raw_->buffer);
      default:
        break;
    }
    const auto end =
        std::chrono::steady_clock::now() + std::chrono::milliseconds(context.params().getMs());
    caps::MappedNotification& n = *raw_->mapped.notification();
    if (context.params().getHow() == Abuse::FAKE_END) {
      // Any holder of the page may write the ends word: the client must not take it for an end.
      auto* page = reinterpret_cast<std::byte*>(const_cast<DoorbellWord*>(&n.word()));
      auto* ends = reinterpret_cast<uint32_t*>(page + kernel::NOTIFICATION_ENDS_OFFSET);
      while (std::chrono::steady_clock::now() < end) {
        std::atomic_ref<uint32_t>(*ends).fetch_add(1, std::memory_order_release);
        n.ring();
        (void)co_await EventLoop::current()->sleep(1ms);
      }
      co_return {};
    }
    while (std::chrono::steady_clock::now() < end) {
      AGATE_CO_TRY(co_await k.signal(raw_->notification));  // the kernel rings: a real wakeup
      n.ring();                                             // and the holder's own ring
    }
    co_return {};
  }
  Promise<void> hostile(HostileContext context) override {
    const Hostile kind = context.params().getKind();
    caps::KernelConnection& k = client_.kernel();
    uint64_t handle = 0x7777777700000123ull;
    uint64_t koid = 1;
    uint32_t slots = 16;
    switch (kind) {
      case Hostile::NOT_AN_EVENT_BUFFER: {
        auto region = co_await k.createRegion(k.bank(), 1);
        if (!region) co_return region.error();
        auto info = co_await k.inspectCap(*region);
        auto copy = co_await k.copyCap(*region, caps::Rights::READ | caps::Rights::GRANT);
        if (!info || !copy) co_return Error(Errc::FAILED, "region");
        auto moved = co_await k.transferCap(*copy, client_.peer(), caps::TransferMode::MOVE);
        if (!moved) co_return moved.error();
        handle = moved->handle;
        koid = info->koid;
        break;
      }
      case Hostile::WRITABLE: {
        auto n = co_await k.createNotification(k.bank(), false);
        if (!n) co_return n.error();
        auto buffer = co_await k.createEventBuffer(k.bank(), slots, *n);
        if (!buffer) co_return buffer.error();
        auto info = co_await k.inspectCap(*buffer);
        auto given = co_await k.transferCap(*buffer, client_.peer(), caps::TransferMode::COPY);
        if (!info || !given) co_return Error(Errc::FAILED, "writable");
        handle = given->handle;
        koid = info->koid;
        break;
      }
      case Hostile::WRONG_KOID:
      case Hostile::WRONG_SLOTS: {
        auto publisher = co_await EventPublisher::create(client_, slots);
        if (!publisher) co_return publisher.error();
        auto results = context.initResults();
        if (!results) co_return results.error();
        auto events = results->initEvents();
        (*publisher)->describe(events);
        if (kind == Hostile::WRONG_KOID) events.setKoid(events.getKoid() + 1);
        if (kind == Hostile::WRONG_SLOTS) events.setSlots(events.getSlots() + 1);
        publishers_.push_back(std::make_unique<Counted>(std::move(*publisher), shared_));
        co_return {};
      }
      case Hostile::NO_SUCH_HANDLE:
        break;
    }
    auto results = context.initResults();
    if (!results) co_return results.error();
    auto events = results->initEvents();
    events.setHandle(handle);
    events.setKoid(koid);
    events.setSlots(slots);
    co_return {};
  }

 private:
  struct Raw {
    Cap<caps::Notification> notification;
    Cap<caps::EventBuffer> buffer;
    caps::MappedEventBuffer mapped;
  };
  ServedClient& client_;
  Shared& shared_;
  std::vector<std::unique_ptr<Counted>> publishers_;
  std::optional<Raw> raw_;
};

// Forks the server: it registers "ticker" and serves until SIGTERM, dying with the test.
pid_t startServer(const std::string& home) {
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid != 0) return pid;
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() != parent) ::_exit(1);
  ::alarm(60);
  Shared shared;
  std::string homeArg = home;
  char name[] = "ticker-server";
  char homeFlag[] = "--home";
  char* argv[] = {name, homeFlag, homeArg.data(), nullptr};
  const int rc = serveService(3, argv, "ticker", [&](ServedClient& client) {
    return std::make_unique<TickerImpl>(client, shared);
  });
  ::_exit(rc);
}

// Subscribes through `ticker` and opens the stream.
Promise<EventStream> subscribe(Session& s, const Ticker::Client& ticker, uint32_t slots) {
  return EventStream::subscribe(s, ticker, ticker.subscribe([&](auto p) { p.setSlots(slots); }));
}

Promise<void> post(const Ticker::Client& ticker, uint32_t slot, uint64_t first, uint32_t times) {
  auto r = co_await ticker.post([&](auto p) {
    p.setSlot(slot);
    p.setFirst(first);
    p.setTimes(times);
  });
  if (!r) co_return r.error();
  co_return {};
}

struct StatsView {
  uint32_t publishers = 0;
  uint64_t posts = 0;
  uint64_t rings = 0;
};
Promise<StatsView> statsOf(const Ticker::Client& ticker) {
  auto r = co_await ticker.stats();
  if (!r) co_return r.error();
  co_return StatsView{r->results().getPublishers(), r->results().getPosts(),
                      r->results().getRings()};
}

Promise<uint64_t> usedOf(KernelConnection& k, Cap<SpaceBank> bank) {
  auto credit = co_await k.readBank(bank);
  if (!credit) co_return credit.error();
  co_return credit->used;
}

// The used pages of process `name`'s bank.
Promise<uint64_t> processBankUsed(KernelConnection& k, const char* name) {
  auto procs = co_await k.listProcesses();
  if (!procs) co_return procs.error();
  caps::Koid bank = 0;
  for (const auto& p : *procs)
    if (p.name == name) bank = p.bank;
  auto banks = co_await k.listBanks();
  if (!banks) co_return banks.error();
  for (const auto& b : *banks)
    if (b.koid == bank) co_return b.used;
  co_return Error(Errc::NOT_FOUND, "no such process bank");
}

// Shared mappings of this process (an event buffer mapped shows here).
size_t sharedMappings() {
  std::ifstream maps("/proc/self/maps");
  size_t n = 0;
  for (std::string line; std::getline(maps, line);)
    if (line.find("memfd:") != std::string::npos) ++n;
  return n;
}

class EventStreamTest : public ::testing::Test {
 protected:
  KernelProcess kernel_;
};

// ---------------------------------------------------------------------------------------------

TEST_F(EventStreamTest, ASubscriberReadsCoalescedBatchesInSlotOrderPaidFromItsOwnBank) {
  const pid_t server = startServer(kernel_.home());
  Watchdog dog("subscribe and coalesce", 60s, server);
  runSession(kernel_.home(), [&](Session& s) -> Promise<void> {
    AGATE_CO_TRY(co_await s.waitForService("ticker"));
    Result<Cap<SpaceBank>> bank = co_await s.kernel().createBank(s.bank(), 1000);
    CO_CHECK(bank.ok());
    Result<OpenedBushel> opened = co_await s.openBushel("ticker", *bank);
    CO_CHECK(opened.ok());
    Ticker::Client ticker(opened->connection->bootstrap());
    const uint64_t before = (co_await usedOf(s.kernel(), *bank)).value();
    Result<EventStream> stream = co_await subscribe(s, ticker, 64);
    CO_CHECK(stream.ok());
    CO_CHECK(stream->slots() == 64);
    // The stream's cap: read-only, in this process, the buffer the server claimed.
    Result<caps::CapInfo> info = co_await s.kernel().inspectCap(stream->cap());
    CO_CHECK(info.ok() && info->koid == stream->koid());
    CO_CHECK(info->type == caps::ObjectType::EVENT_BUFFER);
    CO_CHECK(info->rights == (caps::Rights::READ | caps::Rights::GRANT));
    // The client cannot write the server's slots: no writable map through its cap.
    CO_CHECK((co_await s.kernel().mapEventBuffer(stream->cap(), true)).code() ==
             Errc::PERMISSION_DENIED);
    // The client's bank paid (through the bushel) at least the stream's pages.
    const uint64_t cost = EventPublisher::costBytes(64, true) / kernel::PAGE_BYTES;
    CO_CHECK((co_await usedOf(s.kernel(), *bank)).value() >= before + cost);

    // Nothing posted: next() waits (parked) until its timeout.
    Result<EventBatch> idle = co_await stream->next(30ms);
    CO_CHECK(idle.code() == Errc::TIMED_OUT);

    // A burst of 1000 posts into one slot, and one post into two others, in one server turn
    // each: every changed slot shows once, in slot order, with the newest value and its count.
    AGATE_CO_TRY(co_await post(ticker, 40, 1, 1000));
    AGATE_CO_TRY(co_await post(ticker, 7, 5000, 1));
    AGATE_CO_TRY(co_await post(ticker, 63, 6000, 2));
    std::vector<EventUpdate> seen;
    while (seen.size() < 3) {
      Result<EventBatch> batch = co_await stream->next(5s);
      CO_CHECK(batch.ok());
      CO_CHECK(batch->stuck.empty());
      for (size_t i = 1; i < batch->updates.size(); ++i)
        CO_CHECK(batch->updates[i - 1].slot < batch->updates[i].slot);
      seen.insert(seen.end(), batch->updates.begin(), batch->updates.end());
    }
    CO_CHECK(seen.size() == 3);
    std::sort(seen.begin(), seen.end(), [](auto& a, auto& b) { return a.slot < b.slot; });
    CO_CHECK(seen[0].slot == 7 && seen[0].coalesced == 1 && seen[0].words[0] == 5000);
    CO_CHECK(seen[1].slot == 40 && seen[1].coalesced == 1000 && seen[1].words[0] == 1000);
    CO_CHECK(kernel::postsOf(seen[1].sequence) == 1000);
    CO_CHECK(seen[2].slot == 63 && seen[2].coalesced == 2 && seen[2].words[0] == 6001);
    for (const auto& u : seen) CO_CHECK(wellFormed(u));
    // One ring per server turn, not per post: at most one per post call (fewer when the
    // server's reader handled several calls in one turn; the ring goes out when the turn ends).
    Result<StatsView> st = co_await statsOf(ticker);
    for (int i = 0; i < 1000 && st.ok() && st->rings == 0; ++i) {
      (void)co_await s.loop().sleep(1ms);
      st = co_await statsOf(ticker);
    }
    CO_CHECK(st.ok());
    EXPECT_EQ(st->posts, 1003u);
    EXPECT_GE(st->rings, 1u);
    EXPECT_LE(st->rings, 3u);

    // Reading a batch allocates nothing (the post is in the slots before its reply comes).
    AGATE_CO_TRY(co_await post(ticker, 9, 1, 5));
    const uint64_t allocations = agate::testing::allocationCount();
    Result<EventBatch> quiet = co_await stream->next(5s);
    EXPECT_EQ(agate::testing::allocationCount(), allocations);
    CO_CHECK(quiet.ok() && quiet->updates.size() == 1 && quiet->updates[0].coalesced == 5);

    // Sequences only go up: the next burst into slot 40 continues its count. The reader is
    // parked first, with a park slice far longer than the wait: only the ring can wake it.
    stream->setParkSlice(10s);
    Promise<EventBatch> parked = stream->next(20s);
    (void)co_await s.loop().sleep(20ms);
    CO_CHECK(!parked.isReady());
    const auto posted = std::chrono::steady_clock::now();
    AGATE_CO_TRY(co_await post(ticker, 40, 2000, 10));
    Result<EventBatch> more = co_await parked;
    CO_CHECK(std::chrono::steady_clock::now() - posted < 5s);
    CO_CHECK(more.ok() && more->updates.size() == 1);
    CO_CHECK(more->updates[0].slot == 40 && more->updates[0].coalesced == 10);
    CO_CHECK(more->updates[0].sequence > seen[1].sequence);
    CO_CHECK(more->updates[0].words[0] == 2009);

    // Dropping the stream deletes its cap (the kernel answers in order: the delete went first).
    const Cap<caps::EventBuffer> cap = stream->cap();
    *stream = EventStream();
    CO_CHECK(!stream->valid());
    CO_CHECK((co_await s.kernel().inspectCap(cap)).code() == Errc::INVALID_HANDLE);
    co_return {};
  });
  ::kill(server, SIGTERM);
  EXPECT_EQ(reap(server), 0);
}

TEST_F(EventStreamTest, ADroppedPendingNextLosesNothingAndTheNextCallGetsThePosts) {
  const pid_t server = startServer(kernel_.home());
  Watchdog dog("cancel", 60s, server);
  runSession(kernel_.home(), [&](Session& s) -> Promise<void> {
    AGATE_CO_TRY(co_await s.waitForService("ticker"));
    Result<Ticker::Client> ticker = co_await s.open<Ticker>("ticker");
    CO_CHECK(ticker.ok());
    Result<EventStream> stream = co_await subscribe(s, *ticker, 4);
    CO_CHECK(stream.ok());
    {
      Promise<EventBatch> pending = stream->next();
      (void)co_await s.loop().sleep(10ms);
      CO_CHECK(!pending.isReady());
    }  // dropped while parked
    Result<EventBatch> cut = co_await s.loop().deadline(stream->next(), 20ms);
    CO_CHECK(cut.code() == Errc::TIMED_OUT);
    AGATE_CO_TRY(co_await post(*ticker, 2, 77, 3));
    Result<EventBatch> batch = co_await stream->next(5s);
    CO_CHECK(batch.ok() && batch->updates.size() == 1);
    CO_CHECK(batch->updates[0].slot == 2 && batch->updates[0].coalesced == 3);
    CO_CHECK(batch->updates[0].words[0] == 79);
    // tryNext: nothing new, without waiting.
    Result<EventBatch> none = stream->tryNext();
    CO_CHECK(none.ok() && none->updates.empty());
    co_return {};
  });
  ::kill(server, SIGTERM);
  EXPECT_EQ(reap(server), 0);
}

TEST_F(EventStreamTest, HostileHandlesAreRefusedWithProtocolErrorAndNothingIsMapped) {
  const pid_t server = startServer(kernel_.home());
  Watchdog dog("hostile handles", 60s, server);
  runSession(kernel_.home(), [&](Session& s) -> Promise<void> {
    AGATE_CO_TRY(co_await s.waitForService("ticker"));
    Result<Ticker::Client> ticker = co_await s.open<Ticker>("ticker");
    CO_CHECK(ticker.ok());
    for (Hostile kind : {Hostile::NOT_AN_EVENT_BUFFER, Hostile::WRITABLE, Hostile::WRONG_KOID,
                         Hostile::NO_SUCH_HANDLE, Hostile::WRONG_SLOTS}) {
      auto sent = co_await ticker->hostile([&](auto p) { p.setKind(kind); });
      CO_CHECK(sent.ok());
      // Snapshot after the server's transfer: what open() does is all that may change.
      auto capsBefore = co_await s.kernel().listCaps(s.kernel().pid());
      CO_CHECK(capsBefore.ok());
      const size_t mapsBefore = sharedMappings();
      Result<EventStream> stream =
          co_await EventStream::open(s, *ticker->cap().connection(), sent->results().getEvents());
      CO_CHECK(stream.code() == Errc::PROTOCOL_ERROR);
      auto capsAfter = co_await s.kernel().listCaps(s.kernel().pid());
      CO_CHECK(capsAfter.ok() && capsAfter->size() == capsBefore->size());
      // (WRONG_SLOTS is refused after the map: the mapping is undone before open() returns.)
      CO_CHECK(sharedMappings() == mapsBefore);
    }
    // An honest subscription still works on the same connection.
    Result<EventStream> stream = co_await subscribe(s, *ticker, 4);
    CO_CHECK(stream.ok());
    AGATE_CO_TRY(co_await post(*ticker, 0, 1, 1));
    Result<EventBatch> batch = co_await stream->next(5s);
    CO_CHECK(batch.ok() && batch->updates.size() == 1 && wellFormed(batch->updates[0]));
    co_return {};
  });
  ::kill(server, SIGTERM);
  EXPECT_EQ(reap(server), 0);
}

TEST_F(EventStreamTest, ASubscriptionTheClientsBankCannotPayIsRefusedAndTheServerMakesNothing) {
  const pid_t server = startServer(kernel_.home());
  Watchdog dog("quota", 60s, server);
  runSession(kernel_.home(), [&](Session& s) -> Promise<void> {
    AGATE_CO_TRY(co_await s.waitForService("ticker"));
    Result<Cap<SpaceBank>> bank = co_await s.kernel().createBank(s.bank(), 1000);
    CO_CHECK(bank.ok());
    Result<OpenedBushel> opened = co_await s.openBushel("ticker", *bank);
    CO_CHECK(opened.ok());
    Ticker::Client ticker(opened->connection->bootstrap());
    const uint64_t rings = (co_await usedOf(s.kernel(), *bank)).value();
    AGATE_CO_TRY(co_await s.kernel().setBankLimit(*bank, rings + 4));
    const uint64_t serverBefore = (co_await processBankUsed(s.kernel(), "ticker-server")).value();
    // 4096 slots are 64 pages: more than the client's bank has left.
    Result<EventStream> refused = co_await subscribe(s, ticker, 4096);
    CO_CHECK(refused.code() == Errc::QUOTA_EXCEEDED);
    CO_CHECK((co_await processBankUsed(s.kernel(), "ticker-server")).value() == serverBefore);
    Result<StatsView> st = co_await statsOf(ticker);
    CO_CHECK(st.ok() && st->publishers == 0);
    co_return {};
  });
  ::kill(server, SIGTERM);
  EXPECT_EQ(reap(server), 0);
}

TEST_F(EventStreamTest, KillingTheServerEndsAPendingNextDisconnectedPromptly) {
  const pid_t server = startServer(kernel_.home());
  Watchdog dog("server kill -9", 60s, server);
  runSession(kernel_.home(), [&](Session& s) -> Promise<void> {
    AGATE_CO_TRY(co_await s.waitForService("ticker"));
    Result<Ticker::Client> ticker = co_await s.open<Ticker>("ticker");
    CO_CHECK(ticker.ok());
    Result<EventStream> stream = co_await subscribe(s, *ticker, 8);
    CO_CHECK(stream.ok());
    Promise<EventBatch> pending = stream->next();
    (void)co_await s.loop().sleep(10ms);
    CO_CHECK(!pending.isReady());
    const auto killed = std::chrono::steady_clock::now();
    CO_CHECK(::kill(server, SIGKILL) == 0);
    Result<EventBatch> ended = co_await pending;
    CO_CHECK(ended.code() == Errc::DISCONNECTED);
    CO_CHECK(std::chrono::steady_clock::now() - killed < 2s);
    CO_CHECK((co_await stream->next()).code() == Errc::DISCONNECTED);  // and stays ended
    CO_CHECK(stream->tryNext().code() == Errc::DISCONNECTED);
    co_return {};
  });
  EXPECT_EQ(reap(server), 128 + SIGKILL);
}

TEST_F(EventStreamTest, KillingTheKernelEndsAPendingNextDisconnectedPromptly) {
  const pid_t server = startServer(kernel_.home());
  Watchdog dog("kernel kill -9", 60s, server);
  runSession(kernel_.home(), [&](Session& s) -> Promise<void> {
    AGATE_CO_TRY(co_await s.waitForService("ticker"));
    Result<Ticker::Client> ticker = co_await s.open<Ticker>("ticker");
    CO_CHECK(ticker.ok());
    Result<EventStream> stream = co_await subscribe(s, *ticker, 8);
    CO_CHECK(stream.ok());
    Promise<EventBatch> pending = stream->next();
    (void)co_await s.loop().sleep(10ms);
    CO_CHECK(!pending.isReady());
    const auto killed = std::chrono::steady_clock::now();
    CO_CHECK(::kill(kernel_.pid(), SIGKILL) == 0);
    CO_CHECK((co_await pending).code() == Errc::DISCONNECTED);
    CO_CHECK(std::chrono::steady_clock::now() - killed < 2s);
    co_return {};
  });
  (void)kernel_.stop();  // reaps the killed daemon (its status says killed, as intended)
  EXPECT_NE(reap(server), 0) << "the server's kernel went: it stops with an error";
}

TEST_F(EventStreamTest, ClosingTheBushelEndsTheStreamAfterWhatWasPostedBeforeTheEnd) {
  const pid_t server = startServer(kernel_.home());
  Watchdog dog("bushel close", 60s, server);
  runSession(kernel_.home(), [&](Session& s) -> Promise<void> {
    AGATE_CO_TRY(co_await s.waitForService("ticker"));
    Result<OpenedBushel> opened = co_await s.openBushel("ticker");
    CO_CHECK(opened.ok());
    Ticker::Client ticker(opened->connection->bootstrap());
    Result<EventStream> stream = co_await subscribe(s, ticker, 8);
    CO_CHECK(stream.ok());
    AGATE_CO_TRY(co_await post(ticker, 5, 50, 1));
    ticker = Ticker::Client();
    AGATE_CO_TRY(co_await s.close(opened->koid));
    Result<EventBatch> last = co_await stream->next(5s);
    CO_CHECK(last.ok() && last->updates.size() == 1 && last->updates[0].words[0] == 50);
    CO_CHECK((co_await stream->next(5s)).code() == Errc::DISCONNECTED);
    co_return {};
  });
  ::kill(server, SIGTERM);
  EXPECT_EQ(reap(server), 0);
}

// The publisher goes while the connection lives (dropped, or closed and kept): the pending
// next() gets what was posted before, then DISCONNECTED, promptly, and the connection carries on.
class EventStreamEndTest : public EventStreamTest, public ::testing::WithParamInterface<End> {};

TEST_P(EventStreamEndTest, ThePublishersEndEndsAPendingNextAfterTheLastBatch) {
  const pid_t server = startServer(kernel_.home());
  Watchdog dog("publisher end", 60s, server);
  runSession(kernel_.home(), [&](Session& s) -> Promise<void> {
    AGATE_CO_TRY(co_await s.waitForService("ticker"));
    Result<Ticker::Client> ticker = co_await s.open<Ticker>("ticker");
    CO_CHECK(ticker.ok());
    Result<EventStream> stream = co_await subscribe(s, *ticker, 8);
    CO_CHECK(stream.ok());
    AGATE_CO_TRY(co_await post(*ticker, 2, 20, 1));
    Result<EventBatch> first = co_await stream->next(5s);
    CO_CHECK(first.ok() && first->updates.size() == 1 && first->updates[0].words[0] == 20);
    // Parked, then posts and the end in one call of the server.
    Promise<EventBatch> pending = stream->next();
    (void)co_await s.loop().sleep(10ms);
    CO_CHECK(!pending.isReady());
    AGATE_CO_TRY(co_await post(*ticker, 6, 60, 3));
    auto ended = ticker->unsubscribe([&](auto p) { p.setHow(GetParam()); });
    const auto asked = std::chrono::steady_clock::now();
    // The posts come first (in one batch, unless a park's slice ended mid-post), then the end.
    Result<EventBatch> r = co_await pending;
    CO_CHECK(r.ok() && r->updates.size() == 1);
    uint64_t newest = 0;
    int batches = 0;
    for (; r.ok() && batches < 4; ++batches, r = co_await stream->next(5s)) {
      for (const EventUpdate& u : r->updates) {
        CO_CHECK(u.slot == 6 && wellFormed(u));
        newest = u.words[0];
      }
    }
    CO_CHECK(newest == 62);
    CO_CHECK(r.code() == Errc::DISCONNECTED);
    CO_CHECK(std::string(r.error().detail) == "the publisher closed the event stream");
    CO_CHECK(std::chrono::steady_clock::now() - asked < 1s);
    CO_CHECK((co_await ended).ok());
    CO_CHECK((co_await stream->next(5s)).code() == Errc::DISCONNECTED);  // and stays ended
    CO_CHECK(stream->tryNext().code() == Errc::DISCONNECTED);
    CO_CHECK(stream->endChecks() <= 3);
    // The connection carries on, and a new stream works.
    Result<StatsView> st = co_await statsOf(*ticker);
    CO_CHECK(st.ok() && st->publishers == (GetParam() == End::DROP ? 0u : 1u));
    Result<EventStream> again = co_await subscribe(s, *ticker, 4);
    CO_CHECK(again.ok());
    AGATE_CO_TRY(co_await post(*ticker, 1, 10, 1));
    Result<EventBatch> fresh = co_await again->next(5s);
    CO_CHECK(fresh.ok() && fresh->updates.size() == 1 && fresh->updates[0].words[0] == 10);
    co_return {};
  });
  ::kill(server, SIGTERM);
  EXPECT_EQ(reap(server), 0);
}

INSTANTIATE_TEST_SUITE_P(DropAndClose, EventStreamEndTest,
                         ::testing::Values(End::DROP, End::CLOSE));

// open() counts its connection from its first line: the caller may drop the response, the
// client and the OpenedBushel, and close the bushel, while open() waits for the kernel; the
// session frees the connection only once open() has let go, which ends DISCONNECTED.
TEST_F(EventStreamTest, OpenKeepsItsConnectionWhenTheBushelIsClosedWhileItWaits) {
  const pid_t server = startServer(kernel_.home());
  Watchdog dog("open vs close", 60s, server);
  runSession(kernel_.home(), [&](Session& s) -> Promise<void> {
    AGATE_CO_TRY(co_await s.waitForService("ticker"));
    Result<OpenedBushel> opened = co_await s.openBushel("ticker");
    CO_CHECK(opened.ok());
    const caps::Koid koid = opened->koid;
    rpc::RpcConnection& connection = *opened->connection;
    std::optional<Promise<EventStream>> pending;
    {
      Ticker::Client ticker(opened->connection->bootstrap());
      auto raw = co_await ticker.rawStream([](auto p) { p.setSlots(4); });
      CO_CHECK(raw.ok());
      // open() copies the handle before its first suspension: the response may go now.
      pending.emplace(EventStream::open(s, connection, raw->results().getEvents()));
    }                                            // the response and the client go
    opened = Error(Errc::CANCELLED, "dropped");  // and the OpenedBushel's reference
    AGATE_CO_TRY(co_await s.close(koid));        // closed while open() waits for the kernel
    CO_CHECK(s.heldCount() == 1);                // open() still refers to it
    Result<EventStream> stream = co_await std::move(*pending);
    CO_CHECK(stream.code() == Errc::DISCONNECTED);
    pending.reset();
    for (int i = 0; i < 3; ++i) AGATE_CO_TRY(co_await s.loop().sleep(1ms));
    CO_CHECK(s.heldCount() == 0);  // then freed
    co_return {};
  });
  ::kill(server, SIGTERM);
  EXPECT_EQ(reap(server), 0);
}

TEST_F(EventStreamTest, AnEndWithNothingPendingIsSeenByTheNextCall) {
  const pid_t server = startServer(kernel_.home());
  Watchdog dog("publisher end, not parked", 60s, server);
  runSession(kernel_.home(), [&](Session& s) -> Promise<void> {
    AGATE_CO_TRY(co_await s.waitForService("ticker"));
    Result<Ticker::Client> ticker = co_await s.open<Ticker>("ticker");
    CO_CHECK(ticker.ok());
    Result<EventStream> stream = co_await subscribe(s, *ticker, 8);
    CO_CHECK(stream.ok());
    AGATE_CO_TRY(co_await post(*ticker, 0, 7, 1));
    AGATE_CO_TRY(co_await ticker->unsubscribe([](auto p) { p.setHow(End::CLOSE); }));
    // Nobody was parked when the kernel rang: the posts come, then the end, within a slice.
    Result<EventBatch> last = co_await stream->next(5s);
    CO_CHECK(last.ok() && last->updates.size() == 1 && last->updates[0].words[0] == 7);
    const auto asked = std::chrono::steady_clock::now();
    CO_CHECK((co_await stream->next(5s)).code() == Errc::DISCONNECTED);
    CO_CHECK(std::chrono::steady_clock::now() - asked < 1s);
    co_return {};
  });
  ::kill(server, SIGTERM);
  EXPECT_EQ(reap(server), 0);
}

TEST_F(EventStreamTest, AHostilePublisherNeitherEndsAStreamFalselyNorMakesTheClientSpin) {
  const pid_t server = startServer(kernel_.home());
  Watchdog dog("hostile publisher", 60s, server);
  runSession(kernel_.home(), [&](Session& s) -> Promise<void> {
    AGATE_CO_TRY(co_await s.waitForService("ticker"));
    Result<OpenedBushel> opened = co_await s.openBushel("ticker");
    CO_CHECK(opened.ok());
    Ticker::Client ticker(opened->connection->bootstrap());
    auto raw = co_await ticker.rawStream([](auto p) { p.setSlots(4); });
    if (!raw) ADD_FAILURE() << describe(raw.error());
    CO_CHECK(raw.ok());
    Result<EventStream> stream =
        co_await EventStream::open(s, *opened->connection, raw->results().getEvents());
    CO_CHECK(stream.ok());
    // A storm of rings with nothing posted: next() stays pending until its timeout, and a ring
    // costs no kernel call.
    auto storm = ticker.abuse([](auto p) {
      p.setHow(Abuse::STORM);
      p.setMs(400);
    });
    CO_CHECK((co_await stream->next(300ms)).code() == Errc::TIMED_OUT);
    CO_CHECK((co_await storm).ok());
    CO_CHECK(stream->endChecks() == 0);
    // The ends word forged, again and again: the stream asks the kernel at most about once per
    // park slice, and the kernel says the stream lives.
    auto forged = ticker.abuse([](auto p) {
      p.setHow(Abuse::FAKE_END);
      p.setMs(400);
    });
    const auto started = std::chrono::steady_clock::now();
    Result<EventBatch> quiet = co_await stream->next(300ms);
    const auto waited = std::chrono::steady_clock::now() - started;
    CO_CHECK(quiet.code() == Errc::TIMED_OUT);
    CO_CHECK((co_await forged).ok());
    const auto slices = waited / EventStream::PARK_SLICE;
    CO_CHECK(stream->endChecks() >= 1);
    CO_CHECK(stream->endChecks() <= static_cast<uint64_t>(slices) + 2);
    CO_CHECK(stream->tryNext().ok());  // still open, nothing new

    // tryNext() polled through another forgery: never an end, and at most about one kernel
    // call per park slice however often it is called.
    const uint64_t checksBefore = stream->endChecks();
    auto forgedAgain = ticker.abuse([](auto p) {
      p.setHow(Abuse::FAKE_END);
      p.setMs(400);
    });
    const auto polling = std::chrono::steady_clock::now();
    uint64_t polls = 0;
    while (std::chrono::steady_clock::now() - polling < 300ms) {
      Result<EventBatch> polled = stream->tryNext();
      CO_CHECK(polled.ok() && polled->updates.empty() && polled->stuck.empty());
      ++polls;
      (void)co_await s.loop().sleep(1ms);  // the loop runs: the kernel's answers are read
    }
    const auto polled = std::chrono::steady_clock::now() - polling;
    CO_CHECK((co_await forgedAgain).ok());
    CO_CHECK(stream->tryNext().ok());
    const uint64_t pollChecks = stream->endChecks() - checksBefore;
    CO_CHECK(pollChecks >= 1);
    CO_CHECK(pollChecks <= static_cast<uint64_t>(polled / EventStream::PARK_SLICE) + 2);
    CO_CHECK(polls > 2 * pollChecks);  // not a call per poll

    // The stream ends with its connection.
    ticker = Ticker::Client();
    AGATE_CO_TRY(co_await s.close(opened->koid));
    CO_CHECK((co_await stream->next(5s)).code() == Errc::DISCONNECTED);
    co_return {};
  });
  ::kill(server, SIGTERM);
  EXPECT_EQ(reap(server), 0);
}

// A raw stream (rawStream) on `ticker`, opened.
Promise<EventStream> openRaw(Session& s, Ticker::Client& ticker, rpc::RpcConnection& connection) {
  auto raw = co_await ticker.rawStream([](auto p) { p.setSlots(4); });
  if (!raw) co_return raw.error();
  co_return co_await EventStream::open(s, connection, raw->results().getEvents());
}

Promise<void> abuse(Ticker::Client& ticker, Abuse how, uint32_t ms = 0) {
  auto r = co_await ticker.abuse([&](auto p) {
    p.setHow(how);
    p.setMs(ms);
  });
  if (!r) co_return r.error();
  co_return {};
}

// Polls tryNext() (letting the loop run between calls) until it fails: that error goes to
// `end`, every update seen before it to `seen`. TIMED_OUT if there is no end within 5 s.
Promise<void> pollToEnd(Session& s, EventStream& stream, std::vector<EventUpdate>& seen,
                        Error& end) {
  const auto deadline = std::chrono::steady_clock::now() + 5s;
  while (std::chrono::steady_clock::now() < deadline) {
    Result<EventBatch> r = stream.tryNext();
    if (!r) {
      end = r.error();
      co_return {};
    }
    seen.insert(seen.end(), r->updates.begin(), r->updates.end());
    (void)co_await s.loop().sleep(1ms);
  }
  co_return Error(Errc::TIMED_OUT, "tryNext() saw no end within 5 s");
}

TEST_F(EventStreamTest, TryNextSeesThePublishersEndAfterTheLastPosts) {
  const pid_t server = startServer(kernel_.home());
  Watchdog dog("publisher end, polled", 60s, server);
  runSession(kernel_.home(), [&](Session& s) -> Promise<void> {
    AGATE_CO_TRY(co_await s.waitForService("ticker"));
    Result<Ticker::Client> ticker = co_await s.open<Ticker>("ticker");
    CO_CHECK(ticker.ok());
    for (End how : {End::CLOSE, End::DROP}) {
      Result<EventStream> stream = co_await subscribe(s, *ticker, 8);
      CO_CHECK(stream.ok());
      AGATE_CO_TRY(co_await post(*ticker, 3, 30, 4));
      AGATE_CO_TRY(co_await ticker->unsubscribe([&](auto p) { p.setHow(how); }));
      const auto ended = std::chrono::steady_clock::now();
      std::vector<EventUpdate> seen;
      Error end;
      AGATE_CO_TRY(co_await pollToEnd(s, *stream, seen, end));
      CO_CHECK(end.code == Errc::DISCONNECTED);
      CO_CHECK(std::string(end.detail) == "the publisher closed the event stream");
      CO_CHECK(std::chrono::steady_clock::now() - ended < 1s);
      // The posts came first, whole, then the end.
      CO_CHECK(!seen.empty() && seen.back().slot == 3 && seen.back().words[0] == 33);
      for (const EventUpdate& u : seen) CO_CHECK(u.slot == 3 && wellFormed(u));
      CO_CHECK(stream->endChecks() <= 3);
      // And it stays ended, for both calls, with no further kernel call.
      const uint64_t checks = stream->endChecks();
      CO_CHECK(stream->tryNext().code() == Errc::DISCONNECTED);
      CO_CHECK((co_await stream->next(5s)).code() == Errc::DISCONNECTED);
      CO_CHECK(stream->endChecks() == checks);
    }
    co_return {};
  });
  ::kill(server, SIGTERM);
  EXPECT_EQ(reap(server), 0);
}

// A publisher that destroys its notification before its event buffer: the stream does not end
// while the buffer lives, and ends promptly, after the last posts, when it goes.
TEST_F(EventStreamTest, ThePublishersEndReachesTheStreamWhicheverObjectGoesFirst) {
  const pid_t server = startServer(kernel_.home());
  Watchdog dog("publisher end, either order", 60s, server);
  runSession(kernel_.home(), [&](Session& s) -> Promise<void> {
    AGATE_CO_TRY(co_await s.waitForService("ticker"));
    Result<OpenedBushel> opened = co_await s.openBushel("ticker");
    CO_CHECK(opened.ok());
    Ticker::Client ticker(opened->connection->bootstrap());
    rpc::RpcConnection& connection = *opened->connection;

    // Both in one call, the notification first, while next() is parked.
    {
      Result<EventStream> stream = co_await openRaw(s, ticker, connection);
      CO_CHECK(stream.ok());
      Promise<EventBatch> pending = stream->next(5s);
      (void)co_await s.loop().sleep(10ms);
      CO_CHECK(!pending.isReady());
      const auto asked = std::chrono::steady_clock::now();
      AGATE_CO_TRY(co_await abuse(ticker, Abuse::WRONG_ORDER));
      Result<EventBatch> r = co_await pending;
      CO_CHECK(r.code() == Errc::DISCONNECTED);
      CO_CHECK(std::string(r.error().detail) == "the publisher closed the event stream");
      CO_CHECK(std::chrono::steady_clock::now() - asked < 1s);
    }
    // The notification alone first: no end while the buffer lives, for next() or tryNext();
    // then the buffer, with a post before it: the post, then the end.
    {
      Result<EventStream> stream = co_await openRaw(s, ticker, connection);
      CO_CHECK(stream.ok());
      AGATE_CO_TRY(co_await abuse(ticker, Abuse::DROP_NOTIFICATION));
      CO_CHECK((co_await stream->next(200ms)).code() == Errc::TIMED_OUT);
      Result<EventBatch> none = stream->tryNext();
      CO_CHECK(none.ok() && none->updates.empty());
      Promise<EventBatch> pending = stream->next(5s);
      (void)co_await s.loop().sleep(10ms);
      CO_CHECK(!pending.isReady());
      const auto asked = std::chrono::steady_clock::now();
      AGATE_CO_TRY(co_await abuse(ticker, Abuse::DROP_BUFFER, 99));
      Result<EventBatch> last = co_await pending;
      CO_CHECK(last.ok() && last->updates.size() == 1);
      CO_CHECK(last->updates[0].slot == 0 && last->updates[0].words[0] == 99);
      CO_CHECK(wellFormed(last->updates[0]));
      Result<EventBatch> end = co_await stream->next(5s);
      CO_CHECK(end.code() == Errc::DISCONNECTED);
      CO_CHECK(std::string(end.error().detail) == "the publisher closed the event stream");
      CO_CHECK(std::chrono::steady_clock::now() - asked < 1s);
      CO_CHECK(stream->endChecks() <= 3);
    }
    // The same order, seen by tryNext().
    {
      Result<EventStream> stream = co_await openRaw(s, ticker, connection);
      CO_CHECK(stream.ok());
      AGATE_CO_TRY(co_await abuse(ticker, Abuse::DROP_NOTIFICATION));
      Result<EventBatch> none = stream->tryNext();
      CO_CHECK(none.ok() && none->updates.empty());
      AGATE_CO_TRY(co_await abuse(ticker, Abuse::DROP_BUFFER, 7));
      const auto asked = std::chrono::steady_clock::now();
      std::vector<EventUpdate> seen;
      Error end;
      AGATE_CO_TRY(co_await pollToEnd(s, *stream, seen, end));
      CO_CHECK(end.code == Errc::DISCONNECTED);
      CO_CHECK(std::string(end.detail) == "the publisher closed the event stream");
      CO_CHECK(std::chrono::steady_clock::now() - asked < 1s);
      CO_CHECK(seen.size() == 1 && seen[0].slot == 0 && seen[0].words[0] == 7);
    }
    // The connection carries on.
    Result<EventStream> fresh = co_await subscribe(s, ticker, 2);
    CO_CHECK(fresh.ok());
    AGATE_CO_TRY(co_await post(ticker, 1, 5, 1));
    Result<EventBatch> batch = co_await fresh->next(5s);
    CO_CHECK(batch.ok() && batch->updates.size() == 1 && batch->updates[0].words[0] == 5);
    co_return {};
  });
  ::kill(server, SIGTERM);
  EXPECT_EQ(reap(server), 0);
}

TEST_F(EventStreamTest, KillingASubscriberReclaimsItsPublisherAndTheServersPagesReturn) {
  const pid_t server = startServer(kernel_.home());
  int go[2];
  int ready[2];
  ASSERT_EQ(::pipe(go), 0);
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t parent = ::getpid();
  const pid_t victim = ::fork();
  if (victim == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(1);
    ::alarm(60);
    char byte = 0;
    if (::read(go[0], &byte, 1) != 1) ::_exit(4);
    EventLoop loop;
    auto kernel = KernelConnection::tryAttach(loop, kernel_.home(), "ticker-victim");
    if (!kernel) ::_exit(2);
    Session s(**kernel);
    Status done = loop.run([&]() -> Promise<void> {
      Result<Ticker::Client> ticker = co_await s.open<Ticker>("ticker");
      if (!ticker) co_return ticker.error();
      Result<EventStream> stream = co_await subscribe(s, *ticker, 256);
      if (!stream) co_return stream.error();
      auto pending = stream->next();
      const char one = 1;
      if (::write(ready[1], &one, 1) != 1) co_return Error(Errc::SYSTEM_ERROR, "pipe");
      (void)co_await s.loop().sleep(std::chrono::hours(1));  // until killed
      co_return {};
    }());
    ::_exit(done ? 0 : 3);
  }
  Watchdog dog("subscriber kill -9", 60s, server);
  runSession(kernel_.home(), [&](Session& s) -> Promise<void> {
    AGATE_CO_TRY(co_await s.waitForService("ticker"));
    Result<Ticker::Client> ticker = co_await s.open<Ticker>("ticker");
    CO_CHECK(ticker.ok());
    const uint64_t baseline = (co_await processBankUsed(s.kernel(), "ticker-server")).value();
    const char one = 1;
    CO_CHECK(::write(go[1], &one, 1) == 1);
    char byte = 0;
    CO_CHECK(::read(ready[0], &byte, 1) == 1);  // the victim subscribed and waits on its stream
    Result<StatsView> st = co_await statsOf(*ticker);
    CO_CHECK(st.ok() && st->publishers == 1);
    const uint64_t subscribed = (co_await processBankUsed(s.kernel(), "ticker-server")).value();
    CO_CHECK(subscribed >= baseline + EventPublisher::costBytes(256, true) / kernel::PAGE_BYTES);

    CO_CHECK(::kill(victim, SIGKILL) == 0);
    uint64_t used = subscribed;
    for (int i = 0; i < 1000 && (st->publishers != 0 || used != baseline); ++i) {
      (void)co_await s.loop().sleep(5ms);
      st = co_await statsOf(*ticker);
      CO_CHECK(st.ok());
      used = (co_await processBankUsed(s.kernel(), "ticker-server")).value();
    }
    CO_CHECK(st->publishers == 0);
    CO_CHECK(used == baseline);
    co_return {};
  });
  EXPECT_EQ(reap(victim), 128 + SIGKILL);
  ::kill(server, SIGTERM);
  EXPECT_EQ(reap(server), 0);
}

// The stream's deleteCap is a detached call: dropped while the kernel connection's submission
// ring is full (the kernel stopped, calls written until one queues), it waits its turn and the
// client's cap still goes.
TEST_F(EventStreamTest, AStreamDroppedWhileTheSubmissionRingIsFullStillDeletesItsCap) {
  const pid_t server = startServer(kernel_.home());
  Watchdog dog("stream dropped behind a full ring", 60s, server);
  runSession(kernel_.home(), [&](Session& s) -> Promise<void> {
    AGATE_CO_TRY(co_await s.waitForService("ticker"));
    Result<Ticker::Client> ticker = co_await s.open<Ticker>("ticker");
    CO_CHECK(ticker.ok());
    KernelConnection& k = s.kernel();
    Result<std::vector<caps::CapEntry>> before = co_await k.listCaps(k.pid());
    CO_CHECK(before.ok());
    Result<EventStream> stream = co_await subscribe(s, *ticker, 4);
    CO_CHECK(stream.ok());
    Result<std::vector<caps::CapEntry>> subscribed = co_await k.listCaps(k.pid());
    CO_CHECK(subscribed.ok() && subscribed->size() == before->size() + 1);

    CO_CHECK(::kill(kernel_.pid(), SIGSTOP) == 0);
    std::vector<Promise<caps::CapInfo>> calls;
    while (k.callsQueued() == 0) calls.push_back(k.inspectCap(k.bank()));
    stream = Error(Errc::CANCELLED);  // the stream goes: its deleteCap queues behind the calls
    CO_CHECK(k.callsQueued() == 2);
    CO_CHECK(::kill(kernel_.pid(), SIGCONT) == 0);
    for (Promise<caps::CapInfo>& p : calls) CO_CHECK((co_await p).ok());

    Result<std::vector<caps::CapEntry>> after = co_await k.listCaps(k.pid());
    CO_CHECK(after.ok() && after->size() == before->size());
    CO_CHECK(k.detachedCallsRefused() == 0);
    co_return {};
  });
  ::kill(server, SIGTERM);
  EXPECT_EQ(reap(server), 0);
}

}  // namespace
}  // namespace agate::client
