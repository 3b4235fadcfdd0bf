// A small thread pool for the kernels, robust to a shared, oversubscribed CPU.
//
// OpenMP (at::parallel_for) ends every parallel region with a barrier that waits for every thread of the team,
// including one the OS has not scheduled yet: on a 2-core machine shared with other processes a decode step's
// ~150 small regions then each waited for a time slice (measured: 0.9 tok/s instead of 30 with one thread).
// Here the calling thread and the workers take chunks from one atomic counter; the caller waits only for chunks
// a worker has actually started, so a worker that never woke up costs nothing.
#pragma once

#include <cstdint>
#include <functional>

namespace omnimini {

// Runs fn(chunk) for chunk = 0..n_chunks-1 on the caller and up to at::get_num_threads() - 1 workers.
void parallel_chunks(int64_t n_chunks, const std::function<void(int64_t)>& fn);

// fn(begin, end) over [0, n) in pieces of at least `grain` items (one piece per thread when n is small).
inline void parallel_range(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  const int64_t pieces = (n + grain - 1) / grain;
  const int64_t per = (n + pieces - 1) / pieces;
  parallel_chunks(pieces, [&](int64_t c) {
    const int64_t b = c * per, e = b + per < n ? b + per : n;
    if (b < e) fn(b, e);
  });
}

}  // namespace omnimini
