/* The CUDA emulator behind cuda_emu.h: fibers per block, checked barriers, two schedules.
 *
 * A launch takes a process-wide mutex, then runs the grid's blocks one after another on the
 * calling thread. Each thread of a block is a fiber with its own mmap'ed stack (a guard page
 * below it). Fibers start through ucontext (makecontext/setcontext, once per fiber per launch)
 * and then switch with _setjmp/_longjmp, which save no signal mask (no system call per switch).
 *
 * The scheduler runs in rounds: every Ready fiber (warps in index order, or in a seeded random
 * order) runs until it parks at a barrier or finishes. Then warps whose lanes all wait at a warp
 * barrier are released; otherwise, if every thread of the block waits at the same
 * __syncthreads, the block barrier is released; anything else is a deadlock and fails the launch
 * with a description of where each thread range is.
 */
#ifdef _FORTIFY_SOURCE
#error "build the CUDA emulator with -U_FORTIFY_SOURCE: fibers switch stacks with _longjmp"
#endif

#include "cuda_emu.h"

#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <numeric>
#include <string>
#include <vector>

namespace gl_emu {

uint3 block_idx;
dim3 block_dim, grid_dim;
const uint3 *thread_idx;

namespace {

constexpr size_t STACK_BYTES = 256 * 1024;
constexpr size_t MAX_DYNAMIC_SMEM = 48 * 1024;
constexpr int WARP = 32;
constexpr uint64_t NO_GEN = std::numeric_limits<uint64_t>::max();

enum class State { Ready, AtBlockBarrier, AtWarpBarrier, Done };

struct Fiber {
    ucontext_t start;   /* fresh context at the top of the stack */
    jmp_buf resume;     /* where a parked fiber continues */
    bool fresh = true;  /* enter through `start`, not `resume` */
    char *stack = nullptr;
    uint3 idx{};
    int lane = 0, warp = 0;
    State state = State::Done;
    const char *file = "";
    int line = 0;
    uint64_t exchanges = 0; /* warp exchanges taken part in this block */
};

struct Slot {
    uint64_t bits;
    uint64_t gen;
};

struct Launch {
    void (*body)(void *) = nullptr;
    void *ctx = nullptr;
    int threads = 0, warps = 0;
    bool random = false;
    uint64_t rng = 0;
    bool failed = false;
    std::string error;
};

std::mutex launch_mutex;
std::vector<Fiber *> pool;
std::vector<Slot> xbuf;                 /* [warp][parity][lane] */
std::vector<float> smem(MAX_DYNAMIC_SMEM / sizeof(float));
Launch *L = nullptr;
Fiber *cur = nullptr;
jmp_buf scheduler;

thread_local cudaError_t last_error = cudaSuccess;
thread_local cudaError_t message_code = cudaSuccess;
thread_local std::string message;

void set_error(cudaError_t code, std::string msg) {
    last_error = code;
    message_code = code;
    message = std::move(msg);
}

std::string format(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

const char *base(const char *path) {
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

uint64_t next_random() { /* splitmix64 */
    uint64_t z = (L->rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

template <class T>
void shuffle(std::vector<T> &v) {
    for (size_t i = v.size(); i > 1; i--) std::swap(v[i - 1], v[next_random() % i]);
}

/* ---------------------------------------------------------------- fibers */
void park() {
    if (_setjmp(cur->resume) == 0) _longjmp(scheduler, 1);
}

/* Fail the launch from inside a fiber. Nothing with a destructor may live in the frames that
 * the _longjmp skips, so the message is formatted straight into the launch's error. */
[[noreturn]] void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
[[noreturn]] void fail(const char *fmt, ...) {
    if (!L->failed) {
        char buf[512];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(buf, sizeof buf, fmt, ap);
        va_end(ap);
        L->failed = true;
        L->error = buf;
    }
    cur->state = State::Done;
    _longjmp(scheduler, 1); /* the launch is abandoned; fibers are reset by the next one */
}

void fiber_main() {
    for (;;) { /* one kernel body per block; parked in between */
        L->body(L->ctx);
        cur->state = State::Done;
        park();
    }
}

bool reset(Fiber *f) {
    if (!f->stack) {
        long page = sysconf(_SC_PAGESIZE);
        void *p = mmap(nullptr, STACK_BYTES + page, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) return false;
        if (mprotect(p, page, PROT_NONE) != 0) { /* guard page: an overflow faults */
            munmap(p, STACK_BYTES + page);
            return false;
        }
        f->stack = static_cast<char *>(p) + page;
    }
    if (getcontext(&f->start) != 0) return false;
    f->start.uc_stack.ss_sp = f->stack;
    f->start.uc_stack.ss_size = STACK_BYTES;
    f->start.uc_link = nullptr;
    makecontext(&f->start, fiber_main, 0);
    f->fresh = true;
    return true;
}

void run(Fiber *f) {
    cur = f;
    thread_idx = &f->idx;
    if (_setjmp(scheduler) == 0) {
        if (f->fresh) {
            f->fresh = false;
            setcontext(&f->start); /* returns only on failure */
            L->failed = true;
            L->error = "cannot start a fiber (setcontext failed)";
            return;
        }
        _longjmp(f->resume, 1);
    }
}

void wait(State s, const char *file, int line) {
    cur->state = s;
    cur->file = file;
    cur->line = line;
    park();
}

/* ---------------------------------------------------------------- diagnostics */
std::string describe(const std::vector<Fiber *> &fibers) {
    /* "threads 0-63 wait at __syncthreads (flash.cu:120); threads 64-127 exited" */
    auto what = [](const Fiber *f) -> std::string {
        switch (f->state) {
        case State::Done: return "exited";
        case State::AtBlockBarrier:
            return format("wait at __syncthreads (%s:%d)", base(f->file), f->line);
        case State::AtWarpBarrier:
            return format("wait at a warp barrier (%s:%d)", base(f->file), f->line);
        default: return "are running";
        }
    };
    std::string out;
    size_t i = 0;
    while (i < fibers.size()) {
        std::string w = what(fibers[i]);
        size_t j = i;
        while (j + 1 < fibers.size() && what(fibers[j + 1]) == w) j++;
        if (!out.empty()) out += "; ";
        out += j == i ? format("thread %zu %s", i, w.c_str())
                      : format("threads %zu-%zu %s", i, j, w.c_str());
        i = j + 1;
    }
    return out;
}

/* ---------------------------------------------------------------- one block */
/* Release every warp whose lanes all wait at a warp barrier (every warp operation names the
 * whole warp: see full_mask). A lane that exited while others wait is an error. */
bool release_warps(const std::vector<Fiber *> &fibers) {
    bool released = false;
    for (int w = 0; w < L->warps; w++) {
        int first = w * WARP, n = std::min(WARP, L->threads - first);
        const Fiber *waiter = nullptr, *exited = nullptr;
        bool all = true;
        for (int l = 0; l < n; l++) {
            const Fiber *f = fibers[first + l];
            if (f->state == State::AtWarpBarrier) waiter = f;
            else all = false;
            if (f->state == State::Done && !exited) exited = f;
        }
        if (!waiter) continue;
        if (exited) {
            L->failed = true;
            L->error = format("warp barrier (%s:%d) waits for lane %d of warp %d, which exited",
                              base(waiter->file), waiter->line, exited->lane, w);
            return false;
        }
        if (!all) continue; /* some lanes still wait at a block barrier: see run_block */
        for (int l = 0; l < n; l++) fibers[first + l]->state = State::Ready;
        released = true;
    }
    return released;
}

/* Dynamic shared memory past the launch's smem_bytes keeps this pattern; a kernel that wrote
 * there asked for too little (on a GPU it would corrupt another block's memory or fault). */
constexpr uint32_t CANARY = 0x7fc0dead; /* a quiet NaN, so reading it also shows */

bool canary_intact(size_t smem_bytes) {
    for (size_t i = (smem_bytes + 3) / 4; i < smem.size(); i++) {
        uint32_t bits;
        std::memcpy(&bits, &smem[i], 4);
        if (bits != CANARY) {
            L->failed = true;
            L->error = format("wrote float %zu of dynamic shared memory, past the %zu bytes the "
                              "launch asked for", i, smem_bytes);
            return false;
        }
    }
    return true;
}

bool run_block(const std::vector<Fiber *> &fibers, size_t smem_bytes) {
    float canary;
    std::memcpy(&canary, &CANARY, 4);
    std::fill(smem.begin(), smem.end(), canary);
    for (auto &s : xbuf) s = {0, NO_GEN};
    for (Fiber *f : fibers) {
        f->state = State::Ready;
        f->exchanges = 0;
    }
    std::vector<int> order(L->warps);
    std::iota(order.begin(), order.end(), 0);
    for (;;) {
        if (L->random) shuffle(order);
        for (int w : order) {
            int first = w * WARP, n = std::min(WARP, L->threads - first);
            for (int l = 0; l < n; l++) {
                Fiber *f = fibers[first + l];
                if (f->state != State::Ready) continue;
                run(f);
                if (L->failed) return false;
            }
        }
        if (release_warps(fibers)) continue;
        if (L->failed) return false;
        int done = 0, at_block = 0;
        for (const Fiber *f : fibers) {
            done += f->state == State::Done;
            at_block += f->state == State::AtBlockBarrier;
        }
        if (done == L->threads) return canary_intact(smem_bytes);
        const Fiber *first = nullptr;
        bool same_site = true;
        for (const Fiber *f : fibers) {
            if (f->state != State::AtBlockBarrier) continue;
            if (!first) first = f;
            same_site &= f->file == first->file && f->line == first->line;
        }
        if (at_block != L->threads || !same_site) {
            L->failed = true;
            L->error = first && at_block + done == L->threads && same_site
                ? format("__syncthreads (%s:%d) reached by %d of %d threads: ",
                         base(first->file), first->line, at_block, L->threads)
                : std::string("barrier deadlock: ");
            L->error += describe(fibers);
            return false;
        }
        for (Fiber *f : fibers) f->state = State::Ready;
    }
}

bool parse_schedule(bool &random, uint64_t &seed) {
    const char *s = getenv("GPTLAB_EMU_SCHEDULE");
    random = false;
    seed = 0;
    if (!s || !*s || strcmp(s, "inorder") == 0) return true;
    if (strncmp(s, "random", 6) != 0) return false;
    random = true;
    if (s[6] == 0) return true;
    if (s[6] != ':' || !s[7]) return false;
    char *end = nullptr;
    seed = strtoull(s + 7, &end, 10);
    return *end == 0;
}

} /* namespace */

/* ---------------------------------------------------------------- device-side API */
int lane_id() { return cur->lane; }

void *dynamic_smem() { return smem.data(); }

void syncthreads(const char *file, int line) { wait(State::AtBlockBarrier, file, line); }

/* The emulator supports warp operations over the whole warp only (every lane the block has in
 * that warp), which is all the kernels use; anything else is reported, not guessed at. */
static void full_mask(const char *what, const char *file, int line, unsigned mask) {
    int n = std::min(WARP, L->threads - cur->warp * WARP);
    unsigned full = n == WARP ? 0xffffffffu : (1u << n) - 1u;
    if (mask != full)
        fail("%s (%s:%d) with mask 0x%08x: the emulator supports only the full-warp mask 0x%08x",
             what, base(file), line, mask, full);
}

void syncwarp(const char *file, int line, unsigned mask) {
    full_mask("__syncwarp", file, line, mask);
    wait(State::AtWarpBarrier, file, line);
}

uint64_t exchange(const char *file, int line, unsigned mask, uint64_t bits, int src_lane) {
    Fiber *f = cur;
    full_mask("warp shuffle", file, line, mask);
    uint64_t gen = f->exchanges++;
    Slot *slots = &xbuf[(static_cast<size_t>(f->warp) * 2 + (gen & 1)) * WARP];
    slots[f->lane] = {bits, gen};
    wait(State::AtWarpBarrier, file, line);
    /* Double-buffered by parity: a lane that runs ahead writes the other half, and cannot get
     * two exchanges ahead because the next barrier needs every lane. */
    if (src_lane < 0 || src_lane >= WARP || !(mask >> src_lane & 1u)) return bits;
    const Slot &s = slots[src_lane];
    if (s.gen != gen)
        fail("warp shuffle (%s:%d): lane %d reads lane %d, which did not take part", base(file),
             line, f->lane, src_lane);
    return s.bits;
}

/* Slots of gather: [warp][parity][lane], GATHER_BYTES each, stamped with the exchange number
 * and the call site so that a lane at another warp operation is an error, not a silent mix. */
namespace {
constexpr size_t GATHER_BYTES = 64;
struct GatherSlot {
    unsigned char bytes[GATHER_BYTES];
    uint64_t gen;
    const char *file;
    int line;
};
std::vector<GatherSlot> gbuf;
} /* namespace */

void gather(const char *file, int line, unsigned mask, const void *mine, size_t n, void *all) {
    Fiber *f = cur;
    full_mask("warp collective", file, line, mask);
    if (n > GATHER_BYTES) fail("warp collective (%s:%d): %zu bytes per lane > %zu", base(file),
                               line, n, GATHER_BYTES);
    if (gbuf.size() < xbuf.size()) gbuf.resize(xbuf.size()); /* [warp][parity][lane] too */
    uint64_t gen = f->exchanges++; /* one count with the shuffles: parities stay in step */
    GatherSlot *slots = &gbuf[(static_cast<size_t>(f->warp) * 2 + (gen & 1)) * WARP];
    GatherSlot &s = slots[f->lane];
    std::memcpy(s.bytes, mine, n);
    s.gen = gen;
    s.file = file;
    s.line = line;
    wait(State::AtWarpBarrier, file, line);
    int n_lanes = std::min(WARP, L->threads - f->warp * WARP);
    for (int l = 0; l < n_lanes; l++) {
        const GatherSlot &o = slots[l];
        if (o.gen != gen || o.line != line || std::strcmp(o.file, file) != 0)
            fail("warp collective (%s:%d): lane %d of warp %d is not at the same instruction "
                 "(PTX .aligned: all lanes must execute it together)", base(file), line, l,
                 f->warp);
        std::memcpy(static_cast<unsigned char *>(all) + l * n, o.bytes, n);
    }
}

void launch_error(const char *file, int line, const char *what) {
    fail("%s (%s:%d), thread %d", what, base(file), line, cur->warp * WARP + cur->lane);
}

void launch(const char *name, dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t,
            void (*body)(void *), void *ctx) {
    std::lock_guard<std::mutex> guard(launch_mutex);
    uint64_t threads = uint64_t(block.x) * block.y * block.z;
    if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 ||
        grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 0x7fffffffu) {
        set_error(cudaErrorInvalidConfiguration,
                  format("kernel %s: invalid launch configuration grid (%u, %u, %u) block "
                         "(%u, %u, %u)", name, grid.x, grid.y, grid.z, block.x, block.y,
                         block.z));
        return;
    }
    if (smem_bytes > MAX_DYNAMIC_SMEM) {
        set_error(cudaErrorInvalidConfiguration,
                  format("kernel %s: %zu bytes of dynamic shared memory > %zu", name, smem_bytes,
                         MAX_DYNAMIC_SMEM));
        return;
    }
    Launch launch;
    launch.body = body;
    launch.ctx = ctx;
    launch.threads = int(threads);
    launch.warps = int((threads + WARP - 1) / WARP);
    uint64_t seed;
    if (!parse_schedule(launch.random, seed)) {
        set_error(cudaErrorInvalidValue, format("GPTLAB_EMU_SCHEDULE must be inorder, random or "
                                                "random:SEED, got '%s'",
                                                getenv("GPTLAB_EMU_SCHEDULE")));
        return;
    }
    for (const char *c = name; *c; c++) seed = seed * 131 + uint8_t(*c); /* per kernel */
    launch.rng = seed;
    while (pool.size() < threads) pool.push_back(new Fiber());
    std::vector<Fiber *> fibers(pool.begin(), pool.begin() + threads);
    for (int i = 0; i < launch.threads; i++) {
        Fiber *f = fibers[i];
        if (!reset(f)) {
            set_error(cudaErrorMemoryAllocation,
                      format("kernel %s: cannot allocate fiber stacks", name));
            return;
        }
        f->lane = i % WARP;
        f->warp = i / WARP;
        f->idx = {unsigned(i) % block.x, unsigned(i) / block.x % block.y,
                  unsigned(i) / (block.x * block.y)};
    }
    xbuf.assign(size_t(launch.warps) * 2 * WARP, Slot{0, NO_GEN});
    L = &launch;
    block_dim = block;
    grid_dim = grid;
    uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
    std::vector<uint64_t> order;
    if (launch.random) {
        order.resize(blocks);
        std::iota(order.begin(), order.end(), 0);
        shuffle(order);
    }
    for (uint64_t i = 0; i < blocks; i++) {
        uint64_t b = launch.random ? order[i] : i;
        block_idx = {unsigned(b % grid.x), unsigned(b / grid.x % grid.y),
                     unsigned(b / (uint64_t(grid.x) * grid.y))};
        if (!run_block(fibers, smem_bytes)) {
            set_error(cudaErrorLaunchFailure,
                      format("kernel %s, block (%u, %u, %u): %s", name, block_idx.x, block_idx.y,
                             block_idx.z, launch.error.c_str()));
            break;
        }
    }
    L = nullptr;
    cur = nullptr;
    thread_idx = nullptr;
}

} /* namespace gl_emu */

/* ---------------------------------------------------------------- host-side runtime API */
cudaError_t cudaGetLastError(void) {
    cudaError_t e = gl_emu::last_error;
    gl_emu::last_error = cudaSuccess;
    return e;
}

const char *cudaGetErrorString(cudaError_t error) {
    if (error == gl_emu::message_code && !gl_emu::message.empty())
        return gl_emu::message.c_str(); /* the detailed message of the last failure */
    switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    }
    return "unknown error";
}
