#include "support/report.h"

#include <sys/utsname.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <fstream>
#include <utility>

#include <fmt/format.h>

namespace agate::bench {

MachineInfo MachineInfo::probe() {
  MachineInfo m;
  m.cpus = static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN));
  std::ifstream cpuinfo("/proc/cpuinfo");
  for (std::string line; std::getline(cpuinfo, line);) {
    if (line.rfind("model name", 0) != 0) continue;
    const size_t colon = line.find(':');
    if (colon != std::string::npos && colon + 2 <= line.size()) m.cpuModel = line.substr(colon + 2);
    break;
  }
  utsname u{};
  if (uname(&u) == 0) m.kernel = u.release;
  return m;
}

Report::Report(std::string suite, bool quick, MachineInfo machine)
    : suite_(std::move(suite)), quick_(quick), machine_(std::move(machine)) {}

void Report::add(Figure figure) {
  AGATE_ASSERT(find(figure.name) == nullptr, "figure %s added twice", figure.name.c_str());
  figures_.push_back(std::move(figure));
}

void Report::addLatency(std::string_view scenario, std::string_view name, std::string_view unit,
                        const LatencySummary& summary, std::string_view ratioTo) {
  const std::string base(name);
  const std::pair<const char*, uint64_t> parts[] = {
      {"", summary.median}, {"_p99", summary.p99}, {"_p999", summary.p999}};
  for (const auto& [suffix, value] : parts) {
    add(Figure{.name = base + suffix,
               .value = static_cast<double>(value),
               .unit = std::string(unit),
               .scenario = std::string(scenario),
               .samples = summary.count,
               .ratioTo = ratioTo.empty() ? std::string() : std::string(ratioTo) + suffix});
  }
}

void Report::addPlacement(std::string_view scenario, std::vector<int> cpus) {
  placements_.push_back(Placement{std::string(scenario), std::move(cpus)});
}

void Report::setPinned(int cpuA, int cpuB) { pinned_ = {cpuA, cpuB}; }

void Report::addFailure(std::string_view scenario, const Error& error) {
  char buf[256];
  failures_.push_back(Failure{std::string(scenario), error.describe(buf, sizeof buf)});
}

const Figure* Report::find(std::string_view name) const noexcept {
  for (const Figure& f : figures_) {
    if (f.name == name) return &f;
  }
  return nullptr;
}

std::optional<double> Report::ratioOf(const Figure& figure) const noexcept {
  if (figure.ratioTo.empty()) return std::nullopt;
  const Figure* base = find(figure.ratioTo);
  if (base == nullptr || base->value == 0) return std::nullopt;
  return figure.value / base->value;
}

namespace {

// Thousands separators make 21034567 msgs/s readable at a glance.
std::string humanNumber(double v) {
  if (!std::isfinite(v)) return "-";
  if (std::fabs(v) < 100 && v != std::floor(v)) return fmt::format("{:.2f}", v);
  std::string digits = fmt::format("{:.0f}", v);
  std::string out;
  const size_t lead = digits[0] == '-' ? 1 : 0;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > lead && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

std::string cpuList(const std::vector<int>& cpus) {
  std::string s;
  for (size_t i = 0; i < cpus.size(); ++i) {
    if (i > 0) s += ", ";
    s += cpus[i] < 0 ? std::string("?") : std::to_string(cpus[i]);
  }
  return s;
}

}  // namespace

void Report::printTable(FILE* out) const {
  fmt::print(out, "\nsuite {}{}\n", suite_,
             quick_ ? " (--quick: smoke run, figures are rough)" : "");
  fmt::print(out, "{:<40} {:>16} {:<7} {:>10}  {}\n", "figure", "value", "unit", "samples",
             "ratio");
  fmt::print(out, "{:-<40} {:->16} {:-<7} {:->10}  {:-<24}\n", "", "", "", "", "");
  for (const Figure& f : figures_) {
    std::string ratio;
    if (auto r = ratioOf(f)) ratio = fmt::format("{:.2f}x {}", *r, f.ratioTo);
    fmt::print(out, "{:<40} {:>16} {:<7} {:>10}  {}\n", f.name, humanNumber(f.value), f.unit,
               f.samples == 0 ? std::string("-") : humanNumber(static_cast<double>(f.samples)),
               ratio);
  }
  fmt::print(out, "\nmachine: {} CPUs, {}, kernel {}\n", machine_.cpus, machine_.cpuModel,
             machine_.kernel);
  fmt::print(out, "placement (CPU each party finished on; {}):\n",
             pinned_.empty() ? std::string("nothing pinned")
                             : fmt::format("parties pinned to cpu {}", cpuList(pinned_)));
  for (const Placement& p : placements_) {
    // Two parties on one vCPU take turns through the scheduler: say so beside the figure.
    const bool shared = p.cpus.size() == 2 && p.cpus[0] >= 0 && p.cpus[0] == p.cpus[1];
    fmt::print(out, "  {:<38} cpu {}{}\n", p.scenario, cpuList(p.cpus),
               shared ? "  (same CPU: a busy-polling pair then measures the scheduler)" : "");
  }
  for (const Failure& f : failures_) fmt::print(out, "FAILED {}: {}\n", f.scenario, f.error);
}

std::string jsonString(std::string_view s) {
  std::string out = "\"";
  for (const char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\r':
        out += "\\r";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          out += fmt::format("\\u{:04x}", static_cast<unsigned>(c));
        } else {
          out += c;
        }
    }
  }
  out += '"';
  return out;
}

std::string jsonNumber(double v) {
  if (!std::isfinite(v)) return "null";
  return fmt::format("{}", v);  // shortest representation that reads back exactly
}

std::string Report::toJson() const {
  std::string j = fmt::format("{{\n  \"suite\": {},\n  \"quick\": {},\n", jsonString(suite_),
                              quick_ ? "true" : "false");
  j += fmt::format("  \"machine\": {{\"cpus\": {}, \"cpu_model\": {}, \"kernel\": {}}},\n",
                   machine_.cpus, jsonString(machine_.cpuModel), jsonString(machine_.kernel));
  j += fmt::format("  \"pinned\": {},\n", pinned_.empty()
                                              ? std::string("null")
                                              : fmt::format("[{}, {}]", pinned_[0], pinned_[1]));
  j += "  \"figures\": [";
  for (size_t i = 0; i < figures_.size(); ++i) {
    const Figure& f = figures_[i];
    j += i == 0 ? "\n" : ",\n";
    j += fmt::format("    {{\"name\": {}, \"value\": {}, \"unit\": {}, \"scenario\": {}",
                     jsonString(f.name), jsonNumber(f.value), jsonString(f.unit),
                     jsonString(f.scenario));
    if (f.samples != 0) j += fmt::format(", \"samples\": {}", f.samples);
    if (auto r = ratioOf(f)) {
      j += fmt::format(", \"ratio_to\": {}, \"ratio\": {}", jsonString(f.ratioTo), jsonNumber(*r));
    }
    j += "}";
  }
  j += "\n  ],\n  \"placements\": [";
  for (size_t i = 0; i < placements_.size(); ++i) {
    j += i == 0 ? "\n" : ",\n";
    std::string cpus;
    for (size_t c = 0; c < placements_[i].cpus.size(); ++c) {
      cpus += (c == 0 ? "" : ", ") + std::to_string(placements_[i].cpus[c]);
    }
    j += fmt::format("    {{\"scenario\": {}, \"cpus\": [{}]}}",
                     jsonString(placements_[i].scenario), cpus);
  }
  j += "\n  ],\n  \"failures\": [";
  for (size_t i = 0; i < failures_.size(); ++i) {
    j += i == 0 ? "\n" : ",\n";
    j += fmt::format("    {{\"scenario\": {}, \"error\": {}}}", jsonString(failures_[i].scenario),
                     jsonString(failures_[i].error));
  }
  j += "\n  ]\n}\n";
  return j;
}

Status Report::writeJson(const std::string& path) const {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    if (!out) return Error::fromErrno(errno, "cannot open the JSON output file");
    out << toJson();
    out.flush();
    if (!out) return Error::fromErrno(errno, "cannot write the JSON output file");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    return Error::fromErrno(errno, "cannot rename the JSON output into place");
  }
  return {};
}

}  // namespace agate::bench
