// Packets with descriptors on a Unix socket (SCM_RIGHTS), as the kernel daemon and its clients
// exchange them on kernel.sock (a SOCK_SEQPACKET socket: one send is one packet, never merged or
// split).
//
// Both calls are non-blocking when the socket is (or with MSG_DONTWAIT, which they pass): they
// report WOULD_BLOCK instead of waiting. Received descriptors are always owned (Fd) and
// close-on-exec (MSG_CMSG_CLOEXEC); a packet that carries more descriptors than the caller can
// take, or whose payload was cut short, is PROTOCOL_ERROR, and every descriptor it carried is
// closed.
//
// A full descriptor table. When the receiving process is at its descriptor limit (RLIMIT_NOFILE,
// or the system's), the socket layer installs what fits, drops the rest and flags the packet
// cut short (MSG_CTRUNC) with room still left in the control buffer: unlike a peer sending too
// many, this is the receiver's state, not the peer's fault. Such a packet is OUT_OF_MEMORY with
// errno EMFILE (DroppedFds::FAIL), or, for a caller that must still read the payload to know
// what the descriptors were for (a reply it then fails alone), received with `fdsDropped` set
// (DroppedFds::REPORT). Either way every descriptor that did arrive is closed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "agate/runtime/fd.h"
#include "agate/runtime/result.h"

namespace agate {

// The most descriptors one packet carries in Agate's protocols.
inline constexpr size_t MAX_PACKET_FDS = 8;

// Sends `payload` (non-empty) with duplicates of `fds` (at most MAX_PACKET_FDS; the caller keeps
// its own). WOULD_BLOCK when the socket buffer is full, DISCONNECTED when the peer is gone,
// SYSTEM_ERROR otherwise. Never raises SIGPIPE.
Status trySendPacket(int socket, std::span<const std::byte> payload, std::span<const int> fds);

struct ReceivedPacket {
  size_t bytes = 0;  // payload bytes written to the caller's buffer
  size_t fdCount = 0;
  // DroppedFds::REPORT only: the packet's descriptors did not fit in this process's descriptor
  // table; those that did were closed (fdCount is 0). The payload is whole.
  bool fdsDropped = false;
};

// What tryReceivePacket does with a packet whose descriptors the process's full descriptor table
// could not take (see the overview).
enum class DroppedFds : uint8_t { FAIL, REPORT };

// Receives one packet into `payload` and up to `fds.size()` descriptors into `fds` (which must
// hold no descriptor; at most MAX_PACKET_FDS are taken). WOULD_BLOCK when none is queued,
// DISCONNECTED at end of stream (the peer closed), PROTOCOL_ERROR for a packet larger than
// `payload` or with more descriptors than `fds` holds, and for a full descriptor table
// OUT_OF_MEMORY (errno EMFILE) or `fdsDropped`, as `dropped` says.
Result<ReceivedPacket> tryReceivePacket(int socket, std::span<std::byte> payload, std::span<Fd> fds,
                                        DroppedFds dropped = DroppedFds::FAIL);

}  // namespace agate
