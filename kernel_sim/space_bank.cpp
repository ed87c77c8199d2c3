#include "agate/kernel/space_bank.h"

#include <algorithm>
#include <new>

namespace agate::kernel {

void PageCharge::cancel() noexcept {
  SpaceBank* bank = std::exchange(bank_, nullptr);
  if (!bank) return;
  if (record_) --bank->records_;
  bank->refundPath(pages_, 0, /*notify=*/false);
}

std::unique_ptr<SpaceBank> SpaceBank::createSystemBank(uint64_t limit) {
  auto bank = std::make_unique<SpaceBank>(limit);
  bank->koid_ = bank->nextKoid_++;
  return bank;
}

SpaceBank::~SpaceBank() {
  AGATE_ASSERT(objects_.empty(), "bank %lu deleted owning %zu objects",
               static_cast<unsigned long>(koid()), objects_.size());
}

uint64_t SpaceBank::available() const noexcept {
  uint64_t room = UINT64_MAX;
  for (const SpaceBank* b = this; b; b = b->parent()) room = std::min(room, b->limit_ - b->used_);
  return room;
}

Result<PageCharge> SpaceBank::tryReserve(uint64_t pages) noexcept {
  // used_ <= limit_ holds for every bank, so limit_ - used_ cannot wrap.
  if (pages > available()) return Error(Errc::QUOTA_EXCEEDED, "bank or an ancestor at its limit");
  chargePath(pages);
  return PageCharge(this, pages, 0, false);
}

Result<PageCharge> SpaceBank::tryReserveObject(uint64_t pages) noexcept {
  const uint64_t recordCost = recordPages(records_ + 1) - recordPages(records_);
  if (pages > available() || recordCost > available() - pages)
    return Error(Errc::QUOTA_EXCEEDED, "bank or an ancestor at its limit");
  chargePath(pages + recordCost);
  ++records_;
  return PageCharge(this, pages + recordCost, recordCost, true);
}

void SpaceBank::adoptObject(std::unique_ptr<KernelObject> object, PageCharge&& charge) {
  AGATE_ASSERT(charge.bank_ == this && charge.record_,
               "adopting into bank %lu with a charge that is not an object reservation on it",
               static_cast<unsigned long>(koid()));
  object->owner_ = this;
  object->ownerIndex_ = objects_.size();
  object->koid_ = root_->nextKoid_++;
  if (object->type() == ObjectType::BANK) static_cast<SpaceBank&>(*object).root_ = root_;
  object->chargedPages_ = charge.pages_ - charge.recordPages_;
  charge.commit();
  objects_.push_back(std::move(object));
}

void SpaceBank::chargeObject(KernelObject& object, PageCharge&& charge) noexcept {
  AGATE_ASSERT(object.owner_ == this && charge.bank_ == this && !charge.record_,
               "charging object %lu of bank %lu with a charge that is not a page reservation on it",
               static_cast<unsigned long>(object.koid()), static_cast<unsigned long>(koid()));
  object.chargedPages_ += charge.pages_;
  charge.commit();
}

void SpaceBank::refundObjectPages(KernelObject& object, uint64_t pages) noexcept {
  AGATE_ASSERT(object.owner_ == this && object.chargedPages_ >= pages,
               "refunding %lu pages of object %lu, which bank %lu does not owe",
               static_cast<unsigned long>(pages), static_cast<unsigned long>(object.koid()),
               static_cast<unsigned long>(koid()));
  object.chargedPages_ -= pages;
  refundPath(pages, 0, /*notify=*/true);
}

Status SpaceBank::trySetLimit(uint64_t limit) noexcept {
  if (limit < used_) return Error(Errc::INVALID_ARGUMENT, "limit below the pages in use");
  limit_ = limit;
  publish();
  return {};
}

void SpaceBank::eraseObject(KernelObject& object) noexcept {
  AGATE_ASSERT(object.owner_ == this && object.ownerIndex_ < objects_.size() &&
                   objects_[object.ownerIndex_].get() == &object,
               "bank %lu does not own object %lu", static_cast<unsigned long>(koid()),
               static_cast<unsigned long>(object.koid()));
  const size_t index = object.ownerIndex_;
  if (index != objects_.size() - 1) {
    std::swap(objects_[index], objects_.back());
    objects_[index]->ownerIndex_ = index;
  }
  objects_.pop_back();  // deletes the object
}

void SpaceBank::destroyObject(KernelObject& object) noexcept {
  AGATE_REQUIRE(object.owner_ == this, "object %lu is not owned by bank %lu",
                static_cast<unsigned long>(object.koid()), static_cast<unsigned long>(koid()));
  uint64_t fromOwn = 0;
  uint64_t fromChildren = 0;
  if (object.type() == ObjectType::BANK) {
    auto& victim = static_cast<SpaceBank&>(object);
    fromChildren = victim.used_;
    // Every bank of the subtree, parents before children; destroyed in reverse, so a bank's
    // child banks are gone before it empties itself. No recursion: depth is user-controlled.
    std::vector<SpaceBank*> order{&victim};
    for (size_t i = 0; i < order.size(); ++i)
      for (auto& o : order[i]->objects_)
        if (o->type() == ObjectType::BANK) order.push_back(static_cast<SpaceBank*>(o.get()));
    for (auto it = order.rbegin(); it != order.rend(); ++it) {
      SpaceBank& b = **it;
      while (!b.objects_.empty()) {
        KernelObject& o = *b.objects_.back();
        AGATE_ASSERT(o.type() != ObjectType::BANK, "child bank %lu outlived its destruction",
                     static_cast<unsigned long>(o.koid()));
        o.deleteAllCaps();
        if (o.lifecycle_) o.lifecycle_->objectDestroyed(o);
        o.teardown();
        b.eraseObject(o);
      }
      b.deleteAllCaps();
      if (b.lifecycle_) b.lifecycle_->objectDestroyed(b);
      if (b.creditPage_) publishCredit(*b.creditPage_, {b.used_, b.limit_, b.returned_, true});
      for (BankObserver* obs : b.observers_) obs->bankDestroyed(b);
      b.observers_.clear();
      if (&b != &victim) b.parent()->eraseObject(b);
    }
  } else {
    fromOwn = object.chargedPages_;
    object.deleteAllCaps();
    if (object.lifecycle_) object.lifecycle_->objectDestroyed(object);
    object.teardown();
  }
  const uint64_t before = recordPages(records_);
  --records_;
  fromOwn += before - recordPages(records_);
  eraseObject(object);
  refundPath(fromOwn, fromChildren, /*notify=*/true);
}

void SpaceBank::chargePath(uint64_t pages) noexcept {
  ownPages_ += pages;
  for (SpaceBank* b = this; b; b = b->parent()) {
    b->used_ += pages;
    b->publish();
  }
}

void SpaceBank::refundPath(uint64_t own, uint64_t children, bool notify) noexcept {
  const uint64_t pages = own + children;
  AGATE_ASSERT(ownPages_ >= own, "bank %lu refunds %lu own pages of %lu",
               static_cast<unsigned long>(koid()), static_cast<unsigned long>(own),
               static_cast<unsigned long>(ownPages_));
  ownPages_ -= own;
  for (SpaceBank* b = this; b; b = b->parent()) {
    AGATE_ASSERT(b->used_ >= pages, "bank %lu refunds %lu of %lu used pages",
                 static_cast<unsigned long>(b->koid()), static_cast<unsigned long>(pages),
                 static_cast<unsigned long>(b->used_));
    b->used_ -= pages;
    if (notify) b->returned_ += pages;
    b->publish();
  }
  if (!notify || pages == 0) return;
  // State is final: tell observers, nearest bank first.
  for (SpaceBank* b = this; b; b = b->parent())
    for (BankObserver* obs : b->observers_) obs->pagesReturned(*b, pages);
}

void SpaceBank::publish() noexcept {
  if (creditPage_) publishCredit(*creditPage_, credit());
}

void SpaceBank::setCreditPage(BankCreditPage* page) noexcept {
  creditPage_ = page;
  publish();
}

void SpaceBank::adoptCreditMemory(KernelPage page, PageCharge&& charge) noexcept {
  AGATE_ASSERT(creditMemory_.data() == nullptr && page.data() != nullptr,
               "bank %lu: credit memory adopted twice", static_cast<unsigned long>(koid()));
  AGATE_ASSERT(charge.bank_ == this && !charge.record_ && charge.pages_ == 1,
               "bank %lu: credit memory needs a one-page charge on the bank itself",
               static_cast<unsigned long>(koid()));
  charge.commit();
  creditMemory_ = std::move(page);
  // A placement of the layout into zeroed shared memory: the atomics' zero state is their initial
  // state, and only this (single-threaded) kernel writes them.
  creditPage_ = new (creditMemory_.data()) BankCreditPage;
  publish();
}

void SpaceBank::addObserver(BankObserver& observer) { observers_.push_back(&observer); }

bool SpaceBank::hasObserver(const BankObserver& observer) const noexcept {
  return std::find(observers_.begin(), observers_.end(), &observer) != observers_.end();
}

void SpaceBank::removeObserver(BankObserver& observer) noexcept {
  std::erase(observers_, &observer);
}

}  // namespace agate::kernel

namespace agate::kernel {

void SpaceBank::verifyInvariants() const {
  const auto k = static_cast<unsigned long>(koid());
  AGATE_ASSERT(used_ <= limit_, "bank %lu: used %lu above limit %lu", k,
               static_cast<unsigned long>(used_), static_cast<unsigned long>(limit_));
  AGATE_ASSERT(records_ == objects_.size(), "bank %lu: %lu records for %zu objects", k,
               static_cast<unsigned long>(records_), objects_.size());
  uint64_t own = recordPages(records_) + (creditMemory_.data() ? 1 : 0);
  uint64_t children = 0;
  for (size_t i = 0; i < objects_.size(); ++i) {
    const KernelObject& o = *objects_[i];
    AGATE_ASSERT(o.owner_ == this && o.ownerIndex_ == i, "bank %lu: object %lu back link", k,
                 static_cast<unsigned long>(o.koid()));
    o.verifyCaps();
    if (o.type() == ObjectType::BANK)
      children += static_cast<const SpaceBank&>(o).used_;
    else
      own += o.chargedPages_;
  }
  AGATE_ASSERT(ownPages_ == own, "bank %lu: own pages %lu, objects account for %lu", k,
               static_cast<unsigned long>(ownPages_), static_cast<unsigned long>(own));
  AGATE_ASSERT(used_ == ownPages_ + children, "bank %lu: used %lu != own %lu + children %lu", k,
               static_cast<unsigned long>(used_), static_cast<unsigned long>(ownPages_),
               static_cast<unsigned long>(children));
  verifyCaps();
}

}  // namespace agate::kernel
