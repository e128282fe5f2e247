"""The ModelRunner on each side of a tensor-parallel job.

Both ranks' runners make the same calls in the same order (warm-up, graph capture, every step's forward),
so the collectives inside the model always pair up. The KV cache of each rank holds only its KV heads.
"""
import dataclasses

import torch

from ..engine.model_runner import KVCacheTooSmall, ModelRunner


def per_rank_config(config, tp):
    """The config the runner sizes its KV cache from: this rank's share of the KV heads."""
    return dataclasses.replace(config, num_key_value_heads=config.num_key_value_heads // tp.size)


class DriverRunner(ModelRunner):
    """Rank 0: prepares each step, broadcasts it to the workers, runs its own shard, samples."""

    def __init__(self, model, config, *, workers, **kwargs):
        self.workers = workers
        # warm-up and graph capture run collectives with every worker
        with workers.step_guard(passthrough=(KVCacheTooSmall, ValueError)):
            super().__init__(model, per_rank_config(config, workers.tp), **kwargs)

    def _blocks_from_free_memory(self, utilization: float) -> int:
        return self.workers.tp.min_over_ranks(super()._blocks_from_free_memory(utilization))

    def prepare(self, scheduled):
        inputs = super().prepare(scheduled)
        self.workers.check_alive()
        self.workers.channel.send(*inputs)
        return inputs

    def run(self, scheduled):
        with self.workers.step_guard():   # a worker's death becomes a clear error, never a hang
            return super().run(scheduled)


class WorkerRunner(ModelRunner):
    """Ranks > 0: no scheduler and no sampling; runs each step rank 0 broadcasts until told to stop."""

    def __init__(self, model, config, *, tp, channel, **kwargs):
        self.tp, self.channel = tp, channel
        super().__init__(model, per_rank_config(config, tp), **kwargs)

    def _blocks_from_free_memory(self, utilization: float) -> int:
        return self.tp.min_over_ranks(super()._blocks_from_free_memory(utilization))

    @torch.inference_mode()
    def serve(self):
        while (inputs := self.channel.recv()) is not None:
            self.forward(*inputs)
