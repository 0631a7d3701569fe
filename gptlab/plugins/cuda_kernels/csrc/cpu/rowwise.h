/* Helpers of the row-wise CPU kernels (layernorm.c, cross_entropy.c, bias_gelu.c): vectors of
 * the native width with tree reductions, partial loads and stores for the tail of a row, exp2
 * (common.h's polynomial), and fixed chunks of rows for column sums (dweight, dbias) that come
 * out the same whatever the number of threads.
 */
#ifndef GPTLAB_CPU_ROWWISE_H
#define GPTLAB_CPU_ROWWISE_H

#include "common.h"

/* Row vectors: common.h's native-width vectors under the names these kernels use. */
#define RVL VL
typedef vf rv;
typedef vi ri;

GL_INLINE rv rload(const float *p) { rv v; memcpy(&v, p, sizeof v); return v; }
GL_INLINE void rstore(float *p, rv v) { memcpy(p, &v, sizeof v); }
GL_INLINE rv rset1(float s) { return (rv){0} + s; }

/* The first n (< RVL) floats at p, the other lanes `fill`: the tail of a row runs through the
 * same vector code as its body (fill is chosen so that the extra lanes add nothing). */
GL_INLINE rv rload_part(const float *p, int64_t n, float fill) {
    float t[RVL];
    for (int i = 0; i < RVL; i++) t[i] = i < n ? p[i] : fill;
    return rload(t);
}

GL_INLINE void rstore_part(float *p, rv v, int64_t n) {
    float t[RVL];
    rstore(t, v);
    for (int64_t i = 0; i < n; i++) p[i] = t[i];
}

/* Sum of the lanes as a tree (log2(RVL) dependent adds, not RVL - 1), in a fixed order. */
GL_INLINE float rsum(rv v) {
    float t[RVL];
    rstore(t, v);
    for (int w = RVL / 2; w > 0; w /= 2)
        for (int i = 0; i < w; i++) t[i] += t[i + w];
    return t[0];
}

GL_INLINE float rmax_lanes(rv v) {
    float t[RVL];
    rstore(t, v);
    for (int w = RVL / 2; w > 0; w /= 2)
        for (int i = 0; i < w; i++) t[i] = t[i + w] > t[i] ? t[i + w] : t[i];
    return t[0];
}

/* Comparisons of native-width vectors are single instructions (vcmpps + a blend on AVX2). */
GL_INLINE rv rselect(ri mask, rv a, rv b) { return (rv)((mask & (ri)a) | (~mask & (ri)b)); }
GL_INLINE rv rmax(rv a, rv b) { return rselect(a > b, a, b); }
GL_INLINE rv rclamp(rv x, float lo, float hi) {
    x = rselect(x < rset1(lo), rset1(lo), x);
    return rselect(x > rset1(hi), rset1(hi), x);
}

/* 2^x for any x <= 127: x < -126 (-inf included) gives exactly 0 (common.h's vexp2 also
 * zeroes x == -126). */
GL_INLINE rv rexp2(rv x) {
    const ri dead = x < rset1(-126.0f);
    return (rv)((ri)vexp2_in_range(rclamp(x, -126.0f, 127.0f)) & ~dead);
}

/* Column sums over rows are taken per chunk of rows (one partial row per chunk, in a workspace)
 * and the partials then added chunk by chunk in order. Chunks depend on the number of rows only,
 * never on the threads, so the sums are bit-for-bit the same for any num_threads. */
#define GL_MAX_CHUNKS 64
#define GL_MIN_CHUNK_ROWS 16

GL_INLINE int64_t gl_chunk_rows(int64_t rows) {
    int64_t r = (rows + GL_MAX_CHUNKS - 1) / GL_MAX_CHUNKS;
    return r < GL_MIN_CHUNK_ROWS ? GL_MIN_CHUNK_ROWS : r;
}

GL_INLINE int64_t gl_num_chunks(int64_t rows) {
    return (rows + gl_chunk_rows(rows) - 1) / gl_chunk_rows(rows);
}

/* out[j] = sum over k in [0, nchunks), in order, of partials[k * stride + j], for j < n. */
static inline void gl_sum_chunks(float *restrict out, const float *restrict partials,
                                 int64_t nchunks, int64_t n, int64_t stride) {
    const int64_t nv = n / RVL * RVL;
    for (int64_t j = 0; j < nv; j += RVL) {
        rv acc = rload(partials + j);
        for (int64_t k = 1; k < nchunks; k++) acc += rload(partials + k * stride + j);
        rstore(out + j, acc);
    }
    for (int64_t j = nv; j < n; j++) {
        float acc = partials[j];
        for (int64_t k = 1; k < nchunks; k++) acc += partials[k * stride + j];
        out[j] = acc;
    }
}

#endif
