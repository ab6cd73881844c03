// torchlora._C: what Python needs beyond the operators (which load with libtorchlora).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <torchlora/build_info.h>

#include "cpp_api_bindings.h"
#include "parameter_token_bindings.h"
#include "peft_bindings.h"
#include "serve_bindings.h"
#include "weighted_adapter_bindings.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "Native core of torchlora (operators are registered under torch.ops.torchlora)";
  m.def(
      "build_info",
      [] {
        const auto info = torchlora::build_info();
        py::dict d;
        d["version"] = info.version;
        d["torch_version"] = info.torch_version;
        d["cuda"] = info.cuda;
        d["cuda_version"] = info.cuda_version;
        d["cuda_architectures"] = info.cuda_architectures;
        return d;
      },
      "What libtorchlora was built with: version, torch_version, cuda, cuda_version, cuda_architectures.");
  m.def("cpu_kernel_isa", &torchlora::cpu_kernel_isa,
        "The vector path of the CPU kernels in this process: 'avx512', 'avx2' or 'scalar' (the CPU's best, "
        "capped by TORCHLORA_CPU_ISA).");
  torchlora_python::bind_cpp_api(m);
  torchlora_python::bind_peft(m);
  torchlora_python::bind_weighted_adapter(m);
  torchlora_python::bind_serve(m);
  torchlora_python::bind_parameter_and_token_adapters(m);
}
