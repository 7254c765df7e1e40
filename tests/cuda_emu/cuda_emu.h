// A small CUDA execution emulator for the CPU, so that the kernels of csrc/ run in the tests of a machine
// without a GPU (as TRITON_INTERPRET=1 runs kernels/). tests/cuda_emu/build.py force-includes this header
// into a copy of every csrc/*.cu rewritten for it (launches, __shared__ declarations, the CUDA dispatch key)
// and compiles them with the host compiler into a library that registers the same kernels for CPU tensors.
//
// Model: every block runs on its own, one after the other; its threads are fibers (ucontext) scheduled
// round-robin on the calling thread, each running until it reaches a barrier (__syncthreads, a warp
// shuffle) or returns. A barrier opens when every thread that has not returned has reached it: all of the
// block's for __syncthreads, all of the warp's for a shuffle. So the emulation is deterministic, and what
// would hang or read garbage on a GPU is reported as an error naming the kernel's state:
//   - a barrier that can never open (some threads at __syncthreads, others at a shuffle or finished while
//     the rest wait elsewhere): "deadlock";
//   - a shuffle whose mask leaves out the calling lane, or that reads a lane outside the mask or one that
//     has returned;
//   - a launch with more than 1024 threads per block, a grid dimension past CUDA's limits, or more dynamic
//     shared memory than 48 KB without cudaFuncSetAttribute raising the kernel's limit (and never more
//     than the device's opt-in maximum).
// Shared memory (static and dynamic) starts every block filled with 0xFF bytes (NaN floats, -1 integers), so
// a read of an element no thread wrote shows in the results. Races (a read and another thread's write with
// no barrier between them) show as results that change with MASKEDSSL_EMU_SCHEDULE, the order in which
// threads run between barriers. Global memory is bounds- and alignment-checked only in the sanitizer
// build (build.py's sanitize, `make test-asan`).
//
// The emulated device: 227 KB opt-in shared memory per block and 2048 threads per SM as an H100/H200, but
// MASKEDSSL_EMU_SMS streaming multiprocessors (default 2), so that grid-stride loops sized to "every block
// resident at once" take several trips on test-sized inputs. Static shared memory is reported as 0 bytes.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---------------------------------------------------------------------------------------------- keywords
// gridDim.y's limit. build.py sets it to 3, and csrc/token_gather.cu chunks the batch over grid y by the same
// macro, so the emulated backward of any batch over 3 rows runs the chunking a GPU needs only past 65535.
#ifndef MASKEDSSL_MAX_GRID_Y
#define MASKEDSSL_MAX_GRID_Y 65535
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned int x, y, z;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct cudaFuncAttributes {
  size_t sharedSizeBytes;
  int maxThreadsPerBlock;
};

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }

namespace cpu_emu {

constexpr int kWarpSize = 32;
constexpr int kDefaultSharedLimit = 48 * 1024;
constexpr int kSharedOptin = 227 * 1024;
constexpr int kThreadsPerSm = 2048;
constexpr size_t kStackBytes = 256 * 1024;

// The order in which a block's runnable threads run between barriers: "forward" (thread 0 first, the default),
// "reverse", or "shuffle" (a fresh random order every time, from MASKEDSSL_EMU_SEED). On a GPU any order is
// possible, so a kernel whose results change with it has a race: a read not separated from another
// thread's write by a barrier. The tests run every kernel under several orders and compare.
// In those three orders every thread reaches its next barrier before any barrier opens, so a warp shuffle
// holds the whole block back as if it were __syncthreads. "warps" and "warps-reverse" run one warp at a
// time instead (warp 0 first, or the last warp first), opening its shuffles at once, so each warp runs
// ahead to its next __syncthreads before the next warp starts: what a GPU does when one warp is scheduled
// early. A read that only a shuffle, not a block barrier, separates from another warp's write shows there.
enum class Schedule { kForward, kReverse, kShuffle, kWarps, kWarpsReverse };

inline Schedule schedule() {
  const char* v = std::getenv("MASKEDSSL_EMU_SCHEDULE");
  const std::string name = v != nullptr ? v : "forward";
  if (name == "forward" || name.empty()) return Schedule::kForward;
  if (name == "reverse") return Schedule::kReverse;
  if (name == "shuffle") return Schedule::kShuffle;
  if (name == "warps") return Schedule::kWarps;
  if (name == "warps-reverse") return Schedule::kWarpsReverse;
  throw std::runtime_error(
      "cuda emulator: MASKEDSSL_EMU_SCHEDULE must be forward, reverse, shuffle, warps or warps-reverse, got " + name);
}

inline uint64_t schedule_seed() {
  const char* v = std::getenv("MASKEDSSL_EMU_SEED");
  return v != nullptr ? std::strtoull(v, nullptr, 10) : 0;
}

inline int sm_count() {
  const char* v = std::getenv("MASKEDSSL_EMU_SMS");
  const int n = v != nullptr ? std::atoi(v) : 2;
  return n > 0 ? n : 2;
}

enum class State { kReady, kAtBlockBarrier, kAtWarpBarrier, kDone };

struct Fiber {
  ucontext_t context;
  State state = State::kReady;
};

// One block being run: its fibers, the scheduler's context, shared memory and the shuffle exchange slots.
struct Block {
  const std::function<void()>* body = nullptr;
  const char* kernel = "";
  dim3 block_dim, grid_dim;
  uint3 block_idx{};
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = 0;
  std::string error;
  std::vector<unsigned char> dynamic_shared;
  std::set<const void*> static_shared_seen;
  std::vector<uint64_t> slots;  // one per thread: shuffles exchange values here
  Schedule schedule = Schedule::kForward;
  uint64_t random_state = 0;
  std::vector<int> order;  // the threads in the order of the next pass
};

inline thread_local Block* active = nullptr;
inline thread_local uint3 thread_idx{};
inline thread_local uint3 block_idx{};
inline thread_local dim3 block_dim;
inline thread_local dim3 grid_dim;

inline std::map<const void*, int>& dynamic_shared_limits() {
  static std::map<const void*, int> limits;
  return limits;
}

inline thread_local bool in_fiber = false;

// Raised by the scheduler, on the caller's stack: a failing fiber hands its message over and is abandoned,
// never unwound (exceptions thrown across swapcontext stacks upset AddressSanitizer).
[[noreturn]] inline void fail(const std::string& message) {
  if (in_fiber) {
    Block& b = *active;
    if (b.error.empty()) b.error = message;
    swapcontext(&b.fibers[b.current].context, &b.scheduler);
    std::abort();  // unreachable: the scheduler never resumes a fiber of a failed block
  }
  throw std::runtime_error("cuda emulator: " + message);
}

inline Block& block() {
  if (active == nullptr) fail("a device function ran outside a kernel launch");
  return *active;
}

// Leaves the running fiber, which has arrived at a barrier, for the scheduler.
inline void yield() {
  Block& b = block();
  swapcontext(&b.fibers[b.current].context, &b.scheduler);
}

inline void syncthreads() {
  Block& b = block();
  b.fibers[b.current].state = State::kAtBlockBarrier;
  yield();
}

inline void syncwarp() {
  Block& b = block();
  b.fibers[b.current].state = State::kAtWarpBarrier;
  yield();
}

inline int lane_of(int linear) { return linear % kWarpSize; }

// CUDA's shuffle rules: the caller and its source lane must be in the mask and running; a source past the
// caller's width-segment returns the caller's own value. (Errors here run in a fiber: the scheduler raises
// them with the kernel's name.)
template <typename T>
T shuffle(unsigned int mask, T value, int source, int width) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "shuffle of an unsupported type");
  Block& b = block();
  const int me = b.current, lane = lane_of(me);
  if (width <= 0 || width > kWarpSize || (width & (width - 1)) != 0)
    fail("shuffle width " + std::to_string(width) + " is not a power of two <= 32");
  if (((mask >> lane) & 1u) == 0)
    fail("lane " + std::to_string(lane) + " shuffles with a mask that leaves it out");
  const int segment = lane / width * width;
  if (source < segment || source >= segment + width) source = lane;
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  b.slots[me] = bits;
  syncwarp();
  const int from = me - lane + source;
  if (((mask >> source) & 1u) == 0 || from >= static_cast<int>(b.fibers.size()) ||
      b.fibers[from].state == State::kDone)
    fail("lane " + std::to_string(lane) + " reads lane " + std::to_string(source) +
         ", which is outside the mask or not running");
  T result;
  std::memcpy(&result, &b.slots[from], sizeof(T));
  syncwarp();  // nobody overwrites its slot before every lane has read
  return result;
}

// Filled with 0xFF once per block, by the first thread that declares it.
inline void static_shared(const void* address, size_t bytes) {
  Block& b = block();
  if (b.static_shared_seen.insert(address).second) std::memset(const_cast<void*>(address), 0xFF, bytes);
}

template <typename T>
T* dynamic_shared() {
  Block& b = block();
  return b.dynamic_shared.empty() ? nullptr : reinterpret_cast<T*>(b.dynamic_shared.data());
}

inline std::string describe_states(const Block& b) {
  std::ostringstream out;
  int shown = 0;
  for (size_t t = 0; t < b.fibers.size() && shown < 8; ++t) {
    const State s = b.fibers[t].state;
    if (s == State::kDone) continue;
    out << " thread " << t << (s == State::kAtBlockBarrier ? " at __syncthreads;" : " at a warp shuffle;");
    ++shown;
  }
  return out.str();
}

inline void fiber_entry() {
  Block& b = *active;
  (*b.body)();
  b.fibers[b.current].state = State::kDone;
  // returning resumes uc_link: the scheduler
}

// Opens every barrier that all its threads have reached; false when none could open.
inline bool open_barriers(Block& b) {
  const int threads = static_cast<int>(b.fibers.size());
  int live = 0, at_block = 0;
  for (const Fiber& f : b.fibers) {
    live += f.state != State::kDone;
    at_block += f.state == State::kAtBlockBarrier;
  }
  if (live > 0 && at_block == live) {
    for (Fiber& f : b.fibers)
      if (f.state == State::kAtBlockBarrier) f.state = State::kReady;
    return true;
  }
  bool opened = false;
  for (int w = 0; w < threads; w += kWarpSize) {
    const int end = std::min(threads, w + kWarpSize);
    int waiting = 0, running = 0;
    for (int t = w; t < end; ++t) {
      running += b.fibers[t].state != State::kDone;
      waiting += b.fibers[t].state == State::kAtWarpBarrier;
    }
    if (running > 0 && waiting == running) {
      for (int t = w; t < end; ++t)  // not the lanes that have returned: they must never run again
        if (b.fibers[t].state == State::kAtWarpBarrier) b.fibers[t].state = State::kReady;
      opened = true;
    }
  }
  return opened;
}

inline void run_block(Block& b, char* stacks) {
  const int threads = static_cast<int>(b.fibers.size());
  for (int t = 0; t < threads; ++t) {
    Fiber& f = b.fibers[t];
    f.state = State::kReady;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = stacks + static_cast<size_t>(t) * kStackBytes;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &b.scheduler;
    makecontext(&f.context, fiber_entry, 0);
  }
  std::fill(b.dynamic_shared.begin(), b.dynamic_shared.end(), 0xFF);
  b.static_shared_seen.clear();
  block_idx = b.block_idx;
  b.order.resize(threads);
  const auto run = [&](int t) {  // thread t until its next barrier or its end
    if (b.fibers[t].state != State::kReady) return;
    b.current = t;
    thread_idx = uint3{t % b.block_dim.x, t / b.block_dim.x % b.block_dim.y, t / (b.block_dim.x * b.block_dim.y)};
    in_fiber = true;
    swapcontext(&b.scheduler, &b.fibers[t].context);
    in_fiber = false;
    if (!b.error.empty()) fail(std::string(b.kernel) + ": " + b.error);
  };
  const bool by_warp = b.schedule == Schedule::kWarps || b.schedule == Schedule::kWarpsReverse;
  while (true) {
    if (by_warp) {
      const int warps = (threads + kWarpSize - 1) / kWarpSize;
      for (int i = 0; i < warps; ++i) {
        const int w = b.schedule == Schedule::kWarpsReverse ? warps - 1 - i : i;
        const int first = w * kWarpSize, end = std::min(threads, first + kWarpSize);
        while (true) {
          for (int t = first; t < end; ++t) run(t);
          int running = 0, waiting = 0;  // open the warp's shuffle as soon as all of it is there
          for (int t = first; t < end; ++t) {
            running += b.fibers[t].state != State::kDone;
            waiting += b.fibers[t].state == State::kAtWarpBarrier;
          }
          if (running == 0 || waiting != running) break;
          for (int t = first; t < end; ++t)
            if (b.fibers[t].state == State::kAtWarpBarrier) b.fibers[t].state = State::kReady;
        }
      }
    } else {
      for (int i = 0; i < threads; ++i) b.order[i] = b.schedule == Schedule::kReverse ? threads - 1 - i : i;
      if (b.schedule == Schedule::kShuffle) {
        for (int i = threads - 1; i > 0; --i) {  // Fisher-Yates with a 64-bit LCG
          b.random_state = b.random_state * 6364136223846793005ull + 1442695040888963407ull;
          std::swap(b.order[i], b.order[static_cast<int>((b.random_state >> 33) % static_cast<uint64_t>(i + 1))]);
        }
      }
      for (const int t : b.order) run(t);
    }
    bool done = true;
    for (const Fiber& f : b.fibers) done = done && f.state == State::kDone;
    if (done) return;
    if (!open_barriers(b))
      fail(std::string(b.kernel) + ": deadlock in block (" + std::to_string(b.block_idx.x) + ", " +
           std::to_string(b.block_idx.y) + ", " + std::to_string(b.block_idx.z) + "):" + describe_states(b));
  }
}

struct LaunchConfig {
  dim3 grid, block;
  size_t shared;
  LaunchConfig(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), shared(s) {}
};

inline void run_grid(const LaunchConfig& config, const void* kernel, const char* name,
                     const std::function<void()>& body) {
  const dim3 g = config.grid, t = config.block;
  const uint64_t threads = static_cast<uint64_t>(t.x) * t.y * t.z;
  if (threads == 0 || threads > 1024 || t.z > 64)
    fail(std::string(name) + ": invalid block (" + std::to_string(t.x) + ", " + std::to_string(t.y) + ", " +
         std::to_string(t.z) + ")");
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.y > MASKEDSSL_MAX_GRID_Y || g.z > 65535 || g.x > 2147483647u)
    fail(std::string(name) + ": invalid grid (" + std::to_string(g.x) + ", " + std::to_string(g.y) + ", " +
         std::to_string(g.z) + ")");
  const auto& limits = dynamic_shared_limits();
  const auto found = limits.find(kernel);
  const size_t limit = found == limits.end() ? kDefaultSharedLimit : found->second;
  if (config.shared > limit)
    fail(std::string(name) + ": " + std::to_string(config.shared) + " bytes of dynamic shared memory, over the " +
         std::to_string(limit) + " allowed (cudaFuncSetAttribute raises it)");
  if (active != nullptr) fail("a kernel launched from inside a kernel");

  const size_t stack_bytes = static_cast<size_t>(threads) * kStackBytes;
  void* stacks = mmap(nullptr, stack_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (stacks == MAP_FAILED) fail("cannot map fiber stacks");
  Block b;
  b.body = &body;
  b.kernel = name;
  b.block_dim = t;
  b.grid_dim = g;
  b.fibers.resize(threads);
  b.slots.assign(threads, 0);
  b.dynamic_shared.assign(config.shared, 0xFF);
  b.schedule = schedule();
  b.random_state = schedule_seed();
  block_dim = t;
  grid_dim = g;
  active = &b;
  try {
    for (unsigned int z = 0; z < g.z; ++z)
      for (unsigned int y = 0; y < g.y; ++y)
        for (unsigned int x = 0; x < g.x; ++x) {
          b.block_idx = uint3{x, y, z};
          run_block(b, static_cast<char*>(stacks));
        }
  } catch (...) {
    active = nullptr;
    munmap(stacks, stack_bytes);
    throw;
  }
  active = nullptr;
  munmap(stacks, stack_bytes);
}

// kernel<<<grid, block, shared, stream>>>(args...): the arguments are converted to the kernel's parameter
// types once, as the runtime copies them, and every thread calls the kernel with that copy.
template <typename... Params, typename... Args>
void launch(const LaunchConfig& config, void (*kernel)(Params...), const char* name, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel launched with the wrong number of arguments");
  std::tuple<std::decay_t<Params>...> params(static_cast<std::decay_t<Params>>(std::forward<Args>(args))...);
  const std::function<void()> body = [&] { std::apply(kernel, params); };
  run_grid(config, reinterpret_cast<const void*>(kernel), name, body);
}

inline int device_index(const void*) { return 0; }

}  // namespace cpu_emu

#define threadIdx (::cpu_emu::thread_idx)
#define blockIdx (::cpu_emu::block_idx)
#define blockDim (::cpu_emu::block_dim)
#define gridDim (::cpu_emu::grid_dim)

inline void __syncthreads() { ::cpu_emu::syncthreads(); }
inline void __syncwarp(unsigned int = 0xffffffffu) { ::cpu_emu::syncwarp(); }

template <typename T>
T __shfl_xor_sync(unsigned int mask, T value, int lane_mask, int width = 32) {
  return ::cpu_emu::shuffle(mask, value, ::cpu_emu::lane_of(::cpu_emu::block().current) ^ lane_mask, width);
}
template <typename T>
T __shfl_sync(unsigned int mask, T value, int source, int width = 32) {
  const int lane = ::cpu_emu::lane_of(::cpu_emu::block().current);
  return ::cpu_emu::shuffle(mask, value, lane / width * width + source % width, width);
}
template <typename T>
T __shfl_down_sync(unsigned int mask, T value, unsigned int delta, int width = 32) {
  return ::cpu_emu::shuffle(mask, value, ::cpu_emu::lane_of(::cpu_emu::block().current) + static_cast<int>(delta),
                            width);
}

// One block runs at a time on one thread: atomics are plain read-modify-writes.
template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

// ---------------------------------------------------------------------------------------------- runtime API
template <typename F>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, F) {
  attributes->sharedSizeBytes = 0;
  attributes->maxThreadsPerBlock = 1024;
  return cudaSuccess;
}

template <typename F>
cudaError_t cudaFuncSetAttribute(F kernel, cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > ::cpu_emu::kSharedOptin)
    return cudaErrorInvalidValue;
  ::cpu_emu::dynamic_shared_limits()[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int) {
  switch (attribute) {
    case cudaDevAttrMultiProcessorCount:
      *value = ::cpu_emu::sm_count();
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = ::cpu_emu::kSharedOptin;
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

template <typename F>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, F, int threads, size_t) {
  if (threads <= 0 || threads > 1024) return cudaErrorInvalidValue;
  *blocks = std::min(32, ::cpu_emu::kThreadsPerSm / threads);
  return cudaSuccess;
}

inline const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "invalid argument or configuration";
}
