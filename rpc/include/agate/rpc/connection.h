// RpcConnection: asynchronous capability RPC with promise pipelining over a pair of message
// channels (a bushel's request and reply rings, or any MessageSender / MessageReceiver pair).
//
//   // Both sides: one connection per (outbound, inbound) channel pair, on the thread's loop.
//   RpcConnection conn(tx, rx, loop, {.bootstrap = &myServer});
//
//   // Client: calls are built in place in the outbound ring frame.
//   RemoteCap calc = conn.bootstrap();
//   Request req = calc.newCall(CALC_ID, /*methodId=*/0, /*sizeHint=*/64);
//   req.initParams<Calc::EvalParams>().setExpr(...);
//   RemotePromise value = req.send();                      // the Call is in the ring now
//   RemoteCap next = value.pipeline({0});                  // results pointer field 0, a cap
//   RemotePromise r2 = next.newCall(VALUE_ID, 0).send();   // goes out at once (pipelined)
//   Result<Response> got = co_await r2;                    // ~one round trip for both
//   uint64_t v = got->results().getAs<Value>().getValue();
//
//   // Server: implement dispatch(); params are read in place, results built in place.
//   Promise<void> dispatch(uint64_t iface, uint16_t method, CallContext& ctx) override { ... }
//
// Protocol: schemas/rpc.capnp (Call, Return, Finish, Release, Resolve, Abort; who allocates each
// id and when it is reused is written beside the fields).
//
// Promise capabilities: a CapPromise (below) passes a capability before it exists; the peer's
// calls on it wait at this side and are delivered, in order, when it is settled. The connection is
// symmetric: each side has a question table (calls it made), an answer table (calls it serves), an
// export table (objects it hosts) and an import table (objects the peer hosts). Export 0 is the
// `bootstrap` object.
//
// Three-party handoff: with a VatNetwork in RpcOptions (vat_network.h), a RemoteCap of another
// connection passed in a cap table is handed off, so the receiver calls its host directly;
// without one it is proxied through this vat (rpc/README.md, "Three-party handoff").
//
// Ordering (E-order): calls made through one RemoteCap are delivered to the target object in
// the order they were sent, including calls pipelined on a promised answer (queued by the callee
// until the answer returns, then delivered in order ahead of anything that arrives later).
//
// Lifetimes and cancellation:
//  * A Request takes its ring frame at its first params() (a call without params or capabilities
//    never takes one: send() writes its few words directly) and holds it until send() (or its
//    destruction, which abandons it). Build and send without suspending: while an in-place frame
//    is open, other messages of this connection are built in spill buffers and queued behind it.
//  * RemotePromise: the caller's handle on a question. Dropping it (and every RemoteCap pipelined
//    on it) sends Finish; before the Return arrived that cancels the call: the callee drops its
//    dispatch promise, which destroys the server's coroutine. A call sent with
//    Request::noPipelining() whose Return carries no capability needs no Finish: the question
//    is freed at the Return (the callee's answer as it sent it), and dropping the promise
//    afterwards sends nothing.
//  * Response: the results, read IN PLACE in the inbound frame. The connection lets the caller
//    run first; a Response still alive when the connection reads on is moved once into a pooled
//    private buffer (so holding one never stalls the connection). Readers obtained from it are
//    valid until the holder next suspends; the Response itself stays valid (see Response).
//  * CallContext::params() is valid during the synchronous part of dispatch() only (until the
//    coroutine first suspends or returns); copy what is needed later. The inbound frame is then
//    released so the connection keeps reading.
//  * RemoteCap: a counted reference to an import (or to a pipelined answer). The last reference
//    to an import sends Release. A Request holds one on its target, and a cap-table entry on a
//    capability passed back to the peer, until the message is sent (or dropped), so a caller may
//    drop its own at any time: the Release (or Finish) follows the message that names the id.
//    Every RemoteCap, Request, RemotePromise and Response must be dropped before its
//    RpcConnection (precondition, checked).
//
// Errors: a server's error (an Error returned by its dispatch) reaches the caller as the same
// Errc; its detail text is copied into the caller's connection (see REMOTE_REASON_SLOTS
// below for how long it stays). Peer death or detach fails every pending promise with
// DISCONNECTED; malformed or hostile input aborts the connection with PROTOCOL_ERROR (and tells
// the peer with an Abort message). Calls on a dead connection fail at once with its error.
//
// Memory: the tables are dense vectors with free lists, grown on demand and then reused; promise
// nodes and coroutine frames come from the loop's arena; messages are built in ring frames, or
// under backpressure in pooled spill buffers; cap tables keep a few entries inline and take pooled
// blocks past them (RpcOptions::maxCapsPerMessage bounds them). A steady-state call allocates
// nothing.
//
// Threading: a connection and every handle on it belong to the thread of its EventLoop.
#pragma once

#include <capnp/any.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <list>
#include <memory>
#include <new>
#include <optional>
#include <span>
#include <unordered_map>
#include <utility>
#include <vector>

#include "agate/rpc/cap_pointer.h"
#include "agate/rpc/vat_network.h"
#include "agate/runtime/event_loop.h"
#include "agate/runtime/message.h"
#include "agate/runtime/message_channel.h"
#include "agate/runtime/promise.h"
#include "agate/runtime/result.h"
#include "agate/runtime/task.h"
#include "rpc.capnp.h"

namespace agate::rpc {

class RpcConnection;
class CallContext;
class RemoteCap;
class CapPromise;

// Protocol bounds (also in rpc.capnp). A peer exceeding them is aborted with PROTOCOL_ERROR.
// Capabilities per message: each connection's RpcOptions::maxCapsPerMessage (256 by default), at
// most CAPS_PER_MESSAGE_LIMIT; a message past it is refused, not the connection (RpcOptions).
inline constexpr uint32_t CAPS_PER_MESSAGE_LIMIT = 16384;
inline constexpr uint32_t MAX_PIPELINE_PATH = 8;

// An object that serves calls. Exported into a connection (bootstrap, or by passing it in a cap
// table); the connection calls dispatch() on its loop thread for each call delivered to it.
class ServerObject {
 public:
  virtual ~ServerObject() = default;
  // Serves one call. Return an Error (co_return Errc::...) to fail it; the caller receives the
  // same Errc and the detail text. Dropping of the returned promise means the call was
  // cancelled (the caller sent Finish, or the connection died).
  virtual Promise<void> dispatch(uint64_t interfaceId, uint16_t methodId, CallContext& context) = 0;
};

namespace internal {
class Forwarder;
}

namespace detail {

struct SpillBuffer;
struct ResponseSlot;
class PromiseNode;

// Where an outbound message is being built: in a ring frame reserved through the MessageSender,
// or in a pooled spill buffer when the ring is full or another frame is open.
class OutSlot {
 public:
  OutSlot() = default;
  OutSlot(OutSlot&& o) noexcept : ring_(std::move(o.ring_)), spill_(std::exchange(o.spill_, {})) {
    o.ring_.reset();
  }
  OutSlot& operator=(OutSlot&& o) noexcept;  // precondition: this slot is not active
  OutSlot(const OutSlot&) = delete;
  bool active() const noexcept { return ring_.has_value() || spill_ != nullptr; }
  capnp::MessageBuilder& builder();

 private:
  friend class agate::rpc::RpcConnection;
  std::optional<OutgoingMessage> ring_;
  SpillBuffer* spill_ = nullptr;
};

}  // namespace detail

// A reference to a capability hosted by the peer: an import, or a capability promised inside the
// results of a call still in flight (pipelined). Copyable (each copy is a counted reference).
// A default-constructed or broken RemoteCap makes calls that fail at once.
class RemoteCap {
 public:
  RemoteCap() = default;
  RemoteCap(const RemoteCap& o);
  RemoteCap(RemoteCap&& o) noexcept;
  RemoteCap& operator=(RemoteCap o) noexcept;
  ~RemoteCap() { reset(); }

  // Starts a call whose params are built in place in an outbound frame of about
  // `sizeHint` bytes of params (the envelope is added). Never fails: a call on a broken or dead
  // reference gives a Request whose send() returns the error.
  class Request newCall(uint64_t interfaceId, uint16_t methodId, size_t sizeHint = 256) const;

  bool isNull() const noexcept { return kind_ == Kind::NONE; }
  bool isPipelined() const noexcept { return kind_ == Kind::PIPELINE; }
  // The error a broken reference fails with (OK when it is not broken).
  Error brokenError() const noexcept { return broken_; }
  RpcConnection* connection() const noexcept { return conn_; }

  // Two references to the same import or the same promised answer and path.
  bool sameAs(const RemoteCap& o) const noexcept;

  // For a reference pipelined on a call's results (isPipelined(): the value at a pointer path of
  // results not yet arrived), the same results one step further: pointer field `pointerIndex` of
  // the struct at this path. The typed stubs' pipelines of nested structs step through them
  // this way; the reference at a capability field is the one to call. Broken, with the reason,
  // past MAX_PIPELINE_PATH steps or on a reference that is not pipelined; a null reference stays
  // null and a broken one keeps its reason.
  RemoteCap pipelineStep(uint16_t pointerIndex) const;

 private:
  friend class RpcConnection;
  friend class RemotePromise;
  friend class CapPromise;
  enum class Kind : uint8_t { NONE, IMPORT, PIPELINE, BROKEN };
  // A broken reference: its calls fail at once with `reason`.
  static RemoteCap broken(Error reason) noexcept {
    RemoteCap cap;
    cap.kind_ = Kind::BROKEN;
    cap.broken_ = reason;
    return cap;
  }
  void reset() noexcept;
  void addRef() const noexcept;

  RpcConnection* conn_ = nullptr;  // not owned; outlives every RemoteCap (checked)
  Kind kind_ = Kind::NONE;
  uint8_t pathLength_ = 0;
  uint32_t id_ = 0;  // IMPORT: import id; PIPELINE: question id
  std::array<uint16_t, MAX_PIPELINE_PATH> path_{};
  Error broken_{};
};

// A capability received in params or results: an object this side hosts (passed back to it),
// or a reference to one the peer hosts.
struct ReceivedCap {
  ServerObject* local = nullptr;  // not owned; set when the peer passed back one of our exports
  RemoteCap remote;               // set when the peer hosts it
  bool isNull() const noexcept { return local == nullptr && remote.isNull(); }
};

namespace detail {

// One entry of an outbound cap table before it is written.
struct CapEntry {
  enum class Kind : uint8_t {
    NONE,
    SENDER_HOSTED,
    RECEIVER_HOSTED,
    THIRD_PARTY,
    SENDER_PROMISE,
    RECEIVER_ANSWER,
    // Not on the wire: another connection's import, in `held`, handed off (THIRD_PARTY) or
    // proxied (SENDER_HOSTED) as the message is sent (RpcConnection::settleForeignCaps).
    FOREIGN
  };
  Kind kind = Kind::NONE;
  uint32_t id = 0;                       // RECEIVER_HOSTED: the peer's export id
  ServerObject* object = nullptr;        // SENDER_HOSTED; THIRD_PARTY: the vine
  std::unique_ptr<ServerObject> owned;   // SENDER_HOSTED, when the connection takes ownership
  std::shared_ptr<ServerObject> shared;  // SENDER_HOSTED, owned jointly (a handed-off object);
                                         // SENDER_PROMISE: the promise (object is the same)
  VatId vat = NO_VAT;                    // THIRD_PARTY: the provider
  uint64_t provisionId = 0;              // THIRD_PARTY
  // FOREIGN: the other connection's import, until the message is sent.
  // RECEIVER_HOSTED: the import passed back; RECEIVER_ANSWER: the pipelined capability passed
  // back (its question and path). A counted reference held until the message is sent or
  // abandoned, so that no Release (Finish) for the import (question) goes out before the
  // message that names it, however soon the caller drops its own reference.
  RemoteCap held;
};

// Raw storage for a table that outgrew the entries it keeps inline: a buffer of its
// connection's spill pool (outbound.cpp), so a steady state of large tables allocates nothing.
struct TableBlock {
  SpillBuffer* buffer = nullptr;
  void* data = nullptr;
  size_t bytes = 0;
};
TableBlock takeTableBlock(RpcConnection& pool, size_t bytes);
// `dirtyBytes`: the prefix of the block that entries were ever constructed in.
void giveTableBlock(RpcConnection& pool, SpillBuffer* buffer, size_t dirtyBytes) noexcept;

// A table of T (a cap table being built, the capabilities of a call's params) that keeps its
// first INLINE entries inside the object and moves to a pooled block of its connection when it
// grows past them; clear() gives the block back. Only the entries in use are constructed
// (entries [0, size()) live in raw storage), so making, moving and dropping an empty table costs
// nothing, and a message with few capabilities never leaves the inline entries.
template <class T, uint32_t INLINE>
class SmallTable {
 public:
  SmallTable() noexcept {}  // NOLINT: the storage stays uninitialised on purpose
  SmallTable(SmallTable&& o) noexcept
      : count_(o.count_),
        capacity_(o.capacity_),
        highWater_(o.highWater_),
        heap_(std::exchange(o.heap_, nullptr)),
        block_(std::exchange(o.block_, nullptr)),
        pool_(o.pool_) {
    if (block_ != nullptr) {  // the block changes hands; the entries stay where they are
      o.count_ = o.highWater_ = 0;
      o.capacity_ = INLINE;
      return;
    }
    for (uint32_t i = 0; i < count_; ++i) new (inlineSlot(i)) T(std::move(o.data()[i]));
    o.clear();
  }
  SmallTable& operator=(SmallTable&&) = delete;
  ~SmallTable() { clear(); }

  uint32_t size() const noexcept { return count_; }
  T* data() noexcept {
    return heap_ != nullptr ? heap_ : std::launder(reinterpret_cast<T*>(inline_));
  }
  const T* data() const noexcept {
    return heap_ != nullptr ? heap_ : std::launder(reinterpret_cast<const T*>(inline_));
  }
  T& operator[](uint32_t i) noexcept { return data()[i]; }
  const T& operator[](uint32_t i) const noexcept { return data()[i]; }

  // Room for `n` entries: past INLINE, a block of `pool` (the table's connection) of twice the
  // current room (but no more than `most`, and at least `n`), the entries moved into it and the
  // old block given back.
  void reserve(RpcConnection& pool, uint32_t n, uint32_t most = 0) {
    if (n <= capacity_) return;
    const uint32_t want = std::max(n, std::min(capacity_ * 2, most));
    TableBlock b = takeTableBlock(pool, size_t{want} * sizeof(T));
    T* to = static_cast<T*>(b.data);
    T* from = data();
    for (uint32_t i = 0; i < count_; ++i) {
      new (to + i) T(std::move(from[i]));
      from[i].~T();
    }
    if (block_ != nullptr) giveTableBlock(*pool_, block_, size_t{highWater_} * sizeof(T));
    heap_ = to;
    block_ = b.buffer;
    pool_ = &pool;
    capacity_ = static_cast<uint32_t>(b.bytes / sizeof(T));
    highWater_ = count_;
  }
  // Appends an entry. Precondition: size() < the room reserved.
  template <class... A>
  T& emplaceBack(A&&... args) {
    T* e = new (data() + count_) T(std::forward<A>(args)...);
    if (++count_ > highWater_) highWater_ = count_;
    return *e;
  }
  // Destroys the entries and gives the block back. The entries and the block are taken out
  // first: destroying an entry may drop an object (or a RemoteCap) whose destructor reaches this
  // table again.
  void clear() noexcept {
    const uint32_t n = std::exchange(count_, 0);
    T* entries = data();
    heap_ = nullptr;
    SpillBuffer* block = std::exchange(block_, nullptr);
    const uint32_t dirty = std::exchange(highWater_, 0);
    capacity_ = INLINE;
    for (uint32_t i = 0; i < n; ++i) entries[i].~T();
    if (block != nullptr) giveTableBlock(*pool_, block, size_t{dirty} * sizeof(T));
  }

 private:
  void* inlineSlot(uint32_t i) noexcept { return inline_ + i * sizeof(T); }
  alignas(T) std::byte inline_[INLINE * sizeof(T)];
  uint32_t count_ = 0;
  uint32_t capacity_ = INLINE;
  uint32_t highWater_ = 0;  // entries ever constructed in the block (its part to zero again)
  T* heap_ = nullptr;       // the block's entries, when the table has one
  SpillBuffer* block_ = nullptr;
  RpcConnection* pool_ = nullptr;  // whose block it is
};

// What decode() reads of each cap-table entry of the message being handled (rpc/
// connection_internal.h, RpcConnection::Decoded): a connection's scratch, grown to the largest
// table seen (at most RpcOptions::maxCapsPerMessage) and reused, so that handling a message
// allocates nothing. Only the connection's reader uses it, one message at a time.
struct CapScratch {
  std::vector<CapEntry::Kind> kinds;
  std::vector<uint32_t> ids;
  std::vector<VatId> vats;
  std::vector<uint64_t> provisions;
  std::vector<RpcConnection*> hosts;
  std::vector<Error> hostErrors;
};

// Cap-table entries kept inline by every Request and CallContext: a call with up to this many
// capabilities never touches the pool.
inline constexpr uint32_t INLINE_CAPS = 4;

// An outbound cap table being collected while content is built. Every Request holds one, and
// most calls carry no capability. Added to through RpcConnection::addEntry, which checks the
// connection's bound (RpcOptions::maxCapsPerMessage) and grows it from the connection's pool.
using CapTable = SmallTable<CapEntry, INLINE_CAPS>;

}  // namespace detail

// The results of a call, read in place in the inbound frame. Move-only.
//
// Where the bytes are: the Return is handed over in place, and the connection yields one loop
// turn before reading its next message. A Response dropped by then (the usual `co_await`, read,
// done) never costs a copy. One still alive is moved once into a pooled private buffer so the
// connection can go on reading (holding a Response never stalls the connection). Empty results
// (no content, no capability) keep nothing of the frame: no yield, no copy. Hence:
// Readers obtained from results() are valid until the holding coroutine next suspends; the
// Response itself stays valid, and results() gives fresh readers after a suspension.
class Response {
 public:
  // Inline: a Response is moved several times on its way from the Return to its caller.
  Response(Response&& o) noexcept : conn_(std::exchange(o.conn_, nullptr)), slot_(o.slot_) {}
  Response& operator=(Response&&) = delete;
  Response(const Response&) = delete;
  ~Response() {
    if (conn_ != nullptr) release();
  }

  // The results struct (typed: results().getAs<T>(); a schema mismatch throws inside Cap'n
  // Proto, so read untrusted shapes with tryRead).
  capnp::AnyPointer::Reader results() const;
  template <class T, class Fn>
  Status tryRead(Fn&& fn) const {
    try {
      std::forward<Fn>(fn)(results().getAs<T>());
    } catch (const kj::Exception&) {
      return Error(Errc::PROTOCOL_ERROR, "results do not match the schema they were read with");
    }
    return {};
  }
  // Capability `capIndex` of the results' cap table; capAt reads the index from a capability
  // pointer field or an element of a list of capabilities (cap_pointer.h says what is refused).
  // INVALID_ARGUMENT for an index outside the table or a null entry. An object of this side
  // passed back (ReceivedCap::local) stays alive while the Response does, whatever the peer
  // releases meanwhile.
  Result<ReceivedCap> getCap(uint32_t capIndex) const;
  Result<ReceivedCap> capAt(capnp::AnyStruct::Reader s, uint16_t pointerIndex) const;
  Result<ReceivedCap> capAt(capnp::AnyList::Reader list, uint32_t element) const;
  // Entries in the results' cap table.
  uint32_t capCount() const;
  // The connection the results came on (null once moved from).
  RpcConnection* connection() const noexcept { return conn_; }

 private:
  friend class RpcConnection;
  Response(RpcConnection* conn, detail::ResponseSlot* slot) noexcept : conn_(conn), slot_(slot) {}
  void release() noexcept;
  RpcConnection* conn_;         // null once moved from
  detail::ResponseSlot* slot_;  // owned by the connection's pool; returned when dropped
};

// The caller's handle on a call in flight. Move-only. co_await it for the Response; pipeline()
// for capabilities inside the results before they exist. Dropping it (and every pipelined
// RemoteCap) sends Finish, which cancels the call if it has not returned.
class [[nodiscard]] RemotePromise {
 public:
  RemotePromise(RemotePromise&& o) noexcept
      : conn_(std::exchange(o.conn_, nullptr)),
        questionId_(o.questionId_),
        generation_(o.generation_),
        noPipelining_(o.noPipelining_),
        promise_(std::move(o.promise_)),
        error_(o.error_) {}
  RemotePromise& operator=(RemotePromise&&) = delete;
  RemotePromise(const RemotePromise&) = delete;
  ~RemotePromise() {
    if (conn_ != nullptr) release();  // a moved-from or refused one holds no question
  }

  // A reference to the capability at pointer-field path `path` of the results (empty: the
  // results root is the capability). Calls on it go out at once, targeted at the promised
  // answer; if the call fails, or the path leads to no capability, they fail with that error.
  // A call sent with Request::noPipelining() gives a broken reference instead (its calls fail
  // INVALID_ARGUMENT, "sent without promise pipelining"), and nothing is sent.
  RemoteCap pipeline(std::span<const uint16_t> path) const;
  RemoteCap pipeline(std::initializer_list<uint16_t> path) const {
    return pipeline(std::span<const uint16_t>(path.begin(), path.size()));
  }
  // False for a call sent with Request::noPipelining() (or never sent).
  bool canPipeline() const noexcept { return conn_ != nullptr && !noPipelining_; }

  bool isReady() const noexcept { return promise_.isReady(); }
  auto operator co_await() & noexcept { return promise_.operator co_await(); }
  auto operator co_await() && noexcept { return promise_.operator co_await(); }

  // The question id (tests and diagnostics). 0 with no question (a call refused at send()).
  uint32_t questionId() const noexcept { return questionId_; }

 private:
  friend class RpcConnection;
  friend class Request;
  RemotePromise(RpcConnection* conn, uint32_t questionId, Promise<Response> promise,
                Error error) noexcept
      : conn_(conn), questionId_(questionId), promise_(std::move(promise)), error_(error) {}
  RemotePromise(RpcConnection* conn, uint32_t questionId, uint64_t generation, bool noPipelining,
                Promise<Response> promise) noexcept
      : conn_(conn),
        questionId_(questionId),
        generation_(generation),
        noPipelining_(noPipelining),
        promise_(std::move(promise)) {}
  void release() noexcept;
  RpcConnection* conn_;  // null when the call never got a question (or moved from)
  uint32_t questionId_;
  // The question's generation when sent: a question freed at its Return (noFinishNeeded) is
  // not this promise's any more, and dropping the promise leaves it alone.
  uint64_t generation_ = 0;
  bool noPipelining_ = false;
  Promise<Response> promise_;
  Error error_;  // why the call never got a question
};

// A call being built. Move-only; dropping it unsent abandons its frame (if params() took one).
class [[nodiscard]] Request {
 public:
  Request(Request&& o) noexcept;
  Request& operator=(Request&&) = delete;
  Request(const Request&) = delete;
  ~Request();

  // The params content, built in place (params().initAs<T>()). The first call starts the Call
  // in a ring frame (or a spill buffer).
  capnp::AnyPointer::Builder params();
  template <class T>
  typename T::Builder initParams() {
    return params().initAs<T>();
  }
  // Adds a capability to the params' cap table; write its index into the content with
  // writeCapPointer. A RemoteCap of another connection is handed off to the receiver (it will
  // call the host directly) when both connections have a VatNetwork, else passed as a proxy
  // through this vat (a forwarding export); one still pipelined on another connection goes as a
  // promise handed off once its answer returns (rpc/README.md, "Embargoes"), or as a proxy.
  // INVALID_ARGUMENT for a pipelined RemoteCap of this connection (promise passing is not done) or
  // a broken one; the host connection's error when it is dead; OUT_OF_MEMORY past the
  // connection's RpcOptions::maxCapsPerMessage. The cap table is unchanged on an error.
  Result<uint32_t> addCap(const RemoteCap& cap);
  Result<uint32_t> addCap(ServerObject& object);                  // stays owned by the caller
  Result<uint32_t> addCap(std::unique_ptr<ServerObject> object);  // owned by the connection
  // A promise capability (see CapPromise). INVALID_ARGUMENT when it is empty or of another
  // connection.
  Result<uint32_t> addCap(const CapPromise& promise);

  // Promises that nothing will be pipelined on this call's results (Call.noPromisePipelining):
  // the RemotePromise's pipeline() gives broken references. The callee then ends the call with
  // its Return alone, with no Finish (two messages instead of three) when the results carry no
  // capability. Typed stubs set it for every method whose results can hold none. Dropping the
  // RemotePromise before the Return still cancels the call (Finish). Any time before send().
  Request& noPipelining() noexcept {
    noPipelining_ = true;
    return *this;
  }
  // Reserves `bytes` of reply space for this call (its Return's frame, header included) rather
  // than RpcOptions::replyBytesPerCall (rpc/README.md, "Reply space"): for results known to be
  // large. Any time before send().
  Request& reserveReply(uint32_t bytes) noexcept {
    replyReserve_ = bytes;
    return *this;
  }

  // Sends the call. Errors (a dead connection, MESSAGE_TOO_LARGE, a broken target) come back as
  // an already failed RemotePromise.
  RemotePromise send();

 private:
  friend class RemoteCap;
  friend class RpcConnection;
  Request(RpcConnection* conn, Error error) noexcept;

  RpcConnection* conn_;
  Error error_;  // a call refused before anything was built
  // The Call is built only when params() or a capability needs it: a call with neither is
  // written by send() as a handful of words, with no MessageBuilder. Until then, what it is.
  bool unbuilt_ = false;
  // A reference to the target (its question, or its import) is held until the Call is sent or
  // the request dropped, so no Finish or Release for it goes out ahead of the Call.
  bool holdsTarget_ = false;
  bool noPipelining_ = false;
  bool toAnswer_ = false;  // target: promisedAnswer(targetId_, path_) or importedCap(targetId_)
  uint8_t pathLength_ = 0;
  uint16_t methodId_ = 0;
  uint32_t targetId_ = 0;
  uint32_t replyReserve_ = 0;  // 0: RpcOptions::replyBytesPerCall
  uint64_t interfaceId_ = 0;
  size_t sizeHint_ = 0;
  std::array<uint16_t, MAX_PIPELINE_PATH> path_{};
  detail::OutSlot slot_;
  wire::Call::Builder call_{nullptr};
  detail::CapTable caps_;
  // Where params go when the call was refused before a frame existed (off the hot path).
  std::unique_ptr<capnp::MallocMessageBuilder> scrap_;
};

// What a ServerObject's dispatch gets for one call. Lives in the connection's answer table
// until the call is finished; valid for the whole dispatch (params() only for its synchronous
// part, see the overview).
class CallContext {
 public:
  CallContext() = default;
  CallContext(const CallContext&) = delete;
  CallContext& operator=(const CallContext&) = delete;

  // The params, in place. Precondition: still in dispatch's synchronous part.
  capnp::AnyPointer::Reader params() const;
  template <class T, class Fn>
  Status tryReadParams(Fn&& fn) const {
    try {
      std::forward<Fn>(fn)(params().getAs<T>());
    } catch (const kj::Exception&) {
      return Error(Errc::PROTOCOL_ERROR, "params do not match the schema they were read with");
    }
    return {};
  }
  // Capability `capIndex` of the params' cap table (valid for the whole call); capAt reads the
  // index from a capability pointer field, or an element of a list of capabilities, of the params
  // (synchronous part only).
  Result<ReceivedCap> getCap(uint32_t capIndex) const;
  Result<ReceivedCap> capAt(capnp::AnyStruct::Reader s, uint16_t pointerIndex) const;
  Result<ReceivedCap> capAt(capnp::AnyList::Reader list, uint32_t element) const;
  // Entries in the params' cap table.
  uint32_t capCount() const noexcept { return paramCaps_.size(); }

  // Starts the results, in a private buffer of about `sizeHint` bytes of content, copied into the
  // ring when dispatch's promise completes and the Return goes out. Building results and then
  // suspending is allowed (the connection sends other messages meanwhile). DISCONNECTED on a
  // dead connection; OUT_OF_MEMORY when the peer stopped reading (RpcOptions::maxQueuedBytes).
  // Calling it twice returns the same builder.
  Result<capnp::AnyPointer::Builder> initResults(size_t sizeHint = 256);
  template <class T>
  Result<typename T::Builder> initResultsAs(size_t sizeHint = 256) {
    Result<capnp::AnyPointer::Builder> r = initResults(sizeHint);
    if (!r) return r.error();
    return r->initAs<T>();
  }
  // Adds a capability to the results' cap table (see Request::addCap). Precondition:
  // initResults() succeeded.
  Result<uint32_t> addResultCap(ServerObject& object);
  Result<uint32_t> addResultCap(std::unique_ptr<ServerObject> object);
  Result<uint32_t> addResultCap(const RemoteCap& cap);
  Result<uint32_t> addResultCap(const CapPromise& promise);

  RpcConnection& connection() const noexcept { return *conn_; }

 private:
  friend class RpcConnection;
  RpcConnection* conn_ = nullptr;
  uint32_t answerId_ = 0;
  bool paramsValid_ = false;
  capnp::AnyPointer::Reader params_;
  capnp::AnyStruct::Reader paramsPayload_;
  detail::SmallTable<ReceivedCap, detail::INLINE_CAPS> paramCaps_;
  detail::OutSlot results_;
  wire::Return::Builder return_{nullptr};
  capnp::AnyPointer::Builder content_{nullptr};
  detail::CapTable resultCaps_;
};

// A capability this vat passes before it exists (a promise capability, CapDescriptor.senderPromise
// in schemas/rpc.capnp). Made by RpcConnection::newCapPromise(); add it to any number of cap
// tables of that connection (Request::addCap, CallContext::addResultCap), then settle it once
// with resolve() or reject(). The peer may call it at once: its calls are queued, in arrival
// order, and delivered to the resolution when it comes (or fail with the rejection), ahead of
// every later call; the peer is then told (Resolve) and sends new calls to the resolution.
//
//   CapPromise later = ctx.connection().newCapPromise();
//   writeCapPointer(results, 0, *ctx.addResultCap(later));  // returned before it exists
//   ...
//   later.resolve(std::make_unique<Counter>());             // queued calls are delivered now
//
// Move-only. Settling consumes it (it is empty afterwards); dropping it unsettled rejects it with
// FAILED. A handle on its connection: drop it before the connection (checked). Resolving to a
// RemoteCap of any connection forwards calls to it; one of another connection that can be
// handed off to the peer is (the peer's reference then goes to its host, with an embargo that
// keeps E-order: rpc.capnp "Embargoes"; else a proxy through this vat: rpc.capnp "Promise
// capabilities").
class CapPromise {
 public:
  CapPromise() = default;
  CapPromise(CapPromise&& o) noexcept : node_(std::move(o.node_)) {}
  CapPromise& operator=(CapPromise&& o) noexcept;
  CapPromise(const CapPromise&) = delete;
  ~CapPromise();

  bool isEmpty() const noexcept { return node_ == nullptr; }

  // Settles the promise. Calls queued on it are delivered (or failed) before these return.
  // Precondition: not empty.
  void resolve(ServerObject& object);                  // stays owned by the caller
  void resolve(std::unique_ptr<ServerObject> object);  // owned by the promise's exports
  void resolve(const RemoteCap& cap);                  // a broken cap rejects with its error
  // The promise keeps its own copy of error.detail (its first 120 bytes): an error that came
  // from any connection may be passed as it is.
  void reject(Error error);

 private:
  friend class RpcConnection;
  friend class Request;
  friend class CallContext;
  void settle();
  std::shared_ptr<detail::PromiseNode> node_;
};

// What a connection allocates on its peer's behalf is charged to the peer through one of these
// (RpcOptions::budget): a server makes each client pay for what its connection holds for it
// (client::ClientQuota is one: the bushel's state allowance, paid by the client's bank). Each
// message buffer and table entry is charged when it is allocated; they are pooled, so each is
// charged once, and the total is given back when the connection is destroyed.
class StateBudget {
 public:
  virtual ~StateBudget() = default;
  // Bytes take() can take now.
  virtual size_t available() const noexcept = 0;
  // Takes `bytes` if available() covers them; false, nothing taken, otherwise.
  virtual bool take(size_t bytes) noexcept = 0;
  // Gives back bytes take() took.
  virtual void give(size_t bytes) noexcept = 0;
  // Settles once available() >= `bytes`, taking nothing: with QUOTA_EXCEEDED when the peer's
  // quota cannot pay that much, another error when the budget could not ask. Dropping the
  // promise stops the asking.
  virtual Promise<void> grow(size_t bytes) = 0;
};

struct RpcOptions {
  // Export 0: the object the peer reaches with bootstrap(). Not owned; outlives the connection,
  // and every other connection it is passed on to (a server's own objects passed on are
  // exported there as they are: addReceivedFor).
  ServerObject* bootstrap = nullptr;
  // Or a bootstrap object the connection owns jointly: passed on to another connection, it is
  // shared with it, so it lives while either refers to it (sharedObjectsAlive).
  std::shared_ptr<ServerObject> sharedBootstrap = nullptr;
  // Bounds on ids the PEER chooses (our answer table, our import table); beyond them the peer
  // is aborted with PROTOCOL_ERROR. They bound the per-peer state a hostile peer can make us
  // hold.
  uint32_t maxAnswers = 4096;
  uint32_t maxImports = 65536;
  // Bounds on this side's own calls (rpc/README.md, "Reply space"), so that an honest caller
  // never runs into the peer's bounds (a peer past its maxAnswers aborts the connection) and
  // never makes the peer queue replies it has no room for. A call past maxQuestions is refused
  // at send() with OUT_OF_MEMORY, nothing sent; one past the reply space is held or refused as
  // whenReplySpaceIsFull says.
  //   maxQuestions: questions open at once (a question is open from its send until both its
  //   Return arrived and its Finish went, or the Return needed none). Question ids start at 1,
  //   so set it below the peer's maxAnswers, which bounds the ids (the defaults agree). 1 or
  //   more (REQUIRE-checked).
  //   replyBytesPerCall: reply space each call reserves, from its send until its Return
  //   arrives, in the ring this side reads (the peer's replies land there), its frame header
  //   included: the calls in flight together reserve at most that ring's capacity (less 8
  //   bytes). The default holds a Return of small results (a few scalars, short text) or a
  //   short exception; Request::reserveReply() reserves more for one call. 16 or more
  //   (REQUIRE-checked).
  uint32_t maxQuestions = 4095;
  uint32_t replyBytesPerCall = 128;
  // A call whose reply space is not free when it is sent:
  //   HOLD (the default): the call is held on this side, its promise pending, and goes out
  //   once Returns free the space. While any call is held, every later call and Disembargo of
  //   this connection is held behind it, in order, so calls on one reference still arrive in
  //   the order they were sent (E-order), and so do those pipelined on a held call. Held calls
  //   count toward maxQuestions, and their bytes (with the queue's) toward maxQueuedBytes: past
  //   either a call is refused. Dropping the promise of a held call drops it (nothing is
  //   sent). Finishes, Releases, Returns, Resolves, Provides and Accepts are never held, so
  //   cancelling a call in flight frees its space, and the peer's progress never waits for
  //   this side's own calls; what a held message names stays referenced until it goes. A call
  //   carrying capabilities is held too, its cap table written as it goes (nothing is exported
  //   or handed off before). A capability of the peer's passed on to a third vat, or returned
  //   to the peer, while calls are held is proxied, not handed off or passed back. Holding has no
  //   time bound unless maxHoldTime (below) sets one: a caller whose calls in flight wait for a
  //   call of its own that is held (a lock's release behind long acquires) waits for ever;
  //   reserve less, use REFUSE, or bound the hold. REFUSE: the call
  //   is refused at send() with OUT_OF_MEMORY, nothing sent, and the request stays refused: for a
  //   caller that would rather shed load than wait.
  // A call reserving more than the whole ring is refused either way.
  enum class WhenReplySpaceIsFull : uint8_t { HOLD, REFUSE };
  WhenReplySpaceIsFull whenReplySpaceIsFull = WhenReplySpaceIsFull::HOLD;
  // The longest a call may be held (HOLD), or zero (the default): no bound. A call held longer
  // fails here, unsent, with TIMED_OUT (RpcStats::callsTimedOutHeld), and so do the held calls
  // that name its answer as they reach the front; the calls behind it keep their order and go as
  // space frees. For a caller whose calls in flight may wait for one of its own held calls (the
  // lock above): that call fails rather than waits for ever. Timed from when the call was held;
  // checked against the oldest held call only (held calls go in order).
  Duration maxHoldTime = Duration::zero();
  // How many bytes of finished messages may wait for ring space (a peer that stops reading
  // fills the ring, then this queue). Past it this side's own calls are refused with
  // OUT_OF_MEMORY, and a reply the peer's calls ask for ends the connection (OUT_OF_MEMORY):
  // a peer that never reads cannot make this side hold its replies without end.
  size_t maxQueuedBytes = size_t{4} << 20;
  // How many bytes the private copies of the peer's calls that wait here may hold (calls
  // pipelined on an answer that has not returned, calls queued on a promise or behind a call
  // waiting for its params). A call that would pass it fails with OUT_OF_MEMORY (the connection
  // carries on): a peer cannot make this side keep its calls without end, as maxAnswers alone
  // would let it (that many calls of up to maxMessageBytes each).
  size_t maxQueuedCallBytes = size_t{1} << 20;
  // The largest message this side builds (clamped frame reservations; spill buffer size). At
  // most 4 MiB, the largest spill buffer, which also bounds the MessageReceiver's maxFrameBytes
  // (both REQUIRE-checked when the connection is made).
  size_t maxMessageBytes = 16 * 1024;
  // Capabilities in one message's cap table, either way: this side's own addCap past it fails
  // with OUT_OF_MEMORY; a message of the peer's carrying more (its bound is larger) is refused:
  // the call, or the question whose results they were, fails with MESSAGE_TOO_LARGE, the
  // references are released, and the connection carries on. 1 to
  // CAPS_PER_MESSAGE_LIMIT (REQUIRE-checked when the connection is made). Tables of up to
  // detail::INLINE_CAPS entries live inside the Request or the call; larger ones in buffers of
  // the connection's pool, reused (rpc/README.md, "Capabilities in messages"). A typed list of
  // capabilities is bounded by it too (docs/typed_stubs.md).
  uint32_t maxCapsPerMessage = 256;
  // References to one capability are counted in 32 bits on each side. Once the peer has given
  // this side `releaseReferencesAt` references to one import, this side releases all but one
  // of them at once, so a capability held for ever and received again and again never wraps
  // the count. This side refuses to give the peer more than 2 * releaseReferencesAt - 1
  // references to one of its objects (the message is not sent: OUT_OF_MEMORY) until the peer
  // releases some, so a peer that never releases cannot wrap the count and have the object
  // freed under its references. 2 to 2^31 (REQUIRE-checked); lower only to test.
  uint32_t releaseReferencesAt = uint32_t{1} << 31;
  // How the inbound reader and the outbound pump wait.
  AsyncWaitPolicy wait = {};
  // Fairness among connections on one loop: after this many messages read in a row, the reader
  // waits for the loop's next turn (after the loop polled for I/O, so every reader woken
  // meanwhile runs first) before it reads on: a peer that keeps its ring full cannot hold the
  // loop. 0: no budget (a lone connection reads until its ring is empty).
  uint32_t messagesPerTurn = 0;
  // Three-party handoff (vat_network.h): this vat's network (not owned; outlives the
  // connection) and the vat id of the peer, as the network authenticated it. Both or neither.
  VatNetwork* network = nullptr;
  VatId peerVat = NO_VAT;
  // Charges the peer for what this connection allocates on its behalf (StateBudget): message
  // buffers (copies of its calls kept to deliver later, replies waiting for it to read, results
  // built aside) and table entries (answers, imports, exports). Not owned; outlives the
  // connection. Null: nothing is charged, and only the bounds above hold. Before it reads each
  // message the reader makes the budget cover that message's copy and a new answer, and waits
  // while the budget grows. A call that would be kept waiting here, or that needs a new answer
  // entry, and that the budget cannot pay fails alone with QUOTA_EXCEEDED
  // (RpcStats::callsRefusedQuota; the entry is kept unpaid, paid before it serves a call).
  // Anything else it cannot pay ends the connection with QUOTA_EXCEEDED: a peer cannot make
  // this side hold more for it than its quota pays for, beyond its answer table.
  StateBudget* budget = nullptr;
};

// Message counters (tests assert protocol behaviour with them; benchmarks report them).
struct RpcStats {
  uint64_t messagesSent = 0;
  uint64_t messagesReceived = 0;
  uint64_t callsSent = 0;
  uint64_t callsReceived = 0;
  uint64_t returnsSent = 0;
  uint64_t returnsReceived = 0;
  uint64_t finishesSent = 0;
  uint64_t finishesReceived = 0;
  uint64_t returnsNoFinishNeeded = 0;  // Returns sent with noFinishNeeded (callee side)
  uint64_t finishesIgnored = 0;  // Finishes that crossed a noFinishNeeded Return (callee side)
  uint64_t releasesSent = 0;
  uint64_t releasesReceived = 0;
  // Finishes sent before their Return with releaseResultCaps (caller side): the Return's
  // references are the callee's to drop, no Release follows for them.
  uint64_t finishesReleasingResults = 0;
  // References the callee dropped for such Finishes (one per exported cap-table entry of the
  // Return, as Releases of 1 would have).
  uint64_t resultRefsReleasedByFinish = 0;
  // Calls and Returns refused for carrying more capabilities than maxCapsPerMessage (a peer
  // whose bound is larger): the call or the question failed MESSAGE_TOO_LARGE, the connection
  // carried on.
  uint64_t messagesRefused = 0;
  uint64_t pipelinedCallsQueued = 0;  // calls the callee held until their promised answer
  uint64_t spilledMessages = 0;       // messages built outside the ring (backpressure)
  uint64_t doorbellRings = 0;         // rings of the peer's doorbell: one per burst of messages
  uint64_t responsesCopied = 0;       // Responses still held when the reader read on (see Response)
  uint64_t providesSent = 0;          // handoffs this vat introduced on this connection
  uint64_t providesReceived = 0;
  uint64_t acceptsSent = 0;  // handoffs this vat took over this connection
  uint64_t acceptsReceived = 0;
  uint64_t acceptsWaited = 0;  // Accepts that arrived before their Provide
  // Handoffs not taken for maxQuestions questions open to the host: the introducer's vine
  // stayed the reference.
  uint64_t acceptsDeclined = 0;
  uint64_t resolvesSent = 0;  // promise capabilities this side exported and settled
  uint64_t resolvesReceived = 0;
  uint64_t promiseCallsQueued = 0;  // calls held by this side until their promise settled
  // Calls whose params passed back a capability pipelined on one of this side's answers
  // (receiverAnswer) that had not returned yet: held until it has (callee side).
  uint64_t callsAwaitingParamAnswers = 0;
  // Calls that had to wait here and were refused (OUT_OF_MEMORY): RpcOptions::maxQueuedCallBytes.
  uint64_t callsRefusedQueueFull = 0;
  // Calls refused because RpcOptions::budget could not pay for keeping them waiting here, or
  // for a new answer entry (QUOTA_EXCEEDED).
  uint64_t callsRefusedQuota = 0;
  // Times the reader waited for RpcOptions::budget to grow before it read on.
  uint64_t budgetWaits = 0;
  // Calls held behind such a call on the same export, to keep E-order (callee side).
  uint64_t callsQueuedBehind = 0;
  // Calls this side held until Returns freed reply space (RpcOptions::whenReplySpaceIsFull).
  uint64_t callsHeld = 0;
  uint64_t callsCancelledHeld = 0;  // of which dropped before they went (nothing was sent)
  uint64_t callsTimedOutHeld = 0;   // of which held past RpcOptions::maxHoldTime (nothing sent)
  // Of which failed here as they went (a cap table that could not be written then), with the
  // held calls naming their answers: nothing was sent.
  uint64_t callsFailedUnsent = 0;
  uint64_t disembargoesSent = 0;  // three-party embargoes (schemas/rpc.capnp, "Embargoes")
  uint64_t disembargoesReceived = 0;
  uint64_t disembargoesHeld = 0;  // of those sent, held behind calls held for reply space
  uint64_t acceptsEmbargoed = 0;  // embargoed Accepts that waited for the introducer's Disembargo
  // Accepts that waited for the introducer's calls still queued on the provided object here
  // (for answers their params named): made before the handoff, they go first.
  uint64_t acceptsBehindQueue = 0;
  // Handoffs in a Return to a question this side pipelined calls on, taken with an embargoed
  // Accept and a Disembargo through the vine, so that calls made after the Return go behind the
  // pipelined ones (which the introducer forwards on the vine).
  uint64_t returnHandoffsEmbargoed = 0;
};

class RpcConnection {
 public:
  // Starts reading `rx` at once. `tx`, `rx` and `loop` must outlive the connection. `rx` must
  // accept capability pointers (rpcReceiverOptions(); precondition, checked). To notice a peer
  // *process* dying, watch its pid on both endpoints (Sender/Receiver::watchPeer).
  RpcConnection(MessageSender& tx, MessageReceiver& rx, EventLoop& loop, RpcOptions options = {});
  // Fails everything pending with DISCONNECTED, cancels running calls, destroys owned exports
  // and detaches `tx`. Every handle on the connection must be gone (checked).
  ~RpcConnection();
  RpcConnection(const RpcConnection&) = delete;
  RpcConnection& operator=(const RpcConnection&) = delete;

  // The peer's export 0. Broken (calls fail DISCONNECTED) on a dead connection.
  RemoteCap bootstrap();

  // A new promise capability on this connection (see CapPromise).
  CapPromise newCapPromise();

  // Resolves when the connection ends, with the reason (DISCONNECTED when the peer went away or
  // sent Abort, PROTOCOL_ERROR when it sent something hostile). One waiter.
  Promise<void> onDisconnect();
  bool isOpen() const noexcept { return failure_.code == Errc::OK; }
  Error failure() const noexcept { return failure_; }
  // Closes the connection locally (as the destructor does, without the handle checks).
  void close(Error reason);
  // close(), and the teardown the destructor does, now rather than from the loop: running calls
  // are cancelled and every export is dropped, so the capabilities this connection's objects
  // held on other connections (proxies, promises passed on, vines) are released at once. For
  // an owner about to destroy several connections that may hold references on each other
  // (client::Session): shut them all down, then destroy them. From the synchronous part of one
  // of this connection's own calls (a method that shuts its connection down) it acts as close():
  // the teardown follows from the loop, once the method has returned. Not from a call's later
  // part (after it suspended): its own coroutine and object would go while they run.
  void shutdown(Error reason);

  const RpcStats& stats() const noexcept { return stats_; }
  VatId peerVat() const noexcept { return options_.peerVat; }
  // RpcOptions::maxCapsPerMessage: the bound on each message's cap table, both ways.
  uint32_t maxCapsPerMessage() const noexcept { return options_.maxCapsPerMessage; }
  // Live entries of each table (tests check nothing leaks).
  uint32_t questionCount() const noexcept { return questionsLive_; }
  // Reply space the calls in flight reserve now, and what they may reserve in all (the
  // capacity of the ring this side reads, less the 8 bytes a ring keeps free):
  // RpcOptions::replyBytesPerCall.
  uint64_t replyBytesReserved() const noexcept { return replyReserved_; }
  uint64_t replyBytesAvailable() const noexcept { return replyBudget_; }
  // Calls held for reply space (RpcOptions::whenReplySpaceIsFull), and every message held
  // (those calls and the Disembargoes behind them).
  uint32_t heldCallCount() const noexcept { return heldCalls_; }
  size_t heldMessageCount() const noexcept { return held_.size(); }
  uint32_t answerCount() const noexcept { return answersLive_; }
  // Entries the answer table's per-call vectors keep allocated, free entries included (tests
  // check a peer cannot make it grow to maxAnswers times the cap bound). Walks the table.
  size_t answerEntriesRetained() const noexcept;
  uint32_t exportCount() const noexcept { return exportsLive_; }
  uint32_t importCount() const noexcept { return importsLive_; }
  // RemoteCap/Request/RemotePromise/Response handles on this connection still alive anywhere
  // (the destructor requires none): an owner keeps a closed connection until this is 0.
  uint64_t handleCount() const noexcept { return handles_; }
  // `task` is posted to the loop (unless already queued) whenever the connection, once closed,
  // may have become free to destroy: when it closes with no handle left, and when its last
  // handle drops after it closed. For an owner that frees closed connections as soon as nothing
  // refers to them (client::Session); it checks handleCount() and sharedObjectsAlive() again
  // when the task runs. Not owned: it outlives the connection, or is set back to null first.
  void postWhenUnreferenced(Task* task) noexcept { unreferencedTask_ = task; }
  // Whether an object this connection owned (one a method made, or the sharedBootstrap) and
  // that it shares with another connection (passed on by a Forwarder, or handed off to a third
  // vat) is still alive. Once this connection shut down, only the others keep such objects:
  // whatever they need of the connection's owner (a client's quota, which their charges refund)
  // must live until this is false. Objects it only passed on (shared by another connection) are
  // not counted. Prunes what went.
  bool sharedObjectsAlive() noexcept;
  // Entries of that watch list (pruned as it doubles): for tests and statistics.
  size_t sharedObjectsWatched() const noexcept { return sharedOut_.size(); }

  // Remote error text: Error::detail of an error that came from the peer points into this ring
  // of REMOTE_REASON_SLOTS slots of REMOTE_REASON_BYTES each, owned by the connection. It stays
  // readable until the connection is destroyed, and holds its text until that many newer remote
  // errors arrived; copy it to keep it longer.
  static constexpr size_t REMOTE_REASON_SLOTS = 64;
  static constexpr size_t REMOTE_REASON_BYTES = 128;

 private:
  friend class RemoteCap;
  friend class RemotePromise;
  friend class Response;
  friend class Request;
  friend class CallContext;
  friend class CapPromise;
  friend class detail::PromiseNode;
  friend class internal::Forwarder;
  friend class ConnectionRef;
  friend detail::TableBlock detail::takeTableBlock(RpcConnection&, size_t);
  friend void detail::giveTableBlock(RpcConnection&, detail::SpillBuffer*, size_t) noexcept;
  // One handle fewer; the last one on a closed connection posts unreferencedTask_.
  void dropHandle() noexcept {
    if (--handles_ == 0 && unreferencedTask_ != nullptr) postUnreferenced();
  }
  void postUnreferenced() noexcept;
  struct Question;
  struct Answer;
  struct AnswerPools;
  struct Export;
  struct Import;
  struct Decoded;

  // --- outbound ---
  // What a message that may have to wait in the queue is, for its bound (maxQueuedBytes): this
  // side's own Call is refused (OUT_OF_MEMORY, the caller may try later); a message the peer's
  // actions call for (a Return, a Resolve, ...) ends the connection, since the peer does not read
  // what it asks for; Finish and Release are bounded by this side's own tables and always go.
  // PRIVATE_REPLY: a REPLY built in a spill buffer even when the ring has room (results).
  enum class OutKind : uint8_t { CALL, REPLY, PRIVATE_REPLY, CONTROL };
  Status admitToQueue(OutKind kind, size_t bytes);
  Result<detail::OutSlot> startOut(size_t bytes, OutKind kind = OutKind::REPLY);
  Status finishOut(detail::OutSlot& slot);
  void abandonOut(detail::OutSlot& slot) noexcept;
  void flushQueue();
  Promise<void> pumpWhileFull();
  // A pooled buffer of at least `bytes`. One newly allocated is charged (RpcOptions::budget):
  // owed if the budget cannot pay now, or, `refusable`, refused (null) instead.
  detail::SpillBuffer* takeSpill(size_t bytes, bool refusable = false);
  void giveSpill(detail::SpillBuffer* buffer) noexcept;
  Status sendWords(std::span<const uint64_t> words, OutKind kind);
  void buildCall(Request& request);
  Status roomForQuestion(uint64_t replyBytes, bool held) const;
  void returnReplySpace(Question& q) noexcept;
  // Messages held for reply space (RpcOptions::whenReplySpaceIsFull): see held_.
  struct HeldMessage;
  bool holding() const noexcept { return !held_.empty(); }
  detail::SpillBuffer* spillWords(std::span<const uint64_t> words);
  Result<detail::SpillBuffer*> finishToSpill(detail::OutSlot& slot);
  Result<detail::SpillBuffer*> finishToHold(detail::OutSlot& slot);
  void holdDisembargo(detail::SpillBuffer* buffer, uint32_t exportId, uint32_t provideQuestion);
  void holdCall(detail::SpillBuffer* buffer, uint32_t questionId, uint32_t replyReserve,
                Request& request);
  void releaseHeld(HeldMessage& m) noexcept;
  Status writeHeldCaps(HeldMessage& m);
  void rejectQuestion(Question& q, const Error& error);
  detail::SpillBuffer* resumeInSpill(const capnp::word* words, size_t used, size_t bytes);
  void failUnsent(HeldMessage& m, const Error& error);
  Error refusedName(bool toAnswer, uint32_t targetId, const detail::CapTable* caps) const noexcept;
  static size_t heldSize(size_t messageBytes, const detail::CapTable& caps) noexcept;
  Status passable(const detail::CapTable& caps) const;
  void dropHeldCall(uint32_t questionId) noexcept;
  void dropAllHeld() noexcept;
  Status admitToHold(size_t bytes) const;
  void sendHeld();
  // RpcOptions::maxHoldTime: fails the oldest held calls once held too long.
  void armHoldTimer();
  Promise<void> expireHeld();
  // True when it went (or was queued to go).
  bool sendFinish(uint32_t questionId, bool releaseResultCaps);
  void queueFinish(uint32_t questionId);
  void flushFinishes();
  // Every message is published at once but its doorbell is rung by ringTask_, once for all the
  // messages a turn of the loop sends (Sender::commitWithoutRing): a burst of calls or returns
  // pays one locked ring. ringTask_ is posted with EventLoop::postBeforeWait, so it runs before
  // the loop's thread can wait for anything or leave run(); a message sent outside any turn is
  // rung at once. The reader also rings at the end of each of its turns (so a parked peer never
  // waits behind other readers' turns) and every RING_EVERY_MESSAGES messages it handles, and a
  // full outbound ring is announced before the pump waits for space.
  static constexpr uint32_t RING_EVERY_MESSAGES = 16;
  void commitOut(size_t bytes);
  void published();
  void ringPeer();
  void freeQuestion(uint32_t questionId) noexcept;
  void sendRelease(uint32_t importId, uint32_t count);
  void sendAbort(const Error& reason);
  void writeException(wire::Exception::Builder b, const Error& e);
  Status writeCapTable(capnp::List<wire::CapDescriptor>::Builder out, detail::CapTable& caps);
  // Adds an entry to a cap table of this connection: OUT_OF_MEMORY (the table unchanged, the
  // entry dropped) when it holds RpcOptions::maxCapsPerMessage already. tableFull() says so
  // beforehand, for entries whose dropping would have effects (a Provide sent, a Finish).
  Result<uint32_t> addEntry(detail::CapTable& table, detail::CapEntry entry);
  bool tableFull(const detail::CapTable& table) const noexcept {
    return table.size() >= options_.maxCapsPerMessage;
  }
  // Makes room for a cap table of `caps` entries in a message being built: when the slot's
  // buffer lacks it, the message moves into a pooled spill buffer of the size it needs (its
  // builders must be taken again from the slot). MESSAGE_TOO_LARGE past maxMessageBytes.
  Status roomForCapTable(detail::OutSlot& slot, const detail::CapTable& caps, OutKind kind);

  // --- client side ---
  Request newCall(const RemoteCap& target, uint64_t interfaceId, uint16_t methodId,
                  size_t sizeHint);
  // newCall for a target this connection serves. Every path returns the one named Request, so
  // it is built in the caller's place (a Request is a few hundred bytes: its inline cap table).
  Request newCallHere(const RemoteCap& target, uint64_t interfaceId, uint16_t methodId,
                      size_t sizeHint);
  // Sends the request's Call and clears its cap table.
  RemotePromise sendRequest(Request& request);
  const Error* refusedResults(const RemoteCap& cap) const noexcept;
  void releaseTarget(Request& request) noexcept;
  void unrefTarget(bool toAnswer, uint32_t id) noexcept;
  void questionRef(uint32_t id) noexcept;
  void questionUnref(uint32_t id) noexcept;
  void importRef(uint32_t id) noexcept;
  void importUnref(uint32_t id) noexcept;
  // One more reference the peer gave us to import `id`, whose local reference the caller holds
  // (RpcOptions::releaseReferencesAt).
  void countImported(uint32_t id) noexcept;
  Result<ReceivedCap> receivedCap(capnp::List<wire::CapDescriptor>::Reader caps, uint32_t index,
                                  std::span<const RemoteCap> handedOff);
  void releaseResponse(detail::ResponseSlot* slot) noexcept;
  void relocate(detail::ResponseSlot* slot);
  // `inParams`: the table is a Call's (a capability pipelined on a question of this connection
  // goes back as receiverAnswer only there).
  Result<uint32_t> addCapFor(detail::CapTable& table, const RemoteCap& cap, bool inParams = false);
  Result<uint32_t> addPromiseFor(detail::CapTable& table, const CapPromise& promise);
  Result<uint32_t> addReceivedFor(detail::CapTable& table, RpcConnection& origin,
                                  const ReceivedCap& cap);
  static Status forwardParamCaps(const CallContext& from, Request& to);
  static Status forwardResultCaps(const Response& from, CallContext& to);

  // --- three-party handoff (handoff.cpp) ---
  Result<uint32_t> addForeignCap(detail::CapTable& table, const RemoteCap& cap);
  void settleForeignCaps(detail::CapTable& table, bool inReturn = false);
  Result<RemoteCap> sendProvide(uint32_t importId, VatId recipient, uint64_t provisionId);
  RemoteCap sendAccept(VatId introducer, uint64_t provisionId, RemoteCap vine,
                       bool embargo = false);
  Status resolveHosts(Decoded& d);
  RemoteCap acceptThirdParty(const Decoded& d, uint32_t index, bool embargo = false);
  void takeProvision(Answer& accept, RpcConnection& provider, uint32_t provideAnswer);
  bool canHandOff(const RpcConnection& host) const noexcept;
  Status decodeDisembargo(wire::Disembargo::Reader m, Decoded& d);
  Status handleDisembargo(const Decoded& d);
  void sendDisembargo(uint32_t exportId, uint32_t provideQuestion);
  void forwardDisembargo(uint32_t exportId);
  Status handleProvide(const Decoded& d);
  Status handleAccept(const Decoded& d);
  void acceptOrWait(Answer& accept);
  bool waitOnProvision(Answer& accept, detail::HandoffTable& table, bool embargoed,
                       bool queued = false);
  void releaseQueuedAccepts(uint32_t exportId);
  static Answer& unparked(RpcConnection& conn, uint32_t answerId) noexcept;
  void completeAccept(Answer& accept, ServerObject* object, std::shared_ptr<ServerObject> owner);
  void completeProvide(uint32_t answerId);
  void dropProvision(Answer& answer) noexcept;
  void stopWaiting(Answer& answer) noexcept;
  std::shared_ptr<ServerObject> shareExport(uint32_t exportId);
  void leaveNetwork();
  uint32_t takeQuestionId();
  void giveQuestionId(uint32_t id) noexcept;
  void openQuestion(uint32_t id);

  // --- promise capabilities (promises.cpp) ---
  void settlePromise(detail::PromiseNode& node);
  void sendResolve(uint32_t exportId, detail::PromiseNode& node);
  void queueOnExport(Answer& answer, uint32_t exportId, detail::SpillBuffer* copy);
  void deliverOnExport(Answer& answer, uint32_t exportId);
  Status decodeResolve(wire::Resolve::Reader r, Decoded& d);
  bool heldPromiseOrResolved(uint32_t importId) const noexcept;
  void rollBackExports(detail::CapTable& caps) noexcept;
  // receiverAnswer in a call's params (answers.cpp).
  bool mustQueueOnExport(const Answer& a, uint32_t exportId) const noexcept;
  static bool promiseHoldsCalls(const Export& e) noexcept;
  void scheduleWorklist();
  void cancelLaterIfUnwanted(Answer& a);
  void resolveParamAnswer(Answer& a, uint32_t slot, std::span<const uint16_t> path, Answer& answer);
  void dropParamAnswers(Answer& a);
  void cancelIfUnwanted(Answer& a);
  void wakeParamWaiters(Answer& answer);
  void settleExport(uint32_t exportId);
  void drainExport(uint32_t exportId);
  Status handleResolve(const Decoded& d);
  uint32_t resolvedImport(uint32_t importId, Error& broken) const noexcept;
  void noteImported(uint32_t importId, detail::CapEntry::Kind kind) noexcept;
  Result<uint32_t> addPipelinedFor(detail::CapTable& table, const RemoteCap& cap);
  void watchAnswer(const std::shared_ptr<detail::PromiseNode>& node);
  void takeWatchers(const Decoded& d);
  void failWatchers(const Error& error);
  static void settleAwaited(detail::PromiseNode& node, Result<RemoteCap> resolution);
  void settleWatched();
  bool isPlainImport(uint32_t importId) const noexcept;
  bool sendHandOffResolve(uint32_t exportId, detail::PromiseNode& node);

  // --- inbound ---
  Promise<void> readLoop();
  Status checkOneKindPerId(const Decoded& d);
  Promise<void> dispatchCaught(ServerObject& object, uint64_t interfaceId, uint16_t methodId,
                               CallContext& ctx);
  Status handleMessage(IncomingMessage& message);
  Status decode(wire::Message::Reader m, Decoded& d);
  bool decodeCommon(std::span<const std::byte> frame, Decoded& d, Status& verdict);
  Status checkNewQuestion(uint32_t questionId) const;
  Status checkCallTarget(const Decoded& d) const;
  Status checkReturnId(uint32_t answerId) const;
  Status checkNoFinishNeeded(const Decoded& d) const;
  Status checkFinish(uint32_t answerId, bool releaseResultCaps);
  Status checkRelease(uint32_t exportId, uint32_t count) const;
  Status decodeCapTable(capnp::List<wire::CapDescriptor>::Reader caps, Decoded& d);
  // One cap-table entry, checked (decodeCapTable's rules).
  struct DecodedCap;
  Status decodeCap(wire::CapDescriptor::Reader c, wire::Message::Which which,
                   DecodedCap& out) const;
  // A cap table longer than maxCapsPerMessage: checked entry by entry, then refused (d.refused).
  Status refuseCapTable(capnp::List<wire::CapDescriptor>::Reader caps, Decoded& d);
  // Takes the references a refused table gave, as if received, and drops them at once.
  void dropRefusedCaps(const Decoded& d);
  bool resultsReleased(const Decoded& d) const noexcept;
  void notePromisesOf(capnp::List<wire::CapDescriptor>::Reader caps);
  void notePromise(uint32_t importId);
  // Points d's per-entry arrays at capScratch_, grown to `n` entries first if need be.
  void scratchFor(Decoded& d, uint32_t n);
  Status handleCall(IncomingMessage& message, const Decoded& d);
  Status handleReturn(IncomingMessage& message, const Decoded& d);
  Status handleFinish(uint32_t answerId, bool releaseResultCaps);
  void dropReleasedResults(Answer& a) noexcept;
  Status handleRelease(uint32_t exportId, uint32_t count);
  // Copies a reason into the ring of remote reasons (REMOTE_REASON_SLOTS): the Error that
  // carries it then lives as long as the connection, as a peer's error does.
  const char* copyRemoteReason(capnp::Text::Reader reason);
  const char* copyRemoteReason(const char* text);  // NUL-terminated, or null
  const char* copyRemoteReason(const char* text, size_t size);
  Error remoteError(wire::Exception::Reader e);

  // --- server side ---
  // `paid`: where to say whether RpcOptions::budget paid for a new entry (a Call's; it is then
  // refused if not). Null: what it cannot pay is owed.
  Answer& answerAt(uint32_t id, bool* paid = nullptr);
  void deliver(Answer& answer, uint32_t exportId, uint64_t interfaceId, uint16_t methodId,
               capnp::AnyStruct::Reader payload);
  void deliverQueued(Answer& answer);
  detail::SpillBuffer* copyCall(IncomingMessage& message, const Decoded& d);
  detail::SpillBuffer* copyToQueue(Answer& a, IncomingMessage& message, const Decoded& d);
  void keepQueuedCall(Answer& a, detail::SpillBuffer* copy) noexcept;
  detail::SpillBuffer* takeQueuedCall(Answer& a) noexcept;
  Result<uint32_t> resolvePipeline(Answer& target, std::span<const uint16_t> path);
  uint32_t settledRoute(uint32_t exportId) const noexcept;
  Promise<void> drive(uint32_t answerId, Promise<void> dispatch);
  void completeAnswer(uint32_t answerId, Status status);
  void failAnswer(Answer& answer, const Error& error);
  void settleQueue(Answer& answer);
  void runWorklist();
  void finishAnswerIfDone(Answer& answer);
  void releaseAtReturn(Answer& answer);
  void unlinkFromTarget(Answer& answer);
  void freeAnswer(Answer& answer);
  Result<uint32_t> exportObject(ServerObject* object, std::unique_ptr<ServerObject> owned,
                                std::shared_ptr<ServerObject> shared = nullptr);
  void exportUnpin(uint32_t id) noexcept;
  void maybeFreeExport(uint32_t id) noexcept;
  Result<capnp::AnyPointer::Builder> initResults(CallContext& context, size_t sizeHint);

  void fail(Error reason);
  void teardown();
  // RpcOptions::budget. charge(): what it cannot pay now is owed. tryCharge(): false, nothing
  // charged, when it cannot pay now.
  void charge(size_t bytes) noexcept;
  bool tryCharge(size_t bytes) noexcept;
  template <class T>
  void chargeGrowth(const std::vector<T>& table, size_t capacityBefore) noexcept {
    if (table.capacity() > capacityBefore) charge((table.capacity() - capacityBefore) * sizeof(T));
  }
  void settleDebt() noexcept;
  void startPayingDebt();
  Promise<void> payDebt();
  size_t readHeadroom(size_t frameBytes) const noexcept;
  bool budgetShort(size_t frameBytes) const noexcept;
  void budgetRefused() noexcept;
  void endForQuota(const Error& why);
  void afterRingClosed();
  void enqueue(detail::SpillBuffer* message);

  MessageSender& tx_;
  MessageReceiver& rx_;
  EventLoop& loop_;
  RpcOptions options_;
  RpcStats stats_;
  Error failure_{};
  bool inReader_ = false;
  bool ringOpen_ = false;     // an OutSlot holds a ring reservation
  bool pumpRunning_ = false;  // pumpWhileFull() waits for ring space
  bool detachPending_ = false;
  bool workRunning_ = false;
  bool inPump_ = false;
  uint32_t dispatching_ = 0;  // synchronous dispatch() calls on the stack (shutdown defers then)

  std::vector<Question> questions_;
  uint32_t questionFree_;
  uint32_t questionsLive_ = 0;
  uint64_t replyReserved_ = 0;  // reply space reserved by questions not yet returned
  uint64_t replyBudget_ = 0;    // the capacity of the ring rx_ reads
  // Messages held until reply space frees (RpcOptions::whenReplySpaceIsFull), in send order:
  // calls (their questions open, Question::held), and the Disembargoes sent behind them. A
  // list: a dropped call leaves from the middle.
  std::list<HeldMessage> held_;
  uint32_t heldCalls_ = 0;            // the calls among them
  std::vector<uint32_t> heldToDrop_;  // dropHeldCall's worklist
  bool droppingHeld_ = false;
  size_t heldBytes_ = 0;  // their bytes: with queuedBytes_, bounded by maxQueuedBytes
  std::optional<Promise<void>> holdTimer_;  // expireHeld(), while calls are held (maxHoldTime)
  bool holdTimerRunning_ = false;
  bool inHoldTimer_ = false;    // expireHeld() is failing a call: teardown leaves the timer be
  size_t queuedCallBytes_ = 0;  // the peer's calls kept to deliver later: maxQueuedCallBytes
  std::vector<std::unique_ptr<Answer>> answers_;  // by the peer's question id
  uint32_t answersLive_ = 0;
  std::vector<Export> exports_;
  uint32_t exportFree_;
  uint32_t exportsLive_ = 0;
  using ExportIndex = std::unordered_map<ServerObject*, uint32_t>;
  ExportIndex exportByObject_;
  // Nodes of entries erased from exportByObject_, reused by the next export: an object that is
  // released and exported again (a chain of calls returning the same object) allocates nothing.
  // At most MAX_SPARE_EXPORT_NODES; reserved at construction.
  static constexpr size_t MAX_SPARE_EXPORT_NODES = 64;
  std::vector<ExportIndex::node_type> spareExportNodes_;
  std::vector<Import> imports_;  // by the peer's export id
  uint32_t importsLive_ = 0;
  uint64_t handles_ = 0;  // live RemoteCap/Request/RemotePromise/Response on this connection
  Task* unreferencedTask_ = nullptr;  // postWhenUnreferenced

  // Outbound queue of spilled messages (FIFO) and the spill pool (free lists by size class).
  detail::SpillBuffer* queueHead_ = nullptr;
  detail::SpillBuffer* queueTail_ = nullptr;
  size_t queuedBytes_ = 0;  // of the messages in the queue
  std::vector<std::unique_ptr<detail::SpillBuffer>> spillStore_;
  std::array<detail::SpillBuffer*, 16> spillFree_{};  // SPILL_CLASSES (connection_internal.h)
  std::optional<Promise<void>> pump_;

  // Finish for questions whose Return arrived: sent by finishTask_, behind what the current task
  // sends (queueFinish). The questions stay in use (their ids unused) until it goes out.
  static constexpr uint32_t MAX_QUEUED_FINISHES = 64;
  std::array<uint32_t, MAX_QUEUED_FINISHES> queuedFinishes_{};
  uint32_t queuedFinishCount_ = 0;

  // Answers whose queued pipelined calls can now be settled (run iteratively, not recursively).
  std::vector<uint32_t> worklist_;
  std::vector<std::weak_ptr<ServerObject>> sharedOut_;  // shareExport's, pruned as they go
  static constexpr size_t SHARED_OUT_PRUNE_FLOOR = 64;
  size_t sharedOutPruneAt_ = SHARED_OUT_PRUNE_FLOOR;
  std::vector<uint32_t> exportsToDrain_;   // exports whose queued calls may go on (drainExport)
  std::vector<uint32_t> answersToCancel_;  // finished answers nothing needs any more
  uint64_t callsArrived_ = 0;              // Answer::arrival

  // A handoff's host connection being made (the reader waits for it), and the outcomes of
  // those made for the message being handled (consulted when it is handled again).
  std::optional<Promise<RpcConnection*>> connecting_;
  VatId connectingVat_ = NO_VAT;
  std::vector<std::pair<VatId, Result<RpcConnection*>>> connected_;
  // Promise capabilities (of other connections) waiting for one of our questions to return:
  // (question id, node); see PromiseNode::awaiting_.
  std::vector<std::pair<uint32_t, std::weak_ptr<detail::PromiseNode>>> watchers_;
  // Those whose question just returned, with what it returned: settled once the Return is
  // handled (settling drops their references on the question).
  std::vector<std::pair<std::shared_ptr<detail::PromiseNode>, Result<RemoteCap>>> settling_;

  // Responses: pooled slots, and the one that may still hold the inbound frame.
  std::vector<std::unique_ptr<detail::ResponseSlot>> responseStore_;
  detail::ResponseSlot* responseFree_ = nullptr;
  detail::ResponseSlot* heldSlot_ = nullptr;
  // checkOneKindPerId: (id, promise); checkFinish: (id, unused).
  std::vector<std::pair<uint32_t, bool>> kindScratch_;
  bool resumedCaller_ = false;  // a Return just woke its caller: the reader yields to it first
  std::optional<Fulfiller<void>> disconnected_;
  std::array<std::array<char, REMOTE_REASON_BYTES>, REMOTE_REASON_SLOTS> reasons_{};
  uint32_t nextReason_ = 0;
  detail::CapScratch capScratch_;             // Decoded's per-entry arrays
  std::unique_ptr<AnswerPools> answerPools_;  // large vectors of answer entries, reused
  // Decodes this side's private copies (queued calls, results kept for pipelining).
  FrameReader replayReader_;
  // RpcOptions::budget: bytes taken from it; bytes allocated that it has not paid for yet,
  // asked for by payDebt() (a task of its own) or by the reader before it reads on.
  size_t charged_ = 0;
  size_t debt_ = 0;
  // Answer entries (Answer::unpaid) and table slots the budget could not pay for are kept,
  // uncharged, for calls refused (the caller finishes them; an entry is paid before it serves a
  // call), bounded by maxAnswers and maxImports; never the reason the connection ends.
  bool refusingForQuota_ = false;  // handleCall releases a refused call's capabilities
  // available() when the budget last refused to grow for a message: the reader asks again once
  // more is available (something given back) or after spentUntil_ (backing off from
  // SPENT_BACKOFF_MIN to SPENT_BACKOFF_MAX while it keeps refusing). NOT_SPENT: not refused.
  static constexpr size_t NOT_SPENT = ~size_t{0};
  static constexpr Duration SPENT_BACKOFF_MIN = std::chrono::milliseconds(50);
  static constexpr Duration SPENT_BACKOFF_MAX = std::chrono::seconds(1);
  size_t spentAt_ = NOT_SPENT;
  TimePoint spentUntil_{};
  Duration spentBackoff_ = Duration::zero();
  bool payingDebt_ = false;
  std::optional<Promise<void>> debtPayment_;
  MemberTask<&RpcConnection::startPayingDebt> debtTask_;
  MemberTask<&RpcConnection::teardown> teardownTask_;
  MemberTask<&RpcConnection::runWorklist> worklistTask_;
  MemberTask<&RpcConnection::flushFinishes> finishTask_;
  MemberTask<&RpcConnection::ringPeer> ringTask_;
  MemberTask<&RpcConnection::sendHeld> heldTask_;  // sends held messages as space frees
  std::optional<Promise<void>> reader_;  // last: started by the constructor, dropped first
};

// A counted reference to a connection, for code that keeps one past the call that gave it (a
// client::Session's OpenedBushel, an event stream): it counts in handleCount() as a RemoteCap
// does, so an owner that frees a closed connection once its handles are gone (client::Session,
// client::ServiceHost) keeps this one alive, and destroying the connection while a reference
// is left is caught (RpcConnection's destructor check). It holds no capability: the peer sees
// nothing of it. Loop thread only, as every handle.
class ConnectionRef {
 public:
  ConnectionRef() = default;
  explicit ConnectionRef(RpcConnection& conn) noexcept : conn_(&conn) { ++conn_->handles_; }
  ConnectionRef(const ConnectionRef& o) noexcept : conn_(o.conn_) {
    if (conn_ != nullptr) ++conn_->handles_;
  }
  ConnectionRef(ConnectionRef&& o) noexcept : conn_(std::exchange(o.conn_, nullptr)) {}
  ConnectionRef& operator=(ConnectionRef o) noexcept {
    std::swap(conn_, o.conn_);
    return *this;
  }
  ~ConnectionRef() { reset(); }

  void reset() noexcept {
    if (RpcConnection* c = std::exchange(conn_, nullptr); c != nullptr) c->dropHandle();
  }
  RpcConnection* get() const noexcept { return conn_; }
  RpcConnection& operator*() const noexcept { return *conn_; }
  RpcConnection* operator->() const noexcept { return conn_; }
  explicit operator bool() const noexcept { return conn_ != nullptr; }

 private:
  RpcConnection* conn_ = nullptr;
};

// The MessageReceiverOptions an RPC connection's receiver needs (capability pointers allowed),
// with deferred frame releases (the connection's reader flushes them before every wait).
MessageReceiverOptions rpcReceiverOptions(MessageReceiverOptions base = {});

}  // namespace agate::rpc
