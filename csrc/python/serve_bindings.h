// Python bindings of torchlora::serve as torchlora._C.serve (adapter pool, leases, exported models).
#pragma once

#include <pybind11/pybind11.h>

namespace torchlora_python {
// Call after bind_cpp_api: the serve error translator must be registered after the generic one.
void bind_serve(pybind11::module_& m);
}
