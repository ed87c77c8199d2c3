// BushelLink: this process's end of a kernel-opened bushel, with an RpcConnection over it.
//
// The kernel makes a bushel's two SHARED rings and hands their descriptors to the two parties
// (the client through KernelConnection::bushelRings, the server in the BUSHEL_OPENED event).
// A BushelLink opens both rings from those descriptors, attaches this side (the client sends on
// the request ring and receives on the reply ring, the server the reverse), and runs one
// RpcConnection over them. Session (client side) and ServiceHost (server side) own one per
// bushel; users meet the connection through typed stubs.
//
// Peer death is not seen through the rings (a killed process never detaches): the owner closes
// the connection when the kernel says the bushel closed (BUSHEL_CLOSED / SERVICE_GONE), which it
// does as soon as it notices the death.
//
// Threading: the loop's thread. Not movable (the connection points into the link).
#pragma once

#include <memory>
#include <optional>

#include "agate/rpc/connection.h"
#include "agate/runtime/channel.h"
#include "agate/runtime/event_loop.h"
#include "agate/runtime/fd.h"
#include "agate/runtime/message_channel.h"
#include "agate/runtime/result.h"

namespace agate::client {

class BushelLink {
 public:
  enum class Side : uint8_t { CLIENT, SERVER };

  // Opens both rings (`request`: the client sends on it; `reply`: the server does) and starts
  // the connection. options.maxMessageBytes is clamped to the rings' largest frame. Errors from
  // Channel::openShared and attach (INVALID_ARGUMENT, PROTOCOL_ERROR, ATTACH_REFUSED).
  static Result<std::unique_ptr<BushelLink>> tryOpen(EventLoop& loop, Side side, Fd request,
                                                     Fd reply, rpc::RpcOptions options);
  // Destroys the connection first (every handle on it must be gone: RpcConnection's contract).
  ~BushelLink();
  BushelLink(const BushelLink&) = delete;
  BushelLink& operator=(const BushelLink&) = delete;

  rpc::RpcConnection& connection() noexcept { return *connection_; }

 private:
  BushelLink() = default;

  std::unique_ptr<Channel> outbound_;
  std::unique_ptr<Channel> inbound_;
  std::unique_ptr<MessageSender> tx_;
  std::unique_ptr<MessageReceiver> rx_;
  std::optional<rpc::RpcConnection> connection_;  // last: destroyed first
};

}  // namespace agate::client
