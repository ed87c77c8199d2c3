// A seeded randomized test: tens of thousands of random kernel calls from 4 processes (cap
// copies, deletes, revokes, transfers, bank and region creation, destroys, limit changes,
// deaths and new attaches), each compared with a small reference model that knows only the
// rules (pages charged, caps derived), not the data structures. After every call: the same
// result code, the same used/limit in every bank, the same caps with the same derivation
// parents in every CSpace, the same count of pushed caps under each receive limit, the same
// object count, and the kernel's own invariants.

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "../support/proc_self.h"
#include "agate/kernel/kernel.h"

namespace agate::kernel {
namespace {

constexpr uint64_t SYSTEM_PAGES = 2000;
// Low, so that pushes past a process's receive limit happen often.
constexpr uint32_t RECEIVE_LIMIT = 3;
constexpr uint64_t PROCESS_PAGES = 600;  // 4 x 600 > 2000: the system bank binds too
constexpr int PROCESSES = 4;

using CapKey = std::pair<ProcessId, uint64_t>;  // (process, handle)

struct MObject {
  ObjectType type;
  Koid owner;          // 0: the system bank
  uint64_t pages = 0;  // region: its size; CSpace: its slot chunks
  uint64_t limit = 0;  // bank
};

struct MCap {
  Koid koid;
  Rights rights;
  uint64_t badge;
  std::optional<CapKey> parent;
};

struct MProc {
  Koid bank;
  Koid cspace;
  uint32_t held = 0;
};

class Model {
 public:
  explicit Model(Kernel& k) : k_(k) {
    systemKoid_ = k.systemBank().koid();
    objects_[systemKoid_] = {ObjectType::BANK, 0, 0, SYSTEM_PAGES};
  }

  // --- accounting ---
  std::map<Koid, uint64_t> used() const {
    std::map<Koid, std::vector<Koid>> owned;
    for (auto& [koid, o] : objects_)
      if (o.owner) owned[o.owner].push_back(koid);
    std::map<Koid, uint64_t> out;
    // Banks in decreasing koid order: a child bank always has a larger koid than its parent.
    for (auto it = objects_.rbegin(); it != objects_.rend(); ++it) {
      if (it->second.type != ObjectType::BANK) continue;
      uint64_t u = recordPages(owned[it->first].size());
      for (Koid c : owned[it->first]) {
        const MObject& o = objects_.at(c);
        u += o.type == ObjectType::BANK ? out.at(c) : o.pages;
      }
      out[it->first] = u;
    }
    return out;
  }
  uint64_t records(Koid bank) const {
    uint64_t n = 0;
    for (auto& [koid, o] : objects_) n += (o.owner == bank);
    return n;
  }
  static uint64_t available(const std::map<Koid, uint64_t>& used,
                            const std::map<Koid, MObject>& objects, Koid bank) {
    uint64_t room = UINT64_MAX;
    for (Koid b = bank; b; b = objects.at(b).owner)
      room = std::min(room, objects.at(b).limit - used.at(b));
    return room;
  }
  // Object charge on `bank` first (if any), then a slot chunk for `pid` (if needed).
  Errc predictCharges(std::optional<Koid> bank, uint64_t pages, std::optional<ProcessId> slotFor) {
    auto u = used();
    if (bank) {
      const uint64_t cost = pages + recordPages(records(*bank) + 1) - recordPages(records(*bank));
      if (cost > available(u, objects_, *bank)) return Errc::QUOTA_EXCEEDED;
      for (Koid b = *bank; b; b = objects_.at(b).owner) u[b] += cost;
    }
    if (slotFor) {
      const MProc& p = procs_.at(*slotFor);
      const bool needsChunk =
          p.held == objects_.at(p.cspace).pages * CSpace::SLOTS_PER_CHUNK;  // no slot free
      if (needsChunk && available(u, objects_, p.bank) < 1) return Errc::QUOTA_EXCEEDED;
    }
    return Errc::OK;
  }

  // --- caps ---
  void addCap(ProcessId pid, Handle h, MCap cap, bool received = false) {
    caps_[{pid, h.raw}] = cap;
    if (received) received_.insert({pid, h.raw});
    MProc& p = procs_.at(pid);
    ++p.held;
  }
  // A CSpace's chunks after a call: a new cap takes the lowest free slot, and the chunks above
  // the highest cap are given back (all but the first), so its chunks are exactly those up to
  // its highest cap. Run after every call (the kernel trims at the end of each).
  void settleChunks() {
    std::map<ProcessId, uint64_t> top;  // highest slot index + 1
    for (const auto& [key, cap] : caps_)
      top[key.first] = std::max(top[key.first], (key.second & 0xffffffffu) + 1);
    for (auto& [pid, p] : procs_)
      objects_.at(p.cspace).pages =
          std::max<uint64_t>(1, (top[pid] + CSpace::SLOTS_PER_CHUNK - 1) / CSpace::SLOTS_PER_CHUNK);
  }
  void eraseCap(const CapKey& key) {
    auto parent = caps_.at(key).parent;
    for (auto& [k, c] : caps_)
      if (c.parent == key) c.parent = parent;
    caps_.erase(key);
    received_.erase(key);
    --procs_.at(key.first).held;
    stale_[key.first].push_back(Handle{key.second});
  }
  uint64_t revoke(const CapKey& root) {
    std::set<CapKey> doomed{root};
    for (bool grew = true; grew;) {
      grew = false;
      for (auto& [k, c] : caps_)
        if (c.parent && doomed.count(*c.parent) && doomed.insert(k).second) grew = true;
    }
    doomed.erase(root);
    for (const CapKey& k : doomed) {
      caps_.erase(k);
      received_.erase(k);
      --procs_.at(k.first).held;
      stale_[k.first].push_back(Handle{k.second});
    }
    return doomed.size();
  }
  // Destroys an object (a bank with its subtree) and every cap to what died.
  void destroy(Koid koid) {
    std::set<Koid> dead{koid};
    for (bool grew = true; grew;) {
      grew = false;
      for (auto& [k, o] : objects_)
        if (dead.count(o.owner) && dead.insert(k).second) grew = true;
    }
    for (Koid d : dead) objects_.erase(d);
    for (auto it = caps_.begin(); it != caps_.end();) {
      if (dead.count(it->second.koid)) {
        --procs_.at(it->first.first).held;
        stale_[it->first.first].push_back(Handle{it->first.second});
        received_.erase(it->first);
        it = caps_.erase(it);
      } else {
        ++it;
      }
    }
  }

  Kernel& k_;
  Koid systemKoid_;
  std::map<Koid, MObject> objects_;
  std::map<CapKey, MCap> caps_;
  std::set<CapKey> received_;  // caps another process pushed in (the receive limit counts them)
  uint32_t receivedBy(ProcessId pid) const {
    uint32_t n = 0;
    for (const CapKey& k : received_) n += k.first == pid;
    return n;
  }
  std::map<ProcessId, MProc> procs_;
  std::map<ProcessId, std::vector<Handle>> stale_;
};

class KernelModelTest : public ::testing::Test {
 protected:
  KernelModelTest() : m_(k_) {}

  void attachOne() {
    auto a = k_.tryAttachProcess(PROCESS_PAGES);
    ASSERT_TRUE(a.ok());
    const Process& p = *k_.findProcess(a->pid);
    m_.objects_[p.bank().koid()] = {ObjectType::BANK, m_.systemKoid_, 0, PROCESS_PAGES};
    m_.objects_[p.cspace().koid()] = {ObjectType::CSPACE, p.bank().koid(), 1, 0};  // a chunk
    m_.procs_[a->pid] = {p.bank().koid(), p.cspace().koid(), 0};
    m_.addCap(a->pid, a->bank, {p.bank().koid(), Kernel::PROCESS_BANK, 0, std::nullopt});
  }

  ProcessId randomPid() {
    if (rng_() % 50 == 0) return 999999;  // never attached
    auto it = m_.procs_.begin();
    std::advance(it, rng_() % m_.procs_.size());
    return it->first;
  }
  Handle randomHandle(ProcessId pid) {
    const int roll = static_cast<int>(rng_() % 100);
    if (roll < 5) return Handle{rng_()};
    auto& stale = m_.stale_[pid];
    if (roll < 12 && !stale.empty()) return stale[rng_() % stale.size()];
    std::vector<uint64_t> mine;
    for (auto& [key, c] : m_.caps_)
      if (key.first == pid) mine.push_back(key.second);
    if (mine.empty()) return Handle{rng_()};
    return Handle{mine[rng_() % mine.size()]};
  }
  const MCap* find(ProcessId pid, Handle h) {
    auto it = m_.caps_.find({pid, h.raw});
    return it == m_.caps_.end() ? nullptr : &it->second;
  }
  // Decode as the kernel does: handle, type, rights.
  Errc decode(ProcessId pid, Handle h, Rights need, ObjectType type) {
    if (!m_.procs_.count(pid)) return Errc::NOT_FOUND;
    const MCap* c = find(pid, h);
    if (!c) return Errc::INVALID_HANDLE;
    if (type != ObjectType::ANY && m_.objects_.at(c->koid).type != type) return Errc::WRONG_TYPE;
    if (!hasRights(c->rights, need)) return Errc::PERMISSION_DENIED;
    return Errc::OK;
  }
  Rights randomRights(Rights within) {
    auto r = static_cast<Rights>(rng_() & static_cast<uint32_t>(Rights::ALL));
    return rng_() % 5 == 0 ? r : (r & within);
  }
  uint64_t randomLimit() {
    const int roll = static_cast<int>(rng_() % 10);
    if (roll == 0) return UNLIMITED;
    if (roll < 4) return rng_() % 4;  // tiny banks: quota refusals of every kind
    return rng_() % 150;
  }

  void step() {
    const int op = static_cast<int>(rng_() % 100);
    const ProcessId pid = randomPid();
    const Handle h = randomHandle(pid);
    const MCap* c = find(pid, h);
    if (op < 18) {  // copy
      const Rights rights = randomRights(c ? c->rights : Rights::ALL);
      const uint64_t badge = rng_() % 3 == 0 ? 1 + rng_() % 3 : 0;
      Errc want = decode(pid, h, Rights::NONE, ObjectType::ANY);
      if (want == Errc::OK && !hasRights(c->rights, rights)) want = Errc::PERMISSION_DENIED;
      if (want == Errc::OK && badge && c->badge && badge != c->badge)
        want = Errc::PERMISSION_DENIED;
      if (want == Errc::OK) want = m_.predictCharges(std::nullopt, 0, pid);
      auto r = k_.tryCopyCap(pid, h, rights, badge);
      tally("copy", want);
      ASSERT_EQ(r.code(), want) << "copy";
      if (r) m_.addCap(pid, *r, {c->koid, rights, badge ? badge : c->badge, CapKey{pid, h.raw}});
    } else if (op < 27) {  // delete
      const Errc want = decode(pid, h, Rights::NONE, ObjectType::ANY);
      tally("delete", want);
      ASSERT_EQ(k_.tryDeleteCap(pid, h).code(), want) << "delete";
      if (want == Errc::OK) m_.eraseCap({pid, h.raw});
    } else if (op < 38) {  // revoke
      const Errc want = decode(pid, h, Rights::NONE, ObjectType::ANY);
      auto r = k_.tryRevokeCap(pid, h);
      tally("revoke", want);
      ASSERT_EQ(r.code(), want) << "revoke";
      if (r) {
        ASSERT_EQ(*r, m_.revoke({pid, h.raw}));
      }
    } else if (op < 52) {  // transfer
      const ProcessId to = randomPid();
      const auto mode = rng_() % 2 ? TransferMode::MOVE : TransferMode::COPY;
      Errc want = decode(pid, h, Rights::GRANT, ObjectType::ANY);
      if (want == Errc::OK && !m_.procs_.count(to)) want = Errc::NOT_FOUND;
      if (want == Errc::OK && to != pid && m_.receivedBy(to) >= RECEIVE_LIMIT)
        want = Errc::QUOTA_EXCEEDED;
      if (want == Errc::OK) want = m_.predictCharges(std::nullopt, 0, to);
      auto r = k_.tryTransferCap(pid, h, to, mode);
      tally("transfer", want);
      ASSERT_EQ(r.code(), want) << "transfer";
      if (!r) return;
      MCap copy = *c;
      const CapKey from{pid, h.raw};
      const CapKey dst{to, r->raw};
      // Pushed by another process, or (moved within one table) as the source was.
      const bool received = to != pid || (mode == TransferMode::MOVE && m_.received_.count(from));
      if (mode == TransferMode::COPY) {
        copy.parent = from;
        m_.addCap(to, *r, copy, received);
      } else {
        m_.addCap(to, *r, copy, received);
        for (auto& [k, other] : m_.caps_)
          if (other.parent == from) other.parent = dst;
        m_.eraseCap(from);
      }
    } else if (op < 64) {  // region
      const uint64_t pages = rng_() % 40 == 0 ? 0 : 1 + rng_() % 60;
      Errc want = decode(pid, h, Rights::ALLOCATE, ObjectType::BANK);
      if (want == Errc::OK && pages == 0) want = Errc::INVALID_ARGUMENT;
      if (want == Errc::OK) want = m_.predictCharges(c->koid, pages, pid);
      auto r = k_.tryCreateRegion(pid, h, pages);
      tally("region", want);
      ASSERT_EQ(r.code(), want) << "region";
      if (!r) return;
      const Koid koid = k_.tryInspectCap(pid, *r)->koid;
      m_.objects_[koid] = {ObjectType::REGION, c->koid, pages, 0};
      m_.addCap(pid, *r, {koid, Kernel::CREATOR, 0, std::nullopt});
    } else if (op < 74) {  // bank
      const uint64_t limit = randomLimit();
      Errc want = decode(pid, h, Rights::CREATE_CHILD, ObjectType::BANK);
      if (want == Errc::OK) want = m_.predictCharges(c->koid, 0, pid);
      auto r = k_.tryCreateBank(pid, h, limit);
      tally("bank", want);
      ASSERT_EQ(r.code(), want) << "bank";
      if (!r) return;
      const Koid koid = k_.tryInspectCap(pid, *r)->koid;
      m_.objects_[koid] = {ObjectType::BANK, c->koid, 0, limit};
      m_.addCap(pid, *r, {koid, Kernel::CREATOR, 0, std::nullopt});
    } else if (op < 84) {  // destroy
      Errc want = decode(pid, h, Rights::DESTROY, ObjectType::ANY);
      if (want == Errc::OK && m_.objects_.at(c->koid).owner == m_.systemKoid_)
        want = Errc::PERMISSION_DENIED;
      tally("destroy", want);
      ASSERT_EQ(k_.tryDestroyObject(pid, h).code(), want) << "destroy";
      if (want == Errc::OK) m_.destroy(c->koid);
    } else if (op < 92) {  // set limit
      const uint64_t limit = randomLimit();
      Errc want = decode(pid, h, Rights::SET_LIMIT, ObjectType::BANK);
      if (want == Errc::OK && limit < m_.used().at(c->koid)) want = Errc::INVALID_ARGUMENT;
      tally("limit", want);
      ASSERT_EQ(k_.trySetBankLimit(pid, h, limit).code(), want) << "limit";
      if (want == Errc::OK) m_.objects_.at(c->koid).limit = limit;
    } else if (op < 99) {  // read
      const Errc want = decode(pid, h, Rights::READ, ObjectType::BANK);
      auto r = k_.tryReadBank(pid, h);
      tally("read", want);
      ASSERT_EQ(r.code(), want) << "read";
      if (r) {
        EXPECT_EQ(r->used, m_.used().at(c->koid));
        EXPECT_EQ(r->limit, m_.objects_.at(c->koid).limit);
      }
    } else {  // death, and a newcomer
      if (!m_.procs_.count(pid)) {
        ASSERT_EQ(k_.tryKillProcess(pid).code(), Errc::NOT_FOUND);
        return;
      }
      ASSERT_TRUE(k_.tryKillProcess(pid).ok());
      std::vector<CapKey> mine;
      for (auto& [key, cap] : m_.caps_)
        if (key.first == pid) mine.push_back(key);
      for (const CapKey& key : mine) m_.eraseCap(key);
      const Koid bank = m_.procs_.at(pid).bank;
      m_.procs_.erase(pid);
      m_.stale_.erase(pid);
      m_.destroy(bank);
      ++deaths_;
      attachOne();
    }
  }

  void tally(const char* call, Errc result) { ++outcomes_[{call, result}]; }

  void compare() {
    const auto snap = k_.snapshot();
    const auto used = m_.used();
    ASSERT_EQ(snap.banks.size(), used.size());
    for (const auto& b : snap.banks) {
      ASSERT_EQ(b.used, used.at(b.koid)) << "bank " << b.koid;
      ASSERT_EQ(b.limit, m_.objects_.at(b.koid).limit) << "bank " << b.koid;
    }
    ASSERT_EQ(snap.objects + 1, m_.objects_.size()) << "the model lists the system bank";
    size_t caps = 0;
    for (const auto& p : snap.processes) {
      ASSERT_EQ(p.received, m_.receivedBy(p.pid)) << "pid " << p.pid;
      ASSERT_EQ(p.receiveLimit, RECEIVE_LIMIT);
      for (const auto& c : p.caps) {
        auto it = m_.caps_.find({p.pid, c.handle});
        ASSERT_NE(it, m_.caps_.end()) << "kernel has a cap the model lacks";
        ASSERT_EQ(c.koid, it->second.koid);
        ASSERT_EQ(c.rights, it->second.rights);
        ASSERT_EQ(c.badge, it->second.badge);
        const std::optional<CapKey> parent =
            c.parentHandle ? std::optional<CapKey>(CapKey{c.parentPid, c.parentHandle})
                           : std::nullopt;
        ASSERT_EQ(parent, it->second.parent) << "derivation parent";
        ++caps;
      }
    }
    ASSERT_EQ(caps, m_.caps_.size());
    k_.verifyInvariants();
  }

  Kernel k_{Kernel::Options{.systemPages = SYSTEM_PAGES, .receiveLimit = RECEIVE_LIMIT}};
  Model m_;
  std::mt19937_64 rng_{0xa9a7e};
  int deaths_ = 0;
  std::map<std::pair<std::string, Errc>, int> outcomes_;  // (call, result) -> count
};

TEST_F(KernelModelTest, FiftyThousandRandomCallsAgreeWithTheReferenceModel) {
  const int fdsBefore = agate::testing::openFdCount();
  for (int i = 0; i < PROCESSES; ++i) attachOne();
  const uint64_t baseline = k_.systemBank().used();
  for (int i = 0; i < 50000; ++i) {
    ASSERT_NO_FATAL_FAILURE(step()) << "step " << i;
    m_.settleChunks();
    // Every step early on (where a bug shows first), then every 4th to stay fast.
    if (i < 5000 || i % 4 == 0) {
      ASSERT_NO_FATAL_FAILURE(compare()) << "after step " << i;
    }
  }
  for (auto& [key, n] : outcomes_)
    std::printf("%-9s %-18s %d\n", key.first.c_str(), errcName(key.second), n);
  EXPECT_GT(deaths_, 100);
  // The walk reached every interesting outcome, not just the easy ones.
  for (auto [call, result] :
       std::vector<std::pair<const char*, Errc>>{{"copy", Errc::OK},
                                                 {"copy", Errc::PERMISSION_DENIED},
                                                 {"copy", Errc::INVALID_HANDLE},
                                                 {"copy", Errc::NOT_FOUND},
                                                 {"delete", Errc::OK},
                                                 {"revoke", Errc::OK},
                                                 {"transfer", Errc::OK},
                                                 {"transfer", Errc::PERMISSION_DENIED},
                                                 {"transfer", Errc::NOT_FOUND},
                                                 {"transfer", Errc::QUOTA_EXCEEDED},
                                                 {"region", Errc::OK},
                                                 {"region", Errc::QUOTA_EXCEEDED},
                                                 {"region", Errc::WRONG_TYPE},
                                                 {"region", Errc::INVALID_ARGUMENT},
                                                 {"bank", Errc::OK},
                                                 {"bank", Errc::QUOTA_EXCEEDED},
                                                 {"destroy", Errc::OK},
                                                 {"destroy", Errc::PERMISSION_DENIED},
                                                 {"limit", Errc::OK},
                                                 {"limit", Errc::INVALID_ARGUMENT},
                                                 {"read", Errc::OK}})
    EXPECT_GT((outcomes_[{call, result}]), 10) << call << " " << errcName(result);
  // Every process dies: the system bank is back to what the survivors' replacements cost.
  std::vector<ProcessId> pids;
  for (auto& [pid, p] : m_.procs_) pids.push_back(pid);
  for (ProcessId pid : pids) ASSERT_TRUE(k_.tryKillProcess(pid).ok());
  EXPECT_EQ(k_.systemBank().used(), 0u);
  EXPECT_EQ(k_.objectCount(), 0u);
  EXPECT_GT(baseline, 0u);
  EXPECT_EQ(agate::testing::openFdCount(), fdsBefore) << "every region's memfd was closed";
}

}  // namespace
}  // namespace agate::kernel
