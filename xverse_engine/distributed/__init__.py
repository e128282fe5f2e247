"""Tensor + expert parallelism over torch.distributed (NCCL on GPUs, gloo on CPU).

parallel_state.py  TensorParallel: this rank's place and its collectives; the divisibility check
sharding.py        which slice of each checkpoint tensor a rank reads, and where it goes
step_channel.py    rank 0 -> workers: each step's packed inputs (one header + one payload broadcast)
runner.py          DriverRunner (rank 0: prepares and broadcasts) and WorkerRunner (ranks > 0: receive, forward)
launcher.py        rank 0 spawns the workers, watches them, shuts them down; or joins a torchrun job
worker.py          the worker process: build this rank's shard of the model, then serve steps until told to stop
comm_volume.py     bytes moved between ranks per layer and per step (the benchmarks print it)
"""
from .parallel_state import SINGLE, TensorParallel, check_tensor_parallel

__all__ = ["SINGLE", "TensorParallel", "check_tensor_parallel"]
