"""The supervision of an ``Engine``'s rank processes: starting them, the link to rank 0, noticing
that they failed, and stopping every one of them.

* ``LaunchedRanks``: N rank processes started with torch's elastic launcher
  (``runtime.distributed.launch_local``, in a process of its own), each running
  ``serving.worker``; rank 0 connects back to the engine over a local authenticated connection.
  Their process ids are known from ``Ready``, the launcher's children are found besides, and
  ``stop`` kills them all and waits (bounded).
* ``GroupRanks``: the ranks torchrun started, this process being rank 0: rank 0's loop runs on a
  thread here, linked in-process (``LocalLink``); the others cannot be stopped or restarted from
  here.

Both wait for everything with a deadline: the start (``Setup`` answered by ``Ready``) and each
reply, which ``receive`` returns (the ``Progress`` messages before it go to a callback). A
connection that closes, a launcher that exits or a deadline that passes is an ``EngineError``
(``EngineTimeoutError`` for the deadline) carrying the end of the ranks' log.
"""

import os
import queue
import secrets
import signal
import subprocess
import tempfile
import threading
import time
from multiprocessing.connection import Listener
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from distripy.application import RANK_MODULES
from distripy.errors import EngineError, EngineTimeoutError
from distripy.runtime.distributed import launcher_command
from distripy.geometry import BandGeometry
from distripy.serving.messages import (
    ADDRESS_VARIABLE,
    AUTHKEY_VARIABLE,
    START_TIMEOUT_VARIABLE,
    Close,
    Failure,
    Progress,
    Ready,
    Setup,
)

__all__ = ["GroupRanks", "LaunchedRanks", "LocalLink", "descendants", "kill", "running"]

POLL_S = 0.05
STOP_GRACE_S = 5.0


def descendants(pid: int) -> List[int]:
    """Every process below ``pid`` (Linux: read from /proc)."""
    children: Dict[int, List[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not ended (a zombie has)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def kill(pids: Sequence[int], wait_s: float = STOP_GRACE_S) -> None:
    """SIGKILL each process (and its process group) and wait, bounded, until they have ended."""
    for pid in pids:
        for send in (os.killpg, os.kill):  # a rank leads its own session (torch's launcher)
            try:
                send(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + wait_s
    while any(running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.01)


class LocalLink:
    """One end of an in-process connection (``send``, ``recv``, ``poll``, ``close``, as
    ``multiprocessing.connection``'s): between an engine and rank 0's loop when rank 0 is this
    very process (``GroupRanks``)."""

    def __init__(self, inbox: "queue.Queue", outbox: "queue.Queue") -> None:
        self._inbox, self._outbox = inbox, outbox
        self._held: List[Any] = []
        self.closed = False

    @classmethod
    def pair(cls) -> Tuple["LocalLink", "LocalLink"]:
        one, two = queue.Queue(), queue.Queue()
        return cls(one, two), cls(two, one)

    def send(self, message: Any) -> None:
        if self.closed:
            raise EngineError("the link to rank 0 is closed")
        self._outbox.put(message)

    def poll(self, timeout: float = 0.0) -> bool:
        if not self._held:
            try:
                self._held.append(self._inbox.get(timeout=max(0.0, timeout)))
            except queue.Empty:
                return False
        return True

    def recv(self) -> Any:
        if self._held:
            return self._held.pop()
        return self._inbox.get()

    def close(self) -> None:
        self.closed = True


class LaunchedRanks:
    """One start of the rank processes: the launcher, the connection to rank 0, the ranks' ids and
    the model's geometry (from ``Ready``)."""

    restartable = True

    def __init__(self, nproc: int, setup: Setup, devices, timeout_s: float) -> None:
        self.log = tempfile.TemporaryFile(mode="w+b")
        key = secrets.token_bytes(32)
        self.listener = Listener(("127.0.0.1", 0), authkey=key)
        host, port = self.listener.address
        env = dict(os.environ)
        env.update({ADDRESS_VARIABLE: f"{host}:{port}", AUTHKEY_VARIABLE: key.hex()})
        env[START_TIMEOUT_VARIABLE] = repr(float(timeout_s))
        if devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(device) for device in devices)
        # distripy's one launcher (``launch_local``, as ``distripy generate --nproc``), in a process
        # of its own that ``stop`` can end with every rank
        command = launcher_command(nproc, ["-m", "distripy.serving.worker"], preload=RANK_MODULES)
        self.launcher = subprocess.Popen(
            command, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.pids: List[int] = []
        self.connection = None
        deadline = time.monotonic() + timeout_s
        try:
            self.connection = self._accept(deadline)
            self.geometry = self.start(setup, deadline)
        except BaseException:
            self.stop()
            raise

    def start(self, setup: Setup, deadline: float) -> BandGeometry:
        """Send the setup and wait for ``Ready``; its geometry."""
        self.connection.send(setup)
        reply = self.receive(deadline, "start")
        if isinstance(reply, Failure):
            error = reply.exception()
            raise EngineError(f"the ranks did not start: {type(error).__name__}: {error}") from error
        if not isinstance(reply, Ready):
            raise EngineError(f"the ranks did not start: they answered {reply!r}")
        self.pids = list(reply.pids)
        return reply.geometry

    def _accept(self, deadline: float):
        accepted: List[Any] = []
        thread = threading.Thread(target=lambda: accepted.append(self.listener.accept()), daemon=True)
        thread.start()
        while thread.is_alive() and time.monotonic() < deadline and self.launcher.poll() is None:
            thread.join(POLL_S)
        if not accepted:
            raise self.failure("start", timed_out=self.launcher.poll() is None)
        return accepted[0]

    def log_tail(self, lines: int = 12) -> str:
        self.log.flush()
        self.log.seek(0)
        text = self.log.read().decode(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])

    def failure(self, what: str, timed_out: bool) -> EngineError:
        status = self.launcher.poll()
        state = "still running" if status is None else f"exit status {status}"
        kind = EngineTimeoutError if timed_out else EngineError
        reason = "did not finish in time" if timed_out else "failed"
        return kind(f"the engine's {what} {reason} (rank launcher {state}); its log ends:\n{self.log_tail()}")

    @property
    def alive(self) -> bool:
        """Whether the ranks run (their launcher, or rank 0's loop, has not ended)."""
        return self.launcher.poll() is None

    def receive(self, deadline: float, what: str, on_progress: Optional[Callable] = None) -> Any:
        """The next message from rank 0 that is not a ``Progress`` (those go to
        ``on_progress(step, total)``), by ``deadline``."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self.failure(what, timed_out=True)
            try:
                ready = self.connection.poll(min(POLL_S * 4, remaining))
                message = self.connection.recv() if ready else None
            except (EOFError, OSError):
                raise self.failure(what, timed_out=False) from None
            except Exception as error:  # noqa: BLE001 - a message that cannot be read (unpickled)
                raise EngineError(
                    f"the engine's {what}: a message from rank 0 cannot be read ({error!r})"
                ) from error
            if message is None:
                if not self.alive:
                    raise self.failure(what, timed_out=False)
                continue
            if isinstance(message, Progress):
                if on_progress is not None:
                    on_progress(message.step, message.total)
                continue
            return message

    def send(self, message: Any) -> None:
        self.connection.send(message)

    def close(self, timeout_s: float) -> None:
        """Ask the ranks to finish, then stop whatever is left."""
        try:
            if self.connection is not None and self.alive:
                self.connection.send(Close())
                self.launcher.wait(timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.stop()

    def stop(self) -> None:
        """Kill every rank process and the launcher, and wait for the launcher."""
        if self.launcher.poll() is None:
            kill(self.pids + descendants(self.launcher.pid))
            kill([self.launcher.pid])
        try:
            self.launcher.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        kill(self.pids)  # ranks left by a launcher that had already exited
        for closable in (self.connection, self.listener, self.log):
            try:
                if closable is not None:
                    closable.close()
            except OSError:
                pass


class GroupRanks(LaunchedRanks):
    """The ranks torchrun started, this process being rank 0 (``Engine.of_torchrun_group``): rank
    0's loop runs on a thread here, linked to the engine in-process; the others run
    ``serving.worker``'s loop in their own processes, on this node or others. They cannot be
    restarted from here: after a failure the engine is broken, and the process should exit
    non-zero so that torchrun (``--max-restarts``) restarts the whole group."""

    restartable = False

    def __init__(self, nproc: int, setup: Setup, devices, timeout_s: float) -> None:
        from distripy.serving.worker import serve

        self.connection, rank_side = LocalLink.pair()
        self.error: Optional[BaseException] = None

        def run() -> None:
            try:
                serve(rank_side, 0, start_timeout_s=timeout_s)
            except BaseException as error:  # noqa: BLE001 - reported through failure()
                self.error = error

        self.thread = threading.Thread(target=run, name="distripy-rank-0", daemon=True)
        self.thread.start()
        self.launcher = self  # ``poll()``: None while rank 0's loop runs, as a launcher's
        self.pids = []
        self.geometry = self.start(setup, time.monotonic() + timeout_s)

    def poll(self) -> Optional[int]:
        return None if self.thread.is_alive() else 1

    def log_tail(self, lines: int = 12) -> str:
        return repr(self.error) if self.error is not None else "(rank 0's loop ended)"

    def close(self, timeout_s: float) -> None:
        if self.thread.is_alive():
            self.connection.send(Close())
            self.thread.join(timeout_s)

    def stop(self) -> None:
        """Nothing can be killed from here: the link closes, the thread is left to its fate."""
        self.connection.close()
