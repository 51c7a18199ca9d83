// First-call autotuning of kernel variants.
//
// The best unroll depth / block shape depends on the GPU, dtype and problem size, so
// instead of hard-coding a table each (op, path, dtype, shape class) key times every
// variant once with CUDA events and caches the winner for the process lifetime.
//
// Variants of one key must produce bit-identical results (they differ only in
// scheduling), so which one wins never changes the numbers, only the speed.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>
#include <mutex>
#include <unordered_map>

namespace fastconv {

// floor(log2(v)) for v >= 1, 0 otherwise: problem sizes in the same power-of-two bucket
// share a tuning decision.
inline int log2_bucket(int64_t v) {
  int b = 0;
  while (v > 1) {
    v >>= 1;
    ++b;
  }
  return b;
}

// Packs the fields that change which variant is fastest into one cache key.
inline uint64_t tune_key(int device, int op, int path, int x_dtype, bool scale_is_float,
                         bool wide_index, bool vec, int64_t numel, int64_t inner) {
  uint64_t k = static_cast<uint64_t>(device & 0xff);
  k = (k << 4) | static_cast<uint64_t>(op & 0xf);
  k = (k << 4) | static_cast<uint64_t>(path & 0xf);
  k = (k << 8) | static_cast<uint64_t>(x_dtype & 0xff);
  k = (k << 1) | static_cast<uint64_t>(scale_is_float);
  k = (k << 1) | static_cast<uint64_t>(wide_index);
  k = (k << 1) | static_cast<uint64_t>(vec);
  k = (k << 6) | static_cast<uint64_t>(log2_bucket(numel));
  k = (k << 6) | static_cast<uint64_t>(log2_bucket(inner));
  return k;
}

struct TuneCache {
  std::mutex mutex;
  std::unordered_map<uint64_t, int> best;
};

// One cache per process (inline function statics are shared across translation units).
inline TuneCache& tune_cache() {
  static TuneCache cache;
  return cache;
}

// Owns a CUDA event so an exception mid-tuning cannot leak it.
class ScopedEvent {
 public:
  ScopedEvent() { C10_CUDA_CHECK(cudaEventCreate(&event_)); }
  ~ScopedEvent() { cudaEventDestroy(event_); }
  ScopedEvent(const ScopedEvent&) = delete;
  ScopedEvent& operator=(const ScopedEvent&) = delete;
  cudaEvent_t get() const { return event_; }

 private:
  cudaEvent_t event_;
};

// Returns the variant in [0, num_variants) to use for `key`. The first time a key is seen,
// every variant is launched via launch(v) on the current stream and timed; the caller then
// launches the returned variant for real (timing launches only overwrite the outputs with
// identical values). While the stream is being captured into a CUDA graph, timing (which
// needs a host sync) is impossible, so `fallback` is returned without caching.
template <typename Launch>
int pick_variant(uint64_t key, int num_variants, int fallback, Launch&& launch) {
  if (num_variants <= 1) return 0;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return fallback;

  TuneCache& cache = tune_cache();
  // Held while timing so concurrent first calls do not tune (and measure) each other.
  std::lock_guard<std::mutex> lock(cache.mutex);
  const auto it = cache.best.find(key);
  if (it != cache.best.end()) return it->second;

  constexpr int kReps = 3;
  ScopedEvent start, stop;
  int best = fallback;
  float best_ms = std::numeric_limits<float>::infinity();
  for (int v = 0; v < num_variants; ++v) {
    launch(v);  // warm-up: instruction cache, TLB, clocks
    C10_CUDA_CHECK(cudaEventRecord(start.get(), stream));
    for (int r = 0; r < kReps; ++r) launch(v);
    C10_CUDA_CHECK(cudaEventRecord(stop.get(), stream));
    C10_CUDA_CHECK(cudaEventSynchronize(stop.get()));
    float ms = 0.f;
    C10_CUDA_CHECK(cudaEventElapsedTime(&ms, start.get(), stop.get()));
    if (ms < best_ms) {
      best_ms = ms;
      best = v;
    }
  }
  cache.best.emplace(key, best);
  return best;
}

}  // namespace fastconv
