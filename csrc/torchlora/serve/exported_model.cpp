#include <torchlora/serve/exported_model.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <nlohmann/json.hpp>

#include <sstream>

#include "adapter_checks.h"

namespace torchlora::serve {
namespace {

using json = nlohmann::json;

constexpr const char* kMetadataKey = "torchlora";
constexpr int64_t kFormat = 1;

at::ScalarType parse_dtype(const std::string& name, const std::string& source) {
  if (name == "float32") return at::kFloat;
  if (name == "float16") return at::kHalf;
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float64") return at::kDouble;
  TORCH_CHECK(false, "torchlora: ", source, ": unknown dtype '", name, "' in the torchlora metadata");
}

io::LoraKind parse_kind(const std::string& name, const std::string& source) {
  if (name == "linear") return io::LoraKind::Linear;
  if (name == "embedding") return io::LoraKind::Embedding;
  if (name == "conv2d") return io::LoraKind::Conv2d;
  TORCH_CHECK(false, "torchlora: ", source, ": unknown layer kind '", name, "' in the torchlora metadata");
}

// The "torchlora" metadata document (format in exported_model.h).
ExportedModelInfo parse_info(const std::string& text, const std::string& source, c10::DeviceIndex device_index) {
  json doc;
  try {
    doc = json::parse(text);
  } catch (const json::exception& e) {
    TORCH_CHECK(false, "torchlora: ", source, ": the torchlora metadata is not valid JSON: ", e.what());
  }
  ExportedModelInfo info;
  try {
    TORCH_CHECK(doc.is_object(), "torchlora: ", source, ": the torchlora metadata must be a JSON object");
    info.format = doc.at("format").get<int64_t>();
    TORCH_CHECK(info.format == kFormat, "torchlora: ", source, ": torchlora export format ", info.format,
                " is not supported by this build (it reads format ", kFormat, ")");
    info.num_model_inputs = doc.at("num_model_inputs").get<int64_t>();
    TORCH_CHECK(info.num_model_inputs >= 1, "torchlora: ", source, ": num_model_inputs must be >= 1");
    info.pool.max_loras = doc.at("max_loras").get<int64_t>();
    info.pool.max_lora_rank = doc.at("max_lora_rank").get<int64_t>();
    info.pool.lora_bias = doc.value("lora_bias", false);
    info.pool.dtype = parse_dtype(doc.value("dtype", std::string("float32")), source);
    const std::string device = doc.value("device", std::string("cpu"));
    if (device == "cpu") {
      info.pool.device = c10::Device(c10::kCPU);
    } else if (device.rfind("cuda", 0) == 0) {
      info.pool.device = c10::Device(c10::kCUDA, device_index);
    } else {
      TORCH_CHECK(false, "torchlora: ", source, ": unsupported export device '", device, "'");
    }
    for (const auto& l : doc.at("layers")) {
      TargetLayer t;
      t.name = l.at("name").get<std::string>();
      t.kind = parse_kind(l.at("kind").get<std::string>(), source);
      t.weight_shape = l.at("weight_shape").get<std::vector<int64_t>>();
      t.groups = l.value("groups", int64_t{1});
      info.layers.push_back(std::move(t));
    }
  } catch (const json::exception& e) {
    TORCH_CHECK(false, "torchlora: ", source, ": malformed torchlora metadata: ", e.what());
  }
  detail::check_pool_layout(info.layers, info.pool);
  return info;
}

bool same_layers(const std::vector<TargetLayer>& a, const std::vector<TargetLayer>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].name != b[i].name || a[i].kind != b[i].kind || a[i].weight_shape != b[i].weight_shape ||
        a[i].groups != b[i].groups) {
      return false;
    }
  }
  return true;
}

}  // namespace

struct ExportedModel::Impl {
  std::string path;
  ExportedModelInfo info;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
};

ExportedModel::ExportedModel(const std::string& package_path, const std::string& model_name,
                             c10::DeviceIndex device_index)
    : impl_(std::make_unique<Impl>()) {
  impl_->path = package_path;
  const std::string source = "'" + package_path + "'";
  // Linking libtorchlora registered the operators before the loader resolves the model's calls.
  try {
    impl_->loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(package_path, model_name,
                                                                              /*run_single_threaded=*/false,
                                                                              /*num_runners=*/1, device_index);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "torchlora: cannot load the AOTInductor package ", source, " (model '", model_name,
                "'): ", e.what());
  }
  const auto metadata = impl_->loader->get_metadata();
  const auto it = metadata.find(kMetadataKey);
  TORCH_CHECK(it != metadata.end(), "torchlora: ", source,
              " is not a torchlora export: its metadata has no \"torchlora\" key (export it with "
              "torchlora.export)");
  impl_->info = parse_info(it->second, source, device_index);
}

ExportedModel::~ExportedModel() = default;

const ExportedModelInfo& ExportedModel::info() const { return impl_->info; }

std::shared_ptr<AdapterPool> ExportedModel::make_pool(int64_t max_cpu_loras) const {
  PoolOptions options = impl_->info.pool;
  options.max_cpu_loras = max_cpu_loras;
  return std::make_shared<AdapterPool>(impl_->info.layers, options);
}

std::vector<at::Tensor> ExportedModel::forward(const std::vector<at::Tensor>& inputs, const AdapterPool& pool,
                                               const BatchLease& lease) const {
  const auto& info = impl_->info;
  const auto& po = pool.options();
  TORCH_CHECK_VALUE(same_layers(pool.layers(), info.layers) && po.max_loras == info.pool.max_loras &&
                        po.max_lora_rank == info.pool.max_lora_rank && po.lora_bias == info.pool.lora_bias &&
                        po.dtype == info.pool.dtype && po.device.type() == info.pool.device.type(),
                    "torchlora: ExportedModel.forward: the pool was not made for this model (use make_pool(): its "
                    "layers, max_loras, max_lora_rank, lora_bias, dtype and device must be the export's)");
  TORCH_CHECK_VALUE(!lease.uses_dora(), "torchlora: ExportedModel.forward: the lease holds DoRA adapters, which "
                    "exported (AOTInductor) models do not serve");
  TORCH_CHECK_VALUE(lease.sample_slots().defined() && lease.slot_scale().defined() &&
                        lease.slot_scale().size(0) == info.pool.max_loras,
                    "torchlora: ExportedModel.forward: the lease was released or is not from this pool");
  TORCH_CHECK_VALUE(static_cast<int64_t>(inputs.size()) == info.num_model_inputs,
                    "torchlora: ExportedModel.forward: the model takes ", info.num_model_inputs, " inputs, got ",
                    inputs.size());
  const int64_t batch = lease.sample_slots().size(0);
  for (size_t i = 0; i < inputs.size(); ++i) {
    const auto& x = inputs[i];
    TORCH_CHECK_VALUE(x.defined() && x.dim() >= 1, "torchlora: ExportedModel.forward: input ", i,
                      " must be a tensor with a batch dimension");
    TORCH_CHECK_VALUE(x.size(0) == batch, "torchlora: ExportedModel.forward: input ", i, " has batch size ",
                      x.size(0), " but the lease has ", batch, " sample slots (one per sample)");
    TORCH_CHECK_VALUE(x.device().type() == info.pool.device.type(), "torchlora: ExportedModel.forward: input ", i,
                      " is on ", x.device(), " but the model runs on ", info.pool.device);
  }
  std::vector<at::Tensor> flat(inputs.begin(), inputs.end());
  flat.push_back(lease.sample_slots());
  flat.push_back(lease.slot_scale());
  for (const auto& s : pool.all_stacks()) {
    flat.push_back(s.lora_A);
    flat.push_back(s.lora_B);
    if (info.pool.lora_bias) flat.push_back(s.lora_bias);
    flat.push_back(s.scale);
  }
  return impl_->loader->run(flat);
}

}  // namespace torchlora::serve
