"""Where the flow's tasks run: ``orchestration.task_runner`` picks Prefect's threads or processes, a Dask
``LocalCluster``, or a running Dask cluster (``orchestration.dask_address``, ``--dask-address``,
``$CROSSMODAL_DASK_ADDRESS``: the first of the three, from the right, that is set).

    from flows.execution import Execution
    with Execution(cfg.orchestration, address, [cfg.paths.work, cfg.paths.cache], [manifest]) as ex:  # in a flow
        future = ex.submit(some_task, {"x": 1}, wait_for=[other], gpu=True)
        ex.describe()     # the summary's "execution": {"task_runner", "address", "workers", "slots", "tasks"}

A task's result says where it ran (:func:`ran`: ``worker`` is the Dask worker's address as the scheduler names it,
else ``local``); :meth:`Execution.record` keeps it for ``describe``.

Dask workers run the tasks' Prefect engine themselves, so they must reach the Prefect API: a flow without
``PREFECT_API_URL`` talks to a temporary server on 127.0.0.1, and :class:`Execution` hands that address to the
tasks it submits. Workers on other machines need a Prefect server they can all reach (``PREFECT_API_URL``) and the
run's folders at the same path (checked when the cluster is joined: :func:`check_shared_storage`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from prefect import get_client
from prefect.settings import get_current_settings, temporary_settings

from crossmodal.config import OrchestrationConfig
from crossmodal.errors import ClusterError
from crossmodal.hardware import usable_cores

log = logging.getLogger(__name__)

ADDRESS_ENV = "CROSSMODAL_DASK_ADDRESS"
CONNECT_SECONDS = 15  # how long to wait for a scheduler before saying that none answers


def current_worker() -> str:
    """The Dask worker running this code, by its address as the scheduler lists it; ``local`` outside Dask."""
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):  # ValueError: not in a worker
        return "local"


def ran(t0: float) -> dict[str, Any]:
    """What a task adds to its result: where it ran and how long it took there."""
    return {"worker": current_worker(), "task_seconds": round(time.perf_counter() - t0, 3)}


def resolve_address(orch: OrchestrationConfig, address: str | None = None) -> str | None:
    """The scheduler to use: ``address`` (the command line), else ``$CROSSMODAL_DASK_ADDRESS``, else the setting."""
    return address or os.environ.get(ADDRESS_ENV) or orch.dask_address


def _can_see(probes: dict[str, int]) -> dict[str, str]:
    """On a worker: for each file the flow named (path -> its size here), why it is not the same file there."""
    problems = {}
    for path, size in probes.items():
        try:
            if os.stat(path).st_size != size:
                problems[path] = "another file is at that path there"
        except OSError as err:
            problems[path] = err.strerror or type(err).__name__
    return problems


def check_shared_storage(client, folders: list[str | Path], files: list[str | Path] = ()) -> None:
    """ClusterError unless every worker sees ``files`` and a probe file written in each of ``folders`` here."""
    probes, written = {}, []
    try:
        for folder in folders:
            folder = Path(folder).resolve()
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".crossmodal-probe-{uuid.uuid4().hex}"
            probe.write_text(probe.name)
            written.append(probe)
        for path in [*written, *(Path(f).resolve() for f in files)]:
            probes[str(path)] = path.stat().st_size
        seen = client.run(_can_see, probes)
    finally:
        for probe in written:
            probe.unlink(missing_ok=True)
    blind = {w: p for w, p in seen.items() if p}
    if blind:
        worker, problems = next(iter(blind.items()))
        path, why = next(iter(problems.items()))
        shown = Path(path).parent if Path(path).name.startswith(".crossmodal-probe-") else Path(path)
        raise ClusterError(
            f"Dask worker {worker} cannot see {shown} ({why}); {len(blind) - 1} other worker(s) cannot either: "
            "the run's folders (paths.work, paths.cache) and its data must be on storage every worker shares, at "
            "the same path on every machine")


class Execution:
    """The task runners of one flow run, entered for the run's duration (see the module docstring).

    ``task_runner: auto`` without an address, on more than one core, uses two: threads in this process for the
    stages and extraction (the extractor already keeps every core busy, and a second process would load the
    encoders again), and a Dask LocalCluster, started in the background meanwhile, for the training tasks (a head
    trains on one torch thread, so heads need processes to use the cores). Otherwise one runner runs every task.
    """

    def __init__(self, orch: OrchestrationConfig, address: str | None = None, shared_folders: list = (),
                 shared_files: list = ()):
        """``shared_folders`` / ``shared_files``: what workers of a cluster at an address must see (checked)."""
        self.orch, self.shared = orch, (list(shared_folders), list(shared_files))
        self.address = resolve_address(orch, address)
        kind = "dask" if self.address else orch.task_runner
        self.split = kind == "auto" and usable_cores() > 1
        if kind == "auto":
            kind = "threads"
        self.kind = kind
        self.slots = usable_cores() if orch.workers == "auto" else int(orch.workers)
        self.workers: list[str] = []
        self.tasks: list[dict] = []
        self._stack = contextlib.ExitStack()
        self._cluster = self._train_runner = None

    def __enter__(self) -> Execution:
        try:
            self._stack.enter_context(self._api())
            if self.split:
                from concurrent.futures import ThreadPoolExecutor

                pool = self._stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="crossmodal-cluster"))
                self._cluster = pool.submit(self._local_cluster)
                self._stack.callback(self._close_cluster)
            self.runner = self._stack.enter_context(self._runner(self.kind))
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _api(self):
        """Tasks in other processes need the API's address: a flow on a temporary server has it only in its client."""
        if (self.kind == "threads" and not self.split) or get_current_settings().api.url:
            return contextlib.nullcontext()
        return temporary_settings(updates={"api.url": str(get_client(sync_client=True).api_url)})

    def _local_cluster(self):
        """One single-threaded worker process per slot: a head trains on one torch thread, and processes (not
        threads) keep torch's per-process random generator to one task at a time."""
        from distributed import LocalCluster

        # Prefect's task-run lines go to the Prefect API (and its UI), not to this terminal, which shows the run's
        # own progress.
        return LocalCluster(n_workers=self.slots, threads_per_worker=1, processes=True, dashboard_address=":0",
                            silence_logs=logging.WARNING, env={"PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING"})

    def _close_cluster(self) -> None:
        try:
            cluster = self._cluster.result()
        except Exception:  # noqa: BLE001 - it never started: its error was raised where it was needed, if at all
            return
        cluster.close()

    @contextlib.contextmanager
    def _runner(self, kind: str):
        if kind == "threads":
            from prefect.task_runners import ThreadPoolTaskRunner

            self.workers = ["local"]
            with ThreadPoolTaskRunner(max_workers=self.slots) as runner:
                yield runner
            return
        if kind == "processes":
            from prefect.task_runners import ProcessPoolTaskRunner

            self.workers = ["local"]
            with ProcessPoolTaskRunner(max_workers=self.slots) as runner:
                yield runner
            return
        from distributed import Client
        from prefect_dask import DaskTaskRunner

        with contextlib.ExitStack() as stack:
            address = self.address
            if address is None:
                cluster = self._cluster.result() if self._cluster is not None else \
                    stack.enter_context(self._local_cluster())
                address = cluster.scheduler_address
            try:
                client = stack.enter_context(Client(address, timeout=CONNECT_SECONDS))
            except OSError as err:
                raise ClusterError(f"no Dask scheduler answers at {address} ({err}); start one with `dask scheduler`"
                                   " and workers with `dask worker ADDRESS`, or leave out --dask-address to run "
                                   "here") from None
            workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
            if not workers:
                raise ClusterError(f"the Dask scheduler at {address} has no workers; start some with "
                                   f"`dask worker {address} --nthreads 1`")
            if self.address is not None:
                check_shared_storage(client, *self.shared)
            self.address, self.workers = address, (["local"] if self.split else []) + workers
            log.info("tasks run on the Dask cluster at %s (%d workers)", address, len(self.workers))
            with DaskTaskRunner(address=address) as runner:
                yield runner

    def submit(self, task, parameters: dict[str, Any], wait_for=None, gpu: bool = False, training: bool = False):
        """Submit ``task`` with ``parameters``; ``training``: a training task (see the class docstring); ``gpu``:
        ask a Dask worker for one unit of the resource GPU (when ``orchestration.gpu_tasks``)."""
        runner = self.runner
        if training and self.split:
            if self._train_runner is None:
                self._train_runner = self._stack.enter_context(self._runner("dask"))
            runner = self._train_runner
        if gpu and self.orch.gpu_tasks and isinstance(runner, _dask_runner_type()):
            import dask

            with dask.annotate(resources={"GPU": 1}):
                return runner.submit(task, parameters, wait_for=wait_for)
        return runner.submit(task, parameters, wait_for=wait_for)

    def record(self, name: str, result: dict) -> None:
        """Keep where task ``name`` ran, from its result (see :func:`ran`)."""
        self.tasks.append({"name": name, "worker": result.get("worker", "local"),
                           "seconds": result.get("task_seconds", result.get("seconds"))})

    def describe(self) -> dict[str, Any]:
        """The summary's ``execution``: ``task_runner`` (``threads+dask`` for the split of ``auto``), the scheduler's
        address, the workers (``local``: this process), their parallel slots, and every task with its worker."""
        kind = "threads+dask" if self._train_runner is not None else ("threads" if self.split else self.kind)
        dask_workers = [w for w in self.workers if w != "local"]
        return {"task_runner": kind, "address": self.address if dask_workers else None,
                "workers": self.workers or ["local"],
                "slots": len(dask_workers) if dask_workers else self.slots, "tasks": list(self.tasks)}


def _dask_runner_type():
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner
