// libFuzzer target for the safetensors reader: any byte string must either parse into entries
// whose byte ranges lie inside the buffer, or raise c10::Error; never crash, hang or read out
// of bounds (built with AddressSanitizer and UndefinedBehaviorSanitizer).
#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>

#include <torchlora/io/safetensors_header.h>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const auto header = torchlora::io::parse_safetensors_header(data, size, "fuzz-input");
    // Touch every byte a reader would copy, so a range the validation let through wrongly
    // becomes an ASan report instead of silent garbage.
    uint8_t sink = 0;
    for (const auto& t : header.tensors) {
      for (uint64_t i = t.begin; i < t.end; ++i) {
        sink ^= data[header.data_start + i];
      }
    }
    volatile uint8_t keep = sink;
    (void)keep;
  } catch (const c10::Error&) {
    // rejected input: the expected outcome for almost everything
  }
  return 0;
}
