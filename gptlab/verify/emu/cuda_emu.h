/* The CUDA emulator: the subset of CUDA that the kernels of the cuda_kernels plugin
 * (gptlab/plugins/cuda_kernels/csrc/cuda/) use, on the CPU under a host C++ compiler
 * (g++ -x c++ -std=c++20).
 *
 * Only the emulated flavours (cuda-emu, cuda-emu-racecheck, cuda-emu-numerics) see this folder:
 * they put it on the include path, and csrc/cuda/common.cuh includes this header when __CUDACC__
 * is not defined.
 * Under nvcc common.cuh defines the same five macros from the real thing instead:
 *   GL_LAUNCH(kernel, grid, block, smem_bytes, stream, args...)
 *       -> kernel<<<grid, block, smem_bytes, stream>>>(args...)
 *   GL_DYNAMIC_SMEM(type, name)
 *       -> extern __shared__ storage; type *name = (the block's dynamic shared memory)
 *   GL_SMEM_PTR(type)    -> type *   (a pointer into shared memory)
 *   GL_GLOBAL_PTR(type)  -> type *   (a pointer into global memory that several blocks write)
 *   GL_SMEM_CAST(type, p) -> reinterpret_cast<type *>(p)   (p a GL_SMEM_PTR: a view as type)
 * The last three only name what the race detector watches (see racecheck below); under nvcc
 * and the plain emulator they are the raw pointer, so the compiled code is the same.
 *
 * Kernels run on the calling CPU thread, so the same .cu source is tested without a GPU
 * (implementation: cuda_emu.cpp):
 * - Each block's threads are cooperative fibers (own stacks; switched with _setjmp/_longjmp, so
 *   build with -U_FORTIFY_SOURCE). A fiber runs until it reaches __syncthreads, __syncwarp, a
 *   warp shuffle or a warp collective (gather: mma, ldmatrix), then the next one runs.
 * - Barriers are checked: a __syncthreads that some threads of the block never reach (they
 *   exited, or wait elsewhere), __syncthreads at different lines, or a warp operation that a
 *   lane of the warp exited before is a launch error (cudaErrorLaunchFailure, with a message
 *   naming the lines and thread ranges) instead of a hang. Warp operations (__syncwarp, the
 *   shuffles) must name the whole warp: other masks are reported as unsupported.
 * - Schedules, from $GPTLAB_EMU_SCHEDULE at each launch, so that a missing barrier changes the
 *   results under at least one of them:
 *     inorder        (default) blocks one after another; in each round every warp, in index
 *                    order, runs its lanes in order to their next barrier or shuffle (warps
 *                    advance in lockstep, one segment per round);
 *     reverse        warps, and lanes within a warp, in reverse order;
 *     greedy         each warp runs on to its next __syncthreads before the next warp starts
 *                    (its lanes still meet at __syncwarp and shuffles): a warp that overwrites
 *                    a shared tile others still read shows;
 *     random[:SEED]  blocks, warps and lanes in a seeded random order, every round.
 *   Under every schedule but inorder, up to 4 blocks are resident at once (each with its own
 *   shared memory) and their rounds interleave (reverse: blocks from the last; random: a random
 *   resident block each round), as blocks share a GPU.
 * - Dynamic shared memory is filled with NaN before each block, so reading an element nobody
 *   wrote shows up as NaN; writing past the launch's smem_bytes is a launch error (checked after
 *   each block), and so is any access past it that the emulator sees as it happens: ldmatrix
 *   and cp.async always, every watched access under racecheck (a plain read past it reads NaN). Static __shared__ variables are plain statics (one copy for all blocks, also
 *   when blocks interleave, not poisoned): the kernels keep their tiles in dynamic shared memory.
 * - Launch limits as on the hardware: <= 1024 threads per block, block.z <= 64, grid.y and
 *   grid.z <= 65535, <= 48 KiB of dynamic shared memory.
 * - Launches are serialised by a process-wide mutex; atomics are plain read-modify-writes (a
 *   fiber never switches inside one).
 * - Mutation: $GPTLAB_EMU_MUTATE=FILE:LINE (e.g. flash.cu:149, read at each launch) removes the
 *   __syncthreads or __syncwarp at that line of that file (base name): it returns at once. An
 *   atomicAdd there becomes a plain read-modify-write (the same arithmetic here; racecheck sees
 *   a read and a write). tests/kernels/test_mutations.py removes every site in turn.
 * - Devices, errors, streams: a model of the machine for the host-side glue (device guard, device
 *   count, launch checks), not of speed. Fake devices with compute capabilities (default one
 *   9.0 device), runtime and driver CUDA versions, a current device per thread (0 until set) and
 *   primary contexts made as CUDA 12 makes them (cudaSetDevice, and a launch on the current
 *   device); pointers belong to device 0 unless placed on another (gl_emu_configure,
 *   gl_emu_place below). Faults inside a kernel (a failed barrier, a race, an out-of-bounds
 *   access the emulator sees) fail the launch at once by default; with $GPTLAB_EMU_ASYNC=1
 *   (read at each launch) they are reported as a GPU reports them: the launch succeeds, and
 *   from the next launch or synchronisation on (kernels complete in order) the fault is the
 *   sticky error that every launch, cudaGetLastError and synchronisation returns (until
 *   gl_emu_configure). $GPTLAB_EMU_FAULT=NAME makes each launch
 *   of a kernel whose name contains NAME fault with cudaErrorIllegalAddress, as a wild pointer
 *   would on a GPU. A stream marked as capturing (gl_emu_capture) makes a synchronisation of it
 *   cudaErrorStreamCaptureUnsupported, which invalidates the capture; its launches still run.
 * - Racecheck (built with -DGL_EMU_RACECHECK: flavour cuda-emu-racecheck; slow, for small
 *   cases): GL_SMEM_PTR / GL_GLOBAL_PTR (and so GL_DYNAMIC_SMEM) become watched pointers, whose
 *   loads and stores (through [], which keeps the source line) record per 4-byte word the last
 *   write and the last two reads: thread, block and barrier epochs (cuda_emu_racecheck.h). Two
 *   accesses of a word by different threads, at least one a write, are a race (a launch error
 *   naming both threads and file:line) unless a __syncthreads of their block, or a __syncwarp
 *   of their warp when both are in one warp, lies between them. Shuffles do not order memory.
 *   Blocks are never ordered within a launch: only atomicAdd may meet atomicAdd (atomicAdd is
 *   always recorded, watched pointer or not).
 */
#ifndef GPTLAB_CUDA_EMU_H
#define GPTLAB_CUDA_EMU_H

#ifdef __CUDACC__
#error "cuda_emu.h is the emulator's: under nvcc, csrc/cuda/common.cuh defines the GL_* macros"
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
typedef struct CUstream_st *cudaStream_t;
enum cudaError_t { /* the CUDA runtime's codes for what the emulator reports */
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInsufficientDriver = 35,
    cudaErrorNoDevice = 100,
    cudaErrorInvalidDevice = 101,
    cudaErrorUnsupportedPtxVersion = 222,
    cudaErrorIllegalAddress = 700,
    cudaErrorLaunchFailure = 719,
    cudaErrorStreamCaptureUnsupported = 900,
    cudaErrorStreamCaptureImplicit = 906,
};
enum cudaDeviceAttr { cudaDevAttrComputeCapabilityMajor = 75, cudaDevAttrComputeCapabilityMinor = 76 };
enum cudaMemoryType {
    cudaMemoryTypeUnregistered = 0,
    cudaMemoryTypeHost = 1,
    cudaMemoryTypeDevice = 2,
    cudaMemoryTypeManaged = 3,
};
struct cudaPointerAttributes {
    cudaMemoryType type;
    int device;
    void *devicePointer;
    void *hostPointer;
};
enum cudaStreamCaptureStatus {
    cudaStreamCaptureStatusNone = 0,
    cudaStreamCaptureStatusActive = 1,
    cudaStreamCaptureStatusInvalidated = 2,
};
/* What the emulated library is built for: SASS for each of these virtual architectures and PTX
 * for the last, as nvcc's __CUDA_ARCH_LIST__ says of a cuda build with no GPU to build for. */
#define GL_EMU_ARCH_LIST 800, 900
/* The CUDA version the emulated runtime claims (CUDART_VERSION), unless gl_emu_configure says. */
#define GL_EMU_CUDART_VERSION 13000

namespace gl_emu {

extern const uint3 *block_idx; /* the running fiber's blockIdx */
extern dim3 block_dim, grid_dim;
extern const uint3 *thread_idx; /* the running fiber's threadIdx */

void syncthreads(const char *file, int line);
void syncwarp(const char *file, int line, unsigned mask = 0xffffffffu);
/* Every lane named in mask deposits bits, waits for the others, and gets src_lane's bits. */
uint64_t exchange(const char *file, int line, unsigned mask, uint64_t bits, int src_lane);
/* Every lane named in mask deposits n <= 64 bytes at mine, waits for the others, and gets all
 * lanes' bytes in all[lane * n]: the building block of warp-collective instructions (mma,
 * ldmatrix in cuda_emu_tc.h). Every lane must call it from the same site (file:line). */
void gather(const char *file, int line, unsigned mask, const void *mine, size_t n, void *all);
/* Fails the launch from inside a kernel: "<what> (file:line)" (for the checks of cuda_emu_tc.h). */
[[noreturn]] void launch_error(const char *file, int line, const char *what);
int lane_id();
void *dynamic_smem();
size_t dynamic_smem_bytes(); /* the running launch's smem_bytes */
/* For per-thread state kept outside the emulator (cp.async in cuda_emu_tc.h): the running
 * thread's index among all threads in flight (< MAX_RESIDENT_THREADS, stable while its block
 * runs), and a number naming its block's stay in its slot (new at every block start). */
constexpr int MAX_RESIDENT_THREADS = 4 * 1024; /* RESIDENT blocks of up to 1024 threads */
int resident_thread();
uint64_t residency();
void launch(const char *name, dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
            void (*body)(void *), void *ctx);

template <class F>
void launch_fn(const char *name, dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
               F &&f) {
    using Fn = std::remove_reference_t<F>;
    launch(name, grid, block, smem_bytes, stream, [](void *ctx) { (*static_cast<Fn *>(ctx))(); },
           static_cast<void *>(&f));
}

/* Racecheck (cuda_emu_racecheck.h): record a load, store or atomicAdd by the running thread. */
enum class Access { Read, Write, Atomic };
void race_access(const void *p, size_t bytes, Access kind, const char *file, int line);

template <class T>
T shfl_from(const char *file, int line, unsigned mask, T v, int src) {
    static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>);
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof v);
    bits = exchange(file, line, mask, bits, src);
    std::memcpy(&v, &bits, sizeof v);
    return v;
}
template <class T>
T shfl_xor_sync(const char *file, int line, unsigned mask, T v, int lane_mask, int width = 32) {
    int me = lane_id(), src = me ^ lane_mask;
    if ((src & ~(width - 1)) != (me & ~(width - 1))) src = me; /* outside the segment */
    return shfl_from(file, line, mask, v, src);
}
template <class T>
T shfl_sync(const char *file, int line, unsigned mask, T v, int src_lane, int width = 32) {
    int me = lane_id();
    return shfl_from(file, line, mask, v, (me & ~(width - 1)) + (src_lane & (width - 1)));
}
template <class T>
T shfl_down_sync(const char *file, int line, unsigned mask, T v, unsigned delta, int width = 32) {
    int me = lane_id();
    int src = (me & (width - 1)) + (int)delta < width ? me + (int)delta : me;
    return shfl_from(file, line, mask, v, src);
}

} /* namespace gl_emu */

#define threadIdx (*gl_emu::thread_idx)
#define blockIdx (*gl_emu::block_idx)
#define blockDim (gl_emu::block_dim)
#define gridDim (gl_emu::grid_dim)
#define warpSize 32

#define __syncthreads() gl_emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) gl_emu::syncwarp(__FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_xor_sync(...) gl_emu::shfl_xor_sync(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_sync(...) gl_emu::shfl_sync(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) gl_emu::shfl_down_sync(__FILE__, __LINE__, __VA_ARGS__)

#define GL_EMU_LAUNCH(kernel, grid, block, smem, stream, ...)                          \
    gl_emu::launch_fn(#kernel, (grid), (block), (smem), static_cast<cudaStream_t>(stream), \
                      [&] { kernel(__VA_ARGS__); })
#define GL_LAUNCH(kernel, grid, block, smem, stream, ...) \
    GL_EMU_LAUNCH(kernel, grid, block, smem, stream, __VA_ARGS__)
#ifdef GL_EMU_RACECHECK
#include "cuda_emu_racecheck.h" /* GL_SMEM_PTR, GL_GLOBAL_PTR: watched pointers */
#else
#define GL_SMEM_PTR(type) type *
#define GL_GLOBAL_PTR(type) type *
#define GL_SMEM_CAST(type, p) reinterpret_cast<type *>(p)
#endif
#define GL_DYNAMIC_SMEM(type, name) \
    GL_SMEM_PTR(type) name = static_cast<type *>(gl_emu::dynamic_smem())

/* Atomics: launches run on one OS thread, so a read-modify-write is atomic. The site is passed
 * for racecheck, which records it (or, when $GPTLAB_EMU_MUTATE removes it, a plain read and
 * write). */
#define atomicAdd(...) gl_emu::atomic_add(__FILE__, __LINE__, __VA_ARGS__)
namespace gl_emu {
/* Subnormal to sign-preserving zero. */
inline float flush_subnormal(float x) { return std::fpclassify(x) == FP_SUBNORMAL ? 0.f * x : x; }

template <class T>
T atomic_add([[maybe_unused]] const char *file, [[maybe_unused]] int line, T *p,
             std::type_identity_t<T> v) {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, int>, "atomicAdd: float or int");
#ifdef GL_EMU_RACECHECK
    race_access(p, sizeof(T), Access::Atomic, file, line);
#endif
    T old = *p;
#ifdef GL_EMU_GPU_NUMERICS
    if constexpr (std::is_same_v<T, float>) { /* PTX ISA, atom: .add.f32 flushes subnormal */
        *p = flush_subnormal(flush_subnormal(old) + flush_subnormal(v)); /* inputs and result */
        return old;
    }
#endif
    *p = old + v;
    return old;
}
} /* namespace gl_emu */

/* The runtime API subset the launchers use, over the emulator's model of the machine (see
 * "Devices, errors, streams" above). */
cudaError_t cudaGetLastError(void);
cudaError_t cudaPeekAtLastError(void);
const char *cudaGetErrorString(cudaError_t error);
cudaError_t cudaGetDeviceCount(int *count);
cudaError_t cudaDeviceGetAttribute(int *value, cudaDeviceAttr attr, int device);
cudaError_t cudaGetDevice(int *device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes *attr, const void *ptr);
cudaError_t cudaDriverGetVersion(int *version);
cudaError_t cudaRuntimeGetVersion(int *version);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaDeviceSynchronize(void);
cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus *status);
namespace gl_emu {
/* The driver's cuDevicePrimaryCtxGetState, for the device guard: 1 if `device`'s primary
 * context exists (nvcc builds ask the driver through cudaGetDriverEntryPoint). */
int primary_context_active(int device);
} /* namespace gl_emu */

/* The model's controls, for tests and gptlab.verify.emulator (plain C, found with dlsym):
 *   gl_emu_configure(devices, runtime, driver)  the fake machine: devices "9.0,8.6" (compute
 *       capabilities; "" = none), runtime and driver CUDA versions as 13010 for 13.1 (0 = the
 *       emulator's own); forgets contexts, placements, captures and the sticky error
 *   gl_emu_place(ptr, bytes, device)  memory [ptr, ptr + bytes) belongs to that fake device;
 *       ptr NULL: all memory no placement names does (at first, device 0's)
 *   gl_emu_set_device(device)         cudaSetDevice on the calling thread (creates the context)
 *   gl_emu_current_device()           cudaGetDevice of the calling thread
 *   gl_emu_primary_context(device)    1 if its primary context exists
 *   gl_emu_last_launch_device()       the device current at the last launch (-1: none yet)
 *   gl_emu_capture(stream, on)        the stream is (not) being captured into a CUDA graph
 *   gl_emu_synchronize()              cudaDeviceSynchronize: the sticky error, if any */
extern "C" {
int gl_emu_configure(const char *devices, int runtime_version, int driver_version);
int gl_emu_place(const void *ptr, size_t bytes, int device);
int gl_emu_set_device(int device);
int gl_emu_current_device(void);
int gl_emu_primary_context(int device);
int gl_emu_last_launch_device(void);
int gl_emu_capture(const void *stream, int on);
int gl_emu_synchronize(void);
}

#ifdef GL_EMU_GPU_NUMERICS
/* The GPU numerics flavour (cuda-emu-numerics): results as far from the emulator's as a GPU's
 * may be. Built with -ffp-contract=fast (and -mfma on x86), so that a * b + c contracts into one
 * FMA as ptxas may contract it; atomicAdd on float flushes subnormals (above); mma sums in
 * another order (cuda_emu_tc.h); and the math functions below are off by up to their maximum
 * error on a GPU (CUDA C++ Programming Guide, "Mathematical Functions", single precision, no
 * fast math): expf, exp2f 2 ulp; logf, log2f 1 ulp; erfcf 4 ulp. The offset is a fixed
 * function of the argument (a GPU's function is deterministic too), from -max to +max ulp;
 * exp2f(0) and expf(0) stay 1. */
namespace gl_emu {
inline float off_by_ulps(float exact, float x, int max_ulps) {
    if (!std::isfinite(exact) || exact == 0.f) return exact;
    uint32_t h;
    std::memcpy(&h, &x, 4);
    h *= 0x9e3779b1u; /* a hash of the argument's bits */
    h ^= h >> 15;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    int k = int(h % uint32_t(2 * max_ulps + 1)) - max_ulps;
    for (; k > 0; k--) exact = std::nextafter(exact, INFINITY);
    for (; k < 0; k++) exact = std::nextafter(exact, -INFINITY);
    return exact;
}
inline float gpu_exp2f(float x) { return x == 0.f ? 1.f : off_by_ulps(::exp2f(x), x, 2); }
inline float gpu_expf(float x) { return x == 0.f ? 1.f : off_by_ulps(::expf(x), x, 2); }
inline float gpu_log2f(float x) { return off_by_ulps(::log2f(x), x, 1); }
inline float gpu_logf(float x) { return off_by_ulps(::logf(x), x, 1); }
inline float gpu_erfcf(float x) { return off_by_ulps(::erfcf(x), x, 4); }
} /* namespace gl_emu */
#define exp2f(x) gl_emu::gpu_exp2f(x)
#define expf(x) gl_emu::gpu_expf(x)
#define log2f(x) gl_emu::gpu_log2f(x)
#define logf(x) gl_emu::gpu_logf(x)
#define erfcf(x) gl_emu::gpu_erfcf(x)
#endif

#endif /* GPTLAB_CUDA_EMU_H */
