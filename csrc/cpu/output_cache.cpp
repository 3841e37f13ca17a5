// Outputs of the CPU kernels, from a small cache of large buffers (as PyTorch's CUDA allocator
// keeps device memory between steps).
//
// Why: glibc serves an allocation above its mmap threshold (128 KB, raised up to 32 MB as large
// blocks are freed) with fresh pages, and trims freed heap memory above a threshold, so a large
// output is faulted in page by page, zeroed by Linux, on every call. Measured here: at
// (32, 64, 128, 128) fp32 on 2 threads (benchmarks/page_fault_floor.py) a copy into a warm
// tensor takes 9.2 ms, into a fresh one 58 ms with 4 KB pages, 16 ms with transparent huge
// pages; the noise batch maker at 32x1x128x128 (two 2 MB outputs) took ~1000 page faults a
// call, 1.6 ms of kernel time on one thread against 2.7 ms of its own work. A buffer released
// here is kept (up to a cap of idle bytes) and handed to the next output of the same rounded
// size; memory in use is whatever the live tensors hold, as without the cache.
//
// Only outputs of at least kMinBytes go through the cache (smaller ones stay in glibc's heap).
// SPECKLE_CPU_OUTPUT_CACHE_MB sets the cap on idle bytes (default 1024; 0 turns the cache off,
// new buffers still ask for huge pages). empty_cpu_output_cache() frees the idle buffers.
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>

#include <cstdlib>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu_kernels.h"

namespace speckle::cpu {
namespace {

constexpr size_t kHuge = size_t{2} << 20;
constexpr size_t kMinBytes = size_t{1} << 20;

size_t idle_cap_bytes() {
  const char* env = std::getenv("SPECKLE_CPU_OUTPUT_CACHE_MB");
  if (env == nullptr || *env == '\0') return size_t{1024} << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  TORCH_CHECK_VALUE(end != env && *end == '\0' && mb >= 0, "SPECKLE_CPU_OUTPUT_CACHE_MB must be a whole number of MB >= 0, got '",
              env, "'");
  return static_cast<size_t>(mb) << 20;
}

// Asks Linux for transparent huge pages on [p, p + bytes) (2 MB-aligned interior). Best effort.
void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t begin = reinterpret_cast<uintptr_t>(p);
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + bytes) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

struct Block {
  void* ptr;
  size_t bytes;  // a multiple of kHuge
};

class OutputCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    const size_t bytes = (std::max<size_t>(n, 1) + kHuge - 1) / kHuge * kHuge;
    void* p = take_idle(bytes);
    if (p == nullptr) {
      p = std::aligned_alloc(kHuge, bytes);
      TORCH_CHECK(p != nullptr, "speckle_kernels: out of memory allocating ", bytes, " bytes");
      advise_huge_pages(p, bytes);
    }
    return {p, new Block{p, bytes}, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }

  int64_t idle_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(idle_bytes_);
  }

  int64_t empty() {
    std::vector<Block> freed;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      freed.swap(idle_);
      idle_bytes_ = 0;
    }
    int64_t total = 0;
    for (const Block& b : freed) {
      std::free(b.ptr);
      total += static_cast<int64_t>(b.bytes);
    }
    return total;
  }

  static OutputCache& get() {
    static OutputCache* cache = new OutputCache();  // never destroyed: tensors may outlive statics
    return *cache;
  }

 private:
  // The most recently released idle block of exactly `bytes` (warmest in the CPU caches), or null.
  void* take_idle(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = idle_.rbegin(); it != idle_.rend(); ++it) {
      if (it->bytes == bytes) {
        void* p = it->ptr;
        idle_.erase(std::next(it).base());
        idle_bytes_ -= bytes;
        return p;
      }
    }
    return nullptr;
  }

  static void release(void* ctx) {
    Block* block = static_cast<Block*>(ctx);
    const Block b = *block;
    delete block;
    get().keep_or_free(b);
  }

  // Keeps b idle, freeing the longest-idle blocks while the idle bytes exceed the cap.
  void keep_or_free(const Block& b) {
    size_t cap;
    try {
      cap = idle_cap_bytes();
    } catch (const c10::Error&) {  // a deleter must not throw; the allocation side reports it
      cap = 0;
    }
    std::vector<Block> freed;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      idle_.push_back(b);
      idle_bytes_ += b.bytes;
      size_t drop = 0;
      while (drop < idle_.size() && idle_bytes_ > cap) {
        idle_bytes_ -= idle_[drop].bytes;
        freed.push_back(idle_[drop++]);
      }
      idle_.erase(idle_.begin(), idle_.begin() + static_cast<std::ptrdiff_t>(drop));
    }
    for (const Block& f : freed) std::free(f.ptr);
  }

  std::mutex mutex_;
  std::vector<Block> idle_;  // in release order
  size_t idle_bytes_ = 0;
};

}  // namespace

at::Tensor empty_output(const at::Tensor& like, std::optional<at::ScalarType> dtype) {
  const at::ScalarType st = dtype.value_or(like.scalar_type());
  const size_t nbytes = static_cast<size_t>(like.numel()) * c10::elementSize(st);
  const bool cacheable = nbytes >= kMinBytes && like.is_non_overlapping_and_dense();
  if (cacheable && idle_cap_bytes() > 0) {
    return at::detail::empty_strided_generic(like.sizes(), like.strides(), &OutputCache::get(),
                                             c10::DispatchKeySet(c10::DispatchKey::CPU), st);
  }
  at::Tensor out = at::empty_like(like, like.options().dtype(st));
  if (cacheable || out.nbytes() >= 4 * kHuge) advise_huge_pages(out.data_ptr(), out.nbytes());
  return out;
}

int64_t cpu_output_cache_idle_bytes() { return OutputCache::get().idle_bytes(); }

int64_t empty_cpu_output_cache() { return OutputCache::get().empty(); }

}  // namespace speckle::cpu
