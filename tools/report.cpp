#include "agate/tools/report.h"

#include <algorithm>
#include <cstdio>
#include <map>
#include <set>
#include <vector>

#include <nlohmann/json.hpp>

#include "agate/kernel/space_bank.h"

namespace agate::tools {
namespace {

using Json = nlohmann::ordered_json;  // keys in the order written: stable, readable output

// Columns padded to their widest cell; numbers right-aligned, text left-aligned. The last column
// is not padded, so lines carry no trailing blanks.
class Table {
 public:
  enum Align { LEFT, RIGHT };
  Table(std::vector<std::string> headers, std::vector<Align> aligns)
      : headers_(std::move(headers)), aligns_(std::move(aligns)) {}

  void add(std::vector<std::string> row) { rows_.push_back(std::move(row)); }

  std::string render() const {
    std::vector<size_t> widths(headers_.size());
    for (size_t c = 0; c < headers_.size(); ++c) widths[c] = headers_[c].size();
    for (const auto& row : rows_)
      for (size_t c = 0; c < row.size(); ++c) widths[c] = std::max(widths[c], row[c].size());
    std::string out;
    auto line = [&](const std::vector<std::string>& cells) {
      std::string l;
      for (size_t c = 0; c < cells.size(); ++c) {
        const bool last = c + 1 == cells.size();
        const size_t pad = widths[c] - cells[c].size();
        if (aligns_[c] == RIGHT) l.append(pad, ' ');
        l += cells[c];
        if (aligns_[c] == LEFT && !last) l.append(pad, ' ');
        if (!last) l += "  ";
      }
      // An empty last cell leaves the separator behind: no line ends in blanks.
      l.erase(l.find_last_not_of(' ') + 1);
      out += l;
      out += '\n';
    };
    line(headers_);
    for (const auto& row : rows_) line(row);
    return out;
  }

 private:
  std::vector<std::string> headers_;
  std::vector<Align> aligns_;
  std::vector<std::vector<std::string>> rows_;
};

std::string num(uint64_t v) { return std::to_string(v); }

constexpr const char* RIGHT_NAMES[] = {"read",         "write",     "grant",  "allocate",
                                       "create_child", "set_limit", "destroy"};
constexpr char RIGHT_LETTERS[] = "rwgacld";
static_assert(sizeof(RIGHT_NAMES) / sizeof(RIGHT_NAMES[0]) == sizeof(RIGHT_LETTERS) - 1);
static_assert(static_cast<uint32_t>(caps::Rights::ALL) == (1u << (sizeof(RIGHT_LETTERS) - 1)) - 1,
              "a right was added: name it here");

const caps::ProcessInfo* ownerOf(caps::Koid bank, std::span<const caps::ProcessInfo> processes) {
  for (const caps::ProcessInfo& p : processes)
    if (p.bank == bank) return &p;
  return nullptr;
}

// A bank and its depth in the tree, in display order.
struct TreeRow {
  const caps::BankInfo* bank;
  int depth;
};

// Depth-first from every root, children in koid order. Robust to any input: a bank whose parent
// is absent is a root, and banks on a parent cycle (never reachable from a root) are listed last
// as roots, each once.
std::vector<TreeRow> bankTree(std::span<const caps::BankInfo> banks) {
  std::map<caps::Koid, const caps::BankInfo*> byKoid;
  for (const caps::BankInfo& b : banks) byKoid.emplace(b.koid, &b);
  std::map<caps::Koid, std::vector<const caps::BankInfo*>> children;
  std::vector<const caps::BankInfo*> roots;
  for (const auto& [koid, b] : byKoid) {
    if (b->parent != 0 && b->parent != koid && byKoid.count(b->parent))
      children[b->parent].push_back(b);
    else
      roots.push_back(b);
  }
  std::vector<TreeRow> rows;
  std::set<caps::Koid> seen;
  // Iterative, so a deep tree cannot overflow the stack.
  auto walk = [&](const caps::BankInfo* root) {
    std::vector<TreeRow> stack{{root, 0}};
    while (!stack.empty()) {
      const TreeRow r = stack.back();
      stack.pop_back();
      if (!seen.insert(r.bank->koid).second) continue;
      rows.push_back(r);
      auto it = children.find(r.bank->koid);
      if (it == children.end()) continue;
      for (auto c = it->second.rbegin(); c != it->second.rend(); ++c)
        stack.push_back({*c, r.depth + 1});
    }
  };
  for (const caps::BankInfo* r : roots) walk(r);
  for (const auto& [koid, b] : byKoid)
    if (!seen.count(koid)) walk(b);
  return rows;
}

std::string percent(uint64_t used, uint64_t limit) {
  if (limit == 0) return used == 0 ? "0%" : "-";
  char buf[16];
  std::snprintf(buf, sizeof(buf), "%.0f%%", 100.0 * static_cast<double>(used) / limit);
  return buf;
}

// nlohmann's dump() throws on invalid UTF-8 by default; names from the kernel are printable
// ASCII, but the CLI must never throw on what a peer sent: replace instead.
std::string dump(const Json& j) {
  return j.dump(2, ' ', false, Json::error_handler_t::replace) + "\n";
}

// The SERVICES cell: the names listed, and how many more the process serves.
std::string servicesCell(const caps::ProcessInfo& p) {
  std::string cell;
  for (const std::string& name : p.services) {
    if (!cell.empty()) cell += ',';
    cell += name;
  }
  if (p.serviceCount > p.services.size())
    cell += " +" + std::to_string(p.serviceCount - p.services.size());
  return cell.empty() ? "-" : cell;
}

}  // namespace

std::string rightsLetters(caps::Rights rights) {
  const uint32_t bits = static_cast<uint32_t>(rights);
  std::string s;
  for (size_t i = 0; i + 1 < sizeof(RIGHT_LETTERS); ++i)
    s += (bits & (1u << i)) ? RIGHT_LETTERS[i] : '-';
  if (!kernel::isValidRights(rights)) s += '?';
  return s;
}

std::vector<std::string> rightNames(caps::Rights rights) {
  const uint32_t bits = static_cast<uint32_t>(rights);
  std::vector<std::string> names;
  for (size_t i = 0; i < std::size(RIGHT_NAMES); ++i)
    if (bits & (1u << i)) names.emplace_back(RIGHT_NAMES[i]);
  return names;
}

std::string processesTable(std::span<const caps::ProcessInfo> processes) {
  Table t({"PID", "OS PID", "UID", "NAME", "BANK", "CAPS", "SERVICES"},
          {Table::RIGHT, Table::RIGHT, Table::RIGHT, Table::LEFT, Table::RIGHT, Table::RIGHT,
           Table::LEFT});
  for (const caps::ProcessInfo& p : processes)
    t.add({num(p.pid), std::to_string(p.osPid), num(p.uid), p.name, num(p.bank), num(p.caps),
           servicesCell(p)});
  return t.render();
}

std::string processesJson(std::span<const caps::ProcessInfo> processes) {
  Json list = Json::array();
  for (const caps::ProcessInfo& p : processes)
    list.push_back({{"pid", p.pid},
                    {"os_pid", p.osPid},
                    {"uid", p.uid},
                    {"name", p.name},
                    {"bank", p.bank},
                    {"caps", p.caps},
                    {"services", p.services},
                    {"service_count", p.serviceCount}});
  return dump(Json{{"processes", std::move(list)}});
}

std::string banksTable(std::span<const caps::BankInfo> banks,
                       std::span<const caps::ProcessInfo> processes) {
  Table t({"BANK", "USED", "LIMIT", "USE", "OWN", "OBJECTS", "CAPS", "OWNER"},
          {Table::LEFT, Table::RIGHT, Table::RIGHT, Table::RIGHT, Table::RIGHT, Table::RIGHT,
           Table::RIGHT, Table::LEFT});
  for (const TreeRow& r : bankTree(banks)) {
    const caps::BankInfo& b = *r.bank;
    std::string owner;
    if (const caps::ProcessInfo* p = ownerOf(b.koid, processes))
      owner = "pid " + num(p->pid) + " (" + p->name + ")";
    else if (b.parent == 0)
      owner = "system";
    t.add({std::string(2 * static_cast<size_t>(r.depth), ' ') + num(b.koid), num(b.used),
           num(b.limit), percent(b.used, b.limit), num(b.ownPages), num(b.objects), num(b.caps),
           owner});
  }
  return t.render() + "(pages of " + num(kernel::PAGE_BYTES) +
         " bytes; USED counts the bank and its descendants)\n";
}

std::string banksJson(std::span<const caps::BankInfo> banks,
                      std::span<const caps::ProcessInfo> processes) {
  Json list = Json::array();
  for (const TreeRow& r : bankTree(banks)) {
    const caps::BankInfo& b = *r.bank;
    const caps::ProcessInfo* owner = ownerOf(b.koid, processes);
    list.push_back({{"koid", b.koid},
                    {"parent", b.parent},
                    {"depth", r.depth},
                    {"used_pages", b.used},
                    {"limit_pages", b.limit},
                    {"own_pages", b.ownPages},
                    {"objects", b.objects},
                    {"caps", b.caps},
                    {"owner_pid", owner ? Json(owner->pid) : Json(nullptr)}});
  }
  return dump(Json{{"page_bytes", kernel::PAGE_BYTES}, {"banks", std::move(list)}});
}

std::string capsTable(caps::ProcessId pid, std::span<const caps::CapEntry> entries) {
  Table t({"SLOT", "GEN", "TYPE", "RIGHTS", "BADGE", "OBJECT", "DERIVED FROM"},
          {Table::RIGHT, Table::RIGHT, Table::LEFT, Table::LEFT, Table::RIGHT, Table::RIGHT,
           Table::LEFT});
  for (const caps::CapEntry& e : entries) {
    std::string parent = "-";
    if (e.parentHandle != 0) {
      parent = "slot " + num(static_cast<uint32_t>(e.parentHandle));
      if (e.parentPid != pid) parent = "pid " + num(e.parentPid) + " " + parent;
    }
    t.add({num(static_cast<uint32_t>(e.handle)), num(e.handle >> 32),
           kernel::objectTypeName(e.type), rightsLetters(e.rights), num(e.badge), num(e.koid),
           parent});
  }
  return "process " + num(pid) + ": " + num(entries.size()) + " caps\n" + t.render();
}

std::string capsJson(caps::ProcessId pid, std::span<const caps::CapEntry> entries) {
  Json list = Json::array();
  for (const caps::CapEntry& e : entries) {
    const bool derived = e.parentHandle != 0;
    list.push_back({{"slot", static_cast<uint32_t>(e.handle)},
                    {"generation", static_cast<uint32_t>(e.handle >> 32)},
                    {"handle", e.handle},
                    {"type", kernel::objectTypeName(e.type)},
                    {"rights", rightNames(e.rights)},
                    {"rights_mask", static_cast<uint32_t>(e.rights)},
                    {"badge", e.badge},
                    {"object", e.koid},
                    {"parent_pid", derived ? Json(e.parentPid) : Json(nullptr)},
                    {"parent_handle", derived ? Json(e.parentHandle) : Json(nullptr)}});
  }
  return dump(Json{{"pid", pid}, {"caps", std::move(list)}});
}

}  // namespace agate::tools
