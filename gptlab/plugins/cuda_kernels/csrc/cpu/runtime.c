/* ABI version, thread-local last error, and the pthread fork/join used by the CPU kernels. */
#include <pthread.h>
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

typedef struct {
    pool_t *pool;
    int thread;
} worker_t;

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

static void *worker_main(void *arg) {
    worker_t *w = (worker_t *)arg;
    run_worker(w->pool, w->thread);
    return NULL;
}

int gl_parallel_for(int64_t n_items, int num_threads, gl_task_fn fn, void *ctx) {
    pool_t pool = {fn, ctx, n_items, 0, 0, {0}};
    if (num_threads < 1) num_threads = 1;
    if (num_threads > 256) num_threads = 256;
    if (num_threads > n_items) num_threads = (int)(n_items > 0 ? n_items : 1);
    pthread_t tids[256];
    worker_t workers[256];
    int started = 0;
    for (int t = 1; t < num_threads; t++) {
        workers[t] = (worker_t){&pool, t};
        if (pthread_create(&tids[t], NULL, worker_main, &workers[t]) != 0) break;
        started = t;
    }
    run_worker(&pool, 0);
    for (int t = 1; t <= started; t++) pthread_join(tids[t], NULL);
    if (pool.rc) return gl_fail(pool.rc, "%s", pool.err);
    return GPTLAB_OK;
}
