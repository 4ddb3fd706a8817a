// Communicator: one NCCL communicator, bound to one device, issuing on a comm stream the caller owns
// (torch's, so that the caching allocator's record_stream handles stay valid: this code never
// destroys it). Every operation is ordered after the caller's stream (an event recorded there,
// waited on by the comm stream), runs on the comm stream and returns a Work that holds the event
// recorded after it. Nothing here blocks the host except Work::synchronize, close, and the polls
// that a non-blocking NCCL communicator needs while an operation is being enqueued (bounded by the
// timeout). Buffers are (device pointer, element count, NCCL data type); streams raw handles.
//
// A watchdog thread per communicator bounds what the host cannot: GPU-side waits. It polls
// ncclCommGetAsyncError and the events of operations issued outside CUDA-graph capture (and of
// marks placed with watch()), and aborts the communicator when an error appears or an event is not
// complete by its deadline, so that kernels stuck on a dead peer end and every later call raises.
// Abort, destroy and the watchdog's own waits are bounded: none can hang the process, at exit
// either (NCCL's destroy and abort block until every CUDA graph holding the communicator's work is
// destroyed; if that does not happen in time the communicator is left to the process's exit).
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace distripy {

// Raised when an operation did not complete within its timeout (the communicator is aborted).
class CommTimeout : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A CUDA event (timing disabled), destroyed with its last owner.
class Event {
 public:
  Event();
  ~Event();
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  cudaEvent_t get() const { return event_; }

 private:
  cudaEvent_t event_ = nullptr;
};

struct CommCore;

// The watchdog of one communicator: a thread polling its asynchronous error and watched events.
class Watchdog {
 public:
  explicit Watchdog(CommCore* core);
  ~Watchdog();  // stops and joins the thread
  // Abort the communicator unless `event` completes within `timeout_s` (what names it).
  void watch(std::shared_ptr<Event> event, double timeout_s, std::string what);
  void stop();
  std::size_t pending() const;

 private:
  struct Entry {
    std::shared_ptr<Event> event;
    std::chrono::steady_clock::time_point deadline;
    std::string what;
  };
  void run();

  CommCore* core_;
  mutable std::mutex mutex_;
  std::condition_variable wake_;
  std::vector<Entry> entries_;
  bool stopping_ = false;
  std::thread thread_;
};

// The NCCL communicator and its comm stream, shared by the Communicator and its Works.
struct CommCore {
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;  // owned by the caller (torch), never destroyed here
  int device = -1;
  int rank = -1;
  int world = 0;
  double timeout_s = 300.0;
  std::atomic<bool> aborted{false};
  std::atomic<bool> closed{false};
  // Held while a call uses `comm` (issue, poll, abort, destroy): abort frees the communicator.
  std::timed_mutex comm_mutex;
  std::mutex reason_mutex;
  std::string abort_reason;
  std::unique_ptr<Event> ordering;  // recorded on the caller's stream, waited on by the comm stream
  std::unique_ptr<Watchdog> watchdog;

  // Wait (polling, bounded by the timeout) until a non-blocking communicator has finished the call
  // in progress; raise on an asynchronous NCCL error. `what` names the call in messages. The
  // caller holds comm_mutex.
  void settle(const char* what);
  // Poll for an asynchronous NCCL error; abort the communicator and raise if there is one. The
  // caller holds comm_mutex.
  void check_async(const char* what);
  // Abort the communicator (the caller holds comm_mutex), bounded: ncclCommAbort runs on its own
  // thread and is given up on (the communicator leaked) if it does not return in time.
  void abort_locked(const std::string& reason) noexcept;
  // Wait for every operation, destroy the communicator and stop the watchdog, bounded by
  // `timeout_s`; idempotent. Aborts instead when the communicator was aborted.
  void close(double timeout_s) noexcept;
  std::string reason();
  ~CommCore();
};

// Completion of one operation (or of a group of them): an event on the comm stream.
struct WorkState {
  std::shared_ptr<CommCore> core;
  std::string op;
  std::shared_ptr<Event> event;  // set when the operation (or its group) has been issued
  bool captured = false;         // recorded inside a CUDA-graph capture: a node of the graph
};

class Work {
 public:
  explicit Work(std::shared_ptr<WorkState> state) : state_(std::move(state)) {}
  // The stream waits on the GPU for the operation; the host does not block. The watchdog bounds
  // the wait. A Work recorded inside a capture can be waited for only inside that capture.
  void wait(std::uintptr_t stream) const;
  // The host waits, at most timeout_s (negative: the communicator's timeout); raises CommTimeout
  // (after aborting the communicator) or NcclError.
  void synchronize(double timeout_s) const;
  bool done() const;
  bool captured() const { return state_->captured; }
  const std::string& op() const { return state_->op; }

 private:
  const WorkState& issued(const char* what) const;
  std::shared_ptr<WorkState> state_;
};

class Communicator {
 public:
  // A new NCCL unique id (128 bytes), made by one rank and shared with the others.
  static std::string new_unique_id();

  // `stream`: the comm stream (a non-blocking cudaStream_t of `device` that outlives this object).
  Communicator(const std::string& unique_id, int rank, int world, int device, double timeout_s,
               std::uintptr_t stream);
  explicit Communicator(std::shared_ptr<CommCore> core) : core_(std::move(core)) {}

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

  // The ring shift: send goes to rank (rank + distance) % world, recv receives from rank
  // (rank - distance) % world; 0 < distance < world, the same on every rank.
  Work shift(std::uintptr_t send, std::uintptr_t recv, std::size_t count, int distance, int dtype,
             std::uintptr_t stream);

  // Operations between group_start and group_end go out as one NCCL group launch; their Works
  // complete together. Groups do not nest.
  void group_start(std::uintptr_t stream);
  void group_end();
  bool in_group() const { return group_ != nullptr; }

  // Makes `stream` wait for everything issued so far (to join the comm stream back into a stream
  // being captured into a CUDA graph before the capture ends). During a capture only a comm stream
  // that joined the same capture (it did work in it) is joined; otherwise there is nothing to join,
  // and waiting on an event from outside the capture would invalidate it.
  void join(std::uintptr_t stream);

  // A mark on `stream` the watchdog bounds by the timeout (e.g. after a CUDA-graph replay, whose
  // transfers are not watched one by one). Returns its Work.
  Work watch(std::uintptr_t stream, const std::string& what);

  // The ranks of equal color form a new communicator, ordered by key (ncclCommSplit; collective),
  // issuing on `stream`.
  Communicator split(int color, int key, std::uintptr_t stream);

  // Wait for this communicator's operations and destroy it, bounded by timeout_s (negative: the
  // communicator's timeout). Later calls raise.
  void close(double timeout_s);

  bool aborted() const { return core_->aborted.load(); }
  bool closed() const { return core_->closed.load(); }
  std::string abort_reason() const { return core_->reason(); }
  std::size_t watched() const { return core_->watchdog ? core_->watchdog->pending() : 0; }

 private:
  struct Group {
    std::vector<std::shared_ptr<WorkState>> works;  // completed by one event at group_end
    std::unique_lock<std::timed_mutex> lock;        // comm_mutex, held from group_start to group_end
    bool captured = false;
  };

  std::unique_lock<std::timed_mutex> lock_comm(const char* what) const;
  void check_usable(const char* what) const;
  void check_dtype(int dtype, const char* what) const;
  // Order the comm stream after `stream` (outside a group; a group does it once at its start).
  void order_after(std::uintptr_t stream);
  bool comm_stream_capturing() const;
  // Record the completion event of `states` (one shared event) and hand it to the watchdog.
  void complete(const std::vector<std::shared_ptr<WorkState>>& states, bool captured);
  Work finish(const std::string& op);

  std::shared_ptr<CommCore> core_;
  std::unique_ptr<Group> group_;
};

}  // namespace distripy
