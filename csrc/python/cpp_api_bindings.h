// Python bindings of the C++ API (LibTorch LoRA modules, adapter files), so tests can check
// them against the Python layers. Only this part of _C uses torch's Python bindings.
#pragma once

#include <pybind11/pybind11.h>

namespace torchlora_python {
void bind_cpp_api(pybind11::module_& m);
}
