#include "agate/kernel/cspace.h"

#include <algorithm>
#include <bit>

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
  if (index >= capacity()) return Error(Errc::INVALID_HANDLE, "handle out of range");
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

Result<PageCharge> CSpace::tryReserveSlot(bool received) noexcept {
  if (received && received_ >= receiveLimit_)
    return Error(Errc::QUOTA_EXCEEDED, "the receiver holds as many pushed caps as it accepts");
  if (free_ != 0) return PageCharge();
  if (capacity() >= MAX_SLOTS) return Error(Errc::QUOTA_EXCEEDED, "CSpace is at MAX_SLOTS");
  AGATE_ASSERT(owner() != nullptr, "CSpace %lu has no bank", static_cast<unsigned long>(koid()));
  return owner()->tryReserve(1);
}

Slot& CSpace::takeFreeSlot(PageCharge&& charge) {
  if (free_ == 0) {
    AGATE_ASSERT(charge.armed() && charge.pages() == 1, "growing CSpace %lu without its page",
                 static_cast<unsigned long>(koid()));
    const auto base = static_cast<uint32_t>(chunks_.size()) * SLOTS_PER_CHUNK;
    auto chunk = std::make_unique<Slot[]>(SLOTS_PER_CHUNK);
    for (uint32_t i = 0; i < SLOTS_PER_CHUNK; ++i) {
      chunk[i].cspace = this;
      chunk[i].index = base + i;
      chunk[i].generation = generationFloor_;
    }
    chunks_.push_back(std::move(chunk));
    occupied_.push_back(0);
    freeMask_.push_back(0);
    nonEmpty_.resize(chunks_.size());
    withFree_.resize(chunks_.size());
    for (uint32_t i = 0; i < SLOTS_PER_CHUNK; ++i) markFree(base + i, true);
    charge.commit();
    chargedPages_ += 1;
  }
  AGATE_ASSERT(!charge.armed(), "a slot was free, yet a chunk page was charged");
  // The lowest free slot, so caps gather at the bottom and the top chunks can empty out.
  const uint32_t chunk = withFree_.next(0);
  AGATE_ASSERT(chunk != ChunkBits::NONE, "CSpace %lu counts %u free slots but finds none",
               static_cast<unsigned long>(koid()), free_);
  Slot& s = slotAt(chunk * SLOTS_PER_CHUNK + std::countr_zero(freeMask_[chunk]));
  markFree(s.index, false);
  markOccupied(s.index, true);
  return s;
}

void CSpace::markOccupied(uint32_t index, bool occupied) noexcept {
  const uint32_t chunk = index / SLOTS_PER_CHUNK;
  const uint32_t bit = 1u << (index % SLOTS_PER_CHUNK);
  if (occupied)
    occupied_[chunk] |= bit;
  else
    occupied_[chunk] &= ~bit;
  nonEmpty_.set(chunk, occupied_[chunk] != 0);
}

void CSpace::markFree(uint32_t index, bool free) noexcept {
  const uint32_t chunk = index / SLOTS_PER_CHUNK;
  const uint32_t bit = 1u << (index % SLOTS_PER_CHUNK);
  if (free) {
    freeMask_[chunk] |= bit;
    ++free_;
  } else {
    freeMask_[chunk] &= ~bit;
    --free_;
  }
  withFree_.set(chunk, freeMask_[chunk] != 0);
}

const Slot* CSpace::nextCap(uint64_t from) const noexcept {
  if (from >= capacity()) return nullptr;
  const auto index = static_cast<uint32_t>(from);
  const uint32_t chunk = index / SLOTS_PER_CHUNK;
  const uint32_t here = occupied_[chunk] & (~0u << (index % SLOTS_PER_CHUNK));
  if (here != 0) return &slotAt(chunk * SLOTS_PER_CHUNK + std::countr_zero(here));
  const uint32_t next = nonEmpty_.next(uint64_t{chunk} + 1);
  if (next == ChunkBits::NONE) return nullptr;
  return &slotAt(next * SLOTS_PER_CHUNK + std::countr_zero(occupied_[next]));
}

void CSpace::askForTrim() noexcept {
  if (trimAsked_ || processDead_ || chunks_.size() <= 1 || lifecycle_ == nullptr) return;
  if (freeMask_.back() != ~0u) return;  // the last chunk holds a cap or a retired slot
  trimAsked_ = true;
  lifecycle_->trimWanted(*this);
}

uint64_t CSpace::trim() noexcept {
  trimAsked_ = false;
  if (processDead_) return 0;
  uint64_t released = 0;
  while (chunks_.size() > 1 && freeMask_.back() == ~0u) {
    const Slot* chunk = chunks_.back().get();
    for (uint32_t i = 0; i < SLOTS_PER_CHUNK; ++i) {
      AGATE_ASSERT(chunk[i].object == nullptr, "giving back a chunk that holds a cap");
      generationFloor_ = std::max(generationFloor_, chunk[i].generation);
    }
    free_ -= SLOTS_PER_CHUNK;
    chunks_.pop_back();
    occupied_.pop_back();
    freeMask_.pop_back();
    ++released;
  }
  if (released == 0) return 0;
  nonEmpty_.resize(chunks_.size());
  withFree_.resize(chunks_.size());
  owner()->refundObjectPages(*this, released);
  return released;
}

void ChunkBits::resize(size_t chunks) {
  const size_t words = (chunks + 63) / 64;
  words_.resize(words, 0);
  if (words > 0 && chunks % 64 != 0) words_.back() &= (uint64_t{1} << (chunks % 64)) - 1;
  top_.assign((words + 63) / 64, 0);
  for (size_t w = 0; w < words; ++w)
    if (words_[w] != 0) top_[w / 64] |= uint64_t{1} << (w % 64);
}

void ChunkBits::set(uint32_t chunk, bool on) noexcept {
  uint64_t& word = words_[chunk / 64];
  const uint64_t bit = uint64_t{1} << (chunk % 64);
  word = on ? (word | bit) : (word & ~bit);
  uint64_t& top = top_[chunk / 64 / 64];
  const uint64_t wordBit = uint64_t{1} << (chunk / 64 % 64);
  top = word != 0 ? (top | wordBit) : (top & ~wordBit);
}

uint32_t ChunkBits::next(uint64_t from) const noexcept {
  size_t word = from / 64;
  if (word >= words_.size()) return NONE;
  uint64_t bits = words_[word] & (~uint64_t{0} << (from % 64));
  if (bits == 0) {
    // The next word with a member, through the top level (at most 8 words for MAX_SLOTS).
    const size_t first = word + 1;
    size_t top = first / 64;
    if (top >= top_.size()) return NONE;
    uint64_t topBits = first % 64 != 0 ? top_[top] & (~uint64_t{0} << (first % 64)) : top_[top];
    while (topBits == 0) {
      if (++top >= top_.size()) return NONE;
      topBits = top_[top];
    }
    word = top * 64 + std::countr_zero(topBits);
    bits = words_[word];
  }
  return static_cast<uint32_t>(word * 64 + std::countr_zero(bits));
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
  markFree(slot.index, true);
  if (slot.index / SLOTS_PER_CHUNK == chunks_.size() - 1) askForTrim();
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
  for (uint32_t i = 0; i < capacity(); ++i) {
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
  AGATE_ASSERT(occupied_.size() == chunks_.size() && freeMask_.size() == chunks_.size(),
               "cspace %lu: masks for %zu/%zu of %zu chunks", k, occupied_.size(), freeMask_.size(),
               chunks_.size());
  uint32_t held = 0;
  uint32_t received = 0;
  uint32_t freeSlots = 0;
  uint32_t retired = 0;
  for (uint32_t i = 0; i < capacity(); ++i) {
    const Slot& s = slotAt(i);
    const uint32_t bit = 1u << (i % SLOTS_PER_CHUNK);
    const bool marked = occupied_[i / SLOTS_PER_CHUNK] & bit;
    const bool markedFree = freeMask_[i / SLOTS_PER_CHUNK] & bit;
    AGATE_ASSERT(s.cspace == this && s.index == i, "cspace %lu: slot %u misplaced", k, i);
    AGATE_ASSERT(s.generation >= 1 && s.generation <= maxGeneration_,
                 "cspace %lu: slot %u generation %u", k, i, s.generation);
    if (!s.object) {
      AGATE_ASSERT(!marked, "cspace %lu: free slot %u marked held", k, i);
      AGATE_ASSERT(!s.parent && !s.firstChild && !s.prevSibling && !s.nextSibling && !s.received,
                   "cspace %lu: free slot %u still linked", k, i);
      // Free unless retired: a retired slot has handed out its last generation.
      AGATE_ASSERT(markedFree || s.generation == maxGeneration_,
                   "cspace %lu: slot %u neither free nor retired", k, i);
      (markedFree ? freeSlots : retired) += 1;
      continue;
    }
    AGATE_ASSERT(marked && !markedFree, "cspace %lu: slot %u held but marked otherwise", k, i);
    ++held;
    received += s.received ? 1 : 0;
    if (s.parent) AGATE_ASSERT(s.parent->object == s.object, "cspace %lu: slot %u parent", k, i);
    const Slot* prev = nullptr;
    for (const Slot* c = s.firstChild; c; prev = c, c = c->nextSibling)
      AGATE_ASSERT(c->parent == &s && c->prevSibling == prev && c->object == s.object,
                   "cspace %lu: slot %u child links", k, i);
  }
  AGATE_ASSERT(held == held_ && freeSlots == free_ && retired == retired_,
               "cspace %lu: held %u/%u free %u/%u retired %u/%u", k, held, held_, freeSlots, free_,
               retired, retired_);
  for (uint32_t c = 0; c < chunks_.size(); ++c)
    AGATE_ASSERT(
        nonEmpty_.test(c) == (occupied_[c] != 0) && withFree_.test(c) == (freeMask_[c] != 0),
        "cspace %lu: chunk %u summary bits", k, c);
  AGATE_ASSERT(received == received_, "cspace %lu: %u received caps, counted %u", k, received,
               received_);
}

}  // namespace agate::kernel
