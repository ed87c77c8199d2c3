// BankCreditPage: a space bank's credit (used and limit, in pages), in one page of shared
// memory that the kernel writes and holders of the bank read without a kernel call.
//
// This header is shared by both sides and depends on nothing but the standard library. The
// kernel (the only writer) publishes with `publishCredit`; a holder maps the page read-only and
// reads with `tryReadCredit`. The fields are a seqlock: `sequence` is odd while the kernel is
// writing, so a reader that sees the same even sequence before and after its loads has a
// consistent (used, limit, returned, destroyed) tuple and never a torn one.
//
// Memory ordering (a seqlock with release data stores and acquire data loads, no fences — which
// also lets ThreadSanitizer check it):
//  * writer: sequence := s+1 (relaxed), data stores (release), sequence := s+2 (release).
//  * reader: s1 := sequence (acquire), data loads (acquire), s2 := sequence (relaxed);
//    consistent iff s1 == s2 and s1 is even.
// Why it holds: a reader that loads any value of round k acquires the writer's earlier store of
// s_k+1, so its later load of `sequence` (ordered after by the acquire) sees s_k+1 or more, and
// differs from s1 unless s1 already covered round k. Each release data store costs nothing on
// x86. A reader never blocks the kernel; it retries, a bounded number of times.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace agate::kernel {

struct alignas(4096) BankCreditPage {
  std::atomic<uint64_t> sequence{0};   // seqlock: odd while the kernel writes
  std::atomic<uint64_t> used{0};       // pages charged to the bank and its descendants
  std::atomic<uint64_t> limit{0};      // the bank's own limit (an ancestor's may be tighter)
  std::atomic<uint64_t> returned{0};   // pages ever returned to the bank; monotonic
  std::atomic<uint64_t> destroyed{0};  // 1 once the bank is destroyed; the page is final then
  std::byte reserved[4096 - 5 * sizeof(std::atomic<uint64_t>)]{};
};
static_assert(sizeof(BankCreditPage) == 4096, "one page, mapped read-only into holders");
static_assert(std::atomic<uint64_t>::is_always_lock_free,
              "the page is shared between processes: its atomics must be lock-free");
static_assert(std::is_standard_layout_v<BankCreditPage>);

// One consistent reading of a credit page.
struct BankCredit {
  uint64_t used = 0;
  uint64_t limit = 0;
  uint64_t returned = 0;
  bool destroyed = false;
  friend bool operator==(const BankCredit&, const BankCredit&) = default;
};

// Kernel side: the single writer.
inline void publishCredit(BankCreditPage& page, const BankCredit& c) noexcept {
  uint64_t s = page.sequence.load(std::memory_order_relaxed);  // only we write it
  page.sequence.store(s + 1, std::memory_order_relaxed);
  // Release: a reader that sees one of these values also sees the odd sequence above.
  page.used.store(c.used, std::memory_order_release);
  page.limit.store(c.limit, std::memory_order_release);
  page.returned.store(c.returned, std::memory_order_release);
  page.destroyed.store(c.destroyed ? 1 : 0, std::memory_order_release);
  page.sequence.store(s + 2, std::memory_order_release);  // publishes the data stores
}

// Holder side: a consistent reading, or false after `maxTries` torn attempts (the kernel was
// writing each time; only possible if it stopped mid-write, i.e. died). `out` is unchanged then.
inline bool tryReadCredit(const BankCreditPage& page, BankCredit& out,
                          int maxTries = 1024) noexcept {
  for (int i = 0; i < maxTries; ++i) {
    uint64_t s1 = page.sequence.load(std::memory_order_acquire);  // pairs with the final store
    if (s1 & 1) continue;
    BankCredit c;
    // Acquire: pairs with the release data stores, and keeps the re-check below after them.
    c.used = page.used.load(std::memory_order_acquire);
    c.limit = page.limit.load(std::memory_order_acquire);
    c.returned = page.returned.load(std::memory_order_acquire);
    c.destroyed = page.destroyed.load(std::memory_order_acquire) != 0;
    if (page.sequence.load(std::memory_order_relaxed) != s1) continue;
    out = c;
    return true;
  }
  return false;
}

}  // namespace agate::kernel
