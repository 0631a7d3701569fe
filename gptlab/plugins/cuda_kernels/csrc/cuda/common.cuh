/* Shared helpers of the CUDA kernels: warp reductions, error reporting, launch checks.
 *
 * Compiled by nvcc for real GPUs, or by g++ against the CUDA emulator for the CPU (the emulated
 * flavours put gptlab/verify/emu/ on the include path; nvcc never sees it); only the host-side
 * glue differs between the two, behind __CUDACC__ (the emulator models the runtime calls that
 * glue makes: devices, contexts, pointer attributes, errors, stream capture).
 *
 * The kernels launch and name their shared memory through five macros, which under nvcc are:
 *   GL_LAUNCH(kernel, grid, block, smem_bytes, stream, args...)
 *       -> kernel<<<grid, block, smem_bytes, stream>>>(args...), the stream recorded for
 *          check_launch (gl::launching)
 *   GL_DYNAMIC_SMEM(type, name)
 *       -> extern __shared__ storage; type *name = (the block's dynamic shared memory)
 *   GL_SMEM_PTR(type)    -> type *   (a pointer into shared memory)
 *   GL_GLOBAL_PTR(type)  -> type *   (a pointer into global memory that several blocks write)
 *   GL_SMEM_CAST(type, p) -> reinterpret_cast<type *>(p)   (p a GL_SMEM_PTR: a view as type)
 * The last three only name what the emulator's race detector watches: its cuda_emu.h defines all
 * five for the CPU.
 */
#ifndef GPTLAB_CUDA_COMMON_CUH
#define GPTLAB_CUDA_COMMON_CUH

#include <cmath>
#include <cstdint>
#include <type_traits>

#ifdef __CUDACC__
#include <cuda_runtime.h>

#define GL_LAUNCH(kernel, grid, block, smem, stream, ...)                 \
    (gl::launching(static_cast<cudaStream_t>(stream)),                    \
     kernel<<<(grid), (block), (smem), static_cast<cudaStream_t>(stream)>>>(__VA_ARGS__))
#define GL_DYNAMIC_SMEM(type, name)                  \
    extern __shared__ float4 gl_dynamic_smem_[];     \
    type *name = reinterpret_cast<type *>(gl_dynamic_smem_)
#define GL_SMEM_PTR(type) type *
#define GL_GLOBAL_PTR(type) type *
#define GL_SMEM_CAST(type, p) reinterpret_cast<type *>(p)
#else
#include "cuda_emu.h" /* the CUDA emulator, on the emulated flavours' include path */
#undef GL_LAUNCH /* the emulator's, with the stream recorded as under nvcc */
#define GL_LAUNCH(kernel, grid, block, smem, stream, ...) \
    (gl::launching(static_cast<cudaStream_t>(stream)),    \
     GL_EMU_LAUNCH(kernel, grid, block, smem, stream, __VA_ARGS__))
#endif

#include "../gptlab_kernels.h"

namespace gl {

constexpr unsigned FULL_MASK = 0xffffffffu;
constexpr int WARP = 32;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

/* Butterfly reductions: every lane ends with the result. All 32 lanes must call them. */
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = WARP / 2; offset > 0; offset /= 2)
        v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = WARP / 2; offset > 0; offset /= 2)
        v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

__host__ __device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* Record the message for gptlab_last_error() and return code (runtime.cu). */
int fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* At each entry point: clear the last message and any error still pending in the runtime. */
void clear_error();

/* The stream of the calling thread's latest launch (GL_LAUNCH records it), which check_launch
 * synchronises under GPTLAB_CUDA_SYNC. */
inline thread_local cudaStream_t launch_stream = nullptr;
inline void launching(cudaStream_t stream) { launch_stream = stream; }

/* After a launch: a launch error becomes GPTLAB_EDEVICE with the runtime's message. A fault
 * inside a kernel shows only at a later synchronisation, in whatever call comes next (torch's,
 * often), unless $GPTLAB_CUDA_SYNC is set (not "0"): then the launch's stream is synchronised
 * here, so the fault is reported by the op whose kernel it was. Never inside a CUDA-graph
 * capture, where synchronising is not permitted. */
int check_launch(const char *fn);

/* Why GPU `device` cannot run this library's code ("" if it can), into why[n]: compute
 * capability below 8.0; no SASS for its architecture (same major version, not newer) and PTX
 * it cannot take (PTX of a newer architecture, or a driver older than the CUDA that compiled
 * it: cudaErrorUnsupportedPtxVersion at the first launch). Creates no context. */
bool device_problem(int device, char *why, size_t n);

/* Makes the device that holds a tensor current for the launches of one entry point and, when it
 * goes out of scope, restores the caller's device as torch's guards do (c10::cuda::
 * MaybeSetDevice): only if that device's primary context exists, because cudaSetDevice would
 * create it (hundreds of MB on GPU 0 for a thread whose work lives on cuda:1); otherwise the
 * tensor's device stays current. Refuses host pointers and GPUs that cannot run the kernels
 * (device_problem). In the emulator, over its model of devices and contexts. */
class DeviceGuard {
public:
    DeviceGuard() = default;
    DeviceGuard(const DeviceGuard &) = delete;
    DeviceGuard &operator=(const DeviceGuard &) = delete;
    ~DeviceGuard();
    int bind(const void *ptr, const char *fn);

private:
    int previous_ = -1;
};

/* K (and V) rows in shared memory are padded to an odd stride: 32 lanes reading 32 different
 * rows at the same column then hit 32 different banks. */
__host__ __device__ __forceinline__ int odd_stride(int d) { return d | 1; }

/* Head dims per lane: the kernels keep ceil(d / 32) values per lane in registers. */
template <class F>
void with_dims_per_lane(int64_t d, F &&f) {
    if (d <= 32) f(std::integral_constant<int, 1>{});
    else if (d <= 64) f(std::integral_constant<int, 2>{});
    else f(std::integral_constant<int, 4>{});
}
constexpr int MAX_HEAD_DIM = 4 * WARP;

} /* namespace gl */

#endif /* GPTLAB_CUDA_COMMON_CUH */
