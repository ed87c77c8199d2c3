// Command-line checks shared by agate-kernel and the `agate` CLI: CLI11 validators whose
// messages say what was expected, in Agate's words.
#pragma once

#include <charconv>
#include <cstdint>
#include <string>
#include <system_error>
#include <utility>

#include <CLI/CLI.hpp>

namespace agate::kernel {

// A positive whole number: "abc", "0" and "-1" all get "must be a positive whole number<what>,
// not '...'". `what`: e.g. " of pages" (or empty); `typeName`: the placeholder --help shows.
inline CLI::Validator positiveWholeNumber(std::string what, std::string typeName) {
  return CLI::Validator(
      [what = std::move(what)](std::string& input) -> std::string {
        uint64_t value = 0;
        const char* last = input.c_str() + input.size();
        const auto [end, ec] = std::from_chars(input.c_str(), last, value);
        if (ec != std::errc() || end != last || value == 0)
          return "must be a positive whole number" + what + ", not '" + input + "'";
        return {};
      },
      "", std::move(typeName));
}

// A whole number from 0 to `most`: anything else gets "must be a whole number from 0 to
// <most><what>, not '...'".
inline CLI::Validator wholeNumberUpTo(uint64_t most, std::string what, std::string typeName) {
  return CLI::Validator(
      [most, what = std::move(what)](std::string& input) -> std::string {
        uint64_t value = 0;
        const char* last = input.c_str() + input.size();
        const auto [end, ec] = std::from_chars(input.c_str(), last, value);
        if (ec != std::errc() || end != last || value > most)
          return "must be a whole number from 0 to " + std::to_string(most) + what + ", not '" +
                 input + "'";
        return {};
      },
      "", std::move(typeName));
}

}  // namespace agate::kernel
