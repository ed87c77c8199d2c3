// KernelObject: the base of every object the kernel holds (banks, CSpaces, regions, services,
// bushels, notifications, event buffers).
//
// Ownership. Every object but the system bank is owned by exactly one space bank, the one it was
// allocated from (`owner()`), through a std::unique_ptr held in that bank. Destroying a bank
// destroys every object it owns, and, transitively, its child banks and theirs. Objects neither
// copy nor move: caps point at them.
//
// Caps never dangle. Each object keeps an intrusive list of the CSpace slots that name it (a cap
// is a slot: object, rights, badge, generation). Destroying an object first walks that list and
// deletes every one of those caps, in every CSpace, bumping each slot's generation, so a handle
// to it then gets INVALID_HANDLE and never a freed object. Cost: two pointers per slot, O(1) to
// add or remove a cap, O(number of caps to the object) to destroy it; lookup pays nothing (no
// object table, no second generation check), which is what the per-call path wants.
//
// Threading: the whole kernel object model is single-threaded; the daemon calls it from one
// thread (its event loop).
#pragma once

#include <cstddef>
#include <cstdint>

namespace agate::kernel {

// Stable values: they travel in replies and are printed by the CLI. Append only.
enum class ObjectType : uint16_t {
  ANY = 0,  // only as a lookup filter: "any type"
  BANK = 1,
  CSPACE = 2,
  REGION = 3,
  REGISTRY = 4,      // the name service; one per kernel, owned by the system bank
  SERVICE = 5,       // a registered name, owned by the server's bank
  BUSHEL = 6,        // a client's connection to a service, owned by the bank the client paid with
  NOTIFICATION = 7,  // a doorbell word (and a wake descriptor), owned by the bank that paid
  EVENT_BUFFER = 8,  // coalescing event slots plus a notification, owned by the bank that paid
};

constexpr const char* objectTypeName(ObjectType t) noexcept {
  switch (t) {
    case ObjectType::ANY:
      return "any";
    case ObjectType::BANK:
      return "bank";
    case ObjectType::CSPACE:
      return "cspace";
    case ObjectType::REGION:
      return "region";
    case ObjectType::REGISTRY:
      return "registry";
    case ObjectType::SERVICE:
      return "service";
    case ObjectType::BUSHEL:
      return "bushel";
    case ObjectType::NOTIFICATION:
      return "notification";
    case ObjectType::EVENT_BUFFER:
      return "event_buffer";
  }
  return "unknown";
}

// A kernel object id: unique for the life of one kernel instance, never reused. Printed by the
// CLI and used by tests to tell objects apart; it is not a handle and grants nothing.
using Koid = uint64_t;

struct Slot;
class CSpace;
class SpaceBank;

class KernelObject;

// Told (synchronously, by the CSpace or bank doing it) when the last cap to an object that
// watches is deleted, when such an object is destroyed (before its teardown()), and when a
// watching CSpace could give chunks back. The Kernel
// is the one implementation: it queues last-cap objects and destroys them once the call's state
// is final (never from inside a CSpace or bank walk). Must not call back in.
class LifecycleObserver {
 public:
  virtual void lastCapGone(KernelObject& object) noexcept = 0;
  virtual void objectDestroyed(KernelObject& object) noexcept = 0;
  // A CSpace's last chunk holds no cap any more: call its trim() once the call's state is final.
  virtual void trimWanted(CSpace& cspace) noexcept = 0;

 protected:
  ~LifecycleObserver() = default;
};

class KernelObject {
 public:
  KernelObject(const KernelObject&) = delete;
  KernelObject& operator=(const KernelObject&) = delete;
  // Asserts that no cap names the object any more: the owner bank deletes them first.
  virtual ~KernelObject();

  ObjectType type() const noexcept { return type_; }
  Koid koid() const noexcept { return koid_; }
  // The bank this object was allocated from; null only for the system bank.
  SpaceBank* owner() const noexcept { return owner_; }
  // Number of caps, in all CSpaces, that name this object.
  uint32_t capCount() const noexcept { return capCount_; }
  // The first of the caps naming this object (Slot::objNext leads to the others), or null.
  const Slot* firstCap() const noexcept { return capsHead_; }
  Slot* firstCap() noexcept { return capsHead_; }
  // Pages charged to owner() for this object besides its record (a region's pages, a CSpace's
  // slot chunks). Refunded when the object is destroyed.
  uint64_t chargedPages() const noexcept { return chargedPages_; }
  // Checks the list of caps to this object; aborts on a violation. O(caps to it).
  void verifyCaps() const;
  // Watches this object's last cap and destruction (null: nobody). Not owned.
  void setLifecycleObserver(LifecycleObserver* observer) noexcept { lifecycle_ = observer; }
  LifecycleObserver* lifecycleObserver() const noexcept { return lifecycle_; }

 protected:
  explicit KernelObject(ObjectType type) noexcept : type_(type) {}

 private:
  friend class CSpace;
  friend class SpaceBank;

  // Called by the owning bank after every cap to the object is gone and before it is deleted;
  // releases what the object itself holds (a CSpace deletes the caps in its slots).
  virtual void teardown() noexcept {}

  // Deletes every cap to this object in every CSpace (see the overview).
  void deleteAllCaps() noexcept;

  ObjectType type_;
  Koid koid_ = 0;               // set by the owning bank on adoption
  SpaceBank* owner_ = nullptr;  // not owning: the owner owns us
  size_t ownerIndex_ = 0;       // our index in owner_->objects_ (O(1) removal)
  uint64_t chargedPages_ = 0;   // see chargedPages()
  Slot* capsHead_ = nullptr;    // intrusive list through Slot::objNext/objPrev
  uint32_t capCount_ = 0;
  LifecycleObserver* lifecycle_ = nullptr;  // not owned
};

}  // namespace agate::kernel
