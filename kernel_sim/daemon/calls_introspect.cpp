// Introspection for the agate CLI: attached processes, the bank tree, one process's CSpace, each
// in pages (schemas/kernel.capnp: a cursor is a key, the answer holds the entries from it on, at
// most a limit, and says where the next page starts).
//
// Read-only; each page is one Kernel::list* call, O(log n + page) (kernel.h): a process holding
// a million caps makes its own listing long, not anyone's page slow.
//
// Page size. At most the caller's limit, and never more than surely fits in the reply frame
// (ctx.replyWords): each entry is bounded by its struct's size plus its list slot and, for
// processes, the longest name. The bound is conservative, so a page never overflows.
#include <algorithm>

#include "syscalls.h"

namespace agate::kernel::daemon {
namespace {

// Words of the completion outside the list: root pointer, the struct, the list pointer's tag.
constexpr size_t REPLY_HEADER_WORDS = 16;

template <class Wire>
constexpr size_t structWords() {
  return Wire::_capnpPrivate::dataWordSize + Wire::_capnpPrivate::pointerCount;
}

// The longest name's words (with its NUL).
constexpr size_t NAME_WORDS = (wire::MAX_NAME_BYTES + 1 + 7) / 8;

uint32_t pageLimit(const CallContext& ctx, uint32_t asked, size_t entryWords) {
  const size_t room = ctx.replyWords > REPLY_HEADER_WORDS ? ctx.replyWords - REPLY_HEADER_WORDS : 0;
  const size_t fit = std::max<size_t>(room / entryWords, 1);
  if (asked == 0 || asked > fit) return static_cast<uint32_t>(std::min<size_t>(fit, UINT32_MAX));
  return asked;
}

// The next page's cursor: one past the last entry's key, 0 if none follows.
template <class T, class Key>
void setNextCursor(CallContext& ctx, const Listing<T>& listing, Key key) {
  ctx.reply.setNextCursor(listing.more && !listing.entries.empty() ? key(listing.entries.back()) + 1
                                                                   : 0);
}

// A service name's words (with its NUL), and a process's listed services: the list's pointers
// and their texts.
constexpr size_t SERVICE_NAME_WORDS = (Registry::MAX_NAME_BYTES + 1 + 7) / 8;
constexpr size_t SERVICES_WORDS = ProcessSummary::SERVICES_LISTED * (1 + SERVICE_NAME_WORDS);
static_assert(ProcessSummary::SERVICES_LISTED == wire::MAX_SERVICES_LISTED);

void answerProcesses(CallContext& ctx, uint64_t cursor, uint32_t asked) {
  const uint32_t limit =
      pageLimit(ctx, asked, structWords<wire::ProcessInfo>() + NAME_WORDS + SERVICES_WORDS);
  const Listing<ProcessSummary> page = ctx.kernel.listProcesses(cursor, limit);
  setNextCursor(ctx, page, [](const ProcessSummary& p) { return uint64_t{p.pid}; });
  auto list = ctx.reply.initProcesses(static_cast<unsigned>(page.entries.size()));
  unsigned i = 0;
  for (const ProcessSummary& p : page.entries) {
    auto out = list[i++];
    out.setPid(p.pid);
    out.setBank(p.bank);
    out.setCaps(p.caps);
    out.setServiceCount(p.serviceCount);
    auto services = out.initServices(static_cast<unsigned>(p.services.size()));
    for (unsigned s = 0; s < p.services.size(); ++s) services.set(s, p.services[s]);
    auto it = ctx.sessions.find(p.pid);
    if (it == ctx.sessions.end()) continue;  // attached but not yet announced: no OS identity
    out.setOsPid(it->second->osPid);
    out.setUid(it->second->uid);
    out.setName(it->second->name);
  }
}

void answerBanks(CallContext& ctx, uint64_t cursor, uint32_t asked) {
  const uint32_t limit = pageLimit(ctx, asked, structWords<wire::BankInfo>());
  // Koid order: a child bank is always made after its parent, so parents still come first.
  const Listing<KernelSnapshot::Bank> page = ctx.kernel.listBanks(cursor, limit);
  setNextCursor(ctx, page, [](const KernelSnapshot::Bank& b) { return b.koid; });
  auto list = ctx.reply.initBanks(static_cast<unsigned>(page.entries.size()));
  unsigned i = 0;
  for (const KernelSnapshot::Bank& b : page.entries) {
    auto out = list[i++];
    out.setKoid(b.koid);
    out.setParent(b.parent);
    out.setUsed(b.used);
    out.setLimit(b.limit);
    out.setOwnPages(b.ownPages);
    out.setObjects(b.objects);
    out.setCaps(b.caps);
  }
}

void answerCaps(CallContext& ctx, ProcessId pid, uint64_t cursor, uint32_t asked) {
  const uint32_t limit = pageLimit(ctx, asked, structWords<wire::CapEntry>());
  auto page = ctx.kernel.listCaps(pid, cursor, limit);
  if (!page) return ctx.fail(page.error());
  // Caps are in slot order; the slot is the handle's low half.
  setNextCursor(ctx, *page, [](const CapSummary& c) { return c.cap.handle & 0xffffffffu; });
  auto list = ctx.reply.initCaps(static_cast<unsigned>(page->entries.size()));
  unsigned i = 0;
  for (const CapSummary& c : page->entries) {
    auto out = list[i++];
    out.setHandle(c.cap.handle);
    out.setKoid(c.cap.koid);
    out.setType(static_cast<uint16_t>(c.type));
    out.setRights(static_cast<uint32_t>(c.cap.rights));
    out.setBadge(c.cap.badge);
    out.setParentHandle(c.cap.parentHandle);
    out.setParentPid(c.cap.parentPid);
  }
}

}  // namespace

void listProcesses(CallContext& ctx) { answerProcesses(ctx, 0, 0); }

void listBanks(CallContext& ctx) { answerBanks(ctx, 0, 0); }

void listCaps(CallContext& ctx, wire::Syscall::ListCaps::Reader call) {
  const ProcessId pid = call.getPid();
  answerCaps(ctx, pid, 0, 0);
}

void listProcessesPage(CallContext& ctx, wire::Syscall::ListProcessesPage::Reader call) {
  const uint64_t cursor = call.getCursor();
  const uint32_t limit = call.getLimit();
  answerProcesses(ctx, cursor, limit);
}

void listBanksPage(CallContext& ctx, wire::Syscall::ListBanksPage::Reader call) {
  const uint64_t cursor = call.getCursor();
  const uint32_t limit = call.getLimit();
  answerBanks(ctx, cursor, limit);
}

void listCapsPage(CallContext& ctx, wire::Syscall::ListCapsPage::Reader call) {
  const ProcessId pid = call.getPid();
  const uint64_t cursor = call.getCursor();
  const uint32_t limit = call.getLimit();
  answerCaps(ctx, pid, cursor, limit);
}

}  // namespace agate::kernel::daemon
