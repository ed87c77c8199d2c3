// Helpers shared by the kernel_sim tests.
#pragma once

#include <gtest/gtest.h>

#include <cstddef>

#include "../support/proc_self.h"
#include "agate/kernel/kernel.h"

namespace agate::kernel::test {

struct Proc {
  ProcessId pid = 0;
  Handle bank;
};

inline Proc attach(Kernel& k, uint64_t limit = 1000) {
  auto a = k.tryAttachProcess(limit);
  EXPECT_TRUE(a.ok()) << errcName(a.code());
  if (!a) return {};
  return {a->pid, a->bank};
}

template <class R>
Handle handleOf(R&& r) {
  EXPECT_TRUE(r.ok()) << errcName(r.code());
  return r.ok() ? *r : Handle{};
}

inline uint64_t usedOf(const Kernel& k, ProcessId pid, Handle bank) {
  auto b = k.tryFindBank(pid, bank, Rights::NONE);
  EXPECT_TRUE(b.ok());
  return b.ok() ? (*b)->used() : 0;
}

// Descriptors this process has open (the kernel's memfds, pipes and mappings' descriptors are
// real ones in the test process).
inline size_t countOpenFds() {
  const int n = agate::testing::openFdCount();
  EXPECT_GE(n, 0) << "/proc/self/fd is unreadable";
  return n < 0 ? 0 : static_cast<size_t>(n);
}

}  // namespace agate::kernel::test

// Runs `expr` (a Result or Status), expects the error `errc`, and expects the whole kernel's
// observable state (banks, objects, every CSpace with its derivation links) unchanged.
#define EXPECT_REFUSED_UNCHANGED(k, expr, errc)                                    \
  do {                                                                             \
    const auto before_ = (k).snapshot();                                           \
    auto r_ = (expr);                                                              \
    EXPECT_EQ(r_.code(), (errc)) << #expr << ": " << ::agate::errcName(r_.code()); \
    EXPECT_TRUE((k).snapshot() == before_) << #expr << " changed state";           \
    (k).verifyInvariants();                                                        \
  } while (0)
