// A CPU stand-in for the CUDA runtime, used only by tests/cuda_sim: it runs this
// project's .cu kernels on the host so their logic (indexing, barriers, warp
// exchanges, merges) is tested where no GPU exists. Every CUDA thread of a block is
// a std::thread; blocks run one after another; __syncthreads and the warp
// collectives are std::barrier rendezvous; "device" memory is host memory and a
// stream is executed in order (every call is synchronous). __shared__ variables are
// function statics (one block runs at a time). It checks logic, not speed, and not
// the GPU memory model (a missing barrier shows up as a data race, which
// ThreadSanitizer reports when the library is built with -fsanitize=thread).
#pragma once

#include <math.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2 };
using cudaStream_t = void*;
enum cudaMemcpyKind { cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToDevice = 3 };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

namespace cuda_sim {

// Streaming multiprocessors the simulated device reports (kernels size their grids by it).
inline int& SmCount() {
  static int n = 4;
  return n;
}

struct Block {
  explicit Block(unsigned threads, size_t smem)
      : bar(std::ptrdiff_t(threads)), slots(threads), smem_bytes((smem + 15) / 16 * 16 + 16) {
    const unsigned warps = (threads + 31) / 32;
    for (unsigned w = 0; w < warps; ++w) {
      const unsigned n = std::min(32u, threads - 32 * w);
      warp_bars.push_back(std::make_unique<std::barrier<>>(std::ptrdiff_t(n)));
    }
    warp_slots.assign(size_t(warps) * 32, 0);
    dynamic.reset(new (std::align_val_t(16)) unsigned char[smem_bytes]);
    std::memset(dynamic.get(), 0xff, smem_bytes);  // garbage until written (NaN floats)
  }
  std::barrier<> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
  std::vector<uint64_t> slots;       // one per thread (__syncthreads_or)
  std::vector<uint64_t> warp_slots;  // 32 per warp (shuffles, ballots)
  size_t smem_bytes;
  struct AlignedDelete {
    void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t(16)); }
  };
  std::unique_ptr<unsigned char[], AlignedDelete> dynamic;
};

struct Ctx {
  dim3 thread, block, block_dim, grid_dim;
  Block* blk = nullptr;
  unsigned tid = 0;
};
inline thread_local Ctx ctx;

inline unsigned Lane() { return ctx.tid % 32; }
inline std::barrier<>& WarpBarrier() { return *ctx.blk->warp_bars[ctx.tid / 32]; }
inline uint64_t* WarpSlots() { return ctx.blk->warp_slots.data() + (ctx.tid / 32) * 32; }

// kernel<<<grid, block, smem, stream>>>(args...) becomes Launch(grid, block, smem, stream)(kernel, args...).
struct Launch {
  dim3 grid, block;
  size_t smem;
  Launch(dim3 g, dim3 b, size_t sm = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(sm) {}
  template <class K, class... A>
  void operator()(K kernel, A... args) const {
    if (grid.z != 1) std::abort();  // (no kernel here uses a 3-D grid; blocks iterate x, y)
    const unsigned n = block.x * block.y * block.z;
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block blk(n, smem);
        std::vector<std::thread> threads;
        threads.reserve(n);
        for (unsigned t = 0; t < n; ++t) {
          threads.emplace_back([&, t] {
            ctx.blk = &blk;
            ctx.tid = t;
            ctx.thread = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            ctx.block = dim3(bx, by, 0);
            ctx.block_dim = block;
            ctx.grid_dim = grid;
            kernel(args...);
            // An exited thread leaves every later rendezvous (as on the GPU).
            WarpBarrier().arrive_and_drop();
            blk.bar.arrive_and_drop();
          });
        }
        for (auto& th : threads) th.join();
      }
    }
  }
};

template <class T>
T* DynamicSmem() {
  return reinterpret_cast<T*>(ctx.blk->dynamic.get());
}

}  // namespace cuda_sim

#define threadIdx (cuda_sim::ctx.thread)
#define blockIdx (cuda_sim::ctx.block)
#define blockDim (cuda_sim::ctx.block_dim)
#define gridDim (cuda_sim::ctx.grid_dim)

inline void __syncthreads() { cuda_sim::ctx.blk->bar.arrive_and_wait(); }
inline int __syncthreads_or(int p) {
  auto& b = *cuda_sim::ctx.blk;
  b.slots[cuda_sim::ctx.tid] = p != 0;
  b.bar.arrive_and_wait();
  int r = 0;
  for (uint64_t v : b.slots) r |= int(v);
  b.bar.arrive_and_wait();
  return r;
}

template <class T>
T __shfl_xor_sync(unsigned, T v, int offset) {
  uint64_t* s = cuda_sim::WarpSlots();
  const unsigned lane = cuda_sim::Lane();
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  s[lane] = bits;
  cuda_sim::WarpBarrier().arrive_and_wait();
  T r;
  bits = s[lane ^ unsigned(offset)];
  std::memcpy(&r, &bits, sizeof(T));
  cuda_sim::WarpBarrier().arrive_and_wait();
  return r;
}
inline unsigned __ballot_sync(unsigned, int pred) {
  uint64_t* s = cuda_sim::WarpSlots();
  s[cuda_sim::Lane()] = pred != 0;
  cuda_sim::WarpBarrier().arrive_and_wait();
  unsigned r = 0;
  const unsigned base = (cuda_sim::ctx.tid / 32) * 32;
  const unsigned n = std::min(32u, unsigned(cuda_sim::ctx.blk->slots.size()) - base);
  for (unsigned l = 0; l < n; ++l) r |= unsigned(s[l] != 0) << l;
  cuda_sim::WarpBarrier().arrive_and_wait();
  return r;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }

inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}

template <class To, class From>
inline To BitCast(From v) {
  static_assert(sizeof(To) == sizeof(From));
  To r;
  std::memcpy(&r, &v, sizeof(To));
  return r;
}
inline float __int_as_float(int i) { return BitCast<float>(i); }
inline float __uint_as_float(unsigned i) { return BitCast<float>(i); }
inline unsigned __float_as_uint(float f) { return BitCast<unsigned>(f); }
inline int __float_as_int(float f) { return BitCast<int>(f); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "simulated error"; }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMultiProcessorCount ? cuda_sim::SmCount() : 227 * 1024;
  return cudaSuccess;
}
template <class F>
cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) {
  return cudaSuccess;
}
template <class T>
cudaError_t cudaMallocAsync(T** p, size_t bytes, cudaStream_t) {
  *p = static_cast<T*>(std::malloc(bytes ? bytes : 1));
  if (*p) std::memset(static_cast<void*>(*p), 0xff, bytes);  // garbage until written
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t) {
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
                                     size_t rows, cudaMemcpyKind, cudaStream_t) {
  for (size_t i = 0; i < rows; ++i) {
    std::memmove(static_cast<char*>(dst) + i * dpitch, static_cast<const char*>(src) + i * spitch, width);
  }
  return cudaSuccess;
}
