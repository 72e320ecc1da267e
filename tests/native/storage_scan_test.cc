// Native tests for core/storage_scan.h: which storages a data pickle names, without Python.
#include <string>
#include <vector>

#include "check.h"
#include "core/errors.h"
#include "core/storage_scan.h"

namespace {

using fastckpt::scan_storages;

std::string unicode(const std::string& s) {  // BINUNICODE
  const auto n = static_cast<uint32_t>(s.size());
  return std::string("X") + char(n & 0xff) + char((n >> 8) & 0xff) + char((n >> 16) & 0xff) + char(n >> 24) + s;
}

// ('storage', torch.FloatStorage, key, location, 4) as torch.save writes it: the first id
// memoizes 'storage' and its location, later ones fetch them back with BINGET.
std::string storage_id(const std::string& key, const std::string& location, bool first) {
  std::string p = "(";
  p += first ? unicode("storage") + std::string("q\x00", 2) : std::string("h\x00", 2);
  p += "ctorch\nFloatStorage\n" + unicode(key);
  p += first ? unicode(location) + std::string("q\x01", 2) : std::string("h\x01", 2);
  return p + "K\x04tQ";
}

std::vector<fastckpt::StorageRef> scan(const std::string& p) {
  return scan_storages(reinterpret_cast<const uint8_t*>(p.data()), p.size());
}

void finds_each_storage_once_through_the_memo() {
  std::string p = std::string("\x80\x02}", 3);
  p += unicode("a") + storage_id("0", "cuda:0", true) + "s";
  p += unicode("b") + storage_id("1", "", false) + "s";
  p += unicode("c") + storage_id("0", "", false) + "s";  // a view of storage 0
  auto refs = scan(p + ".");
  CHECK(refs.size() == 2);
  CHECK(refs.size() == 2 && refs[0].key == "0" && refs[0].location == "cuda:0");
  CHECK(refs.size() == 2 && refs[1].key == "1" && refs[1].location == "cuda:0");
}

void ignores_other_tuples_and_refuses_what_the_machine_refuses() {
  std::string other = std::string("\x80\x02(") + unicode("x") + unicode("y") + unicode("z") + unicode("w") +
                      "K\x01t.";  // a 5-tuple that is not a persistent id
  CHECK(scan(other).empty());
  bool refused = false;
  try {
    scan(std::string("\x80\x02(", 3) + "i__builtin__\nobject\n.");  // INST
  } catch (const fastckpt::Error&) {
    refused = true;
  }
  CHECK(refused);
}

}  // namespace

int main() {
  finds_each_storage_once_through_the_memo();
  ignores_other_tuples_and_refuses_what_the_machine_refuses();
  return native_test::failures == 0 ? 0 : 1;
}
