// What `agate ps`, `agate banks` and `agate caps` print: aligned tables for people and JSON for
// tools, from the plain structs the client library returns (caps/kernel_connection.h). Pure
// functions of their input, so they are unit tested without a kernel.
//
// JSON is one object per command, keys in snake_case, numbers as JSON integers (koids and
// handles are 64-bit: readers in languages whose numbers are doubles should take them as strings
// above 2^53). The field names are an interface: tools/README.md lists them and they change
// only by addition.
//
//   ps     {"processes": [{"pid", "os_pid", "uid", "name", "bank", "caps"}]}
//   banks  {"page_bytes", "banks": [{"koid", "parent", "depth", "used_pages", "limit_pages",
//           "own_pages", "objects", "caps", "owner_pid"}]}     (tree order, parents first)
//   caps   {"pid", "caps": [{"slot", "generation", "handle", "type", "rights", "rights_mask",
//           "badge", "object", "parent_pid", "parent_handle"}]}
//
// `owner_pid` is the process whose own bank this is (null for other banks); `parent_pid` and
// `parent_handle` name the cap this one was derived from (null for a root cap); `rights` is the
// list of right names (rightNames order), `rights_mask` the kernel's bits.
#pragma once

#include <span>
#include <string>

#include "agate/caps/kernel_connection.h"

namespace agate::tools {

// One letter per right, in bit order, '-' where absent: "rwgacld" is every right (read, write,
// grant, allocate, create-child, set-limit, destroy). Undefined bits show as '?' at the end.
std::string rightsLetters(caps::Rights rights);

// The names of the rights in `rights`, in bit order ("read", "write", "grant", "allocate",
// "create_child", "set_limit", "destroy").
std::vector<std::string> rightNames(caps::Rights rights);

std::string processesTable(std::span<const caps::ProcessInfo> processes);
std::string processesJson(std::span<const caps::ProcessInfo> processes);

// The bank tree: each bank under its parent (children in koid order), indented two spaces per
// level; a bank whose parent is not in the list is a root. `processes` name the owners of
// process banks.
std::string banksTable(std::span<const caps::BankInfo> banks,
                       std::span<const caps::ProcessInfo> processes);
std::string banksJson(std::span<const caps::BankInfo> banks,
                      std::span<const caps::ProcessInfo> processes);

std::string capsTable(caps::ProcessId pid, std::span<const caps::CapEntry> entries);
std::string capsJson(caps::ProcessId pid, std::span<const caps::CapEntry> entries);

}  // namespace agate::tools
