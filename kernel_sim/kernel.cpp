#include "agate/kernel/kernel.h"

#include <algorithm>
#include <unordered_map>

namespace agate::kernel {
namespace {

// What a new process bank pays before the process can do anything: its CSpace's record page
// (the first record of the bank) and the CSpace's first slot chunk.
constexpr uint64_t PROCESS_OVERHEAD_PAGES = 2;

}  // namespace

Kernel::Kernel(Options options)
    : options_(options),
      systemBank_(SpaceBank::createSystemBank(options.systemPages)),
      registry_(std::make_unique<Registry>()) {
  banks_.emplace(systemBank_->koid(), systemBank_.get());
}

Kernel::~Kernel() {
  while (!processes_.empty()) {
    Status s = tryKillProcess(processes_.begin()->first);
    AGATE_ASSERT(s.ok(), "killing an attached process failed: %s", errcName(s.code()));
  }
  AGATE_ASSERT(systemBank_->objectCount() == 0, "system bank still owns %zu objects",
               systemBank_->objectCount());
}

Result<CSpace*> Kernel::findCSpace(ProcessId pid) const noexcept {
  auto it = processes_.find(pid);
  if (it == processes_.end()) return Error(Errc::NOT_FOUND, "no such process");
  return &it->second->cspace();
}

const Process* Kernel::findProcess(ProcessId pid) const noexcept {
  auto it = processes_.find(pid);
  return it == processes_.end() ? nullptr : it->second.get();
}

Result<Attached> Kernel::tryAttachProcess(uint64_t bankLimit) {
  // Decode: every charge the attach makes is known up front, so check it all first.
  if (nextPid_ == UINT32_MAX) return Error(Errc::QUOTA_EXCEEDED, "process ids exhausted");
  auto bankCharge = systemBank_->tryReserveObject(0);
  if (!bankCharge) return bankCharge.error();
  if (bankLimit < PROCESS_OVERHEAD_PAGES)
    return Error(Errc::QUOTA_EXCEEDED, "process bank limit below the CSpace's cost");
  if (systemBank_->available() < PROCESS_OVERHEAD_PAGES)
    return Error(Errc::QUOTA_EXCEEDED, "system bank cannot pay for the process's CSpace");

  // Invoke: nothing below can fail.
  SpaceBank& bank = systemBank_->adopt<SpaceBank>(std::move(*bankCharge), bankLimit);
  trackBank(bank);
  auto cspaceCharge = bank.tryReserveObject(0);
  AGATE_ASSERT(cspaceCharge.ok() && cspaceCharge->pages() == 1, "process bank record charge");
  CSpace& cspace = bank.adopt<CSpace>(std::move(*cspaceCharge), options_.maxGeneration);
  cspace.setLifecycleObserver(this);  // asks for trim() when its top chunks empty
  auto slotCharge = cspace.tryReserveSlot();
  AGATE_ASSERT(slotCharge.ok() && slotCharge->pages() == 1, "process CSpace first chunk");
  Handle bankHandle = cspace.insert(bank, PROCESS_BANK, 0, nullptr, std::move(*slotCharge));
  cspace.setReceiveLimit(options_.receiveLimit);

  const ProcessId pid = nextPid_++;
  processes_.emplace(pid, std::make_unique<Process>(pid, bank, cspace));
  pidOf_.emplace(&cspace, pid);
  return Attached{pid, bankHandle};
}

Status Kernel::tryKillProcess(ProcessId pid) {
  auto it = processes_.find(pid);
  if (it == processes_.end()) return Error(Errc::NOT_FOUND, "no such process");
  std::unique_ptr<Process> process = std::move(it->second);
  processes_.erase(it);
  // Its services go first, whichever bank paid for them: a service outliving its server would
  // keep its name taken and its clients waiting on a peer that will never answer. Each
  // destruction erases its entry (objectDestroyed).
  for (auto s = servedBy_.find(pid); s != servedBy_.end(); s = servedBy_.find(pid)) {
    Service& service = *s->second;
    service.owner()->destroyObject(service);
  }
  process->cspace().markProcessDead();
  pidOf_.erase(&process->cspace());
  systemBank_->destroyObject(process->bank());
  reap();
  events_.erase(pid);  // closes the descriptors nobody will deliver
  return {};
}

Result<Handle> Kernel::tryCopyCap(ProcessId pid, Handle cap, Rights rights, uint64_t badge) {
  auto cspace = findCSpace(pid);
  if (!cspace) return cspace.error();
  auto slot = (*cspace)->findSlot(cap, Rights::NONE);
  if (!slot) return slot.error();
  Slot& source = **slot;
  if (!isValidRights(rights)) return Error(Errc::INVALID_ARGUMENT, "undefined rights bits");
  if (!hasRights(source.rights, rights))
    return Error(Errc::PERMISSION_DENIED, "a copy cannot add rights");
  if (badge != 0 && source.badge != 0 && badge != source.badge)
    return Error(Errc::PERMISSION_DENIED, "the cap is already badged");
  auto charge = (*cspace)->tryReserveSlot();
  if (!charge) return charge.error();

  return (*cspace)->insert(*source.object, rights, badge != 0 ? badge : source.badge, &source,
                           std::move(*charge));
}

Status Kernel::tryDeleteCap(ProcessId pid, Handle cap) {
  auto cspace = findCSpace(pid);
  if (!cspace) return cspace.error();
  auto slot = (*cspace)->findSlot(cap, Rights::NONE);
  if (!slot) return slot.error();

  CSpace::erase(**slot);
  reap();
  return {};
}

Result<uint64_t> Kernel::tryRevokeCap(ProcessId pid, Handle cap) {
  auto cspace = findCSpace(pid);
  if (!cspace) return cspace.error();
  auto slot = (*cspace)->findSlot(cap, Rights::NONE);
  if (!slot) return slot.error();

  const uint64_t n = CSpace::revokeDescendants(**slot);
  reap();
  return n;
}

Result<Handle> Kernel::tryTransferCap(ProcessId pid, Handle cap, ProcessId to, TransferMode mode) {
  auto cspace = findCSpace(pid);
  if (!cspace) return cspace.error();
  auto slot = (*cspace)->findSlot(cap, Rights::GRANT);
  if (!slot) return slot.error();
  if (mode != TransferMode::MOVE && mode != TransferMode::COPY)
    return Error(Errc::INVALID_ARGUMENT, "unknown transfer mode");
  auto target = findCSpace(to);
  if (!target) return target.error();
  const bool pushed = to != pid;
  auto charge = (*target)->tryReserveSlot(pushed);
  if (!charge) return charge.error();

  Slot& source = **slot;
  if (mode == TransferMode::MOVE) {
    const Handle moved = (*target)->moveIn(source, std::move(*charge), pushed);
    reap();  // the source's table may give chunks back
    return moved;
  }
  return (*target)->insert(*source.object, source.rights, source.badge, &source, std::move(*charge),
                           pushed);
}

Result<CapInfo> Kernel::tryInspectCap(ProcessId pid, Handle cap) const {
  auto cspace = findCSpace(pid);
  if (!cspace) return cspace.error();
  auto c = (*cspace)->lookup(cap, Rights::NONE);
  if (!c) return c.error();
  return CapInfo{c->object->koid(), c->object->type(), c->rights, c->badge};
}

Result<Handle> Kernel::tryCreateBank(ProcessId pid, Handle bank, uint64_t limit) {
  auto cspace = findCSpace(pid);
  if (!cspace) return cspace.error();
  auto c = (*cspace)->lookup(bank, Rights::CREATE_CHILD, ObjectType::BANK);
  if (!c) return c.error();
  SpaceBank& parent = c->as<SpaceBank>();
  // Object first, then the slot: the second reservation sees the first's pages gone, so the
  // pair is all-or-nothing even where both draw on the same banks.
  auto objectCharge = parent.tryReserveObject(0);
  if (!objectCharge) return objectCharge.error();
  auto slotCharge = (*cspace)->tryReserveSlot();
  if (!slotCharge) return slotCharge.error();  // objectCharge refunds itself

  SpaceBank& child = parent.adopt<SpaceBank>(std::move(*objectCharge), limit);
  trackBank(child);
  return (*cspace)->insert(child, CREATOR, 0, nullptr, std::move(*slotCharge));
}

Result<Handle> Kernel::tryCreateRegion(ProcessId pid, Handle bank, uint64_t pages) {
  auto cspace = findCSpace(pid);
  if (!cspace) return cspace.error();
  auto c = (*cspace)->lookup(bank, Rights::ALLOCATE, ObjectType::BANK);
  if (!c) return c.error();
  if (pages == 0 || pages > Region::MAX_PAGES)
    return Error(Errc::INVALID_ARGUMENT, "region size out of range");
  SpaceBank& from = c->as<SpaceBank>();
  auto objectCharge = from.tryReserveObject(pages);
  if (!objectCharge) return objectCharge.error();
  // After the quota check (a refused call makes no memfd), before anything changes.
  auto memfd = Region::tryCreateMemfd(pages);
  if (!memfd) return memfd.error();
  auto slotCharge = (*cspace)->tryReserveSlot();
  if (!slotCharge) return slotCharge.error();  // objectCharge refunds itself

  Region& region = from.adopt<Region>(std::move(*objectCharge), pages, std::move(*memfd));
  return (*cspace)->insert(region, CREATOR, 0, nullptr, std::move(*slotCharge));
}

Status Kernel::trySetBankLimit(ProcessId pid, Handle bank, uint64_t limit) {
  auto b = tryFindBank(pid, bank, Rights::SET_LIMIT);
  if (!b) return b.error();
  return (*b)->trySetLimit(limit);
}

Result<BankCredit> Kernel::tryReadBank(ProcessId pid, Handle bank) const {
  auto b = tryFindBank(pid, bank, Rights::READ);
  if (!b) return b.error();
  return (*b)->credit();
}

Status Kernel::tryDestroyObject(ProcessId pid, Handle cap) {
  auto cspace = findCSpace(pid);
  if (!cspace) return cspace.error();
  auto c = (*cspace)->lookup(cap, Rights::DESTROY);
  if (!c) return c.error();
  KernelObject& object = *c->object;
  // Unreachable through caps handed out today (no cap names a CSpace; process bank caps lack
  // DESTROY), and kept so a future cap kind cannot tear a live process's table from under it.
  if (object.type() == ObjectType::CSPACE || object.owner() == systemBank_.get())
    return Error(Errc::PERMISSION_DENIED, "only the process's death destroys this");
  if (object.owner() == nullptr)
    return Error(Errc::PERMISSION_DENIED, "the registry lives as long as the kernel");

  object.owner()->destroyObject(object);
  reap();
  return {};
}

Result<RegionMapping> Kernel::tryMapRegion(ProcessId pid, Handle region, bool writable) {
  auto cspace = findCSpace(pid);
  if (!cspace) return cspace.error();
  const Rights need = writable ? Rights::READ | Rights::WRITE : Rights::READ;
  auto c = (*cspace)->lookup(region, need, ObjectType::REGION);
  if (!c) return c.error();

  return c->as<Region>().tryMap(writable);
}

Result<Handle> Kernel::tryRegisterService(ProcessId pid, Handle registry, std::string_view name,
                                          Handle bank) {
  auto cspace = findCSpace(pid);
  if (!cspace) return cspace.error();
  auto r = (*cspace)->lookup(registry, Rights::WRITE, ObjectType::REGISTRY);
  if (!r) return r.error();
  auto b = (*cspace)->lookup(bank, Rights::ALLOCATE, ObjectType::BANK);
  if (!b) return b.error();
  if (Status s = Registry::checkName(name); !s.ok()) return s.error();
  if (registry_->tryFind(name).ok()) return Error(Errc::ALREADY_EXISTS, "name is registered");
  SpaceBank& from = b->as<SpaceBank>();
  auto objectCharge = from.tryReserveObject(0);
  if (!objectCharge) return objectCharge.error();
  auto slotCharge = (*cspace)->tryReserveSlot();
  if (!slotCharge) return slotCharge.error();  // objectCharge refunds itself

  Service& service =
      from.adopt<Service>(std::move(*objectCharge), *registry_, std::string(name), pid);
  service.setLifecycleObserver(this);
  servedBy_.emplace(pid, &service);
  return (*cspace)->insert(service, CREATOR, 0, nullptr, std::move(*slotCharge));
}

Result<Koid> Kernel::tryLookupService(ProcessId pid, Handle registry, std::string_view name) const {
  auto cspace = findCSpace(pid);
  if (!cspace) return cspace.error();
  auto r = (*cspace)->lookup(registry, Rights::READ, ObjectType::REGISTRY);
  if (!r) return r.error();
  if (Status s = Registry::checkName(name); !s.ok()) return s.error();
  auto service = registry_->tryFind(name);
  if (!service) return service.error();
  return (*service)->koid();
}

Result<Handle> Kernel::tryOpenBushel(ProcessId pid, Handle registry, std::string_view name,
                                     Handle bank) {
  auto cspace = findCSpace(pid);
  if (!cspace) return cspace.error();
  auto r = (*cspace)->lookup(registry, Rights::READ, ObjectType::REGISTRY);
  if (!r) return r.error();
  auto b = (*cspace)->lookup(bank, Rights::ALLOCATE, ObjectType::BANK);
  if (!b) return b.error();
  if (Status s = Registry::checkName(name); !s.ok()) return s.error();
  auto service = registry_->tryFind(name);
  if (!service) return service.error();
  return openBushelTo(pid, **cspace, **service, b->as<SpaceBank>());
}

Result<Handle> Kernel::tryOpenBushelVia(ProcessId pid, Handle service, Handle bank) {
  auto cspace = findCSpace(pid);
  if (!cspace) return cspace.error();
  auto s = (*cspace)->lookup(service, Rights::READ, ObjectType::SERVICE);
  if (!s) return s.error();
  auto b = (*cspace)->lookup(bank, Rights::ALLOCATE, ObjectType::BANK);
  if (!b) return b.error();
  return openBushelTo(pid, **cspace, s->as<Service>(), b->as<SpaceBank>());
}

Result<Handle> Kernel::openBushelTo(ProcessId pid, CSpace& cspace, Service& service,
                                    SpaceBank& from) {
  // The rings and the server's descriptors are made before anything is charged; if any of it
  // fails, they close and nothing changed.
  ChannelOptions ring{ChannelScope::SHARED, options_.bushelRingBytes, 1, false};
  auto request = Channel::create(ring);
  if (!request) return request.error();
  auto reply = Channel::create(ring);
  if (!reply) return reply.error();
  auto requestFd = (*request)->exportFd();
  if (!requestFd) return requestFd.error();
  auto replyFd = (*reply)->exportFd();
  if (!replyFd) return replyFd.error();
  auto objectCharge = from.tryReserveObject(Bushel::pagesFor(**request, **reply));
  if (!objectCharge) return objectCharge.error();
  auto slotCharge = cspace.tryReserveSlot();
  if (!slotCharge) return slotCharge.error();  // objectCharge refunds itself

  Bushel& bushel = from.adopt<Bushel>(std::move(*objectCharge), service, pid, std::move(*request),
                                      std::move(*reply));
  bushel.setLifecycleObserver(this);
  KernelEvent opened{
      KernelEventType::BUSHEL_OPENED, bushel.koid(), bushel.serviceKoid(), pid, 0, {}};
  opened.fds.push_back(std::move(*requestFd));
  opened.fds.push_back(std::move(*replyFd));
  queueEvent(bushel.server(), std::move(opened));
  return cspace.insert(bushel, CREATOR, 0, nullptr, std::move(*slotCharge));
}

Result<std::vector<Fd>> Kernel::tryBushelFds(ProcessId pid, Handle bushel) const {
  auto cspace = findCSpace(pid);
  if (!cspace) return cspace.error();
  auto c = (*cspace)->lookup(bushel, Rights::READ, ObjectType::BUSHEL);
  if (!c) return c.error();
  const Bushel& b = c->as<Bushel>();
  auto request = b.request().exportFd();
  if (!request) return request.error();
  auto reply = b.reply().exportFd();
  if (!reply) return reply.error();
  std::vector<Fd> fds;
  fds.push_back(std::move(*request));
  fds.push_back(std::move(*reply));
  return fds;
}

Result<ProcessId> Kernel::tryBushelServer(ProcessId pid, Handle bushel) const {
  auto cspace = findCSpace(pid);
  if (!cspace) return cspace.error();
  auto c = (*cspace)->lookup(bushel, Rights::READ, ObjectType::BUSHEL);
  if (!c) return c.error();
  return c->as<Bushel>().server();
}

Result<Handle> Kernel::tryIntroduce(ProcessId pid, Handle bushel, ProcessId to) {
  auto cspace = findCSpace(pid);
  if (!cspace) return cspace.error();
  auto c = (*cspace)->lookup(bushel, Rights::GRANT, ObjectType::BUSHEL);
  if (!c) return c.error();
  Service* service = c->as<Bushel>().service();
  if (service == nullptr) return Error(Errc::DISCONNECTED, "the bushel's service has gone");
  auto target = findCSpace(to);
  if (!target) return target.error();
  if (to == service->server())
    return Error(Errc::INVALID_ARGUMENT, "introducing a service's server to its own service");
  // One introduction per (recipient, service): an existing one comes back unchanged. The
  // server's registration cap (a root in its CSpace) becomes the new cap's parent.
  const Process* server = findProcess(service->server());  // null once the server died
  Slot* registration = nullptr;
  for (Slot* s = service->firstCap(); s != nullptr; s = s->objNext) {
    if (s->cspace == *target && s->rights == Rights::READ) return s->handle();
    if (registration == nullptr && server != nullptr && s->parent == nullptr &&
        s->cspace == &server->cspace())
      registration = s;
  }
  const bool pushed = to != pid;
  auto charge = (*target)->tryReserveSlot(pushed);
  if (!charge) return charge.error();

  const Handle h =
      (*target)->insert(*service, Rights::READ, 0, registration, std::move(*charge), pushed);
  queueEvent(to, {KernelEventType::INTRODUCED, 0, service->koid(), service->server(), h.raw, {}});
  return h;
}

Result<uint64_t> Kernel::tryGrowBushelState(ProcessId pid, Handle service, Koid bushel,
                                            uint64_t pages) {
  auto cspace = findCSpace(pid);
  if (!cspace) return cspace.error();
  auto s = (*cspace)->lookup(service, Rights::WRITE, ObjectType::SERVICE);
  if (!s) return s.error();
  if (pages == 0 || pages > Bushel::MAX_STATE_GROWTH)
    return Error(Errc::INVALID_ARGUMENT, "bushel state growth out of range");
  const auto& bushels = s->as<Service>().bushels();
  auto it = std::find_if(bushels.begin(), bushels.end(),
                         [&](const Bushel* b) { return b->koid() == bushel; });
  if (it == bushels.end()) return Error(Errc::NOT_FOUND, "no such bushel of this service");
  Bushel& b = **it;
  SpaceBank& payer = *b.owner();  // the bank the client paid the bushel with
  auto charge = payer.tryReserve(pages);
  if (!charge) return charge.error();
  payer.chargeObject(b, std::move(*charge));
  b.addStatePages(pages);
  return b.statePages();
}

Status Kernel::tryCloseBushel(ProcessId pid, Handle service, Koid bushel) {
  auto cspace = findCSpace(pid);
  if (!cspace) return cspace.error();
  auto s = (*cspace)->lookup(service, Rights::WRITE, ObjectType::SERVICE);
  if (!s) return s.error();
  const auto& bushels = s->as<Service>().bushels();
  auto it = std::find_if(bushels.begin(), bushels.end(),
                         [&](const Bushel* b) { return b->koid() == bushel; });
  if (it == bushels.end())
    return Error(Errc::NOT_FOUND, "no such bushel of this service (or already closed)");
  Bushel& b = **it;
  // As a last cap going: the bank that paid destroys it (caps, rings, state pages, events).
  b.owner()->destroyObject(b);
  reap();
  return {};
}

Result<Fd> Kernel::tryMapBankCredit(ProcessId pid, Handle bank) {
  auto b = tryFindBank(pid, bank, Rights::READ);
  if (!b) return b.error();
  SpaceBank& target = **b;
  if (const KernelPage* page = target.creditMemory()) return page->tryDuplicate();
  // The page is the bank's own cost: reserved on it, then made, then duplicated; any failure
  // refunds the reservation and closes what was made.
  auto charge = target.tryReserve(1);
  if (!charge) return charge.error();
  auto page = KernelPage::tryCreate("agate-bank-credit", HolderAccess::READ_ONLY);
  if (!page) return page.error();
  auto fd = page->tryDuplicate();
  if (!fd) return fd.error();

  target.adoptCreditMemory(std::move(*page), std::move(*charge));
  return std::move(*fd);
}

Result<Handle> Kernel::tryCreateNotification(ProcessId pid, Handle bank, bool wantWakeFd) {
  auto cspace = findCSpace(pid);
  if (!cspace) return cspace.error();
  auto c = (*cspace)->lookup(bank, Rights::ALLOCATE, ObjectType::BANK);
  if (!c) return c.error();
  SpaceBank& from = c->as<SpaceBank>();
  auto objectCharge = from.tryReserveObject(Notification::pagesFor(wantWakeFd));
  if (!objectCharge) return objectCharge.error();
  // After the quota check (a refused call makes nothing), before anything changes.
  auto parts = Notification::tryCreateParts(wantWakeFd);
  if (!parts) return parts.error();
  auto slotCharge = (*cspace)->tryReserveSlot();
  if (!slotCharge) return slotCharge.error();  // objectCharge refunds itself

  Notification& n = from.adopt<Notification>(std::move(*objectCharge), std::move(*parts));
  return (*cspace)->insert(n, CREATOR, 0, nullptr, std::move(*slotCharge));
}

Result<NotificationFds> Kernel::tryNotificationFds(ProcessId pid, Handle notification) const {
  auto cspace = findCSpace(pid);
  if (!cspace) return cspace.error();
  auto c = (*cspace)->lookup(notification, Rights::READ, ObjectType::NOTIFICATION);
  if (!c) return c.error();
  return c->as<Notification>().tryDuplicateFds(hasRights(c->rights, Rights::WRITE));
}

Status Kernel::trySignal(ProcessId pid, Handle notification) {
  auto cspace = findCSpace(pid);
  if (!cspace) return cspace.error();
  auto c = (*cspace)->lookup(notification, Rights::WRITE, ObjectType::NOTIFICATION);
  if (!c) return c.error();
  c->as<Notification>().signal();
  return {};
}

Status Kernel::tryBindBankNotification(ProcessId pid, Handle bank, Handle notification) {
  auto cspace = findCSpace(pid);
  if (!cspace) return cspace.error();
  auto b = (*cspace)->lookup(bank, Rights::READ, ObjectType::BANK);
  if (!b) return b.error();
  auto n = (*cspace)->lookup(notification, Rights::WRITE, ObjectType::NOTIFICATION);
  if (!n) return n.error();
  return n->as<Notification>().tryWatchBank(b->as<SpaceBank>());
}

Status Kernel::tryUnbindBankNotification(ProcessId pid, Handle bank, Handle notification) {
  auto cspace = findCSpace(pid);
  if (!cspace) return cspace.error();
  auto b = (*cspace)->lookup(bank, Rights::READ, ObjectType::BANK);
  if (!b) return b.error();
  auto n = (*cspace)->lookup(notification, Rights::WRITE, ObjectType::NOTIFICATION);
  if (!n) return n.error();
  return n->as<Notification>().tryUnwatchBank(b->as<SpaceBank>());
}

Result<Handle> Kernel::tryCreateEventBuffer(ProcessId pid, Handle bank, uint32_t slots,
                                            Handle notification) {
  auto cspace = findCSpace(pid);
  if (!cspace) return cspace.error();
  auto c = (*cspace)->lookup(bank, Rights::ALLOCATE, ObjectType::BANK);
  if (!c) return c.error();
  auto n = (*cspace)->lookup(notification, Rights::WRITE, ObjectType::NOTIFICATION);
  if (!n) return n.error();
  if (slots == 0 || slots > EventBuffer::MAX_SLOTS)
    return Error(Errc::INVALID_ARGUMENT, "event buffer slot count out of range");
  SpaceBank& from = c->as<SpaceBank>();
  const uint64_t pages = EventBuffer::pagesFor(slots);
  auto objectCharge = from.tryReserveObject(pages);
  if (!objectCharge) return objectCharge.error();
  auto memfd = SealedMemfd::tryCreate(pages * PAGE_BYTES, "agate-event-buffer");
  if (!memfd) return memfd.error();
  auto slotCharge = (*cspace)->tryReserveSlot();
  if (!slotCharge) return slotCharge.error();  // objectCharge refunds itself

  EventBuffer& buffer = from.adopt<EventBuffer>(std::move(*objectCharge), slots, std::move(*memfd),
                                                n->as<Notification>());
  return (*cspace)->insert(buffer, CREATOR, 0, nullptr, std::move(*slotCharge));
}

Result<EventBufferMapping> Kernel::tryMapEventBuffer(ProcessId pid, Handle buffer, bool writable) {
  auto cspace = findCSpace(pid);
  if (!cspace) return cspace.error();
  const Rights need = writable ? Rights::READ | Rights::WRITE : Rights::READ;
  auto c = (*cspace)->lookup(buffer, need, ObjectType::EVENT_BUFFER);
  if (!c) return c.error();
  return c->as<EventBuffer>().tryMap(writable);
}

Result<Handle> Kernel::tryGrantRegistry(ProcessId pid, Rights rights) {
  auto cspace = findCSpace(pid);
  if (!cspace) return cspace.error();
  if (!isValidRights(rights)) return Error(Errc::INVALID_ARGUMENT, "undefined rights bits");
  auto charge = (*cspace)->tryReserveSlot();
  if (!charge) return charge.error();

  return (*cspace)->insert(*registry_, rights, 0, nullptr, std::move(*charge));
}

Result<Handle> Kernel::tryPassRegistry(ProcessId pid, Handle registry, ProcessId to,
                                       Rights rights) {
  auto cspace = findCSpace(pid);
  if (!cspace) return cspace.error();
  auto r = (*cspace)->lookup(registry, Rights::NONE);
  if (!r) return r.error();
  if (r->object->type() != ObjectType::REGISTRY)
    return Error(Errc::WRONG_TYPE, "passing the registry needs a registry cap");
  if (!isValidRights(rights)) return Error(Errc::INVALID_ARGUMENT, "undefined rights bits");
  if (!hasRights(r->rights, rights | Rights::GRANT))
    return Error(Errc::PERMISSION_DENIED, "the registry cap lacks GRANT or a right");
  auto target = findCSpace(to);
  if (!target) return target.error();
  const bool pushed = to != pid;
  auto charge = (*target)->tryReserveSlot(pushed);
  if (!charge) return charge.error();

  return (*target)->insert(*registry_, rights, 0, nullptr, std::move(*charge), pushed);
}

Result<uint32_t> Kernel::trySetReceiveLimit(ProcessId pid, uint32_t limit) {
  auto cspace = findCSpace(pid);
  if (!cspace) return cspace.error();
  if (limit > CSpace::MAX_SLOTS)
    return Error(Errc::INVALID_ARGUMENT, "receive limit above a CSpace's MAX_SLOTS");
  (*cspace)->setReceiveLimit(limit);
  return (*cspace)->receivedCaps();
}

std::vector<KernelEvent> Kernel::takeEvents(ProcessId pid) {
  auto it = events_.find(pid);
  if (it == events_.end()) return {};
  std::vector<KernelEvent> out = std::move(it->second);
  events_.erase(it);
  return out;
}

void Kernel::queueEvent(ProcessId pid, KernelEvent event) {
  if (!processes_.contains(pid)) return;  // dead or never attached: nobody to tell
  events_[pid].push_back(std::move(event));
}

void Kernel::lastCapGone(KernelObject& object) noexcept {
  if (object.type() != ObjectType::BUSHEL) return;  // only bushels die with their last cap
  if (std::find(doomed_.begin(), doomed_.end(), &object) == doomed_.end())
    doomed_.push_back(&object);
}

void Kernel::objectDestroyed(KernelObject& object) noexcept {
  // Whatever is destroyed is no longer doomed: reap() must never see a freed object.
  doomed_.erase(std::remove(doomed_.begin(), doomed_.end(), &object), doomed_.end());
  if (object.type() == ObjectType::BANK) {
    banks_.erase(object.koid());
  } else if (object.type() == ObjectType::CSPACE) {
    std::erase(trimmable_, static_cast<CSpace*>(&object));
  } else if (object.type() == ObjectType::BUSHEL) {
    auto& b = static_cast<Bushel&>(object);
    queueEvent(b.server(),
               {KernelEventType::BUSHEL_CLOSED, b.koid(), b.serviceKoid(), b.client(), 0, {}});
    queueEvent(b.client(),
               {KernelEventType::BUSHEL_CLOSED, b.koid(), b.serviceKoid(), b.server(), 0, {}});
  } else if (object.type() == ObjectType::SERVICE) {
    auto& s = static_cast<Service&>(object);
    auto [first, last] = servedBy_.equal_range(s.server());
    auto mine = std::find_if(first, last, [&](const auto& e) { return e.second == &s; });
    AGATE_ASSERT(mine != last, "service %lu is not listed under its server",
                 static_cast<unsigned long>(s.koid()));
    servedBy_.erase(mine);
    // Copy: detaching edits the list. The bushels die in reap(), after the call's own changes.
    const std::vector<Bushel*> bushels = s.bushels();
    for (Bushel* b : bushels) {
      queueEvent(b->client(),
                 {KernelEventType::SERVICE_GONE, b->koid(), s.koid(), s.server(), 0, {}});
      b->detachService();
      if (std::find(doomed_.begin(), doomed_.end(), b) == doomed_.end()) doomed_.push_back(b);
    }
  }
}

void Kernel::trimWanted(CSpace& cspace) noexcept { trimmable_.push_back(&cspace); }

void Kernel::reap() noexcept {
  while (!doomed_.empty()) {
    KernelObject* object = doomed_.back();
    doomed_.pop_back();
    object->owner()->destroyObject(*object);
  }
  // Last: the tables whose top chunks emptied give them back (a CSpace that died meanwhile
  // left the list in objectDestroyed).
  while (!trimmable_.empty()) {
    CSpace* cspace = trimmable_.back();
    trimmable_.pop_back();
    cspace->trim();
  }
}

void Kernel::trackBank(SpaceBank& bank) {
  bank.setLifecycleObserver(this);
  banks_.emplace(bank.koid(), &bank);
}

Result<SpaceBank*> Kernel::tryFindBank(ProcessId pid, Handle bank, Rights need) const {
  auto cspace = findCSpace(pid);
  if (!cspace) return cspace.error();
  auto c = (*cspace)->lookup(bank, need, ObjectType::BANK);
  if (!c) return c.error();
  return &c->as<SpaceBank>();
}

namespace {

// Calls fn(const SpaceBank&) for every bank, parents before children. No recursion.
template <class Fn>
void forEachBank(const SpaceBank& root, Fn&& fn) {
  std::vector<const SpaceBank*> order{&root};
  for (size_t i = 0; i < order.size(); ++i) {
    fn(*order[i]);
    for (const auto& o : order[i]->objects())
      if (o->type() == ObjectType::BANK) order.push_back(static_cast<const SpaceBank*>(o.get()));
  }
}

KernelSnapshot::Bank bankEntry(const SpaceBank& b) {
  return {b.koid(),
          b.parent() ? b.parent()->koid() : 0,
          b.used(),
          b.limit(),
          b.ownPages(),
          b.objectCount(),
          b.capCount(),
          static_cast<uint32_t>(b.observerCount()),
          b.creditMemory() != nullptr};
}

// The entries of an ordered map from `from` on, at most `limit` (0 taken as 1), made by `make`.
template <class T, class Map, class Make>
Listing<T> listFrom(const Map& map, typename Map::key_type from, uint32_t limit, Make&& make) {
  Listing<T> out;
  const size_t most = std::max<uint32_t>(limit, 1);
  auto it = map.lower_bound(from);
  for (; it != map.end() && out.entries.size() < most; ++it) out.entries.push_back(make(*it));
  out.more = it != map.end();
  return out;
}

}  // namespace

uint64_t Kernel::objectCount() const {
  uint64_t n = 0;
  forEachBank(*systemBank_, [&](const SpaceBank& b) { n += b.objectCount(); });
  return n;
}

Listing<ProcessSummary> Kernel::listProcesses(uint64_t fromPid, uint32_t limit) const {
  if (fromPid > UINT32_MAX) return {};
  return listFrom<ProcessSummary>(
      processes_, static_cast<ProcessId>(fromPid), limit, [this](const auto& e) {
        const Process& p = *e.second;
        Registry::Served served = registry_->servedBy(p.id(), ProcessSummary::SERVICES_LISTED);
        return ProcessSummary{p.id(), p.bank().koid(), p.cspace().heldCaps(),
                              std::move(served.names), served.count};
      });
}

Listing<KernelSnapshot::Bank> Kernel::listBanks(uint64_t fromKoid, uint32_t limit) const {
  return listFrom<KernelSnapshot::Bank>(banks_, fromKoid, limit,
                                        [](const auto& e) { return bankEntry(*e.second); });
}

Result<Listing<CapSummary>> Kernel::listCaps(ProcessId pid, uint64_t fromSlot,
                                             uint32_t limit) const {
  const Process* p = findProcess(pid);
  if (p == nullptr) return Error(Errc::NOT_FOUND, "no such process");
  const CSpace& cspace = p->cspace();
  const size_t most = std::max<uint32_t>(limit, 1);
  Listing<CapSummary> out;
  const Slot* s = cspace.nextCap(fromSlot);
  for (; s != nullptr && out.entries.size() < most; s = cspace.nextCap(uint64_t{s->index} + 1)) {
    KernelSnapshot::Cap cap{s->handle().raw, s->object->koid(), s->rights, s->badge, 0, 0};
    if (s->parent) {
      cap.parentHandle = s->parent->handle().raw;
      cap.parentPid = pidOf_.at(s->parent->cspace);
    }
    out.entries.push_back({cap, s->object->type()});
  }
  out.more = s != nullptr;
  return out;
}

KernelSnapshot Kernel::snapshot() const {
  KernelSnapshot snap;
  forEachBank(*systemBank_, [&](const SpaceBank& b) {
    snap.banks.push_back(bankEntry(b));
    snap.objects += b.objectCount();
  });
  std::unordered_map<const CSpace*, ProcessId> pidOf;
  for (const auto& [pid, p] : processes_) pidOf[&p->cspace()] = pid;
  for (const auto& [pid, p] : processes_) {
    KernelSnapshot::Proc proc{pid,
                              p->bank().koid(),
                              p->cspace().capacity(),
                              p->cspace().receivedCaps(),
                              p->cspace().receiveLimit(),
                              {}};
    p->cspace().forEachCap([&](const Slot& s) {
      KernelSnapshot::Cap cap{s.handle().raw, s.object->koid(), s.rights, s.badge, 0, 0};
      if (s.parent) {
        cap.parentHandle = s.parent->handle().raw;
        cap.parentPid = pidOf.at(s.parent->cspace);
      }
      proc.caps.push_back(cap);
    });
    snap.processes.push_back(std::move(proc));
  }
  snap.services = registry_->names();
  for (const auto& [pid, queue] : events_) snap.pendingEvents += queue.size();
  return snap;
}

void Kernel::verifyInvariants() const {
  forEachBank(*systemBank_, [](const SpaceBank& b) {
    b.verifyInvariants();
    for (const auto& o : b.objects()) {
      if (o->type() == ObjectType::NOTIFICATION) static_cast<const Notification&>(*o).verifyLinks();
      if (o->type() == ObjectType::EVENT_BUFFER) {
        const auto& buffer = static_cast<const EventBuffer&>(*o);
        const Notification* n = buffer.notification();
        AGATE_ASSERT(n == nullptr || n->hasBuffer(buffer),
                     "event buffer %lu: its notification does not list it",
                     static_cast<unsigned long>(o->koid()));
        // Its end is counted in its notification's bell, kept if the notification went first.
        AGATE_ASSERT(buffer.bell() != nullptr && (n == nullptr || n->bell() == buffer.bell()),
                     "event buffer %lu: no bell, or not its notification's",
                     static_cast<unsigned long>(o->koid()));
      }
    }
  });
  for (const auto& [pid, p] : processes_) {
    AGATE_ASSERT(p->bank().parent() == systemBank_.get() && p->cspace().owner() == &p->bank(),
                 "process %u: bank or CSpace misplaced", pid);
    p->cspace().verifyInvariants();
  }
}

}  // namespace agate::kernel
