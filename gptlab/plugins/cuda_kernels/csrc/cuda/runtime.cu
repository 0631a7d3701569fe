/* ABI version, flavour, thread-local last error, device probing, launch checks and the device
 * guard.
 *
 * Which GPUs the library can run on follows CUDA's compatibility rules (CUDA C++ Programming
 * Guide, "Binary Compatibility" and "PTX Compatibility"; CUDA Compatibility guide, "Minor
 * Version Compatibility"): SASS built for sm_XY runs on compute capability X.Z with Z >= Y;
 * PTX is compiled by the driver at load for any newer GPU, but only by a driver at least as new
 * as the CUDA that produced it. nvcc's __CUDA_ARCH_LIST__ names the virtual architectures of
 * this build; build.py gives SASS for each and PTX for the last (the emulator: GL_EMU_ARCH_LIST).
 */
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "common.cuh"

namespace {
thread_local char last_error[512];
thread_local cudaError_t pending_at_entry = cudaSuccess; /* an error left before the entry point */

#ifdef __CUDACC__
constexpr int ARCHS[] = {__CUDA_ARCH_LIST__}; /* e.g. 800, 900: ascending */
#else
constexpr int ARCHS[] = {GL_EMU_ARCH_LIST};
#endif
constexpr int NUM_ARCHS = int(sizeof ARCHS / sizeof ARCHS[0]);

/* "sm_80, sm_90" */
void arch_names(char *out, size_t n) {
    size_t used = 0;
    out[0] = 0;
    for (int i = 0; i < NUM_ARCHS && used < n; i++)
        used += size_t(snprintf(out + used, n - used, "%ssm_%d", i ? ", " : "", ARCHS[i] / 10));
}

/* The driver's cuDevicePrimaryCtxGetState (found through the runtime, so the library still loads
 * without a driver): whether `device`'s primary context exists. Where it cannot be asked, true
 * (the guard then restores as cudaSetDevice always did). */
bool has_primary_context(int device) {
#ifdef __CUDACC__
    using GetState = int (*)(int dev, unsigned *flags, int *active); /* CUresult, CUdevice */
    static const GetState get_state = [] {
        void *fn = nullptr;
        cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
        cudaError_t e = cudaGetDriverEntryPointByVersion("cuDevicePrimaryCtxGetState", &fn,
                                                         CUDART_VERSION, cudaEnableDefault,
                                                         &found);
#else
        cudaError_t e = cudaGetDriverEntryPoint("cuDevicePrimaryCtxGetState", &fn,
                                                cudaEnableDefault, &found);
#endif
        if (e != cudaSuccess || found != cudaDriverEntryPointSuccess) {
            cudaGetLastError();
            fn = nullptr;
        }
        return reinterpret_cast<GetState>(fn);
    }();
    unsigned flags = 0;
    int active = 0;
    return !get_state || get_state(device, &flags, &active) != 0 || active;
#else
    return gl_emu::primary_context_active(device) != 0;
#endif
}

/* Errors of a fault inside a kernel (cudaErrorIllegalAddress 700 .. cudaErrorLaunchFailure
 * 719): sticky, every later call of the context returns them. */
bool is_fault(cudaError_t e) { return int(e) >= 700 && int(e) <= 719; }

bool sync_requested() {
    const char *s = getenv("GPTLAB_CUDA_SYNC");
    return s && *s && strcmp(s, "0") != 0;
}
} /* namespace */

extern "C" int gptlab_abi_version(void) { return GPTLAB_ABI_VERSION; }
extern "C" const char *gptlab_last_error(void) { return last_error; }

extern "C" const char *gptlab_flavour(void) {
#if defined(__CUDACC__)
    return "cuda";
#elif defined(GL_EMU_RACECHECK)
    return "cuda-emu-racecheck";
#elif defined(GL_EMU_GPU_NUMERICS)
    return "cuda-emu-numerics";
#else
    return "cuda-emu";
#endif
}

/* cp.async, ldmatrix and bfloat16 mma need compute capability 8.0. */
constexpr int MIN_MAJOR = 8;

extern "C" int gptlab_cuda_device_count(int *count) {
    if (!count) return gl::fail(GPTLAB_EINVAL, "cuda_device_count: null pointer");
    gl::clear_error();
    *count = 0;
    int total = 0;
    cudaError_t e = cudaGetDeviceCount(&total);
    if (e != cudaSuccess) {
        cudaGetLastError(); /* not sticky: clear it */
        return gl::fail(GPTLAB_EDEVICE, "%s", cudaGetErrorString(e));
    }
    char first[384] = "", why[384];
    for (int i = 0; i < total; i++) {
        if (!gl::device_problem(i, why, sizeof why)) (*count)++;
        else if (!first[0]) snprintf(first, sizeof first, "%s", why);
    }
    if (total > 0 && *count == 0)
        return gl::fail(GPTLAB_EDEVICE, "%d GPU(s) found, none usable: %s", total, first);
    return GPTLAB_OK;
}

namespace gl {

void clear_error() {
    last_error[0] = 0;
    /* an error left by an earlier call must not be reported as ours; a sticky one (a fault in an
     * earlier kernel) comes back at our launch, and check_launch says so */
    pending_at_entry = cudaGetLastError();
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
    const bool sync = sync_requested();
    if (is_fault(e) && e == pending_at_entry)
        return fail(GPTLAB_EDEVICE, "%s: %s (pending before this op began: an earlier kernel "
                    "faulted; rerun with GPTLAB_CUDA_SYNC=1 to find which)", fn,
                    cudaGetErrorString(e));
    if (is_fault(e) && !sync)
        return fail(GPTLAB_EDEVICE, "%s: %s (a fault inside a kernel, this op's or an earlier "
                    "one's: launches are asynchronous; rerun with GPTLAB_CUDA_SYNC=1 to find "
                    "which)", fn, cudaGetErrorString(e));
    if (e != cudaSuccess) return fail(GPTLAB_EDEVICE, "%s: %s", fn, cudaGetErrorString(e));
    if (!sync) return GPTLAB_OK;
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(launch_stream, &capture) != cudaSuccess) {
        cudaGetLastError(); /* the legacy stream while another captures: no sync either */
        return GPTLAB_OK;
    }
    if (capture != cudaStreamCaptureStatusNone) return GPTLAB_OK; /* not permitted in capture */
    if ((e = cudaStreamSynchronize(launch_stream)) != cudaSuccess)
        return fail(GPTLAB_EDEVICE, "%s: %s (in this op's kernels: GPTLAB_CUDA_SYNC=1 "
                    "synchronised after its launch)", fn, cudaGetErrorString(e));
    return GPTLAB_OK;
}

bool device_problem(int device, char *why, size_t n) {
    int major = 0, minor = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
        cudaError_t e = cudaGetLastError();
        snprintf(why, n, "GPU %d: %s", device, cudaGetErrorString(e));
        return true;
    }
    const int cc = 10 * major + minor;
    char archs[96];
    arch_names(archs, sizeof archs);
    if (major < MIN_MAJOR) {
        snprintf(why, n, "GPU %d has compute capability %d.%d; the kernels need %d.0 or newer "
                 "(cp.async, ldmatrix, bfloat16 mma)", device, major, minor, MIN_MAJOR);
        return true;
    }
    for (int i = 0; i < NUM_ARCHS; i++)
        if (ARCHS[i] / 100 == major && ARCHS[i] / 10 <= cc) return false; /* SASS runs it */
    const int ptx = ARCHS[NUM_ARCHS - 1] / 10;
    if (ptx > cc) {
        snprintf(why, n, "GPU %d (compute capability %d.%d) has no code in this library (%s); "
                 "it is built for the GPUs torch sees when it is built: rebuild it with "
                 "`gpt kernels build --force --flavour cuda`", device, major, minor, archs);
        return true;
    }
    int runtime = 0, driver = 0;
    if (cudaRuntimeGetVersion(&runtime) != cudaSuccess ||
        cudaDriverGetVersion(&driver) != cudaSuccess) {
        cudaGetLastError();
        return false; /* unknown: the first launch will say */
    }
    if (driver < runtime) {
        snprintf(why, n, "GPU %d (compute capability %d.%d) has no SASS in this library (%s) "
                 "and its compute_%d PTX needs a driver for CUDA %d.%d or newer to compile it, "
                 "but the driver supports CUDA %d.%d: set NVCC to an nvcc that knows sm_%d%d, "
                 "or update the driver", device, major, minor, archs, ptx, runtime / 1000,
                 runtime % 1000 / 10, driver / 1000, driver % 1000 / 10, major, minor);
        return true;
    }
    return false; /* the driver compiles the PTX at the first launch */
}

int DeviceGuard::bind(const void *ptr, const char *fn) {
    cudaPointerAttributes attr;
    cudaError_t e = cudaPointerGetAttributes(&attr, ptr);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return fail(GPTLAB_EDEVICE, "%s: %s", fn, cudaGetErrorString(e));
    }
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
        return fail(GPTLAB_EINVAL, "%s: tensors must be in GPU memory", fn);
    char why[384];
    if (device_problem(attr.device, why, sizeof why))
        return fail(GPTLAB_EDEVICE, "%s: %s", fn, why);
    int current = -1;
    if ((e = cudaGetDevice(&current)) == cudaSuccess && current != attr.device &&
        (e = cudaSetDevice(attr.device)) == cudaSuccess)
        previous_ = current;
    if (e != cudaSuccess) {
        cudaGetLastError();
        return fail(GPTLAB_EDEVICE, "%s: %s", fn, cudaGetErrorString(e));
    }
    return GPTLAB_OK;
}

DeviceGuard::~DeviceGuard() {
    if (previous_ >= 0 && has_primary_context(previous_)) cudaSetDevice(previous_);
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
