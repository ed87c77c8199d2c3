#include "agate/runtime/fd_passing.h"

#include <errno.h>
#include <sys/socket.h>

#include <cstring>

namespace agate {

Status trySendPacket(int socket, std::span<const std::byte> payload, std::span<const int> fds) {
  AGATE_REQUIRE(!payload.empty() && fds.size() <= MAX_PACKET_FDS,
                "a packet needs a payload and at most %zu descriptors (%zu bytes, %zu fds)",
                MAX_PACKET_FDS, payload.size(), fds.size());
  iovec iov{const_cast<std::byte*>(payload.data()), payload.size()};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * MAX_PACKET_FDS)] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (!fds.empty()) {
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  for (;;) {
    const ssize_t n = ::sendmsg(socket, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n == static_cast<ssize_t>(payload.size())) return {};
    if (n >= 0) return Error(Errc::SYSTEM_ERROR, "a packet was sent short");
    if (errno == EINTR) continue;
    if (errno == EAGAIN) return Error(Errc::WOULD_BLOCK, "the socket's send buffer is full");
    if (errno == EPIPE || errno == ECONNRESET || errno == ENOTCONN)
      return Error(Errc::DISCONNECTED, "the socket's peer is gone");
    return Error::fromErrno(errno, "sendmsg on a packet socket failed");
  }
}

Result<ReceivedPacket> tryReceivePacket(int socket, std::span<std::byte> payload, std::span<Fd> fds,
                                        DroppedFds dropped) {
  iovec iov{payload.data(), payload.size()};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * MAX_PACKET_FDS)] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  ssize_t n;
  do {
    n = ::recvmsg(socket, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN) return Error(Errc::WOULD_BLOCK, "no packet is queued");
    if (errno == ECONNRESET) return Error(Errc::DISCONNECTED, "the socket's peer is gone");
    return Error::fromErrno(errno, "recvmsg on a packet socket failed");
  }
  // Take ownership of every descriptor first, so that each refusal below closes them all.
  Fd taken[MAX_PACKET_FDS];
  size_t count = 0;
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const size_t inThis = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < inThis && count < MAX_PACKET_FDS; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
      taken[count++].reset(fd);
    }
  }
  if ((msg.msg_flags & MSG_TRUNC) != 0)
    return Error(Errc::PROTOCOL_ERROR, "a packet was larger than the receiver's buffer");
  if ((msg.msg_flags & MSG_CTRUNC) != 0) {
    // A full control buffer: the peer sent more than any Agate packet carries. Room left in it:
    // the socket layer stopped installing descriptors because this process's table is full.
    if (count == MAX_PACKET_FDS)
      return Error(Errc::PROTOCOL_ERROR, "a packet carried more descriptors than Agate sends");
    if (dropped == DroppedFds::FAIL)
      return Error(Errc::OUT_OF_MEMORY, EMFILE,
                   "the process's descriptor table is full (RLIMIT_NOFILE): a packet's "
                   "descriptors were dropped");
    // `taken` closes those that arrived.
    return ReceivedPacket{static_cast<size_t>(n), 0, true};
  }
  if (n == 0 && count == 0 && !payload.empty())
    return Error(Errc::DISCONNECTED, "the socket's peer closed it");
  if (count > fds.size())
    return Error(Errc::PROTOCOL_ERROR, "a packet carried more descriptors than expected");
  for (size_t i = 0; i < count; ++i) fds[i] = std::move(taken[i]);
  return ReceivedPacket{static_cast<size_t>(n), count};
}

}  // namespace agate
