#include "core/mapped_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
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
    case Advice::WillNeed: return MADV_WILLNEED;
    case Advice::DontNeed: return MADV_DONTNEED;
    default: return MADV_NORMAL;
  }
}

}  // namespace

std::shared_ptr<MappedFile> MappedFile::open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw_errno(path);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int saved = errno;
    ::close(fd);
    errno = saved;
    throw_errno(path);
  }
  if (!S_ISREG(st.st_mode)) {
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
  return std::shared_ptr<MappedFile>(new MappedFile(data, size, fd, path));
}

std::shared_ptr<MappedFile> MappedFile::shared_view(const MappedFile& file) {
  if (file.fd_ < 0 || file.size_ == 0) return nullptr;
  void* p = ::mmap(nullptr, file.size_, PROT_READ, MAP_SHARED, file.fd_, 0);
  if (p == MAP_FAILED) throw_errno(file.path_);
  return std::shared_ptr<MappedFile>(new MappedFile(static_cast<uint8_t*>(p), file.size_, -1, file.path_));
}

std::shared_ptr<MappedFile> MappedFile::anonymous(size_t size) {
  uint8_t* data = nullptr;
  if (size > 0) {
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw_errno("anonymous mapping");
    data = static_cast<uint8_t*>(p);
  }
  return std::shared_ptr<MappedFile>(new MappedFile(data, size, -1, std::string()));
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(data_, size_);
  if (fd_ >= 0) ::close(fd_);
}

void MappedFile::advise(Advice advice, size_t offset, size_t length) const noexcept {
  if (data_ == nullptr || offset >= size_) return;
  if (length > size_ - offset) length = size_ - offset;
  // madvise wants a page-aligned start: widen the range down to the page.
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  const size_t start = offset - offset % page;
  ::madvise(data_ + start, length + (offset - start), to_madvise(advice));
}

}  // namespace fastckpt
