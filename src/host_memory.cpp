// A caching allocator for libtorch's large CPU tensors (see src/host_memory.rs for the why).
//
// Blocks of at least `min_block` bytes are mapped with mmap, rounded up to a size class of at most
// 1/8 above the request (the untouched tail of a mapping costs no resident memory), and kept on
// free in a pool keyed by size class. The next request of the same class takes a pooled block, so
// a training step reuses the blocks of the one before without page faults or heap
// fragmentation. The pool never holds more than the largest number of bytes that were ever live
// at once: beyond that a freed block is unmapped. Smaller requests go to the allocator this one
// replaces. No exception leaves this file: a failed mapping is reported to libtorch as the usual
// out-of-memory error from inside `allocate`, where libtorch expects one.

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

size_t size_class(size_t n) {
  // The largest power of two not above n, then steps of an eighth of it.
  size_t top = size_t(1) << (63 - __builtin_clzll(n));
  size_t step = top / 8 < 4096 ? 4096 : top / 8;
  return (n + step - 1) / step * step;
}

struct Pool {
  std::mutex mutex;
  std::map<size_t, std::vector<void*>> free_blocks;
  std::unordered_map<void*, size_t> live_blocks;
  size_t live_bytes = 0;
  size_t peak_live_bytes = 0;
  size_t pooled_bytes = 0;
  size_t mappings = 0;
};

// The replaced allocator's deleter, for small blocks released through `raw_deleter`.
c10::DeleterFnPtr fallback_deleter = nullptr;

Pool& pool() {
  // Never destroyed: tensors may be freed by static destructors after main returns.
  static Pool* p = new Pool();
  return *p;
}

void release(void* block) {
  Pool& p = pool();
  size_t size;
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    auto it = p.live_blocks.find(block);
    if (it == p.live_blocks.end()) {
      if (fallback_deleter != nullptr) {
        fallback_deleter(block);
      }
      return;
    }
    size = it->second;
    p.live_blocks.erase(it);
    p.live_bytes -= size;
    if (p.pooled_bytes + size <= p.peak_live_bytes) {
      p.free_blocks[size].push_back(block);
      p.pooled_bytes += size;
      return;
    }
    p.mappings -= 1;
  }
  munmap(block, size);
}

struct CachingCpuAllocator final : c10::Allocator {
  c10::Allocator* fallback;
  size_t min_block;

  CachingCpuAllocator(c10::Allocator* fallback, size_t min_block) : fallback(fallback), min_block(min_block) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < min_block) {
      return fallback->allocate(n);
    }
    size_t size = size_class(n);
    void* block = take_pooled(size);
    if (block == nullptr) {
      block = map_block(size);
    }
    return {block, block, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override {
    // Frees pooled-size blocks, and hands any other block to the replaced allocator's deleter.
    return fallback_deleter != nullptr ? &release : nullptr;
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  static void* take_pooled(size_t size) {
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mutex);
    auto it = p.free_blocks.find(size);
    if (it == p.free_blocks.end() || it->second.empty()) {
      return nullptr;
    }
    void* block = it->second.back();
    it->second.pop_back();
    p.pooled_bytes -= size;
    note_live(p, block, size);
    return block;
  }

  static void* map_block(size_t size) {
    void* block = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (block == MAP_FAILED) {
      // Give the pool back to the system and try once more before reporting.
      drain();
      block = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    }
    TORCH_CHECK_WITH(OutOfMemoryError, block != MAP_FAILED, "CPU out of memory: could not map ", size, " bytes");
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mutex);
    p.mappings += 1;
    note_live(p, block, size);
    return block;
  }

  static void note_live(Pool& p, void* block, size_t size) {
    p.live_blocks[block] = size;
    p.live_bytes += size;
    if (p.live_bytes > p.peak_live_bytes) {
      p.peak_live_bytes = p.live_bytes;
    }
  }

  static void drain() {
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mutex);
    for (auto& [size, blocks] : p.free_blocks) {
      for (void* block : blocks) {
        munmap(block, size);
        p.mappings -= 1;
      }
      blocks.clear();
    }
    p.pooled_bytes = 0;
  }
};

}  // namespace

extern "C" {

// Installs the caching allocator for CPU tensors of at least `min_block` bytes. Returns 0, or 1 if
// it was installed already (the first setting stays).
int lorafit_host_memory_install(size_t min_block) {
  static CachingCpuAllocator* installed = nullptr;
  if (installed != nullptr) {
    return 1;
  }
  c10::Allocator* fallback = c10::GetCPUAllocator();
  fallback_deleter = fallback->raw_deleter();
  installed = new CachingCpuAllocator(fallback, min_block);
  c10::SetCPUAllocator(installed, /*priority=*/1);
  return 0;
}

// Bytes in live and pooled blocks, and the number of mappings held (live and pooled).
void lorafit_host_memory_stats(size_t* live, size_t* pooled, size_t* mappings) {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  *live = p.live_bytes;
  *pooled = p.pooled_bytes;
  *mappings = p.mappings;
}
}
