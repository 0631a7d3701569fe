/* Fused scale + causal mask + softmax over the rows of a (bh, tq, tk) score tensor, and its
 * backward dx = scale * y * (dy - rowsum(y * dy)). One pass per row over memory that stays in
 * cache; no mask tensor and no second (tq, tk) temporary.
 *
 * Reference: torch.softmax in float64 (tests/kernels/test_cpu_kernels.py), and through the
 *            `fused` backend gptlab.testing.reference_attention.
 * Check:     gpt kernels check --flavour cpu       (pytest tests/kernels/test_conformance.py)
 * Benchmark: gpt bench attention --backends fused  (vs sdpa, same run)
 * CUDA twin: ../cuda/softmax.cu
 */
#include "common.h"

typedef struct {
    float *out;
    const float *a, *b;
    int64_t tq, tk, rows;
    float scale;
    int causal;
} softmax_ctx;

#define ROWS_PER_ITEM 16

static int64_t visible(const softmax_ctx *c, int64_t row) {
    if (!c->causal) return c->tk;
    int64_t i = row % c->tq, n = i + (c->tk - c->tq) + 1;
    return n < 0 ? 0 : (n > c->tk ? c->tk : n);
}

static int softmax_fwd_rows(void *vctx, int64_t item, int thread) {
    (void)thread;
    const softmax_ctx *c = (const softmax_ctx *)vctx;
    const int64_t tk = c->tk, end = (item + 1) * ROWS_PER_ITEM;
    const float s2 = c->scale * LOG2E;
    for (int64_t row = item * ROWS_PER_ITEM; row < end && row < c->rows; row++) {
        const float *x = c->a + row * tk;
        float *y = c->out + row * tk;
        const int64_t n = visible(c, row), nv = n / VL * VL;
        if (n == 0) { memset(y, 0, (size_t)tk * sizeof *y); continue; }
        vf mv = vset1(-INFINITY);
        for (int64_t j = 0; j < nv; j += VL) mv = vmax(mv, vload(x + j));
        float m = vhmax(mv);
        for (int64_t j = nv; j < n; j++) m = x[j] > m ? x[j] : m;
        if (m == -INFINITY) m = 0.f; /* all visible scores -inf: shift by 0, never -inf - -inf */
        const vf shift = vset1(m * s2), vs2 = vset1(s2);
        vf sv = vset1(0.f);
        for (int64_t j = 0; j < nv; j += VL) {
            vf p = vexp2(vload(x + j) * vs2 - shift);
            vstore(y + j, p);
            sv += p;
        }
        float sum = vhsum(sv);
        if (nv < n) { /* tail: pad a vector with -inf */
            float tmp[VL];
            for (int i = 0; i < VL; i++) tmp[i] = nv + i < n ? x[nv + i] : -INFINITY;
            vf p = vexp2(vload(tmp) * vs2 - shift);
            for (int64_t j = nv; j < n; j++) { y[j] = p[j - nv]; sum += p[j - nv]; }
        }
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        const vf vinv = vset1(inv);
        for (int64_t j = 0; j < nv; j += VL) vstore(y + j, vload(y + j) * vinv);
        for (int64_t j = nv; j < n; j++) y[j] *= inv;
        if (n < tk) memset(y + n, 0, (size_t)(tk - n) * sizeof *y);
    }
    return GPTLAB_OK;
}

static int softmax_bwd_rows(void *vctx, int64_t item, int thread) {
    (void)thread;
    const softmax_ctx *c = (const softmax_ctx *)vctx;
    const int64_t tk = c->tk, end = (item + 1) * ROWS_PER_ITEM;
    for (int64_t row = item * ROWS_PER_ITEM; row < end && row < c->rows; row++) {
        const float *y = c->a + row * tk, *dy = c->b + row * tk;
        float *dx = c->out + row * tk;
        const int64_t n = visible(c, row), nv = n / VL * VL; /* y is 0 past n */
        vf dv = vset1(0.f);
        for (int64_t j = 0; j < nv; j += VL) dv += vload(y + j) * vload(dy + j);
        float dot = vhsum(dv);
        for (int64_t j = nv; j < n; j++) dot += y[j] * dy[j];
        const vf vdot = vset1(dot), vscale = vset1(c->scale);
        for (int64_t j = 0; j < nv; j += VL)
            vstore(dx + j, vscale * vload(y + j) * (vload(dy + j) - vdot));
        for (int64_t j = nv; j < n; j++) dx[j] = c->scale * y[j] * (dy[j] - dot);
        if (n < tk) memset(dx + n, 0, (size_t)(tk - n) * sizeof *dx);
    }
    return GPTLAB_OK;
}

static int check(const void *out, const void *a, const void *b, int64_t bh, int64_t tq,
                 int64_t tk, float scale, const char *fn) {
    if (!out || !a || !b) return gl_fail(GPTLAB_EINVAL, "%s: null pointer", fn);
    if (bh < 1 || tq < 1 || tk < 1)
        return gl_fail(GPTLAB_EINVAL, "%s: sizes must be >= 1 (bh=%lld tq=%lld tk=%lld)", fn,
                       (long long)bh, (long long)tq, (long long)tk);
    if (!(scale > 0.f) || !isfinite(scale))
        return gl_fail(GPTLAB_EINVAL, "%s: scale must be finite and > 0, got %g", fn, scale);
    return GPTLAB_OK;
}

static int run_rows(softmax_ctx *c, gl_task_fn rows_fn, int num_threads) {
    return gl_parallel_for((c->rows + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM, num_threads, rows_fn,
                           c);
}

int gptlab_softmax_forward_f32(float *y, const float *x, int64_t bh, int64_t tq, int64_t tk,
                               float scale, int causal, void *stream, int num_threads) {
    (void)stream;
    gl_clear_error();
    int rc = check(y, x, x, bh, tq, tk, scale, "softmax_forward");
    if (rc) return rc;
    softmax_ctx c = {y, x, NULL, tq, tk, bh * tq, scale, causal};
    return run_rows(&c, softmax_fwd_rows, num_threads);
}

int gptlab_softmax_backward_f32(float *dx, const float *y, const float *dy, int64_t bh,
                                int64_t tq, int64_t tk, float scale, int causal, void *stream,
                                int num_threads) {
    (void)stream;
    gl_clear_error();
    int rc = check(dx, y, dy, bh, tq, tk, scale, "softmax_backward");
    if (rc) return rc;
    softmax_ctx c = {dx, y, dy, tq, tk, bh * tq, scale, causal};
    return run_rows(&c, softmax_bwd_rows, num_threads);
}
