// libFuzzer entry point for one target of fuzz_targets.h, chosen at compile time by
// AGATE_FUZZ_TARGET (a function name in agate::fuzz).
#include <cstddef>
#include <cstdint>
#include <span>

#include "fuzz_targets.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  agate::fuzz::AGATE_FUZZ_TARGET(std::span(reinterpret_cast<const std::byte*>(data), size));
  return 0;
}
