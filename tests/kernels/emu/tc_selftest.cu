/* Kernels that exercise the emulator's tensor-core primitives (csrc/cuda/tensor_core.cuh over
 * gptlab/verify/emu/cuda_emu_tc.h). Built with g++ by tests/kernels/test_tensor_core_emulated.py and
 * called through cffi:
 *
 *   tc_layout(kind, lane, i, &row, &col)   the emulator's fragment tables (kind: 0 = mma A,
 *                                          1 = mma B, 2 = mma C/D, 3 = ldmatrix, 4 = .trans)
 *   tc_round(to, in, out, n)               float -> bfloat16 (to = 0) / float16 (1) bits
 *   tc_widen(from, in, out, n)             bfloat16 / float16 bits -> float
 *   tc_mma(dtype, d, a, b, warps)          per warp: d (32 lanes x 4) += mma(a (32 x 4 regs),
 *                                          b (32 x 2 regs)), dtype 0 = bf16, 1 = f16
 *   tc_ldmatrix(num, trans, out, mat)      mat: 32 rows x 8 b16 (matrix j = rows 8j..8j+7) put
 *                                          in shared memory, lane l giving row l's address;
 *                                          out (32 lanes x 4 registers) = ldmatrix's result
 *   tc_scenario(name, out, n, msg, len)    cp.async timing, what a barrier makes visible (also
 *                                          under racecheck) and the collectives' launch errors
 * Each returns the cudaError_t of its launch (0 = success), the message in msg where given.
 */
#include <cstdio>
#include <cstring>

#include "cuda/tensor_core.cuh"

namespace {

using gl::tc::cp_async16;

template <class T>
__global__ void mma_kernel(float *d, const uint32_t *a, const uint32_t *b) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t = warp * 32 + lane;
    float acc[4];
    uint32_t ra[4], rb[2];
    for (int i = 0; i < 4; i++) acc[i] = d[4 * t + i];
    for (int i = 0; i < 4; i++) ra[i] = a[4 * t + i];
    for (int i = 0; i < 2; i++) rb[i] = b[2 * t + i];
    gl::tc::mma<T>(acc, ra, rb);
    for (int i = 0; i < 4; i++) d[4 * t + i] = acc[i];
}

constexpr int LD_STRIDE = 16; /* halves per shared row: 32 bytes, rows 16-byte aligned */

__global__ void ldmatrix_kernel(uint32_t *out, const uint16_t *mat, int num, int trans) {
    GL_DYNAMIC_SMEM(uint16_t, smem);
    const int lane = threadIdx.x;
    for (int j = 0; j < 8; j++) smem[lane * LD_STRIDE + j] = mat[lane * 8 + j];
    __syncwarp();
    uint32_t r[4] = {0, 0, 0, 0};
    GL_SMEM_PTR(const uint16_t) row = smem + lane * LD_STRIDE;
    if (num == 1 && !trans) gl::tc::ldmatrix_x1(reinterpret_cast<uint32_t(&)[1]>(r), row);
    if (num == 2 && !trans) gl::tc::ldmatrix_x2(reinterpret_cast<uint32_t(&)[2]>(r), row);
    if (num == 4 && !trans) gl::tc::ldmatrix_x4(r, row);
    if (num == 1 && trans) gl::tc::ldmatrix_x1_trans(reinterpret_cast<uint32_t(&)[1]>(r), row);
    if (num == 2 && trans) gl::tc::ldmatrix_x2_trans(reinterpret_cast<uint32_t(&)[2]>(r), row);
    if (num == 4 && trans) gl::tc::ldmatrix_x4_trans(r, row);
    for (int j = 0; j < 4; j++) out[lane * 4 + j] = r[j];
}

/* out[t] = the float a copy brought, read before its wait (NaN), after waiting for all but the
 * newest group, then after waiting for all: three reads of two copies, 6 floats per thread */
__global__ void cp_async_timing(float *out, const float *src) {
    GL_DYNAMIC_SMEM(float, smem);
    const int t = threadIdx.x;
    out += 6 * blockIdx.x * blockDim.x;
    cp_async16(smem + 8 * t, src + 8 * t, 16);     /* group 0 */
    gl::tc::cp_async_commit();
    cp_async16(smem + 8 * t + 4, src + 8 * t + 4, 8); /* group 1: 8 bytes, 8 zeros */
    gl::tc::cp_async_commit();
    out[6 * t + 0] = smem[8 * t];
    out[6 * t + 1] = smem[8 * t + 4];
    gl::tc::cp_async_wait<1>();
    out[6 * t + 2] = smem[8 * t];
    out[6 * t + 3] = smem[8 * t + 4];
    gl::tc::cp_async_wait<0>();
    out[6 * t + 4] = smem[8 * t + 5];
    out[6 * t + 5] = smem[8 * t + 6]; /* zero filled */
}

/* thread 0 copies; the others read after the wait and a barrier (or, planted, no barrier) */
template <bool BARRIER>
__global__ void cp_async_visibility(float *out, const float *src) {
    GL_DYNAMIC_SMEM(float, smem);
    const int t = threadIdx.x;
    if (t < 32) {
        cp_async16(smem + 4 * t, src + 4 * t, 16);
        gl::tc::cp_async_commit();
        gl::tc::cp_async_wait<0>();
    }
    if (BARRIER) __syncthreads();
    out[t] = smem[t];
}

/* warp 1 writes an 8x8 matrix (element e = 32 + e / 2), warp 0 reads it by ldmatrix after a
 * barrier (or, planted, none): lane l's low half is element (l / 4, 2 (l % 4)), i.e. 32 + l */
template <bool BARRIER>
__global__ void ldmatrix_visibility(float *out) {
    GL_DYNAMIC_SMEM(uint16_t, smem);
    const int t = threadIdx.x;
    if (t >= 32) smem[2 * (t - 32)] = smem[2 * (t - 32) + 1] = uint16_t(t);
    if (BARRIER) __syncthreads();
    if (t < 32) {
        uint32_t r[1];
        gl::tc::ldmatrix_x1(r, smem + (t % 8) * 8);
        out[t] = float(r[0] & 0xffffu);
    }
}

__global__ void mma_lane_exited(float *out) {
    if (threadIdx.x == 31) return;
    float acc[4] = {0, 0, 0, 0};
    const uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
    gl::tc::mma<__nv_bfloat16>(acc, a, b);
    out[threadIdx.x] = acc[0];
}

__global__ void mma_two_sites(float *out) {
    float acc[4] = {0, 0, 0, 0};
    const uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
    if (threadIdx.x < 16) gl::tc::mma<__nv_bfloat16>(acc, a, b);
    else gl::tc::mma<__nv_bfloat16>(acc, a, b);
    out[threadIdx.x] = acc[0];
}

__global__ void ldmatrix_unaligned(float *out) {
    GL_DYNAMIC_SMEM(uint16_t, smem);
    uint32_t r[4];
    gl::tc::ldmatrix_x4(r, smem + threadIdx.x * 8 + 1);
    out[threadIdx.x] = float(r[0]);
}

/* rows 16..31 lie past the 256 bytes of shared memory the launch asks for */
__global__ void ldmatrix_past_launch_smem(float *out) {
    GL_DYNAMIC_SMEM(uint16_t, smem);
    uint32_t r[4];
    gl::tc::ldmatrix_x4(r, smem + threadIdx.x * 8);
    out[threadIdx.x] = float(r[0]);
}

__global__ void ldmatrix_from_global(float *out) {
    uint32_t r[4];
    gl::tc::ldmatrix_x4(r, out + threadIdx.x * 4);
    out[threadIdx.x] = float(r[0]);
}

int finish(char *msg, int msg_len) {
    cudaError_t e = cudaGetLastError();
    if (msg) snprintf(msg, msg_len, "%s", e == cudaSuccess ? "" : cudaGetErrorString(e));
    return int(e);
}

} /* namespace */

extern "C" int tc_layout(int kind, int lane, int i, int *row, int *col) {
    using namespace gl_emu::frag;
    switch (kind) {
    case 0: *row = a_row(lane, i); *col = a_col(lane, i); return 0;
    case 1: *row = b_row(lane, i); *col = b_col(lane, i); return 0;
    case 2: *row = c_row(lane, i); *col = c_col(lane, i); return 0;
    case 3: *row = ld_row(lane, i, false); *col = ld_col(lane, i, false); return 0;
    case 4: *row = ld_row(lane, i, true); *col = ld_col(lane, i, true); return 0;
    }
    return -1;
}

extern "C" void tc_round(int to, const float *in, uint16_t *out, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        out[i] = to ? __half_as_ushort(__float2half_rn(in[i]))
                    : __bfloat16_as_ushort(__float2bfloat16_rn(in[i]));
}

extern "C" void tc_widen(int from, const uint16_t *in, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        out[i] = from ? __half2float(__ushort_as_half(in[i]))
                      : __bfloat162float(__ushort_as_bfloat16(in[i]));
}

extern "C" int tc_mma(int dtype, float *d, const uint32_t *a, const uint32_t *b, int warps) {
    cudaGetLastError();
    if (dtype == 0) GL_LAUNCH(mma_kernel<__nv_bfloat16>, dim3(1), dim3(32 * warps), 0, nullptr, d, a, b);
    else GL_LAUNCH(mma_kernel<__half>, dim3(1), dim3(32 * warps), 0, nullptr, d, a, b);
    return finish(nullptr, 0);
}

extern "C" int tc_ldmatrix(int num, int trans, uint32_t *out, const uint16_t *mat) {
    cudaGetLastError();
    GL_LAUNCH(ldmatrix_kernel, dim3(1), dim3(32), 32 * LD_STRIDE * 2, nullptr, out, mat, num, trans);
    return finish(nullptr, 0);
}

extern "C" int tc_scenario(const char *name, float *out, const float *src, char *msg,
                           int msg_len) {
    cudaGetLastError();
    if (!strcmp(name, "cp_async_timing"))
        GL_LAUNCH(cp_async_timing, dim3(2), dim3(64), 64 * 8 * 4, nullptr, out, src);
    else if (!strcmp(name, "cp_async_visibility"))
        GL_LAUNCH(cp_async_visibility<true>, dim3(1), dim3(128), 128 * 4, nullptr, out, src);
    else if (!strcmp(name, "cp_async_no_barrier"))
        GL_LAUNCH(cp_async_visibility<false>, dim3(1), dim3(128), 128 * 4, nullptr, out, src);
    else if (!strcmp(name, "ldmatrix_visibility"))
        GL_LAUNCH(ldmatrix_visibility<true>, dim3(1), dim3(64), 64 * 2, nullptr, out);
    else if (!strcmp(name, "ldmatrix_no_barrier"))
        GL_LAUNCH(ldmatrix_visibility<false>, dim3(1), dim3(64), 64 * 2, nullptr, out);
    else if (!strcmp(name, "mma_lane_exited"))
        GL_LAUNCH(mma_lane_exited, dim3(1), dim3(32), 0, nullptr, out);
    else if (!strcmp(name, "mma_two_sites"))
        GL_LAUNCH(mma_two_sites, dim3(1), dim3(32), 0, nullptr, out);
    else if (!strcmp(name, "ldmatrix_unaligned"))
        GL_LAUNCH(ldmatrix_unaligned, dim3(1), dim3(32), 1024, nullptr, out);
    else if (!strcmp(name, "ldmatrix_past_launch_smem"))
        GL_LAUNCH(ldmatrix_past_launch_smem, dim3(1), dim3(32), 256, nullptr, out);
    else if (!strcmp(name, "ldmatrix_from_global"))
        GL_LAUNCH(ldmatrix_from_global, dim3(1), dim3(32), 0, nullptr, out);
    else {
        snprintf(msg, msg_len, "unknown scenario %s", name);
        return -1;
    }
    return finish(msg, msg_len);
}
