// Writes the zip archive torch.save writes (stored records, data aligned by
// an 'FB' padding extra field, data descriptors, ZIP64 end records), byte for
// byte: the layout is computed up front from names and sizes, then record
// data is written from several threads with CRC-32 computed in parallel
// chunks and combined. No Python: callers release the GIL.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace fastckpt {

// A record to store: its name inside the archive (without the prefix) and its
// bytes, which must stay valid and unchanged until the write returns.
struct ZipSource {
  std::string name;
  const uint8_t* data;  // may be null when size == 0
  uint64_t size;
  // The CRC-32 of the bytes when the caller has it already (a snapshot copy
  // computed it): the writer does not read the bytes again for it.
  std::optional<uint32_t> crc = std::nullopt;
  // The bytes are in the file already, at this record's data offset (put there
  // by write_pieces; `crc` is then required): only the header and descriptor
  // are written, and `data` holds just the first min(size, 8) bytes, which
  // the serialization id reads.
  bool in_file = false;
};

struct ZipWriteOptions {
  std::string prefix = "archive";  // the archive's folder: records are "<prefix>/<name>"
  uint64_t alignment = 64;         // of every record's data, 1..65536 (config.save.storage_alignment)
  bool compute_crc32 = true;       // false: every CRC field holds 0, as torch writes then
  unsigned threads = 0;            // 0: default_thread_count()
};

// The record torch's writer appends after the caller's records.
constexpr const char* kSerializationIdName = ".data/serialization_id";
constexpr uint64_t kSerializationIdSize = 40;

// Where every record and structure of the archive lies, computed the way
// torch's writer (caffe2 PyTorchStreamWriter over miniz) places them.
struct ZipEntryLayout {
  std::string full_name;   // "<prefix>/<name>"
  uint64_t size;
  uint64_t header_offset;  // local file header
  uint64_t data_offset;    // a multiple of the alignment
  uint64_t end_offset;     // past the data descriptor
  bool zip64;              // size or header offset >= 0xFFFFFFFF: ZIP64 extras, 24-byte descriptor
};

class ZipLayout {
 public:
  // `names_and_sizes` lists every record in write order (the serialization id
  // included). Throws fastckpt::Error(Limit) when a name, the padding or the
  // central directory exceeds what the format can hold, or a size overflows.
  ZipLayout(const std::vector<std::pair<std::string, uint64_t>>& names_and_sizes,
            const std::string& prefix, uint64_t alignment);

  const std::vector<ZipEntryLayout>& entries() const noexcept { return entries_; }
  uint64_t central_directory_offset() const noexcept { return central_offset_; }
  uint64_t central_directory_size() const noexcept { return central_size_; }
  uint64_t total_size() const noexcept { return total_size_; }

  // Appends the local header, name and extra fields of entry i (everything
  // between header_offset and data_offset).
  void append_header(size_t i, std::string& out) const;
  // Appends entry i's data descriptor (nothing for an empty record).
  void append_descriptor(size_t i, uint32_t crc, std::string& out) const;
  // Appends the central directory and the end records; crcs[i] is entry i's.
  void append_tail(const std::vector<uint32_t>& crcs, std::string& out) const;

 private:
  std::vector<ZipEntryLayout> entries_;
  uint64_t alignment_;
  uint64_t central_offset_ = 0;
  uint64_t central_size_ = 0;
  uint64_t total_size_ = 0;
};

// The layout write_zip_file gives `records` (name, size) and the serialization
// id after them: where each record's data goes, for write_pieces.
ZipLayout zip_layout(const std::vector<std::pair<std::string, uint64_t>>& records, const ZipWriteOptions& options);

// The 40 ASCII digits torch writes as .data/serialization_id: a hash_combine of
// the std::hash of every record name (in std::unordered_set iteration order,
// as torch keeps them) and a hash_combine of every 32-bit value that torch's
// write callback takes for a data descriptor CRC. Equal to torch's when both
// use the same C++ standard library (libstdc++ on Linux).
std::string torch_serialization_id(const std::vector<ZipSource>& records,
                                   const std::vector<uint32_t>& crcs, const std::string& prefix);

// Writes `records` plus the serialization id as a whole archive to `fd` from
// offset 0 with pwrite(2), in parallel. Returns the archive's size. Throws
// std::system_error on I/O errors (ENOSPC, EFBIG...), fastckpt::Error(Limit)
// for an archive the format cannot hold.
uint64_t write_zip_file(int fd, const std::vector<ZipSource>& records, const ZipWriteOptions& options);

// A piece of record data and the file offset it goes to.
struct FilePiece {
  uint64_t offset;
  const uint8_t* data;
  uint64_t size;
};

// Writes every piece at its offset with pwrite(2) in parallel (large pieces
// split across threads), computing each piece's CRC-32 on the way when asked
// (0 otherwise). Throws std::system_error on I/O errors.
std::vector<uint32_t> write_pieces(int fd, const std::vector<FilePiece>& pieces, bool compute_crc32, unsigned threads);

// Same archive, handed in order to `sink` (file objects): CRCs are computed in
// parallel first, then the bytes are emitted; small pieces are coalesced,
// large records are passed straight from their source. An exception thrown
// by `sink` propagates. No record may be `in_file`.
void stream_zip(const std::vector<ZipSource>& records, const ZipWriteOptions& options,
                const std::function<void(const uint8_t*, size_t)>& sink);

// Moves the file at `temporary` over `target` atomically (the target always
// holds the old file or the new one). When the target exists, Linux's
// renameat2(RENAME_EXCHANGE) swaps the two and the old file is then unlinked
// (best effort: the swap is the commit): ext4 forces the allocation and
// writeback of a file renamed over an existing one (auto_da_alloc), and does
// not for an exchange. Elsewhere, or where the file system cannot exchange,
// rename(2). Throws std::system_error.
void replace_file(const std::string& temporary, const std::string& target);

}  // namespace fastckpt
