// SpaceBank: a page quota from which every kernel object is charged (Coyotos/KeyKOS semantics).
//
// Banks form a tree under the system bank. Each bank has a `limit` and a `used` count, in pages;
// `used` counts everything charged to the bank *and to its descendants*. Rules:
//
//  * Charging n pages to a bank charges it and every ancestor, all-or-nothing: it succeeds only
//    if `used + n <= limit` holds for every bank on the path to the root, so the tightest limit
//    wins. Otherwise QUOTA_EXCEEDED and nothing changed.
//  * A child is created with any limit, even one above what its parent has left (KeyKOS): the
//    child's limit is a cap, not a reservation; the ancestors' limits still bound it. Lowering a
//    limit below `used` is refused (INVALID_ARGUMENT), raising it is always allowed.
//  * Destroying a bank destroys every object allocated from it and from its descendants (caps
//    to them die with them), and refunds all of it to the ancestors above the destroyed bank.
//
// What is charged (the user-visible quota models kernel memory too):
//  * an object's own pages (a region's size);
//  * object records: each object allocated from a bank costs OBJECT_RECORD_BYTES of kernel
//    bookkeeping, charged per bank in whole pages: a bank with r records pays
//    ceil(r / RECORDS_PER_PAGE) pages for them (the 1st, 17th, 33rd, ... record costs a page,
//    removing the last record of a page refunds it). A child bank is a record of its parent;
//  * CSpace slots: one page per chunk of CSpace::SLOTS_PER_CHUNK slots, charged to the bank the
//    CSpace was allocated from when the CSpace grows, refunded when it is destroyed.
//
// Two-phase charging. A call that needs pages from several banks reserves each (`tryReserve*`,
// a PageCharge that refunds itself unless committed, as a Genode reservation does), and only
// once every reservation succeeded does it change anything else. A cancelled reservation is an
// exact undo and notifies no one.
//
// Credit page and refund observers: a bank can be given a BankCreditPage (owned by the daemon,
// mapped read-only into holders) that the bank republishes on every change of used/limit; and
// BankObservers, told synchronously when pages come back (the daemon turns that into a
// notification) and when the bank is destroyed. Observers are called once the call's state is
// final and must not call back into the kernel.
//
// Threading: single-threaded (see object.h).
#pragma once

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "agate/kernel/credit_page.h"
#include "agate/kernel/object.h"
#include "agate/kernel/sealed_memory.h"
#include "agate/runtime/result.h"

namespace agate::kernel {

// Not PAGE_SIZE: some system headers define that as a macro.
inline constexpr uint64_t PAGE_BYTES = 4096;
inline constexpr uint64_t OBJECT_RECORD_BYTES = 256;
inline constexpr uint64_t RECORDS_PER_PAGE = PAGE_BYTES / OBJECT_RECORD_BYTES;
inline constexpr uint64_t UNLIMITED = UINT64_MAX;

// Pages a bank pays for `records` object records.
constexpr uint64_t recordPages(uint64_t records) noexcept {
  return (records + RECORDS_PER_PAGE - 1) / RECORDS_PER_PAGE;
}

class SpaceBank;

// Pages charged to a bank and its ancestors, refunded (silently) on destruction unless
// committed. Move-only. A charge made by tryReserveObject() must be consumed by adopt().
class [[nodiscard]] PageCharge {
 public:
  PageCharge() = default;
  PageCharge(PageCharge&& o) noexcept
      : bank_(std::exchange(o.bank_, nullptr)),
        pages_(o.pages_),
        recordPages_(o.recordPages_),
        record_(o.record_) {}
  PageCharge& operator=(PageCharge&& o) noexcept {
    if (this != &o) {
      cancel();
      bank_ = std::exchange(o.bank_, nullptr);
      pages_ = o.pages_;
      recordPages_ = o.recordPages_;
      record_ = o.record_;
    }
    return *this;
  }
  PageCharge(const PageCharge&) = delete;
  PageCharge& operator=(const PageCharge&) = delete;
  ~PageCharge() { cancel(); }

  // Every page charged, record page included.
  uint64_t pages() const noexcept { return pages_; }
  bool armed() const noexcept { return bank_ != nullptr; }
  // Keeps the pages charged; the caller has recorded them on an object.
  void commit() noexcept { bank_ = nullptr; }
  // Refunds the pages now, as if the reservation never happened. Tells no observer.
  void cancel() noexcept;

 private:
  friend class SpaceBank;
  PageCharge(SpaceBank* bank, uint64_t pages, uint64_t recordPages, bool record) noexcept
      : bank_(bank), pages_(pages), recordPages_(recordPages), record_(record) {}
  SpaceBank* bank_ = nullptr;
  uint64_t pages_ = 0;
  uint64_t recordPages_ = 0;  // of pages_, what the record costs (0 or 1)
  bool record_ = false;       // reserved an object record (tryReserveObject)
};

// Told about a bank's refunds and death. Not owned by the bank; remove it before destroying it.
class BankObserver {
 public:
  // `pages` came back to `bank` (or a descendant) as one call completed.
  virtual void pagesReturned(SpaceBank& bank, uint64_t pages) noexcept = 0;
  // `bank` is being destroyed; the observer is removed from it afterwards.
  virtual void bankDestroyed(SpaceBank& bank) noexcept = 0;

 protected:
  ~BankObserver() = default;
};

class SpaceBank final : public KernelObject {
 public:
  static constexpr ObjectType TYPE = ObjectType::BANK;

  // The system bank: the root of a tree, owned by the kernel, holding every page there is.
  static std::unique_ptr<SpaceBank> createSystemBank(uint64_t limit);

  explicit SpaceBank(uint64_t limit) noexcept : KernelObject(TYPE), limit_(limit) {}
  ~SpaceBank() override;

  uint64_t used() const noexcept { return used_; }
  uint64_t limit() const noexcept { return limit_; }
  // Pages this bank could still be charged: the smallest `limit - used` on the path to the root.
  uint64_t available() const noexcept;
  SpaceBank* parent() const noexcept { return owner(); }
  // Objects allocated directly from this bank (child banks included).
  size_t objectCount() const noexcept { return objects_.size(); }
  const std::vector<std::unique_ptr<KernelObject>>& objects() const noexcept { return objects_; }
  // Pages charged directly to this bank (not through a child).
  uint64_t ownPages() const noexcept { return ownPages_; }
  uint64_t returnedPages() const noexcept { return returned_; }
  BankCredit credit() const noexcept { return {used_, limit_, returned_, false}; }

  // Charges `pages` to this bank and every ancestor, or QUOTA_EXCEEDED with nothing changed.
  Result<PageCharge> tryReserve(uint64_t pages) noexcept;
  // Like tryReserve, for `pages` plus one more object record (and the record page it may need).
  Result<PageCharge> tryReserveObject(uint64_t pages) noexcept;

  // Constructs a T owned by this bank, charged with `charge` (from tryReserveObject() on this
  // bank, for T's pages). Cannot fail.
  template <class T, class... Args>
  T& adopt(PageCharge&& charge, Args&&... args) {
    auto object = std::make_unique<T>(std::forward<Args>(args)...);
    T& ref = *object;
    adoptObject(std::move(object), std::move(charge));
    return ref;
  }

  // Adds `charge` (from tryReserve() on this bank) to `object`, which this bank owns: its
  // chargedPages() grow and are refunded when it is destroyed. Cannot fail.
  void chargeObject(KernelObject& object, PageCharge&& charge) noexcept;

  // Takes `pages` of `object`'s chargedPages() back (a CSpace giving chunks back): refunded to
  // this bank and its ancestors as a return (observers are told). Cannot fail.
  void refundObjectPages(KernelObject& object, uint64_t pages) noexcept;

  // Changes the limit; INVALID_ARGUMENT (nothing changed) if it is below `used`.
  Status trySetLimit(uint64_t limit) noexcept;

  // Destroys `object`, which this bank owns: every cap to it goes, a bank takes its whole
  // subtree with it, and the pages are refunded to this bank and its ancestors.
  void destroyObject(KernelObject& object) noexcept;

  // The daemon's page that mirrors this bank's credit (null: none). Not owned; must stay valid
  // until replaced, or until the bank is destroyed (it is written a last time, `destroyed` set).
  void setCreditPage(BankCreditPage* page) noexcept;
  // Backs the credit page with kernel memory holders map read-only (Kernel::tryMapBankCredit):
  // `page` (HolderAccess::READ_ONLY) becomes the page published into, paid by `charge` (from
  // tryReserve(1) on this bank; counted in ownPages() until the bank is destroyed). Once only.
  void adoptCreditMemory(KernelPage page, PageCharge&& charge) noexcept;
  // The adopted credit memory, or null.
  const KernelPage* creditMemory() const noexcept {
    return creditMemory_.data() ? &creditMemory_ : nullptr;
  }
  void addObserver(BankObserver& observer);
  void removeObserver(BankObserver& observer) noexcept;
  size_t observerCount() const noexcept { return observers_.size(); }
  bool hasObserver(const BankObserver& observer) const noexcept;

  // Checks this bank's accounting and its objects' back links (not the subtree); aborts on a
  // violation. O(objects + caps to them).
  void verifyInvariants() const;

 private:
  friend class PageCharge;

  void adoptObject(std::unique_ptr<KernelObject> object, PageCharge&& charge);
  // Removes `object` from objects_ and deletes it; no accounting.
  void eraseObject(KernelObject& object) noexcept;
  // Adds `pages` to this bank's own count and to used_ up to the root.
  void chargePath(uint64_t pages) noexcept;
  // Takes `own` pages off this bank's own count, and `own + children` off used_ up to the root;
  // `notify`: a real return (counted in returned_, observers told), not a cancelled charge.
  void refundPath(uint64_t own, uint64_t children, bool notify) noexcept;
  void publish() noexcept;

  uint64_t limit_;
  uint64_t used_ = 0;       // ownPages_ + the used_ of every child bank
  uint64_t ownPages_ = 0;   // record pages + pages of objects allocated here (+ pending charges)
  uint64_t records_ = 0;    // object records charged here (objects_.size() + pending)
  uint64_t returned_ = 0;   // pages ever returned here (credit page's `returned`)
  Koid nextKoid_ = 1;       // meaningful in the system bank only: it numbers the whole tree
  SpaceBank* root_ = this;  // the system bank of this tree
  std::vector<std::unique_ptr<KernelObject>> objects_;
  BankCreditPage* creditPage_ = nullptr;  // not owned (may point into creditMemory_)
  KernelPage creditMemory_;               // one page charged here once adopted; empty before
  std::vector<BankObserver*> observers_;  // not owned
};

}  // namespace agate::kernel
