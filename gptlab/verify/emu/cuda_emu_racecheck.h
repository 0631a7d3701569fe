/* Watched pointers for the emulator's race detector (-DGL_EMU_RACECHECK; included by cuda_emu.h).
 *
 * GL_SMEM_PTR(T) and GL_GLOBAL_PTR(T) become gl_emu::watched_ptr<T>: pointer arithmetic as
 * usual, and p[i] gives a reference whose loads and stores call race_access with the source
 * line of the `[]` (an index converts to gl_emu::Index, whose constructor takes the caller's
 * std::source_location: operator[] itself cannot). Whether an address is shared or global memory
 * is decided in cuda_emu.cpp by the running block's shared-memory range. Only `[]` is watched:
 * the kernels never dereference shared memory with `*` or `->`, so those are not provided.
 */
#ifndef GPTLAB_CUDA_EMU_RACECHECK_H
#define GPTLAB_CUDA_EMU_RACECHECK_H

#include <source_location>

namespace gl_emu {

struct Index {
    int64_t i;
    const char *file;
    int line;
    Index(int64_t i_, std::source_location at = std::source_location::current())
        : i(i_), file(at.file_name()), line(int(at.line())) {}
};

template <class T>
class watched_ref {
public:
    watched_ref(T *p, const char *file, int line) : p_(p), file_(file), line_(line) {}
    operator std::remove_const_t<T>() const {
        race_access(p_, sizeof(T), Access::Read, file_, line_);
        return *p_;
    }
    const watched_ref &operator=(std::remove_const_t<T> v) const {
        race_access(p_, sizeof(T), Access::Write, file_, line_);
        *p_ = v;
        return *this;
    }
    const watched_ref &operator=(const watched_ref &o) const {
        return *this = std::remove_const_t<T>(o);
    }
    const watched_ref &operator+=(std::remove_const_t<T> v) const { return *this = *this + v; }
    const watched_ref &operator-=(std::remove_const_t<T> v) const { return *this = *this - v; }
    const watched_ref &operator*=(std::remove_const_t<T> v) const { return *this = *this * v; }
    T *operator&() const { return p_; } /* e.g. atomicAdd(&p[i], v) */

private:
    T *p_;
    const char *file_;
    int line_;
};

template <class T>
class watched_ptr {
public:
    watched_ptr(T *p = nullptr) : p_(p) {}
    template <class U>
        requires std::is_convertible_v<U *, T *>
    watched_ptr(watched_ptr<U> other) : p_(other.get()) {}
    T *get() const { return p_; }
    watched_ref<T> operator[](Index at) const { return {p_ + at.i, at.file, at.line}; }
    watched_ptr operator+(int64_t n) const { return p_ + n; }
    watched_ptr operator-(int64_t n) const { return p_ - n; }
    watched_ptr &operator+=(int64_t n) { p_ += n; return *this; }
    watched_ptr &operator-=(int64_t n) { p_ -= n; return *this; }

private:
    T *p_;
};

/* GL_SMEM_CAST: the same address seen as another type, still watched (e.g. two halves stored
 * as one 32-bit word: recorded as one 4-byte access). */
template <class U, class T>
watched_ptr<U> watched_cast(watched_ptr<T> p) {
    return reinterpret_cast<U *>(p.get());
}

} /* namespace gl_emu */

#define GL_SMEM_PTR(type) gl_emu::watched_ptr<type>
#define GL_GLOBAL_PTR(type) gl_emu::watched_ptr<type>
#define GL_SMEM_CAST(type, p) gl_emu::watched_cast<type>(p)

#endif /* GPTLAB_CUDA_EMU_RACECHECK_H */
