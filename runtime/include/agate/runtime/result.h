// Errors and results: the one way Agate reports an outcome that another party can cause.
//
// Agate separates three kinds of failure and never mixes them:
//
//  * A bug in this process: AGATE_ASSERT(cond, fmt, ...) — always on, prints the values, aborts.
//  * A caller's broken precondition inside one process: AGATE_REQUIRE(cond, fmt, ...) — same
//    mechanism, different wording, so a reader knows whose fault it is.
//  * An outcome another process, the kernel or the machine can cause (peer gone, malformed frame,
//    ring full, quota exhausted, ...): a value of the closed enum `Errc`, carried in a
//    `[[nodiscard]] Result<T>`. No exceptions cross a process boundary, and business logic never
//    catches.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <type_traits>
#include <utility>

namespace agate {

// The closed set of outcomes another party can cause. Stable numeric values: they travel in
// replies (kernel completions, RPC exceptions), so never renumber, only append.
enum class Errc : uint16_t {
  OK = 0,
  CANCELLED = 1,           // the operation was cancelled (its promise was dropped, or loop stopped)
  DISCONNECTED = 2,        // the peer detached or died; nothing more will arrive
  PROTOCOL_ERROR = 3,      // the peer wrote something malformed; the channel is now unusable
  MESSAGE_TOO_LARGE = 4,   // a message does not fit in one frame of this channel
  WOULD_BLOCK = 5,         // non-blocking call found the ring full or empty
  TIMED_OUT = 6,           // a deadline passed
  ATTACH_REFUSED = 7,      // attach rejected: user-count limit reached or scope mismatch
  INVALID_ARGUMENT = 8,    // a caller passed a value outside the documented range
  OUT_OF_MEMORY = 9,       // a pool, arena or quota is exhausted
  SYSTEM_ERROR = 10,       // a system call failed; Error::sysErrno says which errno
  UNSUPPORTED = 11,        // the machine lacks a feature (io_uring disabled, old kernel, ...)
  STACK_OVERFLOW = 12,     // a fiber ran past its stack
  INVALID_HANDLE = 13,     // a handle is stale, forged or out of range
  PERMISSION_DENIED = 14,  // the handle lacks a right the operation needs
  QUOTA_EXCEEDED = 15,     // a space bank (or one of its ancestors) is at its limit
  NOT_FOUND = 16,          // a name or id does not exist
  ALREADY_EXISTS = 17,     // a name or id is already taken
  FAILED = 18,             // an application-level failure reported by a peer
  WRONG_TYPE = 19,         // a valid handle names an object of another type than the call needs
};

// A short, stable, human-readable name for an error code ("disconnected", ...).
constexpr const char* errcName(Errc c) noexcept {
  switch (c) {
    case Errc::OK:
      return "ok";
    case Errc::CANCELLED:
      return "cancelled";
    case Errc::DISCONNECTED:
      return "disconnected";
    case Errc::PROTOCOL_ERROR:
      return "protocol error";
    case Errc::MESSAGE_TOO_LARGE:
      return "message too large";
    case Errc::WOULD_BLOCK:
      return "would block";
    case Errc::TIMED_OUT:
      return "timed out";
    case Errc::ATTACH_REFUSED:
      return "attach refused";
    case Errc::INVALID_ARGUMENT:
      return "invalid argument";
    case Errc::OUT_OF_MEMORY:
      return "out of memory";
    case Errc::SYSTEM_ERROR:
      return "system error";
    case Errc::UNSUPPORTED:
      return "unsupported";
    case Errc::STACK_OVERFLOW:
      return "stack overflow";
    case Errc::INVALID_HANDLE:
      return "invalid handle";
    case Errc::PERMISSION_DENIED:
      return "permission denied";
    case Errc::QUOTA_EXCEEDED:
      return "quota exceeded";
    case Errc::NOT_FOUND:
      return "not found";
    case Errc::ALREADY_EXISTS:
      return "already exists";
    case Errc::FAILED:
      return "failed";
    case Errc::WRONG_TYPE:
      return "wrong type";
  }
  return "unknown error";
}

// An error value: a code, the errno when the code is systemError, and a static description of
// where it arose. `detail` must point to a string literal (or other storage that outlives every
// copy): errors are copied freely and never own memory, so producing one never allocates.
struct [[nodiscard]] Error {
  Errc code = Errc::OK;
  int32_t sysErrno = 0;
  const char* detail = "";

  constexpr Error() = default;
  constexpr Error(Errc c, const char* d = "") : code(c), detail(d) {}
  constexpr Error(Errc c, int32_t e, const char* d) : code(c), sysErrno(e), detail(d) {}

  // A system call failed with errno `e`.
  static Error fromErrno(int e, const char* d) { return Error(Errc::SYSTEM_ERROR, e, d); }

  // Writes "<name>: <detail> (errno N)" into buf; returns buf. Never allocates.
  const char* describe(char* buf, size_t size) const noexcept;

  friend constexpr bool operator==(const Error& a, const Error& b) { return a.code == b.code; }
  friend constexpr bool operator==(const Error& a, Errc b) { return a.code == b; }
};

namespace detail {
[[noreturn]] void assertionFailed(const char* kind, const char* expr, const char* file, int line,
                                  const char* fmt, ...) noexcept
    __attribute__((format(printf, 5, 6)));
}  // namespace detail

// Result<T>: a T or an Error. `[[nodiscard]]`: an ignored failure is a compile error under
// -Werror. Accessing value() of an error (or error() of a value) is a bug and aborts.
template <class T>
class [[nodiscard]] Result {
 public:
  Result(const T& v) : ok_(true) { new (&value_) T(v); }  // NOLINT: implicit by design
  Result(T&& v) : ok_(true) { new (&value_) T(std::move(v)); }
  Result(Error e) : ok_(false), error_(e) {}  // NOLINT
  Result(Errc c) : ok_(false), error_(c) {}   // NOLINT

  Result(const Result& o) : ok_(o.ok_) {
    if (ok_)
      new (&value_) T(o.value_);
    else
      error_ = o.error_;
  }
  Result(Result&& o) noexcept(std::is_nothrow_move_constructible_v<T>) : ok_(o.ok_) {
    if (ok_)
      new (&value_) T(std::move(o.value_));
    else
      error_ = o.error_;
  }
  Result& operator=(Result o) noexcept(std::is_nothrow_move_constructible_v<T>) {
    if (this != &o) {
      this->~Result();
      new (this) Result(std::move(o));
    }
    return *this;
  }
  ~Result() {
    if (ok_) value_.~T();
  }

  bool ok() const noexcept { return ok_; }
  explicit operator bool() const noexcept { return ok_; }

  T& value() & {
    check(ok_);
    return value_;
  }
  const T& value() const& {
    check(ok_);
    return value_;
  }
  T&& value() && {
    check(ok_);
    return std::move(value_);
  }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }

  Error error() const {
    check(!ok_);
    return error_;
  }
  Errc code() const noexcept { return ok_ ? Errc::OK : error_.code; }

 private:
  static void check(bool c) {
    if (!c)
      detail::assertionFailed("bug", "Result accessed on the wrong side", __FILE__, __LINE__, "%s",
                              "");
  }
  bool ok_;
  union {
    T value_;
    Error error_;
  };
};

// Result<void>: success or an Error.
template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(Error e) : error_(e) {}  // NOLINT
  Result(Errc c) : error_(c) {}   // NOLINT
  bool ok() const noexcept { return error_.code == Errc::OK; }
  explicit operator bool() const noexcept { return ok(); }
  void value() const {
    if (!ok())
      detail::assertionFailed("bug", "Result<void> holds an error", __FILE__, __LINE__, "%s",
                              errcName(error_.code));
  }
  Error error() const { return error_; }
  Errc code() const noexcept { return error_.code; }

 private:
  Error error_{};
};

using Status = Result<void>;

}  // namespace agate

// A bug in this process. Always on (release builds too); prints the expression, place and a
// printf-formatted message with the values involved, then aborts.
#define AGATE_ASSERT(cond, ...)                                                       \
  do {                                                                                \
    if (__builtin_expect(!(cond), 0))                                                 \
      ::agate::detail::assertionFailed("assertion failed", #cond, __FILE__, __LINE__, \
                                       __VA_ARGS__);                                  \
  } while (0)

// A caller's broken precondition inside this process (never used for data from another process).
#define AGATE_REQUIRE(cond, ...)                                                           \
  do {                                                                                     \
    if (__builtin_expect(!(cond), 0))                                                      \
      ::agate::detail::assertionFailed("precondition violated", #cond, __FILE__, __LINE__, \
                                       __VA_ARGS__);                                       \
  } while (0)

// Evaluates an expression yielding Result<...>/Status; returns its error from the enclosing
// function (whose return type must be constructible from Error).
#define AGATE_TRY(expr)                                  \
  do {                                                   \
    auto agate_try_r_ = (expr);                          \
    if (!agate_try_r_.ok()) return agate_try_r_.error(); \
  } while (0)
