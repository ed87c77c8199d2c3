// The scenarios of suite `messages` (see messages_bench.cpp).
#pragma once

#include <span>

#include "support/scenario.h"

namespace agate::bench::messages {

// Building and decoding frames of 32 B and 1 KiB, with their floor (memcpy) and peer (Cap'n
// Proto's lazy reader), and the cost of refusing a hostile frame.
std::span<const Scenario> frameScenarios();

}  // namespace agate::bench::messages
