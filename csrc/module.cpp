// distripy._C: the native communication runtime. Python sees only this module; the C++ behind it
// knows nothing of torch (buffers and streams cross the boundary as raw pointers and handles).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "communicator.h"
#include "error.h"
#include "runtime_info.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "distripy native runtime: CUDA/NCCL queries and the stream-managed NCCL communicator.";

  // Every error derives from distripy's own (distripy.errors): CommError is a RuntimeError,
  // CommTimeoutError a TimeoutError, InputError a ValueError. The default timeout has one source too.
  py::module_ errors = py::module_::import("distripy.errors");
  const double default_timeout_s = py::module_::import("distripy.config").attr("DEFAULT_TIMEOUT_S").cast<double>();
  py::register_exception<distripy::CudaError>(m, "CudaError", errors.attr("CommError"));
  py::register_exception<distripy::NcclError>(m, "NcclError", errors.attr("CommError"));
  py::register_exception<distripy::CommTimeout>(m, "CommTimeout", errors.attr("CommTimeoutError"));
  // Kept for the life of the process: the translator may run at any time after import.
  static py::handle input_error = py::object(errors.attr("InputError")).release();
  py::register_local_exception_translator([](std::exception_ptr thrown) {
    try {
      if (thrown) std::rethrow_exception(thrown);
    } catch (const std::invalid_argument& error) {
      PyErr_SetString(input_error.ptr(), error.what());
    }
  });

  using distripy::Communicator;
  using distripy::Work;
  const auto release = py::call_guard<py::gil_scoped_release>();

  py::class_<Work>(m, "Work", "Completion of an asynchronous operation (an event on the comm stream).")
      .def("wait", &Work::wait, py::arg("stream"), release,
           "Make `stream` (a raw cudaStream_t handle) wait for the operation on the GPU; no host block. "
           "The communicator's watchdog bounds the wait.")
      .def("synchronize", &Work::synchronize, py::arg("timeout_s") = -1.0, release,
           "Block the host until the operation completes; raise CommTimeout after timeout_s (negative: "
           "the communicator's timeout), aborting the communicator, or NcclError on an NCCL error.")
      .def("done", &Work::done, release, "Whether the operation has completed.")
      .def_property_readonly("captured", &Work::captured,
                             "Whether it was issued inside a CUDA-graph capture (then only that capture may wait).")
      .def_property_readonly("op", &Work::op);

  // Every call that touches CUDA or NCCL releases the GIL: a rank's other threads (a server's
  // event loop, the pipeline's prefetch) keep running while an operation is enqueued.
  py::class_<Communicator>(m, "Communicator",
                           "One NCCL communicator on one device, issuing on a comm stream its caller owns.")
      .def_static("new_unique_id", [] { return py::bytes(Communicator::new_unique_id()); },
                  "A new NCCL unique id (bytes); one rank makes it, every rank passes it to Communicator.")
      .def(py::init([](py::bytes unique_id, int rank, int world, int device, double timeout_s, std::uintptr_t stream) {
             std::string id = unique_id;
             py::gil_scoped_release no_gil;
             return std::make_unique<Communicator>(id, rank, world, device, timeout_s, stream);
           }),
           py::arg("unique_id"), py::arg("rank"), py::arg("world_size"), py::arg("device"),
           py::arg("timeout_s") = default_timeout_s, py::arg("stream") = 0)
      .def_property_readonly("rank", &Communicator::rank)
      .def_property_readonly("world_size", &Communicator::world_size)
      .def_property_readonly("device", &Communicator::device)
      .def_property_readonly("comm_stream", &Communicator::comm_stream)
      .def_property_readonly("aborted", &Communicator::aborted)
      .def_property_readonly("closed", &Communicator::closed)
      .def_property_readonly("abort_reason", &Communicator::abort_reason)
      .def_property_readonly("in_group", &Communicator::in_group)
      .def_property_readonly("watched", &Communicator::watched, "Events the watchdog still bounds.")
      .def("all_gather", &Communicator::all_gather, py::arg("send"), py::arg("recv"), py::arg("count"),
           py::arg("dtype"), py::arg("stream"), release)
      .def("all_reduce", &Communicator::all_reduce, py::arg("buf"), py::arg("count"), py::arg("dtype"),
           py::arg("op"), py::arg("stream"), release)
      .def("halo_exchange", &Communicator::halo_exchange, py::arg("top_send"), py::arg("top_send_count"),
           py::arg("bottom_send"), py::arg("bottom_send_count"), py::arg("top_recv"), py::arg("top_recv_count"),
           py::arg("bottom_recv"), py::arg("bottom_recv_count"), py::arg("dtype"), py::arg("stream"), release)
      .def("shift", &Communicator::shift, py::arg("send"), py::arg("recv"), py::arg("count"), py::arg("distance"),
           py::arg("dtype"), py::arg("stream"), release,
           "send to rank (rank + distance) % world, recv from rank (rank - distance) % world.")
      .def("group_start", &Communicator::group_start, py::arg("stream"), release)
      .def("group_end", &Communicator::group_end, release)
      .def("join", &Communicator::join, py::arg("stream"), release)
      .def("watch", &Communicator::watch, py::arg("stream"), py::arg("what"), release,
           "A mark on `stream` the watchdog aborts the communicator for if it is not reached in time.")
      .def("split", &Communicator::split, py::arg("color"), py::arg("key"), py::arg("stream"), release,
           "The ranks of equal color form a new communicator, ordered by key (ncclCommSplit; collective).")
      .def("close", &Communicator::close, py::arg("timeout_s") = -1.0, release,
           "Wait for the operations and destroy the communicator, bounded by timeout_s; later calls raise.");

  m.def("nccl_version", &distripy::nccl_version,
        "Version of the NCCL library loaded at run time, as (major, minor, patch).");
  m.def("cuda_runtime_version", &distripy::cuda_runtime_version,
        "Version of the CUDA runtime linked into distripy._C, as (major, minor).");
  m.def("cuda_driver_version", &distripy::cuda_driver_version,
        "Highest CUDA version the installed driver supports, as (major, minor); (0, 0) without a driver.");
  m.def("device_count", &distripy::device_count,
        "Number of visible CUDA devices; 0 without a GPU or driver. Raises CudaError if a driver is "
        "present but cannot serve this runtime.");
  m.def("build_info", &distripy::build_info,
        "How distripy._C was built: CUDA runtime and NCCL versions and where they were found.");
}
