/* gptlab native kernels: the one C ABI shared by the CPU library (C, cpu/) and the CUDA library
 * (.cu files in cuda/, built by nvcc for GPUs, or by g++ against emu/cuda_emu.h for the CPU emulator).
 *
 * Conventions (llm.c style): outputs first, then inputs, then sizes; plain pointers and ints;
 * every entry point returns an int error code (GPTLAB_OK == 0) and never exits; the message of
 * the last failure on the calling thread is gptlab_last_error(). Tensors are contiguous
 * row-major: scores (bh, tq, tk), lse (bh, tq); the row-wise kernels take (rows, c) matrices
 * (the caller flattens the leading dims). Flash attention's q, o, do, dq (b, nh, tq, d) and
 * k, v, dk, dv (b, nh, tk, d) are strided: `strides` holds three int64 per tensor (batch, head
 * and row strides, in floats; the head dim is contiguous), so the caller passes the views of a
 * qkv projection and gets outputs in the layout it wants, with no copies around the call.
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

#define GPTLAB_ABI_VERSION 6

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
                             const float *v, const int64_t *strides, int64_t b, int64_t nh,
                             int64_t tq, int64_t tk, int64_t d, float scale, int causal,
                             void *stream, int num_threads); /* strides: q, k, v, o */

/* The same forward on tensor cores (CUDA, sm_80+): q, k, v, o are bfloat16 (_bf16) or float16
 * (_f16), lse float32; float32 accumulation. Head dims 64 and 128; every pointer 16-byte aligned
 * and every stride a multiple of 8 elements (strides in elements). The CPU library has no such
 * kernels: there they return GPTLAB_EINVAL. */
int gptlab_flash_forward_bf16(void *o, float *lse, const void *q, const void *k, const void *v,
                              const int64_t *strides, int64_t b, int64_t nh, int64_t tq,
                              int64_t tk, int64_t d, float scale, int causal, void *stream,
                              int num_threads); /* strides: q, k, v, o */
int gptlab_flash_forward_f16(void *o, float *lse, const void *q, const void *k, const void *v,
                             const int64_t *strides, int64_t b, int64_t nh, int64_t tq,
                             int64_t tk, int64_t d, float scale, int causal, void *stream,
                             int num_threads);

/* Gradients of the tensor-core forward (dq, dk, dv in its dtype; dQ summed in float32 with
 * atomics: on a GPU its last bits vary between runs). Workspace: as many bytes as
 * gptlab_flash_backward_workspace_size gives. strides: q, k, v, o, dout, dq, dk, dv. */
int gptlab_flash_backward_bf16(void *dq, void *dk, void *dv, void *workspace, const void *q,
                               const void *k, const void *v, const void *o, const float *lse,
                               const void *dout, const int64_t *strides, int64_t b, int64_t nh,
                               int64_t tq, int64_t tk, int64_t d, float scale, int causal,
                               void *stream, int num_threads);
int gptlab_flash_backward_f16(void *dq, void *dk, void *dv, void *workspace, const void *q,
                              const void *k, const void *v, const void *o, const float *lse,
                              const void *dout, const int64_t *strides, int64_t b, int64_t nh,
                              int64_t tq, int64_t tk, int64_t d, float scale, int causal,
                              void *stream, int num_threads);

/* Bytes of caller-allocated workspace gptlab_flash_backward_f32 (and _bf16, _f16) needs for
 * these sizes. */
int64_t gptlab_flash_backward_workspace_size(int64_t bh, int64_t tq, int64_t tk, int64_t d);

/* Gradients of the forward above, recomputing P from q, k and lse (no tq x tk buffer).
 * strides: q, k, v, o, dout, dq, dk, dv. */
int gptlab_flash_backward_f32(float *dq, float *dk, float *dv, void *workspace,
                              const float *q, const float *k, const float *v, const float *o,
                              const float *lse, const float *dout, const int64_t *strides,
                              int64_t b, int64_t nh, int64_t tq, int64_t tk, int64_t d,
                              float scale, int causal, void *stream, int num_threads);

/* LayerNorm over the last dim of x (rows, c) (Ba, Kiros & Hinton 2016):
 * y = (x - mean) * rstd * weight + bias, with the row's mean, its biased variance and
 * rstd = 1 / sqrt(var + eps); mean and rstd (rows) are written for the backward. bias may be
 * NULL (no shift). */
int gptlab_layernorm_forward_f32(float *y, float *mean, float *rstd, const float *x,
                                 const float *weight, const float *bias, int64_t rows,
                                 int64_t c, float eps, void *stream, int num_threads);

/* Bytes of caller-allocated workspace gptlab_layernorm_backward_f32 needs for these sizes (the
 * partial sums of dweight and dbias per chunk of rows; chunks depend on the sizes only, so the
 * sums are added in the same order whatever the number of threads or the GPU). */
int64_t gptlab_layernorm_backward_workspace_size(int64_t rows, int64_t c);

/* dx (rows, c) of the forward above given dy, and dweight, dbias (c): the sums over rows of
 * dy * xhat and dy. dbias may be NULL (not computed). */
int gptlab_layernorm_backward_f32(float *dx, float *dweight, float *dbias, void *workspace,
                                  const float *dy, const float *x, const float *weight,
                                  const float *mean, const float *rstd, int64_t rows, int64_t c,
                                  void *stream, int num_threads);

/* Softmax cross-entropy of logits (n, v) against targets (n) in [0, v), in one pass per row:
 * losses[i] = logsumexp(logits[i]) - logits[i, targets[i]], loss = mean of losses (one float),
 * and, unless dlogits is NULL, dlogits = (softmax(logits) - onehot(targets)) / n: the gradient
 * of the mean loss, so no probability tensor is kept. A target outside [0, v) is GPTLAB_EINVAL
 * on the CPU; on a GPU that row's loss and dlogits are NaN (no host round trip to check). */
int gptlab_cross_entropy_forward_f32(float *loss, float *losses, float *dlogits,
                                     const float *logits, const int64_t *targets, int64_t n,
                                     int64_t v, void *stream, int num_threads);

/* dx = dlogits * dloss[0] (dloss: one float in the tensors' memory, never read by the host on
 * a GPU); dx may alias dlogits. */
int gptlab_cross_entropy_backward_f32(float *dx, const float *dlogits, const float *dloss,
                                      int64_t n, int64_t v, void *stream, int num_threads);

/* What a decoding step computes besides the pre-norm block's fixed structure. */
typedef struct {
    float eps;     /* of the two norms */
    int rms_norm;  /* 0: LayerNorm (weight, bias or none); 1: RMSNorm (weight; no centring) */
    int relu2;     /* 0: the GELU MLP (erf form); 1: the ReLU^2 MLP */
    int qk_norm;   /* RMS-normalise each head's q and k (no weight), with qk_eps */
    float qk_eps;
    const float *rope_cos; /* rotary: cos and sin of this position's angles (hs / 2 each), */
    const float *rope_sin; /* applied to q and k after QK-norm; both NULL: no rotation */
} gptlab_decode_spec;

/* One decoding step of a pre-norm transformer for b sequences of one new token each (CPU only;
 * the CUDA library returns GPTLAB_EINVAL): the embeddings wte[ids] (+ wpe[pos], if wpe is not
 * NULL), n_layer blocks, the final norm and the head; logits (b, vocab). Each layer's new keys
 * and values go to row `pos` of its k_caches[l], v_caches[l] (b, nh, max_t, c / nh), and the
 * token attends over rows [0, pos]. params: 12 pointers per layer, in order: norm 1 weight,
 * norm 1 bias, qkv weight (3c, c), qkv bias, attention projection weight (c, c), its bias,
 * norm 2 weight, norm 2 bias, MLP fc weight (4c, c), its bias, MLP projection weight (c, 4c),
 * its bias (biases may be NULL); norm_w, norm_b: the final norm's; head_w (vocab, c). Attention
 * scale 1 / sqrt(c / nh), causal. The matrix-vector products use num_threads threads. */
int64_t gptlab_decode_step_workspace_size(int64_t b, int64_t c, int64_t nh);
int gptlab_decode_step_f32(float *logits, float *const *k_caches, float *const *v_caches,
                           void *workspace, const int64_t *ids, const float *wte,
                           const float *wpe, const float *const *params, const float *norm_w,
                           const float *norm_b, const float *head_w,
                           const gptlab_decode_spec *spec, int64_t n_layer, int64_t b, int64_t c,
                           int64_t nh, int64_t vocab, int64_t pos, int64_t max_t,
                           int num_threads);

/* y = gelu(x + bias) over x (rows, f), bias (f), with the exact (erf) GELU of Hendrycks &
 * Gimpel 2016: gelu(u) = u * Phi(u) = u / 2 * (1 + erf(u / sqrt 2)). */
int gptlab_bias_gelu_forward_f32(float *y, const float *x, const float *bias, int64_t rows,
                                 int64_t f, void *stream, int num_threads);

/* Bytes of caller-allocated workspace gptlab_bias_gelu_backward_f32 needs (per-chunk partial
 * sums of dbias, as for the LayerNorm backward). */
int64_t gptlab_bias_gelu_backward_workspace_size(int64_t rows, int64_t f);

/* dx = dy * gelu'(x + bias) with gelu'(u) = Phi(u) + u * phi(u), and dbias (f) = the sum of dx
 * over rows (dbias may be NULL: not computed); dx may alias dy. */
int gptlab_bias_gelu_backward_f32(float *dx, float *dbias, void *workspace, const float *dy,
                                  const float *x, const float *bias, int64_t rows, int64_t f,
                                  void *stream, int num_threads);
/* cffi-end */

#ifdef __cplusplus
}
#endif

#endif /* GPTLAB_KERNELS_H */
