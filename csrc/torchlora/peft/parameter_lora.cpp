// PEFT's LoRA on nn.Parameters (see parameter_lora.h).
#include <torchlora/peft/parameter_lora.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <sstream>

namespace torchlora::peft {
namespace {

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream out;
  out << s;
  return out.str();
}

}  // namespace

ParameterLoraShape parameter_lora_shape(const std::vector<int64_t>& p, bool is_transposed) {
  ParameterLoraShape s;
  if (p.size() == 2) {
    s.out_features = p[0];
    s.in_features = p[1];
  } else if (p.size() == 3) {
    s.num_experts = p[0];
    s.experts_in_out = is_transposed;
    s.out_features = is_transposed ? p[2] : p[1];
    s.in_features = is_transposed ? p[1] : p[2];
  } else {
    TORCH_CHECK_VALUE(false, "target_parameters: LoRA adapts 2-D and 3-D parameters, got a parameter of shape ",
                      shape_str(p));
  }
  return s;
}

std::vector<int64_t> parameter_lora_A_shape(const ParameterLoraShape& s, int64_t r) {
  return {r * s.num_experts, s.in_features};
}

std::vector<int64_t> parameter_lora_B_shape(const ParameterLoraShape& s, int64_t r) {
  return {s.out_features, r * s.num_experts};
}

at::Tensor parameter_delta_weight(const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                                  const std::vector<int64_t>& param_shape, bool is_transposed) {
  const auto s = parameter_lora_shape(param_shape, is_transposed);
  const int64_t e = s.num_experts;
  const bool fits = lora_A.dim() == 2 && lora_B.dim() == 2 && lora_A.size(0) > 0 && lora_A.size(0) % e == 0 &&
                    lora_A.size(1) == s.in_features && lora_B.size(0) == s.out_features &&
                    lora_B.size(1) == lora_A.size(0);
  TORCH_CHECK_VALUE(fits, "target_parameters: a parameter of shape ", shape_str(param_shape),
                    (param_shape.size() == 3 ? (is_transposed ? " [experts, in, out]" : " [experts, out, in]") : " [out, in]"),
                    " needs lora_A [r * ", e, ", ", s.in_features, "] and lora_B [", s.out_features, ", r * ", e,
                    "], got ", shape_str(lora_A.sizes()), " and ", shape_str(lora_B.sizes()));
  const int64_t r = lora_A.size(0) / e;
  if (param_shape.size() == 2) return at::mm(lora_B, lora_A).mul(scaling);
  const auto a = lora_A.reshape({e, r, s.in_features});                       // [e, r, in]
  const auto b = lora_B.reshape({s.out_features, r, e}).permute({2, 0, 1});   // [e, out, r]
  const auto delta = at::bmm(b, a).mul(scaling);                              // [e, out, in]
  return s.experts_in_out ? delta.transpose(1, 2) : delta;
}

bool parameter_is_targeted(const std::string& key, const std::vector<std::string>& targets) {
  for (const auto& t : targets) {
    if (key == t || (key.size() > t.size() && key.ends_with(t) && key[key.size() - t.size() - 1] == '.')) return true;
  }
  return false;
}

std::string strip_base_layer(const std::string& module_path, int64_t* depth) {
  static const std::string segment = ".base_layer";
  std::string path = module_path;
  int64_t d = 0;
  while (path.ends_with(segment)) {
    path.resize(path.size() - segment.size());
    ++d;
  }
  if (depth != nullptr) *depth = d;
  return path;
}

}  // namespace torchlora::peft
