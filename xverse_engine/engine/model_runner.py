"""Runs the model for one scheduled step: builds the flat token batch and its attention metadata, runs the
forward (eagerly, or by replaying a captured CUDA graph for decode), and samples the next tokens.

Also owns the paged KV cache: one tensor [L, 2, N, n_kv, block_size, D] sized from a fixed block count
(CPU, tests) or from the device memory left after a warm-up pass at the largest step.
"""
import torch

from ..layers.attention import AttentionMetadata
from ..layers.sampler import SamplingBatch, sample


class KVCacheTooSmall(RuntimeError):
    pass


def bytes_per_block(config, block_size: int, dtype) -> int:
    return (config.num_hidden_layers * 2 * block_size * config.num_key_value_heads * config.head_dim
            * torch.empty((), dtype=dtype).element_size())


class ModelRunner:
    def __init__(self, model, config, *, device, dtype, kernels: str, block_size: int, max_model_len: int,
                 max_num_seqs: int, max_num_batched_tokens: int, num_kv_blocks, gpu_memory_utilization: float,
                 enforce_eager: bool):
        self.model, self.config = model, config
        self.device, self.dtype, self.kernels = torch.device(device), dtype, kernels
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_blocks_per_seq = (max_model_len + block_size - 1) // block_size
        self.num_kv_blocks = num_kv_blocks or self._blocks_from_free_memory(gpu_memory_utilization)
        if self.num_kv_blocks * block_size < max_model_len:
            raise KVCacheTooSmall(
                f"the KV cache holds {self.num_kv_blocks * block_size} tokens ({self.num_kv_blocks} blocks of "
                f"{block_size}), fewer than one sequence of max_model_len={max_model_len} needs; lower "
                f"max_model_len, or give the cache more room (raise gpu_memory_utilization / num_kv_blocks)")
        shape = (config.num_hidden_layers, 2, self.num_kv_blocks, config.num_key_value_heads, block_size,
                 config.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.kv_caches = [(layer[0], layer[1]) for layer in self.kv_cache]  # per layer: (key, value) views
        self.graphs = {}
        self.use_cuda_graphs = self.device.type == "cuda" and kernels == "cuda" and not enforce_eager
        if self.use_cuda_graphs:
            self._capture_decode_graphs()

    # ---- KV cache sizing ------------------------------------------------------------------------------
    def _blocks_from_free_memory(self, utilization: float) -> int:
        per_block = bytes_per_block(self.config, self.block_size, self.dtype)
        if self.device.type != "cuda":  # CPU without num_kv_blocks: room for a few full-length sequences
            return 4 * self.max_blocks_per_seq
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._warm_up()  # the largest step's activations, measured rather than guessed
        peak = torch.cuda.max_memory_allocated(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        budget = total * utilization - peak - used_by_others
        if budget < per_block:
            raise KVCacheTooSmall(
                f"no room for the KV cache: weights and activations take {peak / 2**30:.1f} GiB of "
                f"{total / 2**30:.1f} GiB at gpu_memory_utilization={utilization}; raise gpu_memory_utilization, "
                f"or lower max_num_batched_tokens")
        return int(budget // per_block)

    @torch.inference_mode()
    def _warm_up(self):
        n = min(self.max_num_batched_tokens, self.max_model_len)
        nblocks = (n + self.block_size - 1) // self.block_size
        scratch = torch.zeros((2, 1, self.config.num_key_value_heads, self.block_size, self.config.head_dim),
                              dtype=self.dtype, device=self.device)
        meta = AttentionMetadata(
            slot_mapping=torch.full((n,), -1, dtype=torch.int64, device=self.device),
            block_tables=torch.zeros((1, nblocks), dtype=torch.int32, device=self.device),
            context_lens=torch.tensor([n], dtype=torch.int32, device=self.device),
            query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=self.device),
            is_decode=False)
        ids = torch.zeros(n, dtype=torch.int64, device=self.device)
        hidden = self.model(ids, torch.arange(n, device=self.device), meta,
                            [(scratch[0], scratch[1])] * self.config.num_hidden_layers)
        self.model.compute_logits(hidden[-self.max_num_seqs:])
        torch.cuda.synchronize(self.device)

    # ---- one step -------------------------------------------------------------------------------------
    def _tensor(self, values, dtype):
        pinned = self.device.type == "cuda"
        return torch.tensor(values, dtype=dtype, pin_memory=pinned).to(self.device, non_blocking=True)

    def prepare(self, scheduled):
        """Flat inputs of a step: every scheduled sequence's new tokens back to back."""
        input_ids, positions, slots, query_start, context_lens, sample_rows = [], [], [], [0], [], []
        bs = self.block_size
        for item in scheduled:
            seq, start, n = item.seq, item.seq.num_computed_tokens, item.num_new_tokens
            input_ids += seq.token_ids[start:start + n]
            positions += range(start, start + n)
            slots += [seq.block_table[p // bs] * bs + p % bs for p in range(start, start + n)]
            query_start.append(query_start[-1] + n)
            context_lens.append(start + n)
            if item.samples:
                sample_rows.append(query_start[-1] - 1)
        width = max(len(item.seq.block_table) for item in scheduled)
        tables = [item.seq.block_table + [0] * (width - len(item.seq.block_table)) for item in scheduled]
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots, torch.int64),
            block_tables=self._tensor(tables, torch.int32),
            context_lens=self._tensor(context_lens, torch.int32),
            query_start_loc=self._tensor(query_start, torch.int32),
            is_decode=all(item.num_new_tokens == 1 for item in scheduled))
        return (self._tensor(input_ids, torch.int64), self._tensor(positions, torch.int64), meta,
                self._tensor(sample_rows, torch.int64))

    def sampling_batch(self, seqs) -> SamplingBatch:
        params = [seq.params for seq in seqs]
        penalised = any(p.repetition_penalty != 1.0 for p in params)
        seen = None
        if penalised:  # every token so far, padded with -1: [B, max tokens]
            rows = [seq.token_tensor[:seq.num_tokens] for seq in seqs]
            seen = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=-1)
            seen = seen.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else seen
        asked = [p.logprobs for p in params if p.logprobs is not None]
        return SamplingBatch(
            temperatures=self._tensor([p.temperature for p in params], torch.float32),
            top_ks=self._tensor([p.top_k for p in params], torch.int64),
            top_ps=self._tensor([p.top_p for p in params], torch.float32),
            repetition_penalties=self._tensor([p.repetition_penalty for p in params], torch.float32),
            seeds=self._tensor([seq.seed for seq in seqs], torch.int64),
            steps=self._tensor([seq.num_output_tokens for seq in seqs], torch.int64),
            seen_token_ids=seen,
            num_logprobs=max(asked) if asked else -1,
            all_greedy=all(p.temperature == 0 for p in params),
            any_top_k=any(p.top_k > 0 for p in params),
            any_top_p=any(p.top_p < 1.0 for p in params))

    @torch.inference_mode()
    def run(self, scheduled):
        """Computes KV for every scheduled token; returns, for each sequence that reached its last token,
        (seq, next token id, logprobs row or None)."""
        input_ids, positions, meta, sample_rows = self.prepare(scheduled)
        sampling_seqs = [item.seq for item in scheduled if item.samples]
        logits = self.forward(input_ids, positions, meta, sample_rows)
        if not sampling_seqs:
            return []
        tokens, logprobs = sample(logits, self.sampling_batch(sampling_seqs))
        tokens = tokens.tolist()
        return [(seq, tokens[i], None if logprobs is None else logprobs[i]) for i, seq in enumerate(sampling_seqs)]

    def forward(self, input_ids, positions, meta, sample_rows):
        """The model on one prepared step -> logits [S, V] of the sample rows (None when S = 0).
        Tensor-parallel workers call it with the inputs rank 0 broadcast (distributed/runner.py)."""
        if meta.is_decode and self.use_cuda_graphs and meta.context_lens.shape[0] <= self.max_num_seqs:
            return self._replay_decode_graph(input_ids, positions, meta)
        hidden = self.model(input_ids, positions, meta, self.kv_caches)
        return self.model.compute_logits(hidden[sample_rows]) if sample_rows.numel() else None

    # ---- CUDA graphs for decode -----------------------------------------------------------------------
    def graph_batch_sizes(self) -> list:
        sizes, size = [], 1
        while size < self.max_num_seqs:
            sizes.append(size)
            size *= 2
        return sizes + [self.max_num_seqs]

    @torch.inference_mode()
    def _capture_decode_graphs(self):
        """One graph per batch-size bucket, sharing a memory pool and static input buffers; a smaller
        batch is padded up to its bucket with rows that write nothing (slot -1) and attend to nothing."""
        n = self.max_num_seqs
        d = self.device
        self.static = {
            "input_ids": torch.zeros(n, dtype=torch.int64, device=d),
            "positions": torch.zeros(n, dtype=torch.int64, device=d),
            "slot_mapping": torch.full((n,), -1, dtype=torch.int64, device=d),
            "block_tables": torch.zeros((n, self.max_blocks_per_seq), dtype=torch.int32, device=d),
            "context_lens": torch.zeros(n, dtype=torch.int32, device=d),
            "query_start_loc": torch.arange(n + 1, dtype=torch.int32, device=d),
        }
        self.static_logits = torch.zeros((n, self.config.vocab_size), dtype=torch.float32, device=d)
        pool = None
        for size in reversed(self.graph_batch_sizes()):
            s = {k: v[:size] if k != "query_start_loc" else v[:size + 1] for k, v in self.static.items()}
            meta = AttentionMetadata(s["slot_mapping"], s["block_tables"], s["context_lens"], s["query_start_loc"],
                                     is_decode=True)

            def step():
                hidden = self.model(s["input_ids"], s["positions"], meta, self.kv_caches)
                self.static_logits[:size] = self.model.compute_logits(hidden)

            step()  # warm-up outside capture (lazy initialisation, autotuning)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                step()
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(d)

    def _replay_decode_graph(self, input_ids, positions, meta):
        batch = input_ids.shape[0]
        size = next(s for s in self.graph_batch_sizes() if s >= batch)
        s = self.static
        s["input_ids"][:batch].copy_(input_ids)
        s["positions"][:batch].copy_(positions)
        s["slot_mapping"].fill_(-1)
        s["slot_mapping"][:batch].copy_(meta.slot_mapping)
        s["context_lens"].zero_()
        s["context_lens"][:batch].copy_(meta.context_lens)
        width = meta.block_tables.shape[1]
        s["block_tables"][:batch, :width].copy_(meta.block_tables)
        self.graphs[size].replay()
        return self.static_logits[:batch]
