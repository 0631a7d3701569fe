/* Tensor-core primitives for sm_80+ kernels, one spelling for nvcc and for the CPU emulator:
 *
 *   gl::tc::mma<T>(acc, a, b)        mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32:
 *                                    acc (4 floats of the 16x8 C/D) += A (16x16) B (16x8)
 *   gl::tc::ldmatrix_x{1,2,4}(r, p)  ldmatrix.sync.aligned.m8n8.x{1,2,4}.shared.b16
 *   gl::tc::ldmatrix_x4_trans(r, p)  the same with .trans
 *   gl::tc::cp_async16(dst, src, n)  cp.async.cg.shared.global, 16 bytes, the first n from src
 *   gl::tc::cp_async_commit(), cp_async_wait<N>()
 *   gl::tc::pack<T>(lo, hi)          two floats -> a register of two T (round to nearest even)
 *
 * T is __nv_bfloat16 or __half. Under nvcc these are inline PTX and cuda_bf16.h / cuda_fp16.h;
 * under a host compiler they are the emulator's cuda_emu_tc.h (gptlab/verify/emu/, on the
 * emulated flavours' include path), where each warp instruction is checked as a warp collective
 * (all 32 lanes at the same call site) and cp.async completes only at the wait. Fragment layouts
 * (which lane holds which (row, col)): see cuda_emu_tc.h, from the PTX ISA's "Matrix Fragments
 * for mma.m16n8k16 with floating point type" and "ldmatrix".
 */
#ifndef GPTLAB_CUDA_TENSOR_CORE_CUH
#define GPTLAB_CUDA_TENSOR_CORE_CUH

#include <cstdint>

#include "common.cuh"

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define GL_TC_SITE_PARAM
#define GL_TC_SITE
#else
#include <source_location>

#include "cuda_emu_tc.h"
/* the emulator names the kernel's line in its errors: the call site, passed implicitly */
#define GL_TC_SITE_PARAM , std::source_location site = std::source_location::current()
#define GL_TC_SITE site.file_name(), int(site.line())
#endif

namespace gl::tc {

template <class T>
__device__ __forceinline__ uint16_t bits_of(float x);
template <>
__device__ __forceinline__ uint16_t bits_of<__nv_bfloat16>(float x) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}
template <>
__device__ __forceinline__ uint16_t bits_of<__half>(float x) {
    return __half_as_ushort(__float2half_rn(x));
}

/* A register holding (lo, hi) as two T: lo in the low 16 bits (the lower column index). */
template <class T>
__device__ __forceinline__ uint32_t pack(float lo, float hi) {
    return uint32_t(bits_of<T>(lo)) | (uint32_t(bits_of<T>(hi)) << 16);
}

__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

#ifdef __CUDACC__
__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

template <class T>
__device__ __forceinline__ void mma(float (&acc)[4], const uint32_t (&a)[4],
                                    const uint32_t (&b)[2]);
template <>
__device__ __forceinline__ void mma<__nv_bfloat16>(float (&acc)[4], const uint32_t (&a)[4],
                                                   const uint32_t (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma<__half>(float (&acc)[4], const uint32_t (&a)[4],
                                            const uint32_t (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t (&r)[1], const void *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)));
}

__device__ __forceinline__ void cp_async16(void *dst, const void *src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::);
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" :: "n"(N));
}

#else /* the emulator: the shared-memory operand P is a raw pointer or, under racecheck, a
       * watched one (GL_SMEM_PTR), whose accesses cuda_emu_tc.h records */

template <class T>
inline void mma(float (&acc)[4], const uint32_t (&a)[4], const uint32_t (&b)[2] GL_TC_SITE_PARAM) {
    gl_emu::mma_m16n8k16<T>(GL_TC_SITE, acc, a, b);
}
template <class P>
inline void ldmatrix_x1(uint32_t (&r)[1], P row GL_TC_SITE_PARAM) {
    gl_emu::ldmatrix(GL_TC_SITE, 1, false, r, gl_emu::raw(row));
}
template <class P>
inline void ldmatrix_x2(uint32_t (&r)[2], P row GL_TC_SITE_PARAM) {
    gl_emu::ldmatrix(GL_TC_SITE, 2, false, r, gl_emu::raw(row));
}
template <class P>
inline void ldmatrix_x4(uint32_t (&r)[4], P row GL_TC_SITE_PARAM) {
    gl_emu::ldmatrix(GL_TC_SITE, 4, false, r, gl_emu::raw(row));
}
template <class P>
inline void ldmatrix_x1_trans(uint32_t (&r)[1], P row GL_TC_SITE_PARAM) {
    gl_emu::ldmatrix(GL_TC_SITE, 1, true, r, gl_emu::raw(row));
}
template <class P>
inline void ldmatrix_x2_trans(uint32_t (&r)[2], P row GL_TC_SITE_PARAM) {
    gl_emu::ldmatrix(GL_TC_SITE, 2, true, r, gl_emu::raw(row));
}
template <class P>
inline void ldmatrix_x4_trans(uint32_t (&r)[4], P row GL_TC_SITE_PARAM) {
    gl_emu::ldmatrix(GL_TC_SITE, 4, true, r, gl_emu::raw(row));
}
template <class P>
inline void cp_async16(P dst, const void *src, int src_bytes GL_TC_SITE_PARAM) {
    gl_emu::cp_async16(GL_TC_SITE, gl_emu::raw(dst), src, src_bytes);
}
inline void cp_async_commit() { gl_emu::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
    gl_emu::cp_async_wait(N);
}

#endif /* __CUDACC__ */

} /* namespace gl::tc */

#endif /* GPTLAB_CUDA_TENSOR_CORE_CUH */
