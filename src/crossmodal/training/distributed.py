"""The ranks of a torch.distributed job on this machine: started as subprocesses, watched, and stopped together.

    from crossmodal.training.distributed import run_ranks
    run_ranks("crossmodal.training.finetune:finetune_rank", payload, 2, on_report=show)   # waits for both ranks
    # in every rank: finetune_rank(payload, rank) with rank.rank, rank.world_size, rank.device, rank.barrier() ...

Like ``torchrun``: each rank is a fresh interpreter (``subprocess``, not ``multiprocessing``, so a caller that is
itself a daemonic Dask worker may start them, and the caller's ``__main__`` is never imported again) with
MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE and LOCAL_RANK set; the process group is gloo on CPU and NCCL on CUDA
(``cuda:LOCAL_RANK``, one process per GPU). Each rank gets ``cores // world_size`` torch threads, imports this
crossmodal and uses the caller's ``sys.path``. The target is named ``"module:function"`` and the payload is JSON.

Rank 0 talks to the caller over a socket: :meth:`RankContext.report` hands the caller a message and waits until
``on_report`` has returned (so an exception there stops the job before it goes on), and its log records at INFO
and above (crossmodal's; WARNING and above from other libraries) are logged again in the caller.

Errors: a rank that fails makes the caller raise ``error`` (a UserError class) naming the rank, with the rank's
own message for a UserError and the last lines of its output otherwise; the other ranks are killed. So are all
ranks when the caller is interrupted (Ctrl-C, or an exception in ``on_report``), and a rank whose caller is gone
exits by itself.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossmodal.errors import TrainError, UserError
from crossmodal.hardware import usable_cores

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    import torch

# The other ranks wait at a barrier while rank 0 validates, writes a checkpoint and waits for the caller's
# on_report. A rank that dies is killed by the caller together with the others, so a long timeout never leaves a
# failed job hanging; a short one would fail a healthy job whose validation split is large.
COLLECTIVE_TIMEOUT = timedelta(hours=2)
USER_ERROR_EXIT = 2  # a rank's exit code after a UserError (1: anything else)
OUTPUT_LINES = 20  # lines of a failed rank's output quoted in the caller's error
POLL_SECONDS = 0.2


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (rank 0's rendezvous store binds it next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- in a rank
@dataclass
class RankContext:
    """What a rank knows of its job; ``report``, ``barrier`` and ``all_sum`` are collective only where stated."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    conn: Connection = field(repr=False)
    acks: queue.Queue = field(repr=False, default_factory=queue.Queue)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def send(self, message: dict[str, Any]) -> None:
        """A JSON message to the caller (no reply expected)."""
        self.conn.send_bytes(json.dumps(message).encode())

    def report(self, message: dict[str, Any]) -> None:
        """Rank 0 only: ``on_report(message)`` in the caller, waiting until it has returned."""
        self.send({"report": message})
        self.acks.get()

    def barrier(self) -> None:
        """Every rank: wait until all ranks are here."""
        import torch.distributed as dist

        dist.barrier(device_ids=[self.local_rank] if self.device.type == "cuda" else None)

    def all_sum(self, values: list[float]) -> list[float]:
        """Every rank: the element-wise sums of ``values`` over the ranks (float64)."""
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.cpu().tolist()


class _ToCaller(logging.Handler):
    """Rank 0's log records, sent to the caller, which logs them again under the same logger names."""

    def __init__(self, context: RankContext):
        super().__init__(logging.INFO)
        self.context = context

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING and not record.name.startswith("crossmodal"):
            return
        try:
            self.context.send({"log": [record.name, record.levelno, record.getMessage()]})
        except Exception:  # noqa: BLE001 - logging must never break the rank
            self.handleError(record)


def _listen(context: RankContext) -> None:
    """Acknowledgements from the caller go to ``context.acks``; when the caller is gone, the rank exits."""
    while True:
        try:
            context.conn.recv_bytes()
        except (EOFError, OSError):
            os._exit(3)  # no caller to report to: stop at once, wherever the main thread is
        context.acks.put(True)


def rank_main(fd: int) -> None:
    """The entry point of one rank (see :func:`run_ranks`): join the group, run the target, exit with its status."""
    import importlib
    import signal
    import traceback
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the caller, which stops every rank itself
    conn = Connection(fd)
    spec = json.loads(conn.recv_bytes())
    sys.path[:] = spec["sys_path"]

    import torch
    import torch.distributed as dist

    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    torch.set_num_threads(max(1, usable_cores() // world))  # the ranks share the cores
    device = torch.device("cuda", local) if spec["cuda"] else torch.device("cpu")
    context = RankContext(rank, world, local, device, conn)
    threading.Thread(target=_listen, args=(context,), daemon=True).start()
    stderr = logging.StreamHandler(sys.stderr)  # warnings stay in the output a failure quotes
    stderr.setLevel(logging.WARNING)
    stderr.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(stderr)
    if context.is_main:
        root.addHandler(_ToCaller(context))
        root.setLevel(logging.INFO)
    code = 0
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
        module, _, name = spec["target"].partition(":")
        getattr(importlib.import_module(module), name)(spec["payload"], context)
    except BaseException as err:  # noqa: BLE001 - every failure is the caller's to report
        user = isinstance(err, UserError)
        if user:
            print(f"{type(err).__name__}: {err}", file=sys.stderr)
        else:  # a bug: its traceback goes to the output the caller quotes
            traceback.print_exc()
        # When one rank fails, its peers fail next on the closed connection: the time tells the caller which
        # failure came first.
        context.send({"failed": {"at": time.time(), "error": str(err) if user else None}})
        code = USER_ERROR_EXIT if user else 1
    if code == 0:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # a failed rank leaves its peers to the caller rather than waiting on them in shutdown


# ---------------------------------------------------------------------------------------------- in the caller
@dataclass
class _Rank:
    rank: int
    proc: Any
    conn: Connection
    output: Path
    failed: dict | None = None  # what the rank said when it failed: {"at": time, "error": UserError message}
    open: bool = True


def _child_env(rank: int, world: int, port: int, threads: int) -> dict[str, str]:
    import crossmodal

    package_root = str(Path(crossmodal.__file__).resolve().parents[1])  # where this crossmodal is: import it
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
           "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    env.setdefault("OMP_NUM_THREADS", str(threads))  # numpy's BLAS too, not only torch: the ranks share the cores
    return env


def _tail(path: Path, lines: int = OUTPUT_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no output)"
    kept = [line for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join(kept) or "(no output)"


def _failure(ranks: list[_Rank], what: str, error: type[UserError]) -> UserError:
    """The error for the failed rank most likely to be the cause: one killed by a signal (out of memory, say),
    else the one that failed first (its peers fail after it, on the closed connection)."""
    failed = [r for r in ranks if r.proc.poll() not in (None, 0)]
    failed.sort(key=lambda r: (r.proc.returncode > 0, r.failed["at"] if r.failed else float("inf"), r.rank))
    r = failed[0]
    code = r.proc.returncode
    status = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    where = f"{what} rank {r.rank} of {len(ranks)}"
    if r.failed and r.failed["error"] is not None:
        return error(f"{where} failed: {r.failed['error']}")
    return error(f"{where} failed ({status}); the last lines of its output:\n{_tail(r.output)}")


def run_ranks(target: str, payload: dict[str, Any], world_size: int, *, cuda: bool = False,
              on_report: Callable[[dict], None] | None = None, error: type[UserError] = TrainError,
              what: str = "training") -> None:
    """Run ``target(payload, RankContext)`` in ``world_size`` ranks and wait for all of them (see the module).

    ``on_report(message)`` runs here for each :meth:`RankContext.report` of rank 0. A rank that fails raises
    ``error`` ("<what> rank r of N failed: ..."); every rank still running is then killed.
    """
    import subprocess
    import tempfile
    from multiprocessing.connection import Connection, wait

    threads = max(1, usable_cores() // world_size)
    spec = json.dumps({"target": target, "payload": payload, "sys_path": list(sys.path), "cuda": cuda}).encode()
    ranks: list[_Rank] = []
    with tempfile.TemporaryDirectory(prefix="crossmodal-ranks-") as tmp:
        port = free_port()
        try:
            for r in range(world_size):
                ours, theirs = socket.socketpair()
                output = Path(tmp) / f"rank{r}.log"
                with open(output, "wb") as out:  # the rank holds its own handle; ours can close
                    proc = subprocess.Popen(
                        [sys.executable, "-c", f"from crossmodal.training.distributed import rank_main; "
                                               f"rank_main({theirs.fileno()})"],
                        pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=out,
                        stderr=subprocess.STDOUT, env=_child_env(r, world_size, port, threads))
                theirs.close()
                rank = _Rank(r, proc, Connection(ours.detach()), output)
                ranks.append(rank)
                rank.conn.send_bytes(spec)
            _watch(ranks, on_report, what, error, wait)
        finally:
            for rank in ranks:
                if rank.proc.poll() is None:
                    rank.proc.kill()
                rank.proc.wait()
                rank.conn.close()


def _watch(ranks: list[_Rank], on_report, what: str, error: type[UserError], wait) -> None:
    """Serve rank 0's messages and the ranks' errors until every rank has exited 0 or one has failed."""
    while True:
        codes = [r.proc.poll() for r in ranks]  # before reading: whatever a rank sent before it exited is read now
        live = [r.conn for r in ranks if r.open]
        ready = wait(live, timeout=0 if all(c is not None for c in codes) else POLL_SECONDS) if live else []
        for rank in ranks:
            while rank.open and rank.conn in ready and rank.conn.poll():
                try:
                    message = json.loads(rank.conn.recv_bytes())
                except (EOFError, OSError):
                    rank.open = False
                    break
                _handle(rank, message, on_report)
        if any(c not in (None, 0) for c in codes):
            raise _failure(ranks, what, error)
        if all(c == 0 for c in codes) and not ready:
            return
        if not ready and not live:
            import time

            time.sleep(POLL_SECONDS)


def _handle(rank: _Rank, message: dict, on_report) -> None:
    if "log" in message:
        name, level, text = message["log"]
        logging.getLogger(name).log(level, "%s", text)
    elif "failed" in message:
        rank.failed = message["failed"]
    elif "report" in message:
        if on_report is not None:
            on_report(message["report"])
        rank.conn.send_bytes(b"go")
