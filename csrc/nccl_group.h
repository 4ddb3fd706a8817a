// NcclGroup: an NCCL group (ncclGroupStart ... ncclGroupEnd) closed on every path.
//
// NCCL's group depth is thread-local and shared with every other NCCL user of the thread (torch's
// NCCL backend included). A group left open by an exception queues every later NCCL call of the
// thread until a matching ncclGroupEnd that never comes: a silent hang. The guard ends the group in
// its destructor when end() was not reached. Header-only and free of distripy's error types so
// that tests can compile it against a stub nccl.h.
#pragma once

#include <nccl.h>

namespace distripy {

class NcclGroup {
 public:
  // Opens the group; `started` is ncclGroupStart's result (the group is open only on success).
  NcclGroup() : started_(ncclGroupStart()), open_(started_ == ncclSuccess) {}
  NcclGroup(const NcclGroup&) = delete;
  NcclGroup& operator=(const NcclGroup&) = delete;
  ~NcclGroup() {
    if (open_) ncclGroupEnd();  // an exception left the group open: close it, ignore the result
  }

  ncclResult_t started() const { return started_; }

  // Ends the group once and returns ncclGroupEnd's result (ncclInProgress on a non-blocking
  // communicator); the destructor then does nothing.
  ncclResult_t end() {
    open_ = false;
    return ncclGroupEnd();
  }

 private:
  ncclResult_t started_;
  bool open_;
};

}  // namespace distripy
