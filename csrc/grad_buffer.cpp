// The gradient buffer cache (grad_buffer.h): one slot under a mutex.
#include "grad_buffer.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <utility>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace openr1_mega {
namespace {

constexpr size_t kHugePage = size_t{1} << 21;

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

bool cache_enabled() {
  const char* env = std::getenv("OPENR1_MEGA_GRAD_CACHE");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

#ifdef __linux__
// A 2 MiB aligned anonymous mapping of `capacity` bytes (a multiple of 2 MiB), advised for
// huge pages, so that THP can back it from the first byte.
GradBuffer map_buffer(size_t capacity) {
  const size_t span = capacity + kHugePage;
  void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) {
    return {};
  }
  const auto begin = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = round_up(begin, kHugePage);
  if (aligned > begin) {
    munmap(raw, aligned - begin);
  }
  const size_t tail = begin + span - (aligned + capacity);
  if (tail > 0) {
    munmap(reinterpret_cast<void*>(aligned + capacity), tail);
  }
  void* data = reinterpret_cast<void*>(aligned);
#ifdef MADV_HUGEPAGE
  madvise(data, capacity, MADV_HUGEPAGE);  // advice: may fail (THP "never")
#endif
  return {data, capacity};
}

void unmap_buffer(GradBuffer buffer) {
  if (buffer.data != nullptr) {
    munmap(buffer.data, buffer.capacity);
  }
}
#else
GradBuffer map_buffer(size_t) { return {}; }
void unmap_buffer(GradBuffer) {}
#endif

// The slot; never destroyed, so a gradient freed during static destruction still finds it.
struct Slot {
  std::mutex mutex;
  GradBuffer cached;
};

Slot& slot() {
  static Slot* instance = new Slot;
  return *instance;
}

}  // namespace

GradBuffer acquire_grad_buffer(size_t nbytes) {
  if (nbytes < kMinCachedGradBytes) {
    return {};
  }
  const size_t capacity = round_up(nbytes, kHugePage);
  if (cache_enabled()) {
    GradBuffer stale;
    {
      std::lock_guard<std::mutex> lock(slot().mutex);
      GradBuffer& cached = slot().cached;
      if (cached.data != nullptr && cached.capacity >= capacity &&
          cached.capacity / 2 <= nbytes) {
        return std::exchange(cached, GradBuffer{});
      }
      stale = std::exchange(cached, GradBuffer{});  // unmapped before the new one is mapped
    }
    unmap_buffer(stale);
  }
  return map_buffer(capacity);
}

void give_back_grad_buffer(GradBuffer buffer) {
  if (!cache_enabled()) {
    unmap_buffer(buffer);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(slot().mutex);
    GradBuffer& cached = slot().cached;
    if (cached.capacity < buffer.capacity) {
      std::swap(cached, buffer);  // keep the larger; unmap the other (maybe none) below
    }
  }
  unmap_buffer(buffer);
}

size_t release_grad_cache() {
  GradBuffer cached;
  {
    std::lock_guard<std::mutex> lock(slot().mutex);
    cached = std::exchange(slot().cached, GradBuffer{});
  }
  unmap_buffer(cached);
  return cached.capacity;
}

}  // namespace openr1_mega
