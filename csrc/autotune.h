// First-call autotuning of kernel variants.
//
// The best unroll depth / block shape depends on the GPU, dtype and problem size, so
// instead of hard-coding a table each (op, path, dtype, shape class) key times every
// variant once with CUDA events and caches the winner for the process lifetime.
//
// Variants of one key must produce bit-identical results (they differ only in
// scheduling), so which one wins never changes the numbers, only the speed.
//
// CUDA graphs: a tuned key is served from the cache, capturing or not, so a graph captured
// after warm-up replays the tuned variant. Only an untuned key under capture gets the
// caller's default (timing needs a host sync, which a capture forbids), and stays untuned.
// Timing runs with this thread's capture mode relaxed: in the default global mode, a host
// sync while any other thread captures would invalidate that capture; timing touches only
// this thread's non-capturing stream and its own events, so relaxing is safe.
//
// Locking: a cached lookup takes the cache's shared_mutex in shared mode only (readers never
// wait for each other); an insert takes it exclusively, briefly. No lock is held while
// timing: one thread claims an untuned key, the others meanwhile launch the default.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <atomic>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace fastconv {

// The tuned launch sites: tune_key's 4-bit `op` field, one code each, listed once here.
enum TuneOp : int {
  kOpBnActForward = 0,
  kOpBnActBackward = 1,
  kOpDwForward = 2,
  kOpDwBackwardInput = 3,
  kOpPointwise = 4,
  kOpConvBnAct = 5,
  kOpBnStats = 6,
  kOpBnGradSums = 7,
  kOpBnGradInput = 8,
  kOpFusedBlock = 9,
  kTuneOpCount = 10,
};

inline const char* tune_op_name(int op) {
  static const char* const kNames[kTuneOpCount] = {
      "bn_act_forward",    "bn_act_backward",     "depthwise_forward",
      "depthwise_backward_input", "pointwise_forward", "conv_bn_act_forward",
      "batch_norm_stats", "batch_norm_act_backward.grad_sums",
      "batch_norm_act_backward.grad_input", "inverted_residual_forward.tensor_cores"};
  return op >= 0 && op < kTuneOpCount ? kNames[op] : "unknown";
}

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

// Packs the fields that change which variant is fastest into one cache key. Layout, low bit
// first: inner (6), numel (6), vec, wide_index, scale_is_float, x_dtype (8), path (4),
// op (4, bits 27-30), device (8): the low 39 bits. Callers may add fields from bit 40 up.
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

inline int tune_op_of(uint64_t key) { return static_cast<int>((key >> 27) & 0xf); }

// What the cache knows of one key. Entries are never erased, so a pointer to one stays
// valid without a lock; its fields are atomics.
struct TuneEntry {
  static constexpr int kUntuned = -2;  // not timed yet (first seen under capture)
  static constexpr int kTiming = -1;   // one thread is timing it now
  std::atomic<int> variant{kUntuned};  // the winner once >= 0
  std::atomic<int> last{-1};           // the variant the last call was given
  std::atomic<int64_t> capture_fallbacks{0};  // calls given the default under capture
};

class TuneCache {
 public:
  // The key's entry, or null. Shared lock: concurrent lookups do not wait for each other.
  TuneEntry* find(uint64_t key) const {
    std::shared_lock<std::shared_mutex> lock(mutex_);
    const auto it = entries_.find(key);
    return it == entries_.end() ? nullptr : it->second.get();
  }

  TuneEntry* find_or_insert(uint64_t key) {
    std::unique_lock<std::shared_mutex> lock(mutex_);
    auto& slot = entries_[key];
    if (!slot) slot = std::make_unique<TuneEntry>();
    return slot.get();
  }

  // One line per key, in key order: "<op> key=0x<hex> variant=<v|untuned|timing> last=<v>
  // capture_fallbacks=<n>" (fastconv_cuda::autotune_choices).
  std::vector<std::string> describe() const;

 private:
  mutable std::shared_mutex mutex_;
  std::unordered_map<uint64_t, std::unique_ptr<TuneEntry>> entries_;
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

// Sets this thread's stream-capture mode to relaxed for its lifetime (see the header).
class RelaxedCaptureMode {
 public:
  RelaxedCaptureMode() { C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode_)); }
  ~RelaxedCaptureMode() { cudaThreadExchangeStreamCaptureMode(&mode_); }
  RelaxedCaptureMode(const RelaxedCaptureMode&) = delete;
  RelaxedCaptureMode& operator=(const RelaxedCaptureMode&) = delete;

 private:
  cudaStreamCaptureMode mode_ = cudaStreamCaptureModeRelaxed;
};

// Whether work launched on `stream` would be captured. An error counts as capturing: the
// legacy default stream reports cudaErrorStreamCaptureImplicit while a blocking stream
// captures, and launching there would join (and break) that capture.
inline bool stream_is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &status) != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky; keep it from surfacing at the next launch check
    return true;
  }
  return status != cudaStreamCaptureStatusNone;
}

// Times each variant (a warm-up launch, then kReps launches between two events) on `stream`
// and returns the fastest; ties keep the lower index, and `fallback` if nothing was timed.
template <typename Launch>
int time_variants(cudaStream_t stream, int num_variants, int fallback, Launch& launch) {
  constexpr int kReps = 3;
  const RelaxedCaptureMode relaxed;
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
  return best;
}

// Returns the variant in [0, num_variants) to use for `key`. The first time a key is seen
// outside a capture, every variant is launched via launch(v) on the current stream and timed;
// the caller then launches the returned variant for real (timing launches only overwrite the
// outputs with identical values). An untuned key gets `fallback` while the current stream is
// being captured, or while another thread is timing that key.
template <typename Launch>
int pick_variant(uint64_t key, int num_variants, int fallback, Launch&& launch) {
  if (num_variants <= 1) return 0;
  TuneCache& cache = tune_cache();
  TuneEntry* entry = cache.find(key);
  if (entry != nullptr) {
    const int v = entry->variant.load(std::memory_order_acquire);
    if (v >= 0) {
      entry->last.store(v, std::memory_order_relaxed);
      return v;
    }
  } else {
    entry = cache.find_or_insert(key);
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (stream_is_capturing(stream)) {
    entry->capture_fallbacks.fetch_add(1, std::memory_order_relaxed);
    entry->last.store(fallback, std::memory_order_relaxed);
    return fallback;
  }
  int state = TuneEntry::kUntuned;
  if (!entry->variant.compare_exchange_strong(state, TuneEntry::kTiming,
                                              std::memory_order_acq_rel)) {
    // Tuned meanwhile (state >= 0), or another thread is timing it: do not wait for it.
    const int v = state >= 0 ? state : fallback;
    entry->last.store(v, std::memory_order_relaxed);
    return v;
  }
  int best = fallback;
  try {
    best = time_variants(stream, num_variants, fallback, launch);
  } catch (...) {
    entry->variant.store(TuneEntry::kUntuned, std::memory_order_release);  // a later call retries
    throw;
  }
  entry->variant.store(best, std::memory_order_release);
  entry->last.store(best, std::memory_order_relaxed);
  return best;
}

}  // namespace fastconv
