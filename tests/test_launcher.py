"""``runtime.distributed.launch_local``, distripy's one launcher of local ranks (``distripy
generate --nproc``, the demo's worlds, the Engine's ranks), run as the Engine runs it: its command
(``launcher_command``) in a process of its own.

Without a GPU (here), ranks of a module or a script fork from a server that imported the preload
once; anything else (``-c``) starts fresh interpreters under torch's elastic launcher (what every
rank does on a GPU machine). Either way each rank gets torchrun's variables, meets the others
(a gloo all-reduce), runs as ``__main__`` with its arguments, and a failure reports every failed
rank's exit status: the first failure gives the others a grace period, then SIGTERM, then SIGKILL,
so a hung rank cannot hang the launcher.
"""

import os
import signal
import subprocess
import sys

import pytest
import torch

from distripy.errors import LaunchError, RanksFailedError
from distripy.runtime.distributed import launcher_command

RANK_CODE = """
import os, pathlib, sys
import torch, torch.distributed as dist
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo")
total = torch.tensor([rank + 1.0])
dist.all_reduce(total)
name = pathlib.Path("/proc/self/comm").read_text().strip() if sys.platform.startswith("linux") else ""
pathlib.Path(sys.argv[1], f"rank{rank}").write_text(" ".join(map(str, [
    world, int(total.item()), os.environ["LOCAL_RANK"], name, __name__, torch.get_num_threads(), *sys.argv[2:]
])))
dist.destroy_process_group()
"""

FAILING_CODE = """
import os, signal, time
import torch.distributed as dist
rank = int(os.environ["RANK"])
dist.init_process_group("gloo")
dist.barrier()  # every rank is up
if rank == 1:
    raise ValueError("rank 1 fails on purpose")
if rank == 2:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL ends this one
while True:
    time.sleep(1)
"""

FORKS = not torch.cuda.is_available()


def _launch(world, arguments, tmp_path, preload=("torch", "torch.distributed"), threads="1"):
    environment = dict(os.environ, OMP_NUM_THREADS=threads, PYTHONPATH=str(tmp_path))
    return subprocess.run(
        launcher_command(world, arguments, preload),
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
    )


@pytest.mark.parametrize("form", ["script", "module", "preloaded module"])
def test_every_rank_runs_as_main_with_torchruns_variables_and_meets_the_others(form, tmp_path):
    """``preloaded module``: a package's module the server imported (as ``distripy.cli`` is for
    the command's ranks) runs again as ``__main__``, as ``python -m`` runs it, without runpy's
    warning about finding it imported."""
    (tmp_path / "rank_program.py").write_text(RANK_CODE)
    (tmp_path / "rank_package").mkdir()
    (tmp_path / "rank_package" / "__init__.py").write_text("")
    guarded = "\n".join("    " + line for line in RANK_CODE.splitlines())
    (tmp_path / "rank_package" / "program.py").write_text(f"if __name__ == '__main__':\n{guarded}\n")
    out = tmp_path / "out"
    out.mkdir()
    program, preload = {
        "script": ([str(tmp_path / "rank_program.py")], ()),
        "module": (["-m", "rank_program"], ()),
        "preloaded module": (["-m", "rank_package.program"], ("rank_package.program",)),
    }[form]
    result = _launch(
        3, [*program, str(out), "first", "second"], tmp_path, ("torch", "torch.distributed", *preload), threads="2"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RuntimeWarning" not in result.stderr, result.stderr[-3000:]
    for rank in range(3):
        world, total, local_rank, name, module, threads, *rest = (out / f"rank{rank}").read_text().split(" ")
        assert (world, total, local_rank, module, rest) == ("3", "6", str(rank), "__main__", ["first", "second"])
        assert threads == "2"  # OMP_NUM_THREADS, also in a process forked after torch was imported
        if FORKS and sys.platform.startswith("linux"):
            assert name == f"distripy-rank{rank}"


def test_fresh_interpreters_for_code_that_is_neither_module_nor_script(tmp_path):
    """``-c CODE``: torch's elastic launcher, as on a GPU machine; the same contract."""
    out = tmp_path / "out"
    out.mkdir()
    result = _launch(2, ["-c", RANK_CODE, str(out), "only"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        world, total, local_rank, name, module, _, *rest = (out / f"rank{rank}").read_text().split(" ")
        assert (world, total, local_rank, module, rest) == ("2", "3", str(rank), "__main__", ["only"])
        assert not name.startswith("distripy-rank")


@pytest.mark.skipif(not FORKS, reason="the forked ranks' failure handling; with a GPU ranks are interpreters")
def test_a_failed_rank_is_reported_with_every_other_ranks_status_and_no_rank_outlives_it(tmp_path):
    """Rank 1 raises; ranks 0 and 2 would wait forever (2 ignores SIGTERM). The launcher prints
    rank 1's traceback, waits the grace period, then stops rank 0 with SIGTERM and rank 2 with
    SIGKILL, and reports all three."""
    (tmp_path / "failing.py").write_text(FAILING_CODE)
    result = _launch(3, [str(tmp_path / "failing.py")], tmp_path)
    assert result.returncode == 1
    assert "ValueError: rank 1 fails on purpose" in result.stderr and "Traceback" in result.stderr
    expected = f"rank 0: exit {-signal.SIGTERM}; rank 1: exit 1; rank 2: exit {-signal.SIGKILL}"
    assert f"distripy launcher: {expected}" in result.stderr, result.stderr[-3000:]


def test_ranks_failed_error_names_every_failed_rank_in_order():
    error = RanksFailedError({2: -9, 0: 2})
    assert isinstance(error, LaunchError) and isinstance(error, RuntimeError)
    assert error.exit_codes == {0: 2, 2: -9} and list(error.exit_codes) == [0, 2]
    assert str(error) == "rank 0: exit 2; rank 2: exit -9"
