// Python bindings of PEFT's add_weighted_adapter rules (torchlora._C.peft).
#pragma once

#include <pybind11/pybind11.h>

namespace torchlora_python {
// Adds weighted_adapter_plan, combine_lora_factors and CombinationOptions to `m.peft`.
void bind_weighted_adapter(pybind11::module_& m);
}
