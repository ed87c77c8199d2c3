// A count of global heap allocations, for tests that assert a hot path allocates nothing.
//
// alloc_counter.cpp replaces the global operator new (every form a test binary could reach:
// plain, nothrow, array, aligned) with one that counts and then calls malloc. A test binary that
// wants the count adds alloc_counter.cpp to its sources (not a library: the replacement must be
// linked into the binary for certain). The counter is a relaxed atomic: exact for the calling
// thread's own allocations; allocations of other threads are counted too.
#pragma once

#include <cstdint>

namespace agate::testing {

// Global operator new calls so far in this process.
uint64_t allocationCount() noexcept;

}  // namespace agate::testing
