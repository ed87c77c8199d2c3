// Where agate-kernel lives: the home directory holding kernel.sock (the attach socket),
// kernel.lock (one daemon per home) and kernel.pid. Shared by the daemon, the client library and
// the tools so that they agree without configuration.
#pragma once

#include <unistd.h>

#include <cstdlib>
#include <string>

namespace agate::kernel {

inline constexpr const char* KERNEL_SOCKET_NAME = "kernel.sock";
inline constexpr const char* KERNEL_LOCK_NAME = "kernel.lock";
inline constexpr const char* KERNEL_PID_NAME = "kernel.pid";

// `explicitHome` if not empty; else $AGATE_HOME; else $XDG_RUNTIME_DIR/agate; else
// /tmp/agate-<uid>.
inline std::string resolveKernelHome(const std::string& explicitHome = {}) {
  if (!explicitHome.empty()) return explicitHome;
  if (const char* env = std::getenv("AGATE_HOME"); env != nullptr && *env != '\0') return env;
  if (const char* xdg = std::getenv("XDG_RUNTIME_DIR"); xdg != nullptr && *xdg != '\0')
    return std::string(xdg) + "/agate";
  return "/tmp/agate-" + std::to_string(::geteuid());
}

}  // namespace agate::kernel
