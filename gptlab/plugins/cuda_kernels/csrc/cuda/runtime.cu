/* ABI version, flavour, thread-local last error, device probing and launch checks. */
#include <cstdarg>
#include <cstdio>

#include "common.cuh"

namespace {
thread_local char last_error[512];
}

extern "C" int gptlab_abi_version(void) { return GPTLAB_ABI_VERSION; }
extern "C" const char *gptlab_last_error(void) { return last_error; }

extern "C" const char *gptlab_flavour(void) {
#if defined(__CUDACC__)
    return "cuda";
#elif defined(GL_EMU_RACECHECK)
    return "cuda-emu-racecheck";
#else
    return "cuda-emu";
#endif
}

/* The library carries sm_80 and sm_90 code and compute_90 PTX: it runs on compute capability
 * 8.0 and up (8.x runs the sm_80 code, 9.0+ the sm_90 code or the PTX). */
constexpr int MIN_MAJOR = 8;

extern "C" int gptlab_cuda_device_count(int *count) {
    if (!count) return gl::fail(GPTLAB_EINVAL, "cuda_device_count: null pointer");
    gl::clear_error();
    *count = 0;
#ifdef __CUDACC__
    int total = 0;
    cudaError_t e = cudaGetDeviceCount(&total);
    if (e != cudaSuccess) {
        cudaGetLastError(); /* not sticky: clear it */
        return gl::fail(GPTLAB_EDEVICE, "%s", cudaGetErrorString(e));
    }
    int major = 0, minor = 0;
    for (int i = 0; i < total; i++) {
        if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, i) != cudaSuccess ||
            cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, i) != cudaSuccess) {
            cudaError_t err = cudaGetLastError();
            return gl::fail(GPTLAB_EDEVICE, "GPU %d: %s", i, cudaGetErrorString(err));
        }
        *count += major >= MIN_MAJOR;
    }
    if (total > 0 && *count == 0)
        return gl::fail(GPTLAB_EDEVICE, "%d GPU(s) found, none with compute capability >= %d.0 "
                        "(GPU %d is %d.%d); the kernels are built for sm_80 and sm_90", total,
                        MIN_MAJOR, total - 1, major, minor);
#endif
    return GPTLAB_OK;
}

namespace gl {

void clear_error() {
    last_error[0] = 0;
    cudaGetLastError(); /* an error left by an earlier call must not be reported as ours */
}

int fail(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return code;
}

int check_launch(const char *fn) {
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return fail(GPTLAB_EDEVICE, "%s: %s", fn, cudaGetErrorString(e));
    return GPTLAB_OK;
}

int DeviceGuard::bind(const void *ptr, const char *fn) {
#ifdef __CUDACC__
    cudaPointerAttributes attr;
    cudaError_t e = cudaPointerGetAttributes(&attr, ptr);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return fail(GPTLAB_EDEVICE, "%s: %s", fn, cudaGetErrorString(e));
    }
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
        return fail(GPTLAB_EINVAL, "%s: tensors must be in GPU memory", fn);
    int current = -1;
    if ((e = cudaGetDevice(&current)) == cudaSuccess && current != attr.device &&
        (e = cudaSetDevice(attr.device)) == cudaSuccess)
        previous_ = current;
    if (e != cudaSuccess) {
        cudaGetLastError();
        return fail(GPTLAB_EDEVICE, "%s: %s", fn, cudaGetErrorString(e));
    }
#else
    (void)ptr;
    (void)fn;
#endif
    return GPTLAB_OK;
}

DeviceGuard::~DeviceGuard() {
#ifdef __CUDACC__
    if (previous_ >= 0) cudaSetDevice(previous_);
#endif
}

} /* namespace gl */

/* The fused decoding step is CPU only (csrc/cpu/decode.c): on a GPU, decoding runs op by op. */
extern "C" int64_t gptlab_decode_step_workspace_size(int64_t, int64_t, int64_t) { return 0; }
extern "C" int gptlab_decode_step_f32(float *, float *const *, float *const *, void *,
                                      const int64_t *, const float *, const float *,
                                      const float *const *, const float *, const float *,
                                      const float *, const gptlab_decode_spec *, int64_t,
                                      int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                                      int) {
    gl::clear_error();
    return gl::fail(GPTLAB_EINVAL, "decode_step: the fused decoding step runs on the CPU only");
}
