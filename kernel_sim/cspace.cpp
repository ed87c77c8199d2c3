#include "agate/kernel/cspace.h"

namespace agate::kernel {
namespace {

void linkToObject(Slot& s, KernelObject& object, Slot*& head, uint32_t& count) noexcept {
  s.objPrev = nullptr;
  s.objNext = head;
  if (head) head->objPrev = &s;
  head = &s;
  ++count;
  s.object = &object;
}

void unlinkSibling(Slot& s) noexcept {
  if (s.prevSibling)
    s.prevSibling->nextSibling = s.nextSibling;
  else if (s.parent)
    s.parent->firstChild = s.nextSibling;
  if (s.nextSibling) s.nextSibling->prevSibling = s.prevSibling;
  s.prevSibling = s.nextSibling = nullptr;
}

void linkChild(Slot& parent, Slot& child) noexcept {
  child.parent = &parent;
  child.prevSibling = nullptr;
  child.nextSibling = parent.firstChild;
  if (parent.firstChild) parent.firstChild->prevSibling = &child;
  parent.firstChild = &child;
}

}  // namespace

CSpace::CSpace(uint32_t maxGeneration) noexcept
    : KernelObject(TYPE), maxGeneration_(maxGeneration) {
  AGATE_REQUIRE(maxGeneration >= 1, "maxGeneration %u", maxGeneration);
}

CSpace::~CSpace() { AGATE_ASSERT(held_ == 0, "CSpace deleted holding %u caps", held_); }

Result<Slot*> CSpace::findSlot(Handle handle, Rights need, ObjectType type) const noexcept {
  // Read the untrusted handle once into locals, validate, then use.
  const uint32_t index = handle.index();
  const uint32_t generation = handle.generation();
  if (index >= used_) return Error(Errc::INVALID_HANDLE, "handle out of range");
  Slot& s = slotAt(index);
  if (s.object == nullptr || s.generation != generation)
    return Error(Errc::INVALID_HANDLE, "stale or forged handle");
  if (type != ObjectType::ANY && s.object->type() != type)
    return Error(Errc::WRONG_TYPE, "handle names an object of another type");
  if (!hasRights(s.rights, need)) return Error(Errc::PERMISSION_DENIED, "cap lacks a right");
  return &s;
}

Result<Cap> CSpace::lookup(Handle handle, Rights need, ObjectType type) const noexcept {
  auto s = findSlot(handle, need, type);
  if (!s) return s.error();
  return Cap{(*s)->object, (*s)->rights, (*s)->badge};
}

Status CSpace::tryAdmitReceived() const noexcept {
  if (received_ >= receiveLimit_)
    return Error(Errc::QUOTA_EXCEEDED, "the receiver holds as many pushed caps as it accepts");
  return {};
}

Result<PageCharge> CSpace::tryReserveSlot() noexcept {
  if (freeHead_ != 0 || used_ < capacity()) return PageCharge();
  if (capacity() >= MAX_SLOTS) return Error(Errc::QUOTA_EXCEEDED, "CSpace is at MAX_SLOTS");
  AGATE_ASSERT(owner() != nullptr, "CSpace %lu has no bank", static_cast<unsigned long>(koid()));
  return owner()->tryReserve(1);
}

Slot& CSpace::takeFreeSlot(PageCharge&& charge) {
  if (freeHead_ != 0) {
    AGATE_ASSERT(!charge.armed(), "a slot was free, yet a chunk page was charged");
    Slot& s = slotAt(freeHead_ - 1);
    freeHead_ = s.nextFree;
    s.nextFree = 0;
    markOccupied(s.index, true);
    return s;
  }
  if (used_ == capacity()) {
    AGATE_ASSERT(charge.armed() && charge.pages() == 1, "growing CSpace %lu without its page",
                 static_cast<unsigned long>(koid()));
    auto chunk = std::make_unique<Slot[]>(SLOTS_PER_CHUNK);
    for (uint32_t i = 0; i < SLOTS_PER_CHUNK; ++i) {
      chunk[i].cspace = this;
      chunk[i].index = used_ + i;
    }
    chunks_.push_back(std::move(chunk));
    occupied_.push_back(0);
    nonEmpty_.resize((chunks_.size() + 63) / 64, 0);
    nonEmptyTop_.resize((nonEmpty_.size() + 63) / 64, 0);
    charge.commit();
    chargedPages_ += 1;
  }
  AGATE_ASSERT(!charge.armed(), "slot charge left unconsumed");
  markOccupied(used_, true);
  return slotAt(used_++);
}

void CSpace::markOccupied(uint32_t index, bool occupied) noexcept {
  const uint32_t chunk = index / SLOTS_PER_CHUNK;
  const uint32_t bit = 1u << (index % SLOTS_PER_CHUNK);
  const bool wasEmpty = occupied_[chunk] == 0;
  if (occupied)
    occupied_[chunk] |= bit;
  else
    occupied_[chunk] &= ~bit;
  if (wasEmpty == (occupied_[chunk] == 0)) return;
  const uint64_t chunkBit = uint64_t{1} << (chunk % 64);
  uint64_t& word = nonEmpty_[chunk / 64];
  word = wasEmpty ? (word | chunkBit) : (word & ~chunkBit);
  const uint64_t wordBit = uint64_t{1} << (chunk / 64 % 64);
  uint64_t& top = nonEmptyTop_[chunk / 64 / 64];
  top = word != 0 ? (top | wordBit) : (top & ~wordBit);
}

const Slot* CSpace::nextCap(uint64_t from) const noexcept {
  if (from >= used_) return nullptr;
  const auto index = static_cast<uint32_t>(from);
  uint32_t chunk = index / SLOTS_PER_CHUNK;
  const uint32_t here = occupied_[chunk] & (~0u << (index % SLOTS_PER_CHUNK));
  if (here != 0) return &slotAt(chunk * SLOTS_PER_CHUNK + std::countr_zero(here));
  // The next chunk holding a cap: first in the rest of this word of chunk bits, then through
  // the top level to the next non-empty word.
  ++chunk;
  size_t word = chunk / 64;
  if (word >= nonEmpty_.size()) return nullptr;
  uint64_t bits = chunk % 64 != 0 ? nonEmpty_[word] & (~uint64_t{0} << (chunk % 64)) : 0;
  if (bits == 0) {
    const size_t next = chunk % 64 != 0 ? word + 1 : word;  // the first word to look at whole
    size_t top = next / 64;
    uint64_t topBits =
        top < nonEmptyTop_.size() ? nonEmptyTop_[top] & (~uint64_t{0} << (next % 64)) : 0;
    while (topBits == 0) {
      if (++top >= nonEmptyTop_.size()) return nullptr;
      topBits = nonEmptyTop_[top];
    }
    word = top * 64 + std::countr_zero(topBits);
    bits = nonEmpty_[word];
  }
  chunk = static_cast<uint32_t>(word * 64 + std::countr_zero(bits));
  return &slotAt(chunk * SLOTS_PER_CHUNK + std::countr_zero(occupied_[chunk]));
}

Handle CSpace::insert(KernelObject& object, Rights rights, uint64_t badge, Slot* parent,
                      PageCharge&& charge, bool received) {
  AGATE_ASSERT(!received || received_ < receiveLimit_, "a push past the receive limit");
  Slot& s = takeFreeSlot(std::move(charge));
  linkToObject(s, object, object.capsHead_, object.capCount_);
  s.rights = rights;
  s.badge = badge;
  s.received = received;
  received_ += received ? 1 : 0;
  if (parent) {
    AGATE_ASSERT(parent->object == &object, "derived cap names another object");
    linkChild(*parent, s);
  }
  ++held_;
  return s.handle();
}

Handle CSpace::moveIn(Slot& from, PageCharge&& charge, bool received) {
  AGATE_ASSERT(from.object != nullptr, "moving a free slot");
  AGATE_ASSERT(!received || received_ < receiveLimit_, "a push past the receive limit");
  Slot& s = takeFreeSlot(std::move(charge));
  KernelObject& object = *from.object;
  linkToObject(s, object, object.capsHead_, object.capCount_);
  s.rights = from.rights;
  s.badge = from.badge;
  s.received = received || (from.received && from.cspace == this);
  received_ += s.received ? 1 : 0;
  // Take `from`'s place in the derivation tree: same parent, same children.
  if (from.parent) linkChild(*from.parent, s);
  s.firstChild = from.firstChild;
  for (Slot* c = s.firstChild; c; c = c->nextSibling) c->parent = &s;
  from.firstChild = nullptr;
  ++held_;
  erase(from);  // no children left: nothing to hand over
  return s.handle();
}

void CSpace::erase(Slot& slot) noexcept {
  AGATE_ASSERT(slot.object != nullptr, "erasing a free slot");
  // Hand the children to our parent (or make them roots), so an ancestor's revoke still
  // reaches them.
  while (Slot* c = slot.firstChild) {
    slot.firstChild = c->nextSibling;
    if (c->nextSibling) c->nextSibling->prevSibling = nullptr;
    c->prevSibling = c->nextSibling = nullptr;
    c->parent = nullptr;
    if (slot.parent) linkChild(*slot.parent, *c);
  }
  unlinkSibling(slot);
  slot.parent = nullptr;

  KernelObject& object = *slot.object;
  if (slot.objPrev)
    slot.objPrev->objNext = slot.objNext;
  else
    object.capsHead_ = slot.objNext;
  if (slot.objNext) slot.objNext->objPrev = slot.objPrev;
  slot.objPrev = slot.objNext = nullptr;
  --object.capCount_;

  slot.cspace->releaseSlot(slot);
  if (object.capCount_ == 0 && object.lifecycle_) object.lifecycle_->lastCapGone(object);
}

void CSpace::releaseSlot(Slot& slot) noexcept {
  markOccupied(slot.index, false);
  slot.object = nullptr;
  slot.rights = Rights::NONE;
  slot.badge = 0;
  --held_;
  if (slot.received) --received_;
  slot.received = false;
  if (slot.generation >= maxGeneration_) {
    ++retired_;  // never reused: its every generation has been handed out
    return;
  }
  ++slot.generation;
  slot.nextFree = freeHead_;
  freeHead_ = slot.index + 1;
}

uint64_t CSpace::revokeDescendants(Slot& root) noexcept {
  AGATE_ASSERT(root.object != nullptr, "revoking from a free slot");
  uint64_t deleted = 0;
  // Post-order without recursion: descend to a leaf, delete it, climb back to its parent.
  Slot* cur = root.firstChild;
  while (cur) {
    if (cur->firstChild) {
      cur = cur->firstChild;
      continue;
    }
    Slot* parent = cur->parent;
    erase(*cur);
    ++deleted;
    cur = (parent == &root) ? root.firstChild : parent;
  }
  return deleted;
}

void CSpace::teardown() noexcept {
  AGATE_ASSERT(processDead_, "CSpace %lu torn down while its process lives",
               static_cast<unsigned long>(koid()));
  for (uint32_t i = 0; i < used_; ++i) {
    Slot& s = slotAt(i);
    if (s.object) erase(s);
  }
}

}  // namespace agate::kernel

namespace agate::kernel {

void CSpace::verifyInvariants() const {
  const auto k = static_cast<unsigned long>(koid());
  AGATE_ASSERT(chargedPages_ == chunks_.size(), "cspace %lu: %lu pages for %zu chunks", k,
               static_cast<unsigned long>(chargedPages_), chunks_.size());
  uint32_t held = 0;
  uint32_t received = 0;
  uint32_t freeSlots = 0;
  for (uint32_t i = 0; i < used_; ++i) {
    const Slot& s = slotAt(i);
    AGATE_ASSERT(s.cspace == this && s.index == i, "cspace %lu: slot %u misplaced", k, i);
    AGATE_ASSERT(s.generation >= 1 && s.generation <= maxGeneration_,
                 "cspace %lu: slot %u generation %u", k, i, s.generation);
    if (!s.object) {
      AGATE_ASSERT(!(occupied_[i / SLOTS_PER_CHUNK] & (1u << (i % SLOTS_PER_CHUNK))),
                   "cspace %lu: free slot %u marked held", k, i);
      AGATE_ASSERT(!s.parent && !s.firstChild && !s.prevSibling && !s.nextSibling && !s.received,
                   "cspace %lu: free slot %u still linked", k, i);
      continue;
    }
    ++held;
    received += s.received ? 1 : 0;
    AGATE_ASSERT(occupied_[i / SLOTS_PER_CHUNK] & (1u << (i % SLOTS_PER_CHUNK)),
                 "cspace %lu: slot %u held but not marked", k, i);
    if (s.parent) AGATE_ASSERT(s.parent->object == s.object, "cspace %lu: slot %u parent", k, i);
    const Slot* prev = nullptr;
    for (const Slot* c = s.firstChild; c; prev = c, c = c->nextSibling)
      AGATE_ASSERT(c->parent == &s && c->prevSibling == prev && c->object == s.object,
                   "cspace %lu: slot %u child links", k, i);
  }
  for (uint32_t f = freeHead_; f != 0; f = slotAt(f - 1).nextFree) {
    AGATE_ASSERT(f - 1 < used_ && slotAt(f - 1).object == nullptr, "cspace %lu: free list", k);
    ++freeSlots;
  }
  AGATE_ASSERT(held == held_ && held + retired_ + freeSlots == used_,
               "cspace %lu: held %u/%u retired %u free %u of %u", k, held, held_, retired_,
               freeSlots, used_);
  for (size_t c = 0; c < occupied_.size(); ++c) {
    const bool marked = (nonEmpty_[c / 64] >> (c % 64)) & 1;
    const bool top = (nonEmptyTop_[c / 64 / 64] >> (c / 64 % 64)) & 1;
    AGATE_ASSERT(marked == (occupied_[c] != 0) && top == (nonEmpty_[c / 64] != 0),
                 "cspace %lu: chunk %zu occupancy summary", k, c);
  }
  AGATE_ASSERT(received == received_, "cspace %lu: %u received caps, counted %u", k, received,
               received_);
}

}  // namespace agate::kernel
