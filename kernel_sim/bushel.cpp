#include "agate/kernel/bushel.h"

#include <algorithm>

#include "agate/kernel/registry.h"
#include "agate/kernel/space_bank.h"

namespace agate::kernel {

Bushel::Bushel(Service& service, ProcessId client, std::unique_ptr<Channel> request,
               std::unique_ptr<Channel> reply)
    : KernelObject(TYPE),
      service_(&service),
      serviceKoid_(service.koid()),
      client_(client),
      server_(service.server()),
      request_(std::move(request)),
      reply_(std::move(reply)) {
  service.bushels_.push_back(this);
}

Bushel::~Bushel() { AGATE_ASSERT(service_ == nullptr, "bushel destroyed while linked"); }

uint64_t Bushel::pagesFor(const Channel& request, const Channel& reply) noexcept {
  auto pages = [](size_t bytes) { return (bytes + PAGE_BYTES - 1) / PAGE_BYTES; };
  return pages(request.memory().size()) + pages(reply.memory().size());
}

void Bushel::detachService() noexcept {
  if (!service_) return;
  auto& list = service_->bushels_;
  list.erase(std::find(list.begin(), list.end(), this));
  service_ = nullptr;
}

void Bushel::teardown() noexcept {
  detachService();
  request_.reset();
  reply_.reset();
}

}  // namespace agate::kernel
