#include <torchlora/peft/scaling.h>

#include <c10/util/Exception.h>

#include <cmath>

namespace torchlora::peft {

void check_rank(int64_t r, const char* field) {
  TORCH_CHECK_VALUE(r > 0, "`", field, "` should be a positive integer value but the value passed is ", r);
}

void check_alpha(double lora_alpha, const char* field) {
  TORCH_CHECK_VALUE(std::isfinite(lora_alpha) && lora_alpha > 0, field, " must be a positive finite number, got ",
                    lora_alpha);
}

double lora_scaling(double lora_alpha, int64_t r, bool use_rslora) {
  check_rank(r);
  check_alpha(lora_alpha);
  const auto rank = static_cast<double>(r);
  return use_rslora ? lora_alpha / std::sqrt(rank) : lora_alpha / rank;
}

}  // namespace torchlora::peft
