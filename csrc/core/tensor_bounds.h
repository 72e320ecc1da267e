// The bounds rule for tensor metadata read from a file: a tensor must lie
// inside its storage, computed with overflow-checked arithmetic, before it
// is made.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/checked_math.h"
#include "core/errors.h"

namespace fastckpt {

constexpr size_t kMaxTensorDims = 64;

// Product of the sizes; callers have checked them with check_tensor_in_storage.
inline uint64_t tensor_numel(const std::vector<int64_t>& size) {
  uint64_t n = 1;
  for (int64_t s : size) n *= static_cast<uint64_t>(s);
  return n;
}

inline bool is_contiguous(const std::vector<int64_t>& size, const std::vector<int64_t>& stride) {
  uint64_t expected = 1;  // unsigned: an empty tensor's other sizes may overflow the product
  for (size_t i = size.size(); i-- > 0;) {
    if (size[i] != 1 && static_cast<uint64_t>(stride[i]) != expected) return false;
    expected *= static_cast<uint64_t>(size[i]);
  }
  return true;
}

// Throws Error(Metadata) unless offset/size/stride (in elements of
// `element_bits` bits: 4 and 2 for torch's packed quint4x2/quint2x4) address
// only bytes in [0, storage_nbytes).
inline void check_tensor_in_storage(int64_t offset, const std::vector<int64_t>& size,
                                    const std::vector<int64_t>& stride, uint32_t element_bits,
                                    uint64_t storage_nbytes) {
  if (size.size() != stride.size())
    fail(ErrorKind::Metadata, "tensor has " + std::to_string(size.size()) + " sizes but " +
                                  std::to_string(stride.size()) + " strides");
  if (size.size() > kMaxTensorDims) fail(ErrorKind::Metadata, "tensor has too many dimensions");
  if (offset < 0) fail(ErrorKind::Metadata, "tensor has a negative storage offset");
  uint64_t numel = 1;
  uint64_t last = static_cast<uint64_t>(offset);  // element index of the last element
  for (size_t i = 0; i < size.size(); ++i) {
    if (size[i] < 0 || stride[i] < 0)
      fail(ErrorKind::Metadata, "tensor has a negative size or stride in dimension " + std::to_string(i));
    uint64_t span;
    if (!checked_mul(numel, static_cast<uint64_t>(size[i]), &numel) ||
        (size[i] > 0 && (!checked_mul(static_cast<uint64_t>(size[i] - 1), static_cast<uint64_t>(stride[i]), &span) ||
                         !checked_add(last, span, &last))))
      fail(ErrorKind::Metadata, "tensor size/stride overflow 64 bits in dimension " + std::to_string(i));
  }
  if (numel == 0) return;  // an empty tensor addresses no bytes
  uint64_t end_bytes;
  if (!checked_add(last, 1, &end_bytes) || !checked_mul(end_bytes, element_bits, &end_bytes) ||
      !checked_add(end_bytes, 7, &end_bytes) || (end_bytes /= 8) > storage_nbytes)
    fail(ErrorKind::Metadata, "tensor (offset " + std::to_string(offset) + ") needs bytes up to " +
                                  std::to_string(end_bytes) + " of a storage of " + std::to_string(storage_nbytes) +
                                  " bytes");
}

}  // namespace fastckpt
