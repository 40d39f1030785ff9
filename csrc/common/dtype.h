// The element type of a kernel launch, as the binding files tell it to the (torch-free) kernel files.
#pragma once

namespace fastpeft {

enum class DType { kFloat16, kBFloat16, kFloat32, kFloat64 };

}  // namespace fastpeft
