/* Shared helpers of the CPU kernels: float vectors of the machine's native width (GCC/Clang
 * vector extensions: 16 lanes with AVX-512, 8 with AVX2, 4 with SSE or NEON; wider vectors than
 * the machine has are split by the compiler, and GCC 12 does it badly on AVX2: accumulators
 * moved through the stack, comparisons lane by lane, flash attention 4x slower than with 8
 * lanes and 150 s to compile), a branch-free vector exp2, error reporting and
 * a tiny fork/join on torch's own OpenMP threads (runtime.c says how it shares torch's libgomp
 * rather than bringing a second runtime). Never build with -ffast-math / -Ofast: masking relies
 * on -inf. */
#ifndef GPTLAB_CPU_COMMON_H
#define GPTLAB_CPU_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "../gptlab_kernels.h"

#if defined(__AVX512F__)
#define VL 16 /* lanes per vector */
#elif defined(__AVX__)
#define VL 8
#else
#define VL 4
#endif
typedef float vf __attribute__((vector_size(VL * 4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));

#define GL_INLINE static inline __attribute__((always_inline))

GL_INLINE vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
GL_INLINE void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }
GL_INLINE vf vset1(float s) { return (vf){0} + s; }
GL_INLINE vf vmax(vf a, vf b) { vi m = a > b; return (vf)((m & (vi)a) | (~m & (vi)b)); }
GL_INLINE float vhmax(vf v) { float m = v[0]; for (int i = 1; i < VL; i++) m = v[i] > m ? v[i] : m; return m; }
GL_INLINE float vhsum(vf v) { float s = 0.f; for (int i = 0; i < VL; i++) s += v[i]; return s; }

/* 2^x for x in [-126, 127] (the caller guarantees it), relative error ~2e-7. */
GL_INLINE vf vexp2_in_range(vf x) {
    const vf magic = vset1(12582912.0f); /* 1.5*2^23 */
    vf t = x + magic;                    /* round to nearest integer, in the mantissa bits */
    vf n = t - magic;
    vi ni = (vi)t - (vi)magic;
    vf f = x - n;                        /* f in [-0.5, 0.5] */
    /* Taylor series of 2^f = e^(f ln2) to degree 6 */
    vf p = vset1(1.5403530393381606e-4f);
    p = p * f + vset1(1.3333558146428443e-3f);
    p = p * f + vset1(9.6181291076284772e-3f);
    p = p * f + vset1(5.5504108664821580e-2f);
    p = p * f + vset1(2.4022650695910071e-1f);
    p = p * f + vset1(6.9314718055994531e-1f);
    p = p * f + vset1(1.0f);
    return p * (vf)((ni + 127) << 23);
}

/* 2^x, relative error ~2e-7; x <= -126 (incl. -inf) gives exactly 0; x is clamped to <= 127. */
GL_INLINE vf vexp2(vf x) {
    const vf lo = vset1(-126.0f), hi = vset1(127.0f);
    vi live = x > lo;
    x = vmax(x, lo);
    x = (vf)(((vi)(x < hi) & (vi)x) | (~(vi)(x < hi) & (vi)hi));
    return (vf)((vi)vexp2_in_range(x) & live);
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
