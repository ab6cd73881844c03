#include <torchlora/nn/adapter_stack.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <array>

#include <torchlora/peft/names.h>

namespace torchlora::nn {
namespace {

at::Tensor pad_rank(const at::Tensor& t, int64_t dim, int64_t rank, int64_t groups = 1) {
  const int64_t size = t.size(dim);
  if (size == rank) return t;
  if (groups > 1) {
    const at::Tensor blocks = t.unflatten(dim, {groups, size / groups});
    return pad_rank(blocks, dim + 1, rank / groups).flatten(dim, dim + 1);
  }
  std::vector<int64_t> pad(static_cast<size_t>(2 * (t.dim() - dim)), 0);
  pad.back() = rank - size;
  return at::constant_pad_nd(t, pad, 0);
}

}  // namespace

int64_t AdapterStack::slot_of(const std::string& name) const {
  const auto it = std::find(names.begin(), names.end(), name);
  return it == names.end() ? -1 : static_cast<int64_t>(it - names.begin());
}

at::Tensor AdapterStack::sample_slots(const std::vector<std::string>& adapter_names, const c10::Device& device) const {
  std::vector<int32_t> slots(adapter_names.size());
  for (size_t i = 0; i < adapter_names.size(); ++i) slots[i] = static_cast<int32_t>(slot_of(adapter_names[i]));
  return at::tensor(slots, at::TensorOptions().dtype(at::kInt)).to(device);
}

namespace {

// lora_A, lora_B and lora_bias (undefined when no adapter has one) stacked in slots.
std::array<at::Tensor, 3> stack_factors(const std::vector<AdapterFactors>& factors, int64_t a_rank_dim,
                                        int64_t b_rank_dim, int64_t groups) {
  TORCH_CHECK_VALUE(!factors.empty(), "torchlora: stack_adapters needs at least one adapter");
  TORCH_CHECK_VALUE(groups >= 1, "torchlora: stack_adapters: groups must be >= 1, got ", groups);
  at::ScalarType dtype = factors.front().lora_A.scalar_type();
  int64_t rank = 0;
  bool any_bias = false;
  for (const auto& f : factors) {
    TORCH_CHECK_VALUE(f.lora_A.defined() && f.lora_B.defined(), "torchlora: stack_adapters: undefined factors");
    dtype = at::promote_types(dtype, f.lora_A.scalar_type());
    rank = std::max(rank, f.lora_A.size(a_rank_dim));
    any_bias = any_bias || f.lora_bias.defined();
  }
  rank = (rank + groups - 1) / groups * groups;
  std::vector<at::Tensor> As, Bs, biases;
  for (const auto& f : factors) {
    As.push_back(pad_rank(f.lora_A.to(dtype), a_rank_dim, rank, groups));
    Bs.push_back(pad_rank(f.lora_B.to(dtype), b_rank_dim, rank / groups));
    if (any_bias) {
      biases.push_back(f.lora_bias.defined() ? f.lora_bias.to(dtype)
                                             : at::zeros({f.lora_B.size(0)}, f.lora_B.options().dtype(dtype)));
    }
  }
  return {at::stack(As), at::stack(Bs), any_bias ? at::stack(biases) : at::Tensor()};
}

}  // namespace

AdapterStack stack_adapters(const std::vector<std::string>& names, const std::vector<AdapterFactors>& factors,
                            const std::vector<double>& scaling, const std::vector<double>& dropout, int64_t a_rank_dim,
                            int64_t b_rank_dim, int64_t groups) {
  TORCH_CHECK_VALUE(names.size() == factors.size() && scaling.size() == factors.size() &&
                        dropout.size() == factors.size(),
                    "torchlora: stack_adapters got ", names.size(), " names, ", factors.size(), " factors, ",
                    scaling.size(), " scalings and ", dropout.size(), " dropout probabilities");
  AdapterStack stack;
  auto stacked = stack_factors(factors, a_rank_dim, b_rank_dim, groups);
  stack.lora_A = std::move(stacked[0]);
  stack.lora_B = std::move(stacked[1]);
  stack.lora_bias = std::move(stacked[2]);
  stack.names = names;
  stack.scale = at::tensor(std::vector<float>(scaling.begin(), scaling.end()), at::TensorOptions().dtype(at::kFloat))
                    .to(stack.lora_A.device());
  stack.dropout = dropout;
  return stack;
}

at::Tensor row_slots(const at::Tensor& sample_slots, int64_t rows) {
  const int64_t samples = sample_slots.size(0);
  if (rows == samples) return sample_slots;
  TORCH_CHECK_VALUE(samples > 0 && rows % samples == 0, "torchlora: ", rows, " rows cannot be split into ", samples,
                    " samples");
  return sample_slots.unsqueeze(1).expand({samples, rows / samples}).reshape({-1});
}

at::Tensor per_row_dropout(const at::Tensor& x, const at::Tensor& slots, const std::vector<double>& dropout,
                           bool training) {
  if (!training || std::none_of(dropout.begin(), dropout.end(), [](double p) { return p > 0.0; })) return x;
  auto p = at::tensor(dropout, x.options().dtype(at::kDouble)).to(x.scalar_type())
               .index_select(0, slots.clamp_min(0).to(at::kLong));
  std::vector<int64_t> shape(static_cast<size_t>(x.dim()), 1);
  shape[0] = -1;
  p = p.view(shape);
  const auto keep = at::rand_like(x).ge(p);
  return x * keep / (1.0 - p);
}

namespace {

// The stacking rule, row slots and per-row dropout as operators, so that Python layers reach them
// inside torch.compile graphs too (CompositeImplicitAutograd: autograd, Meta and every device
// come from the ATen ops they are made of).
std::vector<at::Tensor> stack_adapters_op(at::TensorList lora_A, at::TensorList lora_B,
                                          const c10::List<std::optional<at::Tensor>>& lora_bias, int64_t a_rank_dim,
                                          int64_t b_rank_dim, int64_t groups) {
  TORCH_CHECK_VALUE(lora_A.size() == lora_B.size() && lora_bias.size() == lora_A.size(),
                    "torchlora.stack_adapters: got ", lora_A.size(), " lora_A, ", lora_B.size(), " lora_B and ",
                    lora_bias.size(), " lora_bias entries");
  std::vector<AdapterFactors> factors;
  for (size_t i = 0; i < lora_A.size(); ++i) {
    const std::optional<at::Tensor> bias = lora_bias.get(i);
    factors.push_back({lora_A[i], lora_B[i], bias.value_or(at::Tensor())});
  }
  const auto stacked = stack_factors(factors, a_rank_dim, b_rank_dim, groups);
  std::vector<at::Tensor> out{stacked[0], stacked[1]};
  if (stacked[2].defined()) out.push_back(stacked[2]);
  return out;
}

// SymInt rows, so that torch.export keeps the batch and token dims dynamic: the same rule as
// row_slots, with the divisibility check deferred to a runtime assert instead of a guard.
at::Tensor row_slots_op(const at::Tensor& sample_slots, c10::SymInt rows) {
  if (auto concrete = rows.maybe_as_int(); concrete && !sample_slots.sym_size(0).is_symbolic()) {
    return row_slots(sample_slots, *concrete);
  }
  const c10::SymInt samples = sample_slots.sym_size(0);
  TORCH_SYM_CHECK(samples.sym_gt(0), "torchlora: rows cannot be split into 0 samples");
  TORCH_SYM_CHECK((rows % samples).sym_eq(0), "torchlora: ", rows, " rows cannot be split into ", samples,
                  " samples");
  return sample_slots.unsqueeze(1).expand_symint({samples, rows / samples}).flatten();
}

at::Tensor per_row_dropout_op(const at::Tensor& x, const at::Tensor& slots, at::ArrayRef<double> dropout,
                              bool training) {
  return per_row_dropout(x, slots, dropout.vec(), training);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchlora, m) {
  // [lora_A, lora_B] or [lora_A, lora_B, lora_bias] stacked in slots (see adapter_stack.h).
  m.def(
      "stack_adapters(Tensor[] lora_A, Tensor[] lora_B, Tensor?[] lora_bias, int a_rank_dim, int b_rank_dim, "
      "int groups=1) -> Tensor[]");
  m.def("multi_lora_row_slots(Tensor sample_slots, SymInt rows) -> Tensor");
  m.def("multi_lora_row_dropout(Tensor x, Tensor slots, float[] dropout, bool training) -> Tensor",
        {at::Tag::nondeterministic_seeded});
}

TORCH_LIBRARY_IMPL(torchlora, CompositeImplicitAutograd, m) {
  m.impl("stack_adapters", &stack_adapters_op);
  m.impl("multi_lora_row_slots", &row_slots_op);
  m.impl("multi_lora_row_dropout", &per_row_dropout_op);
}

}  // namespace torchlora::nn
