# agate_generate_rpc(SRCS HDRS file.capnp ...): Cap'n Proto C++ code plus Agate typed RPC stubs.
#
# Like capnp_generate_cpp(), and honouring the same CAPNPC_SRC_PREFIX, CAPNPC_OUTPUT_DIR,
# CAPNPC_IMPORT_DIRS and CAPNPC_FLAGS variables, but one `capnp compile` runs both capnpc-c++ and
# capnpc-agate, so for each file.capnp it yields file.capnp.c++ (in SRCS) and file.capnp.h plus
# file.agate.h (in HDRS), all in the output directory. The command depends on the capnpc-agate
# target (editing the plugin regenerates every stub) and on the files the schema imports.
#
# Targets compiling the stubs link agate::rpc, and CapnProto::capnp-rpc when the schema declares
# interfaces (capnpc-c++'s code for interfaces references it).
# Where Agate found Cap'n Proto (cmake/AgateDeps.cmake), kept here: a project that builds Agate
# with add_subdirectory calls agate_generate_rpc from its own scope, which lacks those variables.
set(AGATE_CAPNP_EXECUTABLE "${CAPNP_EXECUTABLE}" CACHE INTERNAL "capnp, for agate_generate_rpc")
set(AGATE_CAPNPC_CXX_EXECUTABLE "${CAPNPC_CXX_EXECUTABLE}" CACHE INTERNAL "capnpc-c++")
set(AGATE_CAPNP_INCLUDE_DIRECTORY "${CAPNP_INCLUDE_DIRECTORY}" CACHE INTERNAL "capnp's schemas")

function(agate_generate_rpc SOURCES HEADERS)
  if(NOT ARGN)
    message(SEND_ERROR "agate_generate_rpc() called without any schema file.")
  endif()
  set(capnp_tool "${AGATE_CAPNP_EXECUTABLE}")
  set(capnpc_cxx "${AGATE_CAPNPC_CXX_EXECUTABLE}")
  set(capnp_include "${AGATE_CAPNP_INCLUDE_DIRECTORY}")

  if(DEFINED CAPNPC_SRC_PREFIX)
    get_filename_component(src_prefix "${CAPNPC_SRC_PREFIX}" ABSOLUTE)
  else()
    set(src_prefix "${CMAKE_CURRENT_SOURCE_DIR}")
  endif()
  if(DEFINED CAPNPC_OUTPUT_DIR)
    set(output_dir "${CAPNPC_OUTPUT_DIR}")
  else()
    set(output_dir "${CMAKE_CURRENT_BINARY_DIR}")
  endif()
  set(include_path -I "${src_prefix}" -I "${capnp_include}")
  foreach(directory ${CAPNPC_IMPORT_DIRS})
    get_filename_component(absolute "${directory}" ABSOLUTE)
    list(APPEND include_path -I "${absolute}")
  endforeach()

  set(srcs)
  set(hdrs)
  foreach(schema_file ${ARGN})
    get_filename_component(file_path "${schema_file}" ABSOLUTE)
    file(RELATIVE_PATH relative "${src_prefix}" "${file_path}")
    if(relative MATCHES "^\\.\\./")
      message(SEND_ERROR "agate_generate_rpc: '${file_path}' is outside the source prefix "
                         "'${src_prefix}'.")
    endif()
    string(REGEX REPLACE "\\.capnp$" "" stem "${relative}")
    set(base "${output_dir}/${relative}")
    # The files it imports or embeds, and theirs in turn, found as capnp finds them (a relative
    # name beside the file that names it; an absolute one in the import path's order): editing
    # one regenerates this file's code. Editing the schema re-runs the configure step, which
    # finds an import added since. A schema generated at build time is not scanned.
    set(imported)
    set(to_scan)
    if(EXISTS "${file_path}")
      set(to_scan "${file_path}")
    endif()
    while(to_scan)
      list(POP_FRONT to_scan scanning)
      get_filename_component(scanning_dir "${scanning}" DIRECTORY)
      file(STRINGS "${scanning}" import_lines REGEX "(import|embed)[ \t]+\"[^\"]+\"")
      foreach(line IN LISTS import_lines)
        string(REGEX MATCHALL "(import|embed)[ \t]+\"[^\"]+\"" names "${line}")
        foreach(name IN LISTS names)
          string(REGEX REPLACE "^(import|embed)[ \t]+\"([^\"]+)\"$" "\\2" name "${name}")
          if(name MATCHES "^/")
            set(search_dirs "${src_prefix}" "${capnp_include}" ${CAPNPC_IMPORT_DIRS})
          else()
            set(search_dirs "${scanning_dir}")
            set(name "/${name}")
          endif()
          foreach(directory IN LISTS search_dirs)
            get_filename_component(directory "${directory}" ABSOLUTE)
            if(EXISTS "${directory}${name}")
              set(found "${directory}${name}")
              if(NOT found IN_LIST imported AND NOT found STREQUAL file_path)
                list(APPEND imported "${found}")
                if(found MATCHES "\\.capnp$")
                  list(APPEND to_scan "${found}")
                endif()
              endif()
              break()
            endif()
          endforeach()
        endforeach()
      endforeach()
    endwhile()
    if(EXISTS "${file_path}")
      set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS "${file_path}")
    endif()
    add_custom_command(
      OUTPUT "${base}.c++" "${base}.h" "${output_dir}/${stem}.agate.h"
      COMMAND "${capnp_tool}" compile
              -o "${capnpc_cxx}:${output_dir}"
              -o "$<TARGET_FILE:capnpc-agate>:${output_dir}"
              --src-prefix "${src_prefix}" ${include_path} ${CAPNPC_FLAGS} "${file_path}"
      DEPENDS "${schema_file}" ${imported} capnpc-agate $<TARGET_FILE:capnpc-agate>
      COMMENT "Compiling Cap'n Proto schema ${schema_file} with Agate stubs"
      VERBATIM)
    list(APPEND srcs "${base}.c++")
    list(APPEND hdrs "${base}.h" "${output_dir}/${stem}.agate.h")
  endforeach()
  set_source_files_properties(${srcs} ${hdrs} PROPERTIES GENERATED TRUE)
  set(${SOURCES} ${srcs} PARENT_SCOPE)
  set(${HEADERS} ${hdrs} PARENT_SCOPE)
endfunction()
