#include "agate/client/bushel_link.h"

#include <algorithm>
#include <utility>

namespace agate::client {

Result<std::unique_ptr<BushelLink>> BushelLink::tryOpen(EventLoop& loop, Side side, Fd request,
                                                        Fd reply, rpc::RpcOptions options) {
  const bool client = side == Side::CLIENT;
  auto outbound = Channel::openShared(client ? std::move(request) : std::move(reply));
  if (!outbound) return outbound.error();
  auto inbound = Channel::openShared(client ? std::move(reply) : std::move(request));
  if (!inbound) return inbound.error();
  auto sender = (*outbound)->attachSender();
  if (!sender) return sender.error();
  auto receiver = (*inbound)->attachReceiver();
  if (!receiver) return receiver.error();

  std::unique_ptr<BushelLink> link(new BushelLink());
  link->outbound_ = std::move(*outbound);
  link->inbound_ = std::move(*inbound);
  link->tx_ = std::make_unique<MessageSender>(std::move(*sender));
  link->rx_ = std::make_unique<MessageReceiver>(*link->inbound_, std::move(*receiver),
                                                rpc::rpcReceiverOptions());
  options.maxMessageBytes =
      std::min<size_t>(options.maxMessageBytes, link->outbound_->maxPayload());
  link->connection_.emplace(*link->tx_, *link->rx_, loop, options);
  return link;
}

BushelLink::~BushelLink() { connection_.reset(); }

}  // namespace agate::client
