// fuzzRpcConnection (fuzz_targets.h) driven by a seeded random generator: valid RPC conversations
// (calls, pipelined calls, Finish, Release, caps passed both ways) encoded as frame sequences,
// then mutated: bit flips, small integers written over words (ids are where the interesting
// failures are), frames dropped, duplicated and swapped, lengths changed. Fixed seed and count,
// so every CI build (plain, ASan+UBSan, TSan) replays the same inputs.
#include <gtest/gtest.h>

#include <cstdio>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <vector>

#include "fast_decode.h"
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

// A Call on an export; `pipelining` false sets noPromisePipelining (its Return then frees the
// answer: noFinishNeeded).
Frame call(uint32_t q, uint32_t exportId, uint16_t method, uint64_t value = 1,
           bool pipelining = true) {
  return build([&](rpc::wire::Message::Builder m) {
    auto c = m.initCall();
    c.setQuestionId(q);
    c.getTarget().setImportedCap(exportId);
    c.setInterfaceId(NODE_INTERFACE_ID);
    c.setMethodId(method);
    c.setNoPromisePipelining(!pipelining);
    c.initParams().getContent().initAs<rpc::test::Value>().setValue(value);
  });
}

Frame callBare(uint32_t q, uint32_t exportId, uint16_t method, uint64_t value = 1) {
  return call(q, exportId, method, value, false);
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

// A call on the bootstrap whose params carry one capability, described by `describe`.
template <class Describe>
Frame withOneCap(uint32_t q, uint16_t method, Describe describe) {
  return build([&](rpc::wire::Message::Builder m) {
    auto c = m.initCall();
    c.setQuestionId(q);
    c.getTarget().setImportedCap(0);
    c.setInterfaceId(NODE_INTERFACE_ID);
    c.setMethodId(method);
    auto p = c.initParams();
    rpc::writeCapPointer(p.getContent().initAs<rpc::test::CapParam>(), 0, 0);
    describe(p.initCapTable(1)[0]);
  });
}

Frame withCap(uint32_t q, uint16_t method, bool senderHosted, uint32_t id) {
  return withOneCap(q, method, [&](rpc::wire::CapDescriptor::Builder d) {
    if (senderHosted) {
      d.setSenderHosted(id);
    } else {
      d.setReceiverHosted(id);
    }
  });
}

// A call whose params carry promise `id` (senderPromise).
Frame withPromise(uint32_t q, uint16_t method, uint32_t id) {
  return withOneCap(q, method,
                    [&](rpc::wire::CapDescriptor::Builder d) { d.setSenderPromise(id); });
}

Frame withThirdPartyCap(uint32_t q, uint16_t method, uint64_t host, uint32_t vine) {
  return withOneCap(q, method, [&](rpc::wire::CapDescriptor::Builder d) {
    auto t = d.initThirdPartyHosted();
    t.setVatId(host);
    t.setProvisionId(7);
    t.setVineId(vine);
  });
}

// A call whose params pass back a capability pipelined on answer `on` (receiverAnswer).
Frame withReceiverAnswer(uint32_t q, uint16_t method, uint32_t on) {
  return withOneCap(q, method, [&](rpc::wire::CapDescriptor::Builder d) {
    auto pa = d.initReceiverAnswer();
    pa.setQuestionId(on);
    pa.initTransform(1).set(0, 0);
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

// The attacker's Return to the victim's question `q` (the victim asks when CALL_BACK calls the
// attacker's capability; its first question id is 1).
Frame returnFor(uint32_t q, const std::function<void(rpc::wire::Return::Builder)>& fill) {
  return build([&](rpc::wire::Message::Builder m) {
    auto r = m.initReturn();
    r.setAnswerId(q);
    fill(r);
  });
}

Frame returnValue(uint32_t q, uint64_t value) {
  return returnFor(q, [&](rpc::wire::Return::Builder r) {
    r.initResults().getContent().initAs<rpc::test::Value>().setValue(value);
  });
}

// A Return whose results hold one capability, described by `describe`.
template <class Describe>
Frame returnWithCap(uint32_t q, Describe describe) {
  return returnFor(q, [&](rpc::wire::Return::Builder r) {
    auto p = r.initResults();
    rpc::writeCapPointer(p.getContent().initAs<rpc::test::CapParam>(), 0, 0);
    describe(p.initCapTable(1)[0]);
  });
}

Frame returnException(uint32_t q) {
  return returnFor(q, [](rpc::wire::Return::Builder r) {
    auto e = r.initException();
    e.setReason("the attacker's method failed");
    e.setType(rpc::wire::Exception::Type::OVERLOADED);
  });
}

Frame returnCanceled(uint32_t q) {
  return returnFor(q, [](rpc::wire::Return::Builder r) { r.setCanceled(); });
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
      // Calls without promise pipelining: a Finish crossing the Return (ignored), the id reused
      // at once, a cancelled one, one whose results hold a capability (finished as before).
      {callBare(1, 0, ECHO), finish(1), callBare(1, 0, RECORD), callBare(1, 0, FAIL)},
      {callBare(1, 0, HANG), finish(1), callBare(1, 0, FAIL), finish(1), callBare(2, 0, NEXT),
       finish(2), release(1, 1)},
      {call(1, 0, NEXT_LATER), callBare(2, 0, ECHO), pipelined(3, 1, ECHO), finish(2), finish(1),
       finish(3)},
      // A capability pipelined on an answer passed back: waiting for it (a call queued behind),
      // already returned, failed, and the answer finished while the call waits.
      {call(1, 0, NEXT_LATER), withReceiverAnswer(2, IDENTIFY, 1), call(3, 0, ECHO), finish(1),
       finish(2), finish(3)},
      {call(1, 0, NEXT), withReceiverAnswer(2, CALL_BACK, 1), finish(2), finish(1), release(1, 1)},
      {call(1, 0, FAIL_LATER), withReceiverAnswer(2, IDENTIFY, 1), finish(2), finish(1)},
      {call(1, 0, HANG), withReceiverAnswer(2, IDENTIFY, 1), finish(2), finish(1)},
      // Returns to the victim's own question (CALL_BACK calls the attacker's capability): plain
      // results, results holding a capability of each kind the attacker may host, an
      // exception, and canceled. (Refused shapes, such as noFinishNeeded on a question that
      // allowed pipelining or a Return to a question never asked, are left to the mutations.)
      {withCap(1, CALL_BACK, true, 3), returnValue(1, 9), finish(1)},
      {withCap(1, CALL_BACK, true, 3),
       returnWithCap(1, [](rpc::wire::CapDescriptor::Builder d) { d.setSenderHosted(5); }),
       finish(1)},
      {withCap(1, CALL_BACK, true, 3),
       returnWithCap(1, [](rpc::wire::CapDescriptor::Builder d) { d.setSenderPromise(6); }),
       resolve(6, Resolution::SENDER_HOSTED, 7), finish(1)},
      {withCap(1, CALL_BACK, true, 3),
       returnWithCap(1,
                     [](rpc::wire::CapDescriptor::Builder d) {
                       auto t = d.initThirdPartyHosted();
                       t.setVatId(3);
                       t.setProvisionId(2);
                       t.setVineId(8);
                     }),
       finish(1)},
      {withCap(1, CALL_BACK, true, 3), returnException(1), finish(1)},
      {withCap(1, CALL_BACK, true, 3), returnCanceled(1), finish(1)},
      {withCap(1, CALL_BACK, true, 3), returnValue(1, 9), withCap(2, CALL_BACK, true, 4),
       returnValue(2, 10), finish(2), finish(1)},
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

// Frames of the shapes the word-level decoder takes (rpc/fast_decode.h): calls without params
// (or with an empty Payload) on an import or a promised answer, empty and canceled Returns.
std::vector<Frame> commonFrames() {
  auto emptyCall = [](uint32_t q, std::optional<uint32_t> on, std::vector<uint16_t> path,
                      bool emptyParams, bool noPipelining = false) {
    return build([&](rpc::wire::Message::Builder m) {
      auto c = m.initCall();
      c.setQuestionId(q);
      c.setNoPromisePipelining(noPipelining);
      c.setInterfaceId(NODE_INTERFACE_ID);
      c.setMethodId(static_cast<uint16_t>(q * 3));
      if (!on) {
        c.initTarget().setImportedCap(q % 3);
      } else {
        auto pa = c.initTarget().initPromisedAnswer();
        pa.setQuestionId(*on);
        auto t = pa.initTransform(static_cast<uint32_t>(path.size()));
        for (size_t i = 0; i < path.size(); ++i) t.set(static_cast<uint32_t>(i), path[i]);
      }
      if (emptyParams) c.initParams();
    });
  };
  return {
      emptyCall(1, std::nullopt, {}, false),
      emptyCall(2, std::nullopt, {}, true),
      emptyCall(3, 1u, {}, false),
      emptyCall(4, 1u, {0}, false),
      emptyCall(5, 2u, {1, 2, 3, 4, 5, 6, 7, 65535}, true),
      build([](rpc::wire::Message::Builder m) {
        auto r = m.initReturn();
        r.setAnswerId(3);
        r.initResults();
      }),
      build([](rpc::wire::Message::Builder m) { m.initReturn().setAnswerId(4); }),
      build([](rpc::wire::Message::Builder m) {
        auto r = m.initReturn();
        r.setAnswerId(5);
        r.setCanceled();
      }),
      finish(6),
      build([](rpc::wire::Message::Builder m) {
        auto f = m.initFinish();
        f.setQuestionId(7);
        f.setReleaseResultCaps(true);
      }),
      release(7, 8),
      // With the flags that end a call at its Return (Call.noPromisePipelining,
      // Return.noFinishNeeded).
      emptyCall(8, std::nullopt, {}, false, true),
      emptyCall(9, 3u, {1, 4}, true, true),
      build([](rpc::wire::Message::Builder m) {
        auto r = m.initReturn();
        r.setAnswerId(8);
        r.setNoFinishNeeded(true);
        r.initResults();
      }),
      build([](rpc::wire::Message::Builder m) {
        auto r = m.initReturn();
        r.setAnswerId(9);
        r.setNoFinishNeeded(true);
        r.setCanceled();
      }),
  };
}

// The word-level decoder runs on frames nothing validated (an RPC receiver validates on demand).
// For a frame validation accepts, reads it with Cap'n Proto as RpcConnection::decode does and
// checks that the word-level decoder, if it takes the frame, read the same fields, and that the
// params or results are empty (no content, no cap table). True when the word-level decoder took
// a valid frame. A frame validation refuses is given to the decoder too (it must stay inside the
// words: ASan sees an exactly sized vector) and counts as not taken here; what the connection
// then does with it, served from the fields read or refused, is what rpc_fuzz (a connection fed
// the same mutants) checks never crashes or leaks.
bool agreesWithCapnp(const Frame& frame) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(frame.data()),
                                         frame.size() * 8);
  rpc::internal::CommonFrame fast;
  const bool taken = rpc::internal::parseCommonFrame(bytes, fast);
  FrameReader reader(rpc::rpcReceiverOptions().limits);
  Result<MessageView> view = reader.tryDecode(bytes);
  if (!view || !taken) return false;
  auto emptyPayload = [](rpc::wire::Payload::Reader p) {
    return !p.hasContent() && p.getCapTable().size() == 0;
  };
  Status read = view->tryRead<rpc::wire::Message>([&](rpc::wire::Message::Reader m) {
    ASSERT_EQ(m.which(), fast.which);
    switch (m.which()) {
      case rpc::wire::Message::CALL: {
        auto c = m.getCall();
        EXPECT_EQ(c.getQuestionId(), fast.id);
        EXPECT_EQ(c.getInterfaceId(), fast.interfaceId);
        EXPECT_EQ(c.getMethodId(), fast.methodId);
        EXPECT_EQ(c.getNoPromisePipelining(), fast.noPipelining);
        EXPECT_TRUE(emptyPayload(c.getParams()));
        auto t = c.getTarget();
        ASSERT_EQ(t.isPromisedAnswer(), fast.targetIsAnswer);
        if (!fast.targetIsAnswer) {
          EXPECT_EQ(t.getImportedCap(), fast.targetId);
          break;
        }
        auto pa = t.getPromisedAnswer();
        EXPECT_EQ(pa.getQuestionId(), fast.targetId);
        auto path = pa.getTransform();
        ASSERT_EQ(path.size(), fast.pathLength);
        for (uint32_t i = 0; i < path.size(); ++i) EXPECT_EQ(path[i], fast.path[i]);
        break;
      }
      case rpc::wire::Message::RETURN: {
        auto r = m.getReturn();
        EXPECT_EQ(r.getAnswerId(), fast.id);
        EXPECT_EQ(r.getNoFinishNeeded(), fast.noFinishNeeded);
        ASSERT_EQ(r.which(), fast.returnKind);
        if (r.isResults()) {
          EXPECT_TRUE(emptyPayload(r.getResults()));
        }
        break;
      }
      case rpc::wire::Message::FINISH:
        EXPECT_EQ(m.getFinish().getQuestionId(), fast.id);
        EXPECT_EQ(m.getFinish().getReleaseResultCaps(), fast.releaseResultCaps);
        break;
      case rpc::wire::Message::RELEASE:
        EXPECT_EQ(m.getRelease().getId(), fast.id);
        EXPECT_EQ(m.getRelease().getReferenceCount(), fast.count);
        break;
      default:
        ADD_FAILURE() << "the word-level decoder took a message of kind " << m.which();
    }
  });
  EXPECT_TRUE(read.ok()) << "Cap'n Proto's readers refused a frame the word-level decoder took";
  return true;
}

TEST(RpcFuzzTest, WordLevelDecoderTakesTheCommonFramesAndAgreesWithCapnpOnEveryFrameItTakes) {
  for (const Frame& f : commonFrames()) EXPECT_TRUE(agreesWithCapnp(f));
  // Every other seed frame has params, results, capabilities or another kind: declined.
  for (const Conversation& c : seeds()) {
    for (const Frame& f : c) (void)agreesWithCapnp(f);
  }
  EXPECT_FALSE(agreesWithCapnp(call(1, 0, 0)));  // params with content
  std::mt19937_64 rng(0x5eed'fa57'0003ull);
  const std::vector<Frame> base = commonFrames();
  int taken = 0;
#if defined(__SANITIZE_THREAD__)
  constexpr int INPUTS = 2'000;  // every refused frame throws, which TSan makes ~100x slower
#elif defined(__SANITIZE_ADDRESS__)
  constexpr int INPUTS = 10'000;
#else
  constexpr int INPUTS = 50'000;
#endif
  for (int i = 0; i < INPUTS; ++i) {
    Conversation one = mutate({base[static_cast<size_t>(rng() % base.size())]}, rng);
    for (const Frame& f : one) taken += agreesWithCapnp(f);
    // Random words of random length, and a random word over a random frame.
    Frame noise(1 + rng() % 16);
    for (uint64_t& w : noise) w = rng();
    taken += agreesWithCapnp(noise);
  }
  std::printf("word-level decoder: took %d of the mutated and random frames\n", taken);
  EXPECT_GT(taken, INPUTS / 10);
}

TEST(RpcFuzzTest, WordLevelDecoderDeclinesEveryOtherShape) {
  auto takes = [](const Frame& f) {
    rpc::internal::CommonFrame out;
    return rpc::internal::parseCommonFrame(
        std::span(reinterpret_cast<const std::byte*>(f.data()), f.size() * 8), out);
  };
  const std::vector<Frame> common = commonFrames();
  const Frame importCall = common[0];   // words: root, Message(2), Call(4), MessageTarget(2)
  const Frame answerCall = common[4];   // ... PromisedAnswer at 9..10, transform at 11
  const Frame emptyReturn = common[5];  // root, Message(2), Return(2), Payload(2)
  ASSERT_TRUE(takes(importCall) && takes(answerCall) && takes(emptyReturn));
  auto with = [](Frame f, size_t word, uint64_t value) {
    f[word] = value;
    return f;
  };
  const uint64_t ROOT = importCall[0];
  struct Case {
    const char* what;
    Frame frame;
  };
  const std::vector<Case> cases = {
      {"no words", {}},
      {"a truncated frame", Frame(importCall.begin(), importCall.begin() + 8)},
      {"a far root", with(importCall, 0, 2 | (1u << 3))},
      {"a null root", with(importCall, 0, 0)},
      {"a Message without data", with(importCall, 0, ROOT & ~(uint64_t{0xffff} << 32))},
      {"a root past the end", with(importCall, 0, ROOT | (uint64_t{100} << 2))},
      {"an abort", build([](rpc::wire::Message::Builder m) { m.initAbort().setReason("x"); })},
      {"a resolve", resolve(3, Resolution::BROKEN)},
      {"a provide", provide(2, 1, 3, 1)},
      {"a Call with one data word",
       with(importCall, 2, (importCall[2] & ~(uint64_t{0xffff} << 32)) | (uint64_t{1} << 32))},
      {"a null target", with(importCall, 5, 0)},
      {"a target that is a list", with(importCall, 5, 1 | (uint64_t{1} << 2) | (3ull << 32))},
      {"a target of an unknown kind", with(importCall, 7, importCall[7] | (uint64_t{2} << 32))},
      {"a transform of 32-bit elements",
       with(answerCall, 10, (answerCall[10] & ~(7ull << 32)) | (4ull << 32))},
      {"a transform past the end", with(answerCall, 10, answerCall[10] | (uint64_t{40} << 2))},
      {"params with content", call(1, 0, 0)},
      {"params with a cap table", withCap(1, 0, true, 1)},
      {"a Return with an exception", build([](rpc::wire::Message::Builder m) {
         m.initReturn().initException().setReason("no");
       })},
      {"a Return of an unknown kind", with(emptyReturn, 3, emptyReturn[3] | (uint64_t{7} << 32))},
      {"a Finish that is a list", with(finish(1), 2, 1 | (1ull << 32))},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    EXPECT_FALSE(takes(c.frame));
  }
  Frame longPath = answerCall;  // a transform longer than MAX_PIPELINE_PATH: decode says why
  longPath[10] =
      (longPath[10] & ((uint64_t{1} << 35) - 1)) | (uint64_t{rpc::MAX_PIPELINE_PATH + 1} << 35);
  longPath.push_back(0);
  longPath.push_back(0);
  EXPECT_FALSE(takes(longPath));
}

TEST(RpcFuzzTest, RawWordWalkTakesEveryRpcFrameAndNeverMoreThanTheGetterWalk) {
  // RPC frames (every seed frame, then mutants) under the RPC receiver's limits: the raw-word
  // walk in FrameReader validates all the valid ones itself, and accepts no mutant that the walk
  // through Cap'n Proto's getters refuses.
  const ReadLimits limits = rpc::rpcReceiverOptions().limits;
  auto check = [&](const Frame& f) {
    const kj::ArrayPtr<const capnp::word> segment(reinterpret_cast<const capnp::word*>(f.data()),
                                                  f.size());
    const bool fast = FrameReader::fastAccepts(segment, limits);
    const bool generic = FrameReader::validateWithGetters(segment, limits).ok();
    EXPECT_TRUE(!fast || generic);
    return fast;
  };
  const std::vector<Conversation> base = seeds();
  for (const Conversation& c : base) {
    for (const Frame& f : c) EXPECT_TRUE(check(f));
  }
  std::mt19937_64 rng(0x5eed'fa57'0002ull);
  int fast = 0;
#if defined(__SANITIZE_THREAD__)
  constexpr int INPUTS = 1'000;  // every refused frame throws, which TSan makes ~100x slower
#elif defined(__SANITIZE_ADDRESS__)
  constexpr int INPUTS = 5'000;
#else
  constexpr int INPUTS = 20'000;
#endif
  for (int i = 0; i < INPUTS; ++i) {
    for (const Frame& f : mutate(base[static_cast<size_t>(rng() % base.size())], rng))
      fast += check(f);
  }
  EXPECT_GT(fast, INPUTS);  // most frames of most mutated conversations are still well formed
}

}  // namespace
}  // namespace agate::fuzz
