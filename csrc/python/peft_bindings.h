// Python bindings of the PEFT rules of the C++ core (torchlora._C.peft).
#pragma once

#include <pybind11/pybind11.h>

namespace torchlora_python {
void bind_peft(pybind11::module_& m);
}
