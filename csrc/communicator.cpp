#include "communicator.h"

#include <chrono>
#include <cstdio>
#include <future>

#include "error.h"
#include "nccl_group.h"

namespace distripy {

namespace {

using Clock = std::chrono::steady_clock;

// Polls spin this long (yielding) before sleeping between polls: most enqueues of a non-blocking
// communicator finish within microseconds, and a 20 us sleep would add its scheduling delay.
constexpr auto kSpin = std::chrono::microseconds(50);
constexpr auto kPollInterval = std::chrono::microseconds(20);
constexpr auto kWatchdogInterval = std::chrono::milliseconds(10);
// How long abort and destroy may take before the communicator is left to the process's exit.
constexpr double kAbortWaitS = 10.0;

// Makes `device` current for the scope and restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    DISTRIPY_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) {
      DISTRIPY_CUDA_CHECK(cudaSetDevice(device));
    }
    device_ = device;
  }
  ~DeviceGuard() {
    if (previous_ != device_) {
      cudaSetDevice(previous_);
    }
  }

 private:
  int previous_ = 0;
  int device_ = 0;
};

cudaStream_t as_stream(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }
void* as_pointer(std::uintptr_t address) { return reinterpret_cast<void*>(address); }

Clock::time_point deadline_after(double seconds) {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

std::string seconds_text(double seconds) {
  char text[48];
  std::snprintf(text, sizeof(text), "%g s", seconds);
  return text;
}

// Spin (yielding) for the first kSpin of a poll loop, then sleep kPollInterval per round.
void pause_poll(Clock::time_point started) {
  if (Clock::now() - started < kSpin) {
    std::this_thread::yield();
  } else {
    std::this_thread::sleep_for(kPollInterval);
  }
}

ncclRedOp_t reduction(const std::string& op) {
  if (op == "sum") return ncclSum;
  if (op == "prod") return ncclProd;
  if (op == "max") return ncclMax;
  if (op == "min") return ncclMin;
  if (op == "avg") return ncclAvg;
  throw std::invalid_argument("all_reduce: op '" + op + "' is not one of sum, prod, max, min, avg");
}

int runtime_nccl_version() {
  int code = 0;
  DISTRIPY_NCCL_CHECK(ncclGetVersion(&code));
  return code;
}

// Run `call` on its own thread and wait at most `seconds` for it; false when it did not return in
// time (the thread is left running, detached: NCCL's abort and destroy can block on CUDA graphs
// that hold the communicator's work, and nothing else may wait on them forever).
template <typename Call>
bool bounded(Call call, double seconds) noexcept {
  try {
    auto finished = std::make_shared<std::promise<void>>();
    std::future<void> done = finished->get_future();
    std::thread([call, finished]() mutable {
      call();
      finished->set_value();
    }).detach();
    return done.wait_for(std::chrono::duration<double>(seconds)) == std::future_status::ready;
  } catch (...) {
    return false;
  }
}

void check_capture_status(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw_cuda_error(status, what, __FILE__, __LINE__);
  }
}

}  // namespace

// -- Event -------------------------------------------------------------------------------------

Event::Event() { DISTRIPY_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming)); }

Event::~Event() {
  if (event_ != nullptr) cudaEventDestroy(event_);
}

// -- Watchdog ----------------------------------------------------------------------------------

Watchdog::Watchdog(CommCore* core) : core_(core) { thread_ = std::thread([this] { run(); }); }

Watchdog::~Watchdog() { stop(); }

void Watchdog::stop() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) {
    if (thread_.get_id() == std::this_thread::get_id()) {
      thread_.detach();
    } else {
      thread_.join();
    }
  }
}

void Watchdog::watch(std::shared_ptr<Event> event, double timeout_s, std::string what) {
  std::lock_guard<std::mutex> lock(mutex_);
  entries_.push_back(Entry{std::move(event), deadline_after(timeout_s), std::move(what)});
}

std::size_t Watchdog::pending() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return entries_.size();
}

void Watchdog::run() {
  if (cudaSetDevice(core_->device) != cudaSuccess) return;
  // Relaxed: this thread's event queries must not invalidate a CUDA-graph capture that another
  // thread runs in the global mode (torch.cuda.graph's default), nor be refused by it.
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  cudaThreadExchangeStreamCaptureMode(&mode);
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stopping_) {
    wake_.wait_for(lock, kWatchdogInterval);
    if (stopping_ || core_->aborted.load()) break;
    // Completed events leave; the first one past its deadline aborts the communicator.
    std::string expired;
    std::size_t kept = 0;
    for (std::size_t i = 0; i < entries_.size(); ++i) {
      const cudaError_t status = cudaEventQuery(entries_[i].event->get());
      if (status == cudaSuccess) continue;
      if (status != cudaErrorNotReady) {
        expired = entries_[i].what + ": CUDA error " + cudaGetErrorName(status);
      } else if (expired.empty() && Clock::now() > entries_[i].deadline) {
        expired = entries_[i].what + " did not complete within " + seconds_text(core_->timeout_s) +
                  " (seen by the watchdog: a peer is dead or stuck)";
      }
      entries_[kept++] = std::move(entries_[i]);
    }
    entries_.resize(kept);
    lock.unlock();
    // The communicator is polled only when no call holds it: a call in progress polls it itself.
    std::unique_lock<std::timed_mutex> comm(core_->comm_mutex, std::try_to_lock);
    if (comm.owns_lock() && !core_->aborted.load() && !core_->closed.load()) {
      if (expired.empty()) {
        ncclResult_t state = ncclSuccess;
        if (ncclCommGetAsyncError(core_->comm, &state) == ncclSuccess && state != ncclSuccess &&
            state != ncclInProgress) {
          expired = std::string("asynchronous NCCL error ") + ncclGetErrorString(state) + " (seen by the watchdog)";
        }
      }
      if (!expired.empty()) core_->abort_locked(expired);
    }
    comm = std::unique_lock<std::timed_mutex>();
    lock.lock();
    if (core_->aborted.load()) entries_.clear();
  }
}

// -- CommCore ----------------------------------------------------------------------------------

void CommCore::settle(const char* what) {
  const auto started = Clock::now();
  const auto deadline = deadline_after(timeout_s);
  while (true) {
    ncclResult_t state = ncclSuccess;
    DISTRIPY_NCCL_CHECK(ncclCommGetAsyncError(comm, &state));
    if (state == ncclSuccess) return;
    if (state != ncclInProgress) {
      const std::string detail = ncclGetLastError(comm);
      const std::string message = std::string(what) + " failed on rank " + std::to_string(rank) +
                                  ": NCCL error " + std::to_string(static_cast<int>(state)) + ": " +
                                  ncclGetErrorString(state) + (detail.empty() ? "" : " (" + detail + ")");
      abort_locked(message);
      throw NcclError(message + "; the communicator was aborted", state);
    }
    if (Clock::now() > deadline) {
      const std::string message =
          std::string(what) + " on rank " + std::to_string(rank) + " did not complete within " + seconds_text(timeout_s);
      abort_locked(message);
      throw CommTimeout(message + "; the communicator was aborted");
    }
    pause_poll(started);
  }
}

void CommCore::check_async(const char* what) {
  ncclResult_t state = ncclSuccess;
  DISTRIPY_NCCL_CHECK(ncclCommGetAsyncError(comm, &state));
  if (state != ncclSuccess && state != ncclInProgress) {
    const std::string detail = ncclGetLastError(comm);
    const std::string message = std::string(what) + ": asynchronous NCCL error " +
                                std::to_string(static_cast<int>(state)) + ": " + ncclGetErrorString(state) +
                                (detail.empty() ? "" : " (" + detail + ")");
    abort_locked(message);
    throw NcclError(message + "; the communicator was aborted", state);
  }
}

void CommCore::abort_locked(const std::string& reason) noexcept {
  if (comm == nullptr || aborted.exchange(true)) return;
  try {
    std::lock_guard<std::mutex> lock(reason_mutex);
    abort_reason = reason;
  } catch (...) {
  }
  const ncclComm_t doomed = comm;
  const int on_device = device;
  bounded(
      [doomed, on_device] {
        cudaSetDevice(on_device);
        ncclCommAbort(doomed);
      },
      kAbortWaitS);
}

void CommCore::close(double seconds) noexcept {
  if (closed.exchange(true)) return;
  if (watchdog) watchdog->stop();
  std::unique_lock<std::timed_mutex> lock(comm_mutex, std::defer_lock);
  if (!lock.try_lock_for(std::chrono::duration<double>(seconds))) return;  // a call is stuck: leave it
  if (comm == nullptr || aborted.load()) return;
  const ncclComm_t comm_to_destroy = comm;
  const int on_device = device;
  const cudaStream_t on_stream = stream;
  const auto deadline = deadline_after(seconds);
  // Every operation done (bounded), then the communicator destroyed (bounded): NCCL's destroy
  // blocks on operations in flight and on CUDA graphs that hold the communicator's work.
  bool idle = false;
  while (Clock::now() < deadline) {
    const cudaError_t status = cudaStreamQuery(on_stream);
    if (status != cudaErrorNotReady) {
      idle = status == cudaSuccess;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  if (!idle) {
    abort_locked("closed while operations were still in flight");
    return;
  }
  const double left = std::chrono::duration<double>(deadline - Clock::now()).count();
  bounded(
      [comm_to_destroy, on_device] {
        cudaSetDevice(on_device);
        ncclCommDestroy(comm_to_destroy);
      },
      left > 0.1 ? left : 0.1);
}

std::string CommCore::reason() {
  std::lock_guard<std::mutex> lock(reason_mutex);
  return abort_reason;
}

CommCore::~CommCore() {
  // May run at interpreter exit, even after the CUDA context is gone: bounded, errors ignored.
  close(kAbortWaitS);
  watchdog.reset();
}

// -- Work --------------------------------------------------------------------------------------

const WorkState& Work::issued(const char* what) const {
  if (!state_->event) {
    throw std::logic_error(std::string(what) + ": " + state_->op +
                           " belongs to a group that has not been issued yet (call group_end first)");
  }
  return *state_;
}

void Work::wait(std::uintptr_t stream) const {
  const WorkState& state = issued("Work.wait");
  if (state.captured) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    check_capture_status(cudaStreamIsCapturing(as_stream(stream), &status), "cudaStreamIsCapturing");
    if (status != cudaStreamCaptureStatusActive) {
      throw std::logic_error("Work.wait: " + state.op +
                             " was issued inside a CUDA-graph capture; it completes when the graph is "
                             "replayed and cannot be waited for outside the capture");
    }
  }
  DISTRIPY_CUDA_CHECK(cudaStreamWaitEvent(as_stream(stream), state.event->get(), 0));
}

void Work::synchronize(double timeout_s) const {
  const WorkState& state = issued("Work.synchronize");
  if (state.captured) {
    throw std::logic_error("Work.synchronize: " + state.op +
                           " was issued inside a CUDA-graph capture; the host cannot wait for it (replay the "
                           "graph, then synchronize its stream)");
  }
  CommCore& core = *state.core;
  const double limit = timeout_s < 0 ? core.timeout_s : timeout_s;
  const auto started = Clock::now();
  const auto deadline = deadline_after(limit);
  while (true) {
    const cudaError_t status = cudaEventQuery(state.event->get());
    if (status == cudaSuccess) return;
    if (status != cudaErrorNotReady) DISTRIPY_CUDA_CHECK(status);
    if (core.aborted.load()) {
      throw NcclError(state.op + " cannot complete: the communicator was aborted (" + core.reason() + ")",
                      ncclInternalError);
    }
    {
      std::unique_lock<std::timed_mutex> lock(core.comm_mutex, std::try_to_lock);
      if (lock.owns_lock() && !core.aborted.load() && !core.closed.load()) {
        core.check_async(state.op.c_str());
        if (Clock::now() > deadline) {
          const std::string message = state.op + " on rank " + std::to_string(core.rank) + " did not complete within " +
                                      seconds_text(limit) + "; a peer is dead or stuck";
          core.abort_locked(message);
          throw CommTimeout(message + "; the communicator was aborted");
        }
      }
    }
    pause_poll(started);
  }
}

bool Work::done() const {
  const WorkState& state = issued("Work.done");
  if (state.captured) return false;
  const cudaError_t status = cudaEventQuery(state.event->get());
  if (status == cudaSuccess) return true;
  if (status != cudaErrorNotReady) DISTRIPY_CUDA_CHECK(status);
  return false;
}

// -- Communicator ------------------------------------------------------------------------------

std::string Communicator::new_unique_id() {
  ncclUniqueId id;
  DISTRIPY_NCCL_CHECK(ncclGetUniqueId(&id));
  return std::string(id.internal, sizeof(id.internal));
}

Communicator::Communicator(const std::string& unique_id, int rank, int world, int device, double timeout_s,
                           std::uintptr_t stream) {
  if (unique_id.size() != sizeof(ncclUniqueId::internal)) {
    throw std::invalid_argument("Communicator: unique_id has " + std::to_string(unique_id.size()) +
                                " bytes, expected " + std::to_string(sizeof(ncclUniqueId::internal)) +
                                " (from Communicator.new_unique_id())");
  }
  if (world < 1 || rank < 0 || rank >= world) {
    throw std::invalid_argument("Communicator: rank " + std::to_string(rank) + " is not in [0, world=" +
                                std::to_string(world) + ")");
  }
  if (!(timeout_s > 0)) {
    throw std::invalid_argument("Communicator: timeout_s must be positive, got " + std::to_string(timeout_s));
  }
  int devices = 0;
  const cudaError_t counted = cudaGetDeviceCount(&devices);
  if (counted == cudaErrorNoDevice || counted == cudaErrorInsufficientDriver || devices == 0) {
    throw CudaError(std::string("Communicator needs a CUDA GPU, and this machine has none usable (") +
                        cudaGetErrorName(counted) + ": " + cudaGetErrorString(counted) + ")",
                    counted == cudaSuccess ? cudaErrorNoDevice : counted);
  }
  DISTRIPY_CUDA_CHECK(counted);
  if (device < 0 || device >= devices) {
    throw std::invalid_argument("Communicator: device " + std::to_string(device) + " is not one of the " +
                                std::to_string(devices) + " visible GPUs");
  }
  if (stream == 0) {
    throw std::invalid_argument("Communicator: stream must be a created CUDA stream of device " +
                                std::to_string(device) + " (it stays the caller's), not the default stream (0)");
  }
  auto core = std::make_shared<CommCore>();
  core->device = device;
  core->rank = rank;
  core->world = world;
  core->timeout_s = timeout_s;
  core->stream = as_stream(stream);
  DeviceGuard guard(device);
  ncclUniqueId id;
  std::copy(unique_id.begin(), unique_id.end(), id.internal);
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // so that a peer that never joins makes this time out instead of hang
  std::lock_guard<std::timed_mutex> lock(core->comm_mutex);
  const ncclResult_t started = ncclCommInitRankConfig(&core->comm, world, id, rank, &config);
  if (started != ncclSuccess && started != ncclInProgress) {
    DISTRIPY_NCCL_CHECK(started);
  }
  core->settle("ncclCommInitRankConfig");
  core->watchdog = std::make_unique<Watchdog>(core.get());
  core_ = std::move(core);
}

std::unique_lock<std::timed_mutex> Communicator::lock_comm(const char* what) const {
  std::unique_lock<std::timed_mutex> lock(core_->comm_mutex, std::defer_lock);
  if (!lock.try_lock_for(std::chrono::duration<double>(core_->timeout_s))) {
    throw CommTimeout(std::string(what) + ": the communicator stayed busy for " + seconds_text(core_->timeout_s));
  }
  return lock;
}

void Communicator::check_usable(const char* what) const {
  if (core_->closed.load()) {
    throw NcclError(std::string(what) + ": the communicator was closed", ncclInvalidUsage);
  }
  if (core_->aborted.load()) {
    throw NcclError(std::string(what) + ": the communicator was aborted (" + core_->reason() + ")",
                    ncclInvalidUsage);
  }
}

void Communicator::check_dtype(int dtype, const char* what) const {
  if (dtype < 0 || dtype >= ncclNumTypes) {
    throw std::invalid_argument(std::string(what) + ": dtype code " + std::to_string(dtype) +
                                " is not an NCCL data type");
  }
  if ((dtype == ncclFloat8e4m3 || dtype == ncclFloat8e5m2) && runtime_nccl_version() < NCCL_VERSION(2, 24, 0)) {
    throw std::invalid_argument(std::string(what) + ": fp8 needs NCCL 2.24 or newer");
  }
}

void Communicator::order_after(std::uintptr_t stream) {
  // One event reused (the caller holds comm_mutex): a wait takes the event's state when enqueued.
  if (!core_->ordering) core_->ordering = std::make_unique<Event>();
  DISTRIPY_CUDA_CHECK(cudaEventRecord(core_->ordering->get(), as_stream(stream)));
  DISTRIPY_CUDA_CHECK(cudaStreamWaitEvent(core_->stream, core_->ordering->get(), 0));
}

bool Communicator::comm_stream_capturing() const {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  check_capture_status(cudaStreamIsCapturing(core_->stream, &status), "cudaStreamIsCapturing");
  return status != cudaStreamCaptureStatusNone;
}

void Communicator::complete(const std::vector<std::shared_ptr<WorkState>>& states, bool captured) {
  auto event = std::make_shared<Event>();
  DISTRIPY_CUDA_CHECK(cudaEventRecord(event->get(), core_->stream));
  for (const auto& state : states) {
    state->event = event;
    state->captured = captured;
  }
  // Events inside a capture are graph nodes that cannot be queried; replays are watched instead.
  if (!captured && !states.empty() && core_->watchdog) {
    core_->watchdog->watch(event, core_->timeout_s, states.front()->op);
  }
}

Work Communicator::finish(const std::string& op) {
  auto state = std::make_shared<WorkState>();
  state->core = core_;
  state->op = op;
  if (group_) {
    group_->works.push_back(state);
    return Work(state);
  }
  core_->settle(op.c_str());
  complete({state}, comm_stream_capturing());
  return Work(state);
}

Work Communicator::all_gather(std::uintptr_t send, std::uintptr_t recv, std::size_t count, int dtype,
                              std::uintptr_t stream) {
  check_usable("all_gather");
  check_dtype(dtype, "all_gather");
  DeviceGuard guard(core_->device);
  std::unique_lock<std::timed_mutex> lock;
  if (!group_) {
    lock = lock_comm("all_gather");
    check_usable("all_gather");
    order_after(stream);
  }
  const ncclResult_t result = ncclAllGather(as_pointer(send), as_pointer(recv), count,
                                            static_cast<ncclDataType_t>(dtype), core_->comm, core_->stream);
  if (result != ncclInProgress) DISTRIPY_NCCL_CHECK(result);
  return finish("all_gather of " + std::to_string(count) + " elements");
}

Work Communicator::all_reduce(std::uintptr_t buf, std::size_t count, int dtype, const std::string& op,
                              std::uintptr_t stream) {
  check_usable("all_reduce");
  check_dtype(dtype, "all_reduce");
  const ncclRedOp_t red = reduction(op);
  DeviceGuard guard(core_->device);
  std::unique_lock<std::timed_mutex> lock;
  if (!group_) {
    lock = lock_comm("all_reduce");
    check_usable("all_reduce");
    order_after(stream);
  }
  const ncclResult_t result = ncclAllReduce(as_pointer(buf), as_pointer(buf), count,
                                            static_cast<ncclDataType_t>(dtype), red, core_->comm, core_->stream);
  if (result != ncclInProgress) DISTRIPY_NCCL_CHECK(result);
  return finish("all_reduce (" + op + ") of " + std::to_string(count) + " elements");
}

Work Communicator::halo_exchange(std::uintptr_t top_send, std::size_t top_send_count, std::uintptr_t bottom_send,
                                 std::size_t bottom_send_count, std::uintptr_t top_recv,
                                 std::size_t top_recv_count, std::uintptr_t bottom_recv,
                                 std::size_t bottom_recv_count, int dtype, std::uintptr_t stream) {
  check_usable("halo_exchange");
  check_dtype(dtype, "halo_exchange");
  const int rank = core_->rank;
  if (rank == 0 && (top_send_count != 0 || top_recv_count != 0)) {
    throw std::invalid_argument("halo_exchange: rank 0 has no rank above it; top counts must be 0");
  }
  if (rank == core_->world - 1 && (bottom_send_count != 0 || bottom_recv_count != 0)) {
    throw std::invalid_argument("halo_exchange: rank " + std::to_string(rank) +
                                " is the last; bottom counts must be 0");
  }
  DeviceGuard guard(core_->device);
  std::unique_lock<std::timed_mutex> lock;
  if (!group_) {
    lock = lock_comm("halo_exchange");
    check_usable("halo_exchange");
    order_after(stream);
  }
  const auto type = static_cast<ncclDataType_t>(dtype);
  auto check = [](ncclResult_t result) {
    if (result != ncclInProgress) DISTRIPY_NCCL_CHECK(result);
  };
  {
    NcclGroup group;  // closed on every path: an open group would queue every later NCCL call
    DISTRIPY_NCCL_CHECK(group.started());
    if (top_send_count)
      check(ncclSend(as_pointer(top_send), top_send_count, type, rank - 1, core_->comm, core_->stream));
    if (top_recv_count)
      check(ncclRecv(as_pointer(top_recv), top_recv_count, type, rank - 1, core_->comm, core_->stream));
    if (bottom_send_count)
      check(ncclSend(as_pointer(bottom_send), bottom_send_count, type, rank + 1, core_->comm, core_->stream));
    if (bottom_recv_count)
      check(ncclRecv(as_pointer(bottom_recv), bottom_recv_count, type, rank + 1, core_->comm, core_->stream));
    check(group.end());
  }
  return finish("halo_exchange on rank " + std::to_string(rank));
}

Work Communicator::shift(std::uintptr_t send, std::uintptr_t recv, std::size_t count, int distance, int dtype,
                         std::uintptr_t stream) {
  check_usable("shift");
  check_dtype(dtype, "shift");
  const int rank = core_->rank;
  const int world = core_->world;
  if (distance <= 0 || distance >= world) {
    throw std::invalid_argument("shift: distance " + std::to_string(distance) + " is outside [1, " +
                                std::to_string(world - 1) + "]");
  }
  DeviceGuard guard(core_->device);
  std::unique_lock<std::timed_mutex> lock;
  if (!group_) {
    lock = lock_comm("shift");
    check_usable("shift");
    order_after(stream);
  }
  const auto type = static_cast<ncclDataType_t>(dtype);
  auto check = [](ncclResult_t result) {
    if (result != ncclInProgress) DISTRIPY_NCCL_CHECK(result);
  };
  if (count) {
    NcclGroup group;  // closed on every path: an open group would queue every later NCCL call
    DISTRIPY_NCCL_CHECK(group.started());
    check(ncclSend(as_pointer(send), count, type, (rank + distance) % world, core_->comm, core_->stream));
    check(ncclRecv(as_pointer(recv), count, type, (rank - distance + world) % world, core_->comm, core_->stream));
    check(group.end());
  }
  return finish("shift by " + std::to_string(distance) + " on rank " + std::to_string(rank));
}

void Communicator::group_start(std::uintptr_t stream) {
  check_usable("group_start");
  if (group_) throw std::logic_error("group_start: a group is already open (groups do not nest)");
  DeviceGuard guard(core_->device);
  auto group = std::make_unique<Group>();
  group->lock = lock_comm("group_start");
  check_usable("group_start");
  order_after(stream);
  DISTRIPY_NCCL_CHECK(ncclGroupStart());
  group_ = std::move(group);
}

void Communicator::group_end() {
  if (!group_) throw std::logic_error("group_end: no group is open");
  std::unique_ptr<Group> group = std::move(group_);  // releases comm_mutex on every path
  DeviceGuard guard(core_->device);
  const ncclResult_t result = ncclGroupEnd();
  if (result != ncclInProgress) DISTRIPY_NCCL_CHECK(result);
  core_->settle("ncclGroupEnd");
  // One completion event for the whole group, shared by its Works.
  complete(group->works, comm_stream_capturing());
}

void Communicator::join(std::uintptr_t stream) {
  DeviceGuard guard(core_->device);
  cudaStreamCaptureStatus caller = cudaStreamCaptureStatusNone;
  unsigned long long caller_capture = 0;
  check_capture_status(cudaStreamGetCaptureInfo(as_stream(stream), &caller, &caller_capture),
                       "cudaStreamGetCaptureInfo");
  cudaStreamCaptureStatus own = cudaStreamCaptureStatusNone;
  unsigned long long own_capture = 0;
  check_capture_status(cudaStreamGetCaptureInfo(core_->stream, &own, &own_capture), "cudaStreamGetCaptureInfo");
  if (caller == cudaStreamCaptureStatusActive) {
    // The comm stream joined this capture only if it did work in it; otherwise nothing to join.
    if (own != cudaStreamCaptureStatusActive || own_capture != caller_capture) return;
  } else if (own != cudaStreamCaptureStatusNone) {
    throw std::logic_error("join: the comm stream is in a CUDA-graph capture that `stream` is not part of");
  }
  Event done;
  DISTRIPY_CUDA_CHECK(cudaEventRecord(done.get(), core_->stream));
  DISTRIPY_CUDA_CHECK(cudaStreamWaitEvent(as_stream(stream), done.get(), 0));
}

Work Communicator::watch(std::uintptr_t stream, const std::string& what) {
  check_usable("watch");
  DeviceGuard guard(core_->device);
  auto state = std::make_shared<WorkState>();
  state->core = core_;
  state->op = what;
  state->event = std::make_shared<Event>();
  DISTRIPY_CUDA_CHECK(cudaEventRecord(state->event->get(), as_stream(stream)));
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  check_capture_status(cudaStreamIsCapturing(as_stream(stream), &status), "cudaStreamIsCapturing");
  state->captured = status != cudaStreamCaptureStatusNone;
  // A mark inside a capture is a graph node: nothing to watch until it is replayed.
  if (!state->captured && core_->watchdog) core_->watchdog->watch(state->event, core_->timeout_s, what);
  return Work(state);
}

Communicator Communicator::split(int color, int key, std::uintptr_t stream) {
  check_usable("split");
  if (color < 0) throw std::invalid_argument("split: color must be >= 0, got " + std::to_string(color));
  if (stream == 0) throw std::invalid_argument("split: stream must be a created CUDA stream, not 0");
  DeviceGuard guard(core_->device);
  auto core = std::make_shared<CommCore>();
  core->device = core_->device;
  core->timeout_s = core_->timeout_s;
  core->stream = as_stream(stream);
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  {
    std::unique_lock<std::timed_mutex> parent = lock_comm("split");
    check_usable("split");
    std::lock_guard<std::timed_mutex> child(core->comm_mutex);
    const ncclResult_t started = ncclCommSplit(core_->comm, color, key, &core->comm, &config);
    if (started != ncclSuccess && started != ncclInProgress) DISTRIPY_NCCL_CHECK(started);
    // A non-blocking split runs as a job of the *parent*, which writes the child's handle into
    // core->comm when it finishes: poll the parent; the child's handle is null until then.
    try {
      core_->settle("ncclCommSplit");
    } catch (...) {
      // The job may still write into core->comm after this throws: that memory must outlive it.
      new std::shared_ptr<CommCore>(core);  // deliberately leaked, one CommCore per failed split
      throw;
    }
    if (core->comm == nullptr) {
      throw NcclError("ncclCommSplit completed without a communicator for color " + std::to_string(color),
                      ncclInternalError);
    }
    core->settle("ncclCommSplit (child)");
    DISTRIPY_NCCL_CHECK(ncclCommUserRank(core->comm, &core->rank));
    DISTRIPY_NCCL_CHECK(ncclCommCount(core->comm, &core->world));
  }
  core->watchdog = std::make_unique<Watchdog>(core.get());
  return Communicator(std::move(core));
}

void Communicator::close(double timeout_s) {
  if (group_) throw std::logic_error("close: a group is open (call group_end first)");
  core_->close(timeout_s < 0 ? core_->timeout_s : timeout_s);
}

}  // namespace distripy
