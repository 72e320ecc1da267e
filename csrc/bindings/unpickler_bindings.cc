#include "bindings/common.h"

namespace fastckpt::bindings {
void register_unpickler(py::module_&) {}
}  // namespace fastckpt::bindings
