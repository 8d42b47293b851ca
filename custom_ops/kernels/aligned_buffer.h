// A 64-byte-aligned heap array: scratch for activations and accumulator tiles.
#pragma once

#include <cstddef>
#include <cstring>
#include <new>

namespace fastonnx {

template <class T>
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(size_t count, bool zero = false)
      : size_(count),
        data_(count ? static_cast<T*>(::operator new(count * sizeof(T), std::align_val_t{64}))
                    : nullptr) {
    if (zero && data_) std::memset(static_cast<void*>(data_), 0, count * sizeof(T));
  }
  AlignedBuffer(AlignedBuffer&& o) noexcept : size_(o.size_), data_(o.data_) {
    o.data_ = nullptr;
    o.size_ = 0;
  }
  AlignedBuffer& operator=(AlignedBuffer&& o) noexcept {
    std::swap(size_, o.size_);
    std::swap(data_, o.data_);
    return *this;
  }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  ~AlignedBuffer() {
    if (data_) ::operator delete(data_, std::align_val_t{64});
  }

  T* data() { return data_; }
  const T* data() const { return data_; }
  size_t size() const { return size_; }
  T& operator[](size_t i) { return data_[i]; }
  const T& operator[](size_t i) const { return data_[i]; }

 private:
  size_t size_ = 0;
  T* data_ = nullptr;
};

}  // namespace fastonnx
