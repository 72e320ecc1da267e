// Tensors over memory the core owns, made through the DLPack protocol
// (torch._C._from_dlpack): one cheap C call per tensor, with the final shape
// and strides, and a deleter that keeps the mapping alive without Python.
// The structs below are the DLPack 0.x C ABI (dlpack.h), which torch accepts
// in a capsule named "dltensor".
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "core/file_memory.h"

namespace fastckpt::bindings {

struct DLDataType {
  uint8_t code;  // 0 int, 1 uint, 2 float, 4 bfloat, 5 complex, 6 bool
  uint8_t bits;
  uint16_t lanes;
};

struct DLTensor {
  void* data;
  int32_t device_type;  // 1 = CPU
  int32_t device_id;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements
  uint64_t byte_offset;
};

struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor* self);
};

// Returns a capsule holding a DLManagedTensor over [data, data + extent) that
// owns a reference to `owner`; torch frees it (without the GIL) when the
// tensor's storage dies, or the capsule does if torch never consumed it.
pybind11::capsule dlpack_capsule(std::shared_ptr<FileMemory> owner, uint8_t* data, DLDataType dtype,
                                 const std::vector<int64_t>& shape, const std::vector<int64_t>& strides);

}  // namespace fastckpt::bindings
