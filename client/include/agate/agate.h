// <agate/agate.h>: what a client or server program needs, under the names of the architecture's
// sketch (docs/architecture.md):
//
//   Promise<void> session(agate::Session& s) {
//     auto calc = co_await s.open<Calculator>("calculator");   // a bushel paid from s.bank()
//     ...
//   }
//   int main(int argc, char** argv) { return agate::run(argc, argv, session); }
//
//   int main(int argc, char** argv) { return agate::serve<CalculatorImpl>(argc, argv,
//   "calculator"); }
//
// The pieces live in client/ (Agate::client): session.h, service_host.h, main.h, and for event
// streams event_publisher.h and event_stream.h.
#pragma once

#include <functional>
#include <utility>

#include "agate/client/event_publisher.h"
#include "agate/client/event_stream.h"
#include "agate/client/kernel_events.h"
#include "agate/client/kernel_vats.h"
#include "agate/client/main.h"
#include "agate/client/service_host.h"
#include "agate/client/session.h"
#include "agate/rpc/connection.h"
#include "agate/rpc/typed.h"
#include "agate/runtime/event_loop.h"
#include "agate/runtime/promise.h"
#include "agate/runtime/result.h"

namespace agate {

using client::ClientQuota;
using client::EventBatch;
using client::EventPublisher;
using client::EventStream;
using client::EventUpdate;
using client::KernelEvents;
using client::KernelVats;
using client::serve;
using client::ServedClient;
using client::ServiceOptions;
using client::Session;
using client::StateCharge;

// A client program's main: attach, one Session, `body`; 0 when it succeeded (see main.h).
inline int run(int argc, char** argv, std::function<Promise<void>(Session&)> body) {
  return client::runSession(argc, argv, std::move(body));
}
inline int run(int argc, char** argv,
               std::function<Promise<void>(Session&, const client::ProgramArgs&)> body) {
  return client::runSession(argc, argv, std::move(body));
}
// The same with the program's usage line and a check of its own arguments (client::ProgramSpec).
inline int run(int argc, char** argv, const client::ProgramSpec& spec,
               std::function<Promise<void>(Session&, const client::ProgramArgs&)> body) {
  return client::runSession(argc, argv, spec, std::move(body));
}

}  // namespace agate
