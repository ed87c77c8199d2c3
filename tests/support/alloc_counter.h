// Counting global operator new for allocation tests.
//
// A test binary that links tests/support/alloc_counter.cpp replaces the global operator new and
// delete with malloc/free wrappers that count every allocation, on every thread (relaxed atomic:
// the count is read after the work it measures is joined or ran on the reading thread). Link it
// only into binaries that check "allocates nothing"; it applies to the whole binary.
#pragma once

#include <cstdint>

namespace agate::testing {

// Allocations made through the global operator new since the process started.
uint64_t allocationCount() noexcept;

}  // namespace agate::testing
