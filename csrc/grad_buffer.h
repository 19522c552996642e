// A one-slot cache of the large CPU buffers that hold token_logprob's gradients.
//
// A fresh [N, V] gradient (600 MB for N = 2048, V = 151936, bf16) is a fresh mmap on every
// backward: the OS must fault in and zero every page before the kernel writes it, and on the
// VM this project runs on (free pages are reported to the host, THP only on madvise) that
// took longer than computing the gradient. The cache keeps the last freed gradient buffer
// mapped and hands it to the next backward that needs at most its size (and at least half of
// it), so a training loop touches fresh memory once, not every step. It holds at most one
// buffer while no gradient is alive; `release()` unmaps it, OPENR1_MEGA_GRAD_CACHE=0 bypasses
// the cache (every gradient is then a fresh mapping, unmapped when freed).
//
// Buffers are 2 MiB aligned anonymous mappings advised for transparent huge pages (Linux);
// elsewhere acquire() returns no buffer and the caller allocates as usual.
#pragma once

#include <cstddef>

namespace openr1_mega {

struct GradBuffer {
  void* data = nullptr;   // null: no buffer (too small, not Linux, or the mapping failed)
  size_t capacity = 0;    // bytes mapped at data
};

// Buffers below this size are left to the ordinary allocator (cheap to fault in).
constexpr size_t kMinCachedGradBytes = size_t{16} << 20;

// A buffer of at least `nbytes`: the cached one when nbytes is in [capacity / 2, capacity],
// else a new mapping (the cached one, too large or too small, is unmapped first).
GradBuffer acquire_grad_buffer(size_t nbytes);

// Gives a buffer back (the tensor that held it was freed): it becomes the cached one if the
// slot is free or holds a smaller buffer; the other is unmapped.
void give_back_grad_buffer(GradBuffer buffer);

// Unmaps the cached buffer; returns its size in bytes (0 if none was cached).
size_t release_grad_cache();

}  // namespace openr1_mega
