# Agate's RPC wire protocol: the messages two vats exchange over one RPC connection (a bushel:
# a request ring client->server and a reply ring server->client, used as the two directions of
# one symmetric connection; either side may export capabilities and receive calls).
#
# Shaped after Cap'n Proto's own rpc.capnp (two-party subset): questions, answers, exports and
# imports, promise pipelining through promised answers, Finish and Release. Every frame of the
# connection carries exactly one `Message` as its root.
#
# The four id spaces (each side has all four; an id is only meaningful with its direction):
#
#   question id  allocated by the CALLER when it sends a Call; names the same entry in the
#                callee's answer table. Reusable by the caller only once BOTH the callee's Return
#                for it has arrived AND the caller has sent Finish for it (so neither side can
#                confuse an old and a new use). A Call naming a question id whose answer is still
#                in use (no Finish yet, or Finish sent but Return not yet) is a protocol error.
#   answer id    the callee's name for the caller's question id: the same number.
#   export id    allocated by the side that HOSTS an object, when it first puts a capability to
#                it in a message's cap table (senderHosted). Export id 0 is the bootstrap object,
#                exported implicitly for the life of the connection and never released.
#                Reusable by the host once the peer's Release messages brought its reference
#                count to zero and no call on it is still running.
#   import id    the peer's name for that export: the same number.
#
# Peer death (the bushel's other end detaches, its process dies, or the connection aborts):
# every question still waiting for a Return fails with DISCONNECTED (or PROTOCOL_ERROR after an
# abort caused by malformed input); every answer's running call is cancelled; every export's
# reference count held by the peer is dropped (objects the connection owns are destroyed); every
# import turns into a broken capability whose calls fail with DISCONNECTED. No id of a dead
# connection is ever reused.
#
# Hostile input: a message that does not decode, names an id that is not live in the direction
# it must be, reuses a question id before Finish and Return, releases more references than it
# holds, or carries a cap index outside its cap table aborts the connection with PROTOCOL_ERROR.
# A pipelined call whose path does not lead to a capability in a returned answer gets a per-call
# exception instead (as in Cap'n Proto: the caller could not know the results' shape).

@0xae8a893bc4ec1451;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("agate::rpc::wire");

struct Message {
  union {
    abort @0 :Exception;
    # The sender is closing the connection because of an error. After sending it the sender
    # detaches; the receiver fails everything pending (see "Peer death") with the reason.

    call @1 :Call;
    return @2 :Return;
    finish @3 :Finish;
    release @4 :Release;

    resolve @5 :Resolve;
    disembargo @6 :Disembargo;
    # Reserved for promise capabilities and embargoes (three-party handoff, route changes). This
    # version never sends them and aborts with PROTOCOL_ERROR when it receives one.
  }
}

struct Call {
  questionId @0 :UInt32;
  # Allocated by the caller from its question table (see the header): the callee must not hold
  # an answer with this id. Freed by the caller after Return received AND Finish sent.

  target @1 :MessageTarget;
  # The object to call: one of the callee's exports, or a capability inside the results of one
  # of the callee's answers that may not exist yet (promise pipelining).

  interfaceId @2 :UInt64;
  methodId @3 :UInt16;
  # Which method. Interpreted only by the target object's dispatch.

  params @4 :Payload;
  # The method's parameters, built in place in the caller's ring frame.
}

struct MessageTarget {
  union {
    importedCap @0 :UInt32;
    # An export id of the message's RECEIVER (its export, the sender's import). Must be live in
    # the receiver's export table, or the connection aborts with PROTOCOL_ERROR.

    promisedAnswer @1 :PromisedAnswer;
    # A capability inside an answer of the receiver (a question of the sender). The answer must
    # be live (no Finish received for it), or the connection aborts with PROTOCOL_ERROR. While
    # the answer has not returned, calls on it are queued in arrival order and delivered when it
    # returns; if it returned an exception, each gets that exception.
  }
}

struct PromisedAnswer {
  questionId @0 :UInt32;
  # The sender's question id (the receiver's answer id).

  transform @1 :List(UInt16);
  # A path of pointer-field indices, applied from the root of the answer's results content:
  # each step reads pointer field N of the struct reached so far. The pointer the last step
  # lands on must be a capability pointer, whose index selects an entry of the Return's cap
  # table. Empty: the content root itself is the capability. At most 8 steps.
}

struct Payload {
  content @0 :AnyPointer;
  # The params or results struct. A capability inside it is a Cap'n Proto capability pointer
  # whose index selects an entry of `capTable`.

  capTable @1 :List(CapDescriptor);
  # The capabilities the content refers to, at most 16. Each senderHosted entry adds one
  # reference to that export (the receiver releases it with Release, counting each time it
  # received the id).
}

struct CapDescriptor {
  union {
    none @0 :Void;
    # A null capability.

    senderHosted @1 :UInt32;
    # An export id of the message's sender, allocated (or reused, with one more reference) by
    # the sender when it wrote this entry. The receiver imports it.

    receiverHosted @2 :UInt32;
    # A capability the sender imported from the receiver, passed back to it: an export id of
    # the RECEIVER, which must be live there (else PROTOCOL_ERROR). Adds no reference.
  }
}

struct Return {
  answerId @0 :UInt32;
  # The caller's question id. Must name a question awaiting its Return (else PROTOCOL_ERROR).
  # Sent exactly once per Call, also after Finish (then usually `canceled`).

  union {
    results @1 :Payload;
    # Success. Built in place in the callee's ring frame; the caller reads it in place.

    exception @2 :Exception;
    # The call failed.

    canceled @3 :Void;
    # The caller sent Finish before the call completed; the callee cancelled it.
  }
}

struct Finish {
  questionId @0 :UInt32;
  # Sent by the caller once it no longer needs the answer: its promise and every capability
  # pipelined on it are gone. Before the Return it cancels the call (the callee drops the
  # running dispatch, then sends Return.canceled), unless calls pipelined on the answer are
  # queued there: they still need its results, so it runs on. Must name a live answer of the
  # receiver (else PROTOCOL_ERROR). The callee frees the answer once it has also sent the
  # Return and no queued call waits on it.
}

struct Release {
  id @0 :UInt32;
  # An export id of the message's receiver (an import of the sender). Must be live and not 0
  # (the bootstrap export is never released), else PROTOCOL_ERROR.

  referenceCount @1 :UInt32;
  # How many references to drop: the number of times the sender received this id in cap tables
  # since its last Release. More than the export holds is a PROTOCOL_ERROR. At zero the export
  # is freed (once no call on it is running) and its id may be reused.
}

struct Exception {
  reason @0 :Text;
  # Human-readable, at most 120 bytes are kept by the receiver.

  type @1 :Type;
  enum Type {
    failed @0;
    overloaded @1;
    disconnected @2;
    unimplemented @3;
  }

  errc @2 :UInt16;
  # Agate's error code (agate::Errc). A value this side does not know reads as FAILED.
}

struct Resolve {
  promiseId @0 :UInt32;
  union {
    cap @1 :CapDescriptor;
    exception @2 :Exception;
  }
}

struct Disembargo {
  target @0 :MessageTarget;
  embargoId @1 :UInt32;
}
