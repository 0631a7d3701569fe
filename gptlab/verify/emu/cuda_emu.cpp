/* The CUDA emulator behind cuda_emu.h: fibers per block, checked barriers, schedules, mutation
 * of barrier sites, and the race detector's bookkeeping.
 *
 * A launch takes a process-wide mutex, then runs the grid's blocks on the calling thread: one
 * after another (inorder), or up to RESIDENT at once, each in its own slot (a Block: fibers,
 * shared memory, shuffle and gather buffers, barrier epochs), their rounds interleaved. Each thread of a
 * block is a fiber with its own mmap'ed stack (a guard page below it). Fibers start through
 * ucontext (makecontext/setcontext, once per fiber per launch) and then switch with
 * _setjmp/_longjmp, which save no signal mask (no system call per switch).
 *
 * A block advances in rounds: every Ready fiber (warps and lanes in the schedule's order) runs
 * until it parks at a barrier or finishes; under greedy a warp's round goes on, releasing its
 * own warp barriers, until its lanes wait at a __syncthreads or exit. Then warps whose lanes
 * all wait at a warp barrier are released; otherwise, if every thread of the block waits at the
 * same __syncthreads, the block barrier is released; anything else is a deadlock and fails the
 * launch with a description of where each thread range is.
 *
 * Racecheck: each block counts the __syncthreads it passed (bar_epoch) and each warp the
 * __syncwarps (warp_epoch; a shuffle does not count). An access records its thread and these
 * counts; a later access by another thread of the block is ordered after it iff a count moved
 * since (the warp's only for two threads of one warp). Accesses from different blocks are never
 * ordered. Shadow words: per slot for shared memory (reset with the block), in a hash map for
 * global memory (reset at each launch).
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
#include <unordered_map>
#include <vector>

namespace gl_emu {

const uint3 *block_idx;
dim3 block_dim, grid_dim;
const uint3 *thread_idx;

namespace {

constexpr size_t STACK_BYTES = 256 * 1024;
constexpr size_t MAX_DYNAMIC_SMEM = 48 * 1024;
constexpr int WARP = 32;
constexpr int RESIDENT = 4; /* blocks in flight at once, under every schedule but inorder */
static_assert(RESIDENT * 1024 == MAX_RESIDENT_THREADS);
constexpr uint64_t NO_GEN = std::numeric_limits<uint64_t>::max();
#ifdef GL_EMU_RACECHECK
constexpr bool RACECHECK = true;
#else
constexpr bool RACECHECK = false;
#endif

enum class State { Ready, AtBlockBarrier, AtWarpBarrier, Done };
enum class Order { InOrder, Reverse, Greedy, Random };

struct Block;

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
    int tid = 0;            /* index in the block */
    bool fence = false;     /* waits at a __syncwarp (orders memory), not at a shuffle */
    Block *block = nullptr;
};

struct Slot {
    uint64_t bits;
    uint64_t gen;
};

/* A lane's deposit for gather, stamped with the exchange number and the call site so that a
 * lane at another warp operation is an error, not a silent mix. */
constexpr size_t GATHER_BYTES = 64;
struct GatherSlot {
    unsigned char bytes[GATHER_BYTES];
    uint64_t gen;
    const char *file;
    int line;
};

/* Racecheck: one access of a 4-byte word (block == NO_BLOCK: none). */
constexpr uint64_t NO_BLOCK = std::numeric_limits<uint64_t>::max();
struct Record {
    uint64_t block = NO_BLOCK; /* linear index in the grid */
    int tid = 0;
    uint64_t bar_epoch = 0, warp_epoch = 0;
    const char *file = "";
    int line = 0;
    Access kind = Access::Read;
};
struct Shadow {
    Record write, read, read2; /* the last write; the last read and an unordered one before it */
};

/* A resident block: its threads, shared memory and barrier state. */
struct Block {
    uint64_t id = 0;     /* linear index in the grid */
    uint64_t serial = 0; /* which stay in this slot: new at every block start in the process */
    uint3 idx{};
    bool active = false;
    std::vector<Fiber *> fibers;
    std::vector<float> smem = std::vector<float>(MAX_DYNAMIC_SMEM / sizeof(float));
    std::vector<Slot> xbuf;            /* shuffles: [warp][parity][lane] */
    std::vector<GatherSlot> gbuf;      /* warp collectives (gather): [warp][parity][lane] */
    uint64_t bar_epoch = 0;            /* __syncthreads passed */
    std::vector<uint64_t> warp_epoch;  /* __syncwarp passed, per warp */
    std::vector<Shadow> shadow;        /* racecheck: per word of smem */
};

struct Launch {
    void (*body)(void *) = nullptr;
    void *ctx = nullptr;
    int threads = 0, warps = 0;
    size_t smem_bytes = 0; /* of dynamic shared memory, as the launch asked */
    Order order = Order::InOrder;
    uint64_t rng = 0;
    bool failed = false;
    std::string error;
    std::vector<int> warp_order, lane_order; /* scratch, per round */
};

std::mutex launch_mutex;
std::vector<Fiber *> pool;
std::vector<Block> slots(RESIDENT);
std::unordered_map<uintptr_t, Shadow> global_shadow; /* racecheck: per word, this launch */
char mutate_file[256];                               /* $GPTLAB_EMU_MUTATE: base name, */
int mutate_line = 0;                                 /* and line (0: no mutation) */
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

/* ---------------------------------------------------------------- the machine model */
/* Fake devices, contexts, placements, captures and the sticky error (one context's worth):
 * guarded by machine_mutex; the current device is per thread, as the runtime's is. */
struct Placement {
    uintptr_t begin, end;
    int device;
};
struct Machine {
    std::vector<std::pair<int, int>> devices{{9, 0}}; /* compute capability per device */
    int runtime = GL_EMU_CUDART_VERSION, driver = GL_EMU_CUDART_VERSION;
    std::vector<bool> contexts = std::vector<bool>(1, false);
    std::vector<Placement> placements;
    int default_device = 0; /* of memory no placement names */
    std::vector<std::pair<const void *, cudaStreamCaptureStatus>> captures;
    cudaError_t sticky = cudaSuccess; /* a fault reported asynchronously: stays until configure */
    std::string sticky_message;
    cudaError_t pending = cudaSuccess; /* a fault not yet seen: sticky from the next launch or */
    std::string pending_message;       /* synchronisation on (kernels complete in order) */
    int last_launch_device = -1;
};
std::mutex machine_mutex;
Machine machine;
thread_local int current_device = 0;

bool valid_device(int d) { return d >= 0 && size_t(d) < machine.devices.size(); }

/* A pending fault becomes the sticky error (under machine_mutex). */
void fault_seen() {
    if (machine.pending == cudaSuccess || machine.sticky != cudaSuccess) return;
    machine.sticky = machine.pending;
    machine.sticky_message = machine.pending_message;
    machine.pending = cudaSuccess;
}

/* cudaGetLastError's view of the sticky error (a synchronisation's, with `sync`: the pending
 * fault too): it is returned, never cleared. */
bool report_sticky(bool sync = false) {
    std::lock_guard<std::mutex> guard(machine_mutex);
    if (sync) fault_seen();
    if (machine.sticky == cudaSuccess) return false;
    set_error(machine.sticky, machine.sticky_message);
    return true;
}

cudaStreamCaptureStatus capture_status(const void *stream) {
    for (const auto &c : machine.captures)
        if (c.first == stream) return c.second;
    return cudaStreamCaptureStatusNone;
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
    block_idx = &f->block->idx;
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
enum class Warp { Waiting, Released, Failed };

/* Release warp w if all its lanes wait at a warp barrier (every warp operation names the whole
 * warp: see full_mask); a __syncwarp (not a shuffle) also moves the warp's epoch. A lane that
 * exited while others wait is an error. */
Warp release_warp(Block &b, int w) {
    int first = w * WARP, n = std::min(WARP, L->threads - first);
    const Fiber *waiter = nullptr, *exited = nullptr;
    bool all = true, fence = true;
    for (int l = 0; l < n; l++) {
        const Fiber *f = b.fibers[first + l];
        if (f->state == State::AtWarpBarrier) waiter = f;
        else all = false;
        if (f->state == State::Done && !exited) exited = f;
        fence &= f->fence;
    }
    if (!waiter) return Warp::Waiting;
    if (exited) {
        L->failed = true;
        L->error = format("warp barrier (%s:%d) waits for lane %d of warp %d, which exited",
                          base(waiter->file), waiter->line, exited->lane, w);
        return Warp::Failed;
    }
    if (!all) return Warp::Waiting; /* some lanes still wait at a block barrier: see step */
    for (int l = 0; l < n; l++) b.fibers[first + l]->state = State::Ready;
    if (fence) b.warp_epoch[w]++;
    return Warp::Released;
}

/* Dynamic shared memory past the launch's smem_bytes keeps this pattern; a kernel that wrote
 * there asked for too little (on a GPU it would corrupt another block's memory or fault). */
constexpr uint32_t CANARY = 0x7fc0dead; /* a quiet NaN, so reading it also shows */

bool canary_intact(const Block &b, size_t smem_bytes) {
    for (size_t i = (smem_bytes + 3) / 4; i < b.smem.size(); i++) {
        uint32_t bits;
        std::memcpy(&bits, &b.smem[i], 4);
        if (bits != CANARY) {
            L->failed = true;
            L->error = format("wrote float %zu of dynamic shared memory, past the %zu bytes the "
                              "launch asked for", i, smem_bytes);
            return false;
        }
    }
    return true;
}

/* Put block `id` into slot b: poisoned shared memory, every thread Ready at the kernel's top. */
void start_block(Block &b, uint64_t id) {
    const dim3 g = grid_dim;
    static uint64_t serials = 0;
    b.id = id;
    b.serial = ++serials;
    b.idx = {unsigned(id % g.x), unsigned(id / g.x % g.y), unsigned(id / (uint64_t(g.x) * g.y))};
    b.active = true;
    float canary;
    std::memcpy(&canary, &CANARY, 4);
    std::fill(b.smem.begin(), b.smem.end(), canary);
    b.xbuf.assign(size_t(L->warps) * 2 * WARP, Slot{0, NO_GEN});
    b.gbuf.resize(b.xbuf.size()); /* stale slots are told apart by gen: exchanges restart at 0 */
    for (GatherSlot &g : b.gbuf) g.gen = NO_GEN;
    b.bar_epoch = 0;
    b.warp_epoch.assign(L->warps, 0);
    if (RACECHECK) b.shadow.assign(b.smem.size(), Shadow{});
    for (Fiber *f : b.fibers) {
        f->state = State::Ready;
        f->exchanges = 0;
    }
}

/* The order of 0..n-1 for this round under the launch's schedule, into v. */
void round_order(std::vector<int> &v, int n) {
    v.resize(n);
    std::iota(v.begin(), v.end(), 0);
    if (L->order == Order::Reverse) std::reverse(v.begin(), v.end());
    else if (L->order == Order::Random) shuffle(v);
}

bool run_lanes(Block &b, int w) {
    int first = w * WARP, n = std::min(WARP, L->threads - first);
    round_order(L->lane_order, n);
    for (int l : L->lane_order) {
        Fiber *f = b.fibers[first + l];
        if (f->state != State::Ready) continue;
        run(f);
        if (L->failed) return false;
    }
    return true;
}

enum class Step { Continue, Finished, Failed };

/* One round of block b. */
Step step(Block &b) {
    round_order(L->warp_order, L->warps);
    for (int w : L->warp_order) {
        if (!run_lanes(b, w)) return Step::Failed;
        while (L->order == Order::Greedy) { /* on to the warp's next __syncthreads */
            Warp r = release_warp(b, w);
            if (r == Warp::Failed) return Step::Failed;
            if (r == Warp::Waiting) break;
            if (!run_lanes(b, w)) return Step::Failed;
        }
    }
    bool released = false;
    for (int w = 0; w < L->warps; w++) {
        Warp r = release_warp(b, w);
        if (r == Warp::Failed) return Step::Failed;
        released |= r == Warp::Released;
    }
    if (released) return Step::Continue;
    int done = 0, at_block = 0;
    for (const Fiber *f : b.fibers) {
        done += f->state == State::Done;
        at_block += f->state == State::AtBlockBarrier;
    }
    if (done == L->threads) return Step::Finished;
    const Fiber *first = nullptr;
    bool same_site = true;
    for (const Fiber *f : b.fibers) {
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
        L->error += describe(b.fibers);
        return Step::Failed;
    }
    for (Fiber *f : b.fibers) f->state = State::Ready;
    b.bar_epoch++;
    return Step::Continue;
}

/* Runs every block of the launch; false (with L->error) on the first failure, whose block is
 * then in *failed. */
bool run_grid(size_t smem_bytes, int nslots, const Block **failed) {
    const uint64_t blocks = uint64_t(grid_dim.x) * grid_dim.y * grid_dim.z;
    std::vector<uint64_t> order; /* random: the order in which blocks become resident */
    if (L->order == Order::Random) {
        order.resize(blocks);
        std::iota(order.begin(), order.end(), 0);
        shuffle(order);
    }
    uint64_t next = 0;
    auto next_id = [&] {
        uint64_t i = next++;
        return L->order == Order::Random ? order[i]
               : L->order == Order::Reverse ? blocks - 1 - i : i;
    };
    int active = 0;
    for (int s = 0; s < nslots; s++) {
        start_block(slots[s], next_id());
        active++;
    }
    for (int s = 0; active > 0; s = (s + 1) % nslots) {
        if (L->order == Order::Random) s = int(next_random() % nslots);
        Block &b = slots[s];
        if (!b.active) continue;
        *failed = &b;
        Step r = step(b);
        if (r == Step::Failed) return false;
        if (r == Step::Continue) continue;
        if (!canary_intact(b, smem_bytes)) return false;
        if (next < blocks) {
            start_block(b, next_id());
        } else {
            b.active = false;
            active--;
        }
    }
    return true;
}

bool parse_schedule(Order &order, uint64_t &seed) {
    const char *s = getenv("GPTLAB_EMU_SCHEDULE");
    order = Order::InOrder;
    seed = 0;
    if (!s || !*s || strcmp(s, "inorder") == 0) return true;
    if (strcmp(s, "reverse") == 0 || strcmp(s, "greedy") == 0) {
        order = s[0] == 'r' ? Order::Reverse : Order::Greedy;
        return true;
    }
    if (strncmp(s, "random", 6) != 0) return false;
    order = Order::Random;
    if (s[6] == 0) return true;
    if (s[6] != ':' || !s[7]) return false;
    char *end = nullptr;
    seed = strtoull(s + 7, &end, 10);
    return *end == 0;
}

/* $GPTLAB_EMU_MUTATE: "FILE:LINE" (a base name), or unset / empty for none. */
bool parse_mutation() {
    const char *s = getenv("GPTLAB_EMU_MUTATE");
    mutate_line = 0;
    if (!s || !*s) return true;
    const char *colon = strrchr(s, ':');
    if (!colon || colon == s || size_t(colon - s) >= sizeof mutate_file) return false;
    char *end = nullptr;
    long line = strtol(colon + 1, &end, 10);
    if (end == colon + 1 || *end || line < 1 || line > std::numeric_limits<int>::max())
        return false;
    std::memcpy(mutate_file, s, size_t(colon - s));
    mutate_file[colon - s] = 0;
    mutate_line = int(line);
    return true;
}

bool mutated(const char *file, int line) {
    return line == mutate_line && strcmp(base(file), mutate_file) == 0;
}

/* ---------------------------------------------------------------- racecheck */
/* threadIdx of thread tid, blockIdx of block id, as "(x, y, z)" into buf. */
const char *coords(char *buf, size_t n, uint64_t i, dim3 d) {
    snprintf(buf, n, "(%llu, %llu, %llu)", (unsigned long long)(i % d.x),
             (unsigned long long)(i / d.x % d.y),
             (unsigned long long)(i / (uint64_t(d.x) * d.y)));
    return buf;
}

/* Is access r (of the running block's word) ordered before an access by the running thread? */
bool ordered(const Record &r) {
    const Block &b = *cur->block;
    if (r.block == NO_BLOCK) return true;
    if (r.block != b.id) return false;
    if (r.tid == cur->tid || b.bar_epoch > r.bar_epoch) return true;
    return r.tid / WARP == cur->warp && b.warp_epoch[cur->warp] > r.warp_epoch;
}

const char *kind_name(Access k) {
    return k == Access::Read ? "a read" : k == Access::Write ? "a write" : "an atomicAdd";
}

/* Fails the launch: `now` (by the running thread) and `before` touch one word unordered;
 * `where` names the word. No object with a destructor lives here: fail() _longjmps out. */
[[noreturn]] void race(const char *where, const Record &now, const Record &before) {
    char me[64], other[64], blk[64], who[160];
    coords(me, sizeof me, uint64_t(now.tid), block_dim);
    coords(other, sizeof other, uint64_t(before.tid), block_dim);
    if (before.block == now.block)
        snprintf(who, sizeof who, "thread %s", other);
    else
        snprintf(who, sizeof who, "block %s thread %s",
                 coords(blk, sizeof blk, before.block, grid_dim), other);
    fail("race on %s: %s by thread %s at %s:%d and %s by %s at %s:%d, with no %s", where,
         kind_name(now.kind), me, base(now.file), now.line, kind_name(before.kind), who,
         base(before.file), before.line,
         before.block != now.block ? "order between blocks of a launch (only atomicAdd may meet "
                                     "atomicAdd)"
                                   : "__syncthreads (or __syncwarp, in one warp) between them");
}

/* The recorded access that `now` races with, or null. */
const Record *conflict(const Shadow &sh, const Record &now) {
    if (!ordered(sh.write) && !(now.kind == Access::Atomic && sh.write.kind == Access::Atomic))
        return &sh.write;
    if (now.kind == Access::Read) return nullptr;
    if (!ordered(sh.read)) return &sh.read;
    if (!ordered(sh.read2)) return &sh.read2;
    return nullptr;
}

void update(Shadow &sh, const Record &now) {
    if (now.kind == Access::Read) {
        if (!ordered(sh.read)) sh.read2 = sh.read; /* keep an unordered earlier reader */
        sh.read = now;
    } else {
        sh.write = now;
        sh.read = sh.read2 = Record{};
    }
}

} /* namespace */

/* ---------------------------------------------------------------- device-side API */
int lane_id() { return cur->lane; }

void *dynamic_smem() { return cur->block->smem.data(); }

size_t dynamic_smem_bytes() { return L ? L->smem_bytes : 0; }

int resident_thread() { return int(cur->block - slots.data()) * L->threads + cur->tid; }

uint64_t residency() { return cur->block->serial; }

void syncthreads(const char *file, int line) {
    if (mutated(file, line)) return; /* removed by $GPTLAB_EMU_MUTATE */
    wait(State::AtBlockBarrier, file, line);
}

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
    if (mutated(file, line)) return; /* removed by $GPTLAB_EMU_MUTATE */
    full_mask("__syncwarp", file, line, mask);
    cur->fence = true;
    wait(State::AtWarpBarrier, file, line);
}

uint64_t exchange(const char *file, int line, unsigned mask, uint64_t bits, int src_lane) {
    Fiber *f = cur;
    full_mask("warp shuffle", file, line, mask);
    uint64_t gen = f->exchanges++;
    Slot *slots = &f->block->xbuf[(static_cast<size_t>(f->warp) * 2 + (gen & 1)) * WARP];
    slots[f->lane] = {bits, gen};
    f->fence = false; /* a shuffle does not order memory */
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

void gather(const char *file, int line, unsigned mask, const void *mine, size_t n, void *all) {
    Fiber *f = cur;
    full_mask("warp collective", file, line, mask);
    if (n > GATHER_BYTES) fail("warp collective (%s:%d): %zu bytes per lane > %zu", base(file),
                               line, n, GATHER_BYTES);
    uint64_t gen = f->exchanges++; /* one count with the shuffles: parities stay in step */
    GatherSlot *slots = &f->block->gbuf[(static_cast<size_t>(f->warp) * 2 + (gen & 1)) * WARP];
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

/* $GPTLAB_EMU_ASYNC: report faults inside a kernel as a GPU does (sticky, at the next call). */
bool asynchronous_faults() {
    const char *s = getenv("GPTLAB_EMU_ASYNC");
    return s && *s && strcmp(s, "0") != 0;
}

/* $GPTLAB_EMU_FAULT: a launch of a kernel whose name contains it faults. */
bool injected_fault(const char *name) {
    const char *s = getenv("GPTLAB_EMU_FAULT");
    return s && *s && strstr(name, s) != nullptr;
}

void launch(const char *name, dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t,
            void (*body)(void *), void *ctx) {
    std::lock_guard<std::mutex> guard(launch_mutex);
    {
        std::lock_guard<std::mutex> m(machine_mutex);
        fault_seen(); /* the kernels before this one have run */
        if (machine.sticky != cudaSuccess) { /* a faulted context fails every later launch */
            set_error(machine.sticky, machine.sticky_message);
            return;
        }
        if (!valid_device(current_device)) {
            set_error(cudaErrorInvalidDevice, format("kernel %s: current device %d does not "
                                                     "exist", name, current_device));
            return;
        }
        machine.contexts[current_device] = true; /* a launch initialises its device's context */
        machine.last_launch_device = current_device;
    }
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
    launch.smem_bytes = smem_bytes;
    uint64_t seed;
    if (!parse_schedule(launch.order, seed)) {
        set_error(cudaErrorInvalidValue, format("GPTLAB_EMU_SCHEDULE must be inorder, reverse, "
                                                "greedy, random or random:SEED, got '%s'",
                                                getenv("GPTLAB_EMU_SCHEDULE")));
        return;
    }
    if (!parse_mutation()) {
        set_error(cudaErrorInvalidValue, format("GPTLAB_EMU_MUTATE must be FILE:LINE (e.g. "
                                                "flash.cu:149), got '%s'",
                                                getenv("GPTLAB_EMU_MUTATE")));
        return;
    }
    for (const char *c = name; *c; c++) seed = seed * 131 + uint8_t(*c); /* per kernel */
    launch.rng = seed;
    const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
    const int nslots =
        launch.order == Order::InOrder ? 1 : int(std::min<uint64_t>(RESIDENT, blocks));
    while (pool.size() < threads * nslots) pool.push_back(new Fiber());
    for (int s = 0; s < nslots; s++) {
        Block &b = slots[s];
        b.active = false;
        b.fibers.assign(pool.begin() + s * threads, pool.begin() + (s + 1) * threads);
        for (int i = 0; i < launch.threads; i++) {
            Fiber *f = b.fibers[i];
            if (!reset(f)) {
                set_error(cudaErrorMemoryAllocation,
                          format("kernel %s: cannot allocate fiber stacks", name));
                return;
            }
            f->tid = i;
            f->lane = i % WARP;
            f->warp = i / WARP;
            f->idx = {unsigned(i) % block.x, unsigned(i) / block.x % block.y,
                      unsigned(i) / (block.x * block.y)};
            f->block = &b;
        }
    }
    if (RACECHECK) global_shadow.clear();
    L = &launch;
    block_dim = block;
    grid_dim = grid;
    const Block *failed = nullptr;
    cudaError_t fault = cudaSuccess;
    std::string what;
    if (injected_fault(name)) {
        fault = cudaErrorIllegalAddress;
        what = format("kernel %s, block (0, 0, 0): an illegal memory access was encountered "
                      "(injected by GPTLAB_EMU_FAULT)", name);
    } else if (!run_grid(smem_bytes, nslots, &failed)) {
        fault = cudaErrorLaunchFailure;
        what = format("kernel %s, block (%u, %u, %u): %s", name, failed->idx.x, failed->idx.y,
                      failed->idx.z, launch.error.c_str());
    }
    if (fault != cudaSuccess && asynchronous_faults()) { /* seen later, by whoever calls next */
        std::lock_guard<std::mutex> m(machine_mutex);
        machine.pending = fault;
        machine.pending_message = what;
    } else if (fault != cudaSuccess) {
        set_error(fault, what);
    }
    L = nullptr;
    cur = nullptr;
    thread_idx = nullptr;
    block_idx = nullptr;
}

/* Racecheck: record an access by the running thread (called by the watched pointers of
 * cuda_emu_racecheck.h and by atomicAdd); a race with a recorded access fails the launch. */
void race_access(const void *p, size_t bytes, Access kind, const char *file, int line) {
    if (!cur) return; /* host code: no thread to record */
    if (kind == Access::Atomic && mutated(file, line)) { /* removed: a plain read and write */
        race_access(p, bytes, Access::Read, file, line);
        kind = Access::Write;
    }
    Block &b = *cur->block;
    const Record now{b.id, cur->tid, b.bar_epoch, b.warp_epoch[cur->warp], file, line, kind};
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    const uintptr_t s0 = reinterpret_cast<uintptr_t>(b.smem.data()), s1 = s0 + MAX_DYNAMIC_SMEM;
    for (uintptr_t w = a / 4 * 4; w < a + bytes; w += 4) {
        bool shared = w >= s0 && w < s1;
        if (shared && w - s0 >= L->smem_bytes) /* another block's memory, or a fault, on a GPU */
            fail("%s of float %zu of dynamic shared memory (%s:%d), past the %zu bytes the "
                 "launch asked for", kind_name(kind), size_t(w - s0) / 4, base(file), line,
                 L->smem_bytes);
        Shadow &sh = shared ? b.shadow[(w - s0) / 4] : global_shadow[w];
        if (const Record *clash = conflict(sh, now)) {
            char where[64];
            if (shared) snprintf(where, sizeof where, "shared memory, float %zu", (w - s0) / 4);
            else snprintf(where, sizeof where, "global memory at %p", reinterpret_cast<void *>(w));
            race(where, now, *clash);
        }
        update(sh, now);
    }
}

} /* namespace gl_emu */

/* ---------------------------------------------------------------- host-side runtime API */
using gl_emu::machine;
using gl_emu::machine_mutex;

cudaError_t cudaGetLastError(void) {
    if (gl_emu::report_sticky()) return gl_emu::last_error;
    cudaError_t e = gl_emu::last_error;
    gl_emu::last_error = cudaSuccess;
    return e;
}

cudaError_t cudaPeekAtLastError(void) {
    if (gl_emu::report_sticky()) return gl_emu::last_error;
    return gl_emu::last_error;
}

const char *cudaGetErrorString(cudaError_t error) {
    if (error == gl_emu::message_code && !gl_emu::message.empty())
        return gl_emu::message.c_str(); /* the detailed message of the last failure */
    switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInsufficientDriver:
        return "CUDA driver version is insufficient for CUDA runtime version";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorUnsupportedPtxVersion: return "the provided PTX was compiled with an "
                                                "unsupported toolchain.";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorStreamCaptureUnsupported:
        return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureImplicit:
        return "operation would make the legacy stream depend on a capturing blocking stream";
    }
    return "unknown error";
}

static cudaError_t host_error(cudaError_t code, const char *what) {
    gl_emu::set_error(code, what);
    return code;
}

cudaError_t cudaGetDeviceCount(int *count) {
    std::lock_guard<std::mutex> guard(machine_mutex);
    *count = int(machine.devices.size());
    if (machine.driver < machine.runtime / 1000 * 1000) /* an older major version */
        return host_error(cudaErrorInsufficientDriver,
                          "CUDA driver version is insufficient for CUDA runtime version");
    return machine.devices.empty() ? host_error(cudaErrorNoDevice,
                                                "no CUDA-capable device is detected")
                                   : cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int *value, cudaDeviceAttr attr, int device) {
    std::lock_guard<std::mutex> guard(machine_mutex);
    if (!gl_emu::valid_device(device)) return host_error(cudaErrorInvalidDevice,
                                                         "invalid device ordinal");
    const auto &cc = machine.devices[size_t(device)];
    if (attr == cudaDevAttrComputeCapabilityMajor) *value = cc.first;
    else if (attr == cudaDevAttrComputeCapabilityMinor) *value = cc.second;
    else return host_error(cudaErrorInvalidValue, "invalid argument");
    return cudaSuccess;
}

cudaError_t cudaGetDevice(int *device) { /* creates nothing, as the runtime's */
    *device = gl_emu::current_device;
    return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
    std::lock_guard<std::mutex> guard(machine_mutex);
    if (!gl_emu::valid_device(device)) return host_error(cudaErrorInvalidDevice,
                                                         "invalid device ordinal");
    machine.contexts[size_t(device)] = true; /* CUDA 12: cudaSetDevice initialises the context */
    gl_emu::current_device = device;
    return cudaSuccess;
}

cudaError_t cudaPointerGetAttributes(cudaPointerAttributes *attr, const void *ptr) {
    std::lock_guard<std::mutex> guard(machine_mutex);
    const uintptr_t p = reinterpret_cast<uintptr_t>(ptr);
    int device = machine.default_device;
    for (const auto &pl : machine.placements)
        if (p >= pl.begin && p < pl.end) device = pl.device;
    *attr = {cudaMemoryTypeDevice, device, const_cast<void *>(ptr), nullptr};
    return cudaSuccess;
}

cudaError_t cudaDriverGetVersion(int *version) {
    std::lock_guard<std::mutex> guard(machine_mutex);
    *version = machine.driver;
    return cudaSuccess;
}

cudaError_t cudaRuntimeGetVersion(int *version) {
    std::lock_guard<std::mutex> guard(machine_mutex);
    *version = machine.runtime;
    return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
    {
        std::lock_guard<std::mutex> guard(machine_mutex);
        for (auto &c : machine.captures)
            if (c.first == stream && c.second != cudaStreamCaptureStatusNone) {
                c.second = cudaStreamCaptureStatusInvalidated; /* as the runtime does */
                return host_error(cudaErrorStreamCaptureUnsupported,
                                  "operation not permitted when stream is capturing");
            }
    }
    return gl_emu::report_sticky(true) ? gl_emu::last_error : cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void) {
    return gl_emu::report_sticky(true) ? gl_emu::last_error : cudaSuccess;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus *status) {
    std::lock_guard<std::mutex> guard(machine_mutex);
    *status = gl_emu::capture_status(stream);
    return cudaSuccess;
}

int gl_emu::primary_context_active(int device) {
    std::lock_guard<std::mutex> guard(machine_mutex);
    return gl_emu::valid_device(device) && machine.contexts[size_t(device)];
}

/* ---------------------------------------------------------------- the model's controls */
extern "C" int gl_emu_configure(const char *devices, int runtime_version, int driver_version) {
    std::lock_guard<std::mutex> guard(machine_mutex);
    std::vector<std::pair<int, int>> parsed;
    for (const char *s = devices ? devices : ""; *s;) {
        char *end = nullptr;
        long major = strtol(s, &end, 10);
        if (end == s || *end != '.') return -1;
        s = end + 1;
        long minor = strtol(s, &end, 10);
        if (end == s || major < 1 || minor < 0 || minor > 9) return -1;
        parsed.emplace_back(int(major), int(minor));
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') return -1;
    }
    machine = gl_emu::Machine{};
    machine.devices = std::move(parsed);
    machine.contexts.assign(machine.devices.size(), false);
    if (runtime_version > 0) machine.runtime = runtime_version;
    machine.driver = driver_version > 0 ? driver_version : machine.runtime;
    gl_emu::current_device = 0;
    gl_emu::last_error = cudaSuccess;
    return 0;
}

extern "C" int gl_emu_place(const void *ptr, size_t bytes, int device) {
    std::lock_guard<std::mutex> guard(machine_mutex);
    if (!gl_emu::valid_device(device)) return -1;
    if (!ptr) {
        machine.default_device = device;
        return 0;
    }
    const uintptr_t p = reinterpret_cast<uintptr_t>(ptr);
    machine.placements.push_back({p, p + bytes, device});
    return 0;
}

extern "C" int gl_emu_set_device(int device) { return int(cudaSetDevice(device)); }

extern "C" int gl_emu_current_device(void) { return gl_emu::current_device; }

extern "C" int gl_emu_primary_context(int device) { return gl_emu::primary_context_active(device); }

extern "C" int gl_emu_last_launch_device(void) {
    std::lock_guard<std::mutex> guard(machine_mutex);
    return machine.last_launch_device;
}

extern "C" int gl_emu_capture(const void *stream, int on) {
    std::lock_guard<std::mutex> guard(machine_mutex);
    auto &caps = machine.captures;
    caps.erase(std::remove_if(caps.begin(), caps.end(),
                              [&](const auto &c) { return c.first == stream; }),
               caps.end());
    if (on) caps.emplace_back(stream, cudaStreamCaptureStatusActive);
    return 0;
}

extern "C" int gl_emu_synchronize(void) { return int(cudaDeviceSynchronize()); }
