// Communicator: one NCCL communicator, bound to one device, with its own high-priority
// non-blocking comm stream. Every operation is ordered after the caller's stream (an event recorded
// there, waited on by the comm stream), runs on the comm stream and returns a Work that holds the
// event recorded after it. Nothing here blocks the host except Work::synchronize and the polls that
// a non-blocking NCCL communicator needs while an operation is being enqueued (bounded by the
// timeout). Buffers are (device pointer, element count, NCCL data type); streams raw handles.
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace distripy {

// Raised when an operation did not complete within its timeout (the communicator is aborted).
class CommTimeout : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The NCCL communicator and its comm stream, shared by the Communicator and its Works.
struct CommCore {
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  int device = -1;
  int rank = -1;
  int world = 0;
  double timeout_s = 300.0;
  bool aborted = false;

  // Wait (polling, bounded by the timeout) until a non-blocking communicator has finished the call
  // in progress; raise on an asynchronous NCCL error. `what` names the call in messages.
  void settle(const char* what);
  // Poll for an asynchronous NCCL error; abort the communicator and raise if there is one.
  void check_async(const char* what);
  void abort() noexcept;
  ~CommCore();
};

// Completion of one operation (or of a group of them): an event on the comm stream.
struct WorkState {
  std::shared_ptr<CommCore> core;
  std::string op;
  cudaEvent_t event = nullptr;  // set when the operation (or its group) has been issued
  ~WorkState();
};

class Work {
 public:
  explicit Work(std::shared_ptr<WorkState> state) : state_(std::move(state)) {}
  // The stream waits on the GPU for the operation; the host does not block.
  void wait(std::uintptr_t stream) const;
  // The host waits, at most timeout_s (negative: the communicator's timeout); raises CommTimeout
  // (after aborting the communicator) or NcclError.
  void synchronize(double timeout_s) const;
  bool done() const;
  const std::string& op() const { return state_->op; }

 private:
  const WorkState& issued(const char* what) const;
  std::shared_ptr<WorkState> state_;
};

class Communicator {
 public:
  // A new NCCL unique id (128 bytes), made by one rank and shared with the others.
  static std::string new_unique_id();

  Communicator(const std::string& unique_id, int rank, int world, int device, double timeout_s);
  Communicator(std::shared_ptr<CommCore> core) : core_(std::move(core)) {}

  int rank() const { return core_->rank; }
  int world_size() const { return core_->world; }
  int device() const { return core_->device; }
  std::uintptr_t comm_stream() const { return reinterpret_cast<std::uintptr_t>(core_->stream); }

  // recv receives world x count elements: rank i's send at offset i x count.
  Work all_gather(std::uintptr_t send, std::uintptr_t recv, std::size_t count, int dtype, std::uintptr_t stream);
  // op: "sum", "prod", "max", "min", "avg".
  Work all_reduce(std::uintptr_t buf, std::size_t count, int dtype, const std::string& op, std::uintptr_t stream);
  // top_* with rank - 1, bottom_* with rank + 1; a zero count (or a missing neighbour) skips that side.
  Work halo_exchange(std::uintptr_t top_send, std::size_t top_send_count, std::uintptr_t bottom_send,
                     std::size_t bottom_send_count, std::uintptr_t top_recv, std::size_t top_recv_count,
                     std::uintptr_t bottom_recv, std::size_t bottom_recv_count, int dtype, std::uintptr_t stream);

  // Operations between group_start and group_end go out as one NCCL group launch; their Works
  // complete together. Groups do not nest.
  void group_start(std::uintptr_t stream);
  void group_end();
  bool in_group() const { return group_ != nullptr; }

  // Makes `stream` wait for everything issued so far (to join the comm stream back into a stream
  // being captured into a CUDA graph before the capture ends).
  void join(std::uintptr_t stream);

  // The ranks of equal color form a new communicator, ordered by key (ncclCommSplit; collective).
  Communicator split(int color, int key);

  bool aborted() const { return core_->aborted; }

 private:
  struct Group {
    std::vector<std::shared_ptr<WorkState>> works;  // completed by one event at group_end
  };

  void check_usable(const char* what) const;
  void check_dtype(int dtype, const char* what) const;
  // Order the comm stream after `stream` (outside a group; a group does it once at its start).
  void order_after(std::uintptr_t stream);
  Work finish(const std::string& op);

  std::shared_ptr<CommCore> core_;
  std::unique_ptr<Group> group_;
};

}  // namespace distripy
