/* Kernels that exercise the CUDA emulator itself (gptlab/verify/emu/cuda_emu.h): barrier deadlocks,
 * shared-memory poisoning and bounds, warp shuffles, schedule-dependent races, interleaved blocks,
 * the race detector, mutation of barrier sites, launch limits, the GPU numerics flavour.
 * Built by tests/kernels/test_emulator.py with g++ against the emulator (also with
 * -DGL_EMU_RACECHECK, and with the GPU numerics flavour's flags), and called through cffi:
 *
 *     int selftest(const char *scenario, float *out, int n, char *msg, int msg_len);
 *
 * runs one scenario, writes up to n floats to out and the launch's error message to msg, and
 * returns the cudaError_t of the launch (0 = success).
 */
#include <cstdio>
#include <cstring>

#include "cuda_emu.h"

namespace {

/* 32 threads; the upper half returns before the barrier the lower half waits at */
__global__ void partial_barrier(float *out) {
    if (threadIdx.x >= 16) return;
    __syncthreads();
    out[threadIdx.x] = 1.f;
}

/* even warps wait at one __syncthreads, odd warps at another */
__global__ void divergent_barriers(float *out) {
    if (threadIdx.x / 32 % 2 == 0) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1.f;
}

/* reads dynamic shared memory nobody wrote */
__global__ void read_unwritten(float *out) {
    GL_DYNAMIC_SMEM(float, smem);
    out[threadIdx.x] = smem[threadIdx.x];
}

/* warp_sum of lane ids by xor butterfly, broadcast of lane 5, and shift-down by 1 */
__global__ void shuffles(float *out) {
    int lane = threadIdx.x % 32;
    float v = float(lane);
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    out[3 * threadIdx.x] = v;
    out[3 * threadIdx.x + 1] = __shfl_sync(0xffffffffu, float(lane), 5);
    out[3 * threadIdx.x + 2] = __shfl_down_sync(0xffffffffu, float(lane), 1);
}

/* a shuffle whose mask names lanes that already exited */
__global__ void shuffle_after_exit(float *out) {
    if (threadIdx.x >= 16) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

/* each thread publishes a value and reads the next warp's: without the second barrier the result
 * depends on which warps ran first */
template <bool BARRIER>
__global__ void neighbour(float *out) {
    GL_DYNAMIC_SMEM(float, smem);
    const int t = threadIdx.x, n = blockDim.x;
    smem[t] = 0.f;
    __syncthreads();
    smem[t] = float(t + 1);
    if (BARRIER) __syncthreads(); /* neighbour's second barrier */
    out[blockIdx.x * n + t] = smem[(t + 32) % n];
}

/* only block 0 writes shared memory: block 1 must not see block 0's values */
__global__ void smem_per_block(float *out) {
    GL_DYNAMIC_SMEM(float, smem);
    const int t = threadIdx.x;
    if (blockIdx.x == 0) smem[t] = float(t);
    __syncthreads();
    out[blockIdx.x * blockDim.x + t] = smem[t];
}

/* writes past the 128 bytes of shared memory its launch asks for */
__global__ void smem_overrun(float *) {
    GL_DYNAMIC_SMEM(float, smem);
    smem[threadIdx.x + 32] = 0.f;
}

/* reads (does not write) past the 128 bytes of shared memory its launch asks for */
__global__ void smem_overread(float *out) {
    GL_DYNAMIC_SMEM(float, smem);
    smem[threadIdx.x] = 1.f;
    __syncthreads();
    out[threadIdx.x] = smem[threadIdx.x + 32]; /* the read past the launch's bytes */
}

/* What a GPU may compute differently from the emulator, on the inputs in out[0..47]: out[48] =
 * a * b - c (one FMA where ptxas contracts it); out[49] = atomicAdd of a subnormal onto 0; out[50
 * + i] = exp2f(out[16 + i]), i < 32 */
__global__ void numerics(float *out) {
    const int t = threadIdx.x;
    out[50 + t] = exp2f(out[16 + t]);
    if (t != 0) return;
    const float a = out[0], b = out[1], c = out[2];
    out[48] = a * b - c;
    out[49] = 0.f;
    atomicAdd(&out[49], out[3]);
}

/* each warp reads the next warp's tile, then (with BARRIER) waits before overwriting its own:
 * without that barrier, warps in lockstep still read before anyone writes (the __syncwarp ends
 * every warp's reads in one round), but a warp that runs on (greedy) overwrites its tile before
 * the previous warp read it: flash.cu's K/V restaging */
template <bool BARRIER>
__global__ void tile_reuse(float *out) {
    GL_DYNAMIC_SMEM(float, smem);
    const int t = threadIdx.x, n = blockDim.x;
    float acc = 0.f;
    for (int it = 0; it < 2; it++) {
        if (BARRIER) __syncthreads();
        smem[t] = float(it * n + t);
        __syncthreads();
        acc += smem[(t + 32) % n];
        __syncwarp();
    }
    out[blockIdx.x * n + t] = acc;
}

/* each thread reads what the thread before it wrote, with no barrier: right when threads run in
 * index order, wrong in reverse */
__global__ void read_previous(float *out) {
    GL_DYNAMIC_SMEM(float, smem);
    const int t = threadIdx.x;
    smem[t] = float(t);
    out[t] = t > 0 ? smem[t - 1] : -1.f;
}

/* lanes publish to shared memory, meet at a shuffle, and read a neighbour's value: a shuffle
 * orders nothing on the hardware, so SYNC (__syncwarp) is needed; the emulator's results are
 * right either way (lanes park at the shuffle), only racecheck tells */
template <bool SYNC>
__global__ void publish_then_shuffle(float *out) {
    GL_DYNAMIC_SMEM(float, smem);
    const int t = threadIdx.x, lane = t % 32;
    smem[t] = float(lane);
    const float one = __shfl_xor_sync(0xffffffffu, 1.f, 1);
    if (SYNC) __syncwarp();
    out[blockIdx.x * blockDim.x + t] = smem[t - lane + (lane + 1) % 32] * one;
}

/* every block adds 1 to out[threadIdx.x]: a plain += from several blocks is a race the results
 * do not show here (a fiber never switches inside it); atomicAdd is right */
template <bool ATOMIC>
__global__ void cross_block_add(GL_GLOBAL_PTR(float) out) {
    if (ATOMIC) atomicAdd(&out[threadIdx.x], 1.f);
    else out[threadIdx.x] += 1.f;
}

/* thread 0 of each block takes a ticket when the block starts and another after its barrier:
 * blocks run one after another iff the tickets of each block are consecutive */
int ticket = 0;
__global__ void tickets(float *out) {
    if (threadIdx.x == 0) out[2 * blockIdx.x] = float(ticket++);
    __syncthreads();
    if (threadIdx.x == 0) out[2 * blockIdx.x + 1] = float(ticket++);
}

/* a warp operation over half a warp: legal CUDA, outside what the emulator supports */
__global__ void half_warp_sync(float *) { __syncwarp(0x0000ffffu); }

__global__ void nothing(float *) {}

} /* namespace */

extern "C" int selftest(const char *scenario, float *out, int n, char *msg, int msg_len) {
    (void)n;
    const size_t smem = 4096;
    cudaGetLastError();
    if (!strcmp(scenario, "partial_barrier"))
        GL_LAUNCH(partial_barrier, dim3(1), dim3(32), 0, nullptr, out);
    else if (!strcmp(scenario, "divergent_barriers"))
        GL_LAUNCH(divergent_barriers, dim3(1), dim3(64), 0, nullptr, out);
    else if (!strcmp(scenario, "read_unwritten"))
        GL_LAUNCH(read_unwritten, dim3(1), dim3(32), smem, nullptr, out);
    else if (!strcmp(scenario, "shuffles"))
        GL_LAUNCH(shuffles, dim3(1), dim3(64), 0, nullptr, out);
    else if (!strcmp(scenario, "shuffle_after_exit"))
        GL_LAUNCH(shuffle_after_exit, dim3(1), dim3(32), 0, nullptr, out);
    else if (!strcmp(scenario, "race"))
        GL_LAUNCH(neighbour<false>, dim3(8), dim3(128), smem, nullptr, out);
    else if (!strcmp(scenario, "no_race"))
        GL_LAUNCH(neighbour<true>, dim3(8), dim3(128), smem, nullptr, out);
    else if (!strcmp(scenario, "smem_per_block"))
        GL_LAUNCH(smem_per_block, dim3(2), dim3(32), smem, nullptr, out);
    else if (!strcmp(scenario, "smem_overrun"))
        GL_LAUNCH(smem_overrun, dim3(1), dim3(32), 128, nullptr, out);
    else if (!strcmp(scenario, "smem_overread"))
        GL_LAUNCH(smem_overread, dim3(1), dim3(32), 128, nullptr, out);
    else if (!strcmp(scenario, "numerics"))
        GL_LAUNCH(numerics, dim3(1), dim3(32), 0, nullptr, out);
    else if (!strcmp(scenario, "half_warp_sync"))
        GL_LAUNCH(half_warp_sync, dim3(1), dim3(32), 0, nullptr, out);
    else if (!strcmp(scenario, "tile_reuse"))
        GL_LAUNCH(tile_reuse<true>, dim3(2), dim3(128), smem, nullptr, out);
    else if (!strcmp(scenario, "tile_reuse_unsynced"))
        GL_LAUNCH(tile_reuse<false>, dim3(2), dim3(128), smem, nullptr, out);
    else if (!strcmp(scenario, "read_previous"))
        GL_LAUNCH(read_previous, dim3(1), dim3(64), smem, nullptr, out);
    else if (!strcmp(scenario, "publish_then_shuffle"))
        GL_LAUNCH(publish_then_shuffle<true>, dim3(2), dim3(64), smem, nullptr, out);
    else if (!strcmp(scenario, "publish_then_shuffle_unsynced"))
        GL_LAUNCH(publish_then_shuffle<false>, dim3(2), dim3(64), smem, nullptr, out);
    else if (!strcmp(scenario, "cross_block_atomic"))
        GL_LAUNCH(cross_block_add<true>, dim3(4), dim3(32), 0, nullptr, out);
    else if (!strcmp(scenario, "cross_block_plain"))
        GL_LAUNCH(cross_block_add<false>, dim3(4), dim3(32), 0, nullptr, out);
    else if (!strcmp(scenario, "tickets")) {
        ticket = 0;
        GL_LAUNCH(tickets, dim3(8), dim3(64), 0, nullptr, out);
    } else if (!strcmp(scenario, "nothing"))
        GL_LAUNCH(nothing, dim3(1), dim3(32), 0, nullptr, out);
    else if (!strcmp(scenario, "too_many_threads"))
        GL_LAUNCH(nothing, dim3(1), dim3(2048), 0, nullptr, out);
    else if (!strcmp(scenario, "too_much_smem"))
        GL_LAUNCH(nothing, dim3(1), dim3(32), 64 * 1024, nullptr, out);
    else {
        snprintf(msg, msg_len, "unknown scenario %s", scenario);
        return -1;
    }
    cudaError_t e = cudaGetLastError();
    snprintf(msg, msg_len, "%s", e == cudaSuccess ? "" : cudaGetErrorString(e));
    return int(e);
}
