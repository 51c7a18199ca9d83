// A CPU build of the fused block's two CUDA kernels (csrc/inverted_residual_kernel.cuh on the
// CUDA cores, csrc/inverted_residual_mma_kernel.cuh on the tensor cores), for
// tests/cuda_emulation.py: the kernels' own source, compiled against this directory's
// cuda_runtime.h and gemm_mma.cuh, run CTA by CTA with one std::thread a CUDA thread. The
// launch mirrors csrc/inverted_residual.cu's host code: the same BlockArgs, each kernel's tiles
// and window, and one launch a group of output channels through the shared group_args.
#include <cstring>
#include <thread>
#include <vector>

#include "inverted_residual_kernel.cuh"
#include "inverted_residual_mma_kernel.cuh"

// The kernels' `extern __shared__` buffers, poisoned before each CTA (0xff bytes are NaN in
// every float format), so that a read of shared memory no thread wrote shows in the output.
constexpr int64_t kSharedCapacity = 256 * 1024;
namespace fastconv {
namespace fma_block {
alignas(16) unsigned char smem[kSharedCapacity];
}  // namespace fma_block
namespace mma_block {
alignas(16) unsigned char smem[kSharedCapacity];
}  // namespace mma_block
}  // namespace fastconv

namespace {

using fastconv::BlockArgs;

// Every CTA of every group, one after another, each as `threads` concurrent threads.
template <typename T, typename Kernel>
void run_grid(const BlockArgs& a, int group, int64_t blocks, int threads, unsigned char* shared, int64_t bytes,
              Kernel kernel) {
  for (int o0 = 0; o0 < a.C_out; o0 += group) {
    const BlockArgs args = fastconv::group_args<T>(a, o0, group);
    for (int64_t b = 0; b < blocks; ++b) {
      std::memset(shared, 0xff, static_cast<size_t>(bytes));
      std::barrier<> cta(threads);
      std::vector<emulation::Warp> warps(threads / 32);
      emulation::block_barrier = &cta;
      emulation::warps = warps.data();
      std::vector<std::thread> pool;
      pool.reserve(threads);
      for (int i = 0; i < threads; ++i) {
        pool.emplace_back([&args, &kernel, b, i] {
          emulation::thread_index.x = static_cast<unsigned>(i);
          emulation::block_index.x = static_cast<unsigned>(b);
          kernel(args);
        });
      }
      for (auto& thread : pool) thread.join();
    }
  }
}

template <typename T>
int run(int kernel, int variant, BlockArgs a, int64_t batch) {
  namespace fma = fastconv::fma_block;
  namespace mma = fastconv::mma_block;
  const bool tensor_cores = kernel == fastconv::kTensorCoreKernel;
  const int tile_h = tensor_cores ? mma::kTileH : fma::kTileH, tile_w = tensor_cores ? mma::kTileW : fma::kTileW;
  a.win_h = fastconv::window(tile_h, a.kh, a.stride, a.dilation);
  a.win_w = fastconv::window(tile_w, a.kw, a.stride, a.dilation);
  a.tiles_h = (a.Ho + tile_h - 1) / tile_h;
  a.tiles_w = (a.Wo + tile_w - 1) / tile_w;
  const int64_t blocks = batch * a.tiles_h * a.tiles_w;
  if (!tensor_cores) {
    const int64_t bytes = fma::shared_bytes(a.win_h, a.win_w, a.C_in, sizeof(T));
    if (bytes > kSharedCapacity) return -1;
    run_grid<T>(a, fma::kGroupOut, blocks, fma::kThreads, fma::smem, bytes,
                [](const BlockArgs& args) { fma::inverted_residual_kernel<T>(args); });
    return 0;
  }
  if constexpr (sizeof(T) == 2) {
    const mma::Plan p = mma::plan(a.win_h, a.win_w, a.C_in, a.we != nullptr);
    const int64_t bytes = p.x_bytes + p.e_bytes + p.d_bytes;
    if (bytes > kSharedCapacity) return -1;
    if (variant == 0) {  // as inverted_residual_mma.cu's launch_variant
      run_grid<T>(a, 32 * 12, blocks, mma::kThreads, mma::smem, bytes,
                  [](const BlockArgs& args) { mma::inverted_residual_mma_kernel<T, 12>(args); });
    } else {
      run_grid<T>(a, 32 * 4, blocks, mma::kThreads, mma::smem, bytes,
                  [](const BlockArgs& args) { mma::inverted_residual_mma_kernel<T, 4>(args); });
    }
    return 0;
  }
  return -2;  // the tensor-core kernel is half precision only
}

}  // namespace

// dtype: 0 float32, 1 float16, 2 bfloat16. shape: N, C_in, H, W, C_hid, C_out, kh, kw, stride,
// dilation, pad_top, pad_left, act_e, act_d, act_p, Ho, Wo; strides: x's, the residual's,
// out's (4 each). Returns 0; -1 when the plan outgrows the emulated shared memory, -2 for
// float32 on the tensor cores.
extern "C" int emulate_fused_block(int kernel, int dtype, int variant, const int64_t* shape, const int64_t* strides,
                                   const void* x, const void* we, const void* wd, const void* wp, const float* be,
                                   const float* bd, const float* bp, const void* residual, void* out) {
  BlockArgs a{};
  a.x = x;
  a.xn = strides[0], a.xc = strides[1], a.xh = strides[2], a.xw = strides[3];
  a.C_in = static_cast<int>(shape[1]), a.H = static_cast<int>(shape[2]), a.W = static_cast<int>(shape[3]);
  a.C_hid = static_cast<int>(shape[4]), a.C_out = static_cast<int>(shape[5]);
  a.kh = static_cast<int>(shape[6]), a.kw = static_cast<int>(shape[7]);
  a.stride = static_cast<int>(shape[8]), a.dilation = static_cast<int>(shape[9]);
  a.pad_top = static_cast<int>(shape[10]), a.pad_left = static_cast<int>(shape[11]);
  a.act_e = static_cast<int>(shape[12]), a.act_d = static_cast<int>(shape[13]), a.act_p = static_cast<int>(shape[14]);
  a.Ho = static_cast<int>(shape[15]), a.Wo = static_cast<int>(shape[16]);
  a.we = we, a.wd = wd, a.wp = wp, a.be = be, a.bd = bd, a.bp = bp;
  a.residual = residual;
  a.rn = strides[4], a.rc = strides[5], a.rh = strides[6], a.rw = strides[7];
  a.out = out;
  a.on = strides[8], a.oc = strides[9], a.oh = strides[10], a.ow = strides[11];
  switch (dtype) {
    case 0: return run<float>(kernel, variant, a, shape[0]);
    case 1: return run<c10::Half>(kernel, variant, a, shape[0]);
    default: return run<c10::BFloat16>(kernel, variant, a, shape[0]);
  }
}
