// CSpace: a process's table of capabilities, and the handles that name them.
//
// A cap is a value: (object, rights, badge). It lives in a slot of a CSpace; user code names it
// by a Handle = slot index + the slot's generation, packed into 64 bits. Every lookup names the
// rights and the object type it needs, and answers INVALID_HANDLE (out of range, free slot,
// generation mismatch: stale or forged), WRONG_TYPE or PERMISSION_DENIED — never another object.
//
// Generations: a slot's generation starts at 1 and goes up by one each time the slot is freed,
// so a handle to a deleted cap never resolves again. A slot whose generation reaches
// `maxGeneration` is retired instead of reused: it can never hand out a generation twice, so
// there is no ABA after a wrap (cost: a retired slot's 1/SLOTS_PER_CHUNK page, paid by the
// CSpace's own bank, after 2^32 - 1 reuses of that one slot). A chunk given back (below) takes
// its slots' generations along: the CSpace keeps the highest as a floor, and the slots of a
// chunk grown later start there, so no handle to a slot of a given-back chunk ever resolves.
//
// Derivation: every cap made from another (copy/mint, transfer by copy) is its child in a
// derivation tree that spans all CSpaces; a cap made with a new object is a root. Revoking a cap
// deletes all its descendants, transitively, wherever they are; the cap itself stays. Deleting a
// cap hands its children to its parent, so they stay reachable by an ancestor's revoke.
// Derived caps always name the same object as their parent, so a tree is a subset of one
// object's caps. Costs: four pointers per slot; copy O(1); delete O(direct children);
// revoke O(descendants), iterative (no recursion, whatever the depth).
//
// Received caps. A cap another process put here (a transfer to this process, an introduction,
// a registry grant) takes a slot this CSpace's bank pays for, at the pusher's choice. So each
// CSpace bounds how many such caps it holds at once (`receiveLimit`, set at attach from
// Kernel::Options and then by the process itself): a push past it is refused QUOTA_EXCEEDED
// and nothing changes. A received cap stops counting when it is deleted or moved to another
// process (moving it within the CSpace keeps it counted); a copy the process makes of it is its
// own. What a pusher can make it pay is bounded by ceil(receiveLimit / SLOTS_PER_CHUNK) pages,
// and a process that deletes what it did not want gets them back (below).
//
// Storage: slots come in chunks of SLOTS_PER_CHUNK that never move (the intrusive links point at
// slots), each charged one page to the CSpace's bank when the CSpace grows. A new cap takes the
// lowest free slot (bitmaps: a mask per chunk, a bit per chunk, a bit per 64 chunks, so finding
// it is O(1) for any size up to MAX_SLOTS), so caps gather at the bottom of the table; the
// CSpace grows only when no slot is free. When the last chunk holds no cap (and no retired
// slot), trim() gives it back, and every empty chunk below it, refunding their pages to the bank
// (the first chunk stays: it is part of a process's fixed cost). The Kernel trims at the end of
// the call that emptied them, never inside a walk (a CSpace only asks, through its
// LifecycleObserver).
//
// Threading: single-threaded (see object.h).
#pragma once

#include <bit>
#include <cstdint>
#include <memory>
#include <vector>

#include "agate/kernel/object.h"
#include "agate/kernel/rights.h"
#include "agate/kernel/space_bank.h"
#include "agate/runtime/result.h"

namespace agate::kernel {

// Names a cap in one CSpace. 0 is never valid (generations start at 1).
struct Handle {
  uint64_t raw = 0;

  static constexpr Handle make(uint32_t index, uint32_t generation) noexcept {
    return Handle{(uint64_t{generation} << 32) | index};
  }
  constexpr uint32_t index() const noexcept { return static_cast<uint32_t>(raw); }
  constexpr uint32_t generation() const noexcept { return static_cast<uint32_t>(raw >> 32); }
  friend constexpr bool operator==(Handle, Handle) = default;
};

// What a lookup yields. `object` is borrowed: valid until the next call that can destroy
// objects or delete caps (i.e. for the rest of the current kernel call).
struct Cap {
  KernelObject* object = nullptr;
  Rights rights = Rights::NONE;
  uint64_t badge = 0;

  // The object as its concrete type; asserts the type (lookup already checked it).
  template <class T>
  T& as() const {
    AGATE_ASSERT(object != nullptr && object->type() == T::TYPE, "cap names a %s, not a %s",
                 object ? objectTypeName(object->type()) : "null", objectTypeName(T::TYPE));
    return static_cast<T&>(*object);
  }
};

// One capability slot. Kernel-internal: exposed so the kernel can link derivations across
// CSpaces; user-facing code goes through handles.
struct Slot {
  KernelObject* object = nullptr;  // null: free or retired
  Rights rights = Rights::NONE;
  uint32_t generation = 1;  // of the current occupant, or of the next one if free
  uint64_t badge = 0;
  CSpace* cspace = nullptr;  // the table this slot belongs to
  uint32_t index = 0;
  bool received = false;  // pushed in by another process: counts against its receive limit
  // Caps naming the same object (KernelObject::capsHead_).
  Slot* objPrev = nullptr;
  Slot* objNext = nullptr;
  // Derivation tree.
  Slot* parent = nullptr;
  Slot* firstChild = nullptr;
  Slot* prevSibling = nullptr;
  Slot* nextSibling = nullptr;

  Handle handle() const noexcept { return Handle::make(index, generation); }
};

// A set of chunk indices, as a bit per chunk and a bit per word of those: the next member from
// any index is found in O(1) for up to 64 * 64 * 64 chunks (MAX_SLOTS needs 32768).
class ChunkBits {
 public:
  static constexpr uint32_t NONE = UINT32_MAX;
  void resize(size_t chunks);  // bits beyond `chunks` are dropped; new ones are clear
  void set(uint32_t chunk, bool on) noexcept;
  bool test(uint32_t chunk) const noexcept { return (words_[chunk / 64] >> (chunk % 64)) & 1; }
  // The first member >= `from`, or NONE.
  uint32_t next(uint64_t from) const noexcept;

 private:
  std::vector<uint64_t> words_;
  std::vector<uint64_t> top_;
};

class CSpace final : public KernelObject {
 public:
  static constexpr ObjectType TYPE = ObjectType::CSPACE;
  static constexpr uint32_t SLOTS_PER_CHUNK = 32;
  static constexpr uint32_t MAX_SLOTS = 1u << 20;
  static_assert(sizeof(Slot) * SLOTS_PER_CHUNK <= PAGE_BYTES, "a chunk is charged one page");

  // `maxGeneration` is lowered only by tests, to reach a slot's retirement quickly.
  explicit CSpace(uint32_t maxGeneration = UINT32_MAX) noexcept;
  ~CSpace() override;

  // The cap named by `handle`, if it has every right in `need` and (unless `type` is ANY) is of
  // `type`. INVALID_HANDLE, then WRONG_TYPE, then PERMISSION_DENIED, in that order.
  Result<Cap> lookup(Handle handle, Rights need, ObjectType type = ObjectType::ANY) const noexcept;
  // The same, answering the slot itself (kernel-internal).
  Result<Slot*> findSlot(Handle handle, Rights need,
                         ObjectType type = ObjectType::ANY) const noexcept;

  // Caps held in this CSpace.
  uint32_t heldCaps() const noexcept { return held_; }
  uint32_t capacity() const noexcept {
    return static_cast<uint32_t>(chunks_.size()) * SLOTS_PER_CHUNK;
  }
  uint32_t retiredSlots() const noexcept { return retired_; }
  // Caps held here that other processes pushed in, and the most this CSpace accepts.
  uint32_t receivedCaps() const noexcept { return received_; }
  uint32_t receiveLimit() const noexcept { return receiveLimit_; }
  // Any value, also below receivedCaps(): that only refuses further pushes (nothing is deleted).
  void setReceiveLimit(uint32_t limit) noexcept { receiveLimit_ = limit; }
  // The occupied slot with the lowest index >= `from`, or null. O(1) for a CSpace of any size up
  // to MAX_SLOTS: a bit per slot, a bit per chunk, a bit per 64 chunks (at most 8 words), so a
  // listing page costs its entries, however many slots are free in between.
  const Slot* nextCap(uint64_t from) const noexcept;
  // Calls fn(const Slot&) for every occupied slot, in slot order.
  template <class Fn>
  void forEachCap(Fn&& fn) const {
    for (const Slot* s = nextCap(0); s != nullptr; s = nextCap(uint64_t{s->index} + 1)) fn(*s);
  }

  // Gives back the trailing chunks that hold no cap and no retired slot, all but the first,
  // refunding a page each to the CSpace's bank (its observers are told). Returns how many.
  // Called by the Kernel once a call's state is final (see Storage above).
  uint64_t trim() noexcept;

  // Reserves room for one more cap: charges a page to this CSpace's bank if no slot is free
  // (QUOTA_EXCEEDED if the bank cannot pay or MAX_SLOTS is reached). `received`: another process
  // pushes it, so it must also fit the receive limit (QUOTA_EXCEEDED past it). Nothing changes
  // on an error.
  Result<PageCharge> tryReserveSlot(bool received = false) noexcept;

  // Puts a cap into a free slot, using `charge` from tryReserveSlot(). `parent` (may be null, may
  // be in another CSpace) becomes its parent in the derivation tree. `received`: another
  // process pushed it (reserved with tryReserveSlot(true)). Cannot fail.
  Handle insert(KernelObject& object, Rights rights, uint64_t badge, Slot* parent,
                PageCharge&& charge, bool received = false);
  // Moves the cap in `from` (any CSpace) into this one: same object, rights, badge and place in
  // the derivation tree; `from` is freed. Uses `charge` from tryReserveSlot(). `received`: from
  // another process (checked as for insert); otherwise the cap keeps `from`'s status. Cannot fail.
  Handle moveIn(Slot& from, PageCharge&& charge, bool received);

  // Deletes the cap in `slot`; its children move to its parent.
  static void erase(Slot& slot) noexcept;
  // Deletes every cap derived from `slot`, transitively, in every CSpace; `slot` stays.
  // Returns how many were deleted.
  static uint64_t revokeDescendants(Slot& slot) noexcept;

  // The kernel calls this when the CSpace's process dies, just before destroying its bank; a
  // CSpace torn down otherwise is a bug (its process would be left with a dangling table).
  void markProcessDead() noexcept { processDead_ = true; }

  // Checks slot, free-list and derivation-tree linkage; aborts on a violation. O(slots).
  void verifyInvariants() const;

 private:
  void teardown() noexcept override;
  Slot& slotAt(uint32_t i) const noexcept {
    return chunks_[i / SLOTS_PER_CHUNK][i % SLOTS_PER_CHUNK];
  }
  Slot& takeFreeSlot(PageCharge&& charge);
  void releaseSlot(Slot& slot) noexcept;
  void markOccupied(uint32_t index, bool occupied) noexcept;
  void markFree(uint32_t index, bool free) noexcept;
  // The Kernel is asked to trim once the last chunk (beyond the first) has no cap left.
  void askForTrim() noexcept;

  uint32_t maxGeneration_;
  std::vector<std::unique_ptr<Slot[]>> chunks_;  // never move: slots are linked by address
  uint32_t held_ = 0;
  uint32_t free_ = 0;             // slots neither held nor retired
  uint32_t generationFloor_ = 1;  // the first generation of a chunk's slots (see Generations)
  bool trimAsked_ = false;
  uint32_t retired_ = 0;
  uint32_t received_ = 0;
  uint32_t receiveLimit_ = UINT32_MAX;
  // Per chunk, a mask of the slots holding a cap and one of the free slots; over the chunks,
  // those holding a cap and those with a free slot.
  std::vector<uint32_t> occupied_;
  std::vector<uint32_t> freeMask_;
  ChunkBits nonEmpty_;
  ChunkBits withFree_;
  bool processDead_ = false;
};

}  // namespace agate::kernel
