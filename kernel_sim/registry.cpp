#include "agate/kernel/registry.h"

#include <algorithm>

#include "agate/kernel/bushel.h"

namespace agate::kernel {

Status Registry::checkName(std::string_view name) noexcept {
  if (name.empty() || name.size() > MAX_NAME_BYTES)
    return Error(Errc::INVALID_ARGUMENT, "service name must be 1..64 bytes");
  auto alnum = [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
  };
  if (!alnum(name.front()))
    return Error(Errc::INVALID_ARGUMENT, "service name must start with a letter or digit");
  for (char c : name)
    if (!alnum(c) && c != '.' && c != '_' && c != '-')
      return Error(Errc::INVALID_ARGUMENT, "service name may hold only [A-Za-z0-9._-]");
  return {};
}

Result<Service*> Registry::tryFind(std::string_view name) const noexcept {
  auto it = services_.find(name);
  if (it == services_.end()) return Error(Errc::NOT_FOUND, "no service by that name");
  return it->second;
}

std::vector<std::string> Registry::names() const {
  std::vector<std::string> out;
  for (const auto& [name, service] : services_) out.push_back(name);
  return out;
}

Registry::Served Registry::servedBy(ProcessId server, size_t limit) const {
  Served out;
  for (auto it = byServer_.lower_bound({server, std::string()});
       it != byServer_.end() && it->first == server; ++it) {
    if (out.names.size() < limit) out.names.push_back(it->second);
    ++out.count;
  }
  return out;
}

Service::Service(Registry& registry, std::string name, ProcessId server)
    : KernelObject(TYPE), registry_(&registry), name_(std::move(name)), server_(server) {
  auto [it, inserted] = registry.services_.emplace(name_, this);
  AGATE_ASSERT(inserted, "service name '%s' registered twice", name_.c_str());
  registry.byServer_.emplace(server_, name_);
}

Service::~Service() { AGATE_ASSERT(bushels_.empty(), "service destroyed with bushels linked"); }

void Service::teardown() noexcept {
  // The Kernel has detached every bushel (and queued them for teardown) before this runs.
  AGATE_ASSERT(bushels_.empty(), "service '%s' torn down with %zu bushels", name_.c_str(),
               bushels_.size());
  if (registry_) {
    registry_->services_.erase(name_);
    registry_->byServer_.erase({server_, name_});
  }
  registry_ = nullptr;
}

}  // namespace agate::kernel
