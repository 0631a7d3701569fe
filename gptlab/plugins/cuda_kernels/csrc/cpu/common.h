/* Shared helpers of the CPU kernels: 16-lane float vectors (GCC/Clang vector extensions, lowered
 * to AVX-512, AVX2, SSE or NEON by the compiler), a branch-free vector exp2, error reporting and
 * a tiny pthread fork/join. No OpenMP runtime is linked (torch brings its own libgomp; two
 * runtimes in one process oversubscribe cores). Never build with -ffast-math / -Ofast: masking
 * relies on -inf. */
#ifndef GPTLAB_CPU_COMMON_H
#define GPTLAB_CPU_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "../gptlab_kernels.h"

#define VL 16 /* lanes per vector */
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

#define GL_INLINE static inline __attribute__((always_inline))

GL_INLINE vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
GL_INLINE void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }
GL_INLINE vf vset1(float s) { return (vf){0} + s; }
GL_INLINE vf vmax(vf a, vf b) { vi m = a > b; return (vf)((m & (vi)a) | (~m & (vi)b)); }
GL_INLINE float vhmax(vf v) { float m = v[0]; for (int i = 1; i < VL; i++) m = v[i] > m ? v[i] : m; return m; }
GL_INLINE float vhsum(vf v) { float s = 0.f; for (int i = 0; i < VL; i++) s += v[i]; return s; }

/* 2^x, relative error ~2e-7; x <= -126 (incl. -inf) gives exactly 0; x is clamped to <= 127. */
GL_INLINE vf vexp2(vf x) {
    const vf lo = vset1(-126.0f), hi = vset1(127.0f), magic = vset1(12582912.0f); /* 1.5*2^23 */
    vi live = x > lo;
    x = vmax(x, lo);
    x = (vf)(((vi)(x < hi) & (vi)x) | (~(vi)(x < hi) & (vi)hi));
    vf t = x + magic;                     /* round to nearest integer, in the mantissa bits */
    vf n = t - magic;
    vi ni = (vi)t - (vi)magic;
    vf f = x - n;                         /* f in [-0.5, 0.5] */
    /* Taylor series of 2^f = e^(f ln2) to degree 6 */
    vf p = vset1(1.5403530393381606e-4f);
    p = p * f + vset1(1.3333558146428443e-3f);
    p = p * f + vset1(9.6181291076284772e-3f);
    p = p * f + vset1(5.5504108664821580e-2f);
    p = p * f + vset1(2.4022650695910071e-1f);
    p = p * f + vset1(6.9314718055994531e-1f);
    p = p * f + vset1(1.0f);
    vi scale = (ni + 127) << 23;
    return (vf)(((vi)(p * (vf)scale)) & live);
}

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

int gl_fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void gl_clear_error(void);

/* Run fn(ctx, item) for item in [0, n_items) on up to num_threads threads (the caller is one of
 * them). Items are handed out dynamically. Returns the first non-zero code any call returned. */
typedef int (*gl_task_fn)(void *ctx, int64_t item, int thread);
int gl_parallel_for(int64_t n_items, int num_threads, gl_task_fn fn, void *ctx);

GL_INLINE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

#endif
