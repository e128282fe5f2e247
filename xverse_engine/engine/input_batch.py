"""The persistent batch: per-row state of the running sequences, kept across steps.

A sequence gets a row when it is first scheduled and keeps it until it finishes or is preempted. The row
holds what rarely changes (sampling parameters, seed, block table, the repetition-penalty mask of the
tokens it has seen), so a step touches only what changed: new blocks, newly admitted rows, and one
scatter of the sampled ids into the penalty mask on the device. The step's flat inputs are computed from
these arrays with a few vectorised numpy operations, packed into three host buffers (int64, int32, fp32)
and copied to the device in three transfers.

Inputs whose token is still pending (sampled by the previous step, not yet on the host) are gathered on
the device from that step's output, so the next step never waits for the host to see them.
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..layers.attention import AttentionMetadata
from ..layers.sampler import SamplingBatch, row_keys


@dataclass
class StepInputs:
    """One step's device inputs. T tokens of B sequences; S of those sequences sample."""
    input_ids: torch.Tensor          # [T] int64
    positions: torch.Tensor          # [T] int64
    meta: AttentionMetadata
    sample_rows: torch.Tensor        # [S] int64: index into T of each sampling sequence's last token
    sampling: Optional[SamplingBatch]    # None when no sequence samples
    sampling_seqs: list              # the S sequences, in the order of the sampled ids
    batch_rows: Optional[torch.Tensor]   # [S] int64: their rows (for the penalty mask update)
    penalised: bool                  # some sampling row has a repetition penalty
    logprobs: list                   # per sampling sequence: its top-n, or -1


class InputBatch:
    def __init__(self, max_num_seqs: int, max_blocks_per_seq: int, block_size: int, vocab_size: int, device):
        self.device = torch.device(device)
        self.pinned = self.device.type == "cuda"
        self.block_size = block_size
        self.vocab_size = vocab_size
        rows = max_num_seqs
        self.free_rows = list(range(rows - 1, -1, -1))
        self.block_table = np.zeros((rows, max_blocks_per_seq), dtype=np.int32)
        self.temperature = np.zeros(rows, dtype=np.float32)
        self.top_p = np.ones(rows, dtype=np.float32)
        self.penalty = np.ones(rows, dtype=np.float32)
        self.top_k = np.zeros(rows, dtype=np.int64)
        self.seed = np.zeros(rows, dtype=np.int64)
        self.num_logprobs = np.full(rows, -1, dtype=np.int64)
        self.num_prompt = np.zeros(rows, dtype=np.int64)
        self.seen = torch.zeros((rows, vocab_size), dtype=torch.bool, device=self.device)  # [R, V] penalty mask
        self.last_sampled = None       # [S] int64 on the device: the previous step's sampled ids
        self._new_penalty_rows = []    # (row, tokens) whose mask is rebuilt before the next step

    # ---- rows -------------------------------------------------------------------------------------------
    def add(self, seq):
        """Gives seq a row and writes its state there (on admission, or again after a preemption)."""
        row = self.free_rows.pop()
        seq.row = row
        p = seq.params
        self.temperature[row], self.top_p[row], self.penalty[row] = p.temperature, p.top_p, p.repetition_penalty
        self.top_k[row], self.seed[row] = p.top_k, seq.seed
        self.num_logprobs[row] = -1 if p.logprobs is None else p.logprobs
        self.num_prompt[row] = seq.num_prompt_tokens
        self.block_table[row, :len(seq.block_table)] = seq.block_table
        seq.num_synced_blocks = len(seq.block_table)
        if p.repetition_penalty != 1.0:   # admission waits for pending tokens, so token_ids has them all
            self._new_penalty_rows.append((row, seq.token_ids))

    def release(self, seq):
        if seq.row >= 0:
            self.free_rows.append(seq.row)
            seq.row = -1

    def _rebuild_penalty_rows(self):
        rows = [row for row, _ in self._new_penalty_rows]
        flat_rows = np.concatenate([np.full(len(tokens), row) for row, tokens in self._new_penalty_rows])
        flat_tokens = np.concatenate([np.asarray(tokens, dtype=np.int64) for _, tokens in self._new_penalty_rows])
        self._new_penalty_rows = []
        index = self.upload(np.concatenate([np.asarray(rows, dtype=np.int64), flat_rows, flat_tokens]))
        rows_dev, flat_rows_dev, flat_tokens_dev = index.split([len(rows), len(flat_rows), len(flat_tokens)])
        self.seen[rows_dev] = False
        self.seen[flat_rows_dev, flat_tokens_dev] = True

    def update_penalty_mask(self, batch_rows, sampled):
        """The sampled ids join their rows' seen tokens, on the device. batch_rows, sampled: [S]"""
        self.seen[batch_rows, sampled] = True
        self.last_sampled = sampled

    # ---- one step ---------------------------------------------------------------------------------------
    def upload(self, array: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(array)
        if not self.pinned:
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def prepare(self, scheduled) -> StepInputs:
        rows, starts, counts, host_ids, sample_flags = [], [], [], [], []
        sampling_seqs, pending_at, pending_from = [], [], []
        add_row, add_start, add_count, add_id, add_flag = (rows.append, starts.append, counts.append,
                                                           host_ids.append, sample_flags.append)
        total = 0
        for item in scheduled:   # the only per-sequence Python of the step's inputs: keep it lean
            seq = item.seq
            row = seq.row
            if row < 0:
                self.add(seq)
                row = seq.row
            elif len(seq.block_table) != seq.num_synced_blocks:
                self.block_table[row, seq.num_synced_blocks:len(seq.block_table)] = \
                    seq.block_table[seq.num_synced_blocks:]
                seq.num_synced_blocks = len(seq.block_table)
            start, n = item.start, item.num_new_tokens
            add_row(row)
            add_start(start)
            add_count(n)
            token_ids = seq.token_ids
            if start + n <= len(token_ids):
                if n == 1:
                    add_id(token_ids[start])
                else:
                    host_ids += token_ids[start:start + n]
            else:   # its input is the token the previous step drew: read it on the device
                add_id(0)
                pending_at.append(total)
                pending_from.append(seq.sample_index)
            total += n
            add_flag(item.samples)
            if item.samples:
                seq.sample_index = len(sampling_seqs)
                sampling_seqs.append(seq)
        if self._new_penalty_rows:
            self._rebuild_penalty_rows()

        bs = self.block_size
        batch = len(rows)
        rows = np.array(rows, dtype=np.int64)
        starts = np.array(starts, dtype=np.int64)
        is_decode = total == batch
        if is_decode:   # one token per sequence
            counts = None
            positions, token_rows = starts, rows
            query_start = np.arange(batch + 1, dtype=np.int64)
            context_lens = starts + 1
        else:
            counts = np.array(counts, dtype=np.int64)
            query_start = np.zeros(batch + 1, dtype=np.int64)
            np.cumsum(counts, out=query_start[1:])
            token_rows = np.repeat(rows, counts)
            positions = np.arange(total) + np.repeat(starts - query_start[:-1], counts)
            context_lens = starts + counts
        slots = self.block_table[token_rows, positions // bs].astype(np.int64) * bs + positions % bs
        width = (int(context_lens.max()) + bs - 1) // bs
        tables = self.block_table[rows, :width]

        num_sampling = len(sampling_seqs)
        if num_sampling == batch:
            srows, last_tokens = rows, context_lens
        else:
            sample_flags = np.array(sample_flags, dtype=bool)
            srows, last_tokens = rows[sample_flags], context_lens[sample_flags]
        # the previous step's ids, in order, are this step's inputs: use them as they are
        reuse_sampled = (is_decode and len(pending_at) == batch and self.last_sampled is not None
                         and self.last_sampled.shape[0] == batch and pending_from == list(range(batch)))
        long_parts = [np.empty(0, np.int64) if reuse_sampled else np.array(host_ids, dtype=np.int64),
                      positions, slots,
                      query_start[1:] - 1 if num_sampling == batch else query_start[1:][sample_flags] - 1,
                      srows, row_keys(self.seed[srows], last_tokens - self.num_prompt[srows]), self.top_k[srows],
                      np.array(pending_at, dtype=np.int64), np.array(pending_from, dtype=np.int64)]
        temperature, top_p, penalty = self.temperature[srows], self.top_p[srows], self.penalty[srows]
        # int32 metadata and the fp32 sampling parameters share one buffer (same width: a view each)
        int_parts = [query_start.astype(np.int32), context_lens.astype(np.int32), tables.reshape(-1),
                     temperature.view(np.int32), top_p.view(np.int32), penalty.view(np.int32)]
        longs = self.upload(np.concatenate(long_parts)).split([len(p) for p in long_parts])
        ints = self.upload(np.concatenate(int_parts)).split([len(p) for p in int_parts])
        input_ids, positions_d, slots_d, sample_rows_d, srows_d, keys_d, top_k_d, at_d, from_d = longs
        if reuse_sampled:
            input_ids = self.last_sampled
        elif pending_at:
            input_ids[at_d] = self.last_sampled[from_d]
        meta = AttentionMetadata(slot_mapping=slots_d, block_tables=ints[2].view(batch, width),
                                 context_lens=ints[1], query_start_loc=ints[0], is_decode=is_decode)

        sampling, penalised, logprobs = None, False, []
        if num_sampling:
            penalised = bool((penalty != 1.0).any())
            logprobs = self.num_logprobs[srows].tolist()
            sampled = temperature > 0
            top_k = self.top_k[srows]
            filtered = sampled & ((top_k > 0) | (top_p < 1.0))
            widths = np.where(top_k[filtered] > 0, np.minimum(top_k[filtered], self.vocab_size), self.vocab_size)
            sampling = SamplingBatch(
                temperatures=ints[3].view(torch.float32), top_ks=top_k_d, top_ps=ints[4].view(torch.float32),
                repetition_penalties=ints[5].view(torch.float32), seeds=None, steps=None, keys=keys_d,
                seen_mask=self.seen[srows_d] if penalised else None, num_logprobs=max(logprobs),
                all_greedy=not sampled.any(), all_sampled=bool(sampled.all()),
                any_top_k=bool((top_k[sampled] > 0).any()), any_top_p=bool((top_p[sampled] < 1.0).any()),
                num_candidates=int(widths.max()) if len(widths) else 0,
                any_unfiltered=bool((sampled & ~filtered).any()))
        return StepInputs(input_ids, positions_d, meta, sample_rows_d, sampling,
                          sampling_seqs, srows_d, penalised, logprobs)
