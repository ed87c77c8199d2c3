// Cap<T>: a capability handle as a typed value, on the client's side of agate-kernel.
//
// A Cap<T> is the 64-bit handle the kernel gave this process (slot | generation << 32, see
// kernel_sim/include/agate/kernel/cspace.h) plus, in the type, what kind of object the holder
// believes it names. It is a value: it copies freely, owns nothing and deletes nothing when it
// goes out of scope. Why no RAII deletion: a cap is a name in the kernel's table, not a resource
// of this process; the kernel reclaims every cap when the process dies, and objects belong to
// banks, not to caps (deleting a region's last cap does not free the region; destroying its bank
// does). A destructor that made a kernel call would hide a round trip and a failure path in every
// scope exit. Delete or destroy explicitly (KernelConnection::deleteCap / destroy).
//
// The type tag is checked by the kernel, not by this library: a Cap<Region> that names a bank
// gets WRONG_TYPE from every region call. Use KernelConnection::inspectCap to learn a handle's
// real type. AnyCap accepts every Cap<T> for calls that work on any object (copy, delete, revoke,
// transfer, inspect, destroy).
#pragma once

#include <cstdint>

#include "agate/kernel/object.h"
#include "agate/kernel/rights.h"

namespace agate::caps {

using kernel::ObjectType;
using kernel::Rights;
using ProcessId = uint32_t;  // the kernel's process id (not an OS pid)
using Koid = uint64_t;       // a kernel object's id

// Type tags: what a Cap names.
struct SpaceBank {
  static constexpr ObjectType TYPE = ObjectType::BANK;
};
struct Region {
  static constexpr ObjectType TYPE = ObjectType::REGION;
};
struct Bushel {
  static constexpr ObjectType TYPE = ObjectType::BUSHEL;
};
struct Registry {
  static constexpr ObjectType TYPE = ObjectType::REGISTRY;
};
struct Service {
  static constexpr ObjectType TYPE = ObjectType::SERVICE;
};
struct Notification {
  static constexpr ObjectType TYPE = ObjectType::NOTIFICATION;
};
struct EventBuffer {
  static constexpr ObjectType TYPE = ObjectType::EVENT_BUFFER;
};
struct AnyObject {
  static constexpr ObjectType TYPE = ObjectType::ANY;
};

template <class T>
struct Cap;

template <>
struct Cap<AnyObject> {
  uint64_t handle = 0;
  bool valid() const noexcept { return handle != 0; }
  friend bool operator==(const Cap&, const Cap&) = default;
};

template <class T>
struct Cap {
  uint64_t handle = 0;  // 0 is never a valid handle

  bool valid() const noexcept { return handle != 0; }
  // Every cap converts to AnyCap; the reverse is explicit (capAs).
  operator Cap<AnyObject>() const noexcept { return Cap<AnyObject>{handle}; }  // NOLINT
  friend bool operator==(const Cap&, const Cap&) = default;
};

using AnyCap = Cap<AnyObject>;

// Reinterprets a handle as another cap type (e.g. after inspectCap said what it is, or a handle
// received from another process). The kernel still checks the type on every call.
template <class T>
Cap<T> capAs(AnyCap cap) noexcept {
  return Cap<T>{cap.handle};
}

}  // namespace agate::caps
