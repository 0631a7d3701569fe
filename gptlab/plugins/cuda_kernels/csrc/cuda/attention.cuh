/* What the two flash attention files share (flash.cu in float32, flash_tc.cu on tensor cores):
 * the strided layout of q, k, v, o and their gradients as gptlab_kernels.h passes it, and the
 * bottom-right causal mask. */
#ifndef GPTLAB_ATTENTION_CUH
#define GPTLAB_ATTENTION_CUH

#include "common.cuh"

namespace gl {

/* One tensor's strides in elements: batch, head, row (the head dim is contiguous). */
struct Layout {
    int64_t b, h, t;
};

/* The layout of the i-th tensor of the ABI's strides array (three int64 per tensor). */
inline Layout layout_at(const int64_t *strides, int i) {
    return Layout{strides[3 * i], strides[3 * i + 1], strides[3 * i + 2]};
}

/* Offset of the (batch, head) slice bh of a tensor of layout l, with nh heads. */
__device__ __forceinline__ int64_t slice_offset(Layout l, int64_t bh, int64_t nh) {
    return (bh / nh) * l.b + (bh % nh) * l.h;
}

/* Whether query r sees key c: in range, and with the causal mask aligned bottom-right (query r
 * sees key c <= r + tk - tq, so fewer queries than keys serve KV-cache decoding). */
__device__ __forceinline__ bool visible(int r, int c, int tq, int tk, int causal) {
    return r < tq && c < tk && (!causal || c <= r + (tk - tq));
}

} /* namespace gl */

#endif /* GPTLAB_ATTENTION_CUH */
