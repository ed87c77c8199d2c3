# Project-wide compiler settings. Every target gets them through agate_options, so warnings and
# sanitizers are decided in exactly one place.
option(AGATE_WERROR "Treat warnings as errors" OFF)
set(AGATE_SANITIZE "" CACHE STRING "Sanitizer build: '', 'address' (ASan+UBSan) or 'thread' (TSan)")
set_property(CACHE AGATE_SANITIZE PROPERTY STRINGS "" address thread)

add_library(agate_options INTERFACE)
add_library(agate::options ALIAS agate_options)
target_compile_options(agate_options INTERFACE
  -Wall -Wextra -Wpedantic -Wshadow -Wnon-virtual-dtor -Wcast-align -Wunused
  -Woverloaded-virtual -Wnull-dereference -Wimplicit-fallthrough -Wformat=2)
# Frames larger than a page probe each page as they grow, so a big frame on a fiber stack faults in
# the guard page below it (reported as a fiber stack overflow) instead of jumping over the guard
# into whatever is mapped below. Debian's g++ does not enable this by default.
target_compile_options(agate_options INTERFACE -fstack-clash-protection)
if(AGATE_WERROR)
  target_compile_options(agate_options INTERFACE -Werror)
endif()

# g++ deallocates with the size by default; clang 14 needs asking (runtime/frame_arena.cpp calls
# the sized operator delete).
if(CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
  target_compile_options(agate_options INTERFACE -fsized-deallocation)
endif()

if(AGATE_SANITIZE STREQUAL "address")
  # Fibers tell ASan about every stack switch (runtime/fiber.cpp); AGATE_ASAN enables that.
  target_compile_options(agate_options INTERFACE
    -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer)
  if(CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
    # clang 14's UBSan `function` check (which g++ does not have) cannot assemble the split
    # functions of a coroutine: "Cannot represent a difference across sections".
    target_compile_options(agate_options INTERFACE -fno-sanitize=function)
  endif()
  target_compile_definitions(agate_options INTERFACE AGATE_ASAN=1)
  target_link_options(agate_options INTERFACE -fsanitize=address,undefined)
elseif(AGATE_SANITIZE STREQUAL "thread")
  # Fibers tell TSan about every stack switch (runtime/fiber.cpp); AGATE_TSAN enables that.
  target_compile_options(agate_options INTERFACE -fsanitize=thread -fno-omit-frame-pointer)
  target_compile_definitions(agate_options INTERFACE AGATE_TSAN=1)
  target_link_options(agate_options INTERFACE -fsanitize=thread)
elseif(NOT AGATE_SANITIZE STREQUAL "")
  message(FATAL_ERROR "AGATE_SANITIZE must be '', 'address' or 'thread', not '${AGATE_SANITIZE}'")
endif()

# libFuzzer targets (tests/fuzz/): clang only. Everything is compiled with coverage
# instrumentation so the fuzzer sees inside the runtime; pair it with AGATE_SANITIZE=address.
option(AGATE_FUZZ "Build libFuzzer targets (clang only)" OFF)
if(AGATE_FUZZ)
  if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
    message(FATAL_ERROR "AGATE_FUZZ needs clang (e.g. -DCMAKE_CXX_COMPILER=clang++-14), "
                        "not ${CMAKE_CXX_COMPILER_ID}")
  endif()
  target_compile_options(agate_options INTERFACE -fsanitize=fuzzer-no-link)
  target_link_options(agate_options INTERFACE -fsanitize=fuzzer-no-link)
endif()
