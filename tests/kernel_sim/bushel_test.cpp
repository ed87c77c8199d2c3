// Registry, services and bushels: names, duplicates, lookups, and every way a bushel is torn
// down (last cap, client bank, client death, server death), with the events each side gets and
// bank usage and the kernel's descriptors back to their baseline.

#include <gtest/gtest.h>

#include "kernel_test_util.h"

namespace agate::kernel::test {
namespace {

struct World {
  Kernel k;
  Proc server;
  Proc client;
  Handle serverRegistry;
  Handle clientRegistry;
  World() {
    server = attach(k, 1000);
    client = attach(k, 1000);
    serverRegistry = handleOf(k.tryGrantRegistry(server.pid, Rights::READ | Rights::WRITE));
    clientRegistry = handleOf(k.tryGrantRegistry(client.pid, Rights::READ));
  }
};

TEST(RegistryTest, InvalidNamesAreRefusedAndChangeNothing) {
  World w;
  for (std::string_view bad : {"", "-lead", "has space", "slash/name", "ümlaut"})
    EXPECT_REFUSED_UNCHANGED(
        w.k, w.k.tryRegisterService(w.server.pid, w.serverRegistry, bad, w.server.bank),
        Errc::INVALID_ARGUMENT);
  EXPECT_REFUSED_UNCHANGED(
      w.k,
      w.k.tryRegisterService(w.server.pid, w.serverRegistry, std::string(65, 'a'), w.server.bank),
      Errc::INVALID_ARGUMENT);
  EXPECT_TRUE(
      w.k.tryRegisterService(w.server.pid, w.serverRegistry, std::string(64, 'a'), w.server.bank)
          .ok());
  EXPECT_TRUE(
      w.k.tryRegisterService(w.server.pid, w.serverRegistry, "a.b_c-9", w.server.bank).ok());
}

TEST(RegistryTest, DuplicateNameIsAlreadyExistsAndChangesNothing) {
  World w;
  (void)handleOf(w.k.tryRegisterService(w.server.pid, w.serverRegistry, "fs", w.server.bank));
  EXPECT_REFUSED_UNCHANGED(
      w.k, w.k.tryRegisterService(w.server.pid, w.serverRegistry, "fs", w.server.bank),
      Errc::ALREADY_EXISTS);
}

TEST(RegistryTest, RegisteringNeedsWriteOnTheRegistryAndAllocateOnTheBank) {
  World w;
  EXPECT_REFUSED_UNCHANGED(
      w.k, w.k.tryRegisterService(w.client.pid, w.clientRegistry, "fs", w.client.bank),
      Errc::PERMISSION_DENIED);
  Handle readOnlyBank = handleOf(w.k.tryCopyCap(w.server.pid, w.server.bank, Rights::READ));
  EXPECT_REFUSED_UNCHANGED(
      w.k, w.k.tryRegisterService(w.server.pid, w.serverRegistry, "fs", readOnlyBank),
      Errc::PERMISSION_DENIED);
  EXPECT_REFUSED_UNCHANGED(w.k,
                           w.k.tryRegisterService(w.server.pid, w.server.bank, "fs", w.server.bank),
                           Errc::WRONG_TYPE);
}

TEST(RegistryTest, LookupFindsLiveServicesOnlyAndDeadServiceIsUnregistered) {
  World w;
  EXPECT_EQ(w.k.tryLookupService(w.client.pid, w.clientRegistry, "fs").code(), Errc::NOT_FOUND);
  Handle svc =
      handleOf(w.k.tryRegisterService(w.server.pid, w.serverRegistry, "fs", w.server.bank));
  auto koid = w.k.tryLookupService(w.client.pid, w.clientRegistry, "fs");
  ASSERT_TRUE(koid.ok());
  EXPECT_EQ(*koid, w.k.tryInspectCap(w.server.pid, svc)->koid);
  ASSERT_TRUE(w.k.tryKillProcess(w.server.pid).ok());
  EXPECT_EQ(w.k.tryLookupService(w.client.pid, w.clientRegistry, "fs").code(), Errc::NOT_FOUND);
  EXPECT_REFUSED_UNCHANGED(
      w.k, w.k.tryOpenBushel(w.client.pid, w.clientRegistry, "fs", w.client.bank), Errc::NOT_FOUND);
  EXPECT_TRUE(w.k.registry().names().empty());
}

TEST(RegistryTest, AServersDeathEndsItsServicesEvenWhenAnotherProcesssBankPaidForThem) {
  World w;
  // The client pays for the server's registrations: a bank of its own, given to the server.
  Handle forServer = handleOf(w.k.tryCreateBank(w.client.pid, w.client.bank, 100));
  Handle given =
      handleOf(w.k.tryTransferCap(w.client.pid, forServer, w.server.pid, TransferMode::COPY));
  const uint64_t clientUsed = usedOf(w.k, w.client.pid, w.client.bank);
  const uint64_t objects = w.k.objectCount();
  (void)handleOf(w.k.tryRegisterService(w.server.pid, w.serverRegistry, "fs", given));
  (void)handleOf(w.k.tryRegisterService(w.server.pid, w.serverRegistry, "fs2", given));
  (void)handleOf(w.k.tryRegisterService(w.server.pid, w.serverRegistry, "own", w.server.bank));
  // Another server's service, paid from the same bank, is not the dead server's to take along.
  Proc other = attach(w.k, 1000);
  Handle otherRegistry = handleOf(w.k.tryGrantRegistry(other.pid, Rights::WRITE));
  Handle toOther =
      handleOf(w.k.tryTransferCap(w.client.pid, forServer, other.pid, TransferMode::COPY));
  (void)handleOf(w.k.tryRegisterService(other.pid, otherRegistry, "other", toOther));
  Handle bushel = handleOf(w.k.tryOpenBushel(w.client.pid, w.clientRegistry, "fs", w.client.bank));
  const Koid bushelKoid = w.k.tryInspectCap(w.client.pid, bushel)->koid;
  (void)w.k.takeEvents(w.server.pid);
  EXPECT_GT(usedOf(w.k, w.client.pid, w.client.bank), clientUsed);

  ASSERT_TRUE(w.k.tryKillProcess(w.server.pid).ok());
  EXPECT_EQ(w.k.tryLookupService(w.client.pid, w.clientRegistry, "fs").code(), Errc::NOT_FOUND);
  EXPECT_EQ(w.k.tryLookupService(w.client.pid, w.clientRegistry, "fs2").code(), Errc::NOT_FOUND);
  EXPECT_EQ(w.k.tryLookupService(w.client.pid, w.clientRegistry, "own").code(), Errc::NOT_FOUND);
  EXPECT_TRUE(w.k.tryLookupService(w.client.pid, w.clientRegistry, "other").ok());
  EXPECT_REFUSED_UNCHANGED(
      w.k, w.k.tryOpenBushel(w.client.pid, w.clientRegistry, "fs", w.client.bank), Errc::NOT_FOUND);
  // The client hears of it as for any server's death, and its bushel is gone.
  auto events = w.k.takeEvents(w.client.pid);
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0].type, KernelEventType::SERVICE_GONE);
  EXPECT_EQ(events[0].object, bushelKoid);
  EXPECT_EQ(events[1].type, KernelEventType::BUSHEL_CLOSED);
  EXPECT_EQ(w.k.tryInspectCap(w.client.pid, bushel).code(), Errc::INVALID_HANDLE);
  // The records go back to the bank that paid, which stays with the other server's service.
  auto paying = w.k.tryFindBank(w.client.pid, forServer, Rights::NONE);
  ASSERT_TRUE(paying.ok());
  EXPECT_EQ((*paying)->objectCount(), 1u) << "only the other server's service is left";
  EXPECT_EQ(usedOf(w.k, w.client.pid, w.client.bank), clientUsed + 1)
      << "every record of the dead server's services refunded; the other's one record page";
  EXPECT_EQ(w.k.registry().names(), std::vector<std::string>{"other"});
  EXPECT_EQ(w.k.objectCount(), objects + 1)
      << "the server's bank and CSpace went, the other's came, with its service";
  // The name is free for a new server at once.
  (void)handleOf(w.k.tryRegisterService(other.pid, otherRegistry, "fs", toOther));
  EXPECT_TRUE(w.k.tryLookupService(w.client.pid, w.clientRegistry, "fs").ok());
  w.k.verifyInvariants();
}

TEST(RegistryTest, DestroyingTheServiceCapUnregistersAndTheNameIsFreeAgain) {
  World w;
  Handle svc =
      handleOf(w.k.tryRegisterService(w.server.pid, w.serverRegistry, "fs", w.server.bank));
  Handle copy = handleOf(w.k.tryCopyCap(w.server.pid, svc, Rights::READ));
  ASSERT_TRUE(w.k.tryDeleteCap(w.server.pid, copy).ok());
  ASSERT_TRUE(w.k.tryDeleteCap(w.server.pid, svc).ok());
  EXPECT_TRUE(w.k.tryLookupService(w.client.pid, w.clientRegistry, "fs").ok())
      << "a service outlives its last cap: it belongs to its bank";
  Handle svc2 =
      handleOf(w.k.tryRegisterService(w.server.pid, w.serverRegistry, "fs2", w.server.bank));
  ASSERT_TRUE(w.k.tryDestroyObject(w.server.pid, svc2).ok());
  EXPECT_TRUE(w.k.tryRegisterService(w.server.pid, w.serverRegistry, "fs2", w.server.bank).ok());
}

TEST(RegistryTest, TheRegistryCannotBeDestroyed) {
  World w;
  Handle all = handleOf(w.k.tryGrantRegistry(w.server.pid, Rights::ALL));
  EXPECT_REFUSED_UNCHANGED(w.k, w.k.tryDestroyObject(w.server.pid, all), Errc::PERMISSION_DENIED);
  EXPECT_REFUSED_UNCHANGED(w.k, w.k.tryGrantRegistry(w.server.pid + 7, Rights::READ),
                           Errc::NOT_FOUND);
}

struct Opened {
  Handle svc;
  Handle bushel;
  Koid koid = 0;
};

Opened open(World& w, Handle bank) {
  Opened o;
  o.svc = handleOf(w.k.tryRegisterService(w.server.pid, w.serverRegistry, "echo", w.server.bank));
  o.bushel = handleOf(w.k.tryOpenBushel(w.client.pid, w.clientRegistry, "echo", bank));
  o.koid = w.k.tryInspectCap(w.client.pid, o.bushel)->koid;
  return o;
}

TEST(BushelTest, OpeningGivesTheServerItsRingsAndTheClientACap) {
  World w;
  const uint64_t used = usedOf(w.k, w.client.pid, w.client.bank);
  Opened o = open(w, w.client.bank);
  EXPECT_GT(usedOf(w.k, w.client.pid, w.client.bank), used + 2) << "rings are charged";
  auto events = w.k.takeEvents(w.server.pid);
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].type, KernelEventType::BUSHEL_OPENED);
  EXPECT_EQ(events[0].object, o.koid);
  EXPECT_EQ(events[0].peer, w.client.pid);
  ASSERT_EQ(events[0].fds.size(), 2u);
  auto server = Channel::openShared(std::move(events[0].fds[0]));
  ASSERT_TRUE(server.ok());
  auto fds = w.k.tryBushelFds(w.client.pid, o.bushel);
  ASSERT_TRUE(fds.ok());
  auto client = Channel::openShared(std::move((*fds)[0]));
  ASSERT_TRUE(client.ok());
  auto tx = (*client)->attachSender();
  auto rx = (*server)->attachReceiver();
  ASSERT_TRUE(tx.ok() && rx.ok());
  const std::byte msg[3] = {std::byte{1}, std::byte{2}, std::byte{3}};
  ASSERT_TRUE(tx->trySend(msg).ok());
  auto frame = rx->tryReceive();
  ASSERT_TRUE(frame.ok()) << "the request ring is shared between the two sides";
  EXPECT_TRUE(w.k.takeEvents(w.client.pid).empty());
}

TEST(BushelTest, OpenErrorsChangeNothing) {
  World w;
  (void)handleOf(w.k.tryRegisterService(w.server.pid, w.serverRegistry, "echo", w.server.bank));
  (void)w.k.takeEvents(w.server.pid);
  EXPECT_REFUSED_UNCHANGED(w.k,
                           w.k.tryOpenBushel(w.client.pid, w.clientRegistry, "nope", w.client.bank),
                           Errc::NOT_FOUND);
  EXPECT_REFUSED_UNCHANGED(
      w.k, w.k.tryOpenBushel(w.client.pid, w.clientRegistry, "bad name", w.client.bank),
      Errc::INVALID_ARGUMENT);
  Handle noRead = handleOf(w.k.tryGrantRegistry(w.client.pid, Rights::GRANT));
  EXPECT_REFUSED_UNCHANGED(w.k, w.k.tryOpenBushel(w.client.pid, noRead, "echo", w.client.bank),
                           Errc::PERMISSION_DENIED);
  Handle tiny = handleOf(w.k.tryCreateBank(w.client.pid, w.client.bank, 2));
  EXPECT_REFUSED_UNCHANGED(w.k, w.k.tryOpenBushel(w.client.pid, w.clientRegistry, "echo", tiny),
                           Errc::QUOTA_EXCEEDED);
  EXPECT_REFUSED_UNCHANGED(w.k, w.k.tryBushelFds(w.client.pid, tiny), Errc::WRONG_TYPE);
  EXPECT_TRUE(w.k.takeEvents(w.server.pid).empty());
}

// Each teardown path: the bushel goes, the server (and a live client) get BUSHEL_CLOSED, the
// paying bank's usage and the kernel's descriptors are back where they were before the open.
enum class Teardown { LAST_CAP, CLIENT_BANK, CLIENT_DEATH, SERVER_DEATH, SERVER_CLOSE };

class BushelTeardownTest : public ::testing::TestWithParam<Teardown> {};

TEST_P(BushelTeardownTest, TellsThePeerAndReturnsPagesAndDescriptors) {
  World w;
  Handle bank = handleOf(w.k.tryCreateBank(w.client.pid, w.client.bank, 500));
  const uint64_t clientUsed = usedOf(w.k, w.client.pid, w.client.bank);
  const size_t fdsBefore = countOpenFds();
  Opened o = open(w, bank);
  Handle copy = handleOf(w.k.tryCopyCap(w.client.pid, o.bushel, Rights::READ));
  (void)w.k.takeEvents(w.server.pid);  // BUSHEL_OPENED (its descriptors close here)
  const uint64_t usedOpen = usedOf(w.k, w.client.pid, w.client.bank);

  switch (GetParam()) {
    case Teardown::LAST_CAP:
      ASSERT_TRUE(w.k.tryDeleteCap(w.client.pid, o.bushel).ok());
      EXPECT_TRUE(w.k.takeEvents(w.server.pid).empty()) << "a copy still names it";
      EXPECT_EQ(usedOf(w.k, w.client.pid, w.client.bank), usedOpen);
      ASSERT_TRUE(w.k.tryDeleteCap(w.client.pid, copy).ok());
      break;
    case Teardown::CLIENT_BANK:
      ASSERT_TRUE(w.k.tryDestroyObject(w.client.pid, bank).ok());
      break;
    case Teardown::CLIENT_DEATH:
      ASSERT_TRUE(w.k.tryKillProcess(w.client.pid).ok());
      break;
    case Teardown::SERVER_DEATH:
      ASSERT_TRUE(w.k.tryKillProcess(w.server.pid).ok());
      break;
    case Teardown::SERVER_CLOSE:
      ASSERT_TRUE(w.k.tryCloseBushel(w.server.pid, o.svc, o.koid).ok());
      EXPECT_EQ(w.k.tryInspectCap(w.client.pid, o.bushel).code(), Errc::INVALID_HANDLE)
          << "the client's cap goes with the bushel";
      break;
  }
  w.k.verifyInvariants();
  EXPECT_EQ(w.k.objectCount(), w.k.snapshot().objects);
  if (GetParam() != Teardown::SERVER_DEATH) {
    auto events = w.k.takeEvents(w.server.pid);
    ASSERT_EQ(events.size(), 1u);
    EXPECT_EQ(events[0].type, KernelEventType::BUSHEL_CLOSED);
    EXPECT_EQ(events[0].object, o.koid);
    EXPECT_EQ(events[0].peer, w.client.pid);
  }
  if (GetParam() != Teardown::CLIENT_DEATH) {
    auto events = w.k.takeEvents(w.client.pid);
    const bool serverDied = GetParam() == Teardown::SERVER_DEATH;
    ASSERT_EQ(events.size(), serverDied ? 2u : 1u);
    if (serverDied) {
      EXPECT_EQ(events[0].type, KernelEventType::SERVICE_GONE);
      EXPECT_EQ(events[0].object, o.koid);
    }
    EXPECT_EQ(events.back().type, KernelEventType::BUSHEL_CLOSED);
    EXPECT_EQ(events.back().object, o.koid);
    EXPECT_EQ(w.k.tryInspectCap(w.client.pid, copy).code(), Errc::INVALID_HANDLE);
    if (GetParam() != Teardown::CLIENT_BANK) {
      // The copy's slot is freed, so the CSpace keeps its chunk: used as before the open.
      EXPECT_EQ(usedOf(w.k, w.client.pid, w.client.bank), clientUsed);
    }
  }
  EXPECT_EQ(countOpenFds(), fdsBefore) << "the kernel closed both rings' descriptors";
}

INSTANTIATE_TEST_SUITE_P(AllPaths, BushelTeardownTest,
                         ::testing::Values(Teardown::LAST_CAP, Teardown::CLIENT_BANK,
                                           Teardown::CLIENT_DEATH, Teardown::SERVER_DEATH,
                                           Teardown::SERVER_CLOSE));

TEST(BushelTest, EventsForADeadProcessAreDroppedWithTheirDescriptors) {
  World w;
  const size_t fdsBefore = countOpenFds();
  (void)open(w, w.client.bank);  // BUSHEL_OPENED with two descriptors queued for the server
  ASSERT_TRUE(w.k.tryKillProcess(w.server.pid).ok());
  EXPECT_TRUE(w.k.takeEvents(w.server.pid).empty());
  EXPECT_EQ(w.k.snapshot().pendingEvents, 2u) << "the client's SERVICE_GONE and BUSHEL_CLOSED";
  (void)w.k.takeEvents(w.client.pid);
  EXPECT_EQ(countOpenFds(), fdsBefore);
}

// --- Client-paid server state (tryGrowBushelState) ---

TEST(BushelStateTest, GrowingChargesTheBankThatPaidForTheBushelAndDyingRefundsIt) {
  World w;
  Handle bank = handleOf(w.k.tryCreateBank(w.client.pid, w.client.bank, 500));
  const uint64_t before = usedOf(w.k, w.client.pid, bank);
  Opened o = open(w, bank);
  const uint64_t opened = usedOf(w.k, w.client.pid, bank);
  const uint64_t serverUsed = usedOf(w.k, w.server.pid, w.server.bank);
  auto grown = w.k.tryGrowBushelState(w.server.pid, o.svc, o.koid, 4);
  ASSERT_TRUE(grown.ok()) << errcName(grown.code());
  EXPECT_EQ(*grown, 4u);
  grown = w.k.tryGrowBushelState(w.server.pid, o.svc, o.koid, 3);
  ASSERT_TRUE(grown.ok());
  EXPECT_EQ(*grown, 7u) << "the bushel's state pages after the call";
  EXPECT_EQ(usedOf(w.k, w.client.pid, bank), opened + 7) << "the client's bank pays";
  EXPECT_EQ(usedOf(w.k, w.server.pid, w.server.bank), serverUsed) << "the server pays nothing";
  w.k.verifyInvariants();
  ASSERT_TRUE(w.k.tryDeleteCap(w.client.pid, o.bushel).ok());
  EXPECT_EQ(usedOf(w.k, w.client.pid, bank), before) << "state pages die with the bushel";
  w.k.verifyInvariants();
}

TEST(BushelStateTest, GrowthBeyondTheClientsQuotaIsRefusedAndChangesNothing) {
  World w;
  Handle bank = handleOf(w.k.tryCreateBank(w.client.pid, w.client.bank, 20));
  Opened o = open(w, bank);
  const uint64_t room = 20 - usedOf(w.k, w.client.pid, bank);
  ASSERT_GT(room, 0u);
  EXPECT_REFUSED_UNCHANGED(w.k, w.k.tryGrowBushelState(w.server.pid, o.svc, o.koid, room + 1),
                           Errc::QUOTA_EXCEEDED);
  auto grown = w.k.tryGrowBushelState(w.server.pid, o.svc, o.koid, room);
  ASSERT_TRUE(grown.ok());
  EXPECT_EQ(*grown, room);
  EXPECT_REFUSED_UNCHANGED(w.k, w.k.tryGrowBushelState(w.server.pid, o.svc, o.koid, 1),
                           Errc::QUOTA_EXCEEDED);
}

TEST(BushelStateTest, OnlyTheServiceHolderWithWriteMayGrowItsOwnBushelsByABoundedAmount) {
  World w;
  Opened o = open(w, w.client.bank);
  Handle readOnly = handleOf(w.k.tryCopyCap(w.server.pid, o.svc, Rights::READ));
  EXPECT_REFUSED_UNCHANGED(w.k, w.k.tryGrowBushelState(w.server.pid, readOnly, o.koid, 1),
                           Errc::PERMISSION_DENIED);
  EXPECT_REFUSED_UNCHANGED(w.k, w.k.tryGrowBushelState(w.server.pid, w.server.bank, o.koid, 1),
                           Errc::WRONG_TYPE);
  // The client holds no Service cap: its own bushel cap is not one.
  EXPECT_REFUSED_UNCHANGED(w.k, w.k.tryGrowBushelState(w.client.pid, o.bushel, o.koid, 1),
                           Errc::WRONG_TYPE);
  EXPECT_REFUSED_UNCHANGED(w.k, w.k.tryGrowBushelState(w.server.pid, o.svc, o.koid + 1000, 1),
                           Errc::NOT_FOUND);
  Handle other =
      handleOf(w.k.tryRegisterService(w.server.pid, w.serverRegistry, "other", w.server.bank));
  EXPECT_REFUSED_UNCHANGED(w.k, w.k.tryGrowBushelState(w.server.pid, other, o.koid, 1),
                           Errc::NOT_FOUND);  // a bushel of another service
  EXPECT_REFUSED_UNCHANGED(w.k, w.k.tryGrowBushelState(w.server.pid, o.svc, o.koid, 0),
                           Errc::INVALID_ARGUMENT);
  EXPECT_REFUSED_UNCHANGED(
      w.k, w.k.tryGrowBushelState(w.server.pid, o.svc, o.koid, Bushel::MAX_STATE_GROWTH + 1),
      Errc::INVALID_ARGUMENT);
}

// --- A server closes a client's bushel (tryCloseBushel) ---

TEST(BushelCloseTest, ClosingRefundsTheRingsAndTheStatePagesToTheBankThatPaid) {
  World w;
  Handle bank = handleOf(w.k.tryCreateBank(w.client.pid, w.client.bank, 500));
  const uint64_t before = usedOf(w.k, w.client.pid, bank);
  const uint64_t objects = w.k.objectCount();
  Opened o = open(w, bank);
  ASSERT_TRUE(w.k.tryGrowBushelState(w.server.pid, o.svc, o.koid, 9).ok());
  ASSERT_GT(usedOf(w.k, w.client.pid, bank), before + 9);
  (void)w.k.takeEvents(w.server.pid);
  const uint64_t serverUsed = usedOf(w.k, w.server.pid, w.server.bank);
  ASSERT_TRUE(w.k.tryCloseBushel(w.server.pid, o.svc, o.koid).ok());
  EXPECT_EQ(usedOf(w.k, w.client.pid, bank), before) << "rings, record and state pages";
  EXPECT_EQ(usedOf(w.k, w.server.pid, w.server.bank), serverUsed);
  EXPECT_EQ(w.k.objectCount(), objects + 1) << "only the service is left";
  w.k.verifyInvariants();
  // The service carries on: the same client may open a new bushel.
  Handle again = handleOf(w.k.tryOpenBushel(w.client.pid, w.clientRegistry, "echo", bank));
  EXPECT_TRUE(w.k.tryBushelFds(w.client.pid, again).ok());
}

TEST(BushelCloseTest, ASecondCloseIsNotFoundAndChangesNothing) {
  World w;
  Opened o = open(w, w.client.bank);
  ASSERT_TRUE(w.k.tryCloseBushel(w.server.pid, o.svc, o.koid).ok());
  (void)w.k.takeEvents(w.server.pid);
  (void)w.k.takeEvents(w.client.pid);
  EXPECT_REFUSED_UNCHANGED(w.k, w.k.tryCloseBushel(w.server.pid, o.svc, o.koid), Errc::NOT_FOUND);
  EXPECT_TRUE(w.k.takeEvents(w.server.pid).empty()) << "no second BUSHEL_CLOSED";
  EXPECT_TRUE(w.k.takeEvents(w.client.pid).empty());
}

TEST(BushelCloseTest, AClientsOwnCloseFirstMakesTheServersCloseNotFound) {
  World w;
  Opened o = open(w, w.client.bank);
  ASSERT_TRUE(w.k.tryDeleteCap(w.client.pid, o.bushel).ok());
  EXPECT_REFUSED_UNCHANGED(w.k, w.k.tryCloseBushel(w.server.pid, o.svc, o.koid), Errc::NOT_FOUND);
}

TEST(BushelCloseTest, OnlyTheServiceHolderWithWriteMayCloseItsOwnBushels) {
  World w;
  Opened o = open(w, w.client.bank);
  (void)w.k.takeEvents(w.server.pid);
  Handle readOnly = handleOf(w.k.tryCopyCap(w.server.pid, o.svc, Rights::READ));
  EXPECT_REFUSED_UNCHANGED(w.k, w.k.tryCloseBushel(w.server.pid, readOnly, o.koid),
                           Errc::PERMISSION_DENIED);
  EXPECT_REFUSED_UNCHANGED(w.k, w.k.tryCloseBushel(w.server.pid, w.server.bank, o.koid),
                           Errc::WRONG_TYPE);
  // The client holds no Service cap (its bushel cap is not one): it closes by deleting its cap.
  EXPECT_REFUSED_UNCHANGED(w.k, w.k.tryCloseBushel(w.client.pid, o.bushel, o.koid),
                           Errc::WRONG_TYPE);
  EXPECT_REFUSED_UNCHANGED(w.k, w.k.tryCloseBushel(w.server.pid, Handle{}, o.koid),
                           Errc::INVALID_HANDLE);
  EXPECT_REFUSED_UNCHANGED(w.k, w.k.tryCloseBushel(w.server.pid, o.svc, o.koid + 1000),
                           Errc::NOT_FOUND);
  EXPECT_REFUSED_UNCHANGED(w.k, w.k.tryCloseBushel(w.server.pid, o.svc, 0), Errc::NOT_FOUND);
  // A koid that names a live object of another kind is no bushel of the service either.
  EXPECT_REFUSED_UNCHANGED(
      w.k, w.k.tryCloseBushel(w.server.pid, o.svc, w.k.tryInspectCap(w.server.pid, o.svc)->koid),
      Errc::NOT_FOUND);
  Handle other =
      handleOf(w.k.tryRegisterService(w.server.pid, w.serverRegistry, "other", w.server.bank));
  EXPECT_REFUSED_UNCHANGED(w.k, w.k.tryCloseBushel(w.server.pid, other, o.koid),
                           Errc::NOT_FOUND);  // a bushel of another service
  EXPECT_REFUSED_UNCHANGED(w.k, w.k.tryCloseBushel(w.server.pid + 9, o.svc, o.koid),
                           Errc::NOT_FOUND);  // no such process
  EXPECT_TRUE(w.k.takeEvents(w.server.pid).empty());
  EXPECT_TRUE(w.k.takeEvents(w.client.pid).empty());
  EXPECT_TRUE(w.k.tryBushelFds(w.client.pid, o.bushel).ok()) << "the bushel is still open";
}

TEST(BushelCloseTest, AnIntroducedProcessCannotCloseTheServicesBushels) {
  World w;
  Opened o = open(w, w.client.bank);
  Proc third = attach(w.k, 1000);
  Handle intro = handleOf(w.k.tryIntroduce(w.client.pid, o.bushel, third.pid));
  EXPECT_REFUSED_UNCHANGED(w.k, w.k.tryCloseBushel(third.pid, intro, o.koid),
                           Errc::PERMISSION_DENIED);  // READ only: connect, nothing else
}

}  // namespace
}  // namespace agate::kernel::test
