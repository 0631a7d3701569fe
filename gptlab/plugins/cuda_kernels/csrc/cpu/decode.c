/* A fused decoding step on the CPU: one new token per sequence through the whole model in one
 * call: its embedding (+ the learned position's row), then each pre-norm block (Radford et al.
 * 2019),
 *
 *   h = N1(x);  q, k, v = h Wqkv^T + bqkv;  q, k = seam(q, k)   k, v appended to the KV cache
 *   x += attention(q, K[0..pos], V[0..pos]) Wo^T + bo
 *   h = N2(x);  x += act(h Wfc^T + bfc) Wpr^T + bpr
 *
 * with the parts gptlab builds by name (gptlab_decode_spec): N LayerNorm or RMSNorm, act GELU
 * or ReLU^2, and at the position seam QK-norm and/or rotary embeddings (in that order, as the
 * model chains them); then the final norm and the head give the logits.
 *
 * Why: with a KV cache each step is b rows of work, and done op by op from Python it costs ~100
 * calls (17 of them kernel calls), each dominated by its fixed cost (tens of microseconds on a
 * 2-core CPU, against ~1 us of arithmetic for a row). Here the weights are
 * read once per step (matrix-vector products, bound by memory bandwidth) and nothing is
 * allocated but the caller's workspace.
 *
 * The row operations are this library's own kernels, called in place: LayerNorm
 * (layernorm.c), bias + GELU (bias_gelu.c) and attention (flash.c, whose path for fewer than 4
 * query rows reads k and v where they are: here straight from the cache). New here: the
 * matrix-vector products y = x W^T (+ bias) (+ y), with W (out, in) row-major as nn.Linear
 * stores it, four outputs at a time, the dot product over `in` in vectors; and the few-row
 * RMSNorm, ReLU^2, QK-norm and rotation, written as plainly as their formulas.
 *
 * Layouts: the caches (b, nh, max_t, hs) contiguous, one per layer: the step writes row `pos`
 * and attends over rows [0, pos]; params: 12 pointers per layer in the order the header gives
 * (biases may be NULL); workspace: gptlab_decode_step_workspace_size().
 *
 * Reference: the same block run module by module (gptlab.nn.PreNormBlock with the native
 *            kernels), tests/test_fused_decode.py; greedy generation equals generation without
 *            the cache (gpt bench generate).
 * CUDA: none; on a GPU the step runs op by op (the Python path).
 */
#include <math.h>

#include "common.h"
#include "../gptlab_kernels.h"

/* y[r][o] = (accumulate ? y[r][o] : 0) + (sum_i w[o][i] x[r][i] + bias[o]) for r < b, o < out
 * (y's rows ldy apart): the residual added last, as x + sublayer(x) in the module. Each block of
 * 4 weight rows is read from memory once for all b rows. */
static void gemv_rows(float *y, int64_t ldy, const float *x, const float *w, const float *bias,
                      int64_t b, int64_t in, int64_t out, int accumulate) {
    int64_t o = 0;
    for (; o + 4 <= out; o += 4) {
        const float *w0 = w + o * in, *w1 = w0 + in, *w2 = w1 + in, *w3 = w2 + in;
        /* the rows two blocks ahead, prefetched as these are read (4 floats of them per float
         * of a row): decoding is bound by streaming the weights from memory, and the hardware
         * prefetcher alone left the step at ~60% of the bandwidth a plain sum reaches */
        const float *ahead = o + 16 <= out ? w0 + 8 * in : NULL; /* (+16: its last prefetch) */
        for (int64_t r = 0; r < b; r++) {
            const float *xr = x + r * in;
            vf a0 = vset1(0.f), a1 = a0, a2 = a0, a3 = a0;
            int64_t i = 0;
            for (; i + VL <= in; i += VL) {
                vf xv = vload(xr + i);
                if (ahead && r == 0) {
                    __builtin_prefetch(ahead + 4 * i);
                    __builtin_prefetch(ahead + 4 * i + 16);
                }
                a0 += vload(w0 + i) * xv;
                a1 += vload(w1 + i) * xv;
                a2 += vload(w2 + i) * xv;
                a3 += vload(w3 + i) * xv;
            }
            float s[4] = {vhsum(a0), vhsum(a1), vhsum(a2), vhsum(a3)};
            for (; i < in; i++) {
                s[0] += w0[i] * xr[i];
                s[1] += w1[i] * xr[i];
                s[2] += w2[i] * xr[i];
                s[3] += w3[i] * xr[i];
            }
            float *yr = y + r * ldy + o;
            for (int j = 0; j < 4; j++) {
                const float t = bias ? s[j] + bias[o + j] : s[j];
                yr[j] = accumulate ? yr[j] + t : t;
            }
        }
    }
    for (; o < out; o++) {
        const float *wo = w + o * in;
        for (int64_t r = 0; r < b; r++) {
            const float *xr = x + r * in;
            vf a = vset1(0.f);
            int64_t i = 0;
            for (; i + VL <= in; i += VL) a += vload(wo + i) * vload(xr + i);
            float s = vhsum(a);
            for (; i < in; i++) s += wo[i] * xr[i];
            const float t = bias ? s + bias[o] : s;
            y[r * ldy + o] = accumulate ? y[r * ldy + o] + t : t;
        }
    }
}

/* The matrix-vector products on several threads: work items are blocks of GEMV_BLOCK outputs. */
#define GEMV_BLOCK 64
typedef struct {
    float *y;
    const float *x, *w, *bias;
    int64_t b, in, out;
    int accumulate;
} gemv_ctx;

static int gemv_task(void *vctx, int64_t item, int thread) {
    (void)thread;
    const gemv_ctx *g = vctx;
    const int64_t o0 = item * GEMV_BLOCK, n = g->out - o0 < GEMV_BLOCK ? g->out - o0 : GEMV_BLOCK;
    /* outputs [o0, o0 + n) of every row */
    gemv_rows(g->y + o0, g->out, g->x, g->w + o0 * g->in, g->bias ? g->bias + o0 : NULL, g->b,
              g->in, n, g->accumulate);
    return GPTLAB_OK;
}

static int gemv(float *y, const float *x, const float *w, const float *bias, int64_t b,
                int64_t in, int64_t out, int accumulate, int num_threads) {
    gemv_ctx g = {y, x, w, bias, b, in, out, accumulate};
    return gl_parallel_for((out + GEMV_BLOCK - 1) / GEMV_BLOCK, num_threads, gemv_task, &g);
}

/* y = x / sqrt(mean(x^2) + eps) (* w) over each of `rows` rows of n (Zhang & Sennrich 2019). */
static void rms_rows(float *y, const float *x, const float *w, int64_t rows, int64_t n,
                     float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float *yr = y + r * n;
        float ss = 0.f;
        for (int64_t j = 0; j < n; j++) ss += xr[j] * xr[j];
        const float inv = 1.f / sqrtf(ss / (float)n + eps);
        for (int64_t j = 0; j < n; j++) yr[j] = w ? xr[j] * inv * w[j] : xr[j] * inv;
    }
}

/* The pairs (x[i], x[i + hs/2]) of one head rotated by this position's angles (Su et al. 2021),
 * as gptlab.nn.positions.rotate does. */
static void rotate_head(float *x, const float *cos_, const float *sin_, int64_t hs) {
    const int64_t half = hs / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = x[i], b = x[i + half];
        x[i] = a * cos_[i] - b * sin_[i];
        x[i + half] = a * sin_[i] + b * cos_[i];
    }
}

static int norm_rows(float *y, float *mean, float *rstd, const float *x, const float *w,
                     const float *bias, int64_t b, int64_t c, const gptlab_decode_spec *spec) {
    if (spec->rms_norm) {
        rms_rows(y, x, w, b, c, spec->eps);
        return GPTLAB_OK;
    }
    return gptlab_layernorm_forward_f32(y, mean, rstd, x, w, bias, b, c, spec->eps, NULL, 1);
}

/* Floats of one block's scratch: per row h (c), qkv (3c), attention output (c), the hidden
 * layer and its activation (2 * 4c), mean and rstd (1 each), lse (nh); once a zero bias (4c). */
static int64_t block_scratch(int64_t b, int64_t c, int64_t nh) {
    return b * (c + 3 * c + c + 8 * c + 2 + nh) + 4 * c;
}

enum { LN1_W, LN1_B, QKV_W, QKV_B, PROJ_W, PROJ_B, LN2_W, LN2_B, FC_W, FC_B, PR_W, PR_B,
       N_PARAMS };

/* One block for the new token: x (b, c) updated in place, k and v written to row pos. */
static int block_step(float *x, float *k_cache, float *v_cache, float *ws,
                      const float *const *params, const gptlab_decode_spec *spec, int64_t b,
                      int64_t c, int64_t nh, int64_t pos, int64_t max_t, int num_threads) {
    if (!k_cache || !v_cache)
        return gl_fail(GPTLAB_EINVAL, "decode_step: a KV cache pointer is NULL");
    if (!params[LN1_W] || !params[QKV_W] || !params[PROJ_W] || !params[LN2_W] || !params[FC_W]
        || !params[PR_W])
        return gl_fail(GPTLAB_EINVAL, "decode_step: a weight pointer is NULL");
    const int64_t hs = c / nh, f = 4 * c;
    float *h = ws, *qkv = h + b * c, *att = qkv + b * 3 * c, *hid = att + b * c;
    float *act = hid + b * f, *zero = act + b * f, *mean = zero + f, *rstd = mean + b;
    float *lse = rstd + b;
    int rc;

    /* attention sub-layer */
    if ((rc = norm_rows(h, mean, rstd, x, params[LN1_W], params[LN1_B], b, c, spec))) return rc;
    if ((rc = gemv(qkv, h, params[QKV_W], params[QKV_B], b, c, 3 * c, 0, num_threads)))
        return rc;
    for (int64_t r = 0; r < b; r++) { /* the position seam: QK-norm, then rotary, on q and k */
        float *qk = qkv + r * 3 * c; /* q (nh heads of hs), then k */
        if (spec->qk_norm) rms_rows(qk, qk, NULL, 2 * nh, hs, spec->qk_eps);
        if (spec->rope_cos)
            for (int64_t hd = 0; hd < 2 * nh; hd++)
                rotate_head(qk + hd * hs, spec->rope_cos, spec->rope_sin, hs);
    }
    for (int64_t r = 0; r < b; r++)
        for (int64_t hd = 0; hd < nh; hd++) {
            const int64_t row = ((r * nh + hd) * max_t + pos) * hs;
            memcpy(k_cache + row, qkv + r * 3 * c + c + hd * hs, (size_t)hs * sizeof(float));
            memcpy(v_cache + row, qkv + r * 3 * c + 2 * c + hd * hs, (size_t)hs * sizeof(float));
        }
    /* (batch, head, row) strides in floats: q is the first third of each qkv row, the caches
     * (b, nh, max_t, hs), the output (b, 1, nh, hs), i.e. heads concatenated */
    const int64_t strides[12] = {3 * c, hs, 3 * c, nh * max_t * hs, max_t * hs, hs,
                                 nh * max_t * hs, max_t * hs, hs, c, hs, c};
    if ((rc = gptlab_flash_forward_f32(att, lse, qkv, k_cache, v_cache, strides, b, nh, 1,
                                       pos + 1, hs, 1.f / sqrtf((float)hs), 1, NULL, 1)))
        return rc;
    if ((rc = gemv(x, att, params[PROJ_W], params[PROJ_B], b, c, c, 1, num_threads))) return rc;

    /* MLP sub-layer */
    if ((rc = norm_rows(h, mean, rstd, x, params[LN2_W], params[LN2_B], b, c, spec))) return rc;
    if (spec->relu2) { /* relu(h W^T + b)^2 (So et al. 2021) */
        if ((rc = gemv(act, h, params[FC_W], params[FC_B], b, c, f, 0, num_threads))) return rc;
        for (int64_t j = 0; j < b * f; j++) act[j] = act[j] > 0.f ? act[j] * act[j] : 0.f;
        return gemv(x, act, params[PR_W], params[PR_B], b, f, c, 1, num_threads);
    }
    if ((rc = gemv(hid, h, params[FC_W], NULL, b, c, f, 0, num_threads))) return rc;
    const float *fc_bias = params[FC_B];
    if (!fc_bias) {
        memset(zero, 0, (size_t)f * sizeof(float));
        fc_bias = zero;
    }
    if ((rc = gptlab_bias_gelu_forward_f32(act, hid, fc_bias, b, f, NULL, 1))) return rc;
    return gemv(x, act, params[PR_W], params[PR_B], b, f, c, 1, num_threads);
}

int64_t gptlab_decode_step_workspace_size(int64_t b, int64_t c, int64_t nh) {
    if (b < 1 || c < 1 || nh < 1) return 0;
    return (b * c + block_scratch(b, c, nh)) * (int64_t)sizeof(float); /* x, then a block's */
}

int gptlab_decode_step_f32(float *logits, float *const *k_caches, float *const *v_caches,
                           void *workspace, const int64_t *ids, const float *wte,
                           const float *wpe, const float *const *params, const float *norm_w,
                           const float *norm_b, const float *head_w,
                           const gptlab_decode_spec *spec, int64_t n_layer, int64_t b, int64_t c,
                           int64_t nh, int64_t vocab, int64_t pos, int64_t max_t,
                           int num_threads) {
    gl_clear_error();
    if (!logits || !k_caches || !v_caches || !workspace || !ids || !wte || !params || !norm_w
        || !head_w || !spec)
        return gl_fail(GPTLAB_EINVAL, "decode_step: null pointer");
    if (n_layer < 1 || b < 1 || c < 1 || nh < 1 || c % nh || vocab < 1)
        return gl_fail(GPTLAB_EINVAL, "decode_step: need n_layer, b, c, nh, vocab >= 1 and nh "
                       "dividing c (n_layer=%lld b=%lld c=%lld nh=%lld vocab=%lld)",
                       (long long)n_layer, (long long)b, (long long)c, (long long)nh,
                       (long long)vocab);
    if (pos < 0 || pos >= max_t)
        return gl_fail(GPTLAB_EINVAL, "decode_step: position %lld outside the cache's %lld rows",
                       (long long)pos, (long long)max_t);
    if ((spec->rope_cos == NULL) != (spec->rope_sin == NULL) || (spec->rope_cos && (c / nh) % 2))
        return gl_fail(GPTLAB_EINVAL, "decode_step: rotary needs both cos and sin and an even "
                       "head dim (hs=%lld)", (long long)(c / nh));
    float *x = workspace, *ws = x + b * c;
    for (int64_t r = 0; r < b; r++) { /* token embedding (+ the learned position's row) */
        if (ids[r] < 0 || ids[r] >= vocab)
            return gl_fail(GPTLAB_EINVAL, "decode_step: token id %lld outside [0, %lld)",
                           (long long)ids[r], (long long)vocab);
        const float *e = wte + ids[r] * c;
        for (int64_t j = 0; j < c; j++) x[r * c + j] = wpe ? e[j] + wpe[pos * c + j] : e[j];
    }
    int rc;
    for (int64_t l = 0; l < n_layer; l++)
        if ((rc = block_step(x, k_caches[l], v_caches[l], ws, params + l * N_PARAMS, spec, b, c,
                             nh, pos, max_t, num_threads)))
            return rc;
    float *h = ws, *mean = ws + b * c, *rstd = mean + b; /* the final norm, then the head */
    if ((rc = norm_rows(h, mean, rstd, x, norm_w, norm_b, b, c, spec))) return rc;
    return gemv(logits, h, head_w, NULL, b, c, vocab, 0, num_threads);
}
