// Rights: what a capability allows its holder to do with the object it names.
//
// A cap carries a set of rights. Every kernel call names the rights it needs when it looks a
// handle up (`CSpace::lookup(handle, Rights::WRITE, ObjectType::BANK)`), so a missing right is
// refused before anything changes. A copy may carry fewer rights than its source, never more:
// that is how a restricted cap is made (a bank cap that may allocate but not destroy, a region
// cap that may only be mapped read-only, ...).
//
// Values are stable: they travel in syscall frames. Append only.
#pragma once

#include <cstdint>

namespace agate::kernel {

enum class Rights : uint32_t {
  NONE = 0,
  READ = 1u << 0,          // read the object's state (bank credit, region contents)
  WRITE = 1u << 1,         // change the object's contents (map a region writable)
  GRANT = 1u << 2,         // transfer this cap into another process's CSpace
  ALLOCATE = 1u << 3,      // bank: allocate objects (regions, ...) charged to the bank
  CREATE_CHILD = 1u << 4,  // bank: create a child bank
  SET_LIMIT = 1u << 5,     // bank: change the bank's limit
  DESTROY = 1u << 6,       // destroy the object (a bank: with everything allocated below it)
  ALL = (1u << 7) - 1,
};

constexpr Rights operator|(Rights a, Rights b) noexcept {
  return static_cast<Rights>(static_cast<uint32_t>(a) | static_cast<uint32_t>(b));
}
constexpr Rights operator&(Rights a, Rights b) noexcept {
  return static_cast<Rights>(static_cast<uint32_t>(a) & static_cast<uint32_t>(b));
}
constexpr Rights operator~(Rights a) noexcept {
  return static_cast<Rights>(~static_cast<uint32_t>(a) & static_cast<uint32_t>(Rights::ALL));
}

// True when `have` holds every right in `need`.
constexpr bool hasRights(Rights have, Rights need) noexcept { return (have & need) == need; }

// True when `r` names only defined rights (a value decoded from a frame may not).
constexpr bool isValidRights(Rights r) noexcept {
  return (static_cast<uint32_t>(r) & ~static_cast<uint32_t>(Rights::ALL)) == 0;
}

}  // namespace agate::kernel
