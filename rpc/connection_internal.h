// Private to rpc/: the connection's table entries, pooled buffers and protocol constants, shared
// by its source files (connection.cpp: life cycle, exports, imports, questions; outbound.cpp:
// frames, spill queue, pump; inbound.cpp: read, decode, Return; answers.cpp: calls served and
// pipelining; handles.cpp: RemoteCap, Request, RemotePromise, Response, CallContext).
#pragma once

#include <algorithm>
#include <array>
#include <cstring>
#include <optional>
#include <typeinfo>
#include <unordered_map>

#include "agate/rpc/connection.h"
#include "pointer_words.h"

namespace agate::rpc {

namespace internal {

inline constexpr uint32_t NONE = 0xffff'ffffu;

// Envelope bytes around params or results content: the Message and Call/Return structs, the
// target with its path and a cap table of up to ENVELOPE_CAPS entries (each up to 16 bytes, and
// 32 more for a receiverAnswer's PromisedAnswer and its path). Generous; frames commit only what
// they use. A larger table gets its room when it is written (RpcConnection::roomForCapTable: the
// message moves to a spill buffer of the size it needs), so the frame every call reserves stays
// this size whatever RpcOptions::maxCapsPerMessage allows.
inline constexpr uint32_t ENVELOPE_CAPS = 16;
inline constexpr size_t CAP_ENTRY_BYTES = 16 + 32;  // at most, per entry
inline constexpr size_t ENVELOPE_BYTES = 64 * 8 + ENVELOPE_CAPS * CAP_ENTRY_BYTES;
inline constexpr size_t CONTROL_BYTES = 64;  // Finish, Release
inline constexpr size_t EXCEPTION_BYTES =
    64 * 8;  // a Return or Abort with an exception and its reason
inline constexpr size_t MAX_REASON_ON_WIRE = 120;  // reason text bytes written into an Exception
inline constexpr size_t HANDOFF_BYTES = 256;       // a Provide or an Accept
inline constexpr size_t RESOLVE_BYTES = 64 * 8;    // a Resolve with a cap or an exception
inline constexpr size_t DISEMBARGO_BYTES = 128;

// An error kept by something that serves it again later (an answer, to the calls pipelined on
// it; a promise, to the calls made on it): its text is copied in. An Error's detail may point
// into another connection's ring of remote reasons (REMOTE_REASON_SLOTS), whose slots are
// rewritten by that connection's later errors and freed with it: kept as a pointer, a later
// Return would carry another caller's text, or read freed memory.
class KeptError {
 public:
  KeptError() = default;
  KeptError& operator=(const Error& e) noexcept {
    code_ = e.code;
    sysErrno_ = e.sysErrno;
    const size_t n = e.detail != nullptr ? strnlen(e.detail, MAX_REASON_ON_WIRE) : 0;
    if (n != 0) std::memcpy(text_.data(), e.detail, n);
    text_[n] = '\0';
    return *this;
  }
  // No error (an answer slot taken again): only what get() reads is reset.
  void clear() noexcept {
    code_ = Errc::OK;
    sysErrno_ = 0;
    text_[0] = '\0';
  }
  // Points into this object: valid while it lives and keeps this error.
  Error get() const noexcept { return Error(code_, sysErrno_, text_.data()); }
  Errc code() const noexcept { return code_; }

 private:
  Errc code_ = Errc::OK;
  int32_t sysErrno_ = 0;
  std::array<char, MAX_REASON_ON_WIRE + 1> text_{};
};

// Finish and Release are one-word structs (Finish {questionId, releaseResultCaps}, Release {id,
// referenceCount}), so the whole message is four words, written directly rather than through a
// MessageBuilder (setting one up costs more than the message): the root pointer, the Message
// struct (its union discriminant in the first 16 bits, then its one pointer) and the body
// struct. The layout is exactly what Cap'n Proto's builder writes for the same message
// (rpc_hot_path_test compares the bytes).
inline constexpr size_t CONTROL_WORDS = 4;
inline std::array<uint64_t, CONTROL_WORDS> controlWords(wire::Message::Which which, uint64_t body) {
  static_assert(wire::Message::_capnpPrivate::dataWordSize == 1 &&
                wire::Message::_capnpPrivate::pointerCount == 1);
  static_assert(wire::Finish::_capnpPrivate::dataWordSize == 1 &&
                wire::Finish::_capnpPrivate::pointerCount == 0);
  static_assert(wire::Release::_capnpPrivate::dataWordSize == 1 &&
                wire::Release::_capnpPrivate::pointerCount == 0);
  return {words::structPointer(0, 1, 1),  // word 0: the root, the Message at word 1
          static_cast<uint64_t>(which),
          words::structPointer(0, 1, 0),  // word 2: the body at word 3
          body};
}

// A Return with empty results and no capabilities (a call whose server never asked for
// results), written the same way: the root, the Message, its pointer to the Return, the Return's
// data word (answerId, then its union's discriminant in bits 32..47, noFinishNeeded in bit 48)
// and pointer, and the Payload with its two pointers null. Word for word what the builder writes
// (rpc_hot_path_test).
inline constexpr size_t EMPTY_RETURN_WORDS = 7;
inline constexpr uint32_t NO_FINISH_NEEDED_BIT = 48;     // Return.noFinishNeeded in the data word
inline constexpr uint32_t NO_PIPELINING_BIT = 48;        // Call.noPromisePipelining in data word 0
inline constexpr uint32_t RELEASE_RESULT_CAPS_BIT = 32;  // Finish.releaseResultCaps
inline std::array<uint64_t, EMPTY_RETURN_WORDS> emptyReturnWords(uint32_t answerId,
                                                                 bool noFinishNeeded) {
  static_assert(wire::Return::_capnpPrivate::dataWordSize == 1 &&
                wire::Return::_capnpPrivate::pointerCount == 1);
  static_assert(wire::Payload::_capnpPrivate::dataWordSize == 0 &&
                wire::Payload::_capnpPrivate::pointerCount == 2);
  return {words::structPointer(0, 1, 1),  // word 0: the root, the Message at word 1
          static_cast<uint64_t>(wire::Message::RETURN),
          words::structPointer(0, 1, 1),  // word 2: the Return at word 3
          answerId | uint64_t{wire::Return::RESULTS} << 32 |
              uint64_t{noFinishNeeded} << NO_FINISH_NEEDED_BIT,
          words::structPointer(0, 0, 2),  // word 4: the Payload at word 5
          0,
          0};
}

// A Call with no params and no capabilities (neither params() nor addCap used, so the Call was
// never built; see Request), written the same way, in the builder's order: the root, the
// Message and its pointer, the Call (questionId, methodId and noPromisePipelining in bit 48,
// interfaceId, pointers to the
// target and to the params, which stays null), the MessageTarget (importedCap, or the
// discriminant of promisedAnswer and its pointer), then the PromisedAnswer and its transform
// list of 16-bit pointer-field indices. Word for word what the builder writes
// (rpc_hot_path_test). Returns the number of words.
inline constexpr size_t MAX_EMPTY_CALL_WORDS = 11 + (MAX_PIPELINE_PATH + 3) / 4;
inline size_t emptyCallWords(std::array<uint64_t, MAX_EMPTY_CALL_WORDS>& w, uint32_t questionId,
                             uint64_t interfaceId, uint16_t methodId, bool noPipelining,
                             bool toAnswer, uint32_t targetId, std::span<const uint16_t> path) {
  static_assert(wire::Call::_capnpPrivate::dataWordSize == 2 &&
                wire::Call::_capnpPrivate::pointerCount == 2);
  static_assert(wire::MessageTarget::_capnpPrivate::dataWordSize == 1 &&
                wire::MessageTarget::_capnpPrivate::pointerCount == 1);
  static_assert(wire::PromisedAnswer::_capnpPrivate::dataWordSize == 1 &&
                wire::PromisedAnswer::_capnpPrivate::pointerCount == 1);
  w[0] = words::structPointer(0, 1, 1);  // the Message at word 1
  w[1] = static_cast<uint64_t>(wire::Message::CALL);
  w[2] = words::structPointer(0, 2, 2);  // the Call at word 3
  w[3] = questionId | uint64_t{methodId} << 32 | uint64_t{noPipelining} << NO_PIPELINING_BIT;
  w[4] = interfaceId;
  w[5] = words::structPointer(1, 1, 1);  // the MessageTarget at word 7
  w[6] = 0;                              // params: none
  if (!toAnswer) {
    w[7] = targetId | uint64_t{wire::MessageTarget::IMPORTED_CAP} << 32;
    w[8] = 0;
    return 9;
  }
  w[7] = uint64_t{wire::MessageTarget::PROMISED_ANSWER} << 32;
  w[8] = words::structPointer(0, 1, 1);  // the PromisedAnswer at word 9
  w[9] = targetId;
  w[10] = words::twoByteListPointer(path.size());  // the transform at word 11
  const size_t pathWords = (path.size() + 3) / 4;
  for (size_t i = 0; i < pathWords; ++i) w[11 + i] = 0;
  for (size_t i = 0; i < path.size(); ++i) w[11 + i / 4] |= uint64_t{path[i]} << (16 * (i % 4));
  return 11 + pathWords;
}

// The bytes a cap table takes in its message: the list's tag, its entries and what they point
// to (a receiverAnswer's PromisedAnswer and path, a thirdPartyHosted descriptor). Exact but for
// the path, counted at its longest.
inline size_t capTableBytes(const detail::CapTable& caps) {
  using Entry = wire::CapDescriptor::_capnpPrivate;
  using Answer = wire::PromisedAnswer::_capnpPrivate;
  using Third = wire::ThirdPartyCapDescriptor::_capnpPrivate;
  size_t words = 1 + size_t{caps.size()} * (Entry::dataWordSize + Entry::pointerCount);
  for (uint32_t i = 0; i < caps.size(); ++i) {
    if (caps[i].kind == detail::CapEntry::Kind::RECEIVER_ANSWER)
      words += Answer::dataWordSize + Answer::pointerCount + (MAX_PIPELINE_PATH + 3) / 4;
    if (caps[i].kind == detail::CapEntry::Kind::THIRD_PARTY ||
        caps[i].kind == detail::CapEntry::Kind::FOREIGN)  // may become THIRD_PARTY
      words += Third::dataWordSize + Third::pointerCount;
  }
  return words * WORD_BYTES;
}
static_assert(wire::CapDescriptor::_capnpPrivate::dataWordSize +
                      wire::CapDescriptor::_capnpPrivate::pointerCount +
                      wire::PromisedAnswer::_capnpPrivate::dataWordSize +
                      wire::PromisedAnswer::_capnpPrivate::pointerCount +
                      (MAX_PIPELINE_PATH + 3) / 4 <=
                  CAP_ENTRY_BYTES / WORD_BYTES,
              "CAP_ENTRY_BYTES covers an entry");

// Spill buffers come in size classes of 2^(k + MIN_CLASS_SHIFT) bytes, SPILL_CLASSES of them.
inline constexpr size_t MIN_CLASS_SHIFT = 7;
inline constexpr size_t SPILL_CLASSES = 16;
inline constexpr size_t MAX_SPILL_BYTES = size_t{1} << (SPILL_CLASSES - 1 + MIN_CLASS_SHIFT);

inline size_t roundToWords(size_t bytes) {
  return (bytes + WORD_BYTES - 1) / WORD_BYTES * WORD_BYTES;
}

inline uint32_t sizeClassFor(size_t bytes) {
  uint32_t k = 0;
  while ((size_t{1} << (k + MIN_CLASS_SHIFT)) < bytes) ++k;
  return k;
}

// The Errc a remote exception names; values this side does not know read as FAILED.
inline Errc errcFromWire(uint16_t value) {
  if (value == 0 || value > static_cast<uint16_t>(Errc::WRONG_TYPE)) return Errc::FAILED;
  return static_cast<Errc>(value);
}

inline wire::Exception::Type typeFor(Errc c) {
  switch (c) {
    case Errc::DISCONNECTED:
      return wire::Exception::Type::DISCONNECTED;
    case Errc::OUT_OF_MEMORY:
    case Errc::QUOTA_EXCEEDED:
    case Errc::WOULD_BLOCK:
      return wire::Exception::Type::OVERLOADED;
    case Errc::UNSUPPORTED:
      return wire::Exception::Type::UNIMPLEMENTED;
    default:
      return wire::Exception::Type::FAILED;
  }
}

// Cap-table kinds that name an export of the writer (an object, or a handoff's vine).
inline bool isExported(detail::CapEntry::Kind k) {
  return k == detail::CapEntry::Kind::SENDER_HOSTED || k == detail::CapEntry::Kind::THIRD_PARTY ||
         k == detail::CapEntry::Kind::SENDER_PROMISE;
}

// Cap-table kinds that give the reader an import (one more reference to release).
inline bool isImported(detail::CapEntry::Kind k) {
  return k == detail::CapEntry::Kind::SENDER_HOSTED || k == detail::CapEntry::Kind::SENDER_PROMISE;
}

// A ServerObject that forwards every call to `target` (a capability of any connection), copying
// params and results with their capabilities (handoff.cpp).
std::unique_ptr<ServerObject> makeForwarder(RemoteCap target);

// The cap-table index at pointer-field `path` of a payload's content (see PromisedAnswer).
// Reads a private copy made by this side, inside a try (the copy is trusted, the path is not).
inline Result<uint32_t> capIndexAtPath(capnp::AnyStruct::Reader payload,
                                       std::span<const uint16_t> path) {
  try {
    capnp::AnyStruct::Reader s = payload;
    uint16_t field = 0;  // Payload.content
    for (uint16_t step : path) {
      capnp::List<capnp::AnyPointer>::Reader pointers = s.getPointerSection();
      if (field >= pointers.size() || !pointers[field].isStruct())
        return Error(Errc::FAILED, "pipeline path does not lead through structs");
      s = pointers[field].getAs<capnp::AnyStruct>();
      field = step;
    }
    Result<uint32_t> index = readCapPointer(s, field);
    if (!index) return Error(Errc::FAILED, "pipeline path does not end at a capability");
    return index;
  } catch (const kj::Exception&) {
    return Error(Errc::FAILED, "pipeline path does not match the results");
  }
}

// capIndexAtPath over the Return this side built for an answer (Answer::results), read from its
// words rather than through a reader made for it: the same index, or the same error. The words
// are trusted (a finished FrameBuilder message: one segment, so no far pointer; the root a
// Message holding a Return with results); the path is the peer's, so every step is checked
// against the pointer counts and every word read against the end.
class OwnResults {
 public:
  explicit OwnResults(std::span<const uint64_t> words) noexcept : words_(words) {}

  Result<uint32_t> capIndexAt(std::span<const uint16_t> path) const noexcept {
    Struct s;
    // Message.return, Return.results: pointer 0 of each (their union's member, as written).
    AGATE_ASSERT(structAt(0, s) && structAt(s.pointers, s) && structAt(s.pointers, s),
                 "a Return this side built does not read as one");
    uint16_t field = 0;  // Payload.content
    for (uint16_t step : path) {
      if (field >= s.pointerCount || !structAt(s.pointers + field, s))
        return Error(Errc::FAILED, "pipeline path does not lead through structs");
      field = step;
    }
    // As readCapPointer: a capability pointer in field `field`.
    if (field >= s.pointerCount)
      return Error(Errc::FAILED, "pipeline path does not end at a capability");
    const uint64_t p = words_[s.pointers + field];
    if (!words::isCapability(p))
      return Error(Errc::FAILED, "pipeline path does not end at a capability");
    return words::capabilityIndex(p);
  }

 private:
  struct Struct {
    size_t pointers = 0;  // index of the first pointer
    uint64_t pointerCount = 0;
  };
  // The struct the pointer at word `at` designates: false when it is null or not a struct
  // pointer (a list, a capability), as AnyPointer::isStruct() reads it.
  bool structAt(size_t at, Struct& s) const noexcept {
    if (at >= words_.size()) return false;
    const uint64_t p = words_[at];
    if (!words::isStruct(p)) return false;
    const int64_t target = words::targetOf(p, at);
    const uint64_t data = words::structDataWords(p);
    const uint64_t pointers = words::structPointerCount(p);
    AGATE_ASSERT(words::inside(target, data + pointers, words_.size()),
                 "a struct of our own results lies outside them");
    s.pointers = static_cast<size_t>(target) + data;
    s.pointerCount = pointers;
    return true;
  }

  std::span<const uint64_t> words_;
};

// Payload.content of a payload struct; a null pointer when the struct has no pointer section
// (an empty or older-schema payload: reads as empty content).
inline capnp::AnyPointer::Reader contentOf(capnp::AnyStruct::Reader payload) {
  capnp::List<capnp::AnyPointer>::Reader pointers = payload.getPointerSection();
  if (pointers.size() == 0) return capnp::AnyPointer::Reader();
  return pointers[0];
}

}  // namespace internal

namespace detail {

// A pooled buffer for a message built outside the ring (or a private copy of one). Allocated
// once per pool miss and reused; its memory is zero outside [0, dirtyBytes).
struct SpillBuffer {
  std::unique_ptr<capnp::word[]> words;
  uint32_t sizeClass = 0;
  std::optional<FrameBuilder> builder;
  size_t usedBytes = 0;   // the message's length once finished
  size_t dirtyBytes = 0;  // prefix to zero again before reuse
  SpillBuffer* next = nullptr;
  std::span<const std::byte> bytes() const {
    return {reinterpret_cast<const std::byte*>(words.get()), usedBytes};
  }
  size_t capacity() const noexcept { return size_t{1} << (sizeClass + internal::MIN_CLASS_SHIFT); }
};

// Where a Response's message lives: the inbound frame (in place) or a private copy.
struct ResponseSlot {
  explicit ResponseSlot(const ReadLimits& limits) : reader(limits) {}
  std::optional<IncomingMessage> inPlace;
  SpillBuffer* copy = nullptr;
  FrameReader reader;  // decodes `copy`
  capnp::AnyStruct::Reader payload;
  capnp::List<wire::CapDescriptor>::Reader caps;
  // thirdPartyHosted entries: the capability on the host's connection (pipelined on the Accept),
  // by cap-table index. Sized only for results that carry one; the slot is pooled, so it grows
  // once to the largest such table and is reused.
  std::vector<RemoteCap> handedOff;
  ResponseSlot* nextFree = nullptr;
};

// The object behind a CapPromise, exported as senderPromise (promises.cpp). Owned jointly by the
// CapPromise handle and the exports of it. Until it settles the connection queues the calls
// that reach it (they never reach dispatch); afterwards dispatch() hands each call to the
// resolution synchronously (so calls keep their arrival order) or fails it.
class PromiseNode final : public ServerObject {
 public:
  enum class State : uint8_t { PENDING, RESOLVED, BROKEN };
  explicit PromiseNode(RpcConnection& conn) noexcept : conn_(&conn) {}
  Promise<void> dispatch(uint64_t interfaceId, uint16_t methodId, CallContext& context) override;
  bool pending() const noexcept { return state_ == State::PENDING; }
  // `object` as a promise still pending (one passed back to us: ReceivedCap::local), or null.
  static PromiseNode* pendingOne(ServerObject& object) noexcept {
    if (typeid(object) != typeid(PromiseNode)) return nullptr;
    auto& node = static_cast<PromiseNode&>(object);
    return node.pending() ? &node : nullptr;
  }

 private:
  friend class agate::rpc::RpcConnection;
  friend class agate::rpc::CapPromise;
  RpcConnection* conn_;  // not owned; outlives the node's handle (checked)
  State state_ = State::PENDING;
  internal::KeptError error_;            // BROKEN
  ServerObject* target_ = nullptr;       // RESOLVED: who gets the calls (maybe a forwarder)
  std::shared_ptr<ServerObject> owner_;  // RESOLVED: the target when the promise owns it
  // RESOLVED to an import of conn_ itself: announced as receiverHosted(importId_).
  bool toReceiver_ = false;
  uint32_t importId_ = 0;
  // PENDING on a call in flight on another connection (a pipelined capability, `awaiting_`):
  // calls are not queued but sent on at once through `forward_`, in arrival order; the answer's
  // Return settles the node (RpcConnection::settleWatchers). Null otherwise.
  std::unique_ptr<ServerObject> forward_;
  RemoteCap awaiting_;
  // RESOLVED to a plain import of another connection that may be handed off to conn_'s peer
  // (the Resolve goes as thirdPartyHosted, see schemas/rpc.capnp "Embargoes").
  RemoteCap handOff_;
  // After that Resolve went out: the Provide's question, held until the peer's Disembargo
  // {accept} is answered with Disembargo {provide} (or the node goes).
  RemoteCap provide_;
};

// A vat's handoff state, shared by its connections (VatNetwork::handoffs()). Threading: the
// network's loop thread.
class HandoffTable {
 public:
  struct Key {
    VatId introducer;
    uint64_t provisionId;
    bool operator==(const Key&) const = default;
  };
  struct KeyHash {
    size_t operator()(const Key& k) const noexcept {
      return std::hash<uint64_t>()(k.introducer * 0x9e3779b97f4a7c15ull ^ k.provisionId);
    }
  };
  // An object kept for a recipient: the Provide's answer on the introducer's connection holds
  // a pin on the export until the provision is accepted or reclaimed.
  struct Provision {
    RpcConnection* provider = nullptr;  // the introducer's connection to this vat
    uint32_t answerId = 0;              // the Provide's answer there
    VatId recipient = NO_VAT;
    bool disembargoed = false;  // the introducer's Disembargo {provide} arrived
  };
  struct Waiting {
    Key key;
    RpcConnection* conn = nullptr;  // the recipient's connection to this vat
    uint32_t answerId = 0;          // the Accept's answer there
    // An embargoed Accept that matched its provision and waits for the introducer's
    // Disembargo (else: an Accept waiting for its Provide).
    bool embargoed = false;
    // An Accept that matched its provision and waits for the calls queued on the provided
    // export at the introducer's connection (Export::acceptAfterQueue).
    bool queued = false;
  };

  uint64_t nextProvisionId() noexcept { return ++lastProvisionId_; }

  std::unordered_map<Key, Provision, KeyHash> provisions;
  std::unordered_map<VatId, uint64_t> highestProvision;   // by introducer: the last Provide's id
  std::unordered_map<VatId, RpcConnection*> connections;  // open connections by peer vat
  std::vector<Waiting> waiting;                           // Accepts before their Provide

 private:
  uint64_t lastProvisionId_ = 0;
};

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Table entries

// A message held for reply space (RpcOptions::whenReplySpaceIsFull): a call (never one carrying
// capabilities), with the reference to its target the Request held until its Call is out, or a
// Disembargo held behind calls, with references to the import it names and its Provide's
// question.
struct RpcConnection::HeldMessage {
  detail::SpillBuffer* buffer = nullptr;  // the finished message; null once dropped
  uint32_t questionId = 0;                // a call's question; 0 for the others
  size_t bytes = 0;                       // what it counts in heldBytes_ (heldSize)
  uint32_t replyReserve = 0;              // reserved when it goes
  bool holdsTarget = false;               // as Request::holdsTarget_
  bool toAnswer = false;
  uint32_t targetId = 0;
  uint32_t provideQuestion = internal::NONE;  // a Disembargo {provide}'s question, referenced
  // A call's capabilities, written into its cap table as it goes (writeHeldCaps).
  std::optional<detail::CapTable> caps;
  bool settled = false;   // its foreign capabilities were settled (settleForeignCaps)
  TimePoint heldSince{};  // a call's: when it was held (RpcOptions::maxHoldTime)
};

struct RpcConnection::Question {
  std::optional<Fulfiller<Response>> fulfiller;  // until the Return (or the connection's end)
  uint32_t refs = 0;  // the RemotePromise and every RemoteCap pipelined on it
  uint32_t nextFree = internal::NONE;
  bool inUse = false;
  bool returned = false;      // Return received (or the connection ended)
  bool finishSent = false;    // Finish sent (or never to be sent: the connection ended)
  bool noPipelining = false;  // sent with Call.noPromisePipelining
  // Calls were sent pipelined on it: a capability its Return hands off to a third vat is taken
  // with an embargo, lifted once the introducer forwarded them (a Disembargo through the vine).
  bool pipelinedOn = false;
  // Its Finish went before the Return, with releaseResultCaps: the Return's references are the
  // callee's to drop, none is taken here.
  bool resultsReleased = false;
  bool held = false;  // its Call is held for reply space (RpcConnection::held_)
  std::list<HeldMessage>::iterator heldAt;  // while held: its Call in held_
  uint32_t replyReserved = 0;  // reply space held until the Return (RpcOptions::replyBytesPerCall)
  // Its Return carried more capabilities than this side takes (Decoded::refused): calls on
  // capabilities pipelined on it fail here with this error from then on (the peer would serve
  // them from the results this side refused).
  Error refused{};
  // Bumped each time the entry is freed: a RemotePromise whose question was freed under it (at
  // a Return with noFinishNeeded) sees another generation and leaves the entry alone.
  uint64_t generation = 0;  // 64 bits: never wraps in practice
  // An Accept: the vine (an import on the introducer's connection) kept until the Return.
  std::optional<RemoteCap> vine;
};

struct RpcConnection::Answer {
  enum class State : uint8_t { FREE, QUEUED, RUNNING, RETURNED };
  explicit Answer(uint32_t answerId) : id(answerId) {}

  const uint32_t id;
  State state = State::FREE;
  bool finishReceived = false;
  // The Finish had releaseResultCaps: the references the Return's cap table gives are dropped
  // here once both have happened (dropReleasedResults).
  bool releaseResultCaps = false;
  bool inWorklist = false;
  bool noPipelining = false;  // the Call had noPromisePipelining: freed at its Return
  // RpcOptions::budget could not pay for this entry: a call reusing it pays first (answerAt).
  bool unpaid = false;
  // FREE after a Return with noFinishNeeded that no Finish preceded: one Finish may still be on
  // its way (the caller dropped its promise as the Return crossed) and is ignored. Cleared by
  // that Finish or by the next Call with this id (which the caller sends only after the Return,
  // so behind any such Finish).
  bool finishMayCross = false;
  CallContext context;
  // RUNNING: drive() over the object's dispatch. An answer freed at its Return (noFinishNeeded)
  // from inside drive() keeps the finished driver until the id is used again (destroying it
  // there would destroy the running coroutine).
  std::optional<Promise<void>> driver;
  uint32_t pinnedExport = internal::NONE;  // the export being called, pinned while RUNNING
  // QUEUED on a pending promise export (pinned meanwhile) instead of an answer.
  uint32_t waitingOnExport = internal::NONE;
  // Exports passed back in params, pinned while the call runs. Like the vectors below, kept with
  // its capacity when the answer is freed: the entry is reused for the next call with its id.
  std::vector<uint32_t> paramPins;
  // The params' receiverAnswer entries whose answer had not returned when this call arrived:
  // the cap slot and path, resolved into context.paramCaps_ as soon as that answer returns.
  // `waiter`: the entry's place in that answer's paramWaiters. paramWaits counts the pending
  // ones; the call is not delivered before it is 0.
  struct ParamAnswer {
    uint32_t answerId = 0;
    uint32_t waiter = 0;
    uint32_t slot = 0;
    uint8_t pathLength = 0;
    bool pending = false;
    std::array<uint16_t, MAX_PIPELINE_PATH> path{};
  };
  std::vector<ParamAnswer> paramAnswers;
  uint32_t paramWaits = 0;
  // The pending entries of other calls that name this answer: {call's answer id, entry index}.
  // While there are any, a Finish does not cancel this answer.
  std::vector<std::pair<uint32_t, uint32_t>> paramWaiters;
  // Arrival order of calls (a connection-wide count): an export's queue is kept in this order.
  uint64_t arrival = 0;

  // QUEUED: a private copy of the Call and the answer it waits on, with the path.
  detail::SpillBuffer* queuedCall = nullptr;
  Answer* waitingOn = nullptr;
  Answer* nextInQueue = nullptr;
  // Calls pipelined on this answer that wait for it to return, in arrival order.
  Answer* queueHead = nullptr;
  Answer* queueTail = nullptr;

  // RETURNED: the outcome, for calls pipelined on it. A private copy of the Return when its
  // results carried capabilities, and what each cap-table entry named (pinned exports).
  internal::KeptError error;
  detail::SpillBuffer* results = nullptr;
  struct ResultCap {
    detail::CapEntry::Kind kind{};
    uint32_t id = 0;
  };
  std::vector<ResultCap> resultCaps;

  // A Provide (from the introducer): the provision's key in the vat's HandoffTable while it is
  // there (pinnedExport pins the provided export meanwhile).
  bool providing = false;
  // An Accept waiting for its Provide or its embargo (an entry of HandoffTable::waiting).
  bool waitingForProvide = false;
  detail::HandoffTable::Key provision{};
  bool embargo = false;                      // an Accept with Accept.embargo set
  bool isProvide = false;                    // a Provide (answered later by a Disembargo {provide})
  bool disembargoed = false;                 // a Provide whose Disembargo arrived
  uint32_t providedExport = internal::NONE;  // a Provide: its target
};

// The answer entries' vectors (paramPins, resultCaps, paramAnswers) keep their capacity when an
// entry is reused, so a call of a few capabilities allocates nothing; one grown past
// KEPT_ANSWER_ENTRIES goes to a small pool of the connection instead (SPARE_ANSWER_VECTORS of
// each kind), which the next large call takes from. A steady state of large calls allocates
// nothing, and a peer cannot make every one of maxAnswers entries hold a bound's worth.
inline constexpr size_t KEPT_ANSWER_ENTRIES = 16;
inline constexpr size_t SPARE_ANSWER_VECTORS = 8;

template <class T>
class VectorPool {
 public:
  VectorPool() { spares_.reserve(SPARE_ANSWER_VECTORS); }
  // Empties `v`; past KEPT_ANSWER_ENTRIES its storage goes to the pool (or is freed when the
  // pool is full).
  void retire(std::vector<T>& v) noexcept {
    v.clear();
    if (v.capacity() <= KEPT_ANSWER_ENTRIES) return;
    if (spares_.size() < SPARE_ANSWER_VECTORS) spares_.push_back(std::move(v));  // reserved
    std::vector<T>().swap(v);
  }
  // Appends `x` to `v`, moving `v` into a pooled vector first when it is full and one is there.
  void push(std::vector<T>& v, const T& x) {
    if (v.size() == v.capacity() && !spares_.empty() && spares_.back().capacity() > v.size()) {
      std::vector<T> pooled = std::move(spares_.back());
      spares_.pop_back();
      pooled.assign(v.begin(), v.end());
      v.swap(pooled);
    }
    v.push_back(x);
  }
  size_t spares() const noexcept { return spares_.size(); }

 private:
  std::vector<std::vector<T>> spares_;
};

// Empties `v`, giving its storage back when it grew past KEPT_ANSWER_ENTRIES (for vectors that
// only calls naming a pending answer fill: rare enough to allocate again).
template <class T>
void releaseIfLarge(std::vector<T>& v) noexcept {
  if (v.capacity() > KEPT_ANSWER_ENTRIES) {
    std::vector<T>().swap(v);
  } else {
    v.clear();
  }
}

struct RpcConnection::AnswerPools {
  VectorPool<uint32_t> pins;
  VectorPool<Answer::ResultCap> results;
  VectorPool<Answer::ParamAnswer> paramAnswers;
};

struct RpcConnection::Export {
  ServerObject* object = nullptr;
  std::unique_ptr<ServerObject> owned;
  std::shared_ptr<ServerObject> shared;  // instead of `owned` once the object was handed off
  uint32_t remoteRefs = 0;  // references the peer holds (cap-table entries minus Releases)
  uint32_t pins = 0;        // running calls on it, answers whose results name it
  uint32_t nextFree = internal::NONE;
  bool inUse = false;
  bool promise = false;  // `object` is a PromiseNode (sent as senderPromise)
  // A promise the peer was told of (senderPromise) and not yet told the resolution of (the
  // Resolve has not gone): until it goes, every message names the export as senderPromise,
  // settled or not, else the peer would read a pending promise sent as a plain capability.
  bool resolvePending = false;
  // The promise settled while calls still waited in its queue (for answers their params name):
  // its Resolve goes out once the queue is empty, so no call made on the resolution overtakes
  // them (drainExport).
  bool resolveAfterQueue = false;
  // The recipient's Disembargo {accept} came while calls still waited in the queue: the
  // provider's Disembargo goes once they went on (drainExport, forwardDisembargo).
  bool disembargoAfterQueue = false;
  // A provision of this export (a Provide from this peer) was matched by an Accept while calls
  // of this peer still waited in the queue: the Accept completes once they went on
  // (drainExport, acceptsBehindQueue), so the recipient's calls do not overtake them.
  bool acceptAfterQueue = false;
  // Calls that must wait here, in arrival order: they reached a promise before it settled, or
  // wait for answers their params name (receiverAnswer), or arrived behind such calls.
  Answer* queueHead = nullptr;
  Answer* queueTail = nullptr;
};

struct RpcConnection::Import {
  uint32_t remoteRefs = 0;  // times the peer sent this id since our last Release
  uint32_t localRefs = 0;   // RemoteCaps and Responses holding it
  // Received as senderPromise and no Resolve for it yet (kept across our Release: a Resolve
  // may cross it; cleared by the Resolve or by the id coming again as senderHosted).
  bool promise = false;
  // After a Resolve, while we hold references: calls go to this import instead (one local
  // reference held on it; a plain import, never itself resolved), or fail with `broken`.
  uint32_t resolvedTo = internal::NONE;
  Error broken{};  // its text in `brokenText` (setBroken)
  // The import's own copy of the reason: a remote reason's text lives in a ring of the
  // connection's that later errors reuse. Allocated the first time the import breaks.
  std::unique_ptr<internal::KeptError> brokenText;
  void setBroken(const Error& e) {
    if (!brokenText) brokenText = std::make_unique<internal::KeptError>();
    *brokenText = e;
    broken = brokenText->get();
  }
  // After a Resolve to a third party's capability: calls go to this reference on the host's
  // connection instead (pipelined on the Accept), even once this connection is dead.
  std::unique_ptr<RemoteCap> elsewhere;
};

// Everything handleMessage needs, read once inside the decode boundary. Built on the stack for
// every inbound message; the per-entry arrays point into the connection's detail::CapScratch
// (RpcConnection::scratchFor sets them), and decode writes entry i before anything reads it
// (i < capCount, i < pathLength; resolveHosts sets capHosts[i] and, when it is null,
// capHostErrors[i]).
struct RpcConnection::DecodedCap {
  detail::CapEntry::Kind kind = detail::CapEntry::Kind::NONE;
  uint32_t id = 0;         // the export, import, vine or answer id the entry names
  VatId vat = NO_VAT;      // THIRD_PARTY: the host
  uint64_t provision = 0;  // THIRD_PARTY
};

struct RpcConnection::Decoded {
  wire::Message::Which which{};
  uint32_t id = 0;     // call: question id; return: answer id; finish; release: export id
  uint32_t count = 0;  // release
  bool targetIsAnswer = false;
  uint32_t targetId = 0;
  std::array<uint16_t, MAX_PIPELINE_PATH> path;
  uint32_t pathLength = 0;
  uint64_t interfaceId = 0;
  uint16_t methodId = 0;
  bool noPipelining = false;  // call: Call.noPromisePipelining
  wire::Return::Which returnKind{};
  bool noFinishNeeded = false;     // return: Return.noFinishNeeded
  bool releaseResultCaps = false;  // finish: Finish.releaseResultCaps
  capnp::AnyStruct::Reader payload;
  capnp::List<wire::CapDescriptor>::Reader caps;
  detail::CapEntry::Kind* capKinds = nullptr;
  uint32_t* capIds = nullptr;
  uint32_t capCount = 0;
  wire::Exception::Reader exception;
  // thirdPartyHosted entries (capIds holds the vine) and, once resolveHosts ran, the host's
  // connection or why there is none.
  VatId* capVats = nullptr;
  uint64_t* capProvisions = nullptr;
  RpcConnection** capHosts = nullptr;
  Error* capHostErrors = nullptr;
  uint32_t thirdPartyCount = 0;
  // A cap table longer than maxCapsPerMessage (a peer whose bound is larger): the message is
  // refused, not the connection. `refused` is why (MESSAGE_TOO_LARGE), capCount stays 0 and
  // `caps` keeps the table, whose references are dropped at once (dropRefusedCaps). A refused
  // call fails with it; refused results fail the question with it (returnKind EXCEPTION).
  Error refused{};
  // provide: recipient; accept: introducer.
  VatId vat = NO_VAT;
  uint64_t provisionId = 0;
  // resolve: the promise (id), and its resolution: a cap (resolveKind, resolveId) or exception.
  bool resolveBroken = false;
  detail::CapEntry::Kind resolveKind{};
  uint32_t resolveId = 0;
  // accept: Accept.embargo. disembargo: its context (accept, or provide with the question id in
  // id) and target (targetId).
  bool embargo = false;
  bool disembargoProvide = false;
};

}  // namespace agate::rpc
