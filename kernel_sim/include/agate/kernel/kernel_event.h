// KernelEvent: what the kernel has to tell a process that did not ask (a peer's connection came
// or went). The Kernel queues events per process as calls complete; the daemon drains them with
// Kernel::takeEvents(pid) after every call it makes and delivers each (with its descriptors,
// over SCM_RIGHTS) to that process. A dead process's queue is dropped, closing its descriptors.
#pragma once

#include <cstdint>
#include <vector>

#include "agate/kernel/object.h"
#include "agate/kernel/process.h"
#include "agate/runtime/fd.h"

namespace agate::kernel {

// Stable values: they travel in event frames. Append only.
enum class KernelEventType : uint16_t {
  // To a server: a client opened bushel `object` to service `service`. fds: [0] the request
  // ring's memfd (the server receives), [1] the reply ring's memfd (the server sends).
  BUSHEL_OPENED = 1,
  // To the server and the client: bushel `object` is gone (last cap deleted, bank destroyed,
  // client or service gone). The server frees that client's state.
  BUSHEL_CLOSED = 2,
  // To a client: service `service`, to which it had bushel `object`, is gone (server died or
  // unregistered). BUSHEL_CLOSED for that bushel follows.
  SERVICE_GONE = 3,
  // To the recipient of an introduction (Kernel::tryIntroduce): `cap` (a handle in its CSpace)
  // is a connect-only cap to service `service`, whose server is `peer`. `object` is 0.
  INTRODUCED = 4,
};

struct KernelEvent {
  KernelEventType type = KernelEventType::BUSHEL_CLOSED;
  Koid object = 0;      // the bushel
  Koid service = 0;     // its service
  ProcessId peer = 0;   // the other side (client for the server, server for the client)
  uint64_t cap = 0;     // INTRODUCED: the handle (Handle::raw) of the recipient's new cap
  std::vector<Fd> fds;  // owned until delivered
};

}  // namespace agate::kernel
