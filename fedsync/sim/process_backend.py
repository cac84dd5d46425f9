"""`--backend processes`: the virtual devices in worker processes on this machine; the coordinator
and the rounds in the driver.

The local backend keeps the coordinator and every device in one interpreter, so one core does all
the work. Here each worker process hosts a slice of the fleet as a `DeviceGroup` (real EdgeClients
with their own SQLite journals, sharing one LiteRT interpreter per model version within the
worker), and the driver process keeps the coordinator: device-side work runs on other cores than
the coordinator's, and the workers' syncs run concurrently against it. Workers never import
TensorFlow (the devices run LiteRT, or Keras only with --local-training keras).

Scheduling is the Ray backend's (fedsync.sim.ray_backend) without Ray: each worker syncs its own
online devices, in the driver's seeded order, in batches; the driver aggregates after every
completed batch. A worker's devices do their round's work (predictions, fine-tuning) right before
they sync (DeviceGroup(defer_work=True)), so that it overlaps with the coordinator's handling of
the other workers' syncs. Reproducibility is the same as there: each device's data, connectivity,
dropouts and training seeds are those of the local backend, but which deltas land in which version
depends on the order concurrent batches complete.

A worker is `python -m fedsync.sim.process_backend`, spoken to over a pipe of its own (pickled
requests and replies, multiprocessing.connection framing): it imports nothing from the driver's
__main__, so it works the same under the CLI, a script or pytest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import threading
import traceback
from collections import deque
from collections.abc import Collection, Iterator
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np

from fedsync.sim.config import SimulationConfig
from fedsync.sim.devices import fleet_shards
from fedsync.sim.dropout import SyncOutcome

BATCHES_PER_BUFFER = 8
BATCHES_IN_FLIGHT = 2
START_TIMEOUT_S = 300.0  # a worker builds its devices (journals, model stores) before it answers


class WorkerError(RuntimeError):
    """A worker process failed; the message carries its traceback."""


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class _Worker:
    def __init__(self) -> None:
        """Starts the process; `send("start", config, indices, shards)` gives it its devices."""
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fedsync.sim.process_backend", str(to_child_r), str(from_child_w)],
            pass_fds=(to_child_r, from_child_w),
            stdin=subprocess.DEVNULL,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self.requests = Connection(to_child_w, readable=False)
        self.replies = Connection(from_child_r, writable=False)
        self.start_sent = False

    def send(self, method: str, *args: Any) -> None:
        self.requests.send((method, args))

    def receive(self, timeout_s: float | None = None) -> Any:
        if timeout_s is not None and not self.replies.poll(timeout_s):
            raise WorkerError(f"worker {self.process.pid} did not answer within {timeout_s:.0f} s")
        try:
            ok, value = self.replies.recv()
        except EOFError:
            raise WorkerError(f"worker {self.process.pid} exited with code {self.process.wait()}") from None
        if not ok:
            raise WorkerError(value)
        return value

    def call(self, method: str, *args: Any) -> Any:
        self.send(method, *args)
        return self.receive()

    def stop(self, timeout_s: float = 60.0) -> None:
        for end in (self.requests, self.replies):
            end.close()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class ProcessFleet:
    def __init__(self, config: SimulationConfig) -> None:
        count = min(config.workers or default_workers(), config.devices)
        slices = [[int(i) for i in s] for s in np.array_split(np.arange(config.devices), count) if len(s)]
        # Workers need not share the driver's working directory.
        config = _with_absolute_data_dir(config)
        self._workers: list[_Worker] = []
        self.peak_rss_mb: list[float] = []  # each worker's, filled in by close()
        self._started = False
        try:
            self._workers = [_Worker() for _ in slices]
        except BaseException:
            self.close()
            raise
        self._owner = {i: w for w, s in enumerate(slices) for i in s}
        # A worker reads its start request (its shards: more than a pipe holds) once its imports
        # are done: sending from a thread lets the driver go on with its own start-up meanwhile.
        self._start_error: BaseException | None = None
        self._starting = threading.Thread(target=self._start, args=(config, slices), daemon=True)
        self._starting.start()

    def _start(self, config: SimulationConfig, slices: list[list[int]]) -> None:
        try:
            shards = fleet_shards(config)  # loaded here once: the workers need not import scikit-learn
            for w, indices in zip(self._workers, slices, strict=True):
                w.send("start", config, indices, {i: shards[i] for i in indices})
                w.start_sent = True
        except BaseException as exc:  # surfaced by _ready
            self._start_error = exc

    def _ready(self) -> None:
        """The workers build their devices in parallel, and beside the driver's own start-up (the
        coordinator's): wait for them only when they are first needed."""
        if not self._started:
            self._starting.join()
            if self._start_error is not None:
                raise WorkerError(f"could not start the workers: {self._start_error}") from self._start_error
            for w in self._workers:
                w.receive(START_TIMEOUT_S)
            self._started = True

    @property
    def hosts(self) -> int:
        return len(self._workers)

    def work(self, round_index: int, cohort: Collection[int] | None = None, cohort_version: int = 0) -> int:
        self._ready()
        members = None if cohort is None else frozenset(int(i) for i in cohort)
        for w in self._workers:
            w.send("work", round_index, members, cohort_version)
        return sum(w.receive() for w in self._workers)

    def sync(self, order: list[int], address: str, per_batch: int) -> Iterator[list[SyncOutcome]]:
        self._ready()
        # Small batches, so that the driver aggregates soon after the buffer fills and the devices
        # that sync next download the new version (the local backend aggregates after each device).
        size = max(1, per_batch // (BATCHES_PER_BUFFER * len(self._workers)))
        queues: list[list[int]] = [[] for _ in self._workers]
        for i in order:
            queues[self._owner[i]].append(i)
        batches = [deque(q[k : k + size] for k in range(0, len(q), size)) for q in queues]
        in_flight = [0] * len(self._workers)
        owner = {w.replies: i for i, w in enumerate(self._workers)}

        def submit(w: int) -> None:
            if batches[w]:
                self._workers[w].send("sync", batches[w].popleft(), address)
                in_flight[w] += 1

        # BATCHES_IN_FLIGHT per worker: it starts its next batch while the driver reads the last
        # one's outcome and aggregates (publishing a version takes tens of milliseconds).
        for w in range(len(self._workers)):
            for _ in range(BATCHES_IN_FLIGHT):
                submit(w)
        while any(in_flight):
            ready = wait([self._workers[w].replies for w in range(len(self._workers)) if in_flight[w]])[0]
            w = owner[ready]  # type: ignore[index]
            outcomes = self._workers[w].receive()
            in_flight[w] -= 1
            submit(w)
            yield outcomes

    def close(self) -> None:
        workers, self._workers = self._workers, []
        if hasattr(self, "_starting"):
            self._starting.join(START_TIMEOUT_S)
        try:
            for w in workers:
                if w.process.poll() is None:
                    w.send("close")
            for w in workers:
                if not self._started and w.start_sent:  # its start-up reply comes first
                    with contextlib.suppress(WorkerError):
                        w.receive(START_TIMEOUT_S)
                if w.process.poll() is None:
                    self.peak_rss_mb.append(w.receive(120.0))
        finally:
            for w in workers:
                w.stop()


def _with_absolute_data_dir(config: SimulationConfig) -> SimulationConfig:
    return dataclasses.replace(config, data_dir=Path(config.data_dir).resolve())


def peak_rss_mb() -> float:
    """This process's own peak resident memory (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _serve(requests: Connection, replies: Connection) -> None:
    from fedsync.sim.devices import DeviceGroup

    group: DeviceGroup | None = None
    while True:
        try:
            method, args = requests.recv()
        except EOFError:
            break
        try:
            if method == "start":
                group = DeviceGroup(*args, defer_work=True)
                result: Any = None
            elif method == "close":
                if group is not None:
                    group.close()
                replies.send((True, peak_rss_mb()))
                break
            else:
                assert group is not None, "the driver sends start first"
                result = getattr(group, method)(*args)
        except Exception:
            replies.send((False, traceback.format_exc()))
            continue
        replies.send((True, result))
    if group is not None and method != "close":
        group.close()


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False))
