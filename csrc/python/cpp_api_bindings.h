// Python bindings of the C++ API (LibTorch LoRA modules, adapter files), so tests can check
// them against the Python layers. Only this part of _C uses torch's Python bindings.
#pragma once

#include <pybind11/pybind11.h>

namespace torchlora_python {
void bind_cpp_api(pybind11::module_& m);
// PiSSA / OLoRA rules into `peft`, their C++ conversion and serving paths into `cpp`.
void bind_weight_conversion(pybind11::module_ peft, pybind11::module_ cpp);
}
