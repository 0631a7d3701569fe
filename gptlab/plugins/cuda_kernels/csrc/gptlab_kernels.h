/* gptlab native kernels: the one C ABI shared by the CPU library (C, cpu/) and the CUDA library
 * (.cu files in cuda/, built by nvcc for GPUs, or by g++ against emu/cuda_emu.h for the CPU emulator).
 *
 * Conventions (llm.c style): outputs first, then inputs, then sizes; plain pointers and ints;
 * every entry point returns an int error code (GPTLAB_OK == 0) and never exits; the message of
 * the last failure on the calling thread is gptlab_last_error(). Tensors are contiguous
 * row-major: q (bh, tq, d), k and v (bh, tk, d), scores (bh, tq, tk), lse (bh, tq).
 * `stream` is the cudaStream_t to launch on (ignored on the CPU); `num_threads` is the number of
 * CPU threads to use (ignored by CUDA). Causal masks are aligned bottom-right: query i sees key
 * j iff j <= i + (tk - tq), so tq < tk serves KV-cache decoding.
 *
 * The block between the cffi-begin and cffi-end markers is read verbatim by
 * gptlab/plugins/cuda_kernels/loader.py as the cffi cdef: plain declarations only.
 */
#ifndef GPTLAB_KERNELS_H
#define GPTLAB_KERNELS_H

#include <stdint.h>

#define GPTLAB_ABI_VERSION 2

/* error codes */
#define GPTLAB_OK 0
#define GPTLAB_EINVAL 1   /* bad argument (size, pointer, flag) */
#define GPTLAB_ENOMEM 2   /* host allocation or thread creation failed */
#define GPTLAB_EDEVICE 3  /* CUDA launch or runtime error */

#ifdef __cplusplus
extern "C" {
#endif

/* cffi-begin */
int gptlab_abi_version(void);
const char *gptlab_last_error(void);
const char *gptlab_flavour(void); /* "cpu", "cuda" or "cuda-emu" */

/* CUDA GPUs this library can launch on: for the nvcc build, the GPUs of compute capability 8.0
 * or more (an error code, with gptlab_last_error() saying why, when there is no driver, no GPU or
 * only older GPUs); always 0 for the CPU and emulated builds, whose kernels take host memory. */
int gptlab_cuda_device_count(int *count);

/* y = softmax(scale * x + causal mask) over the last dim of (bh, tq, tk); masked y are 0. */
int gptlab_softmax_forward_f32(float *y, const float *x, int64_t bh, int64_t tq, int64_t tk,
                               float scale, int causal, void *stream, int num_threads);

/* dx = scale * y * (dy - rowsum(y * dy)); dx may alias dy. */
int gptlab_softmax_backward_f32(float *dx, const float *y, const float *dy, int64_t bh,
                                int64_t tq, int64_t tk, float scale, int causal, void *stream,
                                int num_threads);

/* o = softmax(scale * q k^T + mask) v, lse = logsumexp of each masked, scaled score row
 * (natural log; +inf for a row with no visible key, whose o is 0). */
int gptlab_flash_forward_f32(float *o, float *lse, const float *q, const float *k,
                             const float *v, int64_t bh, int64_t tq, int64_t tk, int64_t d,
                             float scale, int causal, void *stream, int num_threads);

/* Bytes of caller-allocated workspace gptlab_flash_backward_f32 needs for these sizes. */
int64_t gptlab_flash_backward_workspace_size(int64_t bh, int64_t tq, int64_t tk, int64_t d);

/* Gradients of the forward above, recomputing P from q, k and lse (no tq x tk buffer). */
int gptlab_flash_backward_f32(float *dq, float *dk, float *dv, void *workspace,
                              const float *q, const float *k, const float *v, const float *o,
                              const float *lse, const float *dout, int64_t bh, int64_t tq,
                              int64_t tk, int64_t d, float scale, int causal, void *stream,
                              int num_threads);
/* cffi-end */

#ifdef __cplusplus
}
#endif

#endif /* GPTLAB_KERNELS_H */
