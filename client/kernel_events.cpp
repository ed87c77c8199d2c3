#include "agate/client/kernel_events.h"

#include <algorithm>
#include <utility>

namespace agate::client {

using caps::EventType;
using caps::KernelEvent;
using caps::Koid;

KernelEvents::KernelEvents(caps::KernelConnection& kernel) : kernel_(kernel) {
  pump_.emplace(pump());
}

KernelEvents::~KernelEvents() {
  pump_.reset();
  AGATE_ASSERT(listeners_.empty(), "%zu listeners outlive their KernelEvents", listeners_.size());
  sweepKept();
  for (Kept& k : kept_) {
    // Referred to from something that outlives even the router: left to the process.
    new std::shared_ptr<void>(std::move(k.held));  // NOLINT: deliberately never freed
  }
}

void KernelEvents::keepUntil(std::shared_ptr<void> held, std::function<bool()> released) {
  kept_.push_back(Kept{std::move(held), std::move(released)});
}

void KernelEvents::sweepKept() noexcept {
  std::erase_if(kept_, [](const Kept& k) { return k.released(); });
}

void KernelEvents::attach(KernelEventListener& listener) {
  if (std::find(listeners_.begin(), listeners_.end(), &listener) == listeners_.end())
    listeners_.push_back(&listener);
  if (gone_.code != Errc::OK) listener.kernelGone(gone_);
}

void KernelEvents::detach(KernelEventListener& listener) noexcept {
  std::erase(listeners_, &listener);
  std::erase_if(services_, [&](const auto& kv) { return kv.second == &listener; });
  std::erase_if(bushels_, [&](const auto& kv) { return kv.second == &listener; });
  if (introductions_ == &listener) introductions_ = nullptr;
}

Status KernelEvents::listenService(Koid service, KernelEventListener& listener) {
  AGATE_REQUIRE(std::find(listeners_.begin(), listeners_.end(), &listener) != listeners_.end(),
                "listenService by a listener that is not attached");
  auto [it, added] = services_.try_emplace(service, &listener);
  if (!added && it->second != &listener)
    return Error(Errc::ALREADY_EXISTS, "another listener serves that service");
  if (auto held = heldOpens_.find(service); held != heldOpens_.end()) {
    std::vector<KernelEvent> opens = std::move(held->second);
    heldOpens_.erase(held);
    for (KernelEvent& e : opens) {
      // The listener may have stopped listening from inside an earlier delivery.
      auto still = services_.find(service);
      if (still == services_.end()) {
        heldOpens_[service].push_back(std::move(e));
        continue;
      }
      still->second->kernelEvent(e);
    }
  }
  return {};
}

void KernelEvents::unlistenService(Koid service) noexcept { services_.erase(service); }

Status KernelEvents::claimBushel(Koid bushel, KernelEventListener& listener) {
  AGATE_REQUIRE(std::find(listeners_.begin(), listeners_.end(), &listener) != listeners_.end(),
                "claimBushel by a listener that is not attached");
  if (gone_.code != Errc::OK) return gone_;
  if (auto early = std::find(earlyCloses_.begin(), earlyCloses_.end(), bushel);
      early != earlyCloses_.end()) {
    earlyCloses_.erase(early);
    return Error(Errc::DISCONNECTED, "the bushel closed while it was being opened");
  }
  auto [it, added] = bushels_.try_emplace(bushel, &listener);
  if (!added && it->second != &listener)
    return Error(Errc::ALREADY_EXISTS, "another listener claimed that bushel");
  return {};
}

void KernelEvents::releaseBushel(Koid bushel) noexcept { bushels_.erase(bushel); }

Status KernelEvents::listenIntroductions(KernelEventListener* listener) {
  if (listener != nullptr && introductions_ != nullptr && introductions_ != listener)
    return Error(Errc::INVALID_ARGUMENT, "another listener takes the introductions");
  introductions_ = listener;
  return {};
}

void KernelEvents::remember(Koid bushel) noexcept {
  if (std::find(earlyCloses_.begin(), earlyCloses_.end(), bushel) != earlyCloses_.end()) return;
  if (earlyCloses_.size() == MAX_EARLY_CLOSES) earlyCloses_.pop_front();
  earlyCloses_.push_back(bushel);
}

void KernelEvents::route(KernelEvent& event) noexcept {
  if (!kept_.empty()) sweepKept();
  switch (event.type) {
    case EventType::BUSHEL_OPENED:
      if (auto s = services_.find(event.service); s != services_.end()) {
        s->second->kernelEvent(event);
      } else {
        heldOpens_[event.service].push_back(std::move(event));
      }
      return;
    case EventType::BUSHEL_CLOSED: {
      bool taken = false;
      // The client side first (the same process may be both ends of one bushel).
      if (auto b = bushels_.find(event.bushel); b != bushels_.end()) {
        KernelEventListener* owner = b->second;
        bushels_.erase(b);  // a closed bushel's koid never comes back
        owner->kernelEvent(event);
        taken = true;
      }
      if (auto s = services_.find(event.service); s != services_.end()) {
        s->second->kernelEvent(event);
        taken = true;
      } else if (auto held = heldOpens_.find(event.service); held != heldOpens_.end()) {
        // A client came and went before the service was listened to: forget its rings.
        const size_t before = held->second.size();
        std::erase_if(held->second, [&](const KernelEvent& e) { return e.bushel == event.bushel; });
        taken = taken || held->second.size() != before;
        if (held->second.empty()) heldOpens_.erase(held);
      }
      if (!taken) remember(event.bushel);
      return;
    }
    case EventType::SERVICE_GONE:
      if (auto b = bushels_.find(event.bushel); b != bushels_.end()) {
        b->second->kernelEvent(event);
      } else {
        remember(event.bushel);
      }
      return;
    case EventType::INTRODUCED:
      if (introductions_ != nullptr) {
        introductions_->kernelEvent(event);
      } else {
        ++unrouted_;
      }
      return;
  }
  ++unrouted_;
}

Promise<void> KernelEvents::pump() {
  for (;;) {
    Result<KernelEvent> event = co_await kernel_.nextEvent();
    if (!event) {
      gone_ = event.code() == Errc::PROTOCOL_ERROR
                  ? event.error()
                  : Error(Errc::DISCONNECTED, "the kernel connection is gone");
      heldOpens_.clear();
      // Copy: a listener may detach another (or itself) while told.
      const std::vector<KernelEventListener*> told = listeners_;
      for (KernelEventListener* l : told)
        if (std::find(listeners_.begin(), listeners_.end(), l) != listeners_.end())
          l->kernelGone(gone_);
      co_return {};
    }
    route(*event);
  }
}

}  // namespace agate::client
