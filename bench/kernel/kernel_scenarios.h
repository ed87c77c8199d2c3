// Suite `kernel`: agate-kernel's syscall round trips (polled and parked), batched throughput,
// cap copy/delete and bank alloc/free rates, and reclaim time after a holder's death. See
// bench/README.md, "Suite kernel".
#pragma once

#include <span>

#include "support/scenario.h"

namespace agate::bench::kernel {

std::span<const Scenario> kernelScenarios();

}  // namespace agate::bench::kernel
