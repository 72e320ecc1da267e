// Native tests for core/storage_rule.h: the persistent-id, numel -> bytes and
// record-size rules both pickle builders and the Python fallback apply.
#include <cstdint>
#include <string>

#include "check.h"
#include "core/errors.h"
#include "core/storage_rule.h"

namespace {

using fastckpt::ErrorKind;
using fastckpt::PersistentId;
using fastckpt::PidItem;

PidItem text(const std::string& s, PidItem::Kind kind = PidItem::Kind::Text) {
  PidItem i;
  i.kind = kind;
  i.text = s;
  return i;
}

PidItem integer(int64_t v) {
  PidItem i;
  i.kind = PidItem::Kind::Integer;
  i.integer = v;
  return i;
}

// ('storage', <type>, key, location, numel) as torch.save writes it.
PersistentId pid(const std::string& key = "0", int64_t numel = 4) {
  PersistentId p;
  p.tuple = true;
  p.count = PersistentId::kItems;
  p.items[0] = text("storage");
  p.items[2] = text(key);
  p.items[3] = text("cpu");
  p.items[4] = integer(numel);
  return p;
}

// The kind of error `f` throws, or nothing.
template <class F>
bool throws(F f, ErrorKind kind, const std::string& needle = "") {
  try {
    f();
  } catch (const fastckpt::Error& e) {
    return e.kind() == kind && std::string(e.what()).find(needle) != std::string::npos;
  }
  return false;
}

void accepts_what_torch_save_writes() {
  fastckpt::StorageId id = fastckpt::judge_persistent_id(pid("17", 9));
  CHECK(id.key == "17" && id.location == "cpu" && id.numel == 9);
  PersistentId py2 = pid();  // Python 2 pickles read with encoding="bytes": ASCII tag and location
  py2.items[0] = text("storage", PidItem::Kind::Bytes);
  py2.items[3] = text("cuda:0", PidItem::Kind::Bytes);
  CHECK(fastckpt::judge_persistent_id(py2).location == "cuda:0");
}

void refuses_other_shapes_and_tags() {
  PersistentId not_tuple;
  not_tuple.what = "an object of type int";
  CHECK(throws([&] { fastckpt::judge_persistent_id(not_tuple); }, ErrorKind::UnsafeGlobal, "got an object of type int"));
  PersistentId short_tuple = pid();
  short_tuple.count = 4;
  CHECK(throws([&] { fastckpt::judge_persistent_id(short_tuple); }, ErrorKind::UnsafeGlobal, "a tuple of 4 items"));
  PersistentId module = pid();
  module.items[0] = text("module");
  CHECK(throws([&] { fastckpt::judge_persistent_id(module); }, ErrorKind::UnsafeGlobal, "'module'"));
  PersistentId non_ascii = pid();
  non_ascii.items[0] = text("stor\xc3\xa4ge", PidItem::Kind::Bytes);
  CHECK(throws([&] { fastckpt::judge_persistent_id(non_ascii); }, ErrorKind::UnsafeGlobal));
}

void refuses_malformed_fields() {
  PersistentId bytes_key = pid();
  bytes_key.items[2] = text("0", PidItem::Kind::Bytes);  // torch would look up "data/b'0'"
  CHECK(throws([&] { fastckpt::judge_persistent_id(bytes_key); }, ErrorKind::Metadata, "storage key"));
  PersistentId int_key = pid();
  int_key.items[2] = integer(0);
  CHECK(throws([&] { fastckpt::judge_persistent_id(int_key); }, ErrorKind::Metadata, "the integer 0"));
  PersistentId location = pid();
  location.items[3] = text("an object of type dict", PidItem::Kind::Other);
  CHECK(throws([&] { fastckpt::judge_persistent_id(location); }, ErrorKind::Metadata, "location an object of type dict"));
  CHECK(throws([] { fastckpt::judge_persistent_id(pid("0", -1)); }, ErrorKind::Metadata, "numel the integer -1"));
  PersistentId float_numel = pid();
  float_numel.items[4] = text("an object of type float", PidItem::Kind::Other);
  CHECK(throws([&] { fastckpt::judge_persistent_id(float_numel); }, ErrorKind::Metadata, "float"));
  PersistentId long_key = pid(std::string(10000, 'k'));
  long_key.items[3] = integer(1);  // the message names the key, but file text stays bounded
  try {
    fastckpt::judge_persistent_id(long_key);
    CHECK(false);
  } catch (const fastckpt::Error& e) {
    CHECK(std::string(e.what()).size() < 10200);
  }
}

void sizes_are_overflow_checked() {
  fastckpt::StorageId id{"0", "cpu", 5};
  CHECK(fastckpt::storage_nbytes(id, 8) == 40);
  id.numel = uint64_t{1} << 62;
  CHECK(fastckpt::storage_nbytes(id, 2) == uint64_t{1} << 63);
  CHECK(throws([&] { fastckpt::storage_nbytes(id, 4); }, ErrorKind::Metadata, "storage '0'"));
  id.numel = UINT64_MAX;
  CHECK(fastckpt::storage_nbytes(id, 1) == UINT64_MAX);
  CHECK(throws([&] { fastckpt::storage_nbytes(id, 16); }, ErrorKind::Metadata));
}

void records_must_hold_the_storage() {
  fastckpt::ZipRecord r{"data/3", 0, 64, 40, 40, 0, fastckpt::Method::Stored, 0};
  fastckpt::check_record_holds(r, 40);
  CHECK(throws([&] { fastckpt::check_record_holds(r, 44); }, ErrorKind::Record,
               "record 'data/3' holds 40 bytes but its storage needs 44"));
  CHECK(throws([&] { fastckpt::check_record_holds(r, 0); }, ErrorKind::Record));
}

}  // namespace

int main() {
  accepts_what_torch_save_writes();
  refuses_other_shapes_and_tags();
  refuses_malformed_fields();
  sizes_are_overflow_checked();
  records_must_hold_the_storage();
  return native_test::failures == 0 ? 0 : 1;
}
