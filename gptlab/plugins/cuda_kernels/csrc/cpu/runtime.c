/* ABI version, thread-local last error, and the fork/join used by the CPU kernels.
 *
 * The fork/join is an OpenMP parallel region, and it runs on torch's own OpenMP threads: the
 * library is linked with -fopenmp, so it needs libgomp.so.1, and in a process where torch is
 * loaded the dynamic linker binds that name to the libgomp torch already loaded (one SONAME,
 * one runtime, one pool of threads). Threads of our own (pthreads, as before) ran while torch's
 * idle OpenMP workers were still spinning after the previous op: on 2 cores a LayerNorm
 * forward + backward took 4.8 ms with 2 threads against 2.5 ms with 1. Only GOMP_parallel
 * (GOMP_4.0) and omp_get_thread_num are used, which every libgomp torch ships has. */
#include <omp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "common.h"

static _Thread_local char last_error[512];

int gptlab_abi_version(void) { return GPTLAB_ABI_VERSION; }
const char *gptlab_last_error(void) { return last_error; }
const char *gptlab_flavour(void) { return "cpu"; }

int gptlab_cuda_device_count(int *count) {
    if (!count) return gl_fail(GPTLAB_EINVAL, "cuda_device_count: null pointer");
    *count = 0;
    return GPTLAB_OK;
}

/* The tensor-core kernels are CUDA's (csrc/cuda/flash_tc.cu): the CPU library answers every
 * call with the same error (its arguments unused). */
static int cuda_only(const char *fn) {
    return gl_fail(GPTLAB_EINVAL, "%s: tensor-core kernels are in the CUDA library only", fn);
}

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-parameter"
int gptlab_flash_forward_bf16(void *o, float *lse, const void *q, const void *k, const void *v,
                              const int64_t *strides, int64_t b, int64_t nh, int64_t tq,
                              int64_t tk, int64_t d, float scale, int causal, void *stream,
                              int num_threads) {
    return cuda_only("flash_forward_bf16");
}

int gptlab_flash_forward_f16(void *o, float *lse, const void *q, const void *k, const void *v,
                             const int64_t *strides, int64_t b, int64_t nh, int64_t tq,
                             int64_t tk, int64_t d, float scale, int causal, void *stream,
                             int num_threads) {
    return cuda_only("flash_forward_f16");
}

int gptlab_flash_backward_bf16(void *dq, void *dk, void *dv, void *workspace, const void *q,
                               const void *k, const void *v, const void *o, const float *lse,
                               const void *dout, const int64_t *strides, int64_t b, int64_t nh,
                               int64_t tq, int64_t tk, int64_t d, float scale, int causal,
                               void *stream, int num_threads) {
    return cuda_only("flash_backward_bf16");
}

int gptlab_flash_backward_f16(void *dq, void *dk, void *dv, void *workspace, const void *q,
                              const void *k, const void *v, const void *o, const float *lse,
                              const void *dout, const int64_t *strides, int64_t b, int64_t nh,
                              int64_t tq, int64_t tk, int64_t d, float scale, int causal,
                              void *stream, int num_threads) {
    return cuda_only("flash_backward_f16");
}
#pragma GCC diagnostic pop

void gl_clear_error(void) { last_error[0] = 0; }

int gl_fail(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return code;
}

typedef struct {
    gl_task_fn fn;
    void *ctx;
    int64_t n_items;
    int64_t next; /* atomically incremented */
    int rc;       /* first failure */
    char err[512];
} pool_t;

static void run_worker(pool_t *pool, int thread) {
    for (;;) {
        int64_t item = __atomic_fetch_add(&pool->next, 1, __ATOMIC_RELAXED);
        if (item >= pool->n_items || __atomic_load_n(&pool->rc, __ATOMIC_RELAXED)) return;
        int rc = pool->fn(pool->ctx, item, thread);
        if (rc) {
            int expected = 0;
            if (__atomic_compare_exchange_n(&pool->rc, &expected, rc, 0, __ATOMIC_SEQ_CST,
                                            __ATOMIC_SEQ_CST))
                snprintf(pool->err, sizeof pool->err, "%s", last_error);
            return;
        }
    }
}

int gl_parallel_for(int64_t n_items, int num_threads, gl_task_fn fn, void *ctx) {
    pool_t pool = {fn, ctx, n_items, 0, 0, {0}};
    if (num_threads < 1) num_threads = 1;
    if (num_threads > 256) num_threads = 256;
    if (num_threads > n_items) num_threads = (int)(n_items > 0 ? n_items : 1);
    if (num_threads == 1) {
        run_worker(&pool, 0);
    } else {
        /* items are handed out by pool.next, so fewer threads than asked (a thread limit) is
         * fine; each thread's index is < num_threads, as the kernels' scratch assumes */
#pragma omp parallel num_threads(num_threads)
        run_worker(&pool, omp_get_thread_num());
    }
    if (pool.rc) return gl_fail(pool.rc, "%s", pool.err);
    return GPTLAB_OK;
}
