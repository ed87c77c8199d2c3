// fuzzRpcConnection (fuzz_targets.h) driven by a seeded random generator: valid RPC conversations
// (calls, pipelined calls, Finish, Release, caps passed both ways) encoded as frame sequences,
// then mutated: bit flips, small integers written over words (ids are where the interesting
// failures are), frames dropped, duplicated and swapped, lengths changed. Fixed seed and count,
// so every CI build (plain, ASan+UBSan, TSan) replays the same inputs.
#include <gtest/gtest.h>

#include <cstdio>
#include <functional>
#include <memory>
#include <random>
#include <vector>

#include "fuzz_targets.h"
#include "rpc_harness.h"

namespace agate::fuzz {
namespace {

using Frame = std::vector<uint64_t>;
using Conversation = std::vector<Frame>;
using Bytes = std::vector<std::byte>;
using rpc::test::NODE_INTERFACE_ID;

Frame build(const std::function<void(rpc::wire::Message::Builder)>& fill) {
  auto words = std::make_unique<capnp::word[]>(128);
  std::memset(words.get(), 0, 128 * sizeof(capnp::word));
  Frame f;
  {
    FrameBuilder b(std::span(words.get(), 128));
    fill(b.initRoot<rpc::wire::Message>());
    Result<size_t> used = b.tryFinish();
    AGATE_ASSERT(used.ok(), "seed frame too large");
    f.resize(*used / 8);
    std::memcpy(f.data(), words.get(), *used);
  }
  return f;
}

Frame call(uint32_t q, uint32_t exportId, uint16_t method, uint64_t value = 1) {
  return build([&](rpc::wire::Message::Builder m) {
    auto c = m.initCall();
    c.setQuestionId(q);
    c.getTarget().setImportedCap(exportId);
    c.setInterfaceId(NODE_INTERFACE_ID);
    c.setMethodId(method);
    c.initParams().getContent().initAs<rpc::test::Value>().setValue(value);
  });
}

Frame pipelined(uint32_t q, uint32_t on, uint16_t method) {
  return build([&](rpc::wire::Message::Builder m) {
    auto c = m.initCall();
    c.setQuestionId(q);
    auto pa = c.getTarget().initPromisedAnswer();
    pa.setQuestionId(on);
    pa.initTransform(1).set(0, 0);
    c.setInterfaceId(NODE_INTERFACE_ID);
    c.setMethodId(method);
    c.initParams().getContent().initAs<rpc::test::Value>().setValue(2);
  });
}

Frame withCap(uint32_t q, uint16_t method, bool senderHosted, uint32_t id) {
  return build([&](rpc::wire::Message::Builder m) {
    auto c = m.initCall();
    c.setQuestionId(q);
    c.getTarget().setImportedCap(0);
    c.setInterfaceId(NODE_INTERFACE_ID);
    c.setMethodId(method);
    auto p = c.initParams();
    rpc::writeCapPointer(p.getContent().initAs<rpc::test::CapParam>(), 0, 0);
    auto d = p.initCapTable(1)[0];
    if (senderHosted) {
      d.setSenderHosted(id);
    } else {
      d.setReceiverHosted(id);
    }
  });
}

// A call whose params carry promise `id` (senderPromise).
Frame withPromise(uint32_t q, uint16_t method, uint32_t id) {
  return build([&](rpc::wire::Message::Builder m) {
    auto c = m.initCall();
    c.setQuestionId(q);
    c.getTarget().setImportedCap(0);
    c.setInterfaceId(NODE_INTERFACE_ID);
    c.setMethodId(method);
    auto p = c.initParams();
    rpc::writeCapPointer(p.getContent().initAs<rpc::test::CapParam>(), 0, 0);
    p.initCapTable(1)[0].setSenderPromise(id);
  });
}

// Resolve of promise `id`: to our export `to` (senderHosted), to the victim's export `to`
// (receiverHosted), or broken.
enum class Resolution { SENDER_HOSTED, RECEIVER_HOSTED, BROKEN };
Frame resolve(uint32_t id, Resolution kind, uint32_t to = 0) {
  return build([&](rpc::wire::Message::Builder m) {
    auto r = m.initResolve();
    r.setPromiseId(id);
    switch (kind) {
      case Resolution::SENDER_HOSTED:
        r.initCap().setSenderHosted(to);
        break;
      case Resolution::RECEIVER_HOSTED:
        r.initCap().setReceiverHosted(to);
        break;
      case Resolution::BROKEN: {
        auto e = r.initException();
        e.setReason("broken");
        e.setErrc(static_cast<uint16_t>(Errc::FAILED));
        break;
      }
    }
  });
}

Frame provide(uint32_t q, uint32_t exportId, uint64_t recipient, uint64_t provisionId) {
  return build([&](rpc::wire::Message::Builder m) {
    auto p = m.initProvide();
    p.setQuestionId(q);
    p.initTarget().setImportedCap(exportId);
    p.setRecipient(recipient);
    p.setProvisionId(provisionId);
  });
}

Frame accept(uint32_t q, uint64_t introducer, uint64_t provisionId, bool embargo = false) {
  return build([&](rpc::wire::Message::Builder m) {
    auto a = m.initAccept();
    a.setQuestionId(q);
    a.setIntroducer(introducer);
    a.setProvisionId(provisionId);
    a.setEmbargo(embargo);
  });
}

// Disembargo {importedCap(exportId), provide = q}.
Frame disembargoProvide(uint32_t exportId, uint32_t q) {
  return build([&](rpc::wire::Message::Builder m) {
    auto d = m.initDisembargo();
    d.initTarget().setImportedCap(exportId);
    d.initContext().setProvide(q);
  });
}

// Resolve of promise `id` to a capability of vat `host`, handed off with vine `vine`.
Frame resolveThirdParty(uint32_t id, uint64_t host, uint32_t vine) {
  return build([&](rpc::wire::Message::Builder m) {
    auto r = m.initResolve();
    r.setPromiseId(id);
    auto t = r.initCap().initThirdPartyHosted();
    t.setVatId(host);
    t.setProvisionId(1);
    t.setVineId(vine);
  });
}

Frame withThirdPartyCap(uint32_t q, uint16_t method, uint64_t host, uint32_t vine) {
  return build([&](rpc::wire::Message::Builder m) {
    auto c = m.initCall();
    c.setQuestionId(q);
    c.getTarget().setImportedCap(0);
    c.setInterfaceId(NODE_INTERFACE_ID);
    c.setMethodId(method);
    auto p = c.initParams();
    rpc::writeCapPointer(p.getContent().initAs<rpc::test::CapParam>(), 0, 0);
    auto t = p.initCapTable(1)[0].initThirdPartyHosted();
    t.setVatId(host);
    t.setProvisionId(7);
    t.setVineId(vine);
  });
}

Frame finish(uint32_t q) {
  return build([&](rpc::wire::Message::Builder m) { m.initFinish().setQuestionId(q); });
}

Frame release(uint32_t id, uint32_t n) {
  return build([&](rpc::wire::Message::Builder m) {
    auto r = m.initRelease();
    r.setId(id);
    r.setReferenceCount(n);
  });
}

std::vector<Conversation> seeds() {
  using namespace rpc::test;
  return {
      {call(1, 0, ECHO), finish(1)},
      {call(1, 0, NEXT_LATER), pipelined(2, 1, ECHO), pipelined(3, 1, NEXT), pipelined(4, 3, ECHO),
       finish(1), finish(2), finish(3), finish(4)},
      {call(1, 0, NEXT), finish(1), release(1, 1), call(1, 0, ECHO)},
      {call(1, 0, HANG), finish(1), call(2, 0, FAIL), pipelined(3, 2, ECHO), finish(3)},
      {call(1, 0, NEXT), withCap(2, IDENTIFY, false, 1), finish(2), release(1, 1)},
      {withCap(1, CALL_BACK, true, 3), withCap(2, IDENTIFY, true, 4), finish(2)},
      {call(1, 0, FAIL_LATER), pipelined(2, 1, NEXT), pipelined(3, 2, ECHO), finish(1)},
      // Three-party handoff (the victim is vat 1, its peer vat 2).
      {call(1, 0, NEXT), provide(2, 1, 3, 1), provide(3, 0, 4, 2), finish(2), finish(1),
       release(1, 1)},
      {accept(1, 3, 5), finish(1), provide(2, 0, 3, 9), accept(3, 4, 1)},
      {withThirdPartyCap(1, CALL_BACK, 3, 4), withThirdPartyCap(2, IDENTIFY, 5, 6), finish(2)},
      // Promise capabilities: held while a call hangs, resolved (the victim's calls on it then go
      // to the resolution), broken, resolved to the victim's own export, or resolved after the
      // victim released it (the Resolve crossing its Release).
      {withPromise(1, HANG, 3), resolve(3, Resolution::SENDER_HOSTED, 5),
       withCap(2, CALL_BACK, true, 3), finish(1)},
      {withPromise(1, HANG, 3), withPromise(2, CALL_BACK, 3), resolve(3, Resolution::BROKEN),
       finish(2), finish(1)},
      {withPromise(1, HANG, 4), resolve(4, Resolution::RECEIVER_HOSTED, 0), finish(1)},
      {withPromise(1, ECHO, 3), finish(1), resolve(3, Resolution::SENDER_HOSTED, 6)},
      // Embargoes: a provision disembargoed by its introducer, an embargoed Accept, a promise
      // resolved to a third party's capability (held: Accept and Disembargo; released: the
      // vine goes back).
      {provide(1, 0, 3, 1), disembargoProvide(0, 1), finish(1)},
      {accept(1, 3, 5, true), finish(1), provide(2, 0, 3, 2), disembargoProvide(0, 2)},
      {withPromise(1, HANG, 3), resolveThirdParty(3, 3, 5), finish(1)},
      {withPromise(1, ECHO, 3), finish(1), resolveThirdParty(3, 4, 6)},
  };
}

Bytes encode(const Conversation& c) {
  Bytes out;
  for (const Frame& f : c) {
    out.push_back(std::byte(static_cast<uint8_t>(f.size())));
    const auto* p = reinterpret_cast<const std::byte*>(f.data());
    out.insert(out.end(), p, p + f.size() * 8);
  }
  return out;
}

Conversation mutate(Conversation c, std::mt19937_64& rng) {
  auto pick = [&](size_t n) { return static_cast<size_t>(rng() % n); };
  const int edits = 1 + static_cast<int>(pick(3));
  for (int e = 0; e < edits && !c.empty(); ++e) {
    Frame& f = c[pick(c.size())];
    switch (pick(7)) {
      case 0:  // flip a bit
        if (!f.empty()) f[pick(f.size())] ^= uint64_t{1} << pick(64);
        break;
      case 1:  // a small integer over the low or high half of a word (ids, counts, indices)
        if (!f.empty()) {
          uint64_t& w = f[pick(f.size())];
          const uint64_t v = pick(10);
          w = pick(2) == 0 ? (w & ~0xffff'ffffull) | v : (w & 0xffff'ffffull) | (v << 32);
        }
        break;
      case 2:  // drop a frame
        c.erase(c.begin() + static_cast<std::ptrdiff_t>(pick(c.size())));
        break;
      case 3:  // duplicate a frame
        c.insert(c.begin() + static_cast<std::ptrdiff_t>(pick(c.size())), f);
        break;
      case 4:  // swap two frames
        std::swap(c[pick(c.size())], c[pick(c.size())]);
        break;
      case 5:  // truncate a frame
        if (!f.empty()) f.resize(pick(f.size()));
        break;
      default:  // a random word
        if (!f.empty()) f[pick(f.size())] = rng();
        break;
    }
  }
  return c;
}

TEST(RpcFuzzTest, SeedConversationsAreAccepted) {
  for (const Conversation& c : seeds()) {
    Bytes b = encode(c);
    EXPECT_EQ(fuzzRpcConnection(b), FuzzOutcome::ACCEPTED);
  }
}

TEST(RpcFuzzTest, MutatedConversationsNeverBreakTheConnectionsInvariants) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  constexpr int INPUTS = 1'500;
#else
  constexpr int INPUTS = 4'000;
#endif
  std::mt19937_64 rng(0x5eed'4a6a'7e00'0004ull);
  const std::vector<Conversation> base = seeds();
  int accepted = 0;
  for (int i = 0; i < INPUTS; ++i) {
    Bytes input = encode(mutate(base[static_cast<size_t>(rng() % base.size())], rng));
    if (fuzzRpcConnection(input) == FuzzOutcome::ACCEPTED) ++accepted;
  }
  std::printf("rpc_connection: %d of %d inputs accepted\n", accepted, INPUTS);
  EXPECT_GT(accepted, INPUTS / 20);
  EXPECT_LT(accepted, INPUTS - INPUTS / 20);
}

}  // namespace
}  // namespace agate::fuzz
