// fastconv_cuda::autotune_choices: what the autotuner has decided, one line per key (see
// TuneCache::describe), so that tests and users can check which variant a shape runs,
// e.g. that a CUDA graph captured after warm-up replays the tuned one.
#include <c10/util/StringUtil.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "autotune.h"

namespace fastconv {

std::vector<std::string> TuneCache::describe() const {
  std::vector<std::pair<uint64_t, std::string>> lines;
  {
    std::shared_lock<std::shared_mutex> lock(mutex_);
    for (const auto& [key, entry] : entries_) {
      const int v = entry->variant.load(std::memory_order_acquire);
      const std::string variant = v >= 0                    ? std::to_string(v)
                                  : v == TuneEntry::kTiming ? "timing"
                                                            : "untuned";
      char hex[19];
      std::snprintf(hex, sizeof(hex), "0x%016llx", static_cast<unsigned long long>(key));
      lines.emplace_back(key, c10::str(tune_op_name(tune_op_of(key)), " key=", hex,
                                       " variant=", variant, " last=", entry->last.load(),
                                       " capture_fallbacks=", entry->capture_fallbacks.load()));
    }
  }
  std::sort(lines.begin(), lines.end());
  std::vector<std::string> out;
  out.reserve(lines.size());
  for (auto& line : lines) out.push_back(std::move(line.second));
  return out;
}

namespace {

std::vector<std::string> autotune_choices() { return tune_cache().describe(); }

}  // namespace
}  // namespace fastconv

// No tensor arguments, so no backend key to dispatch on: one kernel for every key.
TORCH_LIBRARY_IMPL(fastconv_cuda, CompositeImplicitAutograd, m) {
  m.impl("autotune_choices", &fastconv::autotune_choices);
}
