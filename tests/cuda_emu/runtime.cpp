// The scheduler of the CUDA emulator: one block at a time, each CUDA thread a fiber with a
// 64 KiB stack. A fiber runs until it parks (barrier, warp collective) or returns; the scheduler
// resumes runnable fibers in the chosen order, then resolves what every live thread has reached.
// After each run of a fiber it checks the red zones around every buffer, so an out-of-bounds
// write is pinned on the block and thread that made it.
#include "emu.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#error "the emulator's context switch is written for x86-64"
#endif

// The context switch: save the callee-saved registers on the current stack, swap stack pointers,
// restore. ucontext's swapcontext does the same plus a signal-mask system call on every switch,
// which made it the emulator's main cost.
extern "C" void emu_switch(void** save_sp, void* load_sp);
asm(R"(
.text
.globl emu_switch
.type emu_switch,@function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size emu_switch, .-emu_switch
)");

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

namespace emu {
enum State { RUN, BARRIER, WARP, DONE };
static const size_t kStack = 64 * 1024;
static const unsigned char kRed = 0xA5;

struct Thread {
    void* sp = nullptr;  // saved stack pointer while parked
    char* stack = nullptr;
    dim3 idx;
    State st = RUN;
    int op = 0, arg = 0, width = 32;
    unsigned mask = 0;
    uint64_t val = 0, res = 0;
    void* fake = nullptr;
};

struct RedZone { unsigned char* p; size_t n; const char* label; };

struct Launch {
    const char* kernel;
    void (*thunk)(void**);
    void** args;
    std::vector<Thread> threads;
    std::vector<char*> stacks;
    std::vector<unsigned char> smem;  // dynamic shared memory with a red zone each side
    size_t smem_bytes = 0;
    const RedZone* rz;
    int nrz;
    std::string error;
};

thread_local dim3 t_blockIdx, t_blockDim, t_gridDim;
static thread_local Launch* L;
static thread_local Thread* cur;
static thread_local void* sched_sp;
static thread_local const void* main_bottom;
static thread_local size_t main_size;
static const size_t kSmemRed = 64;

const dim3& thread_idx() { return cur->idx; }
void* dyn_smem() { return L->smem.data() + kSmemRed; }

static void to_scheduler(bool exiting) {
#if EMU_ASAN
    __sanitizer_start_switch_fiber(exiting ? nullptr : &cur->fake, main_bottom, main_size);
#endif
    emu_switch(&cur->sp, sched_sp);
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(cur->fake, nullptr, nullptr);
#endif
}

static void fiber_main() {
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &main_bottom, &main_size);
#endif
    L->thunk(L->args);
    cur->st = DONE;
    to_scheduler(true);
}

void syncthreads() { cur->st = BARRIER; to_scheduler(false); }

uint64_t warp_op(int op, unsigned mask, uint64_t value, int arg, int width) {
    cur->op = op; cur->mask = mask; cur->val = value; cur->arg = arg; cur->width = width;
    cur->st = WARP;
    to_scheduler(false);
    return cur->res;
}

static std::string where(const Thread& t) {
    char b[160];
    snprintf(b, sizeof b, "kernel %s, block (%u,%u,%u), thread (%u,%u,%u)", L->kernel, t_blockIdx.x,
             t_blockIdx.y, t_blockIdx.z, t.idx.x, t.idx.y, t.idx.z);
    return b;
}

static void resume(Thread& t) {
    cur = &t;
#if EMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, t.stack, kStack);
#endif
    emu_switch(&sched_sp, t.sp);
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

static bool check_red(const unsigned char* p, size_t n, long* at) {
    static const std::vector<unsigned char> red(4096, kRed);
    // memcmp in chunks is the fast path (this runs after every fiber segment); bytes only on a hit
    for (size_t i = 0; i < n; i += red.size()) {
        size_t len = std::min(red.size(), n - i);
        if (std::memcmp(p + i, red.data(), len) == 0) continue;
        for (size_t j = i; j < i + len; ++j)
            if (p[j] != kRed) { *at = (long)j; return false; }
    }
    return true;
}

// Red zones after a fiber ran: the offset names how far outside the buffer the write landed.
static bool red_zones_ok(const Thread& t) {
    long at;
    for (int i = 0; i < L->nrz; ++i) {
        if (!check_red(L->rz[i].p, L->rz[i].n, &at)) {
            L->error = where(t) + ": out-of-bounds write in the red zone of " + L->rz[i].label +
                       " (byte " + std::to_string(at) + " of the zone)";
            return false;
        }
    }
    unsigned char* s = L->smem.data();
    if (!check_red(s, kSmemRed, &at) || !check_red(s + kSmemRed + L->smem_bytes, kSmemRed, &at)) {
        L->error = where(t) + ": out-of-bounds write outside the dynamic shared memory (" +
                   std::to_string(L->smem_bytes) + " bytes)";
        return false;
    }
    return true;
}

static int source_lane(const Thread& t, int lane) {
    int w = t.width, base = lane & ~(w - 1), src;
    switch (t.op) {
        case OP_IDX: src = base + (t.arg % w); break;
        case OP_DOWN: src = (lane - base) + t.arg >= w ? lane : lane + t.arg; break;
        case OP_UP: src = (lane - base) < t.arg ? lane : lane - t.arg; break;
        case OP_XOR: src = lane ^ t.arg; if (src < base || src >= base + w) src = lane; break;
        default: src = lane;
    }
    return src;
}

// Every live lane of a warp has parked at a collective: check they agree, then compute results.
static bool resolve_warp(size_t first, size_t count) {
    Thread* w = &L->threads[first];
    int lead = -1;
    unsigned ballot = 0;
    bool any = false, all = true;
    for (size_t l = 0; l < count; ++l) {
        if (w[l].st == DONE) continue;
        if (lead < 0) lead = (int)l;
        if (w[l].op != w[lead].op) {
            L->error = where(w[l]) + ": lanes of one warp reached different warp collectives";
            return false;
        }
        for (size_t m = 0; m < count; ++m)
            if ((w[l].mask >> m & 1u) && w[m].st == DONE) {
                L->error = where(w[l]) + ": warp collective's mask names lane " + std::to_string(m) +
                           ", which has already exited";
                return false;
            }
        if (w[l].val) ballot |= 1u << l, any = true; else all = false;
    }
    for (size_t l = 0; l < count; ++l) {
        Thread& t = w[l];
        if (t.st == DONE) continue;
        if (t.op == OP_BALLOT) t.res = ballot & t.mask;
        else if (t.op == OP_ANY) t.res = any;
        else if (t.op == OP_ALL) t.res = all;
        else {
            int src = source_lane(t, (int)l);
            if (src >= (int)count || w[src].st == DONE) {
                L->error = where(t) + ": shuffle reads lane " + std::to_string(src) + ", which is not active";
                return false;
            }
            t.res = w[src].val;
        }
        t.st = RUN;
    }
    return true;
}

static std::string describe_deadlock() {
    const Thread *waiting = nullptr, *exited = nullptr;
    for (auto& t : L->threads) {
        if (t.st == DONE) exited = exited ? exited : &t;
        else waiting = waiting ? waiting : &t;
    }
    std::string what = waiting->st == BARRIER ? "__syncthreads" : "a warp collective";
    std::string msg = where(*waiting) + ": deadlock, waiting at " + what;
    if (exited) {
        char b[96];
        snprintf(b, sizeof b, " while thread (%u,%u,%u) has exited (barrier after an early return)",
                 exited->idx.x, exited->idx.y, exited->idx.z);
        msg += b;
    } else {
        msg += " while other threads wait elsewhere (divergent barriers)";
    }
    return msg;
}

// Park states are resolved in rounds: warps first, then the block barrier.
static bool resolve(bool* progressed) {
    size_t n = L->threads.size();
    for (size_t w = 0; w < n; w += 32) {
        size_t cnt = std::min<size_t>(32, n - w);
        bool ready = true, live = false;
        for (size_t l = w; l < w + cnt; ++l) {
            if (L->threads[l].st == DONE) continue;
            live = true;
            if (L->threads[l].st != WARP) ready = false;
        }
        if (live && ready) {
            if (!resolve_warp(w, cnt)) return false;
            *progressed = true;
        }
    }
    size_t at_bar = 0, done = 0;
    for (auto& t : L->threads) at_bar += t.st == BARRIER, done += t.st == DONE;
    if (at_bar && at_bar + done == n) {
        if (done) { L->error = describe_deadlock(); return false; }
        for (auto& t : L->threads) t.st = RUN;
        *progressed = true;
    }
    return true;
}

struct Watch { const unsigned char* p; size_t n; std::vector<unsigned char> last; int* writer; };

static void watch_check(Watch& w, const Thread& t) {
    if (!w.p || std::memcmp(w.p, w.last.data(), w.n) == 0) return;
    std::memcpy(w.last.data(), w.p, w.n);
    int v[6] = {(int)t_blockIdx.x, (int)t_blockIdx.y, (int)t_blockIdx.z, (int)t.idx.x, (int)t.idx.y, (int)t.idx.z};
    std::memcpy(w.writer, v, sizeof v);
}

static bool run_block(std::vector<size_t>& order, int schedule, std::mt19937& rng, Watch& watch) {
    auto& th = L->threads;
    for (size_t i = 0; i < th.size(); ++i) {
        Thread& t = th[i];
        t.st = RUN;
        t.stack = L->stacks[i];
        // A frame emu_switch can "return" into fiber_main from: six zeroed registers, the return
        // address, and a dummy slot that leaves rsp 16-byte aligned as after a call.
        void** top = (void**)(t.stack + kStack);
        top[-1] = nullptr;
        top[-2] = (void*)fiber_main;
        for (int r = 3; r <= 8; ++r) top[-r] = nullptr;
        t.sp = top - 8;
    }
    // Uninitialised dynamic shared memory differs per schedule, so reading it before writing shows.
    for (size_t i = 0; i < L->smem_bytes; ++i) L->smem[kSmemRed + i] = (unsigned char)rng();
    for (;;) {
        if (schedule == 2) std::shuffle(order.begin(), order.end(), rng);
        bool progressed = false, all_done = true;
        for (size_t i : order) {
            if (th[i].st != RUN) continue;
            resume(th[i]);
            progressed = true;
            if (!red_zones_ok(th[i])) return false;
            watch_check(watch, th[i]);
        }
        for (auto& t : th) all_done &= t.st == DONE;
        if (all_done) return true;
        if (!resolve(&progressed)) return false;
        if (!progressed) { L->error = describe_deadlock(); return false; }
    }
}

static std::vector<dim3> block_order(dim3 g, int schedule, std::mt19937& rng) {
    std::vector<dim3> v;
    for (unsigned z = 0; z < g.z; ++z)
        for (unsigned y = 0; y < g.y; ++y)
            for (unsigned x = 0; x < g.x; ++x) v.push_back(dim3{x, y, z});
    if (schedule == 1) std::reverse(v.begin(), v.end());
    if (schedule == 2) std::shuffle(v.begin(), v.end(), rng);
    return v;
}
}  // namespace emu

using namespace emu;

// schedule: 0 forward, 1 reverse, 2 shuffled (seeded). Returns 0, or 1 with `err` filled in.
extern "C" __attribute__((visibility("default"))) int emu_launch(
        const char* kernel, void (*thunk)(void**), void** args, const unsigned* grid, const unsigned* block,
        size_t smem_bytes, int schedule, unsigned seed, const RedZone* rz, int nrz,
        const unsigned char* watch_p, size_t watch_n, int* writer, char* err, size_t errlen) {
    Launch launch{kernel, thunk, args, {}, {}, {}, smem_bytes, rz, nrz, {}};
    L = &launch;
    size_t nthreads = (size_t)block[0] * block[1] * block[2];
    launch.threads.resize(nthreads);
    for (size_t i = 0; i < nthreads; ++i) {
        launch.stacks.push_back((char*)std::malloc(kStack));
        launch.threads[i].idx = dim3{(unsigned)(i % block[0]), (unsigned)(i / block[0] % block[1]),
                                     (unsigned)(i / block[0] / block[1])};
    }
    launch.smem.assign(smem_bytes + 2 * kSmemRed, kRed);
    Watch watch{watch_p, watch_n, std::vector<unsigned char>(watch_n), writer};
    if (watch_p) std::memcpy(watch.last.data(), watch_p, watch_n);
    t_gridDim = dim3{grid[0], grid[1], grid[2]};
    t_blockDim = dim3{block[0], block[1], block[2]};
    std::mt19937 rng(seed);
    std::vector<size_t> order(nthreads);
    for (size_t i = 0; i < nthreads; ++i) order[i] = schedule == 1 ? nthreads - 1 - i : i;
    bool ok = true;
    for (const dim3& b : block_order(t_gridDim, schedule, rng)) {
        t_blockIdx = b;
        if (!(ok = run_block(order, schedule, rng, watch))) break;
    }
    for (char* s : launch.stacks) std::free(s);
    if (!ok) snprintf(err, errlen, "%s", launch.error.c_str());
    L = nullptr;
    return ok ? 0 : 1;
}
