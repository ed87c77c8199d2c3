// One attached process for a test: its own EventLoop and KernelConnection to a KernelProcess
// (kernel_fixture.h), and `get`, which unwraps the value of a call that must succeed.
#pragma once

#include <memory>
#include <utility>

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

}  // namespace agate::testing
