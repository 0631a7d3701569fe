/* Flash attention on the CPU: forward with the online softmax, and the memory-efficient backward
 * that recomputes P from q, k and the saved logsumexp (Dao et al. 2022, FlashAttention; Dao 2023,
 * FlashAttention-2; Milakov & Gimelshein 2018 for the online softmax).
 *
 * Layout of the work: a query *group* is R = 4 rows, a key *tile* BC = 4 vectors of columns (32
 * on AVX2, 64 on AVX-512). Each (batch, head) slice is first copied into per-thread scratch with
 * the head dim padded to a multiple of the vector width and K (and V in backward) transposed tile
 * by tile, so that every inner product is a broadcast-FMA over vectors with no bounds checks;
 * masks handle columns >= tk and the causal diagonal (aligned bottom-right: query i sees key
 * j <= i + tk - tq). Tiles entirely above the diagonal are skipped, and so are the vectors of a
 * diagonal tile that no row of the group sees (a quarter of the work at T = 128, where half the
 * tiles are diagonal). Scores are kept in base 2: q
 * is pre-multiplied by scale * log2(e) so that exp becomes exp2; lse is stored in natural log.
 *
 * Layouts: q, k, v, o (and do, dq, dk, dv) are strided: element [b][h][i][j] of each is at
 * b * sb + h * sh + i * st + j, so the model passes the views that come out of its qkv projection
 * (no copy before the call) and gets o, dq, dk, dv written in the layout it concatenates heads
 * in (no copy after). The copy into scratch happens anyway (padding, transposed K tiles), so
 * reading strided rows costs nothing.
 *
 * Register blocking: the small products (S = Q K^T, O += P V, and in the backward dV +=
 * P^T dO, dK += dS^T Q, dQ += dS K) keep a block of R rows times XS or XA vectors in registers
 * and everything else (scores, the running O, dk and dv of a tile) in L1-resident scratch, sized
 * for the 16 vector registers of AVX2 (XS = XA = 2) or the 32 of AVX-512 (XS = XA = 4).
 * Vectors are of the machine's native width (common.h): GCC splits wider vectors badly.
 *
 * Memory: the inputs come from the op before (the qkv projection) and have left the cache, so a
 * work item prefetches the next one's rows as it computes (prefetch_part): at the default
 * preset's shape, a quarter of the time was stalls in the copies into scratch without it.
 *
 * Forward work items are (slice, 64-query chunk); with fewer than R query rows (decoding with
 * a KV cache) each row instead reads k and v in place, with no scratch (decode_task). Backward
 * items are slices (each slice owns its dq, dk, dv rows, so no atomics and the result is
 * deterministic). Per-thread scratch is allocated once per call: O((tq + tk) * d) floats per
 * thread, never tq x tk.
 *
 * Precision (FlashAttention's rule: error vs float64 within 2x that of float32 torch attention,
 * checked at T = 2048 in tests/kernels/test_conformance.py): sums whose length grows with the
 * sizes are float32 in two levels (dk, dv per block of QBLOCK queries, dq per key tile, dot
 * products over the head dim per VL terms); lse, lse * log2(e) and D are computed in double
 * (per row).
 *
 * Reference: gptlab.testing.reference_attention (float64 softmax attention, same mask).
 * Check:     gpt kernels check --flavour cpu       (pytest tests/kernels/test_conformance.py)
 * Benchmark: gpt bench attention --backends flash  (vs sdpa, same run)
 * CUDA twin: ../cuda/flash.cu
 */
#include <stdlib.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include "common.h"

#define R 4
#define NX 4              /* vectors per key tile */
#define BC (NX * VL)      /* keys per tile */
#if VL >= 16
#define XS 4              /* score vectors per register block (R x XS accumulators) */
#define XA 4              /* head-dim vectors per register block of the accumulating products */
#else
#define XS 2
#define XA 2
#endif
#define QCHUNK 64
#define MAX_D 256
#define MAX_NV (MAX_D / VL)
#define QBLOCK 64 /* backward: query rows per partial sum of a key tile's dk, dv */
#define LOG2E_D 1.4426950408889634074
#define LN2_D 0.6931471805599453094

/* One tensor's strides in floats: batch, head, row (the head dim is contiguous). */
typedef struct { int64_t b, h, t; } layout;

typedef struct {
    float *o, *lse, *dq, *dk, *dv, *ws;
    const float *q, *k, *v, *out, *dout, *lse_in;
    layout lq, lk, lv, lo, ldo, ldq, ldk, ldv;
    int64_t bh, nh, tq, tk, d, dp, tk_pad, tq_pad, off;
    float scale;
    int causal, threads;
    float **scratch; /* one block per thread */
    int64_t *cached_slice, *cached_tiles; /* forward: which slice's K^T / V each thread holds */
} flash_ctx;

static void *alloc_floats(int64_t n) {
    size_t bytes = (size_t)round_up(n > 0 ? n : 1, 16) * sizeof(float);
    void *p = aligned_alloc(64, bytes);
    if (p) memset(p, 0, bytes);
    return p;
}

/* The (batch, head) slice `bh` of a tensor of this layout. */
GL_INLINE const float *slice_of(const float *p, layout l, int64_t bh, int64_t nh) {
    return p + (bh / nh) * l.b + (bh % nh) * l.h;
}
GL_INLINE float *slice_out(float *p, layout l, int64_t bh, int64_t nh) {
    return p + (bh / nh) * l.b + (bh % nh) * l.h;
}

/* Last key column (inclusive) visible to row row_last; -1 if none. */
static int64_t last_visible(const flash_ctx *c, int64_t row_last) {
    if (!c->causal) return c->tk - 1;
    int64_t lim = row_last + c->off;
    return lim >= c->tk ? c->tk - 1 : lim;
}

/* Copy rows [0, n) of src (row stride st) times mul into dst (row stride dp), zero padded. */
static void copy_rows(float *dst, const float *src, int64_t n, int64_t st, int64_t d, int64_t dp,
                      float mul) {
    for (int64_t i = 0; i < n; i++) {
        for (int64_t j = 0; j < d; j++) dst[i * dp + j] = src[i * st + j] * mul;
        for (int64_t j = d; j < dp; j++) dst[i * dp + j] = 0.f;
    }
}

/* kt[t][j][c] = k[t*BC + c][j] for tiles [t0, t1); columns >= tk and rows j >= d are 0. */
static void transpose_tiles(float *kt, const float *k, int64_t st, int64_t t0, int64_t t1,
                            int64_t tk, int64_t d, int64_t dp) {
    for (int64_t t = t0; t < t1; t++) {
        float *dst = kt + t * dp * BC;
        const float *src = k + t * BC * st;
        const int64_t n = tk - t * BC < BC ? tk - t * BC : BC; /* keys in this tile */
        memset(dst, 0, (size_t)(dp * BC) * sizeof(float));
        int64_t c = 0;
#if defined(__SSE__)
        /* 4 keys x 4 of the head dim at a time: 4 loads, a 4 x 4 transpose in registers, 4
         * stores (one element at a time, this copy was a sixth of the forward at T = 128) */
        for (; c + 4 <= n; c += 4) {
            const float *r0 = src + c * st, *r1 = r0 + st, *r2 = r1 + st, *r3 = r2 + st;
            int64_t j = 0;
            for (; j + 4 <= d; j += 4) {
                __m128 a = _mm_loadu_ps(r0 + j), b = _mm_loadu_ps(r1 + j);
                __m128 e = _mm_loadu_ps(r2 + j), f = _mm_loadu_ps(r3 + j);
                _MM_TRANSPOSE4_PS(a, b, e, f);
                _mm_storeu_ps(dst + (j + 0) * BC + c, a);
                _mm_storeu_ps(dst + (j + 1) * BC + c, b);
                _mm_storeu_ps(dst + (j + 2) * BC + c, e);
                _mm_storeu_ps(dst + (j + 3) * BC + c, f);
            }
            for (; j < d; j++)
                for (int u = 0; u < 4; u++) dst[j * BC + c + u] = src[(c + u) * st + j];
        }
#endif
        for (; c < n; c++)
            for (int64_t j = 0; j < d; j++) dst[j * BC + c] = src[c * st + j];
    }
}

/* Prefetch part i of n of rows [r0, r1) of a slice (row stride st, d floats a row). A work item
 * calls it once per step of its loop for the item a thread is likely to take next (this one
 * plus the number of threads: items are handed out in order), so that item's inputs, written
 * by the op before (the qkv projection) and gone from the cache, arrive while this one
 * computes instead of stalling the copies into scratch. */
static void prefetch_part(const float *p, int64_t st, int64_t d, int64_t r0, int64_t r1,
                          int64_t i, int64_t n) {
    for (int64_t r = r0 + (r1 - r0) * i / n; r < r0 + (r1 - r0) * (i + 1) / n; r++) {
        for (int64_t j = 0; j < d; j += 16) __builtin_prefetch(p + r * st + j);
        __builtin_prefetch(p + r * st + d - 1);
    }
}

/* s[r][:] = sum_j a[r][j] * bt[j][:]: R rows (stride dp, zero padded) times one key tile.
 * The sum over j is taken in blocks of VL terms, each summed from zero and then added to s. One
 * running float32 sum over all d terms has a rounding error that grows with d; in the backward
 * that error in dP = dO V^T does not cancel against D = rowsum(dO * O) (computed apart), and on
 * rows with a peaked softmax it made dq's error twice that of float32 softmax(QK^T) V in torch.
 * Blocking costs one add per VL multiply-adds. */
GL_INLINE void tile_scores_of(const int NV, const int NXV, float s[R][BC], const float *a,
                              int64_t dp, const float *bt) {
    for (int x0 = 0; x0 < NXV; x0 += XS) {
        const int w = x0 + XS <= NXV ? XS : NXV - x0; /* vectors in this block */
        for (int j0 = 0; j0 < NV * VL; j0 += VL) {
            vf part[R][XS]; /* the block's sum in registers; the running sum is s itself */
            for (int r = 0; r < R; r++)
                for (int x = 0; x < w; x++) part[r][x] = vset1(0.f);
            for (int j = j0; j < j0 + VL; j++) {
                vf b[XS];
                for (int x = 0; x < w; x++) b[x] = vload(bt + j * BC + (x0 + x) * VL);
                for (int r = 0; r < R; r++) {
                    vf ar = vset1(a[r * dp + j]);
                    for (int x = 0; x < w; x++) part[r][x] += ar * b[x];
                }
            }
            for (int r = 0; r < R; r++)
                for (int x = 0; x < w; x++) {
                    float *dst = &s[r][(x0 + x) * VL];
                    vstore(dst, j0 == 0 ? part[r][x] : vload(dst) + part[r][x]);
                }
        }
    }
}

/* tile_scores_of for the first nx vectors of the tile (the columns some row of the group sees;
 * the rest would be masked for every row, so they are not computed), nx a constant in each
 * case so that the register block is unrolled. */
GL_INLINE void tile_scores(const int NV, int nx, float s[R][BC], const float *a, int64_t dp,
                           const float *bt) {
    switch (nx) {
    case 1: tile_scores_of(NV, 1, s, a, dp, bt); break;
    case 2: tile_scores_of(NV, 2, s, a, dp, bt); break;
    case 3: tile_scores_of(NV, 3, s, a, dp, bt); break;
    default: tile_scores_of(NV, NX, s, a, dp, bt); break;
    }
}

/* acc[r][:] (row stride dp) += sum_{col < ncols} a[r][col] * b[col][:] (b's row stride dp):
 * R rows times a tile of rows of b. zero_first: the tile's sum is taken from zero in registers
 * and then added to acc (a second level of summation), else acc itself is accumulated. */
GL_INLINE void rows_times_tile(const int NV, float *acc, const float a[R][BC], const float *b,
                               int64_t dp, int ncols, int zero_first) {
    for (int x0 = 0; x0 < NV; x0 += XA) {
        const int w = x0 + XA <= NV ? XA : NV - x0; /* vectors in this block */
        vf c[R][XA];
        for (int r = 0; r < R; r++)
            for (int x = 0; x < w; x++)
                c[r][x] = zero_first ? vset1(0.f) : vload(acc + r * dp + (x0 + x) * VL);
        for (int col = 0; col < ncols; col++) {
            vf bv[XA];
            for (int x = 0; x < w; x++) bv[x] = vload(b + col * dp + (x0 + x) * VL);
            for (int r = 0; r < R; r++) {
                vf ar = vset1(a[r][col]);
                for (int x = 0; x < w; x++) c[r][x] += ar * bv[x];
            }
        }
        for (int r = 0; r < R; r++)
            for (int x = 0; x < w; x++) {
                float *dst = acc + r * dp + (x0 + x) * VL;
                vstore(dst, zero_first ? vload(dst) + c[r][x] : c[r][x]);
            }
    }
}

/* acc[col][:] (row stride dp) += sum_r a[r][col] * b[r][:] for col < ncols: the transposed
 * product (dV += P^T dO, dK += dS^T Q), with R rows of b (stride dp) held in registers. */
GL_INLINE void tile_t_times_rows(const int NV, float *acc, const float a[R][BC], const float *b,
                                 int64_t dp, int ncols) {
    for (int x0 = 0; x0 < NV; x0 += XA) {
        const int w = x0 + XA <= NV ? XA : NV - x0; /* vectors in this block */
        vf br[R][XA];
        for (int r = 0; r < R; r++)
            for (int x = 0; x < w; x++) br[r][x] = vload(b + r * dp + (x0 + x) * VL);
        for (int col = 0; col < ncols; col++) {
            vf c[XA];
            for (int x = 0; x < w; x++) c[x] = vload(acc + col * dp + (x0 + x) * VL);
            for (int r = 0; r < R; r++) {
                vf ar = vset1(a[r][col]);
                for (int x = 0; x < w; x++) c[x] += ar * br[r][x];
            }
            for (int x = 0; x < w; x++) vstore(acc + col * dp + (x0 + x) * VL, c[x]);
        }
    }
}

/* acc[0 .. n) += x[0 .. n), n a multiple of VL. */
GL_INLINE void add_into(float *acc, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i += VL) vstore(acc + i, vload(acc + i) + vload(x + i));
}

/* Set s[r][col] to -inf where column col0 + col is past tk or above the diagonal, in the first
 * nx vectors. */
GL_INLINE void mask_tile(float s[R][BC], int nx, const flash_ctx *c, int64_t row0,
                         int64_t col0) {
    static const int32_t iota16[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    vi iota;
    memcpy(&iota, iota16, sizeof iota);
    const vf ninf = vset1(-INFINITY);
    for (int r = 0; r < R; r++) {
        int64_t lim = c->causal ? row0 + r + c->off : c->tk - 1;
        if (lim > c->tk - 1) lim = c->tk - 1;
        for (int x = 0; x < nx; x++) {
            int64_t base = col0 + x * VL;
            int64_t rel = base - lim; /* keep iff base + lane <= lim */
            if (rel > VL) rel = VL;   /* (clamped so the int32 lanes cannot overflow) */
            if (rel < -VL) rel = -VL;
            vi keep = iota + (int32_t)rel <= 0;
            vf sv = vload(&s[r][x * VL]);
            vstore(&s[r][x * VL], (vf)((keep & (vi)sv) | (~keep & (vi)ninf)));
        }
    }
}

GL_INLINE int tile_needs_mask(const flash_ctx *c, int64_t row0, int64_t col0) {
    if (col0 + BC > c->tk) return 1;
    return c->causal && col0 + BC - 1 > row0 + c->off;
}

/* Columns of the tile at col0 that some row up to row_last sees (>= 1 where the callers ask):
 * the products skip the columns after them, which are masked for every row of the group (on
 * the causal diagonal, about half the tile). */
GL_INLINE int visible_cols(const flash_ctx *c, int64_t row_last, int64_t col0) {
    const int64_t n = last_visible(c, row_last) - col0 + 1;
    return n < BC ? (int)n : BC;
}

/* ------------------------------------------------------------------------------- forward */
GL_INLINE int fwd_item(const int NV, flash_ctx *c, int64_t item, int thread) {
    const int64_t nchunk = (c->tq + QCHUNK - 1) / QCHUNK;
    const int64_t b = item / nchunk, q0 = (item % nchunk) * QCHUNK;
    const int64_t d = c->d, dp = c->dp, tq = c->tq;
    const int64_t q1 = q0 + QCHUNK < tq ? q0 + QCHUNK : tq;
    float *kt = c->scratch[thread], *vp = kt + c->tk_pad * dp, *qs = vp + c->tk_pad * dp;
    float *acc = qs + R * dp; /* R x dp: the running, unnormalised O of the group */
    const float *q = slice_of(c->q, c->lq, b, c->nh), *k = slice_of(c->k, c->lk, b, c->nh);
    const float *v = slice_of(c->v, c->lv, b, c->nh);
    float *o = slice_out(c->o, c->lo, b, c->nh);
    const float s2 = c->scale * LOG2E;

    /* K^T and padded V tiles for this slice, built incrementally as chunks need more keys */
    const int64_t lastcol = last_visible(c, q1 - 1);
    const int64_t ntiles = lastcol < 0 ? 0 : lastcol / BC + 1;
    if (c->cached_slice[thread] != b) { c->cached_slice[thread] = b; c->cached_tiles[thread] = 0; }
    const int64_t have = c->cached_tiles[thread];
    if (ntiles > have) {
        transpose_tiles(kt, k, c->lk.t, have, ntiles, c->tk, d, dp);
        int64_t r0 = have * BC, r1 = ntiles * BC < c->tk ? ntiles * BC : c->tk;
        copy_rows(vp + r0 * dp, v + r0 * c->lv.t, r1 - r0, c->lv.t, d, dp, 1.f);
        c->cached_tiles[thread] = ntiles;
    }

    const int64_t next = item + c->threads; /* prefetched: its q rows, the k and v it sees */
    const int64_t nb = next / nchunk, nq0 = (next % nchunk) * QCHUNK;
    const int64_t nq1 = nq0 + QCHUNK < tq ? nq0 + QCHUNK : tq, nkv = last_visible(c, nq1 - 1) + 1;
    const int64_t ngroups = (q1 - q0 + R - 1) / R;
    for (int64_t row0 = q0; row0 < q1; row0 += R) {
        const int nr = (int)(q1 - row0 < R ? q1 - row0 : R);
        if (next < c->bh * nchunk) {
            const int64_t g = (row0 - q0) / R;
            prefetch_part(slice_of(c->q, c->lq, nb, c->nh), c->lq.t, d, nq0, nq1, g, ngroups);
            prefetch_part(slice_of(c->k, c->lk, nb, c->nh), c->lk.t, d, 0, nkv, g, ngroups);
            prefetch_part(slice_of(c->v, c->lv, nb, c->nh), c->lv.t, d, 0, nkv, g, ngroups);
        }
        for (int r = 0; r < R; r++) /* rows past the chunk repeat its last row; not stored */
            copy_rows(qs + r * dp, q + (row0 + (r < nr ? r : nr - 1)) * c->lq.t, 1, 0, d, dp, s2);
        memset(acc, 0, (size_t)(R * dp) * sizeof(float));
        float m[R], l[R];
        vf lsum[R]; /* l of each row as a vector: summed across lanes once, at the end */
        for (int r = 0; r < R; r++) {
            m[r] = -INFINITY;
            lsum[r] = vset1(0.f);
        }
        const int64_t glast = last_visible(c, row0 + nr - 1);
        const int64_t gtiles = glast < 0 ? 0 : glast / BC + 1;
        for (int64_t t = 0; t < gtiles; t++) {
            float s[R][BC] __attribute__((aligned(64)));
            const int ncols = visible_cols(c, row0 + nr - 1, t * BC), nx = (ncols + VL - 1) / VL;
            tile_scores(NV, nx, s, qs, dp, kt + t * dp * BC);
            if (tile_needs_mask(c, row0, t * BC)) mask_tile(s, nx, c, row0, t * BC);
            for (int r = 0; r < R; r++) { /* s becomes P, in place */
                vf mv = vload(&s[r][0]);
                for (int x = 1; x < nx; x++) mv = vmax(mv, vload(&s[r][x * VL]));
                float mt = vhmax(mv), mnew = mt > m[r] ? mt : m[r];
                float shift = mnew == -INFINITY ? 0.f : mnew; /* never -inf - -inf */
                vf vs = vset1(shift), sum = vset1(0.f);
                for (int x = 0; x < nx; x++) {
                    vf e = vexp2(vload(&s[r][x * VL]) - vs);
                    vstore(&s[r][x * VL], e);
                    sum += e;
                }
                float alpha = m[r] == -INFINITY ? 0.f : exp2f(m[r] - shift);
                lsum[r] = vset1(alpha) * lsum[r] + sum;
                m[r] = mnew;
                if (alpha != 1.f) {
                    vf va = vset1(alpha);
                    for (int x = 0; x < NV; x++)
                        vstore(acc + r * dp + x * VL, vload(acc + r * dp + x * VL) * va);
                }
            }
            rows_times_tile(NV, acc, s, vp + t * BC * dp, dp, ncols, 0); /* acc += P V */
        }
        for (int r = 0; r < nr; r++) l[r] = vhsum(lsum[r]);
        for (int r = 0; r < nr; r++) {
            const int64_t row = row0 + r;
            float *orow = o + row * c->lo.t;
            float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
            for (int64_t j = 0; j < d; j++) orow[j] = acc[r * dp + j] * inv;
            /* in double, rounded once: the backward's P = exp2(S - lse * log2(e)) inherits this
             * error on every key of the row (three float32 roundings gave up to 2.4 ulp) */
            c->lse[b * tq + row] =
                l[r] > 0.f ? (float)(((double)m[r] + log2((double)l[r])) * LN2_D) : INFINITY;
        }
    }
    return GPTLAB_OK;
}

/* Call fn with the padded head dim in vectors as a compile-time constant where it is small, so
 * that the always-inline kernels are specialised (register blocking, unrolled loops). */
#define DISPATCH_NV(fn, c, item, thread)                                                      \
    switch ((c)->dp / VL) {                                                                    \
    case 1: return fn(1, c, item, thread);                                                     \
    case 2: return fn(2, c, item, thread);                                                     \
    case 4: return fn(4, c, item, thread);                                                     \
    case 8: return fn(8, c, item, thread);                                                     \
    default: return fn((int)((c)->dp / VL), c, item, thread);                                  \
    }

static int fwd_task(void *vctx, int64_t item, int thread) {
    DISPATCH_NV(fwd_item, (flash_ctx *)vctx, item, thread);
}

/* ----------------------------------------------------------------- forward, few query rows */
/* With fewer than R query rows (decoding with a KV cache: one new token per step), the tiled
 * path would pad the group to R rows and copy the whole slice's K^T and V into scratch for one
 * row. Here each row reads k and v in place (strided rows, head dim contiguous): scores for a
 * block of DBLK keys, the online softmax across blocks, O += p_j v_j. No scratch and no copies,
 * so the cost is the row's 2 * tk * d multiply-adds. Work items are (batch, head) slices. */
#define DBLK 64

GL_INLINE float dot_row(const float *a, const float *b, int64_t d) {
    vf s = vset1(0.f);
    int64_t j = 0;
    for (; j + VL <= d; j += VL) s += vload(a + j) * vload(b + j);
    float t = vhsum(s);
    for (; j < d; j++) t += a[j] * b[j];
    return t;
}

GL_INLINE void axpy_row(float *y, float a, const float *x, int64_t d) { /* y += a x */
    const vf va = vset1(a);
    int64_t j = 0;
    for (; j + VL <= d; j += VL) vstore(y + j, vload(y + j) + va * vload(x + j));
    for (; j < d; j++) y[j] += a * x[j];
}

static int decode_task(void *vctx, int64_t bh, int thread) {
    (void)thread;
    const flash_ctx *c = vctx;
    const int64_t d = c->d;
    const float *q = slice_of(c->q, c->lq, bh, c->nh), *k = slice_of(c->k, c->lk, bh, c->nh);
    const float *v = slice_of(c->v, c->lv, bh, c->nh);
    float *o = slice_out(c->o, c->lo, bh, c->nh);
    const float s2 = c->scale * LOG2E;
    float acc[MAX_D], s[DBLK] __attribute__((aligned(64)));
    for (int64_t row = 0; row < c->tq; row++) {
        const float *qr = q + row * c->lq.t;
        const int64_t n = last_visible(c, row) + 1; /* keys [0, n) are visible */
        float m = -INFINITY, l = 0.f;
        memset(acc, 0, (size_t)d * sizeof(float));
        for (int64_t j0 = 0; j0 < n; j0 += DBLK) {
            const int nb = (int)(n - j0 < DBLK ? n - j0 : DBLK);
            float mt = -INFINITY;
            for (int j = 0; j < nb; j++) {
                s[j] = dot_row(qr, k + (j0 + j) * c->lk.t, d) * s2;
                mt = s[j] > mt ? s[j] : mt;
            }
            for (int j = nb; j < DBLK; j++) s[j] = -INFINITY;
            const float mnew = mt > m ? mt : m;
            const float alpha = m == -INFINITY ? 0.f : exp2f(m - mnew);
            const vf vm = vset1(mnew);
            vf sum = vset1(0.f);
            for (int j = 0; j < DBLK; j += VL) { /* s becomes p = 2^(s - m) */
                vf e = vexp2(vload(s + j) - vm);
                vstore(s + j, e);
                sum += e;
            }
            if (alpha != 1.f)
                for (int64_t j = 0; j < d; j++) acc[j] *= alpha;
            l = alpha * l + vhsum(sum);
            m = mnew;
            for (int j = 0; j < nb; j++) axpy_row(acc, s[j], v + (j0 + j) * c->lv.t, d);
        }
        float *orow = o + row * c->lo.t;
        const float inv = l > 0.f ? 1.f / l : 0.f;
        for (int64_t j = 0; j < d; j++) orow[j] = acc[j] * inv;
        c->lse[bh * c->tq + row] =
            l > 0.f ? (float)(((double)m + log2((double)l)) * LN2_D) : INFINITY;
    }
    return GPTLAB_OK;
}

/* ------------------------------------------------------------------------------- backward */
/* sum_j a[j] * b[j] in double, in 8 partial sums (vectorised; one running sum is a chain of
 * dependent additions, 10% of the backward at head dim 32). */
GL_INLINE double dot_double(const float *a, const float *b, int64_t d) {
    double part[8] = {0.};
    int64_t j = 0;
    for (; j + 8 <= d; j += 8)
        for (int u = 0; u < 8; u++) part[u] += (double)a[j + u] * b[j + u];
    for (; j < d; j++) part[0] += (double)a[j] * b[j];
    return ((part[0] + part[1]) + (part[2] + part[3])) +
           ((part[4] + part[5]) + (part[6] + part[7]));
}

GL_INLINE int bwd_item(const int NV, flash_ctx *c, int64_t b, int thread) {
    const int64_t d = c->d, dp = c->dp, tq = c->tq, tk = c->tk, nh = c->nh;
    const int64_t tqp = c->tq_pad, tkp = c->tk_pad;
    float *qs = c->scratch[thread];       /* tqp x dp: q * scale * log2e */
    float *dos = qs + tqp * dp;           /* tqp x dp: dout */
    float *dqs = dos + tqp * dp;          /* tqp x dp: dq accumulator */
    float *kp = dqs + tqp * dp;           /* tkp x dp: k */
    float *kt = kp + tkp * dp;            /* tiles of k^T */
    float *vt = kt + tkp * dp;            /* tiles of v^T */
    float *dkt = vt + tkp * dp;           /* BC x dp: dk of the current tile */
    float *dvt = dkt + BC * dp;           /* BC x dp: dv of the current tile */
    float *dkb = dvt + BC * dp;           /* BC x dp: dk of the tile from one block of queries */
    float *dvb = dkb + BC * dp;           /* BC x dp: dv of the tile from one block of queries */
    /* workspace: D, and lse in base 2 as the float sum l2 + l2lo */
    float *dvec = c->ws + b * tq * 3, *l2 = dvec + tq, *l2lo = l2 + tq;
    const float *q = slice_of(c->q, c->lq, b, nh), *k = slice_of(c->k, c->lk, b, nh);
    const float *v = slice_of(c->v, c->lv, b, nh), *o = slice_of(c->out, c->lo, b, nh);
    const float *dout = slice_of(c->dout, c->ldo, b, nh);
    float *dq = slice_out(c->dq, c->ldq, b, nh), *dk = slice_out(c->dk, c->ldk, b, nh);
    float *dv = slice_out(c->dv, c->ldv, b, nh);
    const float *lse = c->lse_in + b * tq;
    const float s2 = c->scale * LOG2E;

    copy_rows(qs, q, tq, c->lq.t, d, dp, s2);
    copy_rows(dos, dout, tq, c->ldo.t, d, dp, 1.f);
    memset(qs + tq * dp, 0, (size_t)((tqp - tq) * dp) * sizeof(float));
    memset(dos + tq * dp, 0, (size_t)((tqp - tq) * dp) * sizeof(float));
    memset(dqs, 0, (size_t)(tqp * dp) * sizeof(float));
    copy_rows(kp, k, tk, c->lk.t, d, dp, 1.f);
    memset(kp + tk * dp, 0, (size_t)((tkp - tk) * dp) * sizeof(float));
    const int64_t ntiles = tkp / BC;
    transpose_tiles(kt, k, c->lk.t, 0, ntiles, tk, d, dp);
    transpose_tiles(vt, v, c->lv.t, 0, ntiles, tk, d, dp);
    /* D and lse * log2(e) in double: a row's error in either is shared by all its P or dS, and
     * does not cancel in dq (torch's float32 softmax backward takes D = rowsum(P * dP) from the
     * same P and dP; FlashAttention's D = rowsum(dO * O) is computed apart). O(tq * d) work. */
    for (int64_t i = 0; i < tq; i++) {
        dvec[i] = (float)dot_double(dout + i * c->ldo.t, o + i * c->lo.t, d);
        const double l2d = (double)lse[i] * LOG2E_D;
        l2[i] = (float)l2d;
        l2lo[i] = isfinite(l2d) ? (float)(l2d - l2[i]) : 0.f; /* lse = +inf: a row with no key */
    }

    for (int64_t t = 0; t < ntiles; t++) {
        const int64_t col0 = t * BC;
        memset(dkt, 0, (size_t)(2 * BC * dp) * sizeof(float));
        /* first group with a row that sees column col0 */
        int64_t first = 0;
        if (c->causal) {
            int64_t r = col0 - c->off;
            first = r <= 0 ? 0 : r / R * R;
        }
        /* dk and dv of the tile sum over up to tq query rows: one running float32 sum over all
         * of them has an error that grows with tq (causal: the first keys' sums hold a large
         * early term while ever more small ones are added: at tq = 2048, 2-6x the error of
         * float32 P^T dO in torch). So they are summed per block of QBLOCK rows into dkb, dvb,
         * and the blocks' sums into dkt, dvt: about QBLOCK + tq / QBLOCK additions per
         * element instead of tq. */
        for (int64_t row0 = first; row0 < tq; row0 += R) {
            if (t == 0 && b + c->threads < c->bh) { /* the next slice's inputs, prefetched */
                const int64_t nb = b + c->threads, g = row0 / R, n = (tq + R - 1) / R;
                prefetch_part(slice_of(c->q, c->lq, nb, nh), c->lq.t, d, 0, tq, g, n);
                prefetch_part(slice_of(c->k, c->lk, nb, nh), c->lk.t, d, 0, tk, g, n);
                prefetch_part(slice_of(c->v, c->lv, nb, nh), c->lv.t, d, 0, tk, g, n);
                prefetch_part(slice_of(c->out, c->lo, nb, nh), c->lo.t, d, 0, tq, g, n);
                prefetch_part(slice_of(c->dout, c->ldo, nb, nh), c->ldo.t, d, 0, tq, g, n);
            }
            if ((row0 - first) % QBLOCK == 0) memset(dkb, 0, (size_t)(2 * BC * dp) * sizeof(float));
            float p[R][BC] __attribute__((aligned(64)));
            float ds[R][BC] __attribute__((aligned(64)));
            const float *qg = qs + row0 * dp, *dog = dos + row0 * dp;
            const int ncols = visible_cols(c, row0 + R - 1 < tq ? row0 + R - 1 : tq - 1, col0);
            const int nx = (ncols + VL - 1) / VL;
            tile_scores(NV, nx, p, qg, dp, kt + t * dp * BC);
            if (tile_needs_mask(c, row0, col0)) mask_tile(p, nx, c, row0, col0);
            tile_scores(NV, nx, ds, dog, dp, vt + t * dp * BC); /* dP = dO V^T */
            for (int r = 0; r < R; r++) {
                int64_t row = row0 + r < tq ? row0 + r : tq - 1;
                vf lv = vset1(row0 + r < tq ? l2[row] : INFINITY); /* padded rows: P = 0 */
                vf llo = vset1(row0 + r < tq ? l2lo[row] : 0.f);
                vf dv_ = vset1(dvec[row]);
                for (int x = 0; x < nx; x++) {
                    vf pv = vexp2((vload(&p[r][x * VL]) - lv) - llo);
                    vstore(&p[r][x * VL], pv);
                    vstore(&ds[r][x * VL], pv * (vload(&ds[r][x * VL]) - dv_));
                }
            }
            tile_t_times_rows(NV, dvb, p, dog, dp, ncols);   /* dV += P^T dO */
            tile_t_times_rows(NV, dkb, ds, qg, dp, ncols);   /* dK += dS^T Qs */
            /* dQ += dS K: this tile's sum from zero, then added (as for dk, dv: two levels) */
            rows_times_tile(NV, dqs + row0 * dp, ds, kp + col0 * dp, dp, ncols, 1);
            if ((row0 + R - first) % QBLOCK == 0 || row0 + R >= tq)
                add_into(dkt, dkb, 2 * BC * dp); /* the block's dk, dv (dkb, dvb adjacent) */
        }
        /* write this tile's dk (dS^T Qs = dS^T Q * scale * log2e, so times ln2) and dv */
        for (int64_t col = 0; col < BC && col0 + col < tk; col++) {
            float *dkrow = dk + (col0 + col) * c->ldk.t;
            float *dvrow = dv + (col0 + col) * c->ldv.t;
            for (int64_t j = 0; j < d; j++) {
                dkrow[j] = dkt[col * dp + j] * LN2;
                dvrow[j] = dvt[col * dp + j];
            }
        }
    }
    for (int64_t i = 0; i < tq; i++)
        for (int64_t j = 0; j < d; j++) dq[i * c->ldq.t + j] = dqs[i * dp + j] * c->scale;
    return GPTLAB_OK;
}

static int bwd_task(void *vctx, int64_t item, int thread) {
    DISPATCH_NV(bwd_item, (flash_ctx *)vctx, item, thread);
}

/* ------------------------------------------------------------------------------- entry points */
static int check_sizes(const char *fn, int64_t nb, int64_t nh, int64_t tq, int64_t tk, int64_t d,
                       float scale) {
    if (nb < 1 || nh < 1 || tq < 1 || tk < 1 || d < 1)
        return gl_fail(GPTLAB_EINVAL, "%s: sizes must be >= 1 (b=%lld nh=%lld tq=%lld tk=%lld "
                       "d=%lld)", fn, (long long)nb, (long long)nh, (long long)tq, (long long)tk,
                       (long long)d);
    if (d > MAX_D)
        return gl_fail(GPTLAB_EINVAL, "%s: head dim %lld > %d", fn, (long long)d, MAX_D);
    if (tq > INT32_MAX || tk > INT32_MAX)
        return gl_fail(GPTLAB_EINVAL, "%s: sequence length too large", fn);
    if (!(scale > 0.f) || !isfinite(scale))
        return gl_fail(GPTLAB_EINVAL, "%s: scale must be finite and > 0, got %g", fn, scale);
    return GPTLAB_OK;
}

static layout layout_at(const int64_t *strides, int i) {
    return (layout){strides[3 * i], strides[3 * i + 1], strides[3 * i + 2]};
}

static int alloc_scratch(flash_ctx *c, int threads, int64_t per_thread) {
    c->scratch = calloc((size_t)threads, sizeof(float *));
    c->cached_slice = malloc((size_t)threads * sizeof(int64_t));
    c->cached_tiles = calloc((size_t)threads, sizeof(int64_t));
    if (!c->scratch || !c->cached_slice || !c->cached_tiles) return GPTLAB_ENOMEM;
    for (int t = 0; t < threads; t++) {
        c->cached_slice[t] = -1;
        if (!(c->scratch[t] = alloc_floats(per_thread))) return GPTLAB_ENOMEM;
    }
    return GPTLAB_OK;
}

static void free_scratch(flash_ctx *c, int threads) {
    if (c->scratch)
        for (int t = 0; t < threads; t++) free(c->scratch[t]);
    free(c->scratch);
    free(c->cached_slice);
    free(c->cached_tiles);
}

static int clamp_threads(int n, int64_t items) {
    if (n < 1) n = 1;
    if (n > 256) n = 256;
    return items < n ? (int)items : n;
}

static void set_sizes(flash_ctx *c, int64_t nb, int64_t nh, int64_t tq, int64_t tk, int64_t d,
                      float scale, int causal) {
    c->bh = nb * nh; c->nh = nh; c->tq = tq; c->tk = tk; c->d = d; c->dp = round_up(d, VL);
    c->tk_pad = round_up(tk, BC); c->tq_pad = round_up(tq, R); c->off = tk - tq;
    c->scale = scale; c->causal = causal;
}

int gptlab_flash_forward_f32(float *o, float *lse, const float *q, const float *k,
                             const float *v, const int64_t *strides, int64_t b, int64_t nh,
                             int64_t tq, int64_t tk, int64_t d, float scale, int causal,
                             void *stream, int num_threads) {
    (void)stream;
    gl_clear_error();
    if (!o || !lse || !q || !k || !v || !strides)
        return gl_fail(GPTLAB_EINVAL, "flash_forward: null pointer");
    int rc = check_sizes("flash_forward", b, nh, tq, tk, d, scale);
    if (rc) return rc;
    flash_ctx c = {0};
    c.o = o; c.lse = lse; c.q = q; c.k = k; c.v = v;
    c.lq = layout_at(strides, 0); c.lk = layout_at(strides, 1); c.lv = layout_at(strides, 2);
    c.lo = layout_at(strides, 3);
    set_sizes(&c, b, nh, tq, tk, d, scale, causal);
    if (tq < R) /* decoding: rows read k and v in place, no scratch */
        return gl_parallel_for(c.bh, clamp_threads(num_threads, c.bh), decode_task, &c);
    const int64_t items = c.bh * ((tq + QCHUNK - 1) / QCHUNK);
    const int threads = c.threads = clamp_threads(num_threads, items);
    rc = alloc_scratch(&c, threads, 2 * c.tk_pad * c.dp + 2 * R * c.dp);
    if (rc == GPTLAB_OK) rc = gl_parallel_for(items, threads, fwd_task, &c);
    else rc = gl_fail(rc, "flash_forward: out of memory for scratch");
    free_scratch(&c, threads);
    return rc;
}

int64_t gptlab_flash_backward_workspace_size(int64_t bh, int64_t tq, int64_t tk, int64_t d) {
    (void)tk; (void)d;
    return 3 * bh * tq * (int64_t)sizeof(float); /* D = rowsum(dO * O), lse in base 2 (hi, lo) */
}

int gptlab_flash_backward_f32(float *dq, float *dk, float *dv, void *workspace,
                              const float *q, const float *k, const float *v, const float *o,
                              const float *lse, const float *dout, const int64_t *strides,
                              int64_t b, int64_t nh, int64_t tq, int64_t tk, int64_t d,
                              float scale, int causal, void *stream, int num_threads) {
    (void)stream;
    gl_clear_error();
    if (!dq || !dk || !dv || !workspace || !q || !k || !v || !o || !lse || !dout || !strides)
        return gl_fail(GPTLAB_EINVAL, "flash_backward: null pointer");
    int rc = check_sizes("flash_backward", b, nh, tq, tk, d, scale);
    if (rc) return rc;
    flash_ctx c = {0};
    c.dq = dq; c.dk = dk; c.dv = dv; c.ws = (float *)workspace;
    c.q = q; c.k = k; c.v = v; c.out = o; c.lse_in = lse; c.dout = dout;
    c.lq = layout_at(strides, 0); c.lk = layout_at(strides, 1); c.lv = layout_at(strides, 2);
    c.lo = layout_at(strides, 3); c.ldo = layout_at(strides, 4); c.ldq = layout_at(strides, 5);
    c.ldk = layout_at(strides, 6); c.ldv = layout_at(strides, 7);
    set_sizes(&c, b, nh, tq, tk, d, scale, causal);
    const int threads = c.threads = clamp_threads(num_threads, c.bh);
    rc = alloc_scratch(&c, threads, (3 * c.tq_pad + 3 * c.tk_pad + 4 * BC) * c.dp);
    if (rc == GPTLAB_OK) rc = gl_parallel_for(c.bh, threads, bwd_task, &c);
    else rc = gl_fail(rc, "flash_backward: out of memory for scratch");
    free_scratch(&c, threads);
    return rc;
}
