// Memory that holds a file's bytes: a private copy-on-write mapping of the
// file (a checkpoint opened by path or descriptor), or heap / anonymous memory
// that the caller fills from it (an eager read's records, inflated records, a
// file-like object). Owned through shared_ptr so every view of the bytes keeps
// them alive.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace fastckpt {

enum class Advice { Normal, Sequential, Random, DontNeed };

class FileMemory {
 public:
  // open(2) → fstat(2) on that descriptor → mmap(2) of that same descriptor,
  // PROT_READ|PROT_WRITE, MAP_PRIVATE: writes through views stay private.
  // Throws std::system_error (errno) on OS failures.
  static std::shared_ptr<FileMemory> open(const std::string& path);

  // The same over an open descriptor (duplicated, so the caller keeps its
  // own), from byte `start` of the file on: data()[0] is the file's byte
  // `start` (a file object's current position). Throws std::system_error
  // (EINVAL when it is not a regular file or start lies past its end).
  static std::shared_ptr<FileMemory> open_fd(int fd, uint64_t start, const std::string& name);

  // A fresh read-only MAP_SHARED mapping of `file`'s descriptor: the file's own
  // bytes (the page cache), never private writes made through other mappings.
  // Owns no descriptor, so copies from it read memory. nullptr for anonymous
  // memory or an empty file.
  static std::shared_ptr<FileMemory> shared_view(const FileMemory& file);

  // Uninitialised, writable heap memory of `size` (> 0) bytes, 64-byte
  // aligned (as torch's CPU allocator's), for the caller to fill. From
  // malloc's heap, so the pages of a freed one serve the next.
  static std::shared_ptr<FileMemory> heap(size_t size);

  // Zero-filled, writable anonymous memory of `size` bytes; the caller fills it
  // (e.g. Python's readinto) before indexing it.
  static std::shared_ptr<FileMemory> anonymous(size_t size);

  ~FileMemory();
  FileMemory(const FileMemory&) = delete;
  FileMemory& operator=(const FileMemory&) = delete;

  const uint8_t* data() const noexcept { return data_; }
  uint8_t* mutable_data() noexcept { return data_; }
  size_t size() const noexcept { return size_; }
  // The descriptor the mapping was made from (-1 for anonymous memory); kept
  // open so eager reads can pread(2) without touching the mapping. Byte i of
  // data() is byte file_offset() + i of the file.
  int fd() const noexcept { return fd_; }
  uint64_t file_offset() const noexcept { return start_; }
  const std::string& path() const noexcept { return path_; }

  // madvise(2) over [offset, offset+length) clipped to the mapping; advice is
  // a hint, so failures are ignored.
  void advise(Advice advice, size_t offset = 0, size_t length = SIZE_MAX) const noexcept;

 private:
  FileMemory(uint8_t* data, size_t size, int fd, std::string path, uint64_t start = 0)
      : data_(data), size_(size), fd_(fd), path_(std::move(path)), start_(start) {}
  // Maps all of `fd` (owned from here on) and exposes it from `start` on.
  static std::shared_ptr<FileMemory> map_descriptor(int fd, uint64_t start, const std::string& path);

  uint8_t* data_;   // the mapping + start_
  size_t size_;     // bytes from start_ to the end of the file
  int fd_;
  std::string path_;
  uint64_t start_;
  bool heap_ = false;  // free(3)d, not munmap(2)ped
};

}  // namespace fastckpt
