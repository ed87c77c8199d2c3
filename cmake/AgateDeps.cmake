# Third-party dependencies, all from Debian packages (scripts/setup installs them).
# Global, so that a project building Agate with add_subdirectory links CapnProto::capnp-rpc (the
# generated code of its interfaces needs it) without finding Cap'n Proto again.
set(CMAKE_FIND_PACKAGE_TARGETS_GLOBAL ON)
find_package(Threads REQUIRED)
find_package(CapnProto CONFIG REQUIRED)
find_package(Boost 1.74 REQUIRED COMPONENTS context)
find_package(PkgConfig REQUIRED)
pkg_check_modules(LIBURING REQUIRED IMPORTED_TARGET liburing>=2.3)
if(AGATE_BUILD_TESTS)
  find_package(GTest CONFIG REQUIRED)
  find_package(benchmark CONFIG REQUIRED)
endif()
find_package(fmt CONFIG REQUIRED)
find_package(CLI11 CONFIG REQUIRED)
find_package(nlohmann_json 3 CONFIG REQUIRED)  # agate --json, and the tests that read it
