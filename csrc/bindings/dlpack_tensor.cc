#include "bindings/dlpack_tensor.h"

#include <algorithm>

namespace fastckpt::bindings {
namespace {

// One allocation per tensor: the DLPack header, the owner reference, and the
// shape and strides it points to (inline up to kInlineDims dimensions).
constexpr size_t kInlineDims = 8;
struct Block {
  DLManagedTensor managed;
  std::shared_ptr<FileMemory> owner;
  int64_t inline_dims[2 * kInlineDims];
  std::vector<int64_t> more_dims;  // shape followed by strides, for higher ranks
};

void delete_block(DLManagedTensor* self) { delete static_cast<Block*>(self->manager_ctx); }

void capsule_destructor(PyObject* capsule) {
  // torch renames a capsule it consumed ("used_dltensor") and then owns the
  // tensor; an unconsumed one still owns it here.
  if (PyCapsule_IsValid(capsule, "dltensor")) {
    auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
    managed->deleter(managed);
  }
}

}  // namespace

pybind11::capsule dlpack_capsule(std::shared_ptr<FileMemory> owner, uint8_t* data, DLDataType dtype,
                                 const std::vector<int64_t>& shape, const std::vector<int64_t>& strides) {
  auto block = std::make_unique<Block>();
  block->owner = std::move(owner);
  int64_t* dims = block->inline_dims;
  if (shape.size() > kInlineDims) {
    block->more_dims.resize(2 * shape.size());
    dims = block->more_dims.data();
  }
  std::copy(shape.begin(), shape.end(), dims);
  std::copy(strides.begin(), strides.end(), dims + shape.size());
  DLTensor& t = block->managed.dl_tensor;
  t.data = data;
  t.device_type = 1;
  t.device_id = 0;
  t.ndim = static_cast<int32_t>(shape.size());
  t.dtype = dtype;
  t.shape = dims;
  t.strides = dims + shape.size();
  t.byte_offset = 0;
  block->managed.manager_ctx = block.get();
  block->managed.deleter = &delete_block;
  PyObject* capsule = PyCapsule_New(&block->managed, "dltensor", &capsule_destructor);
  if (capsule == nullptr) throw pybind11::error_already_set();
  block.release();  // now owned by the capsule, then by torch
  return pybind11::reinterpret_steal<pybind11::capsule>(capsule);
}

}  // namespace fastckpt::bindings
