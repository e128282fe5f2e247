"""The persistent batch: per-row state of the running sequences, kept across steps.

A sequence gets a row when it is first scheduled and keeps it until it finishes or is preempted. The row
holds what rarely changes (sampling parameters, seed, block table, the repetition-penalty mask of the
tokens it has seen), so a step touches only what changed: new blocks, newly admitted rows, and one
scatter of the sampled ids into the penalty mask on the device.

What depends only on which sequences run in which rows (their rows, query starts, sample rows, sampling
settings: FixedInputs) is worked out and uploaded once per batch. While the same sequences keep decoding,
each fed the token the last step drew (the steady state), a step skips the per-sequence bookkeeping and
computes just positions, slots, context lengths, block tables and draw keys with a few vectorised numpy
operations, packed into one host buffer and copied to the device at once.

Inputs whose token is still pending (sampled by the previous step, not yet on the host) are read on the
device from that step's output, so the next step never waits for the host to see them.
"""
import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..layers.attention import AttentionMetadata
from ..layers.sampler import SamplingBatch
from ..ops.sampling import fold_seeds, row_keys_host


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
        self.zero_copy = self.device.type == "cpu"   # host arrays are device arrays: wrap them, copy nothing
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
        self._fixed = None             # FixedInputs of the last decode batch; dropped when a row changes hands

    # ---- rows -------------------------------------------------------------------------------------------
    def add(self, seq):
        """Gives seq a row and writes its state there (on admission, or again after a preemption)."""
        row = self.free_rows.pop()
        seq.row = row
        self._fixed = None
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
            self._fixed = None

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

    def upload_packed(self, longs: list, ints: list, zero_copy: Optional[bool] = None) -> tuple:
        """One host-to-device copy for a step's int64 and int32 arrays (lists or arrays of any shape; None for
        absent ones): each is written once into one int64 buffer, the int32 ones into its tail. Returns their
        device tensors (None where absent), in order and in their shapes. zero_copy (default: on the CPU, where
        host arrays are device arrays) wraps each array as it is instead (the block table's slice is contiguous
        only when it is the whole table, and a CPU step has finished with it before the table changes)."""
        if zero_copy is None:
            zero_copy = self.zero_copy
        if zero_copy:   # the host arrays are the inputs: no packing, no copy beyond a dtype or layout change
            return ([None if part is None else torch.from_numpy(np.ascontiguousarray(part, dtype=np.int64))
                     for part in longs],
                    [torch.from_numpy(np.ascontiguousarray(part, dtype=np.int32)) for part in ints])
        longs = [None if part is None else np.asarray(part, dtype=np.int64) for part in longs]
        num_longs = sum(part.size for part in longs if part is not None)
        buffer = np.empty(num_longs + (sum(part.size for part in ints) + 1) // 2, dtype=np.int64)
        long_views = list(_views(buffer, longs))
        int_views = list(_views(buffer[num_longs:].view(np.int32), ints))
        for view, part in zip(long_views + int_views, longs + ints):
            if part is not None:
                view[...] = part
        device = self.upload(buffer)
        return list(_views(device, longs)), list(_views(device[num_longs:].view(torch.int32), ints))

    def prepare(self, scheduled) -> StepInputs:
        fixed = self._fixed
        starts = self._starts_of_same_batch(scheduled, fixed) if fixed is not None else None
        if starts is not None:   # the steady state: the same sequences decode again, fed by the last step
            return self._inputs(fixed, starts, None, None, fixed.seqs)
        rows, starts, counts, host_ids, sample_flags = [], [], [], [], []
        sampling_seqs, pending_at, pending_from = [], [], []
        add_row, add_start, add_count, add_id, add_flag = (rows.append, starts.append, counts.append,
                                                           host_ids.append, sample_flags.append)
        total = 0
        for item in scheduled:
            seq = item.seq
            row = seq.row
            if row < 0:
                self.add(seq)
                row = seq.row
            elif len(seq.block_table) != seq.num_synced_blocks:
                self._sync_blocks(seq)
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
        batch = len(rows)
        is_decode = total == batch
        fixed = self._fix(rows, None if is_decode else counts, sample_flags, sampling_seqs)
        # kept for the next steps when they can reuse it: the same sequences, each decoding its pending token
        steady = is_decode and fixed.num_sampling == batch and pending_from == list(range(batch))
        self._fixed = fixed if steady else None
        if not pending_at:
            pending_at = pending_from = None
        return self._inputs(fixed, starts, None if is_decode else counts, (host_ids, pending_at, pending_from),
                            sampling_seqs)

    def _sync_blocks(self, seq):
        """Copies the blocks seq gained since its last step into its row of the block table."""
        self.block_table[seq.row, seq.num_synced_blocks:len(seq.block_table)] = seq.block_table[seq.num_synced_blocks:]
        seq.num_synced_blocks = len(seq.block_table)

    def _starts_of_same_batch(self, scheduled, fixed) -> Optional[list]:
        """Each sequence's position when this step decodes exactly the batch of the last step, in the same
        order, every input being the token that step drew (so its sampled ids are this step's input ids);
        None otherwise."""
        seqs = fixed.seqs
        if len(scheduled) != len(seqs) or self.last_sampled is None or self.last_sampled.shape[0] != len(seqs):
            return None
        starts = []
        for item, seq in zip(scheduled, seqs):
            if item.seq is not seq or item.num_new_tokens != 1 or item.start != len(seq.token_ids):
                return None
            if len(seq.block_table) != seq.num_synced_blocks:
                self._sync_blocks(seq)
            starts.append(item.start)
        return starts

    def _inputs(self, fixed, starts: list, counts, host_inputs, sampling_seqs: list) -> StepInputs:
        """The step's device inputs. starts: [B] first position of each sequence; counts: its new tokens
        (None: one each); host_inputs: (token ids known on the host, where pending ones go, where in the last
        step's output they come from), or None when the last step's sampled ids are the input as they are."""
        bs = self.block_size
        if counts is None:   # one token per sequence
            positions = np.array(starts, dtype=np.int64)
            table_base = fixed.table_base                       # [B]: each row's first entry in the flat table
            context_lens = np.add(positions, 1, dtype=np.int32)
            width = (max(starts) + bs) // bs
        else:
            counts = np.array(counts, dtype=np.int64)
            starts = np.array(starts, dtype=np.int64)
            table_base = np.repeat(fixed.table_base, counts)
            positions = np.arange(len(table_base)) + np.repeat(starts - fixed.query_start[:-1], counts)
            context_lens = np.add(starts, counts, dtype=np.int32)
            width = (int(context_lens.max()) + bs - 1) // bs
        blocks, offsets = np.divmod(positions, bs)
        slots = np.multiply(self.block_table.ravel().take(table_base + blocks), bs, dtype=np.int64) + offsets
        tables = self.block_table[fixed.rows_slice, :width]
        keys = None
        if fixed.needs_keys:   # the draw's counter: tokens generated so far
            last_tokens = context_lens if fixed.sample_flags is None else context_lens[fixed.sample_flags]
            keys = row_keys_host(fixed.folded_seeds, last_tokens - fixed.num_prompt)
        host_ids, pending_at, pending_from = host_inputs or (None, None, None)
        longs, ints = self.upload_packed([host_ids, positions, slots, keys, pending_at, pending_from],
                                         [context_lens, tables])
        input_ids, positions_d, slots_d, keys_d, at_d, from_d = longs
        context_lens_d, tables_d = ints
        if host_inputs is None:
            input_ids = self.last_sampled
        elif at_d is not None:
            input_ids[at_d] = self.last_sampled[from_d]
        meta = AttentionMetadata(slot_mapping=slots_d, block_tables=tables_d,
                                 context_lens=context_lens_d, query_start_loc=fixed.query_start_d,
                                 is_decode=counts is None)
        sampling = None
        if fixed.num_sampling:   # a greedy batch without penalty changes nothing in it from step to step
            sampling = fixed.sampling
            if keys_d is not None or fixed.penalised:
                sampling = SamplingBatch(**fixed.sampling_fields, keys=keys_d,
                                         seen_mask=self.seen[fixed.seen_rows] if fixed.penalised else None)
        return StepInputs(input_ids, positions_d, meta, fixed.sample_rows_d, sampling,
                          sampling_seqs, fixed.batch_rows_d, fixed.penalised, fixed.logprobs)

    def _fix(self, rows: list, counts, sample_flags: list, sampling_seqs: list) -> "FixedInputs":
        """What stays the same while the same sequences decode in the same rows: the rows, query starts,
        sample rows and the sampling settings, uploaded once. counts: tokens per sequence (None: one each)."""
        batch, num_sampling = len(rows), len(sampling_seqs)
        rows_np = np.array(rows, dtype=np.int64)
        if counts is None:
            query_start = np.arange(batch + 1, dtype=np.int64)
        else:
            query_start = np.zeros(batch + 1, dtype=np.int64)
            np.cumsum(counts, out=query_start[1:])
        flags = None if num_sampling == batch else np.array(sample_flags, dtype=bool)
        srows = rows_np if flags is None else rows_np[flags]
        sample_rows = query_start[1:] - 1 if flags is None else query_start[1:][flags] - 1
        temperature, top_p, penalty, top_k = (self.temperature[srows], self.top_p[srows], self.penalty[srows],
                                              self.top_k[srows])
        # the fp32 settings travel as int32 bit patterns (a view each way)
        (sample_rows_d, srows_d, top_k_d), (query_start_d, temperature_d, top_p_d, penalty_d) = self.upload_packed(
            [sample_rows, srows, top_k], [query_start, temperature.view(np.int32),
                                          top_p.view(np.int32), penalty.view(np.int32)])
        fixed = FixedInputs(rows=rows_np, rows_slice=_as_slice(rows_np), table_base=rows_np * self.block_table.shape[1],
                            query_start=query_start, query_start_d=query_start_d, sample_flags=flags,
                            num_sampling=num_sampling,
                            sample_rows_d=sample_rows_d, batch_rows_d=srows_d, seqs=sampling_seqs)
        if not num_sampling:
            return fixed
        sampled = temperature > 0
        filtered = sampled & ((top_k > 0) | (top_p < 1.0))
        widths = np.where(top_k[filtered] > 0, np.minimum(top_k[filtered], self.vocab_size), self.vocab_size)
        logprobs = self.num_logprobs[srows].tolist()
        fixed.penalised = bool((penalty != 1.0).any())
        seen_rows = _as_slice(srows)
        fixed.seen_rows = seen_rows if isinstance(seen_rows, slice) else srows_d
        fixed.logprobs = logprobs
        fixed.needs_keys = bool(sampled.any())
        fixed.folded_seeds, fixed.num_prompt = fold_seeds(self.seed[srows]), self.num_prompt[srows]
        fixed.sampling_fields = dict(
            temperatures=temperature_d.view(torch.float32), top_ks=top_k_d, top_ps=top_p_d.view(torch.float32),
            repetition_penalties=penalty_d.view(torch.float32), seeds=None, steps=None,
            num_logprobs=max(logprobs), all_greedy=not fixed.needs_keys, all_sampled=bool(sampled.all()),
            penalties_at_least_one=bool((penalty >= 1).all()), any_top_k=bool((top_k[sampled] > 0).any()),
            any_top_p=bool((top_p[sampled] < 1.0).any()),
            num_candidates=int(widths.max()) if len(widths) else 0, any_unfiltered=bool((sampled & ~filtered).any()))
        fixed.sampling = SamplingBatch(**fixed.sampling_fields)
        return fixed


@dataclass
class FixedInputs:
    """The inputs of a batch that do not change from one decode step to the next (see InputBatch._fix)."""
    rows: np.ndarray                 # [B] int64
    rows_slice: object               # rows as a slice when they are consecutive (a view, not a gather)
    table_base: np.ndarray           # [B] int64: where each row starts in the flattened block table
    query_start: np.ndarray          # [B + 1] int64
    query_start_d: torch.Tensor      # [B + 1] int32
    sample_flags: Optional[np.ndarray]   # [B] bool, or None when every sequence samples
    num_sampling: int                # S
    sample_rows_d: torch.Tensor      # [S] int64
    batch_rows_d: torch.Tensor       # [S] int64: the sampling sequences' rows
    seqs: list                       # the S sampling sequences, in order
    penalised: bool = False
    seen_rows: object = None         # the sampling rows of the penalty mask: a slice, or an index tensor
    logprobs: list = dataclasses.field(default_factory=list)
    needs_keys: bool = False         # some row draws (temperature > 0)
    folded_seeds: Optional[np.ndarray] = None   # [S] uint32: fold_seeds of the rows' seeds
    num_prompt: Optional[np.ndarray] = None  # [S] int64
    sampling_fields: Optional[dict] = None    # SamplingBatch fields but keys and seen_mask, which change every step
    sampling: Optional[SamplingBatch] = None  # of those fields alone (a greedy step without penalty uses it as is)


def _views(flat, parts: list):
    """Consecutive views of the 1-D array or tensor flat in the shapes of parts (None stays None)."""
    at = 0
    for part in parts:
        if part is None:
            yield None
            continue
        view = flat[at:at + part.size]
        yield view if part.ndim == 1 else view.reshape(part.shape)
        at += part.size


def _as_slice(rows: np.ndarray):
    """rows as a slice when they are consecutive and increasing, so indexing by them is a view."""
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and (len(rows) == 1 or (np.diff(rows) == 1).all()):
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return rows
