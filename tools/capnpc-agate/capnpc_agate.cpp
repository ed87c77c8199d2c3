// capnpc-agate: a Cap'n Proto compiler plugin that turns the interfaces of a .capnp file into
// Agate typed RPC stubs.
//
//   capnp compile -oc++ -o/path/to/capnpc-agate calc.capnp   # writes calc.capnp.h/.c++,
//   calc.agate.h
//
// For `calc.capnp` it writes `calc.agate.h`, which includes capnpc-c++'s `calc.capnp.h` (the
// param and result structs) and declares, in namespace `<the file's $Cxx.namespace>::stubs`, one
// struct per interface (nested interfaces nest) holding:
//   * INTERFACE_ID and METHOD_<NAME> ids taken from the schema (interface id, method ordinal);
//   * per method: FooParams/FooResults (aliases of capnpc-c++'s types), FooRequest, FooPromise
//     (awaitable, with a pipelined getter per capability field of the results, and per struct
//     or group field leading to one: a pipeline class nested in FooPromise per such struct
//     type), FooResponse and FooContext;
//   * Client: wraps an rpc::RemoteCap; foo(build), foo(), fooRequest() for every method of the
//     interface and of those it extends, and conversions to the clients of its superclasses.
//     A method whose results can hold no capability (no interface or AnyPointer field, list or
//     struct holding one, transitively through structs, groups and unions) is called with
//     Request::noPipelining(): there is nothing to pipeline on, and its Return needs no Finish;
//   * Server: a ServerObject with one virtual method per method (default: UNSUPPORTED) and a
//     generated dispatch() switching on (interface id, method id), superclasses included.
// And, in the file's own namespace (so argument-dependent lookup finds them), a setFoo(sink,
// builder, cap) / getFoo(source, reader) pair for every capability-typed field of every struct of
// the file, which moves capabilities through the engine's cap tables (cap_pointer.h).
//
// The plugin refuses what the stubs cannot express, with a message naming the declaration and a
// non-zero exit: generic interfaces and methods, branded superclasses or capability types, and
// method names that collide within an interface's inheritance or with the generated members.
//
// The generator is a batch tool: it reads one CodeGeneratorRequest from stdin (capnp compile
// runs it in the output directory) and writes one header per requested file.
#include <capnp/schema-loader.h>
#include <capnp/schema.capnp.h>
#include <capnp/serialize.h>
#include <kj/exception.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace {

namespace schema = capnp::schema;

constexpr uint64_t CXX_NAMESPACE_ANNOTATION = 0xb9c6f99ebf805f2cull;  // $Cxx.namespace
constexpr uint64_t CXX_NAME_ANNOTATION = 0xf264a779fef191ceull;       // $Cxx.name

// Names the generated members take, and C++ keywords; interface methods may not use them.
bool isReservedMethodName(const std::string& name) {
  for (const char* reserved : {"dispatch",  "dispatchInterface",
                               "cap",       "isNull",
                               "untyped",   "alignas",
                               "alignof",   "and",
                               "asm",       "auto",
                               "bool",      "break",
                               "case",      "catch",
                               "char",      "class",
                               "concept",   "const",
                               "consteval", "constexpr",
                               "constinit", "continue",
                               "co_await",  "co_return",
                               "co_yield",  "decltype",
                               "default",   "delete",
                               "do",        "double",
                               "else",      "enum",
                               "explicit",  "export",
                               "extern",    "false",
                               "float",     "for",
                               "friend",    "goto",
                               "if",        "inline",
                               "int",       "long",
                               "mutable",   "namespace",
                               "new",       "noexcept",
                               "not",       "nullptr",
                               "operator",  "or",
                               "private",   "protected",
                               "public",    "register",
                               "requires",  "return",
                               "short",     "signed",
                               "sizeof",    "static",
                               "switch",    "template",
                               "this",      "throw",
                               "true",      "try",
                               "typedef",   "typeid",
                               "typename",  "union",
                               "unsigned",  "using",
                               "virtual",   "void",
                               "volatile",  "while",
                               "xor"})
    if (name == reserved) return true;
  return false;
}

std::string capitalize(std::string s) {
  if (!s.empty() && s[0] >= 'a' && s[0] <= 'z') s[0] = static_cast<char>(s[0] - 'a' + 'A');
  return s;
}

std::string upperSnake(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    char c = s[i];
    if (c >= 'A' && c <= 'Z' && i > 0) out += '_';
    out += static_cast<char>(c >= 'a' && c <= 'z' ? c - 'a' + 'A' : c);
  }
  return out;
}

std::string hexId(uint64_t id) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%016llxull", static_cast<unsigned long long>(id));
  return buf;
}

template <class Annotated>
std::string annotationText(Annotated node, uint64_t annotationId) {
  for (schema::Annotation::Reader a : node.getAnnotations()) {
    if (a.getId() == annotationId && a.getValue().isText()) return a.getValue().getText();
  }
  return "";
}

// A capability-typed field of some struct of the file, with what its accessors need.
struct CapField {
  uint64_t structId;
  std::string fieldName;
  uint64_t interfaceId;
  bool isList;  // List(I): accessors take the element's index
  uint16_t pointerIndex;
  bool inUnion;
  uint32_t discriminantOffset;
  uint16_t discriminantValue;
};

class Generator {
 public:
  explicit Generator(schema::CodeGeneratorRequest::Reader request) : request_(request) {}

  // Generates every requested file; false (after printing each error) when any was refused.
  bool run() {
    for (schema::Node::Reader node : request_.getNodes()) {
      nodes_.emplace(node.getId(), node);
      loader_.load(node);  // validates the node (throws kj::Exception on a malformed request)
    }
    for (schema::Node::Reader node : request_.getNodes()) {
      if (!node.isFile()) continue;
      std::string ns = annotationText(node, CXX_NAMESPACE_ANNOTATION);
      fileNs_[node.getId()] = ns.empty() ? "" : "::" + ns;
      for (schema::Node::NestedNode::Reader nested : node.getNestedNodes())
        nameNode(nested.getId(), nested.getName(), node.getId(), node.getId());
    }
    bool ok = true;
    for (schema::CodeGeneratorRequest::RequestedFile::Reader file : request_.getRequestedFiles())
      ok = generateFile(file) && ok;
    return ok;
  }

 private:
  // --- names ---

  void nameNode(uint64_t id, std::string name, uint64_t parent, uint64_t file) {
    auto it = nodes_.find(id);
    if (it == nodes_.end() || local_.count(id) != 0) return;
    schema::Node::Reader node = it->second;
    std::string renamed = annotationText(node, CXX_NAME_ANNOTATION);
    if (!renamed.empty()) name = renamed;
    const bool topLevel = parent == file;
    local_[id] = topLevel ? name : local_[parent] + "::" + name;
    parent_[id] = parent;
    file_[id] = file;
    order_.push_back(id);
    for (schema::Node::NestedNode::Reader nested : node.getNestedNodes())
      nameNode(nested.getId(), nested.getName(), id, file);
    if (node.isStruct()) {
      for (schema::Field::Reader field : node.getStruct().getFields()) {
        if (!field.isGroup()) continue;
        std::string groupName = annotationText(field, CXX_NAME_ANNOTATION);
        if (groupName.empty()) groupName = capitalize(field.getName());
        nameNode(field.getGroup().getTypeId(), groupName, id, file);
      }
    }
    if (node.isInterface()) {
      for (schema::Method::Reader method : node.getInterface().getMethods()) {
        for (auto [structId, suffix] : {std::pair{method.getParamStructType(), "Params"},
                                        std::pair{method.getResultStructType(), "Results"}}) {
          auto s = nodes_.find(structId);
          // An implicit struct (`foo (a :T)`) has no scope; capnpc-c++ names it FooParams.
          if (s != nodes_.end() && s->second.getScopeId() == 0)
            nameNode(structId, capitalize(method.getName()) + suffix, id, file);
        }
      }
    }
  }

  // The C++ type capnpc-c++ generates for a node.
  std::string cxxType(uint64_t id) { return fileNs_[file_[id]] + "::" + local_[id]; }
  // The generated stub scope for an interface (or a scope holding one).
  std::string stubNs(uint64_t file) { return fileNs_[file] + "::stubs"; }
  std::string stubType(uint64_t id) { return stubNs(file_[id]) + "::" + local_[id]; }
  std::string displayName(uint64_t id) { return nodes_.at(id).getDisplayName(); }

  void refuse(uint64_t id, const std::string& why) {
    errors_.push_back(std::string(nodes_.count(id) ? displayName(id) : hexId(id)) + ": " + why);
  }

  // --- checks ---

  // Every method the client of `iface` offers: its superclasses' (transitively, once each) then
  // its own, as (declaring interface, method ordinal).
  void collectAncestors(uint64_t iface, std::vector<uint64_t>& out) {
    for (schema::Superclass::Reader super : nodes_.at(iface).getInterface().getSuperclasses()) {
      if (std::find(out.begin(), out.end(), super.getId()) != out.end()) continue;
      collectAncestors(super.getId(), out);
      if (std::find(out.begin(), out.end(), super.getId()) == out.end())
        out.push_back(super.getId());
    }
  }

  bool isBranded(schema::Brand::Reader brand) { return brand.getScopes().size() != 0; }

  void checkInterface(uint64_t id) {
    schema::Node::Reader node = nodes_.at(id);
    if (node.getIsGeneric()) {
      refuse(id,
             "generic interfaces are not supported by Agate stubs (declare it without type "
             "parameters)");
      return;
    }
    for (schema::Superclass::Reader super : node.getInterface().getSuperclasses()) {
      if (isBranded(super.getBrand()) || nodes_.at(super.getId()).getIsGeneric())
        refuse(id, "extends a generic interface, which Agate stubs do not support");
    }
    std::vector<uint64_t> lineage;
    collectAncestors(id, lineage);
    lineage.push_back(id);
    std::map<std::string, uint64_t> seen;
    for (uint64_t owner : lineage) {
      for (schema::Method::Reader method : nodes_.at(owner).getInterface().getMethods()) {
        std::string name = method.getName();
        if (owner == id) {
          if (method.getImplicitParameters().size() != 0)
            refuse(id, "method '" + name + "' is generic, which Agate stubs do not support");
          if (isBranded(method.getParamBrand()) || isBranded(method.getResultBrand()))
            refuse(id, "method '" + name +
                           "' uses a generic param or result struct, which "
                           "Agate stubs do not support");
          if (isReservedMethodName(name))
            refuse(id, "method '" + name +
                           "' collides with a C++ keyword or a member the stubs generate");
        }
        auto [it, fresh] = seen.emplace(name, owner);
        if (!fresh && it->second != owner)
          refuse(id, "method '" + name + "' is declared by both " + displayName(it->second) +
                         " and " + displayName(owner) + "; a client could not tell them apart");
      }
    }
    // The client offers fooRequest() beside foo(): a method named like another's request form
    // would collide with it.
    for (const auto& [name, owner] : seen) {
      if (seen.count(name + "Request") != 0)
        refuse(id, "methods '" + name + "' and '" + name +
                       "Request' collide: the client names the request form of '" + name + "' so");
    }
  }

  // --- generation ---

  // The name under which `file` imports the file `id` ("" when it does not import it directly).
  static std::string importName(schema::CodeGeneratorRequest::RequestedFile::Reader file,
                                uint64_t id) {
    for (auto imp : file.getImports())
      if (imp.getId() == id) return imp.getName();
    return "";
  }

  bool generateFile(schema::CodeGeneratorRequest::RequestedFile::Reader file) {
    const uint64_t fileId = file.getId();
    const size_t errorsBefore = errors_.size();
    std::vector<uint64_t> interfaces;
    for (uint64_t id : order_) {
      if (file_[id] == fileId && nodes_.at(id).isInterface()) interfaces.push_back(id);
    }
    for (uint64_t id : interfaces) checkInterface(id);
    std::vector<CapField> capFields = collectCapFields(fileId);

    // Headers of other files whose interfaces this one names.
    std::set<uint64_t> foreignFiles;
    for (uint64_t id : interfaces) {
      std::vector<uint64_t> lineage;
      collectAncestors(id, lineage);
      for (uint64_t a : lineage)
        if (file_[a] != fileId) foreignFiles.insert(file_[a]);
    }
    for (const CapField& f : capFields)
      if (file_[f.interfaceId] != fileId) foreignFiles.insert(file_[f.interfaceId]);
    // Interfaces the pipelines of nested structs reach (their structs may be another file's):
    // those of files imported directly are included; so are, through them, the files their
    // headers include in turn (visibleThrough). A getter for an interface of a file neither
    // brings is not generated (pipelineReachable).
    for (uint64_t id : interfaces)
      for (schema::Method::Reader m : nodes_.at(id).getInterface().getMethods())
        for (const auto& [typeId, name] : pipelineClasses(m.getResultStructType()))
          for (const CapField& f : resultCapFields(typeId)) {
            const uint64_t home = file_[f.interfaceId];
            if (!importName(file, home).empty()) foreignFiles.insert(home);
          }
    pipelineFiles_ = visibleThrough(fileId, foreignFiles);
    std::vector<std::string> includes;
    for (uint64_t foreign : foreignFiles) {
      const std::string name = importName(file, foreign);
      if (name.empty()) {
        errors_.push_back(std::string(file.getFilename()) + ": names interfaces of " +
                          displayName(foreign) + ", which it does not import directly");
        continue;
      }
      std::string base = name.substr(0, name.rfind(".capnp"));
      includes.push_back(base[0] == '/' ? "<" + base.substr(1) + ".agate.h>"
                                        : "\"" + base + ".agate.h\"");
    }
    if (errors_.size() != errorsBefore) return false;
    // The Cap'n Proto headers of other files whose structs are params or results here: this
    // file's .capnp.h does not always include them (a streaming method's `-> stream` results
    // are capnp::StreamResult, from capnp/stream.capnp, which capnpc-c++ leaves out).
    std::set<uint64_t> structFiles;
    for (uint64_t id : interfaces) {
      for (schema::Method::Reader m : nodes_.at(id).getInterface().getMethods())
        for (uint64_t s : {m.getParamStructType(), m.getResultStructType()})
          if (file_.count(s) != 0 && file_[s] != fileId) structFiles.insert(file_[s]);
    }
    for (uint64_t foreign : structFiles) {
      std::string name = importName(file, foreign);
      if (name.empty()) name = "/" + std::string(nodes_.at(foreign).getDisplayName());
      std::string header = name[0] == '/' ? "<" + name.substr(1) + ".h>" : "\"" + name + ".h\"";
      if (std::find(includes.begin(), includes.end(), header) == includes.end())
        includes.push_back(header);
    }

    std::string filename = file.getFilename();
    std::string stem = filename.substr(0, filename.rfind(".capnp"));
    std::string base = std::filesystem::path(stem).filename().string();

    std::ostringstream out;
    out << "// Generated by capnpc-agate from " << filename << ". Do not edit.\n"
        << "// Typed Agate RPC stubs: docs/typed_stubs.md describes the generated API.\n"
        << "#pragma once\n\n"
        << "#include \"agate/rpc/typed.h\"\n"
        << "#include \"" << base << ".capnp.h\"\n";
    for (const std::string& inc : includes) out << "#include " << inc << "\n";
    out << "\n";

    if (!interfaces.empty()) {
      std::string ns = stubNs(fileId).substr(2);
      out << "namespace " << ns << " {\n\n";
      emitScopes(out, fileId, interfaces);
      for (uint64_t id : topologicalOrder(interfaces, fileId)) emitClasses(out, id);
      for (uint64_t id : interfaces) emitDefinitions(out, id);
      out << "}  // namespace " << ns << "\n";
    }
    if (!capFields.empty()) emitCapAccessors(out, fileId, capFields);

    std::filesystem::path path = stem + ".agate.h";
    if (path.has_parent_path()) std::filesystem::create_directories(path.parent_path());
    std::ofstream stream(path);
    stream << out.str();
    stream.close();
    if (!stream) {
      errors_.push_back("cannot write " + path.string());
      return false;
    }
    return true;
  }

  std::vector<CapField> collectCapFields(uint64_t fileId) {
    std::vector<CapField> fields;
    for (uint64_t id : order_) {
      schema::Node::Reader node = nodes_.at(id);
      if (file_[id] != fileId || !node.isStruct()) continue;
      for (schema::Field::Reader field : node.getStruct().getFields()) {
        if (!field.isSlot()) continue;
        schema::Type::Reader fieldType = field.getSlot().getType();
        const bool isList =
            fieldType.isList() && fieldType.getList().getElementType().isInterface();
        if (isList) fieldType = fieldType.getList().getElementType();
        if (!fieldType.isInterface()) continue;
        auto type = fieldType.getInterface();
        if (node.getIsGeneric() || isBranded(type.getBrand()) ||
            nodes_.at(type.getTypeId()).getIsGeneric()) {
          refuse(id, "field '" + std::string(field.getName()) +
                         "' is a capability in a generic context, which Agate stubs do not "
                         "support");
          continue;
        }
        const bool inUnion = field.getDiscriminantValue() != schema::Field::NO_DISCRIMINANT;
        fields.push_back(CapField{id, field.getName(), type.getTypeId(), isList,
                                  static_cast<uint16_t>(field.getSlot().getOffset()), inUnion,
                                  node.getStruct().getDiscriminantOffset(),
                                  field.getDiscriminantValue()});
      }
    }
    return fields;
  }

  // The files whose stub headers the header of file `g` includes whatever it imports: those of
  // its interfaces' ancestors and of its structs' capability fields (generateFile includes each,
  // or fails). A subset of what it includes (not the files only its own pipelines reach):
  // enough to know what including it brings. Fields in generic contexts, which generateFile
  // refuses, are passed over.
  std::set<uint64_t> headersIncludedBy(uint64_t g) {
    std::set<uint64_t> out;
    for (uint64_t id : order_) {
      if (file_[id] != g) continue;
      schema::Node::Reader node = nodes_.at(id);
      if (node.isInterface()) {
        std::vector<uint64_t> lineage;
        collectAncestors(id, lineage);
        for (uint64_t a : lineage)
          if (file_[a] != g) out.insert(file_[a]);
        continue;
      }
      if (!node.isStruct() || node.getIsGeneric()) continue;
      for (schema::Field::Reader field : node.getStruct().getFields()) {
        if (!field.isSlot()) continue;
        schema::Type::Reader type = field.getSlot().getType();
        if (type.isList()) type = type.getList().getElementType();
        if (!type.isInterface() || isBranded(type.getInterface().getBrand())) continue;
        const uint64_t iface = type.getInterface().getTypeId();
        if (file_.count(iface) != 0 && file_[iface] != g) out.insert(file_[iface]);
      }
    }
    return out;
  }

  // File `fileId` and every file whose stubs its header brings in: the headers it includes
  // (`included`), and theirs in turn.
  std::set<uint64_t> visibleThrough(uint64_t fileId, const std::set<uint64_t>& included) {
    std::set<uint64_t> visible = {fileId};
    std::vector<uint64_t> next(included.begin(), included.end());
    while (!next.empty()) {
      const uint64_t g = next.back();
      next.pop_back();
      if (!visible.insert(g).second) continue;
      for (uint64_t h : headersIncludedBy(g)) next.push_back(h);
    }
    return visible;
  }

  // Interfaces of this file with their in-file superclasses first (servers derive from them).
  std::vector<uint64_t> topologicalOrder(const std::vector<uint64_t>& interfaces, uint64_t fileId) {
    std::vector<uint64_t> sorted;
    std::set<uint64_t> done;
    auto visit = [&](auto& self, uint64_t id) -> void {
      if (!done.insert(id).second) return;
      for (schema::Superclass::Reader super : nodes_.at(id).getInterface().getSuperclasses())
        if (file_[super.getId()] == fileId) self(self, super.getId());
      sorted.push_back(id);
    };
    for (uint64_t id : interfaces) visit(visit, id);
    return sorted;
  }

  // Phase 1: the stub structs (ids, aliases, forward declarations), parents before children.
  void emitScopes(std::ostringstream& out, uint64_t fileId, const std::vector<uint64_t>& ifaces) {
    std::set<uint64_t> scopes;
    for (uint64_t id : ifaces)
      for (uint64_t s = id; s != fileId; s = parent_[s]) scopes.insert(s);
    for (uint64_t id : order_) {
      if (scopes.count(id) == 0) continue;
      schema::Node::Reader node = nodes_.at(id);
      out << "struct " << local_[id] << " {\n";
      if (node.isInterface()) {
        out << "  // " << displayName(id) << "\n"
            << "  static constexpr uint64_t INTERFACE_ID = " << hexId(id) << ";\n";
        // The method id on the wire is the method's ordinal (@N), its index in the list.
        uint32_t ordinal = 0;
        for (schema::Method::Reader m : node.getInterface().getMethods()) {
          out << "  static constexpr uint16_t METHOD_" << upperSnake(m.getName()) << " = "
              << ordinal++ << ";\n";
        }
        for (schema::Method::Reader m : node.getInterface().getMethods()) {
          std::string cap = capitalize(m.getName());
          out << "\n  using " << cap << "Params = " << cxxType(m.getParamStructType()) << ";\n"
              << "  using " << cap << "Results = " << cxxType(m.getResultStructType()) << ";\n"
              << "  class " << cap << "Promise;\n"
              << "  using " << cap << "Request = ::agate::rpc::typed::TypedRequest<" << cap
              << "Params, " << cap << "Promise>;\n"
              << "  using " << cap << "Response = ::agate::rpc::typed::TypedResponse<" << cap
              << "Results>;\n"
              << "  using " << cap << "Context = ::agate::rpc::typed::TypedContext<" << cap
              << "Params, " << cap << "Results>;\n";
        }
        out << "\n  class Client;\n  class Server;\n";
      }
      for (schema::Node::NestedNode::Reader nested : node.getNestedNodes())
        if (scopes.count(nested.getId()) != 0)
          out << "  struct " << local_[nested.getId()].substr(local_[id].size() + 2) << ";\n";
      out << "};\n\n";
    }
  }

  // Methods offered by the client of `id`: (declaring interface, method), superclasses first.
  std::vector<std::pair<uint64_t, schema::Method::Reader>> clientMethods(uint64_t id) {
    std::vector<uint64_t> lineage;
    collectAncestors(id, lineage);
    lineage.push_back(id);
    std::vector<std::pair<uint64_t, schema::Method::Reader>> methods;
    for (uint64_t owner : lineage)
      for (schema::Method::Reader m : nodes_.at(owner).getInterface().getMethods())
        methods.emplace_back(owner, m);
    return methods;
  }

  // Whether a value of struct `id` can hold a capability: whether a search through its fields
  // (groups and union members included, into structs and lists of any depth) reaches an
  // interface or any AnyPointer (it may be one, or a struct or list holding one). An unknown
  // struct counts as holding one. Each struct is searched once per question, so recursive and
  // mutually recursive types end; only the answer for the struct asked about is remembered (a
  // "no" found for a struct met inside another search may depend on a struct still being
  // searched, so it is not final).
  bool structCanHoldCaps(uint64_t id) {
    auto known = holdsCaps_.find(id);
    if (known != holdsCaps_.end()) return known->second;
    std::set<uint64_t> seen;
    const bool holds = reachesCaps(id, seen);
    holdsCaps_[id] = holds;
    return holds;
  }
  bool reachesCaps(uint64_t id, std::set<uint64_t>& seen) {
    auto known = holdsCaps_.find(id);
    if (known != holdsCaps_.end()) return known->second;  // a final answer
    if (!seen.insert(id).second) return false;            // already being searched
    auto it = nodes_.find(id);
    if (it == nodes_.end() || !it->second.isStruct()) return true;
    for (schema::Field::Reader field : it->second.getStruct().getFields()) {
      const bool holds = field.isGroup() ? reachesCaps(field.getGroup().getTypeId(), seen)
                                         : typeReachesCaps(field.getSlot().getType(), seen);
      if (holds) return true;
    }
    return false;
  }
  bool typeReachesCaps(schema::Type::Reader type, std::set<uint64_t>& seen) {
    switch (type.which()) {
      case schema::Type::INTERFACE:
      case schema::Type::ANY_POINTER:
        return true;
      case schema::Type::LIST:
        return typeReachesCaps(type.getList().getElementType(), seen);
      case schema::Type::STRUCT:
        return reachesCaps(type.getStruct().getTypeId(), seen);
      default:
        return false;
    }
  }

  std::vector<CapField> resultCapFields(uint64_t structId) {
    std::vector<CapField> fields;
    schema::Node::Reader node = nodes_.at(structId);
    for (schema::Field::Reader field : node.getStruct().getFields()) {
      if (!field.isSlot() || !field.getSlot().getType().isInterface()) continue;
      fields.push_back(CapField{structId, field.getName(),
                                field.getSlot().getType().getInterface().getTypeId(), false,
                                static_cast<uint16_t>(field.getSlot().getOffset()), false, 0, 0});
    }
    return fields;
  }

  // Pipelining reaches a capability through struct and group fields only (a list element is no
  // step of a pipelined path): whether struct (or group) `id` holds an interface field that way.
  bool pipelineReaches(uint64_t id, std::set<uint64_t>& seen) {
    if (!seen.insert(id).second) return false;  // met again inside its own search
    auto it = nodes_.find(id);
    if (it == nodes_.end() || !it->second.isStruct()) return false;
    for (schema::Field::Reader field : it->second.getStruct().getFields()) {
      if (field.isGroup()) {
        if (pipelineReaches(field.getGroup().getTypeId(), seen)) return true;
        continue;
      }
      schema::Type::Reader type = field.getSlot().getType();
      if (type.isInterface()) return true;
      if (type.isStruct() && pipelineReaches(type.getStruct().getTypeId(), seen)) return true;
    }
    return false;
  }
  bool pipelineReaches(uint64_t id) {
    std::set<uint64_t> seen;
    return pipelineReaches(id, seen);
  }

  // A struct or group field of a struct through which a capability can be pipelined.
  struct PipelineField {
    std::string fieldName;
    uint64_t typeId;
    bool isGroup;           // a group's fields lie in its parent: the path takes no step
    uint16_t pointerIndex;  // a struct field's pointer
  };
  std::vector<PipelineField> pipelineFields(uint64_t structId) {
    std::vector<PipelineField> fields;
    for (schema::Field::Reader field : nodes_.at(structId).getStruct().getFields()) {
      if (field.isGroup()) {
        if (pipelineReaches(field.getGroup().getTypeId()))
          fields.push_back({field.getName(), field.getGroup().getTypeId(), true, 0});
        continue;
      }
      schema::Type::Reader type = field.getSlot().getType();
      if (type.isStruct() && pipelineReaches(type.getStruct().getTypeId()))
        fields.push_back({field.getName(), type.getStruct().getTypeId(), false,
                          static_cast<uint16_t>(field.getSlot().getOffset())});
    }
    return fields;
  }

  // The pipeline classes a method's promise nests, one per struct or group type its results
  // reach capabilities through, named after the type's scope with every other character than a
  // letter or digit as an underscore, then "Pipeline" (`Outer.Inner` -> Outer_InnerPipeline;
  // numbered if two types would share a name).
  std::vector<std::pair<uint64_t, std::string>> pipelineClasses(uint64_t resultsId) {
    std::vector<std::pair<uint64_t, std::string>> classes;
    std::set<std::string> names;
    // The results type itself gets a class too when a field leads back to it.
    std::vector<uint64_t> todo{resultsId};
    std::set<uint64_t> seen;
    while (!todo.empty()) {
      const uint64_t id = todo.back();
      todo.pop_back();
      for (const PipelineField& f : pipelineFields(id)) {
        if (!seen.insert(f.typeId).second) continue;
        todo.push_back(f.typeId);
        std::string full = displayName(f.typeId);
        std::string name = full.substr(full.rfind(':') + 1);
        for (char& c : name)  // `.` between scopes, `$` in a method's implicit param struct
          if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
        const std::string base = capitalize(name) + "Pipeline";
        name = base;
        for (int n = 2; !names.insert(name).second; ++n) name = base + std::to_string(n);
        classes.emplace_back(f.typeId, name);
      }
    }
    return classes;
  }
  // Whether a nested pipeline's getter may name interface `id`: its stubs are this file's or
  // those of a file it includes.
  bool pipelineReachable(uint64_t id) { return pipelineFiles_.count(file_[id]) != 0; }
  static const std::string& classOf(const std::vector<std::pair<uint64_t, std::string>>& classes,
                                    uint64_t typeId) {
    for (const auto& [id, name] : classes)
      if (id == typeId) return name;
    static const std::string none;
    return none;
  }

  // Phase 2: the promise, client and server classes of one interface (members declared only).
  void emitClasses(std::ostringstream& out, uint64_t id) {
    const std::string q = stubType(id);
    schema::Node::Reader node = nodes_.at(id);
    for (schema::Method::Reader m : node.getInterface().getMethods()) {
      std::string cap = capitalize(m.getName());
      out << "class " << local_[id] << "::" << cap
          << "Promise : public ::agate::rpc::typed::TypedPromise<" << q << "::" << cap
          << "Results> {\n public:\n  using TypedPromise::TypedPromise;\n";
      const auto classes = pipelineClasses(m.getResultStructType());
      for (const auto& [typeId, name] : classes) out << "  class " << name << ";\n";
      for (const CapField& f : resultCapFields(m.getResultStructType())) {
        out << "  // The results' `" << f.fieldName
            << "`, pipelined: calls on it go out before the results arrive.\n"
            << "  " << stubType(f.interfaceId) << "::Client get" << capitalize(f.fieldName)
            << "() const;\n";
      }
      for (const PipelineField& f : pipelineFields(m.getResultStructType())) {
        out << "  // The results' `" << f.fieldName
            << "`, pipelined: the capabilities inside it can be called before the results "
               "arrive.\n"
            << "  " << classOf(classes, f.typeId) << " get" << capitalize(f.fieldName)
            << "() const;\n";
      }
      out << "};\n\n";
      for (const auto& [typeId, name] : classes) {
        out << "// " << displayName(typeId) << " inside the results of " << local_[id] << "."
            << std::string(m.getName()) << ", pipelined.\n"
            << "class " << local_[id] << "::" << cap << "Promise::" << name << " {\n public:\n"
            << "  explicit " << name
            << "(::agate::rpc::RemoteCap at) noexcept : at_(std::move(at)) {}\n";
        for (const CapField& f : resultCapFields(typeId))
          if (pipelineReachable(f.interfaceId))
            out << "  " << stubType(f.interfaceId) << "::Client get" << capitalize(f.fieldName)
                << "() const;\n";
        for (const PipelineField& f : pipelineFields(typeId))
          out << "  " << classOf(classes, f.typeId) << " get" << capitalize(f.fieldName)
              << "() const;\n";
        out << "\n private:\n  ::agate::rpc::RemoteCap at_;  // where the struct lies in the "
               "results\n};\n\n";
      }
    }

    std::vector<uint64_t> ancestors;
    collectAncestors(id, ancestors);
    out << "// A reference to a remote " << displayName(id)
        << ". Copyable (each copy is a counted reference).\n"
        << "class " << local_[id] << "::Client {\n public:\n"
        << "  Client() = default;\n"
        << "  explicit Client(::agate::rpc::RemoteCap cap) noexcept : cap_(std::move(cap)) {}\n"
        << "  const ::agate::rpc::RemoteCap& cap() const noexcept { return cap_; }\n"
        << "  bool isNull() const noexcept { return cap_.isNull(); }\n";
    for (uint64_t a : ancestors) out << "  operator " << stubType(a) << "::Client() const;\n";
    for (auto& [owner, m] : clientMethods(id)) {
      std::string cap = capitalize(m.getName());
      std::string t = stubType(owner) + "::" + cap;
      out << "\n  // " << displayName(owner) << "." << std::string(m.getName()) << "\n"
          << "  " << t << "Request " << std::string(m.getName())
          << "Request(size_t sizeHint = ::agate::rpc::typed::defaultSizeHint<" << t
          << "Params>()) const;\n"
          << "  " << t << "Promise " << std::string(m.getName()) << "() const;\n"
          << "  template <class Build>\n"
          << "  " << t << "Promise " << std::string(m.getName())
          << "(Build&& build, size_t sizeHint = ::agate::rpc::typed::defaultSizeHint<" << t
          << "Params>()) const;\n";
    }
    out << "\n private:\n  ::agate::rpc::RemoteCap cap_;\n};\n\n";

    out << "// Implements " << displayName(id)
        << ": override the methods it serves (the others answer UNSUPPORTED).\n"
        << "class " << local_[id] << "::Server : ";
    capnp::List<schema::Superclass>::Reader supers = node.getInterface().getSuperclasses();
    if (supers.size() == 0) {
      out << "public virtual ::agate::rpc::ServerObject";
    } else {
      for (uint32_t i = 0; i < supers.size(); ++i)
        out << (i ? ", " : "") << "public virtual " << stubType(supers[i].getId()) << "::Server";
    }
    out << " {\n public:\n";
    for (schema::Method::Reader m : node.getInterface().getMethods()) {
      std::string cap = capitalize(m.getName());
      out << "  using " << cap << "Context = " << q << "::" << cap << "Context;\n";
    }
    for (schema::Method::Reader m : node.getInterface().getMethods()) {
      out << "  virtual ::agate::Promise<void> " << std::string(m.getName()) << "("
          << capitalize(m.getName()) << "Context context);\n";
    }
    out << "  ::agate::Promise<void> dispatch(uint64_t interfaceId, uint16_t methodId,\n"
        << "                                  ::agate::rpc::CallContext& context) override;\n\n"
        << " protected:\n"
        << "  ::agate::Promise<void> dispatchInterface(uint16_t methodId,\n"
        << "                                           ::agate::rpc::CallContext& context);\n"
        << "};\n\n";
  }

  // Phase 3: member definitions (all classes are complete here).
  void emitDefinitions(std::ostringstream& out, uint64_t id) {
    // Declarators are relative to the stubs namespace being emitted: a fully qualified one
    // (`::a::B`) right after a qualified return type would parse as one nested name.
    const std::string q = local_[id];
    schema::Node::Reader node = nodes_.at(id);
    for (schema::Method::Reader m : node.getInterface().getMethods()) {
      std::string cap = capitalize(m.getName());
      for (const CapField& f : resultCapFields(m.getResultStructType())) {
        out << "inline " << stubType(f.interfaceId) << "::Client " << q << "::" << cap
            << "Promise::get" << capitalize(f.fieldName) << "() const {\n"
            << "  return " << stubType(f.interfaceId) << "::Client(pipeline({" << f.pointerIndex
            << "}));\n}\n";
      }
      // Declarators with a trailing return type: the nested class is named in the promise's
      // scope there.
      const auto classes = pipelineClasses(m.getResultStructType());
      const std::string promise = q + "::" + cap + "Promise";
      for (const PipelineField& f : pipelineFields(m.getResultStructType())) {
        const std::string& type = classOf(classes, f.typeId);
        out << "inline auto " << promise << "::get" << capitalize(f.fieldName) << "() const -> "
            << type << " {\n  return " << type << "(pipeline({";
        if (!f.isGroup) out << f.pointerIndex;
        out << "}));\n}\n";
      }
      for (const auto& [typeId, name] : classes) {
        for (const CapField& f : resultCapFields(typeId))
          if (pipelineReachable(f.interfaceId))
            out << "inline auto " << promise << "::" << name << "::get" << capitalize(f.fieldName)
                << "() const -> " << stubType(f.interfaceId) << "::Client {\n  return "
                << stubType(f.interfaceId) << "::Client(at_.pipelineStep(" << f.pointerIndex
                << "));\n}\n";
        for (const PipelineField& f : pipelineFields(typeId)) {
          const std::string& type = classOf(classes, f.typeId);
          out << "inline auto " << promise << "::" << name << "::get" << capitalize(f.fieldName)
              << "() const -> " << type << " {\n  return " << type << "(";
          if (f.isGroup)
            out << "at_";
          else
            out << "at_.pipelineStep(" << f.pointerIndex << ")";
          out << ");\n}\n";
        }
      }
    }
    std::vector<uint64_t> ancestors;
    collectAncestors(id, ancestors);
    for (uint64_t a : ancestors) {
      out << "inline " << q << "::Client::operator " << stubType(a) << "::Client() const {\n"
          << "  return " << stubType(a) << "::Client(cap_);\n}\n";
    }
    for (auto& [owner, m] : clientMethods(id)) {
      std::string name = m.getName();
      std::string t = stubType(owner) + "::" + capitalize(name);
      out << "inline " << t << "Request " << q << "::Client::" << name
          << "Request(size_t sizeHint) const {\n"
          << "  ::agate::rpc::Request request = cap_.newCall(" << stubType(owner)
          << "::INTERFACE_ID, " << stubType(owner) << "::METHOD_" << upperSnake(name)
          << ", sizeHint);\n";
      // Results that can hold no capability leave nothing to pipeline on: the call goes with
      // noPromisePipelining, and its Return needs no Finish.
      if (!structCanHoldCaps(m.getResultStructType()))
        out << "  request.noPipelining();  // the results can hold no capability\n";
      out << "  return " << t << "Request(std::move(request));\n}\n"
          << "inline " << t << "Promise " << q << "::Client::" << name << "() const {\n"
          << "  return " << name << "Request().send();\n}\n"
          << "template <class Build>\n"
          << "inline " << t << "Promise " << q << "::Client::" << name
          << "(Build&& build, size_t sizeHint) const {\n"
          << "  return ::agate::rpc::typed::sendBuilt(" << name << "Request(sizeHint), build);\n"
          << "}\n";
    }
    for (schema::Method::Reader m : node.getInterface().getMethods()) {
      out << "inline ::agate::Promise<void> " << q << "::Server::" << std::string(m.getName())
          << "(" << capitalize(m.getName()) << "Context) {\n"
          << "  return ::agate::rpc::typed::unimplemented(\"" << local_[id] << "."
          << std::string(m.getName()) << " is not implemented by this object\");\n}\n";
    }
    out << "inline ::agate::Promise<void> " << q
        << "::Server::dispatchInterface(uint16_t methodId,\n"
        << "    [[maybe_unused]] ::agate::rpc::CallContext& context) {\n  switch (methodId) {\n";
    for (schema::Method::Reader m : node.getInterface().getMethods()) {
      std::string cap = capitalize(m.getName());
      out << "    case METHOD_" << upperSnake(m.getName()) << ":\n"
          << "      return ::agate::rpc::typed::invoke<" << cap << "Params, " << cap
          << "Results>(*this, &Server::" << std::string(m.getName()) << ", context);\n";
    }
    out << "    default:\n      return ::agate::rpc::typed::unimplemented(\"" << local_[id]
        << " has no method with this id\");\n  }\n}\n";
    out << "inline ::agate::Promise<void> " << q
        << "::Server::dispatch(uint64_t interfaceId, uint16_t methodId,\n"
        << "    ::agate::rpc::CallContext& context) {\n  switch (interfaceId) {\n"
        << "    case INTERFACE_ID:\n      return dispatchInterface(methodId, context);\n";
    for (uint64_t a : ancestors) {
      out << "    case " << stubType(a) << "::INTERFACE_ID:\n      return " << stubType(a)
          << "::Server::dispatchInterface(methodId, context);\n";
    }
    out << "    default:\n      return ::agate::rpc::typed::unimplemented(\"" << local_[id]
        << " does not implement the interface called\");\n  }\n}\n\n";
  }

  // Capability field accessors, in the structs' own namespace.
  void emitCapAccessors(std::ostringstream& out, uint64_t fileId,
                        const std::vector<CapField>& fields) {
    std::string ns = fileNs_[fileId];
    if (!ns.empty()) out << "namespace " << ns.substr(2) << " {\n\n";
    for (const CapField& f : fields) {
      std::string iface = stubType(f.interfaceId);
      std::string s = cxxType(f.structId);
      std::string name = capitalize(f.fieldName);
      std::string tag = f.inUnion ? ", ::agate::rpc::typed::UnionTag{" +
                                        std::to_string(f.discriminantOffset) + ", " +
                                        std::to_string(f.discriminantValue) + "}"
                                  : "";
      // A List(I) field's accessors take the element's index after the struct; the list is
      // sized with the struct's own init.
      const std::string list = f.isList ? "List" : "";
      const std::string element = f.isList ? ", uint32_t element" : "";
      const std::string elementArg = f.isList ? ", element" : "";
      out << "// " << displayName(f.structId) << "." << f.fieldName
          << (f.isList ? " (a list of capabilities)" : "") << "\n"
          << "template <class Sink>\n"
          << "inline ::agate::Status set" << name << "(Sink& sink, " << s << "::Builder s"
          << element << ", ::agate::rpc::typed::CapArg<" << iface << "> cap) {\n"
          << "  return ::agate::rpc::typed::set" << list << "Cap<" << iface
          << ">(sink, std::move(s), " << f.pointerIndex << elementArg << ", std::move(cap)" << tag
          << ");\n}\n"
          << "template <class Source>\n"
          << "inline ::agate::Result<::agate::rpc::typed::Received<" << iface << ">> get" << name
          << "(const Source& source, " << s << "::Reader s" << element << ") {\n"
          << "  return ::agate::rpc::typed::get" << list << "Cap<" << iface
          << ">(source, std::move(s), " << f.pointerIndex << elementArg << tag << ");\n}\n";
    }
    if (!ns.empty()) out << "\n}  // namespace " << ns.substr(2) << "\n";
  }

 public:
  const std::vector<std::string>& errors() const { return errors_; }

 private:
  schema::CodeGeneratorRequest::Reader request_;
  capnp::SchemaLoader loader_;
  std::map<uint64_t, schema::Node::Reader> nodes_;
  std::map<uint64_t, std::string> fileNs_;  // file id -> "::a::b" ("" for the global namespace)
  std::map<uint64_t, std::string> local_;   // node id -> C++ name relative to its namespace
  std::map<uint64_t, uint64_t> parent_;     // node id -> the scope it is declared in
  std::map<uint64_t, uint64_t> file_;       // node id -> its file
  std::map<uint64_t, bool> holdsCaps_;      // struct id -> structCanHoldCaps
  std::set<uint64_t> pipelineFiles_;        // files whose stubs the header being written can name
  std::vector<uint64_t> order_;             // named nodes in declaration order
  std::vector<std::string> errors_;
};

}  // namespace

// Run by hand: capnp compile runs the plugin with no arguments and the request on a pipe.
constexpr const char* USAGE =
    "capnpc-agate: a Cap'n Proto compiler plugin; it reads a CodeGeneratorRequest on stdin.\n"
    "Run it through capnp:\n"
    "  capnp compile -oc++ -o/path/to/capnpc-agate file.capnp   # file.capnp.h/.c++, file.agate.h\n"
    "or, in CMake, agate_generate_rpc(SRCS HDRS file.capnp) (cmake/AgateRpc.cmake).\n"
    "docs/typed_stubs.md describes the generated API.\n";

int main(int argc, char** argv) {
  if (argc > 1 || ::isatty(STDIN_FILENO) == 1) {
    const bool help =
        argc > 1 && (std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0);
    std::fputs(USAGE, help ? stdout : stderr);
    return help ? 0 : 64;
  }
  try {
    capnp::ReaderOptions options;
    options.traversalLimitInWords = 1ull << 30;
    options.nestingLimit = 128;
    capnp::StreamFdMessageReader message(STDIN_FILENO, options);
    Generator generator(message.getRoot<schema::CodeGeneratorRequest>());
    if (generator.run()) return 0;
    for (const std::string& e : generator.errors())
      std::fprintf(stderr, "capnpc-agate: %s\n", e.c_str());
    return 1;
  } catch (const kj::Exception& e) {
    std::fprintf(stderr, "capnpc-agate: cannot read the compiler's request: %s\n",
                 e.getDescription().cStr());
    return 1;
  }
}
