// A hostile peer speaking raw rpc.capnp messages at an RpcConnection: forged export ids, forged
// and reused question ids, double Finish and Return, over-Release, cap tables naming nothing,
// unknown message kinds and malformed frames all abort the connection with PROTOCOL_ERROR (and
// an Abort message to the peer), never UB. Per-call failures leave the connection and its
// tables as they were.
#include <gtest/gtest.h>

#include <array>
#include <functional>
#include <map>
#include <optional>
#include <span>
#include <string>

#include "rpc_harness.h"
#include "rpc_raw_peer.h"
#include "support/watchdog.h"

namespace agate::rpc::test {
namespace {

using agate::testing::Watchdog;

Promise<void> awaitCall(RemotePromise p) {
  Result<Response> r = co_await p;
  AGATE_CO_TRY(r);
  co_return {};
}

class RpcHostileTest : public RawPeerTest {
 protected:
  void expectNoFinishReturnToAPipelinedCallAborts(
      const std::function<void(wire::Return::Builder)>& fill);
};

// receiverAnswer (a capability pipelined on the attacker's own question, passed back): an
// IDENTIFY call whose param names answer `answerId` at `path`.
void identifyWithReceiverAnswer(wire::Message::Builder m, uint32_t questionId, uint32_t answerId,
                                unsigned pathLength) {
  wire::Call::Builder c = m.initCall();
  c.setQuestionId(questionId);
  c.getTarget().setImportedCap(0);
  c.setInterfaceId(NODE_INTERFACE_ID);
  c.setMethodId(IDENTIFY);
  wire::Payload::Builder params = c.initParams();
  writeCapPointer(params.getContent().initAs<CapParam>(), 0, 0);
  wire::PromisedAnswer::Builder pa = params.initCapTable(1)[0].initReceiverAnswer();
  pa.setQuestionId(answerId);
  auto t = pa.initTransform(pathLength);
  for (unsigned i = 0; i < pathLength; ++i) t.set(i, 0);
}

TEST_F(RpcHostileTest, AReceiverAnswerNamingNoLiveAnswerAborts) {
  send([](wire::Message::Builder m) { identifyWithReceiverAnswer(m, 2, 9, 1); });
  expectAborted();
  EXPECT_TRUE(log_.identified.empty());
}

TEST_F(RpcHostileTest, AReceiverAnswerNamingAFinishedAnswerAborts) {
  call(1, 0, NEXT);
  expectFromVictim([](wire::Message::Reader m) { ASSERT_EQ(m.which(), wire::Message::RETURN); });
  finish(1);
  send([](wire::Message::Builder m) { identifyWithReceiverAnswer(m, 2, 1, 1); });
  expectAborted();
  EXPECT_TRUE(log_.identified.empty());
}

TEST_F(RpcHostileTest, AReceiverAnswerNamingAnAnswerWithoutPipeliningAborts) {
  callWithoutPipelining(3, 0, HANG);  // a running answer, so that it is still live
  call(1, 0, HANG);
  ASSERT_TRUE(runUntil(loop_, [&] { return log_.hanging == 2; }));
  send([](wire::Message::Builder m) { identifyWithReceiverAnswer(m, 2, 3, 0); });
  expectAborted();
}

TEST_F(RpcHostileTest, AReceiverAnswerWithAPathLongerThanAllowedAborts) {
  call(1, 0, NEXT);
  expectFromVictim([](wire::Message::Reader m) { ASSERT_EQ(m.which(), wire::Message::RETURN); });
  send(
      [](wire::Message::Builder m) { identifyWithReceiverAnswer(m, 2, 1, MAX_PIPELINE_PATH + 1); });
  expectAborted();
  EXPECT_TRUE(log_.identified.empty());
}

TEST_F(RpcHostileTest, AReceiverAnswerOutsideACallsParamsAborts) {
  // A Return's cap table may not name the receiver's answers: the victim asks, the attacker
  // answers with one.
  RemoteCap attackerRoot = victim_->bootstrap();
  RemotePromise asked = attackerRoot.newCall(NODE_INTERFACE_ID, NEXT, 16).send();
  uint32_t questionId = 0;
  expectFromVictim([&](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::CALL);
    questionId = m.getCall().getQuestionId();
  });
  call(1, 0, NEXT);  // an answer of the victim for the descriptor to name
  expectFromVictim([](wire::Message::Reader m) { ASSERT_EQ(m.which(), wire::Message::RETURN); });
  send([&](wire::Message::Builder m) {
    wire::Return::Builder r = m.initReturn();
    r.setAnswerId(questionId);
    wire::Payload::Builder results = r.initResults();
    writeCapPointer(results.getContent().initAs<CapParam>(), 0, 0);
    results.initCapTable(1)[0].initReceiverAnswer().setQuestionId(1);
  });
  expectAborted();
  EXPECT_EQ(loop_
                .run([](RemotePromise p) -> Promise<void> {
                  Result<Response> r = co_await p;
                  AGATE_CO_TRY(r);
                  co_return {};
                }(std::move(asked)))
                .code(),
            Errc::PROTOCOL_ERROR);
}

// The well-formed case, raw: answer 1 (NEXT) returned, then IDENTIFY passes its child back.
TEST_F(RpcHostileTest, AWellFormedReceiverAnswerIsTheVictimsOwnObject) {
  call(1, 0, NEXT);
  expectFromVictim([](wire::Message::Reader m) { ASSERT_EQ(m.which(), wire::Message::RETURN); });
  send([](wire::Message::Builder m) { identifyWithReceiverAnswer(m, 2, 1, 1); });
  expectFromVictim([](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::RETURN);
    EXPECT_EQ(m.getReturn().getAnswerId(), 2u);
    EXPECT_EQ(m.getReturn().getResults().getContent().getAs<Value>().getValue(), 1u);
  });
  EXPECT_EQ(log_.identified.size(), 1u);
  EXPECT_TRUE(victim_->isOpen());
}

TEST_F(RpcHostileTest, WellFormedCallIsServed) {
  call(1, 0, ECHO);
  expectFromVictim([](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::RETURN);
    EXPECT_EQ(m.getReturn().getAnswerId(), 1u);
    EXPECT_EQ(m.getReturn().getResults().getContent().getAs<Value>().getValue(), 1u);
  });
  EXPECT_TRUE(victim_->isOpen());
}

TEST_F(RpcHostileTest, CallOnAForgedExportIdAborts) {
  call(1, 0, HANG);
  ASSERT_TRUE(runUntil(loop_, [&] { return log_.hanging == 1; }));
  call(2, 77, ECHO);
  expectAborted();
  EXPECT_EQ(log_.cancelled, 1);
}

TEST_F(RpcHostileTest, QuestionIdReusedBeforeFinishAborts) {
  call(1, 0, HANG);
  ASSERT_TRUE(runUntil(loop_, [&] { return log_.hanging == 1; }));
  call(1, 0, ECHO);
  expectAborted();
}

TEST_F(RpcHostileTest, QuestionIdReusedAfterReturnAndFinishIsServed) {
  // The callee frees an answer once it has sent the Return and seen Finish; the id is then free.
  call(1, 0, ECHO);
  expectFromVictim([](wire::Message::Reader m) { EXPECT_EQ(m.which(), wire::Message::RETURN); });
  finish(1);
  call(1, 0, ECHO);
  expectFromVictim([](wire::Message::Reader m) { EXPECT_EQ(m.which(), wire::Message::RETURN); });
  EXPECT_TRUE(victim_->isOpen());
}

TEST_F(RpcHostileTest, QuestionIdBeyondTheAnswerTableBoundAborts) {
  call(64, 0, ECHO);
  expectAborted();
}

TEST_F(RpcHostileTest, FinishForAnUnknownAnswerAborts) {
  finish(5);
  expectAborted();
}

TEST_F(RpcHostileTest, SecondFinishForOneAnswerAborts) {
  call(1, 0, HANG);
  ASSERT_TRUE(runUntil(loop_, [&] { return log_.hanging == 1; }));
  finish(1);
  ASSERT_TRUE(runUntil(loop_, [&] { return log_.cancelled == 1; }));
  // The answer was cancelled and freed: a second Finish names nothing.
  finish(1);
  expectAborted();
}

TEST_F(RpcHostileTest, ReturnForAQuestionNeverAskedAborts) {
  send([](wire::Message::Builder m) {
    wire::Return::Builder r = m.initReturn();
    r.setAnswerId(3);
    r.initResults();
  });
  expectAborted();
}

// A call held for reply space (RpcOptions::whenReplySpaceIsFull) has its question open but was
// never sent: a Return naming it is forged. The call sent before it is answered normally.
TEST_F(RpcHostileTest, ReturnForACallStillHeldForReplySpaceAborts) {
  RemoteCap cap = victim_->bootstrap();
  RemotePromise sent = cap.newCall(NODE_INTERFACE_ID, ECHO, 16)
                           .reserveReply(static_cast<uint32_t>(victim_->replyBytesAvailable()))
                           .send();
  RemotePromise held = cap.newCall(NODE_INTERFACE_ID, ECHO, 16).send();
  ASSERT_EQ(victim_->heldCallCount(), 1u);
  ASSERT_EQ(held.questionId(), 2u);
  expectFromVictim([](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::CALL);
    EXPECT_EQ(m.getCall().getQuestionId(), 1u);
  });
  send([](wire::Message::Builder m) {
    wire::Return::Builder r = m.initReturn();
    r.setAnswerId(2);
    r.initResults();
  });
  ASSERT_TRUE(runUntil(loop_, [&] { return !victim_->isOpen(); }));
  EXPECT_EQ(victim_->failure().code, Errc::PROTOCOL_ERROR);
  EXPECT_NE(std::string(victim_->failure().detail).find("not sent yet"), std::string::npos)
      << victim_->failure().detail;
  EXPECT_EQ(victim_->heldCallCount(), 0u);
  for (RemotePromise* p : {&sent, &held}) {
    Result<Response> r =
        loop_.run([](RemotePromise& q) -> Promise<Response> { co_return co_await q; }(*p));
    EXPECT_EQ(r.code(), Errc::PROTOCOL_ERROR);
  }
}

TEST_F(RpcHostileTest, ReleaseOfTheBootstrapOrOfUnheldReferencesAborts) {
  send([](wire::Message::Builder m) {
    wire::Release::Builder r = m.initRelease();
    r.setId(0);
    r.setReferenceCount(1);
  });
  expectAborted();
}

TEST_F(RpcHostileTest, ReleaseOfMoreReferencesThanGivenAborts) {
  call(1, 0, NEXT);  // exports one child with one reference
  uint32_t child = 0;
  expectFromVictim([&](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::RETURN);
    auto caps = m.getReturn().getResults().getCapTable();
    ASSERT_EQ(caps.size(), 1u);
    child = caps[0].getSenderHosted();
  });
  ASSERT_NE(child, 0u);
  send([&](wire::Message::Builder m) {
    wire::Release::Builder r = m.initRelease();
    r.setId(child);
    r.setReferenceCount(2);
  });
  expectAborted();
  EXPECT_EQ(log_.destroyed, 1) << "the dead connection dropped the child";
}

// Finish.releaseResultCaps, callee side: the references a Return's cap table gave are dropped
// by the callee once it has sent the Return and has that Finish, in either order.
TEST_F(RpcHostileTest, AFinishReleasingResultsAfterTheReturnDropsTheReferencesItGave) {
  const uint32_t exports = victim_->exportCount();
  call(1, 0, NEXT);  // exports one child with one reference
  ASSERT_EQ(expectReturnOfExports(1).size(), 1u);
  EXPECT_EQ(victim_->exportCount(), exports + 1);
  finishReleasing(1);
  ASSERT_TRUE(runUntil(loop_, [&] { return log_.destroyed == 1; }));
  EXPECT_EQ(victim_->exportCount(), exports);
  EXPECT_EQ(victim_->answerCount(), 0u);
  EXPECT_EQ(victim_->stats().resultRefsReleasedByFinish, 1u);
  EXPECT_TRUE(victim_->isOpen());
}

TEST_F(RpcHostileTest, AFinishReleasingResultsBeforeTheReturnDropsThemAsTheReturnGoes) {
  const uint32_t exports = victim_->exportCount();
  call(1, 0, NEXT_LATER);          // returns a child after a trip through the loop
  pipelinedCall(2, 1, ECHO, {0});  // queued on it: the Finish does not cancel it
  finishReleasing(1);
  ASSERT_EQ(expectReturnOfExports(1).size(), 1u);
  expectFromVictim([](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::RETURN);
    EXPECT_EQ(m.getReturn().getAnswerId(), 2u);
    EXPECT_EQ(m.getReturn().getResults().getContent().getAs<Value>().getValue(), 2u);  // 1 + 1
  });
  // Nothing references the child once the call queued on it has returned.
  ASSERT_TRUE(runUntil(loop_, [&] { return log_.destroyed == 1; }));
  EXPECT_EQ(victim_->exportCount(), exports);
  EXPECT_EQ(victim_->stats().resultRefsReleasedByFinish, 1u);
  EXPECT_EQ(log_.cancelled, 0);
  finish(2);
  ASSERT_TRUE(runUntil(loop_, [&] { return victim_->answerCount() == 0; }));
  EXPECT_TRUE(victim_->isOpen());
}

// E-order across a Return that goes out later (from the method's own task, not while the reader
// handles a message): a call the peer makes on the returned capability once it has read the
// Return reaches the victim after the calls it pipelined on the answer before, and must not be
// delivered ahead of them. The peer here writes that call just before the Return goes, which the
// victim cannot tell from just after: its reader finds it before the queued calls were settled.
TEST_F(RpcHostileTest, ADirectCallAfterALaterReturnGoesBehindTheCallsPipelinedBeforeIt) {
  call(1, 0, NEXT_LATER);            // the child is export 1 (asserted below)
  pipelinedCall(2, 1, RECORD, {0});  // records 1, queued until answer 1 returns
  log_.onLater = [&] { call(3, 1, RECORD, 2); };
  ASSERT_TRUE(runUntil(loop_, [&] { return log_.order.size() == 2; }));
  EXPECT_EQ(log_.order, (std::vector<uint64_t>{1, 2}));
  EXPECT_EQ(expectReturnOfExports(1), std::vector<uint32_t>{1});
  EXPECT_TRUE(victim_->isOpen());
}

// The copies of calls kept to be delivered later are bounded in bytes (maxQueuedCallBytes): a
// peer pipelining large calls on an answer that has not returned gets OUT_OF_MEMORY for those
// past the bound, each alone; the connection carries on and the calls kept are delivered, in
// order, once the answer returns.
TEST_F(RpcHostileTest, CallsKeptForLaterAreBoundedInBytesAndThosePastTheBoundFailAlone) {
  call(1, 0, NEXT_LATER);  // four copies fit the fixture's bound (8 KiB each: a 7 KB call's class)
  for (uint32_t q = 2; q < 8; ++q) {
    send(
        [&](wire::Message::Builder m) {
          wire::Call::Builder c = m.initCall();
          c.setQuestionId(q);
          wire::PromisedAnswer::Builder pa = c.getTarget().initPromisedAnswer();
          pa.setQuestionId(1);
          pa.initTransform(1).set(0, 0);
          c.setInterfaceId(NODE_INTERFACE_ID);
          c.setMethodId(RECORD);  // records 0: the Value read from a struct with no data
          c.initParams().getContent().initAs<CapParam>().getCap().initAs<capnp::Data>(7000);
        },
        8 * 1024);
  }
  std::map<uint32_t, Errc> failed;
  std::vector<uint32_t> returned;
  while (returned.size() + failed.size() < 7) {
    expectFromVictim([&](wire::Message::Reader m) {
      ASSERT_EQ(m.which(), wire::Message::RETURN);
      const wire::Return::Reader r = m.getReturn();
      if (r.which() == wire::Return::EXCEPTION) {
        failed[r.getAnswerId()] = static_cast<Errc>(r.getException().getErrc());
      } else {
        returned.push_back(r.getAnswerId());
      }
    });
    if (::testing::Test::HasFatalFailure()) return;
  }
  EXPECT_EQ(failed, (std::map<uint32_t, Errc>{{6, Errc::OUT_OF_MEMORY}, {7, Errc::OUT_OF_MEMORY}}));
  EXPECT_EQ(returned, (std::vector<uint32_t>{1, 2, 3, 4, 5}));
  EXPECT_EQ(log_.order, (std::vector<uint64_t>{0, 0, 0, 0}));
  EXPECT_EQ(victim_->stats().callsRefusedQueueFull, 2u);
  EXPECT_TRUE(victim_->isOpen());
}

TEST_F(RpcHostileTest, AFinishReleasingResultsTheCallerAlreadyReleasedAborts) {
  call(1, 0, NEXT);
  const std::vector<uint32_t> child = expectReturnOfExports(1);
  ASSERT_EQ(child.size(), 1u);
  send([&](wire::Message::Builder m) {  // the one reference, released as if taken
    wire::Release::Builder r = m.initRelease();
    r.setId(child[0]);
    r.setReferenceCount(1);
  });
  finishReleasing(1);
  expectAborted();
  EXPECT_NE(std::string(victim_->failure().detail).find("already released"), std::string::npos)
      << victim_->failure().detail;
  EXPECT_EQ(log_.destroyed, 1) << "the dead connection dropped the child";
}

// One export named twice in one Return is two references: releasing one of them with Release
// leaves too few for the Finish.
TEST_F(RpcHostileTest, AFinishReleasingAReturnThatNamedAnExportTwiceNeedsBothReferences) {
  call(1, 0, SELVES, 2);
  const std::vector<uint32_t> twins = expectReturnOfExports(1);
  ASSERT_EQ(twins.size(), 2u);
  ASSERT_EQ(twins[0], twins[1]);
  call(2, 0, SELVES, 2);  // two more references to the same export: Finish 1 may take any two
  ASSERT_EQ(expectReturnOfExports(2), twins);
  send([&](wire::Message::Builder m) {
    wire::Release::Builder r = m.initRelease();
    r.setId(twins[0]);
    r.setReferenceCount(1);
  });
  finishReleasing(1);  // takes two of the three left
  call(3, 0, ECHO);
  expectFromVictim([](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::RETURN);
    EXPECT_EQ(m.getReturn().getAnswerId(), 3u);
  });
  EXPECT_TRUE(victim_->isOpen());
  EXPECT_EQ(victim_->stats().resultRefsReleasedByFinish, 2u);
  finishReleasing(2);  // needs two: one is left
  expectAborted();
  EXPECT_NE(std::string(victim_->failure().detail).find("already released"), std::string::npos)
      << victim_->failure().detail;
}

// The same with a table long enough to be counted sorted rather than pairwise.
TEST_F(RpcHostileTest, AFinishReleasingALongReturnCountsEveryEntry) {
  constexpr uint32_t N = 100;
  call(1, 0, SELVES, N);
  const std::vector<uint32_t> first = expectReturnOfExports(1);
  ASSERT_EQ(first.size(), N);
  finishReleasing(1);  // all N taken back: the export goes
  call(2, 0, SELVES, N);
  const std::vector<uint32_t> second = expectReturnOfExports(2);
  ASSERT_EQ(second.size(), N);
  EXPECT_TRUE(victim_->isOpen());
  EXPECT_EQ(victim_->stats().resultRefsReleasedByFinish, N);
  send([&](wire::Message::Builder m) {
    wire::Release::Builder r = m.initRelease();
    r.setId(second[0]);
    r.setReferenceCount(1);
  });
  finishReleasing(2);  // needs N: N - 1 are left
  expectAborted();
  EXPECT_NE(std::string(victim_->failure().detail).find("already released"), std::string::npos)
      << victim_->failure().detail;
}

TEST_F(RpcHostileTest, CapTableNamingAMissingExportAborts) {
  send([](wire::Message::Builder m) {
    wire::Call::Builder c = m.initCall();
    c.setQuestionId(1);
    c.getTarget().setImportedCap(0);
    c.setInterfaceId(NODE_INTERFACE_ID);
    c.setMethodId(IDENTIFY);
    wire::Payload::Builder p = c.initParams();
    writeCapPointer(p.getContent().initAs<CapParam>(), 0, 0);
    p.initCapTable(1)[0].setReceiverHosted(9);
  });
  expectAborted();
}

// A Call to IDENTIFY whose cap table has `entries` entries, all none.
void identifyWithNullCaps(wire::Message::Builder m, uint32_t questionId, uint32_t entries) {
  wire::Call::Builder c = m.initCall();
  c.setQuestionId(questionId);
  c.getTarget().setImportedCap(0);
  c.setInterfaceId(NODE_INTERFACE_ID);
  c.setMethodId(IDENTIFY);
  c.initParams().initCapTable(entries);
}

TEST_F(RpcHostileTest, CapTableLongerThanTheConnectionsBoundRefusesTheCallNotTheConnection) {
  // A peer whose bound is larger: its call fails MESSAGE_TOO_LARGE, the method never runs, and
  // the connection carries on.
  const uint32_t bound = victim_->maxCapsPerMessage();
  ASSERT_EQ(bound, RpcOptions{}.maxCapsPerMessage);
  send(
      [&](wire::Message::Builder m) {
        identifyWithNullCaps(m, 1, bound + 1);
        m.getCall().setMethodId(RECORD);  // would log its value
        m.getCall().getParams().getContent().initAs<Value>().setValue(7);
      },
      16 * bound + 1024);
  expectFromVictim([](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::RETURN);
    EXPECT_EQ(m.getReturn().getAnswerId(), 1u);
    ASSERT_EQ(m.getReturn().which(), wire::Return::EXCEPTION);
    EXPECT_EQ(m.getReturn().getException().getErrc(),
              static_cast<uint16_t>(Errc::MESSAGE_TOO_LARGE));
    EXPECT_NE(
        std::string(m.getReturn().getException().getReason().cStr()).find("maxCapsPerMessage"),
        std::string::npos);
  });
  EXPECT_TRUE(victim_->isOpen());
  EXPECT_EQ(victim_->stats().messagesRefused, 1u);
  EXPECT_EQ(victim_->importCount(), 0u);
  EXPECT_TRUE(log_.order.empty()) << "the method never ran";
  // The same question id is free again once Finished, and the next call is served.
  finish(1);
  call(1, 0, ECHO);
  expectFromVictim([](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::RETURN);
    EXPECT_EQ(m.getReturn().getAnswerId(), 1u);
    EXPECT_EQ(m.getReturn().which(), wire::Return::RESULTS);
  });
}

TEST_F(RpcHostileTest, ARefusedCapTableGivesBackEveryReferenceItCarriedOneReleasePerId) {
  // bound + 3 entries: export 5 of the sender many times, 6 twice, promise 7 once, and a
  // third party's capability with vine 8: the victim takes none of them and releases each id with
  // all it counted.
  const uint32_t bound = victim_->maxCapsPerMessage();
  send(
      [&](wire::Message::Builder m) {
        identifyWithNullCaps(m, 1, bound + 3);
        auto t = m.getCall().getParams().getCapTable();
        for (uint32_t i = 0; i < bound - 1; ++i) t[i].setSenderHosted(5);
        t[bound - 1].setSenderHosted(6);
        t[bound].setSenderHosted(6);
        t[bound + 1].setSenderPromise(7);
        wire::ThirdPartyCapDescriptor::Builder tp = t[bound + 2].initThirdPartyHosted();
        tp.setVatId(42);
        tp.setProvisionId(1);
        tp.setVineId(8);
      },
      24 * bound + 1024);
  std::map<uint32_t, uint32_t> released;
  bool returned = false;
  while (!returned) {
    expectFromVictim([&](wire::Message::Reader m) {
      if (m.which() == wire::Message::RELEASE) {
        EXPECT_EQ(released.count(m.getRelease().getId()), 0u) << "one Release per id";
        released[m.getRelease().getId()] = m.getRelease().getReferenceCount();
        return;
      }
      ASSERT_EQ(m.which(), wire::Message::RETURN);
      EXPECT_EQ(m.getReturn().which(), wire::Return::EXCEPTION);
      returned = true;
    });
    if (::testing::Test::HasFatalFailure()) return;
  }
  EXPECT_EQ(released, (std::map<uint32_t, uint32_t>{{5, bound - 1}, {6, 2}, {7, 1}, {8, 1}}));
  EXPECT_EQ(victim_->importCount(), 0u);
  EXPECT_TRUE(victim_->isOpen());
}

TEST_F(RpcHostileTest, ARefusedCapTableNamingTheVictimsOwnExportAndAnswerLeavesNothingBehind) {
  // receiverHosted and receiverAnswer entries in a refused table pin no export and wait on no
  // answer: once both questions are finished, every answer of the victim is free.
  call(1, 0, HANG);
  ASSERT_TRUE(runUntil(loop_, [&] { return log_.hanging == 1; }));
  const uint32_t exports = victim_->exportCount();
  const uint32_t bound = victim_->maxCapsPerMessage();
  send(
      [&](wire::Message::Builder m) {
        identifyWithNullCaps(m, 2, bound + 1);
        auto t = m.getCall().getParams().getCapTable();
        t[0].setReceiverHosted(0);
        t[1].initReceiverAnswer().setQuestionId(1);
      },
      16 * bound + 1024);
  expectFromVictim([](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::RETURN);
    EXPECT_EQ(m.getReturn().getAnswerId(), 2u);
    EXPECT_EQ(m.getReturn().which(), wire::Return::EXCEPTION);
  });
  EXPECT_EQ(victim_->exportCount(), exports);
  finish(2);
  finish(1);  // cancels the hanging call
  ASSERT_TRUE(runUntil(loop_, [&] { return victim_->answerCount() == 0; }));
  EXPECT_EQ(log_.cancelled, 1);
  EXPECT_TRUE(victim_->isOpen());
  EXPECT_EQ(victim_->stats().releasesSent, 0u);
}

TEST_F(RpcHostileTest, ARefusedCapTableWithAHostileEntryStillAborts) {
  // Past the bound the entries are still checked: one naming an export id beyond the import
  // table's bound ends the connection, and nothing was released for the others.
  const uint32_t bound = victim_->maxCapsPerMessage();
  send(
      [&](wire::Message::Builder m) {
        identifyWithNullCaps(m, 1, bound + 1);
        auto t = m.getCall().getParams().getCapTable();
        t[0].setSenderHosted(5);
        t[bound].setSenderHosted(64);  // maxImports is 64
      },
      16 * bound + 1024);
  expectAborted();
  EXPECT_EQ(victim_->importCount(), 0u);
  EXPECT_EQ(victim_->stats().releasesSent, 0u);
}

TEST_F(RpcHostileTest, CapTableAtTheConnectionsBoundIsTaken) {
  // The bound itself is allowed: the call is served (IDENTIFY with no capability in its params
  // fails it, not the connection) and the connection carries on.
  const uint32_t bound = victim_->maxCapsPerMessage();
  send([&](wire::Message::Builder m) { identifyWithNullCaps(m, 1, bound); }, 16 * bound + 1024);
  expectFromVictim([](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::RETURN);
    EXPECT_EQ(m.getReturn().getAnswerId(), 1u);
  });
  EXPECT_TRUE(victim_->isOpen());
}

// Within one table an id is a promise in every entry or in none (as across messages): both
// forms abort before any import is made, in a short table (compared pairwise) and a long one
// (sorted); the same id repeated in one form is taken.
void mixedTable(wire::Message::Builder m, uint32_t entries) {
  identifyWithNullCaps(m, 1, entries);
  auto t = m.getCall().getParams().getCapTable();
  for (uint32_t i = 0; i + 1 < entries; ++i) t[i].setSenderHosted(5 + i % 50);
  t[entries - 1].setSenderPromise(5);
}

TEST_F(RpcHostileTest, OneIdNamedAsAPromiseAndAsAPlainCapabilityInAShortTableAborts) {
  send([](wire::Message::Builder m) { mixedTable(m, 2); });
  expectAborted();
  EXPECT_EQ(victim_->importCount(), 0u);
}

TEST_F(RpcHostileTest, OneIdNamedAsAPromiseAndAsAPlainCapabilityInALongTableAborts) {
  send([](wire::Message::Builder m) { mixedTable(m, 100); }, 16 * 100 + 1024);
  expectAborted();
  EXPECT_EQ(victim_->importCount(), 0u);
}

TEST_F(RpcHostileTest, OneIdRepeatedInOneFormInOneTableIsTaken) {
  send(
      [&](wire::Message::Builder m) {
        identifyWithNullCaps(m, 1, 100);
        auto t = m.getCall().getParams().getCapTable();
        for (uint32_t i = 0; i < 100; ++i) t[i].setSenderHosted(5 + i % 50);
      },
      16 * 100 + 1024);
  expectFromVictim([](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::RETURN);
    EXPECT_EQ(m.getReturn().getAnswerId(), 1u);
  });
  EXPECT_TRUE(victim_->isOpen());
}

TEST_F(RpcHostileTest, SenderHostedIdBeyondTheImportBoundAborts) {
  send([](wire::Message::Builder m) {
    wire::Call::Builder c = m.initCall();
    c.setQuestionId(1);
    c.getTarget().setImportedCap(0);
    c.initParams().initCapTable(1)[0].setSenderHosted(1000);
  });
  expectAborted();
}

TEST_F(RpcHostileTest, CapIndexOutsideTheTableIsACallErrorNotACrash) {
  // A capability pointer whose index has no cap-table entry: the server's capAt fails the call.
  send([](wire::Message::Builder m) {
    wire::Call::Builder c = m.initCall();
    c.setQuestionId(1);
    c.getTarget().setImportedCap(0);
    c.setInterfaceId(NODE_INTERFACE_ID);
    c.setMethodId(IDENTIFY);
    writeCapPointer(c.initParams().getContent().initAs<CapParam>(), 0, 12345);
  });
  expectFromVictim([](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::RETURN);
    ASSERT_EQ(m.getReturn().which(), wire::Return::EXCEPTION);
    EXPECT_EQ(m.getReturn().getException().getErrc(),
              static_cast<uint16_t>(Errc::INVALID_ARGUMENT));
  });
  EXPECT_TRUE(victim_->isOpen());
}

TEST_F(RpcHostileTest, PipelineOnAnAnswerThatDoesNotExistAborts) {
  pipelinedCall(2, 1, ECHO, {0});
  expectAborted();
}

TEST_F(RpcHostileTest, PipelinePathLongerThanAllowedAborts) {
  call(1, 0, NEXT_LATER);
  pipelinedCall(2, 1, ECHO, {0, 0, 0, 0, 0, 0, 0, 0, 0});
  expectAborted();
}

TEST_F(RpcHostileTest, PipelinePathThatLeadsNowhereFailsOnlyThatCall) {
  call(1, 0, NEXT);
  pipelinedCall(2, 1, ECHO, {1, 3});  // results field 1 is a UInt64, not a struct
  int returns = 0;
  for (int i = 0; i < 2; ++i) {
    expectFromVictim([&](wire::Message::Reader m) {
      ASSERT_EQ(m.which(), wire::Message::RETURN);
      ++returns;
      if (m.getReturn().getAnswerId() == 2) {
        ASSERT_EQ(m.getReturn().which(), wire::Return::EXCEPTION);
        EXPECT_EQ(m.getReturn().getException().getErrc(), static_cast<uint16_t>(Errc::FAILED));
      }
    });
  }
  EXPECT_EQ(returns, 2);
  EXPECT_TRUE(victim_->isOpen());
  EXPECT_EQ(victim_->exportCount(), 2u) << "the child exported by call 1 is untouched";
}

// --- Calls without promise pipelining (Call.noPromisePipelining, Return.noFinishNeeded) ---

TEST_F(RpcHostileTest, ACallWithoutPipeliningIsAnsweredWithNoFinishNeededAndFreedAtOnce) {
  callWithoutPipelining(1, 0, ECHO, 4);
  expectFromVictim([](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::RETURN);
    EXPECT_EQ(m.getReturn().getAnswerId(), 1u);
    EXPECT_TRUE(m.getReturn().getNoFinishNeeded());
    EXPECT_EQ(m.getReturn().getResults().getContent().getAs<Value>().getValue(), 4u);
  });
  EXPECT_EQ(victim_->answerCount(), 0u) << "freed with its Return, no Finish awaited";
  // The id is free: the caller may reuse it at once, with no Finish.
  call(1, 0, ECHO);
  expectFromVictim([](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::RETURN);
    EXPECT_FALSE(m.getReturn().getNoFinishNeeded()) << "a call sent with pipelining";
  });
  EXPECT_EQ(victim_->answerCount(), 1u) << "waits for its Finish";
  EXPECT_TRUE(victim_->isOpen());
}

TEST_F(RpcHostileTest, ACallWithoutPipeliningWhoseResultsHoldACapabilityStillNeedsFinish) {
  callWithoutPipelining(1, 0, NEXT);
  expectFromVictim([](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::RETURN);
    EXPECT_FALSE(m.getReturn().getNoFinishNeeded()) << "the results carry a capability";
    EXPECT_EQ(m.getReturn().getResults().getCapTable().size(), 1u);
  });
  EXPECT_EQ(victim_->answerCount(), 1u);
  finish(1);
  ASSERT_TRUE(runUntil(loop_, [&] { return victim_->answerCount() == 0; }));
  EXPECT_EQ(victim_->stats().finishesIgnored, 0u);
  EXPECT_TRUE(victim_->isOpen());
}

TEST_F(RpcHostileTest, OneFinishCrossingAReturnWithNoFinishNeededIsIgnoredASecondAborts) {
  callWithoutPipelining(3, 0, FAIL);  // an exception carries no capability: noFinishNeeded too
  expectFromVictim([](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::RETURN);
    EXPECT_EQ(m.getReturn().which(), wire::Return::EXCEPTION);
    EXPECT_TRUE(m.getReturn().getNoFinishNeeded());
  });
  finish(3);  // the caller dropped its promise before it read the Return
  ASSERT_TRUE(runUntil(loop_, [&] { return victim_->stats().finishesIgnored == 1; }));
  EXPECT_TRUE(victim_->isOpen());
  EXPECT_EQ(victim_->answerCount(), 0u);
  finish(3);  // but only one may cross
  expectAborted();
}

TEST_F(RpcHostileTest, AFinishAfterTheIdWasReusedNamesTheNewCall) {
  callWithoutPipelining(1, 0, FAIL);
  expectFromVictim([](wire::Message::Reader m) { EXPECT_TRUE(m.getReturn().getNoFinishNeeded()); });
  call(1, 0, HANG);  // the id again: a Finish that crossed would have come before this
  ASSERT_TRUE(runUntil(loop_, [&] { return log_.hanging == 1; }));
  finish(1);  // cancels the new call, is not swallowed as a crossing one
  ASSERT_TRUE(runUntil(loop_, [&] { return log_.cancelled == 1; }));
  EXPECT_EQ(victim_->stats().finishesIgnored, 0u);
  ASSERT_TRUE(runUntil(loop_, [&] { return victim_->answerCount() == 0; }));
  EXPECT_TRUE(victim_->isOpen());
}

TEST_F(RpcHostileTest, CallPipelinedOnAnAnswerSentWithoutPipeliningAborts) {
  callWithoutPipelining(1, 0, HANG);
  ASSERT_TRUE(runUntil(loop_, [&] { return log_.hanging == 1; }));
  pipelinedCall(2, 1, ECHO, {0});
  expectAborted();
  EXPECT_EQ(log_.cancelled, 1);
}

// The victim is the caller here: its calls go to the attacker's bootstrap (import 0), and the
// attacker answers them with forged Returns.
TEST_F(RpcHostileTest, CallsCarryNoPromisePipeliningOnTheWireAsTheCallerAskedIt) {
  RemoteCap peer = victim_->bootstrap();
  RemotePromise plain = peer.newCall(NODE_INTERFACE_ID, ECHO, 0).send();
  RemotePromise bare = peer.newCall(NODE_INTERFACE_ID, ECHO, 0).noPipelining().send();
  Request withParams = peer.newCall(NODE_INTERFACE_ID, ECHO, 16);
  withParams.initParams<Value>().setValue(9);
  RemotePromise built = withParams.noPipelining().send();
  for (bool expected : {false, true, true}) {
    expectFromVictim([&](wire::Message::Reader m) {
      ASSERT_EQ(m.which(), wire::Message::CALL);
      EXPECT_EQ(m.getCall().getNoPromisePipelining(), expected);
    });
  }
  EXPECT_TRUE(plain.canPipeline());
  EXPECT_FALSE(bare.canPipeline());
  EXPECT_FALSE(built.canPipeline());
}

// A call sent with pipelining, answered by the attacker with a Return that claims
// noFinishNeeded (filled in by `fill`): the victim aborts and sends no Finish.
void RpcHostileTest::expectNoFinishReturnToAPipelinedCallAborts(
    const std::function<void(wire::Return::Builder)>& fill) {
  RemoteCap peer = victim_->bootstrap();
  RemotePromise p = peer.newCall(NODE_INTERFACE_ID, ECHO, 0).send();
  expectFromVictim([](wire::Message::Reader m) { ASSERT_EQ(m.which(), wire::Message::CALL); });
  send([&](wire::Message::Builder m) {
    wire::Return::Builder r = m.initReturn();
    r.setAnswerId(1);
    r.setNoFinishNeeded(true);
    fill(r);
  });
  EXPECT_EQ(loop_.run(awaitCall(std::move(p))).code(), Errc::PROTOCOL_ERROR);
  expectAborted();
  EXPECT_EQ(victim_->stats().finishesSent, 0u);
}

TEST_F(RpcHostileTest, ReturnWithNoFinishNeededForACallSentWithPipeliningAborts) {
  // The shape the word-level decoder reads.
  expectNoFinishReturnToAPipelinedCallAborts([](wire::Return::Builder r) { r.initResults(); });
}

TEST_F(RpcHostileTest, ReturnWithNoFinishNeededAndAnExceptionForACallWithPipeliningAborts) {
  // Read by Cap'n Proto's readers.
  expectNoFinishReturnToAPipelinedCallAborts(
      [](wire::Return::Builder r) { r.initException().setReason("x"); });
}

TEST_F(RpcHostileTest, ReturnWithNoFinishNeededCarryingACapabilityAbortsAndImportsNothing) {
  RemoteCap peer = victim_->bootstrap();
  RemotePromise p = peer.newCall(NODE_INTERFACE_ID, ECHO, 0).noPipelining().send();
  expectFromVictim([](wire::Message::Reader m) { ASSERT_EQ(m.which(), wire::Message::CALL); });
  const uint32_t imports = victim_->importCount();  // the attacker's bootstrap
  send([](wire::Message::Builder m) {
    wire::Return::Builder r = m.initReturn();
    r.setAnswerId(1);
    r.setNoFinishNeeded(true);
    wire::Payload::Builder results = r.initResults();
    writeCapPointer(results.getContent().initAs<CapParam>(), 0, 0);
    results.initCapTable(1)[0].setSenderHosted(5);
  });
  EXPECT_EQ(loop_.run(awaitCall(std::move(p))).code(), Errc::PROTOCOL_ERROR);
  expectAborted();
  EXPECT_EQ(victim_->importCount(), imports) << "nothing of the refused Return was taken";
}

TEST_F(RpcHostileTest, ReturnWithNoFinishNeededCarryingMoreCapabilitiesThanTheBoundAborts) {
  // Past the bound the Return would be refused, not taken; with noFinishNeeded it is still a
  // Return that carries capabilities, which the callee may not send so.
  RemoteCap peer = victim_->bootstrap();
  RemotePromise p = peer.newCall(NODE_INTERFACE_ID, ECHO, 0).noPipelining().send();
  expectFromVictim([](wire::Message::Reader m) { ASSERT_EQ(m.which(), wire::Message::CALL); });
  const uint32_t bound = victim_->maxCapsPerMessage();
  send(
      [&](wire::Message::Builder m) {
        wire::Return::Builder r = m.initReturn();
        r.setAnswerId(1);
        r.setNoFinishNeeded(true);
        auto t = r.initResults().initCapTable(bound + 1);
        for (uint32_t i = 0; i <= bound; ++i) t[i].setSenderHosted(5);
      },
      16 * bound + 1024);
  EXPECT_EQ(loop_.run(awaitCall(std::move(p))).code(), Errc::PROTOCOL_ERROR);
  expectAborted();
  EXPECT_EQ(victim_->stats().messagesRefused, 0u);
  EXPECT_EQ(victim_->stats().releasesSent, 0u);
}

TEST_F(RpcHostileTest, ReturnCarryingMoreCapabilitiesThanTheBoundFailsTheCallAndReleasesThem) {
  RemoteCap peer = victim_->bootstrap();
  RemotePromise p = peer.newCall(NODE_INTERFACE_ID, ECHO, 0).send();
  RemoteCap piped = p.pipeline({0});  // would name a capability of the refused results
  expectFromVictim([](wire::Message::Reader m) { ASSERT_EQ(m.which(), wire::Message::CALL); });
  const uint32_t imports = victim_->importCount();
  const uint32_t bound = victim_->maxCapsPerMessage();
  send(
      [&](wire::Message::Builder m) {
        wire::Return::Builder r = m.initReturn();
        r.setAnswerId(1);
        auto t = r.initResults().initCapTable(bound + 1);
        for (uint32_t i = 0; i <= bound; ++i) t[i].setSenderHosted(5);
      },
      16 * bound + 1024);
  Status got = loop_.run(awaitCall(std::move(p)));
  EXPECT_EQ(got.code(), Errc::MESSAGE_TOO_LARGE);
  EXPECT_TRUE(victim_->isOpen());
  EXPECT_EQ(victim_->importCount(), imports);
  // What was pipelined on it fails here: the peer would serve it from the refused results.
  EXPECT_EQ(loop_.run(awaitCall(piped.newCall(NODE_INTERFACE_ID, ECHO, 0).send())).code(),
            Errc::MESSAGE_TOO_LARGE);
  {
    Request passing = peer.newCall(NODE_INTERFACE_ID, IDENTIFY, 64);
    EXPECT_EQ(passing.addCap(piped).code(), Errc::MESSAGE_TOO_LARGE);
  }
  piped = RemoteCap();
  expectFromVictim([&](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::RELEASE);
    EXPECT_EQ(m.getRelease().getId(), 5u);
    EXPECT_EQ(m.getRelease().getReferenceCount(), bound + 1);
  });
  expectFromVictim([](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::FINISH);  // the dropped promise
    EXPECT_EQ(m.getFinish().getQuestionId(), 1u);
  });
}

// Finish.releaseResultCaps, caller side: a promise dropped before its Return sends its Finish
// at once, with releaseResultCaps; the Return that follows gives the victim no reference (no
// Release for them, no handoff taken), and a Resolve for a promise in it, crossing the Finish,
// is taken as for a promise released.
class RpcHostileReleasedReturnTest : public RpcHostileTest {
 protected:
  // Question 1, dropped before its Return: its Call and its Finish come out.
  void dropQuestionOne() {
    {
      RemoteCap peer = victim_->bootstrap();
      RemotePromise dropped = peer.newCall(NODE_INTERFACE_ID, ECHO, 0).send();
    }
    expectFromVictim([](wire::Message::Reader m) { ASSERT_EQ(m.which(), wire::Message::CALL); });
    expectFromVictim([](wire::Message::Reader m) {
      ASSERT_EQ(m.which(), wire::Message::FINISH);
      EXPECT_EQ(m.getFinish().getQuestionId(), 1u);
      EXPECT_TRUE(m.getFinish().getReleaseResultCaps());
    });
    imports_ = victim_->importCount();
  }
  void returnToQuestionOne(
      const std::function<void(capnp::List<wire::CapDescriptor>::Builder)>& fill, uint32_t caps) {
    send(
        [&](wire::Message::Builder m) {
          wire::Return::Builder r = m.initReturn();
          r.setAnswerId(1);
          fill(r.initResults().initCapTable(caps));
        },
        16 * caps + 1024);
  }
  // The victim read everything sent so far, sent nothing for it and is still open: a call after
  // it is answered, and that Return is the next message.
  void expectNothingSentAndOpen() {
    call(9, 0, ECHO);
    expectFromVictim([](wire::Message::Reader m) {
      ASSERT_EQ(m.which(), wire::Message::RETURN) << "sent " << static_cast<int>(m.which());
      EXPECT_EQ(m.getReturn().getAnswerId(), 9u);
    });
    EXPECT_TRUE(victim_->isOpen());
    EXPECT_EQ(victim_->importCount(), imports_);
    EXPECT_EQ(victim_->questionCount(), 0u);
    EXPECT_EQ(victim_->stats().releasesSent, 0u);
  }
  uint32_t imports_ = 0;
};

TEST_F(RpcHostileReleasedReturnTest, ItsCapabilitiesAreNotTakenAndACrossingResolveIsAccepted) {
  dropQuestionOne();
  returnToQuestionOne(
      [](capnp::List<wire::CapDescriptor>::Builder t) {
        t[0].setSenderHosted(5);
        t[1].setSenderPromise(6);
        t[2].setSenderHosted(5);
      },
      3);
  send([](wire::Message::Builder m) {  // sent before the attacker read the Finish
    wire::Resolve::Builder r = m.initResolve();
    r.setPromiseId(6);
    r.initCap().setSenderHosted(7);
  });
  expectFromVictim([](wire::Message::Reader m) {  // the resolution's reference, given back
    ASSERT_EQ(m.which(), wire::Message::RELEASE);
    EXPECT_EQ(m.getRelease().getId(), 7u);
    EXPECT_EQ(m.getRelease().getReferenceCount(), 1u);
  });
  EXPECT_EQ(victim_->stats().releasesSent, 1u);
  EXPECT_TRUE(victim_->isOpen());
  EXPECT_EQ(victim_->importCount(), imports_);
}

TEST_F(RpcHostileReleasedReturnTest, AHandoffInItIsNotTakenNorItsVineReleased) {
  dropQuestionOne();  // the victim has no VatNetwork: a handoff it took would fail and release
  returnToQuestionOne(
      [](capnp::List<wire::CapDescriptor>::Builder t) {
        wire::ThirdPartyCapDescriptor::Builder h = t[0].initThirdPartyHosted();
        h.setVatId(7);
        h.setProvisionId(1);
        h.setVineId(5);
      },
      1);
  expectNothingSentAndOpen();
}

TEST_F(RpcHostileReleasedReturnTest, ATableLongerThanTheBoundIsRefusedWithoutAnyRelease) {
  dropQuestionOne();
  const uint32_t bound = victim_->maxCapsPerMessage();
  returnToQuestionOne(
      [&](capnp::List<wire::CapDescriptor>::Builder t) {
        for (uint32_t i = 0; i < bound; ++i) t[i].setSenderHosted(5);
        t[bound].setSenderPromise(6);
      },
      bound + 1);
  send([](wire::Message::Builder m) {  // a promise of a refused table may be resolved too
    wire::Resolve::Builder r = m.initResolve();
    r.setPromiseId(6);
    wire::Exception::Builder e = r.initException();
    e.setReason("gone");
  });
  expectNothingSentAndOpen();
  EXPECT_EQ(victim_->stats().messagesRefused, 1u);
}

// The Finish of a promise dropped before its Return is the message that finds the connection
// gone (the peer's reader detached): the question is freed all the same, with no Return to come.
TEST_F(RpcHostileTest, AQuestionWhoseFinishFindsTheConnectionGoneIsFreed) {
  {
    RemoteCap peer = victim_->bootstrap();
    RemotePromise dropped = peer.newCall(NODE_INTERFACE_ID, ECHO, 0).send();
    expectFromVictim([](wire::Message::Reader m) { ASSERT_EQ(m.which(), wire::Message::CALL); });
    attackerRx_.reset();  // nothing reads what the victim sends from here on
    EXPECT_EQ(victim_->questionCount(), 1u);
  }  // the promise goes: its Finish fails, and with it the connection
  EXPECT_FALSE(victim_->isOpen());
  EXPECT_EQ(victim_->failure().code, Errc::DISCONNECTED);
  EXPECT_EQ(victim_->questionCount(), 0u);
}

TEST_F(RpcHostileTest, APlainReturnForACallWithoutPipeliningIsFinishedAsUsual) {
  // The callee may ignore the caller's promise (an older one, or results with capabilities):
  // then the question ends as before, with Finish.
  RemoteCap peer = victim_->bootstrap();
  {
    RemotePromise p = peer.newCall(NODE_INTERFACE_ID, ECHO, 0).noPipelining().send();
    expectFromVictim([](wire::Message::Reader m) { ASSERT_EQ(m.which(), wire::Message::CALL); });
    send([](wire::Message::Builder m) {
      wire::Return::Builder r = m.initReturn();
      r.setAnswerId(1);
      r.initResults();
    });
    EXPECT_TRUE(loop_.run(awaitCall(std::move(p))).ok());
  }
  expectFromVictim([](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::FINISH);
    EXPECT_EQ(m.getFinish().getQuestionId(), 1u);
  });
  EXPECT_EQ(victim_->questionCount(), 0u);
  EXPECT_TRUE(victim_->isOpen());
}

TEST_F(RpcHostileTest, ResolveForAnIdNeverImportedAborts) {
  send([](wire::Message::Builder m) { m.initResolve().setPromiseId(1); });
  expectAborted();
}

TEST_F(RpcHostileTest, LoopbackDisembargoAborts) {
  send([](wire::Message::Builder m) {
    wire::Disembargo::Builder d = m.initDisembargo();
    d.getTarget().setImportedCap(0);
    d.initContext().setSenderLoopback(1);
  });
  expectAborted();
}

TEST_F(RpcHostileTest, DisembargoOfAnExportThatIsNoPromiseAborts) {
  send([](wire::Message::Builder m) {
    wire::Disembargo::Builder d = m.initDisembargo();
    d.getTarget().setImportedCap(0);
    d.initContext().setAccept();
  });
  expectAborted();
}

TEST_F(RpcHostileTest, DisembargoOfAProvideWithoutAVatNetworkAborts) {
  send([](wire::Message::Builder m) {
    wire::Disembargo::Builder d = m.initDisembargo();
    d.getTarget().setImportedCap(0);
    d.initContext().setProvide(1);
  });
  expectAborted();
}

// Promise capabilities: the victim holds what a HANG call's params gave it (senderPromise for
// ids in `promises`, senderHosted for `plain`) for as long as the call runs.
class RpcHostilePromiseTest : public RpcHostileTest {
 protected:
  void hangHolding(uint32_t questionId, std::initializer_list<uint32_t> promises,
                   std::initializer_list<uint32_t> plain = {}) {
    send([&](wire::Message::Builder m) {
      wire::Call::Builder c = m.initCall();
      c.setQuestionId(questionId);
      c.getTarget().setImportedCap(0);
      c.setInterfaceId(NODE_INTERFACE_ID);
      c.setMethodId(HANG);
      wire::Payload::Builder params = c.initParams();
      params.getContent().initAs<Value>().setValue(1);
      auto caps = params.initCapTable(static_cast<unsigned>(promises.size() + plain.size()));
      unsigned i = 0;
      for (uint32_t id : promises) caps[i++].setSenderPromise(id);
      for (uint32_t id : plain) caps[i++].setSenderHosted(id);
    });
    ASSERT_TRUE(runUntil(loop_, [&] { return log_.hanging == hangingBefore_ + 1; }));
    ++hangingBefore_;
  }
  void resolveTo(uint32_t promiseId, const std::function<void(wire::CapDescriptor::Builder)>& cap) {
    send([&](wire::Message::Builder m) {
      wire::Resolve::Builder r = m.initResolve();
      r.setPromiseId(promiseId);
      cap(r.initCap());
    });
  }
  void breakPromise(uint32_t promiseId) {
    send([&](wire::Message::Builder m) {
      wire::Resolve::Builder r = m.initResolve();
      r.setPromiseId(promiseId);
      wire::Exception::Builder e = r.initException();
      e.setReason("broken");
      e.setErrc(static_cast<uint16_t>(Errc::PERMISSION_DENIED));
    });
  }
  // The victim read everything sent so far and is still open: a call after it is served.
  void expectStillOpen(uint32_t questionId) {
    call(questionId, 0, ECHO);
    expectFromVictim([&](wire::Message::Reader m) {
      ASSERT_EQ(m.which(), wire::Message::RETURN);
      EXPECT_EQ(m.getReturn().getAnswerId(), questionId);
    });
    EXPECT_TRUE(victim_->isOpen());
  }
  int hangingBefore_ = 0;
};

// Resolve {thirdPartyHosted}: the victim has no VatNetwork, so a well-formed one breaks the
// promise (UNSUPPORTED), gives the vine back and lifts its side of the embargo; malformed ones
// abort.
void setThirdParty(wire::CapDescriptor::Builder c, uint64_t vat, uint32_t vine) {
  wire::ThirdPartyCapDescriptor::Builder t = c.initThirdPartyHosted();
  t.setVatId(vat);
  t.setProvisionId(1);
  t.setVineId(vine);
}

TEST_F(RpcHostilePromiseTest, ResolveToAThirdPartyWithoutANetworkBreaksThePromise) {
  hangHolding(1, {3});
  resolveTo(3, [](wire::CapDescriptor::Builder c) { setThirdParty(c, 7, 5); });
  expectFromVictim([](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::RELEASE);
    EXPECT_EQ(m.getRelease().getId(), 5u);
  });
  expectFromVictim([](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::DISEMBARGO);
    EXPECT_EQ(m.getDisembargo().getTarget().getImportedCap(), 3u);
    EXPECT_EQ(m.getDisembargo().getContext().which(), wire::Disembargo::Context::ACCEPT);
  });
  expectStillOpen(2);
  EXPECT_EQ(victim_->stats().disembargoesSent, 1u);
}

TEST_F(RpcHostilePromiseTest, AVineMayReuseAnIdOnceHeldAsAPromise) {
  hangHolding(1, {4});
  finish(1);  // the victim drops promise 4 (its promise mark stays for a crossing Resolve)
  expectFromVictim([](wire::Message::Reader m) { EXPECT_EQ(m.which(), wire::Message::RETURN); });
  expectFromVictim([](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::RELEASE);
    EXPECT_EQ(m.getRelease().getId(), 4u);
  });
  hangingBefore_ = log_.hanging;  // the first call was cancelled
  hangHolding(2, {3});
  resolveTo(3, [](wire::CapDescriptor::Builder c) { setThirdParty(c, 7, 4); });
  expectFromVictim([](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::RELEASE);
    EXPECT_EQ(m.getRelease().getId(), 4u);
  });
  expectFromVictim(
      [](wire::Message::Reader m) { EXPECT_EQ(m.which(), wire::Message::DISEMBARGO); });
  expectStillOpen(5);
}

TEST_F(RpcHostilePromiseTest, ResolveToAThirdPartyHostedByNoVatAborts) {
  hangHolding(1, {3});
  resolveTo(3, [](wire::CapDescriptor::Builder c) { setThirdParty(c, 0, 5); });
  expectAborted();
}

TEST_F(RpcHostilePromiseTest, ResolveToAThirdPartyWhoseVineIsAHeldPromiseAborts) {
  hangHolding(1, {3, 4});
  resolveTo(3, [](wire::CapDescriptor::Builder c) { setThirdParty(c, 7, 4); });
  expectAborted();
}

TEST_F(RpcHostilePromiseTest, ResolveToAThirdPartyWithAVineBeyondTheImportBoundAborts) {
  hangHolding(1, {3});
  resolveTo(3, [](wire::CapDescriptor::Builder c) { setThirdParty(c, 7, 64); });
  expectAborted();
}

TEST_F(RpcHostilePromiseTest, ResolveForAPlainImportAborts) {
  hangHolding(1, {}, {3});
  breakPromise(3);
  expectAborted();
}

TEST_F(RpcHostilePromiseTest, SecondResolveForOnePromiseAborts) {
  hangHolding(1, {3});
  breakPromise(3);
  expectStillOpen(2);
  EXPECT_EQ(victim_->stats().resolvesReceived, 1u);
  breakPromise(3);
  expectAborted();
}

TEST_F(RpcHostilePromiseTest, PromiseResolvedToItselfAborts) {
  hangHolding(1, {3});
  resolveTo(3, [](wire::CapDescriptor::Builder c) { c.setSenderHosted(3); });
  expectAborted();
  EXPECT_EQ(victim_->stats().resolvesReceived, 0u);
}

TEST_F(RpcHostilePromiseTest, PromiseResolvedToAnotherHeldPromiseAborts) {
  hangHolding(1, {3, 4});
  resolveTo(3, [](wire::CapDescriptor::Builder c) { c.setSenderHosted(4); });
  expectAborted();
}

// A promise that has resolved stays a promise for this rule: a chain P2 -> P1 -> ... would make
// every walk along it (calls, releases) as long as the peer likes.
TEST_F(RpcHostilePromiseTest, PromiseResolvedToAnAlreadyResolvedPromiseAborts) {
  hangHolding(1, {3, 4, 6});
  resolveTo(4, [](wire::CapDescriptor::Builder c) { c.setSenderHosted(5); });
  expectStillOpen(2);
  breakPromise(6);
  expectStillOpen(7);
  EXPECT_EQ(victim_->stats().resolvesReceived, 2u);
  resolveTo(3, [](wire::CapDescriptor::Builder c) { c.setSenderHosted(4); });
  expectAborted();
  EXPECT_EQ(victim_->stats().resolvesReceived, 2u) << "refused before anything changed";
}

TEST_F(RpcHostilePromiseTest, PromiseResolvedToABrokenPromiseAborts) {
  hangHolding(1, {3, 6});
  breakPromise(6);
  expectStillOpen(2);
  resolveTo(3, [](wire::CapDescriptor::Builder c) { c.setSenderHosted(6); });
  expectAborted();
}

TEST_F(RpcHostilePromiseTest, ResolveToAThirdPartyWhoseVineIsAResolvedPromiseAborts) {
  hangHolding(1, {3, 4});
  resolveTo(4, [](wire::CapDescriptor::Builder c) { c.setSenderHosted(5); });
  expectStillOpen(2);
  resolveTo(3, [](wire::CapDescriptor::Builder c) { setThirdParty(c, 7, 4); });
  expectAborted();
}

TEST_F(RpcHostilePromiseTest, ResolveToAPromiseDescriptorAborts) {
  hangHolding(1, {3});
  resolveTo(3, [](wire::CapDescriptor::Builder c) { c.setSenderPromise(5); });
  expectAborted();
}

TEST_F(RpcHostilePromiseTest, ResolveToNoCapabilityAborts) {
  hangHolding(1, {3});
  resolveTo(3, [](wire::CapDescriptor::Builder c) { c.setNone(); });
  expectAborted();
}

TEST_F(RpcHostilePromiseTest, ResolveToADeadExportOfTheReceiverAborts) {
  hangHolding(1, {3});
  resolveTo(3, [](wire::CapDescriptor::Builder c) { c.setReceiverHosted(9); });
  expectAborted();
}

TEST_F(RpcHostilePromiseTest, ResolveBeyondTheImportBoundAborts) {
  hangHolding(1, {3});
  resolveTo(3, [](wire::CapDescriptor::Builder c) { c.setSenderHosted(64); });
  expectAborted();
}

TEST_F(RpcHostilePromiseTest, HeldPlainCapabilitySentAgainAsAPromiseAborts) {
  hangHolding(1, {}, {3});
  send([&](wire::Message::Builder m) {
    wire::Call::Builder c = m.initCall();
    c.setQuestionId(2);
    c.getTarget().setImportedCap(0);
    c.setInterfaceId(NODE_INTERFACE_ID);
    c.setMethodId(ECHO);
    wire::Payload::Builder params = c.initParams();
    params.getContent().initAs<Value>().setValue(1);
    params.initCapTable(1)[0].setSenderPromise(3);
  });
  expectAborted();
  EXPECT_EQ(victim_->stats().callsReceived, 1u) << "the second call was never served";
}

TEST_F(RpcHostilePromiseTest, HeldPendingPromiseSentAgainAsPlainAborts) {
  hangHolding(1, {3});
  send([&](wire::Message::Builder m) {
    wire::Call::Builder c = m.initCall();
    c.setQuestionId(2);
    c.getTarget().setImportedCap(0);
    c.setInterfaceId(NODE_INTERFACE_ID);
    c.setMethodId(ECHO);
    wire::Payload::Builder params = c.initParams();
    params.getContent().initAs<Value>().setValue(1);
    params.initCapTable(1)[0].setSenderHosted(3);
  });
  expectAborted();
}

TEST_F(RpcHostilePromiseTest, ResolveCrossingTheReceiversReleaseGivesTheResolutionBack) {
  // An ECHO call's params give promise 3; the victim releases it when the answer is freed.
  send([&](wire::Message::Builder m) {
    wire::Call::Builder c = m.initCall();
    c.setQuestionId(1);
    c.getTarget().setImportedCap(0);
    c.setInterfaceId(NODE_INTERFACE_ID);
    c.setMethodId(ECHO);
    wire::Payload::Builder params = c.initParams();
    params.getContent().initAs<Value>().setValue(1);
    params.initCapTable(1)[0].setSenderPromise(3);
  });
  expectFromVictim([](wire::Message::Reader m) { EXPECT_EQ(m.which(), wire::Message::RETURN); });
  finish(1);
  expectFromVictim([](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::RELEASE);
    EXPECT_EQ(m.getRelease().getId(), 3u);
  });
  // Our Resolve was already on its way: accepted, and the resolution released at once.
  resolveTo(3, [](wire::CapDescriptor::Builder c) { c.setSenderHosted(5); });
  expectFromVictim([](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::RELEASE);
    EXPECT_EQ(m.getRelease().getId(), 5u);
    EXPECT_EQ(m.getRelease().getReferenceCount(), 1u);
  });
  EXPECT_TRUE(victim_->isOpen());
  EXPECT_EQ(victim_->importCount(), 0u);
  // It is no promise any more: a second Resolve is hostile.
  breakPromise(3);
  expectAborted();
}

TEST_F(RpcHostilePromiseTest, VictimsCallsOnAResolvedPromiseTargetItsResolution) {
  hangHolding(1, {3});
  resolveTo(3, [](wire::CapDescriptor::Builder c) { c.setSenderHosted(5); });
  // CALL_BACK calls ECHO(5) on the capability in its params: the (resolved) promise 3.
  send([&](wire::Message::Builder m) {
    wire::Call::Builder c = m.initCall();
    c.setQuestionId(2);
    c.getTarget().setImportedCap(0);
    c.setInterfaceId(NODE_INTERFACE_ID);
    c.setMethodId(CALL_BACK);
    wire::Payload::Builder params = c.initParams();
    writeCapPointer(params.getContent().initAs<CapParam>(), 0, 0);
    params.initCapTable(1)[0].setSenderHosted(3);
  });
  expectFromVictim([](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::CALL);
    ASSERT_EQ(m.getCall().getTarget().which(), wire::MessageTarget::IMPORTED_CAP);
    EXPECT_EQ(m.getCall().getTarget().getImportedCap(), 5u);
  });
}

TEST_F(RpcHostilePromiseTest, ResolvedPromiseHoldsItsResolutionWhileHeld) {
  hangHolding(1, {3});
  resolveTo(3, [](wire::CapDescriptor::Builder c) { c.setSenderHosted(5); });
  expectStillOpen(2);
  EXPECT_EQ(victim_->stats().resolvesReceived, 1u);
  EXPECT_EQ(victim_->importCount(), 2u) << "the promise and its resolution";
}

TEST_F(RpcHostileTest, MalformedFrameAborts) {
  call(1, 0, HANG);
  ASSERT_TRUE(runUntil(loop_, [&] { return log_.hanging == 1; }));
  // A root pointer far out of the frame.
  const uint64_t garbage[2] = {0x0000'0001'7fff'fff0ull, 0};
  ASSERT_TRUE(attackerTx_->sender().trySend(std::as_bytes(std::span(garbage))).ok());
  expectAborted();
  EXPECT_EQ(log_.cancelled, 1);
}

// A Call of the common shape (no params), written word by word, whose struct has a third
// pointer (a field of some later schema) that points far outside the frame. The connection reads
// such a Call from its words without validating it (fast_decode.h): what it never reads is never
// checked. Pipelined on `onQuestion` with the transform [0], or on the export `exportId`.
std::array<uint64_t, 13> callWithAnUnreadWildPointer(uint32_t questionId, uint16_t method,
                                                     std::optional<uint32_t> onQuestion,
                                                     uint32_t exportId = 0) {
  auto structPointer = [](uint64_t offset, uint64_t data, uint64_t pointers) {
    return (offset << 2) | (data << 32) | (pointers << 48);
  };
  std::array<uint64_t, 13> w{};
  w[0] = structPointer(0, 1, 1);  // root: the Message at word 1
  w[1] = static_cast<uint64_t>(wire::Message::CALL);
  w[2] = structPointer(0, 2, 3);  // the Call at word 3: two data words, three pointers
  w[3] = questionId | (uint64_t{method} << 32);
  w[4] = NODE_INTERFACE_ID;
  w[5] = structPointer(2, 1, 1);    // target: the MessageTarget at word 8
  w[6] = 0;                         // params: none
  w[7] = 0x0000'0001'7fff'fff0ull;  // the third pointer: far outside the frame
  if (onQuestion) {
    w[8] = uint64_t{wire::MessageTarget::PROMISED_ANSWER} << 32;
    w[9] = structPointer(0, 1, 1);  // the PromisedAnswer at word 10
    w[10] = *onQuestion;
    w[11] = 1 | (uint64_t{3} << 32) | (uint64_t{1} << 35);  // the transform at word 12: [0]
    w[12] = 0;
  } else {
    w[8] = exportId | (uint64_t{wire::MessageTarget::IMPORTED_CAP} << 32);
  }
  return w;
}

bool malformedAsAWhole(std::span<const uint64_t> words) {
  return FrameReader::validateWithGetters(
             kj::arrayPtr(reinterpret_cast<const capnp::word*>(words.data()), words.size()),
             rpcReceiverOptions().limits)
             .code() == Errc::PROTOCOL_ERROR;
}

TEST_F(RpcHostileTest, APartOfACallThatIsNeverReadIsNeverChecked) {
  const auto words = callWithAnUnreadWildPointer(1, ECHO, std::nullopt);
  ASSERT_TRUE(malformedAsAWhole(words));
  ASSERT_TRUE(attackerTx_->sender().trySend(std::as_bytes(std::span(words))).ok());
  expectFromVictim([](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::RETURN);
    EXPECT_EQ(m.getReturn().getAnswerId(), 1u);
    EXPECT_EQ(m.getReturn().getResults().getContent().getAs<Value>().getValue(), 0u);
  });
  EXPECT_TRUE(victim_->isOpen());
}

TEST_F(RpcHostileTest, ACallKeptForLaterIsKeptAsItWasReadNotAsItCame) {
  call(1, 0, NEXT_LATER);  // answers after a trip through the loop: the next call waits for it
  const auto words = callWithAnUnreadWildPointer(2, ECHO, 1u);
  ASSERT_TRUE(malformedAsAWhole(words));
  ASSERT_TRUE(attackerTx_->sender().trySend(std::as_bytes(std::span(words))).ok());
  // The call waits for answer 1, then goes to the child it returned (value 1): ECHO of no params
  // returns the child's value.
  bool echoed = false;
  for (int i = 0; i < 2; ++i) {
    expectFromVictim([&](wire::Message::Reader m) {
      ASSERT_EQ(m.which(), wire::Message::RETURN);
      if (m.getReturn().getAnswerId() != 2) return;
      echoed = true;
      ASSERT_EQ(m.getReturn().which(), wire::Return::RESULTS);
      EXPECT_EQ(m.getReturn().getResults().getContent().getAs<Value>().getValue(), 1u);
    });
  }
  EXPECT_TRUE(echoed);
  EXPECT_EQ(victim_->stats().pipelinedCallsQueued, 1u);
  EXPECT_TRUE(victim_->isOpen());
}

TEST_F(RpcHostileTest, AbortFromThePeerFailsOurCallsWithItsReason) {
  // The victim has a call out to the attacker (through a capability the attacker passed in).
  send([](wire::Message::Builder m) {
    wire::Call::Builder c = m.initCall();
    c.setQuestionId(1);
    c.getTarget().setImportedCap(0);
    c.setInterfaceId(NODE_INTERFACE_ID);
    c.setMethodId(CALL_BACK);
    wire::Payload::Builder p = c.initParams();
    writeCapPointer(p.getContent().initAs<CapParam>(), 0, 0);
    p.initCapTable(1)[0].setSenderHosted(5);
  });
  expectFromVictim([](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::CALL);
    EXPECT_EQ(m.getCall().getTarget().getImportedCap(), 5u);
  });
  send([](wire::Message::Builder m) {
    wire::Exception::Builder e = m.initAbort();
    e.setErrc(static_cast<uint16_t>(Errc::FAILED));
    e.setReason("going away");
  });
  ASSERT_TRUE(runUntil(loop_, [&] { return !victim_->isOpen(); }));
  EXPECT_EQ(victim_->failure().code, Errc::DISCONNECTED);
  EXPECT_STREQ(victim_->failure().detail, "going away");
}

TEST_F(RpcHostileTest, ProvideOrAcceptOnAConnectionWithoutANetworkAborts) {
  send([](wire::Message::Builder m) {
    wire::Provide::Builder p = m.initProvide();
    p.setQuestionId(1);
    p.initTarget().setImportedCap(0);
    p.setRecipient(5);
    p.setProvisionId(1);
  });
  expectAborted();
}

TEST_F(RpcHostileTest, AcceptOnAConnectionWithoutANetworkAborts) {
  send([](wire::Message::Builder m) {
    wire::Accept::Builder a = m.initAccept();
    a.setQuestionId(1);
    a.setIntroducer(5);
    a.setProvisionId(1);
  });
  expectAborted();
}

TEST_F(RpcHostileTest, AThirdPartyCapabilityWithoutANetworkArrivesBrokenAndItsVineIsReleased) {
  send([](wire::Message::Builder m) {
    wire::Call::Builder c = m.initCall();
    c.setQuestionId(1);
    c.getTarget().setImportedCap(0);
    c.setInterfaceId(NODE_INTERFACE_ID);
    c.setMethodId(CALL_BACK);  // calls ECHO on the cap: fails with the broken cap's error
    wire::Payload::Builder p = c.initParams();
    writeCapPointer(p.getContent().initAs<CapParam>(), 0, 0);
    wire::ThirdPartyCapDescriptor::Builder t = p.initCapTable(1)[0].initThirdPartyHosted();
    t.setVatId(5);
    t.setProvisionId(1);
    t.setVineId(3);
  });
  bool released = false, returned = false;
  for (int i = 0; i < 2; ++i) {
    expectFromVictim([&](wire::Message::Reader m) {
      if (m.which() == wire::Message::RELEASE) {
        EXPECT_EQ(m.getRelease().getId(), 3u);
        EXPECT_EQ(m.getRelease().getReferenceCount(), 1u);
        released = true;
      } else {
        ASSERT_EQ(m.which(), wire::Message::RETURN);
        EXPECT_EQ(m.getReturn().getException().getErrc(), static_cast<uint16_t>(Errc::UNSUPPORTED));
        returned = true;
      }
    });
  }
  EXPECT_TRUE(released);
  EXPECT_TRUE(returned);
  EXPECT_TRUE(victim_->isOpen());
  EXPECT_EQ(victim_->importCount(), 0u);
}

}  // namespace
}  // namespace agate::rpc::test
