// Registry and Service: the kernel's name service.
//
// A server registers a name (Kernel::tryRegisterService) with a cap to the Registry carrying
// WRITE; that makes a Service object, paid from a bank of the server's choosing, and gives the
// server a cap to it. Holders of a Registry cap with READ open bushels (bushel.h) to a name.
//
// Lifetimes. The Registry is the kernel's own object: one per Kernel, charged to no bank, alive
// as long as the Kernel. A Service lives until it is destroyed (DESTROY on its cap: this is
// "unregister"), its bank is destroyed, or its server dies: the Kernel destroys a dead server's
// services whichever bank paid for them (the pages go back to that bank), so a name never
// outlives the process that answers it. Deleting the last cap to a Service does NOT unregister
// it.
// When a Service goes, its name is free again and every bushel to it is torn down (the Kernel
// does that after the call; the clients get SERVICE_GONE then BUSHEL_CLOSED).
//
// Names: 1..MAX_NAME_BYTES bytes of [A-Za-z0-9._-], starting with a letter or digit
// (INVALID_ARGUMENT otherwise); unique (ALREADY_EXISTS).
//
// Threading: single-threaded, as the whole object model.
#pragma once

#include <map>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "agate/kernel/object.h"
#include "agate/kernel/process.h"
#include "agate/runtime/result.h"

namespace agate::kernel {

class Bushel;
class Service;

class Registry final : public KernelObject {
 public:
  static constexpr ObjectType TYPE = ObjectType::REGISTRY;
  static constexpr size_t MAX_NAME_BYTES = 64;

  Registry() noexcept : KernelObject(TYPE) {}

  // OK, or INVALID_ARGUMENT saying what is wrong with `name`.
  static Status checkName(std::string_view name) noexcept;

  // NOT_FOUND if no live service has `name`.
  Result<Service*> tryFind(std::string_view name) const noexcept;
  // Registered names, sorted (snapshots, the CLI).
  std::vector<std::string> names() const;
  // The names process `server` serves, sorted, at most `limit` of them, and how many it serves
  // in all (introspection: `agate ps`). O(log n + its services).
  struct Served {
    std::vector<std::string> names;
    uint32_t count = 0;
  };
  Served servedBy(ProcessId server, size_t limit) const;

 private:
  friend class Service;
  std::map<std::string, Service*, std::less<>> services_;  // not owning: banks own services
  std::set<std::pair<ProcessId, std::string>> byServer_;   // the same services, by server
};

class Service final : public KernelObject {
 public:
  static constexpr ObjectType TYPE = ObjectType::SERVICE;

  // Registers itself under `name`, which the caller checked (valid and free).
  Service(Registry& registry, std::string name, ProcessId server);
  ~Service() override;

  const std::string& name() const noexcept { return name_; }
  ProcessId server() const noexcept { return server_; }
  // Bushels open to this service, oldest first (not owning: the clients' banks own them).
  const std::vector<Bushel*>& bushels() const noexcept { return bushels_; }

 private:
  friend class Bushel;
  void teardown() noexcept override;  // unregisters the name

  Registry* registry_;  // null once unregistered
  std::string name_;
  ProcessId server_;
  std::vector<Bushel*> bushels_;
};

}  // namespace agate::kernel
