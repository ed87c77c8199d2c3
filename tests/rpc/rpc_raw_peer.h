// A test fixture that speaks raw rpc.capnp messages at an RpcConnection (the victim): the
// attacker side writes frames into the victim's ring and reads what the victim sends back.
// Shared by the hostile-peer and the budget tests.
#pragma once

#include <gtest/gtest.h>

#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "rpc_harness.h"
#include "support/watchdog.h"

namespace agate::rpc::test {

class RawPeerTest : public ::testing::Test {
 protected:
  // `budget`: the victim's RpcOptions::budget (not owned; outlives the fixture).
  explicit RawPeerTest(StateBudget* budget = nullptr) {
    ChannelOptions co;
    co.scope = ChannelScope::LOCAL;
    toVictim_ = std::move(Channel::create(co).value());
    fromVictim_ = std::move(Channel::create(co).value());
    attackerTx_ = std::make_unique<MessageSender>(toVictim_->attachSender().value());
    victimRx_ = std::make_unique<MessageReceiver>(*toVictim_, toVictim_->attachReceiver().value(),
                                                  rpcReceiverOptions());
    victimTx_ = std::make_unique<MessageSender>(fromVictim_->attachSender().value());
    attackerRx_ = std::make_unique<MessageReceiver>(
        *fromVictim_, fromVictim_->attachReceiver().value(), rpcReceiverOptions());
    RpcOptions options;
    options.bootstrap = &root_;
    options.maxAnswers = 64;
    options.maxImports = 64;
    options.maxQueuedCallBytes = 32 * 1024;  // four calls of 7 KB kept (8 KiB copies)
    options.budget = budget;
    victim_ = std::make_unique<RpcConnection>(*victimTx_, *victimRx_, loop_, options);
  }
  ~RawPeerTest() override { victim_.reset(); }

  void send(const std::function<void(wire::Message::Builder)>& fill, size_t bytes = 1024) {
    Result<OutgoingMessage> m = attackerTx_->tryStartMessage(bytes);
    ASSERT_TRUE(m.ok());
    fill(m->initRoot<wire::Message>());
    ASSERT_TRUE(m->send().ok());
  }
  void call(uint32_t questionId, uint32_t exportId, uint16_t method, uint64_t value = 1) {
    send([&](wire::Message::Builder m) {
      wire::Call::Builder c = m.initCall();
      c.setQuestionId(questionId);
      c.getTarget().setImportedCap(exportId);
      c.setInterfaceId(NODE_INTERFACE_ID);
      c.setMethodId(method);
      c.initParams().getContent().initAs<Value>().setValue(value);
    });
  }
  // A Call sent with noPromisePipelining, with a Value param when `value` is given.
  void callWithoutPipelining(uint32_t questionId, uint32_t exportId, uint16_t method,
                             std::optional<uint64_t> value = std::nullopt) {
    send([&](wire::Message::Builder m) {
      wire::Call::Builder c = m.initCall();
      c.setQuestionId(questionId);
      c.getTarget().setImportedCap(exportId);
      c.setInterfaceId(NODE_INTERFACE_ID);
      c.setMethodId(method);
      c.setNoPromisePipelining(true);
      if (value) c.initParams().getContent().initAs<Value>().setValue(*value);
    });
  }
  void pipelinedCall(uint32_t questionId, uint32_t onQuestion, uint16_t method,
                     std::initializer_list<uint16_t> path) {
    send([&](wire::Message::Builder m) {
      wire::Call::Builder c = m.initCall();
      c.setQuestionId(questionId);
      wire::PromisedAnswer::Builder pa = c.getTarget().initPromisedAnswer();
      pa.setQuestionId(onQuestion);
      auto t = pa.initTransform(static_cast<unsigned>(path.size()));
      unsigned i = 0;
      for (uint16_t step : path) t.set(i++, step);
      c.setInterfaceId(NODE_INTERFACE_ID);
      c.setMethodId(method);
      c.initParams().getContent().initAs<Value>().setValue(1);
    });
  }
  void finish(uint32_t questionId) {
    send([&](wire::Message::Builder m) { m.initFinish().setQuestionId(questionId); });
  }
  // A Finish with releaseResultCaps: the victim drops the references the Return gave.
  void finishReleasing(uint32_t questionId) {
    send([&](wire::Message::Builder m) {
      wire::Finish::Builder f = m.initFinish();
      f.setQuestionId(questionId);
      f.setReleaseResultCaps(true);
    });
  }
  // The next message is answer `answerId`'s Return with results; the export ids of its cap
  // table (senderHosted entries).
  std::vector<uint32_t> expectReturnOfExports(uint32_t answerId) {
    std::vector<uint32_t> ids;
    expectFromVictim([&](wire::Message::Reader m) {
      ASSERT_EQ(m.which(), wire::Message::RETURN);
      ASSERT_EQ(m.getReturn().getAnswerId(), answerId);
      for (wire::CapDescriptor::Reader c : m.getReturn().getResults().getCapTable()) {
        ASSERT_EQ(c.which(), wire::CapDescriptor::SENDER_HOSTED);
        ids.push_back(c.getSenderHosted());
      }
    });
    return ids;
  }

  // The next message the victim sent, with `check` run on it.
  void expectFromVictim(const std::function<void(wire::Message::Reader)>& check) {
    Result<IncomingMessage> in = loop_.run(attackerRx_->receiveAsync(loop_));
    ASSERT_TRUE(in.ok()) << errcName(in.code());
    ASSERT_TRUE(in->validate().ok());  // rpcReceiverOptions() validate on demand
    check(in->getRoot<wire::Message>());
  }
  // The victim aborted: PROTOCOL_ERROR locally, an Abort saying so on the wire, and everything it
  // had pending failed or cancelled.
  void expectAborted() {
    ASSERT_TRUE(runUntil(loop_, [&] { return !victim_->isOpen(); }));
    EXPECT_EQ(victim_->failure().code, Errc::PROTOCOL_ERROR);
    bool sawAbort = false;
    for (;;) {
      Result<IncomingMessage> in = attackerRx_->tryReceive();
      if (!in) break;
      ASSERT_TRUE(in->validate().ok());  // rpcReceiverOptions() validate on demand
      wire::Message::Reader m = in->getRoot<wire::Message>();
      if (m.which() == wire::Message::ABORT) {
        sawAbort = true;
        EXPECT_EQ(m.getAbort().getErrc(), static_cast<uint16_t>(Errc::PROTOCOL_ERROR));
      }
    }
    EXPECT_TRUE(sawAbort);
    ASSERT_TRUE(runUntil(loop_, [&] { return victim_->answerCount() == 0; }));
    EXPECT_EQ(log_.hanging, 0) << "running calls were cancelled";
  }

  agate::testing::Watchdog watchdog_{"raw peer test", std::chrono::seconds(60)};
  EventLoop loop_;
  Log log_;
  Node root_{0, log_};
  std::unique_ptr<Channel> toVictim_, fromVictim_;
  std::unique_ptr<MessageSender> attackerTx_, victimTx_;
  std::unique_ptr<MessageReceiver> victimRx_, attackerRx_;
  std::unique_ptr<RpcConnection> victim_;
};

}  // namespace agate::rpc::test
