"""A tensor-parallel worker (ranks > 0): builds its shard of the model, then runs the steps rank 0 sends.

Started by launcher.py with torch.multiprocessing (spawn), or as a torchrun rank. It ignores Ctrl-C (the
terminal sends SIGINT to every process of the job; rank 0 decides when workers stop) and exits on its own
if rank 0 disappears, so no worker outlives the engine.
"""
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import ModelConfig
from ..loader import load_weights
from ..model import XverseForCausalLM
from .runner import WorkerRunner
from .sharding import CheckpointSharding
from .step_channel import StepChannel


@dataclass
class RankSpec:
    """What every rank needs to build the same model shard and runner as rank 0 (picklable)."""
    model_path: str
    device_type: str           # "cuda" | "cpu": rank r runs on cuda:<local rank> or the CPU
    dtype: torch.dtype
    kernels: str               # already resolved: "cuda" | "cpu" | "torch"
    load_format: str
    max_model_len: int
    seed: int
    runner_kwargs: dict        # ModelRunner's block_size, max_num_seqs, ... as rank 0 uses them
    cpu_threads: int = 1


def rank_device(device_type: str, local_rank: int) -> torch.device:
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def build_shard(spec: RankSpec, tp, device):
    """(config, model) holding this rank's share of the checkpoint's weights."""
    config = ModelConfig.from_pretrained(spec.model_path)
    model = XverseForCausalLM(config, spec.dtype, device, spec.kernels, spec.max_model_len, tp=tp)
    load_weights(model, config, spec.model_path, spec.load_format, show_progress=False,
                 sharding=CheckpointSharding(config, tp))
    return config, model


def serve(spec: RankSpec, tp, device, report=lambda *message: None):
    """Build the shard, report ready, then run steps until rank 0 says stop."""
    torch.manual_seed(spec.seed)
    config, model = build_shard(spec, tp, device)
    report("ready", None)
    channel = StepChannel(tp, device)
    runner = WorkerRunner(model, config, tp=tp, channel=channel, device=device, dtype=spec.dtype,
                          kernels=spec.kernels, max_model_len=spec.max_model_len, **spec.runner_kwargs)
    runner.serve()


def _exit_when_parent_dies(parent_pid: int):
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)  # rank 0 is gone (killed): nobody will ever send a step or a stop
    threading.Thread(target=watch, name="xverse-parent-watch", daemon=True).start()


def worker_main(rank: int, size: int, init_method: str, spec: RankSpec, conn, parent_pid: int):
    """Entry point of a spawned worker process; `conn` carries ("started" | "ready" | "error", text) to rank 0."""
    from .launcher import init_group
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_when_parent_dies(parent_pid)
    torch.set_num_threads(spec.cpu_threads)
    try:
        conn.send(("started", os.getpid()))
        device = rank_device(spec.device_type, rank)
        tp = init_group(rank, size, init_method, spec.device_type)
        serve(spec, tp, device, report=lambda *message: conn.send(message))
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
        os._exit(1)
    dist.destroy_process_group()  # then a normal exit: multiprocessing's finalisers release what tqdm made
