# The wire protocol between a process and agate-kernel. This file is the only definition of it:
# the daemon (kernel_sim/daemon/) and the client library (caps/) both use the generated code.
@0xc41b3c5452b06313;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("agate::wire");

# Protocol overview.
#
# 1. Attach. A process connects to HOME/kernel.sock (AF_UNIX, SOCK_SEQPACKET) and sends one
#    packet holding an AttachRequest (a flat, single-segment Cap'n Proto message). The kernel takes
#    the caller's OS pid and uid from the socket's peer credentials (SO_PEERCRED), never from the
#    message, and refuses a uid other than its own. It answers with one packet holding an
#    AttachReply and, on success, six descriptors in SCM_RIGHTS (see AttachReply). One process
#    attaches once per connection; a second packet on the socket before or after attach is a
#    protocol violation and ends the connection.
#
# 2. Calls. After attach the socket carries no request. The process writes Syscall frames into its
#    submission ring (one Cap'n Proto message per ring frame, ring tag 0) and rings the ring's
#    doorbell; several calls may be written before one doorbell (batching). The kernel answers
#    each Syscall with exactly one Completion in the completion ring, in submission order for one
#    process. Call ids: chosen by the caller, any non-zero value; the kernel echoes the id and
#    never interprets it. A caller may reuse an id once its completion has arrived. Id 0 is
#    reserved for what the kernel says unasked (events, see Completion) and is refused in a
#    Syscall (error INVALID_ARGUMENT, callId 0 in the reply).
#
# 3. Descriptors. A completion (or event) that hands out descriptors says how many in `fdCount`.
#    The kernel sends them on the socket, in one packet whose 8-byte payload is the completion's
#    callId (little-endian) with the descriptors in SCM_RIGHTS, *before* committing the completion
#    to the ring: a process that reads such a completion finds its descriptors already queued on
#    the socket, in completion order. While the socket's buffer is full (the process has not read
#    earlier descriptors), the kernel holds that completion and everything after it for the
#    process, and takes no new call from it, until the socket drains.
#
# 4. Errors. A call the kernel refuses gets Completion.error with the Errc value
#    (runtime/include/agate/runtime/result.h; stable values) and a detail text for people. Every
#    refused call leaves the kernel's state unchanged. A submission frame that is not a valid
#    Syscall message gets an error completion with callId 0 and code PROTOCOL_ERROR (the kernel
#    cannot know the id); the process stays attached. A corrupt ring (indices, frame headers), a
#    submission frame above the ring's limits, or a second packet on the socket is abuse: the
#    kernel disconnects the process, which is death (below).
#
# 5. Death. When the socket hangs up or the OS process exits (pidfd), the kernel kills the
#    process in its model (Kernel::tryKillProcess: every cap it held is deleted, every bank it
#    owned destroyed with everything allocated from it, its bushels torn down), closes every
#    descriptor and mapping it held for it, and tells the peers (BUSHEL_CLOSED, SERVICE_GONE
#    events). Calls still in the dead process's rings are dropped unanswered. When the kernel
#    dies, its processes see the socket hang up; the caps they held mean nothing afterwards.
#
# Handles are the CSpace handles of kernel_sim (32-bit slot | 32-bit generation << 32), valid
# only in the process that holds them. ProcessIds are the kernel's own (never reused within one
# kernel run), not OS pids.

# Version 2 added the notification, event buffer and credit page calls, and paged introspection;
# version 3 introductions (introduce, openBushelVia, the introduced event, bushelFds' server);
# version 4 closeBushel; version 5 setReceiveLimit (and the receive limit on pushes).
const abiVersion :UInt32 = 5;

# The largest process name accepted at attach, in bytes.
const maxNameBytes :UInt32 = 64;

struct AttachRequest {
  abiVersion @0 :UInt32;  # must equal abiVersion above, else ATTACH_REFUSED
  name @1 :Text;          # for people (agate ps); 1..maxNameBytes printable ASCII bytes
}

# Descriptors that follow a successful reply, in this order:
#   [0] submission ring memfd    [1] its data eventfd    [2] its space eventfd
#   [3] completion ring memfd    [4] its data eventfd    [5] its space eventfd
# (the rings of runtime/channel.h, SHARED scope; open with Channel::openShared).
struct AttachReply {
  union {
    error @0 :KernelError;
    attached :group {
      pid @1 :UInt32;           # this process's ProcessId in the kernel
      bank @2 :UInt64;          # handle: the process bank (Kernel::PROCESS_BANK rights)
      registry @3 :UInt64;      # handle: the registry (READ | WRITE | GRANT)
      kernelPid @4 :Int32;      # the daemon's OS pid, for watching its death (pidfd)
      submissionBytes @5 :UInt64;  # ring capacities, for checking the mappings
      completionBytes @6 :UInt64;
    }
  }
}

struct KernelError {
  code @0 :UInt16;  # an agate::Errc value
  detail @1 :Text;  # for people; never parsed
}

enum TransferMode {
  move @0;  # the cap leaves the caller's CSpace (kernel TransferMode::MOVE)
  copy @1;  # the receiver gets a cap derived from the caller's (TransferMode::COPY)
}

# One call. Every handle is in the caller's CSpace. Rights are kernel_sim's Rights bits.
struct Syscall {
  callId @0 :UInt64;  # chosen by the caller, non-zero; echoed in the Completion

  union {
    none @1 :Void;  # the zero value: refused (INVALID_ARGUMENT)

    copyCap :group {  # -> handle (the copy, derived from `cap`)
      cap @2 :UInt64;
      rights @3 :UInt32;  # a subset of the cap's
      badge @4 :UInt64;   # 0: keep the cap's
    }
    deleteCap :group {  # -> done
      cap @5 :UInt64;
    }
    revokeCap :group {  # -> count (caps deleted)
      cap @6 :UInt64;
    }
    transferCap :group {  # -> handle (in process `to`); needs GRANT; QUOTA_EXCEEDED past the
                          # receive limit of another process `to` (setReceiveLimit)
      cap @7 :UInt64;
      to @8 :UInt32;  # ProcessId
      mode @9 :TransferMode;
    }
    inspectCap :group {  # -> capInfo
      cap @10 :UInt64;
    }
    createBank :group {  # -> handle (the child bank, all rights); needs CREATE_CHILD
      bank @11 :UInt64;
      limit @12 :UInt64;  # pages
    }
    setBankLimit :group {  # -> done; needs SET_LIMIT
      bank @13 :UInt64;
      limit @14 :UInt64;
    }
    readBank :group {  # -> credit; needs READ
      bank @15 :UInt64;
    }
    destroyObject :group {  # -> done; needs DESTROY
      cap @16 :UInt64;
    }
    createRegion :group {  # -> handle; needs ALLOCATE on the bank
      bank @17 :UInt64;
      pages @18 :UInt64;
    }
    mapRegion :group {  # -> region, with 1 descriptor; needs READ (and WRITE if writable)
      region @19 :UInt64;
      writable @20 :Bool;
    }
    grantRegistry :group {  # -> handle (a root registry cap in process `to`; counts against
                            # `to`'s receive limit when `to` is another process)
      registry @21 :UInt64;  # the caller's registry cap: needs GRANT and every right in `rights`
      to @22 :UInt32;
      rights @23 :UInt32;
    }
    registerService :group {  # -> handle (the Service); needs WRITE on the registry
      registry @24 :UInt64;
      name @25 :Text;
      bank @26 :UInt64;  # pays the Service record; needs ALLOCATE
    }
    lookupService :group {  # -> koid; needs READ on the registry
      registry @27 :UInt64;
      name @28 :Text;
    }
    openBushel :group {  # -> handle (the bushel); the server gets BUSHEL_OPENED
      registry @29 :UInt64;
      name @30 :Text;
      bank @31 :UInt64;  # pays the record and both rings; needs ALLOCATE
    }
    bushelFds :group {  # -> done, with 2 descriptors: [0] request ring, [1] reply ring
      bushel @32 :UInt64;
    }

    # Introspection (the agate CLI). Any attached process may ask: every attached process runs
    # as the kernel's own uid. Since ABI 2 each of these answers the first page of its paged
    # form below (listProcessesPage, ...) with the largest limit, and sets nextCursor.
    listProcesses @33 :Void;  # -> processes
    listBanks @34 :Void;      # -> banks (parents before children)
    listCaps :group {         # -> caps; NOT_FOUND if `pid` is not attached
      pid @35 :UInt32;
    }

    # Notifications, event buffers and bank credit pages (ABI 2). Descriptor orders are given at
    # the Completion arms NotificationInfo / eventBuffer / creditPage.
    createNotification :group {  # -> handle; needs ALLOCATE on the bank
      bank @36 :UInt64;          # pays the doorbell page, the record and (wakeFd) the pipe page
      wakeFd @37 :Bool;          # also a wake descriptor, for event loops that poll descriptors
    }
    notificationFds :group {     # -> notification, with 1..3 descriptors; needs READ
      notification @38 :UInt64;  # WRITE adds the ring end of the wake descriptor
    }
    signal :group {              # -> done; needs WRITE. The kernel rings the notification.
      notification @39 :UInt64;
    }
    bindBankNotification :group {  # -> done; READ on the bank, WRITE on the notification
      bank @40 :UInt64;            # rung when pages come back to it (or below), and at destroy
      notification @41 :UInt64;
    }
    unbindBankNotification :group {  # -> done; the same rights; NOT_FOUND if not bound
      bank @42 :UInt64;
      notification @43 :UInt64;
    }
    createEventBuffer :group {   # -> handle; ALLOCATE on the bank, WRITE on the notification
      bank @44 :UInt64;
      slots @45 :UInt32;         # 1..65536 slots of 64 bytes
      notification @46 :UInt64;  # rung by the buffer's writers
    }
    mapEventBuffer :group {      # -> eventBuffer, with descriptors; READ (and WRITE if writable)
      buffer @47 :UInt64;
      writable @48 :Bool;        # the server's view; refused after the first read-only map
    }
    mapBankCredit :group {       # -> creditPage, with 1 descriptor; needs READ on the bank
      bank @49 :UInt64;
    }

    # Paged introspection (ABI 2). A page holds the entries whose key is >= `cursor`, in key
    # order, at most `limit` of them (0, or more than fit: as many as fit in one completion
    # frame), and Completion.nextCursor is the cursor of the next page (0: this was the last).
    # A cursor is a key, not a position: between pages entries may come and go; none is listed
    # twice, and every entry that exists for the whole listing is listed.
    listProcessesPage :group {  # -> processes; key: the ProcessId
      cursor @50 :UInt64;
      limit @51 :UInt32;
    }
    listBanksPage :group {      # -> banks; key: the koid (so parents come before children)
      cursor @52 :UInt64;
      limit @53 :UInt32;
    }
    listCapsPage :group {       # -> caps; key: the slot (the handle's low 32 bits); NOT_FOUND
      pid @54 :UInt32;          # if `pid` is not attached
      cursor @55 :UInt64;
      limit @56 :UInt32;
    }

    # Per-client server state (client/): the server of a bushel grows the bushel's state
    # allowance, charged to the bank that paid for the bushel (the client's), so the memory a
    # client makes a server hold is paid by that client. Refunded when the bushel dies.
    growBushelState :group {  # -> count (the bushel's state pages after the call)
      service @57 :UInt64;    # the caller's Service cap (needs WRITE); the bushel must be its
      bushel @58 :UInt64;     # koid, as in the bushelOpened event; NOT_FOUND if not the service's
      pages @59 :UInt64;      # 1..1024 at a time (Bushel::MAX_STATE_GROWTH); QUOTA_EXCEEDED if the bank
                              # (or an ancestor) cannot pay, nothing changed
    }

    # Three-party introductions (client/: KernelVats). A client of a service may let another
    # process reach that service: the kernel mints a connect-only cap for it, so authority to
    # open a bushel flows as a capability, never as a name. The recipient learns of it from an
    # `introduced` event (the kernel vouches for the service's server in `peer`).
    introduce :group {  # -> handle (in process `to`: a Service cap with READ only); needs GRANT
      bushel @60 :UInt64;  # the caller's bushel cap: its service is the one introduced
      to @61 :UInt32;      # ProcessId; NOT_FOUND if not attached. Idempotent: while `to` holds
                           # an introduction to that service, its handle again and no event
    }
    openBushelVia :group {  # -> handle (the bushel), as openBushel, to the service a cap names
      service @62 :UInt64;  # a Service cap with READ (an introduction, or the server's own)
      bank @63 :UInt64;     # pays the record and both rings; needs ALLOCATE
    }

    # A server disconnects a client (ABI 4): the server of a bushel closes it, exactly as the
    # client's last cap going would (both sides get bushelClosed, the kernel's rings and the
    # state pages go back to the bank that paid). The server holds no cap to the bushel, so it
    # names it as growBushelState does.
    closeBushel :group {  # -> done
      service @64 :UInt64;  # the caller's Service cap (needs WRITE); the bushel must be its
      bushel @65 :UInt64;   # koid, as in the bushelOpened event; NOT_FOUND if not the service's
                            # (or already closed: a second close is NOT_FOUND, nothing changed)
    }

    # The caller's receive limit (ABI 5): how many caps other processes may have pushed into
    # its CSpace at once (transferCap to it, introduce, grantRegistry), since it pays for their
    # slots. A push past it is refused QUOTA_EXCEEDED to the pusher, nothing changed. A cap
    # stops counting once the caller deletes it or moves it to another process. Starts at the
    # kernel's default (kernel_sim Kernel::DEFAULT_RECEIVE_LIMIT); 0 refuses every push.
    setReceiveLimit :group {  # -> count (pushed caps the caller holds now)
      limit @66 :UInt32;      # 0..2^20 (a CSpace's most slots), else INVALID_ARGUMENT; may be
                              # below the count: only new pushes are refused
    }
  }
}

# A notification's descriptors as sent after a completion: [page], then [wake] if `wake`, then
# [ring] if `ring`. The page holds a DoorbellWord (runtime/doorbell.h) at offset 0; map it
# MAP_SHARED read-write. The wake descriptor is the read end of a pipe the kernel writes 8 bytes
# to per ring (drain it with 8-byte reads, as an eventfd; why a pipe: kernel_sim/README.md).
struct NotificationInfo {
  bytes @0 :UInt64;  # of the page
  wake @1 :Bool;     # a wake descriptor follows the page
  ring @2 :Bool;     # its write end follows (the caller holds WRITE)
}

enum EventType {
  unknown @0;
  bushelOpened @1;  # to a server; 2 descriptors: [0] request ring (it receives), [1] reply ring
  bushelClosed @2;  # to the server and the client; the server frees that client's state
  serviceGone @3;   # to a client; bushelClosed for the same bushel follows
  introduced @4;    # to an introduce's recipient: `cap` (a handle in its CSpace) names service
                    # `service`, served by process `peer`; `bushel` is 0
}

struct ProcessInfo {
  pid @0 :UInt32;
  osPid @1 :Int32;
  uid @2 :UInt32;
  name @3 :Text;
  bank @4 :UInt64;   # koid of the process bank
  caps @5 :UInt32;   # caps in its CSpace
  services @6 :List(Text);  # the names it serves, sorted: at most maxServicesListed of them
  serviceCount @7 :UInt32;  # how many it serves in all
}

const maxServicesListed :UInt32 = 8;  # ProcessInfo.services

struct BankInfo {
  koid @0 :UInt64;
  parent @1 :UInt64;  # 0 for the system bank
  used @2 :UInt64;    # pages, this bank and its descendants
  limit @3 :UInt64;
  ownPages @4 :UInt64;
  objects @5 :UInt64;
  caps @6 :UInt32;
}

struct CapEntry {
  handle @0 :UInt64;
  koid @1 :UInt64;
  type @2 :UInt16;   # kernel_sim ObjectType value
  rights @3 :UInt32;
  badge @4 :UInt64;
  parentHandle @5 :UInt64;  # derivation parent (0: a root) ...
  parentPid @6 :UInt32;     # ... in this process's CSpace
}

# The kernel's answer to one Syscall, or an event (callId 0).
struct Completion {
  callId @0 :UInt64;  # the Syscall's; 0 for an event or for an unreadable submission frame
  fdCount @1 :UInt8;  # descriptors already sent on the socket for this completion (see 3.)

  union {
    error @2 :KernelError;
    event :group {
      type @3 :EventType;
      bushel @4 :UInt64;   # koid
      service @5 :UInt64;  # koid
      peer @6 :UInt32;     # ProcessId of the other side
      cap @32 :UInt64;     # introduced: the connect-only Service cap (a handle of the receiver)
    }
    handle @7 :UInt64;
    done @8 :Void;
    count @9 :UInt64;
    capInfo :group {
      koid @10 :UInt64;
      type @11 :UInt16;
      rights @12 :UInt32;
      badge @13 :UInt64;
    }
    credit :group {
      used @14 :UInt64;
      limit @15 :UInt64;
      returned @16 :UInt64;
      destroyed @17 :Bool;
    }
    koid @18 :UInt64;
    region :group {
      bytes @19 :UInt64;
      writable @20 :Bool;
    }
    processes @21 :List(ProcessInfo);
    banks @22 :List(BankInfo);
    caps @23 :List(CapEntry);

    # ABI 2 (notifications, event buffers, credit pages).
    notification @24 :NotificationInfo;  # notificationFds
    eventBuffer :group {  # mapEventBuffer: [0] the slots' memfd, then the notification's (below)
      bytes @25 :UInt64;     # whole pages; map PROT_READ unless writable
      slots @26 :UInt32;     # EventSlots at offset 0 (trust this, never the shared bytes)
      writable @27 :Bool;
      notification @28 :NotificationInfo;  # null: the notification was destroyed, no more fds
    }
    creditPage @29 :UInt64;  # mapBankCredit: the page's bytes; 1 descriptor, mappable read-only
  }

  nextCursor @30 :UInt64;  # processes / banks / caps answers: the next page's cursor, 0 if last
  server @31 :UInt32;      # bushelFds: the ProcessId of the bushel's server (vouched for)
}
