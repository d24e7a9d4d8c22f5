// The harness scheduler (see harness.h): fibers for the threads of a block, the block barrier, warp collectives,
// error reporting, and the C entry points that Python uses to configure it.
//
// Fibers: each thread of a block is a fiber with its own mmap'd stack, started once with makecontext and then
// switched with _setjmp/_longjmp (no signal-mask system call, so a switch costs a few nanoseconds). A fiber runs
// until it blocks in __syncthreads or a warp collective; the last arrival releases the others. Blocks run in
// order; the order in which threads are (re)started is the schedule: forward, reverse or seeded-random, so that a
// kernel whose result depends on an order that CUDA does not promise gives different answers under different
// schedules. A launch that cannot finish (a barrier some threads never reach, a lane that waits for an exited
// one, lanes that disagree on a mask) fails with a message instead of hanging; its fibers are abandoned and
// restarted fresh for the next launch.
//
// Under ASan (LESS_CUDA_SANITIZE=address) every switch between stacks is announced to it before the jump and
// confirmed after it (__sanitizer_{start,finish}_switch_fiber); otherwise it takes a fiber's stack for a corrupted
// one of the OS thread.
#undef _FORTIFY_SOURCE  // its longjmp check refuses jumps between stacks, which is what a fiber switch is

#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <random>
#include <string>
#include <vector>

#include "harness.h"

#if defined(LESS_HARNESS_FAST_MATH) && defined(__x86_64__)
#include <xmmintrin.h>
#endif

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

namespace less_harness {
namespace {

constexpr size_t kStackBytes = 256 * 1024;        // mapped lazily: only touched pages cost memory
constexpr size_t kMaxDynamicSmem = 48 * 1024;     // the default limit without cudaFuncSetAttribute
constexpr unsigned kMaxThreadsPerBlock = 1024;

enum class State { kRunnable, kAtBarrier, kInCollective, kFinished };

struct Fiber {
  jmp_buf context;
  ucontext_t start;
  char* stack = nullptr;
  void* asan_fake_stack = nullptr;  // ASan's stack-use-after-return frames of this fiber while it is parked
  unsigned linear = 0;  // x-fastest thread index in the block
  uint3 index{};
  State state = State::kFinished;
  uint64_t result = 0;  // a collective's result for this lane
};

// One collective in progress in a warp: the lanes of `mask` that have arrived and what they brought.
struct Collective {
  WarpOp op;
  unsigned mask;
  unsigned arrived = 0;
  uint64_t value[32];
  int arg[32];
  int width[32];
  Fiber* fiber[32];
};

// The collectives in progress in a warp: at most one per lane. Not value-initialised: a new one sets its fields.
struct Warp {
  Collective open[32];
  unsigned count = 0;
};

enum class Schedule { kForward = 0, kReverse = 1, kRandom = 2 };

struct Runtime {
  std::vector<Fiber*> fibers;  // persistent across launches; the first blockDim of them run a block
  jmp_buf scheduler;
  const void* scheduler_stack = nullptr;  // the OS thread's stack the scheduler runs on (learnt by ASan's hooks)
  size_t scheduler_stack_bytes = 0;
  void* scheduler_fake_stack = nullptr;
  Fiber* starting = nullptr;
  Fiber* current = nullptr;
  unsigned threads = 0;        // threads in the current block
  std::deque<Fiber*> runnable;
  unsigned at_barrier = 0;
  int barrier_count = 0;       // __syncthreads_count accumulator of the open barrier
  int barrier_result = 0;
  std::vector<Warp> warps = std::vector<Warp>(kMaxThreadsPerBlock / 32);
  std::vector<unsigned char> dynamic_smem;
  void (*body)(void*) = nullptr;
  void* body_ctx = nullptr;
  bool failed = false;
  cudaError_t last_error = cudaSuccess;
  std::string message;
  Schedule schedule = Schedule::kForward;
  std::mt19937 rng{0};
};

Runtime runtime;
inline Runtime& rt() { return runtime; }

void fail(const char* format, ...) {
  Runtime& r = rt();
  if (r.failed) return;  // keep the first cause
  char text[512];
  va_list args;
  va_start(args, format);
  vsnprintf(text, sizeof(text), format, args);
  va_end(args);
  r.failed = true;
  r.message = text;
}

#if defined(__SANITIZE_ADDRESS__)
void leaving_stack(void** fake_stack, const void* to, size_t bytes) {
  __sanitizer_start_switch_fiber(fake_stack, to, bytes);
}
void entered_stack(void* fake_stack, const void** from, size_t* from_bytes) {
  __sanitizer_finish_switch_fiber(fake_stack, from, from_bytes);
}
#else
void leaving_stack(void**, const void*, size_t) {}
void entered_stack(void*, const void**, size_t*) {}
#endif

// A fiber runs again: the stack it came from is the scheduler's.
void fiber_entered(void* fake_stack) {
  Runtime& r = rt();
  entered_stack(fake_stack, &r.scheduler_stack, &r.scheduler_stack_bytes);
}

// Runs `f` until it parks. `first` starts it at fiber_main instead of resuming it.
void switch_to_fiber(Fiber* f, bool first) {
  Runtime& r = rt();
  if (_setjmp(r.scheduler) == 0) {
    leaving_stack(&r.scheduler_fake_stack, f->stack, kStackBytes);
    if (first) setcontext(&f->start);
    _longjmp(f->context, 1);
  }
  entered_stack(r.scheduler_fake_stack, nullptr, nullptr);
}

// Gives control back to the scheduler; returns when the scheduler resumes this fiber.
void park(Fiber* self) {
  Runtime& r = rt();
  if (_setjmp(self->context) == 0) {
    leaving_stack(&self->asan_fake_stack, r.scheduler_stack, r.scheduler_stack_bytes);
    _longjmp(r.scheduler, 1);
  }
  fiber_entered(self->asan_fake_stack);
}

// After a failure: parks the calling fiber for good. The launch is abandoned and its fibers restarted.
void abandon(Fiber* self) {
  self->state = State::kInCollective;
  park(self);
}

[[noreturn]] void fiber_main() {
  fiber_entered(nullptr);
  Fiber* self = rt().starting;
  park(self);  // created: wait for the first block
  for (;;) {
    rt().body(rt().body_ctx);
    self->state = State::kFinished;
    park(self);
  }
}

// (Re)starts a fiber at fiber_main on its stack; used on creation and after a failed launch abandoned it.
void start_fiber(Fiber* f) {
  Runtime& r = rt();
  getcontext(&f->start);
  f->start.uc_stack.ss_sp = f->stack;
  f->start.uc_stack.ss_size = kStackBytes;
  f->start.uc_link = nullptr;
  makecontext(&f->start, fiber_main, 0);
  r.starting = f;
  f->asan_fake_stack = nullptr;
  switch_to_fiber(f, true);
}

void ensure_fibers(unsigned count) {
  Runtime& r = rt();
  while (r.fibers.size() < count) {
    auto* f = new Fiber;
    // A PROT_NONE page below the stack turns an overflow into a crash instead of silent corruption.
    void* region = mmap(nullptr, kStackBytes + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED) {
      std::fprintf(stderr, "less_harness: cannot map a fiber stack\n");
      std::abort();
    }
    mprotect(region, 4096, PROT_NONE);
    f->stack = static_cast<char*>(region) + 4096;
    r.fibers.push_back(f);
    start_fiber(f);
  }
}

// Queues fibers to run, in the schedule's order.
void make_runnable(Fiber** released, size_t count) {
  Runtime& r = rt();
  if (r.schedule == Schedule::kReverse) std::reverse(released, released + count);
  if (r.schedule == Schedule::kRandom) std::shuffle(released, released + count, r.rng);
  for (size_t i = 0; i < count; ++i) {
    released[i]->state = State::kRunnable;
    r.runnable.push_back(released[i]);
  }
}

void run_block() {
  Runtime& r = rt();
  Fiber* all[kMaxThreadsPerBlock];
  for (unsigned i = 0; i < r.threads; ++i) {
    Fiber* f = r.fibers[i];
    f->linear = i;
    f->index = {i % blockDim.x, (i / blockDim.x) % blockDim.y, i / (blockDim.x * blockDim.y)};
    all[i] = f;
  }
  r.runnable.clear();
  r.at_barrier = 0;
  r.barrier_count = 0;
  for (Warp& w : r.warps) w.count = 0;
  // NaN bytes: a kernel that reads dynamic shared memory it never wrote gets NaNs in its results.
  std::fill(r.dynamic_smem.begin(), r.dynamic_smem.end(), 0xff);
  make_runnable(all, r.threads);
  while (!r.runnable.empty() && !r.failed) {
    Fiber* f = r.runnable.front();
    r.runnable.pop_front();
    r.current = f;
    threadIdx = f->index;
    switch_to_fiber(f, false);
  }
  if (r.failed) return;
  unsigned waiting_barrier = 0, waiting_warp = 0;
  for (unsigned i = 0; i < r.threads; ++i) {
    waiting_barrier += r.fibers[i]->state == State::kAtBarrier;
    waiting_warp += r.fibers[i]->state == State::kInCollective;
  }
  if (waiting_barrier || waiting_warp)
    fail("deadlock in block (%u,%u,%u): %u threads wait at __syncthreads, %u in warp collectives, the others "
         "have exited", blockIdx.x, blockIdx.y, blockIdx.z, waiting_barrier, waiting_warp);
}

uint64_t collective_result(const Collective& c, unsigned lane) {
  const uint64_t poison = ~uint64_t{0};  // what a lane reads from a lane that did not take part
  switch (c.op) {
    case WarpOp::kSync:
      return 0;
    case WarpOp::kShflIdx:
    case WarpOp::kShflUp:
    case WarpOp::kShflDown:
    case WarpOp::kShflXor: {
      // PTX shfl: c = ((32 - width) << 8) | clamp, clamp = 0 for up and 31 otherwise.
      const int segmask = (32 - c.width[lane]) & 31;
      const int clamp = c.op == WarpOp::kShflUp ? 0 : 31;
      const int max_lane = (static_cast<int>(lane) & segmask) | (clamp & ~segmask);
      const int min_lane = static_cast<int>(lane) & segmask;
      const int b = c.arg[lane] & 31;
      int j = static_cast<int>(lane);
      bool in_range = false;
      switch (c.op) {
        case WarpOp::kShflUp: j = lane - b; in_range = j >= max_lane; break;
        case WarpOp::kShflDown: j = lane + b; in_range = j <= max_lane; break;
        case WarpOp::kShflXor: j = lane ^ b; in_range = j <= max_lane; break;
        default: j = min_lane | (b & ~segmask); in_range = j <= max_lane; break;
      }
      if (!in_range) j = static_cast<int>(lane);
      return (c.mask >> j) & 1u ? c.value[j] : poison;
    }
    default:
      break;
  }
  uint64_t ballot = 0, sum = 0;
  uint64_t low = c.value[__builtin_ctz(c.mask)], high = low;
  const bool is_signed = c.arg[lane] != 0;
  for (unsigned l = 0; l < 32; ++l) {
    if (!((c.mask >> l) & 1u)) continue;
    const uint64_t v = c.value[l];
    ballot |= uint64_t{v != 0} << l;
    sum += v;
    const bool less = is_signed ? static_cast<int32_t>(v) < static_cast<int32_t>(low) : v < low;
    const bool more = is_signed ? static_cast<int32_t>(v) > static_cast<int32_t>(high) : v > high;
    if (less) low = v;
    if (more) high = v;
  }
  switch (c.op) {
    case WarpOp::kBallot: return ballot;
    case WarpOp::kAny: return ballot != 0;
    case WarpOp::kAll: return ballot == c.mask;
    case WarpOp::kReduceAdd: return sum & 0xffffffffu;
    case WarpOp::kReduceMin: return low;
    default: return high;
  }
}

}  // namespace

void block_barrier() { block_barrier_count(0); }

[[noreturn]] void trap() {
  Runtime& r = rt();
  fail("__trap() in block (%u,%u,%u), thread (%u,%u,%u)", blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x,
       threadIdx.y, threadIdx.z);
  abandon(r.current);
  __builtin_unreachable();  // an abandoned fiber is restarted from the top, never resumed here
}

int block_barrier_count(int predicate) {
  Runtime& r = rt();
  Fiber* self = r.current;
  r.barrier_count += predicate;
  if (++r.at_barrier < r.threads) {
    self->state = State::kAtBarrier;
    park(self);
    return r.barrier_result;
  }
  // Last arrival: release everyone (the result stays valid until the next barrier completes, which needs all of
  // the released threads to arrive again).
  r.barrier_result = r.barrier_count;
  r.barrier_count = 0;
  r.at_barrier = 0;
  Fiber* released[kMaxThreadsPerBlock];
  size_t count = 0;
  for (unsigned i = 0; i < r.threads; ++i)
    if (r.fibers[i]->state == State::kAtBarrier) released[count++] = r.fibers[i];
  make_runnable(released, count);
  return r.barrier_result;
}

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width) {
  Runtime& r = rt();
  Fiber* self = r.current;
  const unsigned warp = self->linear / 32, lane = self->linear % 32;
  const unsigned lanes_in_warp = std::min(32u, r.threads - warp * 32);
  const unsigned existing = lanes_in_warp == 32 ? 0xffffffffu : (1u << lanes_in_warp) - 1u;
  const bool is_shuffle = op == WarpOp::kShflIdx || op == WarpOp::kShflUp || op == WarpOp::kShflDown ||
                          op == WarpOp::kShflXor;
  if (!((mask >> lane) & 1u))
    fail("lane %u calls a warp collective with a mask (0x%08x) that leaves it out", lane, mask);
  if (mask & ~existing) fail("warp collective mask 0x%08x names lanes that do not exist in warp %u", mask, warp);
  if (is_shuffle && (width < 1 || width > 32 || (width & (width - 1))))
    fail("shuffle width %d is not a power of two in [1, 32]", width);
  if (r.failed) abandon(self);
  Warp& w = r.warps[warp];
  Collective* c = nullptr;
  for (unsigned i = 0; i < w.count; ++i) {
    Collective& candidate = w.open[i];
    if (candidate.mask == mask && !((candidate.arrived >> lane) & 1u)) {
      c = &candidate;
      break;
    }
    if (candidate.mask & (1u << lane)) {
      fail("warp %u: lane %u calls a collective with mask 0x%08x while lanes of mask 0x%08x wait for it", warp, lane,
           mask, candidate.mask);
      abandon(self);
    }
  }
  if (c == nullptr) {
    c = &w.open[w.count++];
    c->op = op;
    c->mask = mask;
    c->arrived = 0;
  }
  if (c->op != op) {
    fail("warp %u: lanes of mask 0x%08x meet in different collectives", warp, mask);
    abandon(self);
  }
  c->arrived |= 1u << lane;
  c->value[lane] = value;
  c->arg[lane] = arg;
  c->width[lane] = width;
  c->fiber[lane] = self;
  if (c->arrived != mask) {
    self->state = State::kInCollective;
    park(self);
    return self->result;
  }
  Fiber* released[32];
  size_t count = 0;
  for (unsigned l = 0; l < 32; ++l) {
    if (!((mask >> l) & 1u)) continue;
    c->fiber[l]->result = collective_result(*c, l);
    if (l != lane) released[count++] = c->fiber[l];
  }
  const uint64_t mine = self->result;
  *c = w.open[--w.count];  // close it: the last open collective takes its place
  make_runnable(released, count);
  return mine;
}

void* dynamic_shared_memory() { return rt().dynamic_smem.data(); }

void run_kernel(const LaunchConfig& config, void (*body)(void*), void* ctx) {
  Runtime& r = rt();
  r.failed = false;
  const dim3 g = config.grid, b = config.block;
  const unsigned threads = b.x * b.y * b.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock || b.z > 64 || g.x == 0 || g.y == 0 || g.z == 0 ||
      g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535)
    fail("invalid launch configuration: grid (%u,%u,%u), block (%u,%u,%u)", g.x, g.y, g.z, b.x, b.y, b.z);
  if (config.dynamic_smem > kMaxDynamicSmem)
    fail("%zu bytes of dynamic shared memory exceed the %zu a launch gets without cudaFuncSetAttribute",
         config.dynamic_smem, kMaxDynamicSmem);
  if (r.failed) {
    r.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  ensure_fibers(threads);
  r.threads = threads;
  // Rounded up to whole 16-byte vectors; the allocation is at least 16-byte aligned.
  r.dynamic_smem.assign((config.dynamic_smem + 15) / 16 * 16, 0);
  r.body = body;
  r.body_ctx = ctx;
  gridDim = g;
  blockDim = b;
  std::vector<uint3> blocks;
  for (unsigned z = 0; z < g.z; ++z)
    for (unsigned y = 0; y < g.y; ++y)
      for (unsigned x = 0; x < g.x; ++x) blocks.push_back({x, y, z});
  if (r.schedule == Schedule::kReverse) std::reverse(blocks.begin(), blocks.end());
  if (r.schedule == Schedule::kRandom) std::shuffle(blocks.begin(), blocks.end(), r.rng);
#if defined(LESS_HARNESS_FAST_MATH) && defined(__x86_64__)
  // -ftz=true: flush subnormal results (FTZ) and treat subnormal inputs as zero (DAZ), for this launch only.
  const unsigned float_mode = _mm_getcsr();
  _mm_setcsr(float_mode | 0x8040);
#endif
  for (const uint3& block : blocks) {
    blockIdx = block;
    run_block();
    if (r.failed) break;
  }
#if defined(LESS_HARNESS_FAST_MATH) && defined(__x86_64__)
  _mm_setcsr(float_mode);
#endif
  if (r.failed) {
    // The block's fibers are stuck mid-kernel: restart them all from the top of fiber_main.
    for (unsigned i = 0; i < threads; ++i) start_fiber(r.fibers[i]);
    r.last_error = cudaErrorLaunchFailure;
  }
}

}  // namespace less_harness

cudaError_t cudaGetLastError() {
  const cudaError_t error = less_harness::rt().last_error;
  less_harness::rt().last_error = cudaSuccess;
  return error;
}

cudaError_t cudaPeekAtLastError() { return less_harness::rt().last_error; }

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unspecified launch failure";
  }
}

// For Python (ctypes): the reason of the last failed launch, and the thread/block schedule.
extern "C" __attribute__((visibility("default"))) const char* less_harness_last_error() {
  return less_harness::rt().message.c_str();
}

namespace {
int occupancy = 2;
}  // namespace

int less_harness_occupancy() { return occupancy; }

// What cudaOccupancyMaxActiveBlocksPerMultiprocessor answers from now on.
extern "C" __attribute__((visibility("default"))) void less_harness_set_occupancy(int blocks) { occupancy = blocks; }

extern "C" __attribute__((visibility("default"))) void less_harness_set_schedule(int schedule, unsigned seed) {
  less_harness::rt().schedule = static_cast<less_harness::Schedule>(schedule);
  less_harness::rt().rng.seed(seed);
}
