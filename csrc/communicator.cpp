#include "communicator.h"

#include <chrono>
#include <sstream>
#include <thread>

#include "error.h"

namespace distripy {

namespace {

using Clock = std::chrono::steady_clock;

constexpr auto kPollInterval = std::chrono::microseconds(20);

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
  std::ostringstream out;
  out << seconds << " s";
  return out.str();
}

cudaEvent_t new_event() {
  cudaEvent_t event = nullptr;
  DISTRIPY_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  return event;
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

}  // namespace

// -- CommCore ----------------------------------------------------------------------------------

void CommCore::settle(const char* what) {
  const auto deadline = deadline_after(timeout_s);
  while (true) {
    ncclResult_t state = ncclSuccess;
    DISTRIPY_NCCL_CHECK(ncclCommGetAsyncError(comm, &state));
    if (state == ncclSuccess) return;
    if (state != ncclInProgress) {
      const std::string detail = ncclGetLastError(comm);
      abort();
      throw NcclError(std::string(what) + " failed on rank " + std::to_string(rank) + ": NCCL error " +
                          std::to_string(static_cast<int>(state)) + ": " + ncclGetErrorString(state) +
                          (detail.empty() ? "" : " (" + detail + ")") + "; the communicator was aborted",
                      state);
    }
    if (Clock::now() > deadline) {
      abort();
      throw CommTimeout(std::string(what) + " on rank " + std::to_string(rank) + " did not complete within " +
                        seconds_text(timeout_s) + "; the communicator was aborted");
    }
    std::this_thread::sleep_for(kPollInterval);
  }
}

void CommCore::check_async(const char* what) {
  ncclResult_t state = ncclSuccess;
  DISTRIPY_NCCL_CHECK(ncclCommGetAsyncError(comm, &state));
  if (state != ncclSuccess && state != ncclInProgress) {
    const std::string detail = ncclGetLastError(comm);
    abort();
    throw NcclError(std::string(what) + ": asynchronous NCCL error " + std::to_string(static_cast<int>(state)) +
                        ": " + ncclGetErrorString(state) + (detail.empty() ? "" : " (" + detail + ")") +
                        "; the communicator was aborted",
                    state);
  }
}

void CommCore::abort() noexcept {
  if (comm != nullptr && !aborted) {
    ncclCommAbort(comm);
    aborted = true;
  }
}

CommCore::~CommCore() {
  // Destruction may run at interpreter exit, after the CUDA context is gone: errors are ignored.
  int previous = 0;
  const bool have_previous = cudaGetDevice(&previous) == cudaSuccess;
  if (device >= 0) cudaSetDevice(device);
  if (comm != nullptr && !aborted) {
    ncclCommDestroy(comm);
  }
  if (stream != nullptr) cudaStreamDestroy(stream);
  if (have_previous) cudaSetDevice(previous);
}

WorkState::~WorkState() {
  if (event != nullptr) cudaEventDestroy(event);
}

// -- Work --------------------------------------------------------------------------------------

const WorkState& Work::issued(const char* what) const {
  if (state_->event == nullptr) {
    throw std::logic_error(std::string(what) + ": " + state_->op +
                           " belongs to a group that has not been issued yet (call group_end first)");
  }
  return *state_;
}

void Work::wait(std::uintptr_t stream) const {
  const WorkState& state = issued("Work.wait");
  DISTRIPY_CUDA_CHECK(cudaStreamWaitEvent(as_stream(stream), state.event, 0));
}

void Work::synchronize(double timeout_s) const {
  const WorkState& state = issued("Work.synchronize");
  CommCore& core = *state.core;
  const double limit = timeout_s < 0 ? core.timeout_s : timeout_s;
  const auto deadline = deadline_after(limit);
  while (true) {
    const cudaError_t status = cudaEventQuery(state.event);
    if (status == cudaSuccess) return;
    if (status != cudaErrorNotReady) DISTRIPY_CUDA_CHECK(status);
    if (!core.aborted) core.check_async(state.op.c_str());
    if (core.aborted) {
      throw NcclError(state.op + " cannot complete: the communicator was aborted", ncclInternalError);
    }
    if (Clock::now() > deadline) {
      core.abort();
      throw CommTimeout(state.op + " on rank " + std::to_string(core.rank) + " did not complete within " +
                        seconds_text(limit) + "; a peer is dead or stuck; the communicator was aborted");
    }
    std::this_thread::sleep_for(kPollInterval);
  }
}

bool Work::done() const {
  const WorkState& state = issued("Work.done");
  const cudaError_t status = cudaEventQuery(state.event);
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

Communicator::Communicator(const std::string& unique_id, int rank, int world, int device, double timeout_s) {
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
  auto core = std::make_shared<CommCore>();
  core->device = device;
  core->rank = rank;
  core->world = world;
  core->timeout_s = timeout_s;
  DeviceGuard guard(device);
  int least = 0, greatest = 0;
  DISTRIPY_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  DISTRIPY_CUDA_CHECK(cudaStreamCreateWithPriority(&core->stream, cudaStreamNonBlocking, greatest));
  ncclUniqueId id;
  std::copy(unique_id.begin(), unique_id.end(), id.internal);
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // so that a peer that never joins makes this time out instead of hang
  const ncclResult_t started = ncclCommInitRankConfig(&core->comm, world, id, rank, &config);
  if (started != ncclSuccess && started != ncclInProgress) {
    DISTRIPY_NCCL_CHECK(started);
  }
  core->settle("ncclCommInitRankConfig");
  core_ = std::move(core);
}

void Communicator::check_usable(const char* what) const {
  if (core_->aborted) {
    throw NcclError(std::string(what) + ": the communicator was aborted (after an error or a timeout)",
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
  cudaEvent_t ready = new_event();
  const cudaError_t recorded = cudaEventRecord(ready, as_stream(stream));
  const cudaError_t waited = recorded == cudaSuccess ? cudaStreamWaitEvent(core_->stream, ready, 0) : recorded;
  cudaEventDestroy(ready);  // released once the wait has been satisfied
  DISTRIPY_CUDA_CHECK(waited);
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
  state->event = new_event();
  DISTRIPY_CUDA_CHECK(cudaEventRecord(state->event, core_->stream));
  return Work(state);
}

Work Communicator::all_gather(std::uintptr_t send, std::uintptr_t recv, std::size_t count, int dtype,
                              std::uintptr_t stream) {
  check_usable("all_gather");
  check_dtype(dtype, "all_gather");
  DeviceGuard guard(core_->device);
  if (!group_) order_after(stream);
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
  if (!group_) order_after(stream);
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
  if (!group_) order_after(stream);
  const auto type = static_cast<ncclDataType_t>(dtype);
  auto check = [](ncclResult_t result) {
    if (result != ncclInProgress) DISTRIPY_NCCL_CHECK(result);
  };
  DISTRIPY_NCCL_CHECK(ncclGroupStart());
  if (top_send_count) check(ncclSend(as_pointer(top_send), top_send_count, type, rank - 1, core_->comm, core_->stream));
  if (top_recv_count) check(ncclRecv(as_pointer(top_recv), top_recv_count, type, rank - 1, core_->comm, core_->stream));
  if (bottom_send_count)
    check(ncclSend(as_pointer(bottom_send), bottom_send_count, type, rank + 1, core_->comm, core_->stream));
  if (bottom_recv_count)
    check(ncclRecv(as_pointer(bottom_recv), bottom_recv_count, type, rank + 1, core_->comm, core_->stream));
  check(ncclGroupEnd());
  return finish("halo_exchange on rank " + std::to_string(rank));
}

void Communicator::group_start(std::uintptr_t stream) {
  check_usable("group_start");
  if (group_) throw std::logic_error("group_start: a group is already open (groups do not nest)");
  DeviceGuard guard(core_->device);
  order_after(stream);
  DISTRIPY_NCCL_CHECK(ncclGroupStart());
  group_ = std::make_unique<Group>();
}

void Communicator::group_end() {
  if (!group_) throw std::logic_error("group_end: no group is open");
  std::unique_ptr<Group> group = std::move(group_);
  DeviceGuard guard(core_->device);
  const ncclResult_t result = ncclGroupEnd();
  if (result != ncclInProgress) DISTRIPY_NCCL_CHECK(result);
  core_->settle("ncclGroupEnd");
  // One completion event for the whole group; each Work owns its own copy of it.
  for (auto& state : group->works) {
    state->event = new_event();
    DISTRIPY_CUDA_CHECK(cudaEventRecord(state->event, core_->stream));
  }
}

void Communicator::join(std::uintptr_t stream) {
  DeviceGuard guard(core_->device);
  cudaEvent_t done = new_event();
  const cudaError_t recorded = cudaEventRecord(done, core_->stream);
  const cudaError_t waited = recorded == cudaSuccess ? cudaStreamWaitEvent(as_stream(stream), done, 0) : recorded;
  cudaEventDestroy(done);
  DISTRIPY_CUDA_CHECK(waited);
}

Communicator Communicator::split(int color, int key) {
  check_usable("split");
  if (color < 0) throw std::invalid_argument("split: color must be >= 0, got " + std::to_string(color));
  DeviceGuard guard(core_->device);
  auto core = std::make_shared<CommCore>();
  core->device = core_->device;
  core->timeout_s = core_->timeout_s;
  int least = 0, greatest = 0;
  DISTRIPY_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  DISTRIPY_CUDA_CHECK(cudaStreamCreateWithPriority(&core->stream, cudaStreamNonBlocking, greatest));
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  const ncclResult_t started = ncclCommSplit(core_->comm, color, key, &core->comm, &config);
  if (started != ncclSuccess && started != ncclInProgress) DISTRIPY_NCCL_CHECK(started);
  core->settle("ncclCommSplit");
  DISTRIPY_NCCL_CHECK(ncclCommUserRank(core->comm, &core->rank));
  DISTRIPY_NCCL_CHECK(ncclCommCount(core->comm, &core->world));
  return Communicator(std::move(core));
}

}  // namespace distripy
