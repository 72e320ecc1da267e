// torch.save's archive, written natively.
//
// The layout mirrors caffe2's PyTorchStreamWriter over miniz (MINIZ_NO_TIME,
// MZ_ZIP_FLAG_WRITE_ZIP64): local headers carry no CRC or sizes (flag bit 3)
// and a ZIP64 extra only when the size or the header offset reaches
// 0xFFFFFFFF; an 'FB' extra padded with 'Z' aligns the data; non-empty
// records end with a data descriptor; a ZIP64 end record and locator always
// precede the classic one. Since nothing before a record's data depends on
// its CRC, every offset is known before any byte is written, and the records
// can be written out of order by several threads.
#include "core/zip_writer.h"

#include <fcntl.h>  // AT_FDCWD
#include <stdio.h>  // rename, renameat2
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>
#include <system_error>
#include <unordered_set>

#include "core/checked_math.h"
#include "core/crc32.h"
#include "core/errors.h"
#include "core/work_pool.h"

namespace fastckpt {
namespace {

constexpr uint64_t kMax32 = 0xFFFFFFFF;
constexpr uint64_t kLocalHeaderSize = 30;
constexpr uint64_t kCentralHeaderSize = 46;
constexpr uint64_t kPaddingExtraHeader = 4;  // 'F' 'B' + 16-bit length
constexpr uint64_t kEndRecordsSize = 56 + 20 + 22;  // ZIP64 end record, locator, classic end record
constexpr uint32_t kDescriptorSignature = 0x08074b50;

// Records at least this large are written straight from their source in
// chunks (several threads per record); smaller ones are assembled with their
// headers in a per-thread buffer and written with one pwrite per batch.
constexpr uint64_t kLargeRecordBytes = uint64_t{64} << 10;
constexpr uint64_t kChunkBytes = uint64_t{8} << 20;
constexpr uint64_t kBatchBytes = uint64_t{1} << 20;
constexpr size_t kBatchRecords = 4096;
// CRC then write in steps this size, so the write copies bytes still in cache.
// Chunks and steps end at file offsets that are multiples of their size: the
// page cache then takes whole large folios (2 MiB) from each write, and two
// threads never write parts of one folio.
constexpr uint64_t kStepBytes = uint64_t{4} << 20;

// The length of the piece starting at file offset `at`, at most `left` bytes,
// ending at the next multiple of `unit` (a power of two).
uint64_t piece_to_boundary(uint64_t at, uint64_t left, uint64_t unit) {
  return std::min(left, unit - (at & (unit - 1)));
}
// Below this much work per thread, starting one costs more than it saves.
constexpr uint64_t kBytesPerWorker = uint64_t{1} << 20;
// One pwrite call writes at most this much (Linux caps a call near 2 GiB).
constexpr uint64_t kMaxWriteBytes = uint64_t{1} << 30;

void put16(std::string& out, uint64_t v) {
  out.push_back(static_cast<char>(v & 0xFF));
  out.push_back(static_cast<char>((v >> 8) & 0xFF));
}
void put32(std::string& out, uint64_t v) {
  put16(out, v & 0xFFFF);
  put16(out, (v >> 16) & 0xFFFF);
}
void put64(std::string& out, uint64_t v) {
  put32(out, v & kMax32);
  put32(out, v >> 32);
}
uint32_t read32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 |
         static_cast<uint32_t>(p[2]) << 16 | static_cast<uint32_t>(p[3]) << 24;
}

// The payload of the ZIP64 extended-information field (0x0001) miniz writes
// for an entry: sizes when the size needs them, then the header offset.
uint64_t zip64_payload_size(uint64_t size, uint64_t header_offset) {
  return (size >= kMax32 ? 16 : 0) + (header_offset >= kMax32 ? 8 : 0);
}

uint64_t checked_sum(std::initializer_list<uint64_t> terms) {
  uint64_t total = 0;
  for (uint64_t t : terms)
    if (!checked_add(total, t, &total)) fail(ErrorKind::Limit, "archive size overflows 64 bits");
  return total;
}

// c10::hash_combine, which torch uses for both halves of the serialization id.
uint64_t hash_combine(uint64_t seed, uint64_t value) {
  return seed ^ (value + 0x9e3779b9 + (seed << 6) + (seed >> 2));
}

void pwrite_full(int fd, const uint8_t* data, uint64_t n, uint64_t offset) {
  while (n > 0) {
    const auto want = static_cast<size_t>(std::min(n, kMaxWriteBytes));
    const ssize_t done = ::pwrite(fd, data, want, static_cast<off_t>(offset));
    if (done < 0) {
      if (errno == EINTR) continue;
      throw std::system_error(errno, std::generic_category(), "pwrite");
    }
    if (done == 0) throw std::system_error(ENOSPC, std::generic_category(), "pwrite");
    data += done;
    offset += static_cast<uint64_t>(done);
    n -= static_cast<uint64_t>(done);
  }
}

void check_sources(const std::vector<ZipSource>& records, bool to_file) {
  for (const ZipSource& r : records) {
    if (r.in_file && (!to_file || !r.crc))
      fail(ErrorKind::Record, "record '" + r.name + "' is in the file already: needs its CRC and a file target");
    if (r.data == nullptr && (r.in_file ? std::min<uint64_t>(r.size, 8) : r.size) != 0)
      fail(ErrorKind::Record, "record '" + r.name + "' has " + std::to_string(r.size) + " bytes but no data");
  }
}

ZipLayout make_layout(const std::vector<ZipSource>& records, const ZipWriteOptions& options) {
  std::vector<std::pair<std::string, uint64_t>> names_and_sizes;
  names_and_sizes.reserve(records.size());
  for (const ZipSource& r : records) names_and_sizes.emplace_back(r.name, r.size);
  return zip_layout(names_and_sizes, options);
}

// Records written apart from their header (data straight from the source, or
// already in the file), not assembled with it in a batch.
bool written_apart(const ZipSource& r) { return r.in_file || r.size >= kLargeRecordBytes; }

// CRC (when asked) then pwrite of [data, data + n) at file offset `at`, in
// steps ending at multiples of kStepBytes. Returns the CRC (0 when not asked).
uint32_t crc_and_write(int fd, const uint8_t* data, uint64_t n, uint64_t at, bool crc) {
  uint32_t value = 0;
  for (uint64_t done = 0, step; done < n; done += step) {
    step = piece_to_boundary(at + done, n - done, kStepBytes);
    if (crc) value = crc32(value, data + done, static_cast<size_t>(step));
    if (fd >= 0) pwrite_full(fd, data + done, step, at + done);
  }
  return value;
}

// One unit of parallel work: a chunk of a large record, or a batch of
// consecutive small records.
struct Unit {
  size_t first;
  size_t end;       // batch: records [first, end); chunk: first + 1
  bool chunk;
  uint64_t offset;  // chunk: bytes [offset, offset + length) of the record
  uint64_t length;
};

std::vector<Unit> plan_units(const std::vector<ZipSource>& records, const ZipLayout& layout) {
  std::vector<Unit> units;
  bool batch_open = false;
  const auto& entries = layout.entries();
  for (size_t i = 0; i < records.size(); ++i) {
    const uint64_t size = records[i].size;
    if (written_apart(records[i])) {
      batch_open = false;
      if (records[i].in_file) continue;
      for (uint64_t off = 0, n; off < size; off += n) {
        n = piece_to_boundary(entries[i].data_offset + off, size - off, kChunkBytes);
        units.push_back({i, i + 1, true, off, n});
      }
      continue;
    }
    if (batch_open) {
      const Unit& u = units.back();
      batch_open = u.end - u.first < kBatchRecords &&
                   entries[i].end_offset - entries[u.first].header_offset <= kBatchBytes;
    }
    if (!batch_open) {
      units.push_back({i, i, false, 0, 0});
      batch_open = true;
    }
    units.back().end = i + 1;
  }
  return units;
}

// Runs the units: CRCs always (when asked for), and with fd >= 0 the bytes
// too, each small record with its header and descriptor, each large record's
// data only. Returns every record's CRC.
std::vector<uint32_t> run_records(const std::vector<ZipSource>& records, const ZipLayout& layout,
                                  const ZipWriteOptions& options, int fd) {
  const std::vector<Unit> units = plan_units(records, layout);
  uint64_t total = 0;
  for (const ZipSource& r : records) total = checked_sum({total, r.size});
  unsigned workers = options.threads == 0 ? default_thread_count() : options.threads;
  workers = static_cast<unsigned>(std::min<uint64_t>(workers, std::max<uint64_t>(1, total / kBytesPerWorker)));

  std::vector<uint32_t> crcs(records.size(), 0);
  std::vector<uint32_t> chunk_crc(units.size(), 0);
  std::vector<std::string> scratch(std::max(1u, workers));
  const bool crc = options.compute_crc32;
  const auto& entries = layout.entries();

  run_units(units.size(), workers, [&](size_t u, unsigned worker) {
    const Unit& unit = units[u];
    if (unit.chunk) {
      const ZipSource& r = records[unit.first];
      // SAFETY: the chunk lies inside the record, whose source holds r.size
      // bytes (the caller's contract).
      chunk_crc[u] = crc_and_write(fd, r.data + unit.offset, unit.length,
                                   entries[unit.first].data_offset + unit.offset, crc && !r.crc);
      return;
    }
    std::string& out = scratch[worker];
    out.clear();
    for (size_t i = unit.first; i < unit.end; ++i) {
      const ZipSource& r = records[i];
      crcs[i] = !crc || r.size == 0 ? 0 : r.crc ? *r.crc : crc32(0, r.data, static_cast<size_t>(r.size));
      if (fd < 0) continue;
      layout.append_header(i, out);
      if (r.size != 0) out.append(reinterpret_cast<const char*>(r.data), static_cast<size_t>(r.size));
      layout.append_descriptor(i, crcs[i], out);
    }
    if (fd >= 0)
      pwrite_full(fd, reinterpret_cast<const uint8_t*>(out.data()), out.size(),
                  entries[unit.first].header_offset);
  });

  for (size_t u = 0; u < units.size(); ++u) {
    const Unit& unit = units[u];
    if (!unit.chunk) continue;
    uint32_t& value = crcs[unit.first];
    value = unit.offset == 0 ? chunk_crc[u] : crc32_combine(value, chunk_crc[u], unit.length);
  }
  for (size_t i = 0; i < records.size(); ++i)  // known CRCs of records written apart
    if (records[i].crc && written_apart(records[i])) crcs[i] = crc ? *records[i].crc : 0;
  return crcs;
}

// Appends the serialization id record's CRC and returns its bytes.
std::string finish_crcs(const std::vector<ZipSource>& records, std::vector<uint32_t>& crcs,
                        const ZipWriteOptions& options) {
  std::string id = torch_serialization_id(records, crcs, options.prefix);
  crcs.push_back(options.compute_crc32 ? crc32(0, id.data(), id.size()) : 0);
  return id;
}

}  // namespace

ZipLayout zip_layout(const std::vector<std::pair<std::string, uint64_t>>& records, const ZipWriteOptions& options) {
  std::vector<std::pair<std::string, uint64_t>> names_and_sizes;
  names_and_sizes.reserve(records.size() + 1);
  names_and_sizes.insert(names_and_sizes.end(), records.begin(), records.end());
  names_and_sizes.emplace_back(kSerializationIdName, kSerializationIdSize);
  return ZipLayout(names_and_sizes, options.prefix, options.alignment);
}

ZipLayout::ZipLayout(const std::vector<std::pair<std::string, uint64_t>>& names_and_sizes,
                     const std::string& prefix, uint64_t alignment)
    : alignment_(alignment) {
  // The padding (< alignment) must fit the extra field's 16-bit length.
  if (alignment == 0 || alignment > 0x10000)
    fail(ErrorKind::Limit, "storage alignment " + std::to_string(alignment) + " is outside 1..65536");
  entries_.reserve(names_and_sizes.size());
  uint64_t cursor = 0;
  uint64_t central = 0;
  for (const auto& [name, size] : names_and_sizes) {
    ZipEntryLayout e;
    e.full_name = prefix + "/" + name;
    if (e.full_name.size() > 0xFFFF) fail(ErrorKind::Limit, "record name longer than 65535 bytes: " + name);
    e.size = size;
    e.header_offset = cursor;
    e.zip64 = size >= kMax32 || cursor >= kMax32;
    const uint64_t zip64_extra = e.zip64 ? 4 + zip64_payload_size(size, cursor) : 0;
    const uint64_t start =
        checked_sum({cursor, kLocalHeaderSize, e.full_name.size(), zip64_extra, kPaddingExtraHeader});
    const uint64_t padding = (alignment - start % alignment) % alignment;
    if (zip64_extra + kPaddingExtraHeader + padding > 0xFFFF)
      fail(ErrorKind::Limit, "extra field of record '" + name + "' exceeds 65535 bytes");
    e.data_offset = checked_sum({start, padding});
    e.end_offset = checked_sum({e.data_offset, size, size == 0 ? 0 : (e.zip64 ? 24u : 16u)});
    central = checked_sum({central, kCentralHeaderSize, e.full_name.size(), zip64_extra});
    cursor = e.end_offset;
    entries_.push_back(std::move(e));
  }
  if (central >= kMax32) fail(ErrorKind::Limit, "central directory of 4 GiB or more (too many records)");
  central_offset_ = cursor;
  central_size_ = central;
  total_size_ = checked_sum({cursor, central, kEndRecordsSize});
}

void ZipLayout::append_header(size_t i, std::string& out) const {
  const ZipEntryLayout& e = entries_[i];
  const uint64_t name_size = e.full_name.size();
  const uint64_t extra_size = e.data_offset - e.header_offset - kLocalHeaderSize - name_size;
  put32(out, 0x04034b50);
  put16(out, 0);                              // version needed (stored)
  put16(out, e.size != 0 ? 0x0808 : 0x0800);  // UTF-8 name; sizes in a data descriptor
  put16(out, 0);                              // method: stored
  put32(out, 0);                              // DOS time and date
  put32(out, 0);                              // CRC, sizes: in the descriptor
  put32(out, 0);
  put32(out, 0);
  put16(out, name_size);
  put16(out, extra_size);
  out += e.full_name;
  uint64_t padding = extra_size - kPaddingExtraHeader;
  if (e.zip64) {
    put16(out, 0x0001);
    put16(out, zip64_payload_size(e.size, e.header_offset));
    if (e.size >= kMax32) {
      put64(out, e.size);
      put64(out, 0);  // miniz has not compressed anything yet when it writes this
    }
    if (e.header_offset >= kMax32) put64(out, e.header_offset);
    padding -= 4 + zip64_payload_size(e.size, e.header_offset);
  }
  out += "FB";
  put16(out, padding);
  out.append(static_cast<size_t>(padding), 'Z');
}

void ZipLayout::append_descriptor(size_t i, uint32_t crc, std::string& out) const {
  const ZipEntryLayout& e = entries_[i];
  if (e.size == 0) return;
  put32(out, kDescriptorSignature);
  put32(out, crc);
  if (e.zip64) {
    put64(out, e.size);
    put64(out, e.size);
  } else {
    put32(out, e.size);
    put32(out, e.size);
  }
}

void ZipLayout::append_tail(const std::vector<uint32_t>& crcs, std::string& out) const {
  for (size_t i = 0; i < entries_.size(); ++i) {
    const ZipEntryLayout& e = entries_[i];
    const uint64_t zip64_payload = e.zip64 ? zip64_payload_size(e.size, e.header_offset) : 0;
    put32(out, 0x02014b50);
    put16(out, 0);  // version made by
    put16(out, 0);  // version needed
    put16(out, e.size != 0 ? 0x0808 : 0x0800);
    put16(out, 0);  // stored
    put32(out, 0);  // DOS time and date
    put32(out, crcs[i]);
    put32(out, std::min(e.size, kMax32));
    put32(out, std::min(e.size, kMax32));
    put16(out, e.full_name.size());
    put16(out, e.zip64 ? 4 + zip64_payload : 0);
    put16(out, 0);  // comment
    put16(out, 0);  // disk
    put16(out, 0);  // internal attributes
    put32(out, 0);  // external attributes
    put32(out, std::min(e.header_offset, kMax32));
    out += e.full_name;
    if (e.zip64) {
      put16(out, 0x0001);
      put16(out, zip64_payload);
      if (e.size >= kMax32) {
        put64(out, e.size);
        put64(out, e.size);
      }
      if (e.header_offset >= kMax32) put64(out, e.header_offset);
    }
  }
  const uint64_t n = entries_.size();
  const uint64_t zip64_end = central_offset_ + central_size_;
  put32(out, 0x06064b50);
  put64(out, 44);      // size of the rest of this record
  put16(out, 0x031E);  // made by: Unix, 3.0
  put16(out, 0x002D);  // needed: 4.5 (ZIP64)
  put32(out, 0);
  put32(out, 0);
  put64(out, n);
  put64(out, n);
  put64(out, central_size_);
  put64(out, central_offset_);
  put32(out, 0x07064b50);
  put32(out, 0);
  put64(out, zip64_end);
  put32(out, 1);  // disks
  put32(out, 0x06054b50);
  put32(out, 0);  // disk numbers
  put16(out, std::min<uint64_t>(n, 0xFFFF));
  put16(out, std::min<uint64_t>(n, 0xFFFF));
  put32(out, std::min(central_size_, kMax32));
  put32(out, std::min(central_offset_, kMax32));
  put16(out, 0);  // comment
}

std::string torch_serialization_id(const std::vector<ZipSource>& records,
                                   const std::vector<uint32_t>& crcs, const std::string& prefix) {
  std::unordered_set<std::string> written;
  for (const ZipSource& r : records) written.insert(r.name);
  uint64_t names_hash = 0;
  for (const std::string& name : written) names_hash = hash_combine(names_hash, std::hash<std::string>{}(name));

  // torch's write callback takes any write of 8+ bytes that starts with the
  // descriptor signature as a descriptor: the name and the data are written
  // in one call each, so either can be mistaken for one.
  uint64_t crc_hash = 0;
  auto probe = [&crc_hash](const uint8_t* p, uint64_t n) {
    if (n >= 8 && read32(p) == kDescriptorSignature) crc_hash = hash_combine(crc_hash, read32(p + 4));
  };
  for (size_t i = 0; i < records.size(); ++i) {
    const std::string full = prefix + "/" + records[i].name;
    probe(reinterpret_cast<const uint8_t*>(full.data()), full.size());
    if (records[i].size == 0) continue;
    probe(records[i].data, records[i].size);
    crc_hash = hash_combine(crc_hash, crcs[i]);
  }
  char id[2 * 20 + 1];
  std::snprintf(id, sizeof id, "%020llu%020llu", static_cast<unsigned long long>(names_hash),
                static_cast<unsigned long long>(crc_hash));
  return std::string(id, kSerializationIdSize);
}

uint64_t write_zip_file(int fd, const std::vector<ZipSource>& records, const ZipWriteOptions& options) {
  check_sources(records, true);
  const ZipLayout layout = make_layout(records, options);
  std::vector<uint32_t> crcs = run_records(records, layout, options, fd);
  const std::string id = finish_crcs(records, crcs, options);

  // Large records' headers and descriptors, then the id record and the tail,
  // which are contiguous at the end of the file.
  std::string out;
  for (size_t i = 0; i < records.size(); ++i) {
    if (!written_apart(records[i])) continue;
    const ZipEntryLayout& e = layout.entries()[i];
    out.clear();
    layout.append_header(i, out);
    pwrite_full(fd, reinterpret_cast<const uint8_t*>(out.data()), out.size(), e.header_offset);
    out.clear();
    layout.append_descriptor(i, crcs[i], out);
    pwrite_full(fd, reinterpret_cast<const uint8_t*>(out.data()), out.size(), e.data_offset + e.size);
  }
  const size_t last = records.size();
  out.clear();
  layout.append_header(last, out);
  out += id;
  layout.append_descriptor(last, crcs[last], out);
  layout.append_tail(crcs, out);
  pwrite_full(fd, reinterpret_cast<const uint8_t*>(out.data()), out.size(), layout.entries()[last].header_offset);
  return layout.total_size();
}

void stream_zip(const std::vector<ZipSource>& records, const ZipWriteOptions& options,
                const std::function<void(const uint8_t*, size_t)>& sink) {
  check_sources(records, false);
  const ZipLayout layout = make_layout(records, options);
  std::vector<uint32_t> crcs = run_records(records, layout, options, -1);
  const std::string id = finish_crcs(records, crcs, options);

  std::string pending;
  auto flush = [&] {
    if (!pending.empty()) sink(reinterpret_cast<const uint8_t*>(pending.data()), pending.size());
    pending.clear();
  };
  for (size_t i = 0; i <= records.size(); ++i) {
    const bool is_id = i == records.size();
    const uint8_t* data = is_id ? reinterpret_cast<const uint8_t*>(id.data()) : records[i].data;
    const uint64_t size = is_id ? id.size() : records[i].size;
    layout.append_header(i, pending);
    if (size >= kLargeRecordBytes) {
      flush();
      for (uint64_t done = 0; done < size; done += kMaxWriteBytes)
        sink(data + done, static_cast<size_t>(std::min(kMaxWriteBytes, size - done)));
    } else if (size != 0) {
      pending.append(reinterpret_cast<const char*>(data), static_cast<size_t>(size));
    }
    layout.append_descriptor(i, crcs[i], pending);
    if (pending.size() >= kBatchBytes) flush();
  }
  layout.append_tail(crcs, pending);
  flush();
}

std::vector<uint32_t> write_pieces(int fd, const std::vector<FilePiece>& pieces, bool compute_crc32, unsigned threads) {
  struct Chunk {
    size_t piece;
    uint64_t offset;  // into the piece
    uint64_t length;
  };
  std::vector<Chunk> chunks;
  uint64_t total = 0;
  for (size_t i = 0; i < pieces.size(); ++i) {
    const FilePiece& p = pieces[i];
    if (p.data == nullptr && p.size != 0) fail(ErrorKind::Record, "a piece of " + std::to_string(p.size) + " bytes has no data");
    checked_sum({p.offset, p.size});  // no piece ends past 2^64
    total = checked_sum({total, p.size});
    for (uint64_t off = 0, n; off < p.size; off += n) {
      n = piece_to_boundary(p.offset + off, p.size - off, kChunkBytes);
      chunks.push_back({i, off, n});
    }
  }
  unsigned workers = threads == 0 ? default_thread_count() : threads;
  workers = static_cast<unsigned>(std::min<uint64_t>(workers, std::max<uint64_t>(1, total / kBytesPerWorker)));
  std::vector<uint32_t> chunk_crc(chunks.size(), 0);
  run_units(chunks.size(), workers, [&](size_t c, unsigned) {
    const Chunk& k = chunks[c];
    const FilePiece& p = pieces[k.piece];
    // SAFETY: the chunk lies inside the piece, whose data holds p.size bytes
    // (the caller's contract).
    chunk_crc[c] = crc_and_write(fd, p.data + k.offset, k.length, p.offset + k.offset, compute_crc32);
  });
  std::vector<uint32_t> crcs(pieces.size(), 0);
  for (size_t c = 0; c < chunks.size(); ++c) {
    uint32_t& value = crcs[chunks[c].piece];
    value = chunks[c].offset == 0 ? chunk_crc[c] : crc32_combine(value, chunk_crc[c], chunks[c].length);
  }
  return crcs;
}

void replace_file(const std::string& temporary, const std::string& target) {
#if defined(__linux__) && defined(RENAME_EXCHANGE)
  if (::renameat2(AT_FDCWD, temporary.c_str(), AT_FDCWD, target.c_str(), RENAME_EXCHANGE) == 0) {
    ::unlink(temporary.c_str());  // now the old file; if it stays, the save still happened
    return;
  }
  // ENOENT: no target yet; EINVAL, ENOSYS: no exchange here. Either way rename does it.
  if (errno != ENOENT && errno != EINVAL && errno != ENOSYS)
    throw std::system_error(errno, std::generic_category(), "renameat2 " + target);
#endif
  if (std::rename(temporary.c_str(), target.c_str()) != 0)
    throw std::system_error(errno, std::generic_category(), "rename " + target);
}

}  // namespace fastckpt
