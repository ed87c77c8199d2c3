// Decoding one entry of the kernel's process listing (listProcesses pages), kept apart from the
// connection so that the checks on what the kernel sent are tested without a kernel
// (tests/caps/process_info_test.cpp). Needs the wire schema (agate::schemas).
#pragma once

#include "agate/caps/kernel_connection.h"
#include "kernel.capnp.h"

namespace agate::caps {

// For display: a services list longer than the schema's maxServicesListed is cut to it, and
// the count is never below what is listed.
ProcessInfo decodeProcessInfo(wire::ProcessInfo::Reader p);

}  // namespace agate::caps
