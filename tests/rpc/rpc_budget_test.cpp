// RpcOptions::budget: what a connection allocates on its peer's behalf (message buffers, table
// entries) is charged to the peer through a StateBudget. The reader makes room before it reads
// each message and waits while the budget grows; a call that would be kept waiting and cannot be
// paid fails alone with QUOTA_EXCEEDED; anything else the budget cannot pay ends the connection
// with QUOTA_EXCEEDED; everything taken is given back when the connection goes.
#include <gtest/gtest.h>

#include <map>
#include <optional>
#include <vector>

#include "rpc_harness.h"
#include "rpc_raw_peer.h"

namespace agate::rpc::test {
namespace {

// A budget whose allowance grows in pages up to `limit` bytes. A grow() either settles on the
// loop's next turn or, `manual`, waits until the test releases it.
class TestBudget final : public StateBudget {
 public:
  static constexpr size_t PAGE = 4096;

  size_t available() const noexcept override { return allowance - used; }
  bool take(size_t bytes) noexcept override {
    if (bytes > available()) return false;
    used += bytes;
    return true;
  }
  void give(size_t bytes) noexcept override {
    EXPECT_LE(bytes, used) << "gave back more than was taken";
    used -= bytes;
  }
  Promise<void> grow(size_t bytes) override {
    ++grows;
    if (manual) {
      auto [promise, fulfiller] = newPromiseAndFulfiller<void>();
      pending.emplace_back(bytes, std::move(fulfiller));
      return std::move(promise);
    }
    return growLater(bytes);
  }
  // Settles the grows the test held back.
  void release() {
    std::vector<std::pair<size_t, Fulfiller<void>>> now = std::move(pending);
    pending.clear();
    for (auto& [bytes, fulfiller] : now) fulfiller.fulfill(settle(bytes));
  }

  size_t allowance = 0;
  size_t limit = size_t{1} << 30;
  size_t used = 0;
  int grows = 0;
  bool manual = false;
  std::vector<std::pair<size_t, Fulfiller<void>>> pending;

 private:
  Status settle(size_t bytes) {
    if (available() >= bytes) return {};
    const size_t want = (used + bytes + PAGE - 1) / PAGE * PAGE;
    if (want > limit) return Error(Errc::QUOTA_EXCEEDED, "the test budget's limit");
    allowance = want;
    return {};
  }
  Promise<void> growLater(size_t bytes) {
    (void)co_await EventLoop::current()->sleep(Duration::zero());
    co_return settle(bytes);
  }
};

// The budget is a base constructed before the fixture's victim and destroyed after it.
struct BudgetHolder {
  TestBudget budget;
};

class RpcBudgetTest : protected BudgetHolder, public RawPeerTest {
 protected:
  RpcBudgetTest() : RawPeerTest(&budget) {}

  // Answer 1: a call that never returns (pipelined calls on it are kept).
  void hangAnswerOne() {
    call(1, 0, HANG);
    ASSERT_TRUE(runUntil(loop_, [&] { return victim_->stats().callsReceived == 1; }));
  }
  // The budget grows no more, and the peer's objects take all it has but `left` bytes: what
  // they took, to give back.
  size_t spendAllBut(size_t left) {
    budget.limit = budget.allowance;
    const size_t objects = budget.available() - left;
    EXPECT_TRUE(budget.take(objects));
    return objects;
  }
  // The next `n` messages are Returns with exceptions: their codes by answer id.
  std::map<uint32_t, Errc> failedReturns(size_t n) {
    std::map<uint32_t, Errc> failed;
    while (failed.size() < n && !::testing::Test::HasFatalFailure()) {
      expectFromVictim([&](wire::Message::Reader m) {
        ASSERT_EQ(m.which(), wire::Message::RETURN);
        ASSERT_EQ(m.getReturn().which(), wire::Return::EXCEPTION);
        failed[m.getReturn().getAnswerId()] =
            static_cast<Errc>(m.getReturn().getException().getErrc());
      });
    }
    return failed;
  }

  // A 7 KB call pipelined on answer `on` (its copy is an 8 KiB buffer).
  void largePipelinedCall(uint32_t questionId, uint32_t on) {
    send(
        [&](wire::Message::Builder m) {
          wire::Call::Builder c = m.initCall();
          c.setQuestionId(questionId);
          wire::PromisedAnswer::Builder pa = c.getTarget().initPromisedAnswer();
          pa.setQuestionId(on);
          pa.initTransform(1).set(0, 0);
          c.setInterfaceId(NODE_INTERFACE_ID);
          c.setMethodId(RECORD);
          c.initParams().getContent().initAs<CapParam>().getCap().initAs<capnp::Data>(7000);
        },
        8 * 1024);
  }
};

TEST_F(RpcBudgetTest, WhatTheConnectionHoldsForThePeerIsChargedAndAllGivenBackWhenItGoes) {
  // Answer 1 exports a node; answer 2 is a call pipelined on it, kept (a copy) until 1 returns.
  auto round = [&] {
    call(1, 0, NEXT_LATER);
    pipelinedCall(2, 1, RECORD, {0});
    EXPECT_EQ(expectReturnOfExports(1), std::vector<uint32_t>{1});
    expectFromVictim([&](wire::Message::Reader m) {
      ASSERT_EQ(m.which(), wire::Message::RETURN);
      EXPECT_EQ(m.getReturn().getAnswerId(), 2u);
    });
    finish(1);
    finish(2);
    send([&](wire::Message::Builder m) {
      wire::Release::Builder r = m.initRelease();
      r.setId(1);
      r.setReferenceCount(1);
    });
    ASSERT_TRUE(runUntil(loop_, [&] { return victim_->answerCount() == 0; }));
  };
  round();
  EXPECT_EQ(log_.order.size(), 1u);
  EXPECT_EQ(victim_->stats().pipelinedCallsQueued, 1u);
  // The answers, the export and the copy were charged; the reader asked for room first.
  EXPECT_GT(budget.used, 128u);
  EXPECT_LE(budget.used, budget.allowance);
  EXPECT_GE(budget.grows, 1);
  EXPECT_GE(victim_->stats().budgetWaits, 1u);
  // Pooled: the same ids, the same export and the copy's buffer are reused: nothing more is
  // charged.
  const size_t charged = budget.used;
  round();
  EXPECT_EQ(log_.order.size(), 2u);
  EXPECT_EQ(victim_->stats().pipelinedCallsQueued, 2u);
  EXPECT_EQ(budget.used, charged);
  EXPECT_TRUE(victim_->isOpen());
  victim_.reset();
  EXPECT_EQ(budget.used, 0u) << "everything taken is given back when the connection goes";
}

TEST_F(RpcBudgetTest, TheReaderReadsNothingWhileTheBudgetGrows) {
  budget.manual = true;
  call(1, 0, ECHO, 7);
  ASSERT_TRUE(runUntil(loop_, [&] { return !budget.pending.empty(); }));
  (void)loop_.run(loop_.sleep(5ms));
  EXPECT_EQ(victim_->stats().messagesReceived, 1u);
  EXPECT_EQ(victim_->stats().callsReceived, 0u) << "the call waits for the budget";
  budget.release();
  expectFromVictim([&](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::RETURN);
    EXPECT_EQ(m.getReturn().getAnswerId(), 1u);
    EXPECT_EQ(m.getReturn().which(), wire::Return::RESULTS);
  });
  EXPECT_EQ(victim_->stats().callsReceived, 1u);
  EXPECT_EQ(victim_->stats().budgetWaits, 1u);
  EXPECT_TRUE(victim_->isOpen());
}

// Calls kept at an answer that never returns (HANG): those the budget cannot pay for fail alone
// with QUOTA_EXCEEDED, before the connection's own bound on kept calls is reached (32 KiB in the
// fixture: four copies); the connection carries on.
TEST_F(RpcBudgetTest, ACallKeptForLaterThatTheBudgetCannotPayFailsAloneWithQuotaExceeded) {
  budget.limit = 20 * 1024;  // room for one or two 8 KiB copies with the tables, not four
  call(1, 0, HANG);
  for (uint32_t q = 2; q <= 5; ++q) largePipelinedCall(q, 1);
  auto settled = [&] {
    const RpcStats& s = victim_->stats();
    return s.pipelinedCallsQueued + s.callsRefusedQuota == 4;
  };
  ASSERT_TRUE(runUntil(loop_, settled));
  // The first copies fit (at least one 8 KiB copy does), the rest are refused, each alone.
  const uint32_t refused = static_cast<uint32_t>(victim_->stats().callsRefusedQuota);
  EXPECT_GE(victim_->stats().pipelinedCallsQueued, 1u);
  EXPECT_GE(refused, 1u);
  EXPECT_EQ(victim_->stats().callsRefusedQueueFull, 0u) << "the budget ran out first";
  const std::map<uint32_t, Errc> failed = failedReturns(refused);
  if (::testing::Test::HasFatalFailure()) return;
  std::map<uint32_t, Errc> expected;
  for (uint32_t q = 6 - refused; q <= 5; ++q) expected[q] = Errc::QUOTA_EXCEEDED;
  EXPECT_EQ(failed, expected);
  EXPECT_TRUE(victim_->isOpen());
  // The connection carries on: a call that keeps nothing is answered.
  call(6, 0, ECHO, 1);
  expectFromVictim([&](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::RETURN);
    EXPECT_EQ(m.getReturn().getAnswerId(), 6u);
    EXPECT_EQ(m.getReturn().which(), wire::Return::RESULTS);
  });
}

// A peer that calls and never reads its replies: once its ring is full the replies wait in
// buffers charged to it, and when its budget cannot pay for more the connection ends with
// QUOTA_EXCEEDED, long before the connection's own bound (maxQueuedBytes, 4 MiB).
TEST_F(RpcBudgetTest, RepliesThePeerLeavesUnreadPastWhatItsBudgetPaysEndTheConnection) {
  budget.limit = 16 * 1024;
  uint32_t sent = 0;
  while (victim_->isOpen() && sent < 20000) {
    // A batch that fits the victim's ring; ids are reused once answered (no Finish needed).
    for (int i = 0; i < 100; ++i, ++sent) callWithoutPipelining(sent % 4 + 1, 0, ECHO, sent);
    ASSERT_TRUE(runUntil(
        loop_, [&] { return !victim_->isOpen() || victim_->stats().messagesReceived >= sent; }));
  }
  ASSERT_FALSE(victim_->isOpen());
  EXPECT_EQ(victim_->failure().code, Errc::QUOTA_EXCEEDED);
  EXPECT_GT(victim_->stats().spilledMessages, 0u);
  victim_.reset();
  EXPECT_EQ(budget.used, 0u);
}

// Replies the peer leaves unread past its ring are owed while the budget grows (a task of the
// connection's asks for them), and paid: the connection carries on.
TEST_F(RpcBudgetTest, OwedRepliesAreAskedForAndPaidWhileTheBudgetCanGrow) {
  uint32_t sent = 0;
  while (victim_->stats().spilledMessages < 200 && sent < 20000) {
    for (int i = 0; i < 100; ++i, ++sent) callWithoutPipelining(sent % 4 + 1, 0, ECHO, sent);
    ASSERT_TRUE(runUntil(loop_, [&] { return victim_->stats().messagesReceived >= sent; }));
  }
  ASSERT_GE(victim_->stats().spilledMessages, 200u);
  ASSERT_TRUE(runUntil(loop_, [&] { return budget.used >= budget.allowance / 2; }));
  EXPECT_TRUE(victim_->isOpen());
  // Every spilled reply is a buffer of its own, charged: 200 of at least 128 bytes.
  EXPECT_GE(budget.used, 200u * 128u);
  EXPECT_GT(budget.grows, 2);
  victim_.reset();
  EXPECT_EQ(budget.used, 0u);
}

// A budget the peer's objects have spent (the bank pays no more): calls that reuse what the
// connection already paid for go on, and the reader does not ask the budget again for each
// (with a client's quota, each ask is a kernel call).
TEST_F(RpcBudgetTest, ASpentBudgetIsNotAskedAgainForEachMessageThatChargesNothing) {
  budget.limit = 4096;
  callWithoutPipelining(1, 0, ECHO, 1);
  expectFromVictim([&](wire::Message::Reader m) { ASSERT_EQ(m.which(), wire::Message::RETURN); });
  ASSERT_EQ(budget.allowance, budget.limit);
  const size_t objects = budget.available() - 64;  // the objects take all but 64 bytes
  ASSERT_TRUE(budget.take(objects));
  const int before = budget.grows;
  const auto start = std::chrono::steady_clock::now();
  for (uint32_t i = 0; i < 50; ++i) {
    callWithoutPipelining(1, 0, ECHO, i);  // id 1 again: nothing new is allocated
    expectFromVictim([&](wire::Message::Reader m) {
      ASSERT_EQ(m.which(), wire::Message::RETURN);
      EXPECT_EQ(m.getReturn().which(), wire::Return::RESULTS);
    });
  }
  EXPECT_TRUE(victim_->isOpen());
  // Two asks when first refused, then two more at most per 50 ms (the first back-off) since.
  const auto elapsed = std::chrono::steady_clock::now() - start;
  EXPECT_LE(budget.grows - before, 2 + 2 * static_cast<int>(elapsed / 50ms));
  EXPECT_LT(budget.grows - before, 50);
  // Once something is given back, the reader asks again (and the bank pays now).
  budget.give(100);
  budget.limit = 1 << 20;
  callWithoutPipelining(1, 0, ECHO, 1);
  expectFromVictim([&](wire::Message::Reader m) { ASSERT_EQ(m.which(), wire::Message::RETURN); });
  EXPECT_GT(budget.grows - before, 2);
  EXPECT_GT(budget.allowance, 4096u);
}

// What is owed while the reader waits for the budget is paid before the reader reads on, so a
// call it must keep is not refused while the budget can still grow.
TEST_F(RpcBudgetTest, WhatIsOwedWhileTheReaderWaitsIsPaidBeforeItReadsOn) {
  hangAnswerOne();
  if (::testing::Test::HasFatalFailure()) return;
  budget.manual = true;
  largePipelinedCall(2, 1);  // to be kept (an 8 KiB copy): the reader waits for room first
  ASSERT_TRUE(runUntil(loop_, [&] { return !budget.pending.empty(); }));
  {
    // Meanwhile this side builds a request aside (the ring's frame is taken by another): a new
    // 32 KiB buffer, more than is left, so it is owed.
    RemoteCap cap = victim_->bootstrap();
    Request open = cap.newCall(NODE_INTERFACE_ID, ECHO, 16);
    open.initParams<Value>().setValue(1);
    Request aside = cap.newCall(NODE_INTERFACE_ID, ECHO, 32 * 1024);
    aside.initParams<Value>().setValue(2);
  }
  budget.manual = false;
  budget.release();
  auto settled = [&] {
    const RpcStats& s = victim_->stats();
    return s.pipelinedCallsQueued + s.callsRefusedQuota == 1 || !victim_->isOpen();
  };
  ASSERT_TRUE(runUntil(loop_, settled));
  EXPECT_TRUE(victim_->isOpen());
  EXPECT_EQ(victim_->stats().callsRefusedQuota, 0u);
  EXPECT_EQ(victim_->stats().pipelinedCallsQueued, 1u);
  EXPECT_LE(budget.used, budget.allowance);
}

// The reader's room covers a new answer as well as the copy: with just that much room, a call
// on a new answer id that must be kept is kept.
TEST_F(RpcBudgetTest, TheRoomMadeBeforeReadingCoversANewAnswerAndTheCopy) {
  hangAnswerOne();
  if (::testing::Test::HasFatalFailure()) return;
  budget.limit = budget.allowance;  // it grows no more
  budget.allowance = budget.limit = budget.used + 8192 + 4096;
  largePipelinedCall(2, 1);
  ASSERT_TRUE(runUntil(loop_, [&] {
    const RpcStats& s = victim_->stats();
    return s.pipelinedCallsQueued + s.callsRefusedQuota == 1 || !victim_->isOpen();
  }));
  EXPECT_EQ(victim_->stats().callsRefusedQuota, 0u);
  EXPECT_EQ(victim_->stats().pipelinedCallsQueued, 1u);
}

// A call needing a new answer entry the budget cannot pay for fails alone with QUOTA_EXCEEDED:
// its entry is kept until the caller finishes it (not charged), and the connection carries on.
TEST_F(RpcBudgetTest, ACallWhoseNewAnswerTheBudgetCannotPayFailsAlone) {
  hangAnswerOne();
  if (::testing::Test::HasFatalFailure()) return;
  const size_t objects = spendAllBut(100);
  largePipelinedCall(2, 1);  // a new answer id, and a copy
  call(3, 0, ECHO, 1);       // a new answer id
  const std::map<uint32_t, Errc> failed = failedReturns(2);
  if (::testing::Test::HasFatalFailure()) return;
  EXPECT_EQ(failed,
            (std::map<uint32_t, Errc>{{2, Errc::QUOTA_EXCEEDED}, {3, Errc::QUOTA_EXCEEDED}}));
  EXPECT_EQ(victim_->stats().callsRefusedQuota, 2u);
  EXPECT_TRUE(victim_->isOpen());
  // Once the objects give back, a call on a finished id is served, and the entries are paid.
  finish(2);
  finish(3);
  budget.give(objects);
  const size_t before = budget.used;
  call(3, 0, ECHO, 1);
  expectFromVictim([&](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::RETURN);
    EXPECT_EQ(m.getReturn().getAnswerId(), 3u);
    EXPECT_EQ(m.getReturn().which(), wire::Return::RESULTS);
  });
  EXPECT_GT(budget.used, before) << "the entries kept unpaid were paid once there was room";
}

// An entry left unpaid by a refused call is paid before it serves another: a peer cannot have
// its calls refused once per id, then reuse the ids for calls nobody paid for.
TEST_F(RpcBudgetTest, AnEntryLeftUnpaidIsPaidBeforeItServesAnotherCall) {
  hangAnswerOne();
  if (::testing::Test::HasFatalFailure()) return;
  spendAllBut(100);
  constexpr uint32_t N = 8;
  for (uint32_t q = 2; q < 2 + N; ++q) callWithoutPipelining(q, 0, ECHO, q);
  const std::map<uint32_t, Errc> failed = failedReturns(N);
  if (::testing::Test::HasFatalFailure()) return;
  for (const auto& [id, code] : failed) EXPECT_EQ(code, Errc::QUOTA_EXCEEDED) << id;
  // The same ids again (answered without Finish): refused again, nothing runs.
  for (uint32_t q = 2; q < 2 + N; ++q) call(q, 0, HANG);
  ASSERT_TRUE(runUntil(loop_, [&] { return victim_->stats().callsRefusedQuota == 2 * N; }));
  EXPECT_EQ(log_.hanging, 1);
  EXPECT_TRUE(victim_->isOpen());
}

// A refused call's capabilities are released as they came, not taken: a call carrying more
// than the few kept inline does not leave this side owing for their table (which would end
// the connection).
TEST_F(RpcBudgetTest, ACallRefusedForItsEntryReleasesItsCapabilitiesAndTheConnectionCarriesOn) {
  auto withCaps = [&](uint32_t questionId, uint16_t method, uint32_t firstId) {
    send([&](wire::Message::Builder m) {
      wire::Call::Builder c = m.initCall();
      c.setQuestionId(questionId);
      c.getTarget().setImportedCap(0);
      c.setInterfaceId(NODE_INTERFACE_ID);
      c.setMethodId(method);
      wire::Payload::Builder p = c.initParams();
      p.getContent().initAs<Value>().setValue(1);
      auto t = p.initCapTable(6);  // past the entries kept inline
      for (uint32_t i = 0; i < 6; ++i) t[i].setSenderHosted(firstId + i);
    });
  };
  withCaps(1, HANG, 1);
  ASSERT_TRUE(runUntil(loop_, [&] { return victim_->stats().callsReceived == 1; }));
  spendAllBut(100);
  const uint64_t releases = victim_->stats().releasesSent;
  withCaps(2, ECHO, 7);
  ASSERT_TRUE(runUntil(
      loop_, [&] { return victim_->stats().callsRefusedQuota == 1 || !victim_->isOpen(); }));
  (void)loop_.run(loop_.sleep(5ms));
  EXPECT_TRUE(victim_->isOpen()) << errcName(victim_->failure().code);
  EXPECT_EQ(victim_->stats().callsRefusedQuota, 1u);
  // The six references the refused call gave are given back (the first call keeps its own).
  EXPECT_TRUE(runUntil(loop_, [&] { return victim_->stats().releasesSent == releases + 6; }))
      << victim_->stats().releasesSent - releases;
}

// A budget that refused is asked again after a while even if nothing was given back here (the
// peer's bank may pay again): calls are served once it does.
TEST_F(RpcBudgetTest, ABudgetThatCanPayAgainIsAskedAgain) {
  hangAnswerOne();
  if (::testing::Test::HasFatalFailure()) return;
  spendAllBut(100);
  call(2, 0, ECHO, 1);
  expectFromVictim(
      [&](wire::Message::Reader m) { ASSERT_EQ(m.getReturn().which(), wire::Return::EXCEPTION); });
  finish(2);
  budget.limit = size_t{1} << 20;  // the bank pays again; nothing was given back here
  bool served = false;
  for (uint32_t i = 0; i < 200 && !served; ++i) {
    call(3, 0, ECHO, 1);
    expectFromVictim([&](wire::Message::Reader m) {
      ASSERT_EQ(m.which(), wire::Message::RETURN);
      served = m.getReturn().which() == wire::Return::RESULTS;
    });
    if (::testing::Test::HasFatalFailure()) return;
    if (!served) {
      finish(3);
      (void)loop_.run(loop_.sleep(5ms));
    }
  }
  EXPECT_TRUE(served);
}

}  // namespace
}  // namespace agate::rpc::test
