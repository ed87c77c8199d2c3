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
#                confuse an old and a new use), or once a Return with noFinishNeeded arrived (a
#                Call sent with noPromisePipelining: no Finish follows; see Return). A Call
#                naming a question id whose answer is still in use (no Finish yet, or Finish sent
#                but Return not yet) is a protocol error.
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
# holds, carries a cap table longer than the receiver's bound (Payload.capTable), carries a cap
# index outside its cap table, pipelines on a call sent with
# noPromisePipelining, or sets Return.noFinishNeeded where it may not be set aborts the
# connection with PROTOCOL_ERROR.
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
    # A promise capability (CapDescriptor.senderPromise) the sender exported has resolved. See
    # "Promise capabilities" below.

    disembargo @6 :Disembargo;
    # Lifts a three-party embargo when a promise resolves to a handed-off capability (see
    # "Embargoes" below). Only the contexts `accept` and `provide` are used.

    provide @7 :Provide;
    accept @8 :Accept;
    # Three-party handoff (see the section below). Only between vats that have a VatNetwork
    # (both connections know the peer's vat id); otherwise PROTOCOL_ERROR.
  }
}

# Three-party handoff
#
# Vat C (the introducer) holds an import from vat A (the provider) and passes it to vat B (the
# recipient) in a Call's params or a Return's results. B must end up calling A directly:
#
#   1. C -> A   Provide {questionId q, target = importedCap(e), recipient = B, provisionId p}
#               A records the provision (C, p) -> its export e, for B only.
#   2. C -> B   the cap-table entry thirdPartyHosted {vatId = A, provisionId = p, vineId = v}:
#               v is an export of C (the vine) that keeps the provision alive.
#   3. B -> A   (on B's own connection to A, made through the VatNetwork if needed)
#               Accept {questionId a, introducer = C, provisionId = p}. B's calls on the cap go
#               out at once, pipelined on a: promisedAnswer(a, [0]).
#   4. A        matches (C, p), checks that the Accept came from B, and returns the Accept with
#               AcceptResults {cap = senderHosted(e')}, e' an export of A on B's connection; it
#               then returns the Provide (empty results). B's pipelined calls are delivered.
#   5. B -> C   Release of the vine once the Accept returned (or failed); C then sends Finish
#               for the Provide.
#
# Order (E-order, no embargo needed): C's calls on the cap precede its Provide on the C->A ring;
# A dispatches calls on an export in arrival order, so they are all delivered before A reads the
# Provide. A never returns an Accept before the matching Provide has arrived (an early Accept
# waits, see Accept), and B's calls are queued on the Accept's answer until it returns. So every
# call C made before passing the cap is delivered before any call B makes on it. B never calls
# through the vine (its calls on the handed-off cap always go to A), and a reference that B got
# pipelined on an answer of C stays a reference through C (C forwards). The one route that
# changes is a promise's, when it resolves to a handed-off capability: see "Embargoes" (after
# Disembargo).
#
# Failure: every way a provision can end is one of its three ids ending, so nothing leaks:
#   * B accepts: A frees the provision and returns the Provide.
#   * B never accepts (drops the cap unused, fails, dies): the vine's last reference goes
#     (Release, or C-B's death), C sends Finish for the Provide; A frees the provision and
#     returns Provide.canceled.
#   * C dies: A frees every provision C made; an Accept naming one gets DISCONNECTED.
#   * A dies: C's Provide and B's Accept fail DISCONNECTED; B's pipelined calls with them.
#   * B dies before its Accept returns: A frees the Accept's answer (and a waiting Accept).

struct ThirdPartyCapDescriptor {
  vatId @0 :UInt64;
  # The provider: the vat that hosts the object. Never the sender (it would use senderHosted),
  # never the receiver (receiverHosted) and never 0, else PROTOCOL_ERROR.

  provisionId @1 :UInt64;
  # Chosen by the sender (the introducer) from its vat-wide counter; strictly increasing over
  # all the Provides it sends to any one provider, never reused. Names, with the introducer's
  # vat id, the provision at the provider.

  vineId @2 :UInt32;
  # An export id of the sender (one reference, released as for senderHosted). While the receiver
  # holds it the introducer keeps the provision; its release reclaims an unaccepted provision.
  # The vine forwards calls to the object, but the recipient never calls it.
}

struct Provide {
  questionId @0 :UInt32;
  # The introducer's question id on its connection to the provider (the same id space as
  # Call.questionId, the same rules). The provider returns empty results once the recipient
  # accepted, or an exception when it cannot keep the provision. Finish before the Return
  # reclaims the provision (Return.canceled follows).

  target @1 :MessageTarget;
  # The provided object: importedCap of a live export of the provider (else PROTOCOL_ERROR). A
  # promisedAnswer target is refused with an UNSUPPORTED exception.

  recipient @2 :UInt64;
  # The only vat whose Accept may take the provision. Not 0, not the provider, not the
  # introducer (else PROTOCOL_ERROR).

  provisionId @3 :UInt64;
  # See ThirdPartyCapDescriptor.provisionId. Must be greater than every provision id this
  # introducer sent to this provider before (a replayed or reordered Provide is a
  # PROTOCOL_ERROR).
}

struct Accept {
  questionId @0 :UInt32;
  # The recipient's question id on its connection to the provider (Call.questionId's rules).
  # Returns AcceptResults; calls may be pipelined on it with the path [0]. An Accept that
  # arrives before its Provide waits for it (bounded: at most a few hundred per provider) until
  # the Provide arrives, a Provide with a higher id from the same introducer shows it never
  # will (NOT_FOUND), the introducer disconnects (DISCONNECTED), or the recipient sends Finish.

  introducer @1 :UInt64;
  # The vat that sent the Provide (the one the recipient got the cap from).

  provisionId @2 :UInt64;
  # From the ThirdPartyCapDescriptor. Errors (the Accept's answer gets an exception; the
  # provision, if any, is left as it was): no such provision and the introducer connected with
  # a later one seen: NOT_FOUND (never provided, already accepted, or reclaimed); the
  # introducer is not connected to the provider: DISCONNECTED; the provision names another
  # recipient: PERMISSION_DENIED.

  embargo @3 :Bool;
  # The recipient took the capability from a Resolve of a promise (see "Embargoes"): the provider
  # completes the Accept only once the introducer's Disembargo {provide} for the provision has
  # arrived too. Meanwhile the Accept waits (counted with the Accepts that wait for their Provide:
  # past the recipient's bound it fails OUT_OF_MEMORY); if the provision is reclaimed first it
  # fails NOT_FOUND, if the introducer disconnects DISCONNECTED. A second Accept for a provision
  # an embargoed Accept is waiting on gets NOT_FOUND.
}

struct AcceptResults {
  cap @0 :AnyPointer;
  # A capability pointer: index 0 of the Return's cap table, senderHosted by the provider.
}

struct Call {
  questionId @0 :UInt32;
  # Allocated by the caller from its question table (see the header): the callee must not hold
  # an answer with this id. Freed by the caller after Return received AND Finish sent, or at a
  # Return with noFinishNeeded (then no Finish is sent).

  target @1 :MessageTarget;
  # The object to call: one of the callee's exports, or a capability inside the results of one
  # of the callee's answers that may not exist yet (promise pipelining).

  interfaceId @2 :UInt64;
  methodId @3 :UInt16;
  # Which method. Interpreted only by the target object's dispatch.

  params @4 :Payload;
  # The method's parameters, built in place in the caller's ring frame.

  noPromisePipelining @5 :Bool;
  # The caller promises never to pipeline on this call's results: no Call or Provide will
  # target promisedAnswer(questionId) (one that does is a PROTOCOL_ERROR). Set by typed stubs for
  # methods whose results can hold no capability, and by Request::noPipelining(). It lets the
  # callee end the question with its Return alone (Return.noFinishNeeded): two messages per
  # call instead of three.
}

struct MessageTarget {
  union {
    importedCap @0 :UInt32;
    # An export id of the message's RECEIVER (its export, the sender's import). Must be live in
    # the receiver's export table, or the connection aborts with PROTOCOL_ERROR.

    promisedAnswer @1 :PromisedAnswer;
    # A capability inside an answer of the receiver (a question of the sender). The answer must
    # be live (no Finish received for it) and its Call not sent with noPromisePipelining, or the
    # connection aborts with PROTOCOL_ERROR. While
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
  # The capabilities the content refers to: at most the receiving connection's bound
  # (RpcOptions::maxCapsPerMessage, 256 by default, never above 16384). A longer table (a sender
  # whose bound is larger) is still checked entry by entry (a malformed entry aborts with
  # PROTOCOL_ERROR), then refused as a message: its call is answered with an exception
  # (errc MESSAGE_TOO_LARGE), or its results fail the caller's question with that error (the
  # caller still sends Finish; calls it pipelines on that question fail there too), and the
  # receiver releases every reference the table carried, one Release per distinct id (a vine
  # too). A Return with noFinishNeeded may not carry a table at all, and no table may be longer
  # than 16384 entries (PROTOCOL_ERROR). Each senderHosted entry adds one reference to that export (the receiver releases it
  # with Release, counting each time it received the id).
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
    thirdPartyHosted @3 :ThirdPartyCapDescriptor;
    # A capability the sender imported from a third vat, handed off so that the receiver talks
    # to that vat directly (see "Three-party handoff"). Sent only when both of the sender's
    # connections have a VatNetwork. A receiver without one gets a broken capability (its calls
    # fail UNSUPPORTED) and releases the vine. Also the resolution of a promise (Resolve.cap,
    # see "Embargoes").

    senderPromise @4 :UInt32;
    # As senderHosted (an export id of the sender, one more reference, released the same way),
    # but the export is a promise: a capability the sender does not know yet. Calls on it go to
    # the sender, which queues them until it resolves; the sender then sends one Resolve for it
    # (see "Promise capabilities"). Reusing the id later as senderHosted ends its promise state.

    receiverAnswer @5 :PromisedAnswer;
    # A capability pipelined on one of the sender's own questions to the receiver, passed back to
    # it: the capability at `transform` in the results of the receiver's answer `questionId`. Only
    # in a Call's params (elsewhere PROTOCOL_ERROR). The answer must be live at the receiver: not
    # freed, no Finish received, not a call sent with noPromisePipelining, and the path at most 8
    # steps (else PROTOCOL_ERROR). The sender keeps the question (sends no Finish for it) until
    # this Call is sent, so the Call precedes that Finish on the ring. Adds no reference.
    #
    # The receiver resolves the entry as soon as that answer has returned (the receiver's own
    # object, as for receiverHosted; a broken capability with the answer's error; UNSUPPORTED
    # for a capability the receiver does not host itself), and delivers the Call once all its
    # entries are resolved, keeping E-order on the Call's target: later calls to the same
    # export wait behind it (calls older than it, pipelined on another answer, do not). Until
    # the answer returns, a Finish for it does not cancel it while such a Call waits; it is
    # cancelled once none does. Its id lifetime is unchanged: Return and Finish free it.
  }
}

# Promise capabilities
#
# A vat may pass a capability it does not have yet (CapPromise: resolved later to an object, a
# capability of any connection, or an error). It goes out as senderPromise(p), an export of the
# sender. The receiver imports p like any export: it calls importedCap(p), and the sender
# queues those calls, in arrival order, until the promise resolves. On resolution the sender:
#
#   1. delivers every queued call to the resolution (or fails each with the error), in order;
#   2. sends Resolve {promiseId = p, cap | exception} if the receiver still holds references;
#   3. from then on delivers calls that arrive on p to the resolution at once, on arrival.
#
# The receiver then sends new calls on its references to p to the resolution's id (senderHosted
# q: importedCap(q)), or fails them with the exception.
#
# Order (E-order) without an embargo: every call the receiver made on p before it read the
# Resolve precedes, on the receiver->sender ring, every call it makes on q afterwards. The
# sender delivers calls on p on arrival (step 3; the queued ones went in step 1, before the
# Resolve was even written), and calls on q on arrival, so both reach the object in the order
# the receiver made them. An embargo (Disembargo) is needed only where the receiver's later
# calls would take a different path than its earlier ones: a promise resolving to a capability
# the receiver hosts (it would call its own object directly while earlier calls still travel
# through the sender) or a handed-off one. This version never shortens the first: a promise
# that resolves to a capability the receiver hosts is announced as receiverHosted, but the
# receiver goes on calling p and the sender forwards those calls back (in order). One that
# resolves to a capability of a third vat is handed off when the sender can introduce the
# receiver to that vat (Resolve {thirdPartyHosted}, with the embargo described under
# "Embargoes"), else proxied through the sender (senderHosted of a forwarding export).
#
# A resolution is never itself a promise (the sender resolves to an object, a forwarding export
# or a capability of the receiver), and a capability the receiver holds never turns into a
# promise or back: so a reference is redirected at most once, and no chain or loop can form.
#
# Hostile input (PROTOCOL_ERROR, checked before anything changes): a Resolve for an id the
# receiver never got as senderPromise, or already resolved; a Resolve to a promise the receiver
# holds (the promise itself included), to none, to a promise, or to a dead export of the
# receiver; senderPromise for an id the receiver holds as a plain or resolved import, or
# senderHosted for one it holds as a pending promise; the third-party forms under "Embargoes".

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

  noFinishNeeded @4 :Bool;
  # Set by the callee exactly when the Call had noPromisePipelining and this Return carries no
  # capability (results with an empty cap table, an exception, or canceled). The callee freed
  # its answer as it wrote this Return; the caller frees its question on reading it and sends no
  # Finish. If the caller had already sent Finish (it dropped its promise while the Return was
  # in flight), that Finish reaches the callee after the answer is gone and is ignored (see
  # Finish). Id lifetime: the question id is free at the caller once this Return is read, and
  # at the callee once it is written; a Call reusing the id can only follow the Return, and
  # any crossing Finish precedes that Call on the caller->callee ring. Set on a Return whose
  # Call did not have noPromisePipelining, or with a non-empty cap table: PROTOCOL_ERROR at the
  # caller, before anything changes.
}

struct Finish {
  questionId @0 :UInt32;
  # Sent by the caller once it no longer needs the answer: its promise and every capability
  # pipelined on it are gone. Before the Return it cancels the call (the callee drops the
  # running dispatch, then sends Return.canceled), unless calls pipelined on the answer are
  # queued there: they still need its results, so it runs on. Must name a live answer of the
  # receiver (else PROTOCOL_ERROR), with one exception: the one Finish that may cross a
  # Return.noFinishNeeded. For an answer id whose last Return went out with noFinishNeeded
  # before any Finish for it arrived, and that no Call, Provide or Accept has reused since, one
  # Finish is ignored silently (the caller dropped its promise while the Return was in flight).
  # A second one, or one for an id never answered so, is a PROTOCOL_ERROR. The callee frees the
  # answer once it has also sent the Return and no queued call waits on it (at once, with
  # noFinishNeeded).

  releaseResultCaps @1 :Bool;
  # Set by a caller that lets go of the question before its Return arrived: nothing of the
  # results can be read any more (no promise, no capability pipelined on them), so the caller
  # takes none of the references the Return's cap table gives (it sends no Release for them, and
  # accepts no handoff from it). The callee drops them itself, one per senderHosted,
  # senderPromise and thirdPartyHosted (vine) entry, as a Release of 1 each: once it has both
  # sent that Return and received this Finish, in either order. This saves a Release per
  # capability for every pipelined call dropped before its Return (a chain of calls on the
  # capabilities the previous ones return). Unset: the caller counts the Return's references as
  # in any message and releases them with Release. Set on a Finish for an answer that has
  # returned, each export the Return named must still hold at least as many references as the
  # table named it: else PROTOCOL_ERROR (references are counted per export, not per message,
  # so that is what the callee can check; a caller that released with Release references it
  # never took, while it holds others to the same export, loses those others). A Resolve for a
  # senderPromise of such a Return may still cross this Finish: the caller takes it as for a
  # promise it released (the resolution's reference goes back).
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
  # An export id of the sender that it sent as senderPromise (an import of the receiver, which
  # must have received it as senderPromise and not yet a Resolve for it, else PROTOCOL_ERROR).
  # Sent at most once per promise, and only while the receiver held references when the sender
  # resolved it: a receiver that released them meanwhile (its Release crossing the Resolve)
  # drops the resolution's reference at once.

  union {
    cap @1 :CapDescriptor;
    # What the promise resolved to: senderHosted (one more reference, as in a cap table; not a
    # promise the receiver holds) or receiverHosted (a live export of the receiver), or
    # thirdPartyHosted (handed off, with an embargo: see "Embargoes"; the vine not a promise the
    # receiver holds). Not none or senderPromise.

    exception @2 :Exception;
    # The promise broke: calls on it fail with this error.
  }
}

struct Disembargo {
  target @0 :MessageTarget;
  # accept: importedCap(p), the promise (an export of the receiver it sent as senderPromise and
  # resolved to thirdPartyHosted, whose embargo is not lifted yet), or importedCap(v), the vine
  # of a handoff in a Return (still holding its Provide: the first Disembargo through it).
  # provide: importedCap(e), the export the Provide named. Anything else is a PROTOCOL_ERROR.

  context :union {
    senderLoopback @1 :UInt32;
    receiverLoopback @2 :UInt32;
    # Cap'n Proto's two-party embargoes (a promise resolving to the receiver's own object). Not
    # used: this version never shortens such a route (see "Promise capabilities"), so either is
    # a PROTOCOL_ERROR.

    accept @3 :Void;
    # From the recipient to the introducer: every call the recipient made on the promise before
    # the Resolve is ahead of this message. The introducer forwards those calls on arrival, so by
    # now they all went out to the provider; it answers with Disembargo{provide} to the provider.
    # Sent at most once per Resolve to thirdPartyHosted, and only by a recipient that held the
    # promise when it read the Resolve. Or through a Return's vine: every call the recipient
    # pipelined on that question is ahead of it (see "Embargoes", a handoff in a Return).

    provide @4 :UInt32;
    # From the introducer to the provider: the question id of the Provide (a live answer of the
    # provider, no Finish yet, no Disembargo for it yet). Every call the introducer forwarded on
    # the promise is ahead of this message; the provider may now complete the embargoed Accept
    # (if the provision was already taken by an Accept without embargo, it is ignored).
  }
}

# Embargoes (three-party)
#
# Vat C passes to vat B a capability it will only know later: a call's pipelined result on its
# connection to vat A (C's question q to A), or a CapPromise it resolves to a capability of
# another connection. It exports it to B as senderPromise(p). B's calls on p go to C, which
# sends them on at once, in arrival order (pipelined on q: they queue at A on q's answer).
#
#   1. q returns (or the CapPromise is resolved) with an import of C's connection to A, export e
#      of A, and B still holds p: C -> A Provide {q', importedCap(e), recipient B, provision n},
#      then C -> B Resolve {p, thirdPartyHosted {A, n, vine}}. From now on C sends calls that
#      arrive on p to e (on the same C->A ring, so behind the earlier ones).
#   2. B, on the Resolve (connecting to A first if needed, as for a cap-table entry): B -> A
#      Accept {a, C, n, embargo = true}; new calls on p go out pipelined on a (directly to A);
#      then B -> C Disembargo {importedCap(p), accept}, behind every call it made on p.
#   3. C, on that Disembargo (every earlier call on p already went out to A): C -> A Disembargo
#      {importedCap(e), provide = q'}.
#   4. A completes the embargoed Accept (returns it, then the Provide; B's calls queued on a are
#      delivered) only once it has both the Provide and its Disembargo, in either order.
#
# Order (E-order): every call B made on p before the Resolve reaches A on the C->A ring ahead of
# C's Disembargo; B's later calls wait at A on the Accept until that Disembargo is read. So A
# delivers B's calls in the order B made them. Afterwards B calls A directly: its reference no
# longer depends on C (C may die).
#
# A handoff in a Return: B's question q to C returns thirdPartyHosted {A, n, vine} (C sent the
# Provide first). Calls B pipelined on q went to C, which delivers them to the vine, which sends
# them on to A behind the Provide. If B pipelined any, its Accept carries embargo = true and B
# sends Disembargo {importedCap(vine), accept} to C, behind them; C (having delivered the calls
# queued on q's answer before reading it, and once those waiting on the vine's export went on)
# sends Disembargo {importedCap(e), provide = q'} to A. Step 4 as above. Without pipelined calls
# the Accept is not embargoed.
#
# Resolved otherwise (a capability hosted by C or by B, another promise, a third party, a vat C
# cannot introduce B to, no network), C resolves p as before (senderHosted of a forwarder, or
# receiverHosted) or breaks it (exception); nothing is embargoed.
#
# Ends: B drops p before the Resolve (its Release reaches C: nothing is provided) or as it
# crosses (B releases the vine at once: C finishes the Provide, A reclaims the provision); C
# dies (A's provisions by C go, an embargoed Accept fails DISCONNECTED); B dies (A drops the
# Accept; C's exports to B go, its Finish reclaims the provision); A dies (the Accept and B's
# calls fail DISCONNECTED). An embargoed Accept waiting at A counts against the recipient's
# bound on waiting Accepts for the introducer's provisions (VatNetwork::MAX_WAITING_ACCEPTS_PER_PEER;
# more: OUT_OF_MEMORY).
#
# Hostile input (PROTOCOL_ERROR, checked before anything changes): a Disembargo with a loopback
# context; `accept` for an id that is not a promise of the receiver resolved to a third party
# with its embargo pending, nor a vine still holding its Provide (a second one included); `provide` for an answer that is not a live
# Provide or already got its Disembargo, or whose target is not the provided export; a Resolve
# to thirdPartyHosted hosted by no vat, the sender or the receiver, or whose vine is a promise.
