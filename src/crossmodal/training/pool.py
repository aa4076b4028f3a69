"""Run independent training tasks on several cores: the calling process and worker processes, one torch thread each.

    from crossmodal.training.pool import plan_workers, run_tasks
    lanes = plan_workers("auto", work_seconds, len(tasks), data_bytes)     # or an int, as train.workers
    results = run_tasks(tasks, run, data, context, lanes, load=(load, load_args), cost=cost)
    results[task]        # run(task, data, context) for every task; in a worker, data is load(*load_args)

Processes, not threads: a head's training loop runs on one torch thread (``crossmodal.training.loop.torch_threads``),
and threads in one process would queue on the interpreter lock. The tasks wait in one queue, costliest first (a
long task started last would leave the other cores idle); the calling process works on the first task at once
while the ``lanes - 1`` workers start, each a fresh interpreter (:class:`Worker`) that reads its data once through
``load``. Every task seeds itself, so its result is the same to the bit whichever process runs it.

Errors: a task that raises in a worker raises the same exception type with the same message here (a
``crossmodal.errors.UserError`` without the worker's traceback; any other error with it as its cause). A worker
that dies (killed, out of memory) raises TrainError naming the task. After the first failure no new task starts;
the running ones finish, then the error of the first failed task in queue order is raised. On Windows (no socket
inheritance) everything runs in the calling process.
"""

from __future__ import annotations

import os
import pickle
import threading
import traceback
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path

from crossmodal.errors import TrainError, UserError
from crossmodal.hardware import usable_cores

# "auto" adds workers when the tasks should take at least this long in one process (a lower bound, from the
# caller's estimate): below it, starting a worker (a fresh interpreter that imports torch and reads the features)
# costs more than it saves.
PARALLEL_MIN_SECONDS = 2.0
# Each worker holds its own copy of the features; "auto" keeps all copies within this share of the free memory.
MEMORY_SHARE = 0.5

_WORKER_CACHE: dict = {}  # in a worker process: the data loaded for the current ``load`` (one entry)


class RemoteTraceback(Exception):
    """The traceback of an error raised in a worker process (attached as the ``__cause__`` of that error)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def available_memory() -> int | None:
    """Bytes of memory available (``MemAvailable`` on Linux); None where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def plan_workers(setting: int | str, work_seconds: float, n_tasks: int, data_bytes: int) -> int:
    """How many processes train at once (the calling one included): ``train.workers``, or for "auto" one per
    usable core when the work is expected to take PARALLEL_MIN_SECONDS or more in one process, within
    MEMORY_SHARE of the free memory; never more than there are tasks (and 1 on Windows)."""
    if n_tasks <= 1 or os.name == "nt":
        return 1
    if setting != "auto":
        return max(1, min(int(setting), n_tasks))
    if work_seconds < PARALLEL_MIN_SECONDS:
        return 1
    lanes = min(usable_cores(), n_tasks)
    free = available_memory()
    if free is not None and data_bytes > 0:
        lanes = min(lanes, 1 + int(free * MEMORY_SHARE // data_bytes))
    return max(1, lanes)


def run_tasks(tasks: Sequence[Hashable], run: Callable, data, context, lanes: int,
              load: tuple[Callable, tuple] | None = None, cost: Callable | None = None) -> dict:
    """``{task: run(task, data, context)}`` for every task, on ``lanes`` processes (see the module docstring).

    ``run`` and ``load[0]`` must be module-level functions (workers import them by name); ``load[0](*load[1])``
    returns a worker's ``data``; ``context`` is pickled to the workers, keep it small. ``cost(task)`` orders
    the queue (costliest first); without it the tasks run in the given order.
    """
    order = sorted(tasks, key=cost, reverse=True) if cost is not None else list(tasks)
    if lanes <= 1 or len(order) <= 1 or load is None:
        return {task: run(task, data, context) for task in order}

    queue, lock, stop = deque(order), threading.Lock(), threading.Event()
    results: dict = {}
    failures: dict = {}  # task -> (exception, worker traceback text or None)

    def next_task():
        with lock:
            return None if stop.is_set() or not queue else queue.popleft()

    def fail(task, err, remote_tb=None):
        with lock:
            failures[task] = (err, remote_tb)
        stop.set()

    def remote_lane(worker: Worker):
        while (task := next_task()) is not None:
            try:
                status, payload, remote_tb = worker.call(run, load, context, task)
            except WorkerDied as err:
                fail(task, _worker_died(task, err))
                return
            except BaseException as err:  # noqa: BLE001 - e.g. a task that cannot be pickled: raised by the caller
                fail(task, err)
                return
            if status == "ok":
                results[task] = payload
            else:
                fail(task, payload, remote_tb)

    workers = [Worker() for _ in range(lanes - 1)]
    threads = [threading.Thread(target=remote_lane, args=(w,), name=f"crossmodal-train-lane-{i + 1}", daemon=True)
               for i, w in enumerate(workers)]
    try:
        task = next_task()  # the costliest task is this process's: a worker needs a moment to start
        for thread in threads:
            thread.start()
        while task is not None:
            try:
                results[task] = run(task, data, context)
            except Exception as err:
                fail(task, err)
            task = next_task()
        for thread in threads:
            thread.join()
    finally:  # normally the workers are idle here; after a KeyboardInterrupt they are stopped at once
        stop.set()
        for worker in workers:
            worker.close()
    if failures:
        task = next(t for t in order if t in failures)
        err, remote_tb = failures[task]
        _raise(err, remote_tb)
    return results


# ---------------------------------------------------------------- worker processes


class WorkerDied(Exception):
    """The worker process ended (killed, out of memory, crashed) before answering."""


class Worker:
    """One worker process, started when first called: a fresh interpreter running :func:`worker_main`, with a
    socket to this process. Not multiprocessing's spawn, which would also import the caller's ``__main__`` script
    in the worker (a script without an ``if __name__ == "__main__"`` guard would start training again there; a
    flow file would import all of Prefect for nothing). Messages are pickled: functions travel by name, arrays
    and tensors by value. The worker imports this crossmodal and uses this process's ``sys.path``.
    """

    def __init__(self):
        self._proc = self._conn = None
        self._lock = threading.Lock()

    def _start(self):
        import socket
        import subprocess
        import sys
        from multiprocessing.connection import Connection

        import crossmodal

        ours, theirs = socket.socketpair()
        package_root = str(Path(crossmodal.__file__).resolve().parents[1])  # where this crossmodal is: import it
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        code = f"from crossmodal.training.pool import worker_main; worker_main({theirs.fileno()})"
        self._proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(theirs.fileno(),),
                                      stdin=subprocess.DEVNULL, env=env)
        theirs.close()
        self._conn = Connection(ours.detach())
        self._send(list(sys.path))

    def _send(self, obj):
        self._conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))

    def call(self, run: Callable, load: tuple, context, task):
        """(status, result or exception, worker traceback or None) of ``run(task, data, context)`` in the worker."""
        with self._lock:
            try:
                if self._proc is None:
                    self._start()
                self._send((run, load, context, task))
                return pickle.loads(self._conn.recv_bytes())
            except (EOFError, OSError) as err:
                raise WorkerDied(f"{self._exit_status()}; {type(err).__name__}: {err}") from None

    def _exit_status(self) -> str:
        import subprocess

        if self._proc is None:
            return "it did not start"
        try:
            code = self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            return "it stopped answering and was killed"
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"

    def close(self, timeout: float = 10.0):
        """Ask the worker to exit; a worker still busy (after a KeyboardInterrupt here) is killed."""
        proc, conn = self._proc, self._conn
        if proc is None:
            return
        try:
            if not self._lock.acquire(timeout=0.1):  # a task is running: do not wait for it
                proc.kill()
            else:
                try:
                    self._send(None)
                finally:
                    self._lock.release()
            proc.wait(timeout=timeout)
        except Exception:  # noqa: BLE001 - already gone, or stuck: make sure it ends
            proc.kill()
            proc.wait()
        finally:
            conn.close()


def worker_main(fd: int) -> None:
    """A worker process's loop (see Worker): answer each task until told to stop or the caller is gone."""
    import signal
    import sys
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the caller, which stops the workers itself
    conn = Connection(fd)
    sys.path[:] = pickle.loads(conn.recv_bytes())
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):  # the caller is gone
            return
        reply = _answer(message)
        if reply is None:
            return
        try:
            conn.send_bytes(reply)
        except OSError:  # the caller is gone
            return


def _answer(message: bytes) -> bytes | None:
    """The pickled reply to one pickled message; None for the message that says stop."""
    try:
        message = pickle.loads(message)  # imports the task's function: may fail like the task itself
        if message is None:
            return None
        run, load, context, task = message
        key = pickle.dumps(load)
        if key not in _WORKER_CACHE:
            _WORKER_CACHE.clear()  # one data set per worker at a time
            _WORKER_CACHE[key] = load[0](*load[1])
        reply = ("ok", run(task, _WORKER_CACHE[key], context), None)
    except BaseException as err:  # noqa: BLE001 - everything goes back to the caller, which raises it
        reply = ("error", _portable(err), "".join(traceback.format_exception(type(err), err, err.__traceback__)))
    try:
        return pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as err:  # noqa: BLE001 - a result that cannot be pickled is a bug: say so there
        return pickle.dumps(("error", RuntimeError(f"the result of a task cannot be sent back: {err}"), None),
                            protocol=pickle.HIGHEST_PROTOCOL)


def _portable(err: BaseException) -> BaseException:
    """``err`` if it survives pickling as itself, else a RuntimeError carrying its type and message."""
    try:
        clone = pickle.loads(pickle.dumps(err))
        if type(clone) is type(err) and str(clone) == str(err):
            return err
    except Exception:  # noqa: BLE001 - an exception type that cannot be rebuilt from its args
        pass
    return RuntimeError(f"{type(err).__module__}.{type(err).__qualname__}: {err}")


# ---------------------------------------------------------------- back in the caller


def _worker_died(task, err: BaseException) -> Exception:
    return TrainError(f"the worker process training {_describe(task)} stopped ({type(err).__name__}: {err}); "
                      "it may have run out of memory: set train.workers to 1 to train in one process")


def _describe(task) -> str:
    if isinstance(task, tuple) and len(task) >= 2:
        kind, name = task[0], task[1]
        return f"head {name!r}" if kind == "head" else f"{kind} {task[1:]!r}"
    return repr(task)


def _raise(err: BaseException, remote_tb: str | None):
    if remote_tb is None or isinstance(err, UserError):
        raise err from None  # the message says it all; a worker's traceback would only hide it
    raise err from RemoteTraceback(remote_tb)

