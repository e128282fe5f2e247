"""CUDA graphs for decode: one graph per batch-size bucket, sharing a memory pool and static input buffers.

A batch of B sequences runs in the smallest bucket >= B. fill() copies the step's inputs into the static
buffers and resets the padding rows B..bucket, which must write nothing (slot -1) and attend to nothing
(context 0): stale values there would overwrite another sequence's KV. fill() is plain tensor code, so it
runs (and is tested) on the CPU; with capture=False, replay() runs the same forward eagerly on the static
buffers instead of a graph, so the whole replay path can be exercised without a GPU.
"""
import torch

from ..layers.attention import AttentionMetadata


class DecodeGraphs:
    def __init__(self, model, kv_caches, *, max_num_seqs: int, max_blocks_per_seq: int, vocab_size: int,
                 device, capture: bool = True):
        self.model, self.kv_caches = model, kv_caches
        self.capture = capture
        n, d = max_num_seqs, torch.device(device)
        self.static = {
            "input_ids": torch.zeros(n, dtype=torch.int64, device=d),
            "positions": torch.zeros(n, dtype=torch.int64, device=d),
            "slot_mapping": torch.full((n,), -1, dtype=torch.int64, device=d),
            "block_tables": torch.zeros((n, max_blocks_per_seq), dtype=torch.int32, device=d),
            "context_lens": torch.zeros(n, dtype=torch.int32, device=d),
            "query_start_loc": torch.arange(n + 1, dtype=torch.int32, device=d),
        }
        self.static_logits = torch.zeros((n, vocab_size), dtype=torch.float32, device=d)   # [n, V]
        self.sizes = self.batch_sizes(max_num_seqs)
        self.graphs = {}
        if capture:
            self._capture()

    @staticmethod
    def batch_sizes(max_num_seqs: int) -> list:
        sizes, size = [], 1
        while size < max_num_seqs:
            sizes.append(size)
            size *= 2
        return sizes + [max_num_seqs]

    def bucket(self, batch: int) -> int:
        return next(s for s in self.sizes if s >= batch)

    def _forward(self, size: int):
        s = {k: v[:size] if k != "query_start_loc" else v[:size + 1] for k, v in self.static.items()}
        meta = AttentionMetadata(s["slot_mapping"], s["block_tables"], s["context_lens"], s["query_start_loc"],
                                 is_decode=True)
        hidden = self.model(s["input_ids"], s["positions"], meta, self.kv_caches)
        self.static_logits[:size] = self.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture(self):
        pool = None
        for size in reversed(self.sizes):
            self._forward(size)   # warm-up outside capture (lazy initialisation, autotuning)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def fill(self, input_ids, positions, meta: AttentionMetadata) -> int:
        """Copies a decode step of B rows into the static buffers; returns the bucket it replays in."""
        batch = input_ids.shape[0]
        size = self.bucket(batch)
        s = self.static
        s["input_ids"][:batch].copy_(input_ids)
        s["positions"][:batch].copy_(positions)
        s["slot_mapping"][:batch].copy_(meta.slot_mapping)
        s["context_lens"][:batch].copy_(meta.context_lens)
        s["block_tables"][:batch, :meta.block_tables.shape[1]].copy_(meta.block_tables)
        if size > batch:   # padding rows: no KV write, nothing to attend to
            s["slot_mapping"][batch:size].fill_(-1)
            s["context_lens"][batch:size].zero_()
            s["input_ids"][batch:size].zero_()
            s["positions"][batch:size].zero_()
        return size

    def run(self, input_ids, positions, meta: AttentionMetadata):
        """The logits of every row of the bucket: [bucket, V]; rows past B are padding."""
        size = self.fill(input_ids, positions, meta)
        if self.capture:
            self.graphs[size].replay()
        else:
            self._forward(size)
        return self.static_logits[:size]
