"""Rank 0's side of a tensor-parallel job: start the workers, know when one dies, stop them all.

Single machine: the Engine spawns N-1 worker processes (torch.multiprocessing, spawn), rank r on
cuda:r (or the CPU, gloo), and rendezvous over TCP on 127.0.0.1. Under torchrun (RANK / WORLD_SIZE /
MASTER_ADDR set, one or many nodes) the processes already exist: every rank builds the Engine, ranks > 0
serve steps inside the constructor and exit when rank 0 shuts down.

Nothing hangs: before each step rank 0 checks its workers are alive; a collective that fails (gloo sees
a peer's socket close at once) or times out (XVERSE_TP_TIMEOUT seconds, default 300) is reported as
WorkerDiedError naming the rank and its exit code or traceback. Shutdown (Engine.shutdown, del engine,
interpreter exit, Ctrl-C) tells the workers to stop, then terminates and kills any that linger.
"""
import contextlib
import datetime
import gc
import os
import socket
import sys
import time
import weakref

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .parallel_state import TensorParallel
from .step_channel import StepChannel
from .worker import RankSpec, rank_device, serve, worker_main


SPAWN_HINT = ("\nWorkers are spawned: each re-imports your main script. If the script creates the Engine at "
              "module level, put that code under `if __name__ == \"__main__\":`.")


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker exited or stopped answering, or a step failed half-way; the workers are
    stopped and the engine cannot continue."""


def _timeout_seconds(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def init_group(rank: int, size: int, init_method: str, device_type: str) -> TensorParallel:
    """Joins the job's process group: NCCL for the model's tensors on GPUs (plus a gloo group for host
    messages), gloo for both on the CPU."""
    timeout = datetime.timedelta(seconds=_timeout_seconds("XVERSE_TP_TIMEOUT", 300))
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size, timeout=timeout)
    group = dist.group.WORLD
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else group
    return TensorParallel(rank=rank, size=size, group=group, cpu_group=cpu_group)


def launched_by_torchrun() -> bool:
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(processes, state: dict):
    """Finaliser: a stop message if the workers wait between steps, then terminate / kill stragglers.
    Refers to no WorkerGroup, so it runs at `del engine`, at garbage collection or at interpreter exit."""
    if state["stopped"]:
        return
    state["stopped"] = True
    if state["channel"] is not None and state["between_steps"] and all(p.is_alive() for p in processes):
        with contextlib.suppress(Exception):
            state["channel"].send_stop()
    for p in processes:
        p.join(timeout=5)
    for p in processes:
        if p.is_alive():
            p.terminate()
            p.join(timeout=2)
        if p.is_alive():
            p.kill()
            p.join()
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


class WorkerGroup:
    """Rank 0's handle: `tp` (rank 0's TensorParallel), `channel` (step broadcasts), the worker processes."""

    def __init__(self, processes=(), pipes=()):
        self.tp = self.channel = None
        self.processes, self.pipes = list(processes), list(pipes)
        # between_steps: the workers wait for a step header (after start-up, between steps), so a stop
        # message reaches them; otherwise shutdown terminates them.
        self._state = {"between_steps": False, "stopped": False, "channel": None}
        self._finalizer = weakref.finalize(self, _stop, self.processes, self._state)

    def joined(self, tp, channel):
        """The process group is up: this rank's TensorParallel and the step channel."""
        self.tp, self.channel = tp, channel
        self._state["channel"] = channel
        return self

    @property
    def worker_pids(self) -> list:
        return [p.pid for p in self.processes]

    # ---- start-up -----------------------------------------------------------------------------------------
    def _wait_for(self, what: str, timeout: float):
        """Waits until every worker has sent `what`; a worker that dies or reports an error raises."""
        deadline = time.monotonic() + timeout
        pending = set(range(len(self.processes)))
        while pending:
            for i in sorted(pending):
                if self.pipes[i].poll():
                    try:
                        kind, text = self.pipes[i].recv()
                    except EOFError:  # died before it could report: usually while importing
                        self.processes[i].join(timeout=5)
                        self.shutdown()
                        raise WorkerDiedError(self._death_message(i, "while starting") + SPAWN_HINT) from None
                    if kind == "error":
                        self.shutdown()
                        raise WorkerDiedError(f"tensor-parallel worker rank {i + 1} failed while starting:\n{text}")
                    if kind == what:
                        pending.discard(i)
                elif not self.processes[i].is_alive():
                    self.shutdown()
                    raise WorkerDiedError(self._death_message(i, "while starting"))
            if pending and time.monotonic() > deadline:
                self.shutdown()
                raise WorkerDiedError(f"tensor-parallel worker rank(s) {[i + 1 for i in sorted(pending)]} did not "
                                      f"report {what!r} within {timeout:.0f} s (XVERSE_TP_START_TIMEOUT)")
            time.sleep(0.02)

    def wait_ready(self):
        """Every worker has loaded its shard (call after rank 0 loaded its own, before the first collective)."""
        self._wait_for("ready", _timeout_seconds("XVERSE_TP_START_TIMEOUT", 1800))

    # ---- health -------------------------------------------------------------------------------------------
    def _death_message(self, i: int, when: str) -> str:
        p = self.processes[i]
        detail = ""
        with contextlib.suppress(Exception):
            while self.pipes[i].poll():
                kind, text = self.pipes[i].recv()
                if kind == "error":
                    detail = f"; its traceback:\n{text}"
        code = p.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        return (f"tensor-parallel worker rank {i + 1} (pid {p.pid}) {how} {when}{detail}. The engine cannot "
                f"continue: create a new Engine")

    def check_alive(self):
        if self._state["stopped"]:
            raise WorkerDiedError("this engine's tensor-parallel workers were stopped (shutdown, or an earlier "
                                  "failure); create a new Engine")
        for i, p in enumerate(self.processes):
            if not p.is_alive():
                self.shutdown()
                raise WorkerDiedError(self._death_message(i, "before this step"))

    @contextlib.contextmanager
    def step_guard(self, passthrough=()):
        """Marks collectives in flight (a step, or building the runner). If anything fails the ranks are out
        of step, so the workers are stopped and the error becomes WorkerDiedError naming a dead worker or
        the failure (a collective that timed out: a worker stopped answering). Errors of the `passthrough`
        types (a user's setting, e.g. a KV cache that does not fit) keep their own type."""
        self._state["between_steps"] = False
        try:
            yield
        except Exception as error:
            time.sleep(0.2)  # a dying peer: let its exit status settle
            dead = [i for i, p in enumerate(self.processes) if not p.is_alive()]
            self.shutdown()
            if dead:
                raise WorkerDiedError(self._death_message(dead[0], "during a step")) from error
            if isinstance(error, passthrough):
                raise
            raise WorkerDiedError(f"a tensor-parallel step failed ({type(error).__name__}: {error}); the workers "
                                  f"were stopped (XVERSE_TP_TIMEOUT bounds a wait on a worker that stopped "
                                  f"answering). Create a new Engine") from error
        self._state["between_steps"] = True

    def shutdown(self):
        self._finalizer()


def start(size: int, spec: RankSpec) -> WorkerGroup:
    """Rank 0: start (or, under torchrun, join) the job. Under torchrun, ranks > 0 never return."""
    if launched_by_torchrun():
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        if world != size:
            raise ValueError(f"tensor_parallel_size={size} but torchrun started WORLD_SIZE={world} processes; "
                             f"run torchrun with --nnodes * --nproc-per-node = {size}")
        device = rank_device(spec.device_type, int(os.environ.get("LOCAL_RANK", 0)))
        tp = init_group(rank, size, "env://", spec.device_type)
        if rank != 0:
            serve(spec, tp, device)
            dist.destroy_process_group()
            sys.exit(0)
        return WorkerGroup().joined(tp, StepChannel(tp, device))
    if dist.is_initialized():
        gc.collect()  # an engine dropped but not yet collected (a reference cycle) stops its workers now
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process (another tensor-parallel "
                           "Engine is alive?): shut it down first (engine.shutdown())")
    if spec.device_type == "cuda" and torch.cuda.device_count() < size:
        raise ValueError(f"tensor_parallel_size={size} needs {size} GPUs, but {torch.cuda.device_count()} are "
                         f"visible; lower tensor_parallel_size or set CUDA_VISIBLE_DEVICES")
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    context = mp.get_context("spawn")
    processes, pipes = [], []
    for rank in range(1, size):
        reader, writer = context.Pipe(duplex=False)
        process = context.Process(target=worker_main, name=f"xverse-tp-rank{rank}", daemon=True,
                                  args=(rank, size, init_method, spec, writer, os.getpid()))
        process.start()
        writer.close()
        processes.append(process)
        pipes.append(reader)
    group = WorkerGroup(processes, pipes)
    group._wait_for("started", _timeout_seconds("XVERSE_TP_START_TIMEOUT", 1800))
    device = rank_device(spec.device_type, 0)
    tp = init_group(0, size, init_method, spec.device_type)
    return group.joined(tp, StepChannel(tp, device))
