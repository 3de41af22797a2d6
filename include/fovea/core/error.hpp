// fovea::error, the one exception every public entry point throws for bad input.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace fovea {

/// Thrown for invalid arguments, before any output is written. The message starts with
/// the name of the offending argument, e.g. "k: extent 3 (head dim) is 63, expected 64".
struct error : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

namespace detail {

template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream message;
  (message << ... << parts);
  throw error(message.str());
}

template <class... Parts>
void require(bool condition, const Parts&... parts) {
  if (!condition) fail(parts...);
}

}  // namespace detail
}  // namespace fovea
