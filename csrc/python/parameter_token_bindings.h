// Python bindings of trainable tokens and LoRA on parameters (torchlora._C.peft, torchlora._C.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace torchlora_python {
void bind_parameter_and_token_adapters(pybind11::module_& m);
}
