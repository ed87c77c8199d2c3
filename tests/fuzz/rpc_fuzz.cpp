// Fuzz target: a sequence of frames from a hostile peer into an RpcConnection serving a Node.
//
// Input layout: repeated [u8 n][n * 8 bytes] records, each one frame of n words (n = 0: an empty
// frame); a short tail becomes a last frame padded with zeros. At most 24 frames and 4 Ki words.
// The frames are written into the connection's inbound LOCAL ring, the peer then detaches, and the
// connection runs until it ends. Checks: it ends with DISCONNECTED (every frame was acceptable)
// or PROTOCOL_ERROR (it aborted), within the deadline; after it is destroyed no call is left
// running, every object it created is destroyed and its vat keeps no provision and no waiting
// Accept (nothing leaks, nothing is freed twice; ASan and UBSan see every access). The victim is
// vat 1 of a VatNetwork that reaches no other vat, its peer vat 2 (so Provide, Accept and
// thirdPartyHosted entries are decoded and acted on).
#include <cstring>
#include <memory>

#include "fuzz_targets.h"
#include "rpc_harness.h"

namespace agate::fuzz {

using rpc::test::Log;
using rpc::test::Node;

namespace {

constexpr size_t MAX_FRAMES = 24;
constexpr size_t MAX_TOTAL_WORDS = 4096;

// Vat 1, alone: every connect() fails at once (third-party caps arrive broken).
class LoneVat final : public rpc::VatNetwork {
 public:
  rpc::VatId vatId() const noexcept override { return 1; }
  Promise<rpc::RpcConnection*> connect(rpc::VatId) override {
    return readyPromise<rpc::RpcConnection*>(Error(Errc::NOT_FOUND, "no other vat"));
  }
};

EventLoop& fuzzLoop() {
  // One loop per thread for all inputs (creating an io_uring per input would dominate).
  thread_local std::unique_ptr<EventLoop> loop = std::make_unique<EventLoop>();
  return *loop;
}

}  // namespace

FuzzOutcome fuzzRpcConnection(std::span<const std::byte> input) {
  EventLoop& loop = fuzzLoop();
  ChannelOptions co;
  co.scope = ChannelScope::LOCAL;
  co.capacityBytes = 64 * 1024;
  std::unique_ptr<Channel> toVictim = std::move(Channel::create(co).value());
  std::unique_ptr<Channel> fromVictim = std::move(Channel::create(co).value());
  auto attacker = std::make_unique<Sender>(std::move(toVictim->attachSender().value()));
  MessageReceiver victimRx(*toVictim, toVictim->attachReceiver().value(),
                           rpc::rpcReceiverOptions());
  MessageSender victimTx(fromVictim->attachSender().value());
  Log log;
  Node root(0, log);
  LoneVat vat;
  rpc::RpcOptions options;
  options.network = &vat;
  options.peerVat = 2;
  options.bootstrap = &root;
  options.maxAnswers = 64;
  options.maxImports = 64;
  auto victim = std::make_unique<rpc::RpcConnection>(victimTx, victimRx, loop, options);

  size_t at = 0, frames = 0, words = 0;
  alignas(8) std::byte frame[256 * 8];
  while (at < input.size() && frames < MAX_FRAMES && words < MAX_TOTAL_WORDS) {
    const size_t n = static_cast<uint8_t>(input[at++]);
    const size_t available = std::min(n * 8, input.size() - at);
    std::memset(frame, 0, sizeof frame);
    std::memcpy(frame, input.data() + at, available);
    at += available;
    Status sent = attacker->trySend(std::span(frame, std::max<size_t>(n, 1) * 8));
    AGATE_ASSERT(sent.ok(), "the inbound ring refused a frame: %s", errcName(sent.code()));
    ++frames;
    words += n;
  }
  attacker.reset();  // the peer detaches: the victim drains what was sent, then disconnects

  Status ended = loop.run(loop.deadline(victim->onDisconnect(), std::chrono::seconds(5)));
  AGATE_ASSERT(ended.code() == Errc::DISCONNECTED || ended.code() == Errc::PROTOCOL_ERROR,
               "connection ended with %s", errcName(ended.code()));
  victim.reset();
  loop.runUntilIdle();
  AGATE_ASSERT(log.hanging == 0, "%d calls still running after the connection died", log.hanging);
  AGATE_ASSERT(log.destroyed == log.created - 1, "%d objects created, %d destroyed",
               log.created - 1, log.destroyed);
  AGATE_ASSERT(vat.provisionCount() == 0 && vat.waitingAcceptCount() == 0,
               "%zu provisions and %zu accepts left after the connection died",
               vat.provisionCount(), vat.waitingAcceptCount());
  return ended.code() == Errc::DISCONNECTED ? FuzzOutcome::ACCEPTED : FuzzOutcome::REFUSED;
}

}  // namespace agate::fuzz
