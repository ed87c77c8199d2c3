#include "agate/runtime/result.h"

#include <cstdarg>
#include <cstring>

namespace agate {

const char* Error::describe(char* buf, size_t size) const noexcept {
  if (size == 0) return buf;
  if (code == Errc::SYSTEM_ERROR) {
    char tmp[64];
    const char* s = strerror_r(sysErrno, tmp, sizeof tmp);  // GNU variant: may return tmp or static
    snprintf(buf, size, "%s: %s (errno %d: %s)", errcName(code), detail, sysErrno, s);
  } else if (detail != nullptr && detail[0] != '\0') {
    snprintf(buf, size, "%s: %s", errcName(code), detail);
  } else {
    snprintf(buf, size, "%s", errcName(code));
  }
  return buf;
}

namespace detail {

void assertionFailed(const char* kind, const char* expr, const char* file, int line,
                     const char* fmt, ...) noexcept {
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  fprintf(stderr, "agate: %s: %s at %s:%d%s%s\n", kind, expr, file, line, msg[0] ? ": " : "", msg);
  fflush(stderr);
  abort();
}

}  // namespace detail
}  // namespace agate
