#include "agate/client/session.h"

#include <algorithm>
#include <utility>

namespace agate::client {

using caps::EventType;
using caps::KernelEvent;

Session::Session(caps::KernelConnection& kernel, SessionOptions options)
    : kernel_(kernel), options_(options), bank_(kernel.bank()) {
  pump_.emplace(pumpEvents());
}

Session::~Session() {
  pump_.reset();  // stop taking events before the links go
  entries_.clear();
}

Session::Entry* Session::find(caps::Koid koid) noexcept {
  for (auto& e : entries_)
    if (e->koid == koid) return e.get();
  return nullptr;
}

size_t Session::openCount() const noexcept {
  return static_cast<size_t>(
      std::count_if(entries_.begin(), entries_.end(), [](const auto& e) { return !e->closed; }));
}

void Session::closeLocally(Entry& entry, const Error& reason) noexcept {
  entry.closed = true;
  if (entry.link && entry.link->connection().isOpen()) entry.link->connection().close(reason);
}

Promise<OpenedBushel> Session::openBushel(std::string name, caps::Cap<caps::SpaceBank> bank) {
  if (kernelGone_.code != Errc::OK) co_return kernelGone_;
  if (!bank.valid()) bank = bank_;
  Result<caps::Cap<caps::Bushel>> cap = co_await kernel_.openBushel(kernel_.registry(), name, bank);
  if (!cap) co_return cap.error();
  // Both go out with one doorbell at the end of this turn.
  Promise<caps::CapInfo> info = kernel_.inspectCap(*cap);
  Promise<caps::BushelRings> rings = kernel_.bushelRings(*cap);
  Result<caps::CapInfo> i = co_await info;
  Result<caps::BushelRings> r = co_await rings;
  Error failed = !i ? i.error() : !r ? r.error() : Error{};
  if (failed.code == Errc::OK) {
    auto link = BushelLink::tryOpen(kernel_.loop(), BushelLink::Side::CLIENT, std::move(r->request),
                                    std::move(r->reply), options_.rpc);
    if (link) {
      auto entry = std::make_unique<Entry>();
      entry->cap = *cap;
      entry->koid = i->koid;
      entry->link = std::move(*link);
      Entry& e = *entries_.emplace_back(std::move(entry));
      if (auto early = std::find(closedEarly_.begin(), closedEarly_.end(), e.koid);
          early != closedEarly_.end()) {
        closedEarly_.erase(early);
        closeLocally(e, Error(Errc::DISCONNECTED, "the bushel closed while it was being opened"));
      } else if (kernelGone_.code != Errc::OK) {
        closeLocally(e, kernelGone_);
      }
      co_return OpenedBushel{e.cap, e.koid, &e.link->connection()};
    }
    failed = link.error();
  }
  // Nothing of ours uses the bushel: give it back (its pages return to `bank`).
  (void)co_await kernel_.deleteCap(*cap);
  co_return failed;
}

Promise<void> Session::waitForService(std::string name, Duration timeout, Duration interval) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    Result<caps::Koid> found = co_await kernel_.lookupService(kernel_.registry(), name);
    if (found) co_return {};
    if (found.code() != Errc::NOT_FOUND) co_return found.error();
    if (std::chrono::steady_clock::now() >= end)
      co_return Error(Errc::TIMED_OUT, "the service did not register in time");
    Status slept = co_await kernel_.loop().sleep(interval);
    if (!slept) co_return slept.error();
  }
}

Promise<void> Session::close(caps::Koid koid) {
  Entry* e = find(koid);
  if (e == nullptr) co_return Error(Errc::NOT_FOUND, "no bushel of this session has that koid");
  if (e->closed) co_return {};
  closeLocally(*e, Error(Errc::DISCONNECTED, "the client closed the bushel"));
  const caps::Cap<caps::Bushel> cap = e->cap;
  Status deleted = co_await kernel_.deleteCap(cap);
  // INVALID_HANDLE: the kernel closed it first (its event may still be on its way).
  if (!deleted && deleted.code() != Errc::INVALID_HANDLE) co_return deleted.error();
  co_return {};
}

Promise<void> Session::pumpEvents() {
  for (;;) {
    Result<KernelEvent> event = co_await kernel_.nextEvent();
    if (!event) {
      // The kernel connection died: so did every bushel.
      kernelGone_ = Error(Errc::DISCONNECTED, "the kernel connection is gone");
      for (auto& e : entries_) closeLocally(*e, kernelGone_);
      co_return {};
    }
    if (event->type != EventType::BUSHEL_CLOSED && event->type != EventType::SERVICE_GONE)
      continue;  // BUSHEL_OPENED goes to servers; a client never gets one
    const char* why = event->type == EventType::SERVICE_GONE ? "the service went away"
                                                             : "the kernel closed the bushel";
    if (Entry* e = find(event->bushel)) {
      if (!e->closed) closeLocally(*e, Error(Errc::DISCONNECTED, why));
    } else if (std::find(closedEarly_.begin(), closedEarly_.end(), event->bushel) ==
               closedEarly_.end()) {
      closedEarly_.push_back(event->bushel);
    }
  }
}

}  // namespace agate::client
