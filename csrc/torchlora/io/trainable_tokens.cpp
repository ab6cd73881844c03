// Trainable token rows of PEFT adapters (see trainable_tokens.h).
#include <torchlora/io/trainable_tokens.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <sstream>

namespace torchlora::io {
namespace {

using Json = nlohmann::ordered_json;

Json token_indices_json(const LoraConfig& config) {
  const Json obj = Json::parse(config.original_json);
  const auto it = obj.find("trainable_token_indices");
  return it == obj.end() ? Json() : *it;
}

std::vector<int64_t> as_indices(const Json& list) {
  std::vector<int64_t> out;
  for (const auto& v : list) out.push_back(v.get<int64_t>());  // the schema checked them
  return out;
}

}  // namespace

bool uses_trainable_tokens(const LoraConfig& config) { return !token_indices_json(config).is_null(); }

bool is_trainable_tokens_key(const std::string& key, std::string* module_path) {
  const std::string suffix = std::string(".") + peft::kTrainableTokensDelta;
  if (key.size() <= suffix.size() || !key.ends_with(suffix)) return false;
  if (module_path != nullptr) *module_path = key.substr(0, key.size() - suffix.size());
  return true;
}

std::map<std::string, TrainableTokenRows> trainable_token_rows(const PeftAdapter& adapter, const std::string& source) {
  const Json indices = token_indices_json(adapter.config);
  std::map<std::string, TrainableTokenRows> out;
  for (const auto& [key, tensor] : adapter.other_tensors) {
    std::string path;
    if (!is_trainable_tokens_key(key, &path)) continue;
    TORCH_CHECK_VALUE(!indices.is_null(), "torchlora: ", source, ": '", key,
                      "' holds trainable token rows but adapter_config.json has no trainable_token_indices");
    TrainableTokenRows rows;
    if (indices.is_array()) {
      rows.indices = as_indices(indices);
    } else {
      std::vector<std::string> names;
      for (const auto& item : indices.items()) {
        if (path.ends_with(item.key())) {
          names.push_back(item.key());
          rows.indices = as_indices(item.value());
        }
      }
      TORCH_CHECK_VALUE(names.size() == 1, "torchlora: ", source, ": '", key, "' is matched by ", names.size(),
                        " entries of trainable_token_indices (", indices.dump(), "); exactly one must name module '",
                        path, "'");
    }
    check_adapter_tensor(tensor, key, source);
    TORCH_CHECK_VALUE(tensor.dim() == 2 && tensor.size(0) == static_cast<int64_t>(rows.indices.size()), "torchlora: ",
                      source, ": '", key, "' must be [", rows.indices.size(),
                      ", embedding_dim] (one row per index of trainable_token_indices), got ", tensor.sizes());
    rows.values = tensor;
    out.emplace(path, std::move(rows));
  }
  TORCH_CHECK_VALUE(indices.is_null() || !out.empty(), "torchlora: ", source,
                    ": adapter_config.json sets trainable_token_indices but no '<embedding>.",
                    peft::kTrainableTokensDelta, "' tensor is in the file");
  return out;
}

at::Tensor with_trainable_tokens(const at::Tensor& weight, const TrainableTokenRows& rows, const std::string& where) {
  TORCH_CHECK_VALUE(weight.dim() == 2, "torchlora: ", where, ": trainable tokens replace rows of a 2-D weight, got ",
                    weight.sizes());
  TORCH_CHECK_VALUE(rows.values.size(1) == weight.size(1), "torchlora: ", where, ": trainable token rows have width ",
                    rows.values.size(1), " but the weight's rows have ", weight.size(1));
  for (const int64_t i : rows.indices) {
    TORCH_CHECK_VALUE(i >= 0 && i < weight.size(0), "torchlora: ", where, ": trainable_token_indices holds ", i,
                      ", outside the weight's ", weight.size(0), " rows");
  }
  const auto index = at::tensor(rows.indices, at::TensorOptions().dtype(at::kLong).device(weight.device()));
  return weight.index_copy(0, index, rows.values.to(weight.device(), weight.scalar_type()));
}

}  // namespace torchlora::io
