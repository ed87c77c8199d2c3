// One attached process for a test: its own EventLoop and KernelConnection to a KernelProcess
// (kernel_fixture.h); `get`, which unwraps the value of a call that must succeed; `observe`, the
// kernel state a refused call must leave unchanged; `quiet`, no event within a short wait.
#pragma once

#include <chrono>
#include <initializer_list>
#include <memory>
#include <tuple>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "agate/caps/kernel_connection.h"
#include "kernel_fixture.h"

namespace agate::testing {

struct KernelClient {
  explicit KernelClient(const KernelProcess& kernel, const char* name = "test") {
    auto c = caps::KernelConnection::tryAttach(loop, kernel.home(), name);
    EXPECT_TRUE(c.ok()) << errcName(c.code());
    if (c) conn = std::move(*c);
  }
  caps::SyncKernel sync() { return conn->sync(); }
  EventLoop loop;
  std::unique_ptr<caps::KernelConnection> conn;
};

// The value of a call that must succeed (a default value, and a test failure, if it did not).
template <class T>
T get(Result<T> r) {
  if (!r.ok()) {
    ADD_FAILURE() << "call failed: " << errcName(r.code());
    return T{};
  }
  return std::move(r).value();
}

// The kernel state a refused call must leave unchanged: every bank's use and object count, and
// the CSpaces of some processes.
struct Observed {
  std::vector<std::tuple<caps::Koid, uint64_t, uint64_t>> banks;
  std::vector<std::tuple<uint64_t, caps::Koid, uint32_t>> caps;
  friend bool operator==(const Observed&, const Observed&) = default;
};

// Observed through `observer`'s introspection calls, with the caps of `processes`.
inline Observed observe(caps::KernelConnection& observer,
                        std::initializer_list<caps::KernelConnection*> processes) {
  Observed o;
  for (const caps::BankInfo& bank : get(observer.sync().listBanks()))
    o.banks.emplace_back(bank.koid, bank.used, bank.objects);
  for (caps::KernelConnection* k : processes)
    for (const caps::CapEntry& e : get(observer.sync().listCaps(k->pid())))
      o.caps.emplace_back(e.handle, e.koid, static_cast<uint32_t>(e.rights));
  return o;
}

// True when `k` has no event within a short wait (run on `loop`, k's loop).
inline bool quiet(EventLoop& loop, caps::KernelConnection& k) {
  return loop.run(loop.deadline(k.nextEvent(), std::chrono::milliseconds(50))).code() ==
         Errc::TIMED_OUT;
}

}  // namespace agate::testing
