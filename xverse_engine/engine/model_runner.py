"""Runs the model for one scheduled step: the step's inputs come from the persistent batch, the forward
runs eagerly or by replaying a captured CUDA graph for decode, and the next tokens are sampled on the
device. The sampled ids (and logprobs) start their copy to the host at once and are read one call later
(StepOutput.fetch), so the host can plan and launch the next step meanwhile.

Also owns the paged KV cache: one tensor [L, 2, N, n_kv, block_size, D] sized from a fixed block count
(CPU, tests) or from the device memory left after a warm-up of the largest possible step.
"""
import numpy as np
import torch

from ..layers.attention import AttentionMetadata
from ..layers.sampler import SamplingBatch, sample
from .cuda_graphs import DecodeGraphs
from .input_batch import InputBatch, StepInputs
from .outputs import TokenLogprob


class KVCacheTooSmall(RuntimeError):
    pass


def bytes_per_block(config, block_size: int, dtype) -> int:
    return (config.num_hidden_layers * 2 * block_size * config.num_key_value_heads * config.head_dim
            * torch.empty((), dtype=dtype).element_size())


def select_rows(x, sample_rows):
    """The rows of the sequences that sample: x [>= T, ...] -> [S, ...]. Used on the hidden states (eager)
    and on the logits of a replayed graph, whose bucket may hold padding rows and non-sampling rows. When
    every one of the T tokens samples, sample_rows is 0..T-1: a slice, not a gather (decided on the host)."""
    if sample_rows.shape[0] == x.shape[0]:
        return x
    return x[sample_rows]


class StepOutput:
    """A launched step's sampled ids (and logprobs), on their way to the host."""

    def __init__(self, seqs: list, host: torch.Tensor, event, logprobs: list):
        self.seqs = seqs            # the S sequences that sampled, in order
        self.host = host            # [S] int64 ids, or [S, 2 + 2n] fp32: id, its logprob, n values, n ids
        self.event = event          # CUDA event after the copy (None on the CPU)
        self.logprobs = logprobs    # per sequence: the top-n it asked for, or -1

    def fetch(self):
        """Waits for the copy; returns (token ids, per sequence a TokenLogprob or None)."""
        if self.event is not None:
            self.event.synchronize()
        if self.host.dim() == 1:
            return self.host.tolist(), None
        table = self.host.numpy()
        width = (table.shape[1] - 2) // 2
        tokens = table[:, 0].astype(np.int64).tolist()
        chosen = table[:, 1].tolist()
        values = list(map(tuple, table[:, 2:2 + width].tolist()))
        ids = list(map(tuple, table[:, 2 + width:].astype(np.int64).tolist()))
        entries = [None if n < 0 else TokenLogprob(token, logprob, top_ids, top_values) if n == width
                   else TokenLogprob(token, logprob, top_ids[:n], top_values[:n])
                   for token, logprob, top_ids, top_values, n in zip(tokens, chosen, ids, values, self.logprobs)]
        return tokens, entries


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
        self.batch = InputBatch(max_num_seqs, self.max_blocks_per_seq, block_size, config.vocab_size, self.device)
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
        self.decode_graphs = None
        self.use_cuda_graphs = self.device.type == "cuda" and kernels == "cuda" and not enforce_eager
        if self.use_cuda_graphs:
            self.enable_decode_graphs()

    def enable_decode_graphs(self, capture: bool = True):
        """Decode steps replay CUDA graphs; capture=False runs the same replay path eagerly (CPU tests)."""
        self.decode_graphs = DecodeGraphs(self.model, self.kv_caches, max_num_seqs=self.max_num_seqs,
                                          max_blocks_per_seq=self.max_blocks_per_seq,
                                          vocab_size=self.config.vocab_size, device=self.device, capture=capture)

    @property
    def graphs(self) -> dict:
        return self.decode_graphs.graphs if self.decode_graphs is not None else {}

    def release(self, seq):
        """seq left the running set (finished, aborted, preempted): its batch row goes back."""
        self.batch.release(seq)

    # ---- KV cache sizing ------------------------------------------------------------------------------
    def _blocks_from_free_memory(self, utilization: float) -> int:
        per_block = bytes_per_block(self.config, self.block_size, self.dtype)
        if self.device.type != "cuda":  # CPU without num_kv_blocks: room for a few full-length sequences
            return 4 * self.max_blocks_per_seq
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._warm_up()  # the largest step's activations and sampler temporaries, measured rather than guessed
        peak = torch.cuda.max_memory_allocated(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        budget = total * utilization - peak - used_by_others
        if budget < per_block:
            raise KVCacheTooSmall(
                f"no room for the KV cache: weights and activations take {peak / 2**30:.1f} GiB of "
                f"{total / 2**30:.1f} GiB at gpu_memory_utilization={utilization}; raise gpu_memory_utilization, "
                f"or lower max_num_batched_tokens / max_num_seqs")
        return int(budget // per_block)

    @torch.inference_mode()
    def _warm_up(self):
        """The largest step a schedule can produce, end to end: a full token budget split over as many
        sequences as may run (none longer than max_model_len), each sampling with every sampler feature on
        (penalty, top-p without top-k, which sorts the whole vocabulary, top-k, plain draws, 20 logprobs)."""
        d = self.device
        tokens = min(self.max_num_batched_tokens, self.max_num_seqs * self.max_model_len)
        num_seqs = min(self.max_num_seqs, tokens)
        base, extra = divmod(tokens, num_seqs)
        lengths = torch.tensor([base + (i < extra) for i in range(num_seqs)], dtype=torch.int32)
        query_start = torch.zeros(num_seqs + 1, dtype=torch.int32)
        query_start[1:] = lengths.cumsum(0)
        width = (int(lengths.max()) + self.block_size - 1) // self.block_size
        scratch = torch.zeros((2, 1, self.config.num_key_value_heads, self.block_size, self.config.head_dim),
                              dtype=self.dtype, device=d)
        meta = AttentionMetadata(
            slot_mapping=torch.full((tokens,), -1, dtype=torch.int64, device=d),   # writes nothing
            block_tables=torch.zeros((num_seqs, width), dtype=torch.int32, device=d),
            context_lens=lengths.to(d), query_start_loc=query_start.to(d), is_decode=False)
        positions = torch.cat([torch.arange(n) for n in lengths.tolist()]).to(d)
        hidden = self.model(torch.zeros(tokens, dtype=torch.int64, device=d), positions, meta,
                            [(scratch[0], scratch[1])] * self.config.num_hidden_layers)
        logits = self.model.compute_logits(hidden[(query_start[1:] - 1).long().to(d)])
        kind = torch.arange(num_seqs, device=d) % 3          # 0: top-p alone, 1: top-k + top-p, 2: plain
        rows = torch.arange(num_seqs, device=d)
        sampling = SamplingBatch(
            temperatures=torch.ones(num_seqs, device=d), top_ks=torch.where(kind == 1, 50, 0),
            top_ps=torch.where(kind < 2, 0.9, 1.0), repetition_penalties=torch.full((num_seqs,), 1.1, device=d),
            seeds=rows, steps=rows, seen_mask=self.batch.seen[rows], num_logprobs=20, all_greedy=False,
            any_top_k=num_seqs > 1, any_top_p=True, num_candidates=self.config.vocab_size,
            any_unfiltered=num_seqs > 2)
        inputs = StepInputs(None, None, meta, rows, sampling, [None] * num_seqs, rows, True, [20] * num_seqs)
        self._sample(logits, inputs).fetch()
        self.batch.seen.zero_()
        self.batch.last_sampled = None
        if d.type == "cuda":
            torch.cuda.synchronize(d)

    # ---- one step -------------------------------------------------------------------------------------
    def prepare(self, scheduled) -> tuple:
        """The model inputs of a step, (input_ids, positions, meta, sample_rows), from the persistent batch;
        its sampling state is kept for run(). (Tensor-parallel rank 0 broadcasts exactly this tuple.)"""
        self._step = self.batch.prepare(scheduled)
        step = self._step
        return step.input_ids, step.positions, step.meta, step.sample_rows

    def forward(self, input_ids, positions, meta, sample_rows):
        """The model on one prepared step -> logits [S, V] of the sample rows (None when S = 0): eagerly, or
        by replaying the decode graph of the batch's bucket."""
        if not sample_rows.shape[0]:
            if meta.is_decode and self.decode_graphs is not None:
                self.decode_graphs.run(input_ids, positions, meta)
            else:
                self.model(input_ids, positions, meta, self.kv_caches)
            return None
        if meta.is_decode and self.decode_graphs is not None and input_ids.shape[0] <= self.max_num_seqs:
            all_logits = self.decode_graphs.run(input_ids, positions, meta)     # [bucket, V]
            return select_rows(all_logits[:input_ids.shape[0]], sample_rows)
        hidden = self.model(input_ids, positions, meta, self.kv_caches)
        return self.model.compute_logits(select_rows(hidden, sample_rows))

    @torch.inference_mode()
    def run(self, scheduled) -> "StepOutput | None":
        """Launches the step: KV for every scheduled token, and the next token of each sequence that reached
        its last one. Returns their StepOutput (None when no sequence samples), not waiting for it."""
        logits = self.forward(*self.prepare(scheduled))
        if logits is None:
            return None
        return self._sample(logits, self._step)

    def _sample(self, logits, inputs: StepInputs) -> StepOutput:
        # logits: [S, V] fp32
        tokens, top = sample(logits, inputs.sampling, self.kernels)
        if inputs.penalised:
            self.batch.update_penalty_mask(inputs.batch_rows, tokens)
        self.batch.last_sampled = tokens
        payload = tokens
        if top is not None:   # one table, one copy: id, its logprob, the n best values, their ids (ids < 2**24
            exact = torch.float32 if logits.shape[-1] <= 1 << 24 else torch.float64     # are exact in fp32)
            payload = torch.cat([tokens[:, None].to(exact), top.chosen[:, None].to(exact), top.values.to(exact),
                                 top.token_ids.to(exact)], dim=1)
        event = None
        if self.device.type == "cuda":
            host = torch.empty(payload.shape, dtype=payload.dtype, pin_memory=True)
            host.copy_(payload, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = payload
        return StepOutput(inputs.sampling_seqs, host, event, inputs.logprobs)
