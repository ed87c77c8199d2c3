# Third-party dependencies, all from Debian packages (scripts/setup installs them).
find_package(Threads REQUIRED)
# Global, so that a project building Agate with add_subdirectory links CapnProto::capnp-rpc (the
# generated code of its interfaces needs it) without finding Cap'n Proto again.
find_package(CapnProto CONFIG REQUIRED GLOBAL)
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
