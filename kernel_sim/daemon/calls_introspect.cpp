// Introspection for the agate CLI: attached processes, the bank tree, one process's CSpace, each
// in pages (schemas/kernel.capnp: a cursor is a key, the answer holds the entries from it on, at
// most a limit, and says where the next page starts).
//
// Read-only; each page is built from one KernelSnapshot: O(kernel state) per page, so listing
// everything costs O(state x pages). Not a hot path: the CLI asks once per command.
//
// Page size. At most the caller's limit, and never more than surely fits in the reply frame
// (ctx.replyWords): each entry is bounded by its struct's size plus its list slot and, for
// processes, the longest name. The bound is conservative, so a page never overflows.
#include <algorithm>
#include <span>
#include <vector>

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

// The entries of `all` (sorted by key) from `cursor` on, at most `limit`; sets nextCursor.
template <class T, class Key>
std::span<const T> page(CallContext& ctx, const std::vector<T>& all, uint64_t cursor,
                        uint32_t limit, Key key) {
  auto first = std::lower_bound(all.begin(), all.end(), cursor,
                                [&](const T& e, uint64_t c) { return key(e) < c; });
  const size_t available = static_cast<size_t>(all.end() - first);
  const size_t n = std::min<size_t>(available, limit);
  const std::span<const T> out(all.data() + (first - all.begin()), n);
  ctx.reply.setNextCursor(n < available ? key(out.back()) + 1 : 0);
  return out;
}

void answerProcesses(CallContext& ctx, uint64_t cursor, uint32_t asked) {
  const uint32_t limit = pageLimit(ctx, asked, structWords<wire::ProcessInfo>() + NAME_WORDS);
  const KernelSnapshot snap = ctx.kernel.snapshot();  // processes in pid order
  const auto entries = page(ctx, snap.processes, cursor, limit,
                            [](const KernelSnapshot::Proc& p) { return uint64_t{p.pid}; });
  auto list = ctx.reply.initProcesses(static_cast<unsigned>(entries.size()));
  unsigned i = 0;
  for (const KernelSnapshot::Proc& p : entries) {
    auto out = list[i++];
    out.setPid(p.pid);
    out.setBank(p.bank);
    out.setCaps(static_cast<uint32_t>(p.caps.size()));
    auto it = ctx.sessions.find(p.pid);
    if (it == ctx.sessions.end()) continue;  // attached but not yet announced: no OS identity
    out.setOsPid(it->second->osPid);
    out.setUid(it->second->uid);
    out.setName(it->second->name);
  }
}

void answerBanks(CallContext& ctx, uint64_t cursor, uint32_t asked) {
  const uint32_t limit = pageLimit(ctx, asked, structWords<wire::BankInfo>());
  KernelSnapshot snap = ctx.kernel.snapshot();
  // Koid order: a child bank is always made after its parent, so parents still come first.
  std::sort(
      snap.banks.begin(), snap.banks.end(),
      [](const KernelSnapshot::Bank& a, const KernelSnapshot::Bank& b) { return a.koid < b.koid; });
  const auto entries =
      page(ctx, snap.banks, cursor, limit, [](const KernelSnapshot::Bank& b) { return b.koid; });
  auto list = ctx.reply.initBanks(static_cast<unsigned>(entries.size()));
  unsigned i = 0;
  for (const KernelSnapshot::Bank& b : entries) {
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
  const KernelSnapshot snap = ctx.kernel.snapshot();
  auto proc = std::find_if(snap.processes.begin(), snap.processes.end(),
                           [&](const KernelSnapshot::Proc& p) { return p.pid == pid; });
  if (proc == snap.processes.end()) return ctx.fail(Error(Errc::NOT_FOUND, "no such process"));
  // Caps are in slot order; the slot is the handle's low half.
  const auto entries = page(ctx, proc->caps, cursor, limit,
                            [](const KernelSnapshot::Cap& c) { return c.handle & 0xffffffffu; });
  auto list = ctx.reply.initCaps(static_cast<unsigned>(entries.size()));
  unsigned i = 0;
  for (const KernelSnapshot::Cap& c : entries) {
    auto out = list[i++];
    out.setHandle(c.handle);
    out.setKoid(c.koid);
    auto info = ctx.kernel.tryInspectCap(pid, Handle{c.handle});
    out.setType(info ? static_cast<uint16_t>(info->type) : 0);
    out.setRights(static_cast<uint32_t>(c.rights));
    out.setBadge(c.badge);
    out.setParentHandle(c.parentHandle);
    out.setParentPid(c.parentPid);
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
