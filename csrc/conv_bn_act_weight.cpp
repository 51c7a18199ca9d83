// The implicit GEMM's B operand (conv_bn_act.h): the conv weight in the GEMM's k order, used
// in place when it already is, else repacked, with the repacked copy cached.
//
// The cache: a small LRU keyed by everything that decides the packed values -- the weight's
// data pointer, version counter, sizes, strides, dtype and device -- plus the stream, so an
// entry is only ever read on the stream that wrote it (evicting it then frees its block in
// stream order, with no record_stream). An entry also holds a weak reference to the weight's
// storage: if that storage dies and a new weight lands at the same address with the same
// version, the dead reference turns the hit into a miss. Like ConvBNAct2d's fold cache, it
// trusts the version counter: an in-place change through `.data` (which has its own counter)
// is not seen.
//
// CUDA graphs: under capture the cache is neither read nor written. A replay must read the
// weight as it is at replay time (an optimizer may have updated it in place since), which a
// copy made at capture time would not; so the repack (one allocation at capture, two small
// launches per replay) is captured. A channels_last weight needs no repack at all, in graphs
// or not.
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <iterator>
#include <list>
#include <mutex>

#include "autotune.h"
#include "conv_bn_act.h"
#include "layout.h"

namespace fastconv {
namespace gemm {
namespace {

// A ResNet-50 has about 20 convs that take this route (its 3x3s, the stem and the strided
// 1x1 downsamples; the other 1x1s go to the pointwise GEMM), a DenseNet-121 59: 64 entries
// hold every such weight of common models, and 256 MiB bounds the copies (ResNet-50's come
// to about 28 MB in fp16).
constexpr size_t kMaxEntries = 64;
constexpr int64_t kMaxBytes = int64_t{256} << 20;

struct Key {
  const void* data;
  int64_t version;
  int64_t sizes[4], strides[4];
  at::ScalarType dtype;
  c10::DeviceIndex device;
  c10::StreamId stream;

  bool operator==(const Key& o) const {
    for (int d = 0; d < 4; ++d) {
      if (sizes[d] != o.sizes[d] || strides[d] != o.strides[d]) return false;
    }
    return data == o.data && version == o.version && dtype == o.dtype && device == o.device &&
           stream == o.stream;
  }
};

struct Entry {
  Key key;
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  at::Tensor packed;
};

class PackedWeightCache {
 public:
  // The cached copy for `key`, or an undefined tensor. A hit moves to the front.
  at::Tensor find(const Key& key, const at::Tensor& weight) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = lru_.begin(); it != lru_.end(); ++it) {
      if (!(it->key == key)) continue;
      if (it->storage.lock().get() != weight.storage().unsafeGetStorageImpl()) {
        erase(it);  // the weight it was made from is gone; the address was reused
        return {};
      }
      lru_.splice(lru_.begin(), lru_, it);
      return lru_.front().packed;
    }
    return {};
  }

  void insert(const Key& key, const at::Tensor& weight, const at::Tensor& packed) {
    const int64_t bytes = packed.numel() * packed.element_size();
    if (bytes > kMaxBytes) return;
    std::lock_guard<std::mutex> lock(mutex_);
    lru_.push_front({key, weight.storage().getWeakStorageImpl(), packed});
    bytes_ += bytes;
    while (lru_.size() > kMaxEntries || bytes_ > kMaxBytes) erase(std::prev(lru_.end()));
  }

 private:
  void erase(std::list<Entry>::iterator it) {
    bytes_ -= it->packed.numel() * it->packed.element_size();
    lru_.erase(it);
  }

  std::mutex mutex_;
  std::list<Entry> lru_;  // most recently used first
  int64_t bytes_ = 0;
};

PackedWeightCache& cache() {
  // Leaked on purpose: a static destructor freeing CUDA memory at exit could run after the
  // CUDA runtime has shut down.
  static PackedWeightCache* instance = new PackedWeightCache();
  return *instance;
}

// (C_out, Kp) with rows padded to a multiple of 16 bytes, zeros past K_g.
at::Tensor repack(const at::Tensor& weight, int64_t Kg, int64_t Kp) {
  const int64_t C_out = weight.size(0);
  at::Tensor w = at::zeros({C_out, Kp}, weight.options().memory_format(at::MemoryFormat::Contiguous));
  w.narrow(1, 0, Kg).copy_(weight.permute({0, 2, 3, 1}).reshape({C_out, Kg}));
  return w;
}

}  // namespace

PackedWeight packed_conv_weight(const at::Tensor& weight, bool vec) {
  const int64_t V = 16 / weight.element_size();
  const int64_t Kg = weight.size(1) * weight.size(2) * weight.size(3);
  const int64_t Kp = (Kg + V - 1) / V * V;
  // (C_out, KH, KW, C_in_g) dense is the GEMM's order already. The VEC path (C_in_g % V == 0,
  // so K_g % V == 0) also needs each row to start 16-byte aligned.
  if (weight.permute({0, 2, 3, 1}).is_contiguous() &&
      (!vec || is_aligned(weight.const_data_ptr(), 16))) {
    return {weight, Kg};
  }
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
  // Inference tensors have no version counter, so a change to one could not be seen.
  if (weight.is_inference() || stream_is_capturing(stream.stream())) {
    return {repack(weight, Kg, Kp), Kp};
  }
  Key key{weight.const_data_ptr(), weight._version(), {}, {}, weight.scalar_type(),
          weight.device().index(), stream.id()};
  for (int d = 0; d < 4; ++d) {
    key.sizes[d] = weight.size(d);
    key.strides[d] = weight.stride(d);
  }
  at::Tensor packed = cache().find(key, weight);
  if (!packed.defined()) {
    packed = repack(weight, Kg, Kp);
    cache().insert(key, weight, packed);
  }
  return {packed, Kp};
}

}  // namespace gemm
}  // namespace fastconv
