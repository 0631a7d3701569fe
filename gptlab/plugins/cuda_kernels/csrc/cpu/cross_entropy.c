/* Softmax cross-entropy over the vocabulary, forward (loss and gradient in one pass) and
 * backward (a scale by the incoming gradient), float32: llm.c's fused classifier idea.
 *
 * Forward, per row i of logits (n, v) with target t = targets[i]:
 *   m = max(x), s = sum(exp(x - m)), losses[i] = m + log(s) - x[t]
 *   dlogits[i] = (exp(x - m) / s - onehot(t)) / n         (only if dlogits is not NULL)
 * The exponentials go straight into the dlogits row and are scaled in place while the row is in
 * L1, so no probability tensor exists besides the gradient itself (what F.cross_entropy keeps
 * is log_softmax(logits), the same size). loss = mean of losses, summed in double in row order
 * on the calling thread: deterministic for any number of threads. Targets are checked (outside
 * [0, v) is GPTLAB_EINVAL) before any row is read.
 *
 * Backward: dx = dlogits * dloss[0] (the mean already divided by n in the forward).
 *
 * Reference: F.cross_entropy in float64 (tests/kernels/test_rowwise_kernels.py).
 * Check:     pytest tests/kernels/test_rowwise_kernels.py -k cross_entropy
 * Benchmark: gpt bench ops --ops cross_entropy  (vs F.cross_entropy, same run)
 * CUDA twin: ../cuda/cross_entropy.cu
 */
#include "rowwise.h"

#define ROWS_PER_ITEM 32

typedef struct {
    float *losses, *dlogits, *dx;
    const float *logits, *dl_in;
    const int64_t *targets;
    int64_t n, v;
    float scale; /* backward: dloss */
} ce_ctx;

static int ce_fwd_rows(void *vctx, int64_t item, int thread) {
    (void)thread;
    const ce_ctx *k = (const ce_ctx *)vctx;
    const int64_t v = k->v, nv = v / RVL * RVL, rem = v - nv;
    const int64_t r0 = item * ROWS_PER_ITEM;
    const int64_t r1 = r0 + ROWS_PER_ITEM < k->n ? r0 + ROWS_PER_ITEM : k->n;
    const float inv_n = 1.f / (float)k->n;
    const rv l2e = rset1(LOG2E);
    for (int64_t row = r0; row < r1; row++) {
        const float *restrict x = k->logits + row * v;
        float *restrict dl = k->dlogits ? k->dlogits + row * v : NULL;
        /* the tail lanes are -inf: they do not move the max and their exp is 0 */
        const rv tail = rem ? rload_part(x + nv, rem, -INFINITY) : rset1(-INFINITY);
        rv mv = tail;
        for (int64_t j = 0; j < nv; j += RVL) mv = rmax(mv, rload(x + j));
        const float m = rmax_lanes(mv);
        const rv vm = rset1(m); /* exp2((x - m) log2 e): x - m is exact near the max */
        rv s0 = rset1(0.f), s1 = rset1(0.f);
        int64_t j = 0;
        if (dl) {
            for (; j < nv; j += RVL) {
                rv e = rexp2((rload(x + j) - vm) * l2e);
                rstore(dl + j, e);
                s0 += e;
            }
        } else {
            for (; j + 2 * RVL <= nv; j += 2 * RVL) {
                s0 += rexp2((rload(x + j) - vm) * l2e);
                s1 += rexp2((rload(x + j + RVL) - vm) * l2e);
            }
            if (j < nv) s0 += rexp2((rload(x + j) - vm) * l2e);
        }
        rv et = rset1(0.f);
        if (rem) {
            et = rexp2((tail - vm) * l2e);
            s1 += et;
        }
        const float sum = rsum(s0 + s1);
        const int64_t t = k->targets[row];
        k->losses[row] = m + logf(sum) - x[t];
        if (dl) {
            const rv scale = rset1(inv_n / sum);
            for (j = 0; j < nv; j += RVL) rstore(dl + j, rload(dl + j) * scale);
            if (rem) rstore_part(dl + nv, et * scale, rem);
            dl[t] -= inv_n;
        }
    }
    return GPTLAB_OK;
}

static int ce_bwd_rows(void *vctx, int64_t item, int thread) {
    (void)thread;
    const ce_ctx *k = (const ce_ctx *)vctx;
    const int64_t per = ROWS_PER_ITEM * k->v, total = k->n * k->v;
    const int64_t i0 = item * per, i1 = i0 + per < total ? i0 + per : total;
    const float *restrict src = k->dl_in;
    float *dst = k->dx; /* may alias src: each element is read before it is written */
    const rv s = rset1(k->scale);
    int64_t i = i0;
    for (; i + RVL <= i1; i += RVL) rstore(dst + i, rload(src + i) * s);
    for (; i < i1; i++) dst[i] = src[i] * k->scale;
    return GPTLAB_OK;
}

static int check(const char *fn, int64_t n, int64_t v) {
    if (n < 1 || v < 1)
        return gl_fail(GPTLAB_EINVAL, "%s: sizes must be >= 1 (n=%lld v=%lld)", fn, (long long)n,
                       (long long)v);
    return GPTLAB_OK;
}

int gptlab_cross_entropy_forward_f32(float *loss, float *losses, float *dlogits,
                                     const float *logits, const int64_t *targets, int64_t n,
                                     int64_t v, void *stream, int num_threads) {
    (void)stream;
    gl_clear_error();
    if (!loss || !losses || !logits || !targets)
        return gl_fail(GPTLAB_EINVAL, "cross_entropy_forward: null pointer");
    int rc = check("cross_entropy_forward", n, v);
    if (rc) return rc;
    for (int64_t i = 0; i < n; i++) /* never read a row past x[v - 1] */
        if (targets[i] < 0 || targets[i] >= v)
            return gl_fail(GPTLAB_EINVAL, "cross_entropy_forward: targets[%lld] = %lld is "
                           "outside [0, %lld)", (long long)i, (long long)targets[i],
                           (long long)v);
    ce_ctx k = {.losses = losses, .dlogits = dlogits, .logits = logits, .targets = targets,
                .n = n, .v = v};
    rc = gl_parallel_for((n + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM, num_threads, ce_fwd_rows, &k);
    if (rc) return rc;
    double total = 0.0;
    for (int64_t i = 0; i < n; i++) total += losses[i];
    *loss = (float)(total / (double)n);
    return GPTLAB_OK;
}

int gptlab_cross_entropy_backward_f32(float *dx, const float *dlogits, const float *dloss,
                                      int64_t n, int64_t v, void *stream, int num_threads) {
    (void)stream;
    gl_clear_error();
    if (!dx || !dlogits || !dloss)
        return gl_fail(GPTLAB_EINVAL, "cross_entropy_backward: null pointer");
    int rc = check("cross_entropy_backward", n, v);
    if (rc) return rc;
    ce_ctx k = {.dx = dx, .dl_in = dlogits, .n = n, .v = v, .scale = *dloss};
    return gl_parallel_for((n + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM, num_threads, ce_bwd_rows,
                           &k);
}
