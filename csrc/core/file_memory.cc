#include "core/file_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <string>
#include <system_error>

namespace fastckpt {
namespace {

[[noreturn]] void throw_errno(const std::string& what) {
  throw std::system_error(errno, std::generic_category(), what);
}

int to_madvise(Advice advice) {
  switch (advice) {
    case Advice::Sequential: return MADV_SEQUENTIAL;
    case Advice::Random: return MADV_RANDOM;
    case Advice::DontNeed: return MADV_DONTNEED;
    default: return MADV_NORMAL;
  }
}

}  // namespace

std::shared_ptr<FileMemory> FileMemory::open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw_errno(path);
  return map_descriptor(fd, 0, path);
}

std::shared_ptr<FileMemory> FileMemory::open_fd(int fd, uint64_t start, const std::string& name) {
  int own = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (own < 0) throw_errno(name);
  return map_descriptor(own, start, name);
}

std::shared_ptr<FileMemory> FileMemory::map_descriptor(int fd, uint64_t start, const std::string& path) {
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int saved = errno;
    ::close(fd);
    errno = saved;
    throw_errno(path);
  }
  if (!S_ISREG(st.st_mode) || static_cast<uint64_t>(st.st_size) < start) {
    ::close(fd);
    errno = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
    throw_errno(path);
  }
  size_t size = static_cast<size_t>(st.st_size);
  uint8_t* data = nullptr;
  if (size > 0) {
    // The size comes from fstat of this descriptor, never from the file's
    // contents, so the mapping cannot be sized by an attacker.
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      int saved = errno;
      ::close(fd);
      errno = saved;
      throw_errno(path);
    }
    data = static_cast<uint8_t*>(p);
  }
  // SAFETY: start <= size (checked above).
  return std::shared_ptr<FileMemory>(
      new FileMemory(data == nullptr ? nullptr : data + start, size - static_cast<size_t>(start), fd, path, start));
}

std::shared_ptr<FileMemory> FileMemory::shared_view(const FileMemory& file) {
  if (file.fd_ < 0 || file.size_ == 0) return nullptr;
  const size_t whole = file.size_ + static_cast<size_t>(file.start_);
  void* p = ::mmap(nullptr, whole, PROT_READ, MAP_SHARED, file.fd_, 0);
  if (p == MAP_FAILED) throw_errno(file.path_);
  return std::shared_ptr<FileMemory>(
      new FileMemory(static_cast<uint8_t*>(p) + file.start_, file.size_, -1, file.path_, file.start_));
}

std::shared_ptr<FileMemory> FileMemory::heap(size_t size) {
  void* p = nullptr;
  const int rc = ::posix_memalign(&p, 64, size);
  if (rc != 0) {
    errno = rc;
    throw_errno("allocating " + std::to_string(size) + " bytes");
  }
  std::shared_ptr<FileMemory> m(new FileMemory(static_cast<uint8_t*>(p), size, -1, std::string()));
  m->heap_ = true;
  return m;
}

std::shared_ptr<FileMemory> FileMemory::anonymous(size_t size) {
  uint8_t* data = nullptr;
  if (size > 0) {
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw_errno("anonymous mapping");
    data = static_cast<uint8_t*>(p);
  }
  return std::shared_ptr<FileMemory>(new FileMemory(data, size, -1, std::string()));
}

FileMemory::~FileMemory() {
  if (heap_)
    std::free(data_);
  else if (data_ != nullptr)
    ::munmap(data_ - start_, size_ + static_cast<size_t>(start_));
  if (fd_ >= 0) ::close(fd_);
}

void FileMemory::advise(Advice advice, size_t offset, size_t length) const noexcept {
  if (heap_ || data_ == nullptr || offset >= size_) return;  // widened to pages, heap advice would hit neighbours
  if (length > size_ - offset) length = size_ - offset;
  // madvise wants a page-aligned address: widen the range down to the page.
  const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t begin = reinterpret_cast<uintptr_t>(data_ + offset);
  const uintptr_t aligned = begin & ~(page - 1);
  ::madvise(reinterpret_cast<void*>(aligned), length + (begin - aligned), to_madvise(advice));
}

}  // namespace fastckpt
