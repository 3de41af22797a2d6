// Buffers that sit right against an inaccessible page, so reading one element past the
// end (or before the start) faults at once instead of depending on the heap's layout.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace fovea::test {

template <class T>
class guarded_buffer {
 public:
  enum class guard { after, before };

  guarded_buffer(const std::vector<T>& values, guard where) : n_(values.size()) {
    const std::size_t page = std::size_t(sysconf(_SC_PAGESIZE));
    const std::size_t bytes = n_ * sizeof(T);
    const std::size_t data_pages = (bytes + page - 1) / page;
    total_ = (data_pages + 1) * page;
    void* base = mmap(nullptr, total_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) throw std::runtime_error("mmap failed");
    base_ = static_cast<std::byte*>(base);
    if (where == guard::after) {
      mprotect(base_ + data_pages * page, page, PROT_NONE);
      data_ = reinterpret_cast<T*>(base_ + data_pages * page - bytes);
    } else {
      mprotect(base_, page, PROT_NONE);
      data_ = reinterpret_cast<T*>(base_ + page);
    }
    if (bytes) std::memcpy(static_cast<void*>(data_), values.data(), bytes);
  }
  ~guarded_buffer() { munmap(base_, total_); }
  guarded_buffer(const guarded_buffer&) = delete;
  guarded_buffer& operator=(const guarded_buffer&) = delete;

  T* data() const { return data_; }
  std::vector<T> values() const { return std::vector<T>(data_, data_ + n_); }

 private:
  std::size_t n_, total_ = 0;
  std::byte* base_ = nullptr;
  T* data_ = nullptr;
};

}  // namespace fovea::test
