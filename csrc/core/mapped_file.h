// The bytes of a checkpoint: a private copy-on-write mapping of a file, or an
// anonymous buffer that the caller fills (for file-like objects). Owned through
// shared_ptr so every view of the bytes keeps them alive.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace fastckpt {

enum class Advice { Normal, Sequential, Random, WillNeed, DontNeed };

class MappedFile {
 public:
  // open(2) → fstat(2) on that descriptor → mmap(2) of that same descriptor,
  // PROT_READ|PROT_WRITE, MAP_PRIVATE: writes through views stay private.
  // Throws std::system_error (errno) on OS failures.
  static std::shared_ptr<MappedFile> open(const std::string& path);

  // A fresh read-only MAP_SHARED mapping of `file`'s descriptor: the file's own
  // bytes (the page cache), never private writes made through other mappings.
  // Owns no descriptor, so copies from it read memory. nullptr for anonymous
  // memory or an empty file.
  static std::shared_ptr<MappedFile> shared_view(const MappedFile& file);

  // Zero-filled, writable anonymous memory of `size` bytes; the caller fills it
  // (e.g. Python's readinto) before indexing it.
  static std::shared_ptr<MappedFile> anonymous(size_t size);

  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const noexcept { return data_; }
  uint8_t* mutable_data() noexcept { return data_; }
  size_t size() const noexcept { return size_; }
  // The descriptor the mapping was made from (-1 for anonymous memory); kept
  // open so eager reads can pread(2) without touching the mapping.
  int fd() const noexcept { return fd_; }
  const std::string& path() const noexcept { return path_; }

  // madvise(2) over [offset, offset+length) clipped to the mapping; advice is
  // a hint, so failures are ignored.
  void advise(Advice advice, size_t offset = 0, size_t length = SIZE_MAX) const noexcept;

 private:
  MappedFile(uint8_t* data, size_t size, int fd, std::string path)
      : data_(data), size_(size), fd_(fd), path_(std::move(path)) {}

  uint8_t* data_;
  size_t size_;
  int fd_;
  std::string path_;
};

}  // namespace fastckpt
