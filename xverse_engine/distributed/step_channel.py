"""Rank 0 -> workers: the inputs of each step, packed so a step costs two broadcasts.

header [8] int64 on the CPU group: kind (STEP | STOP), T tokens, B sequences, block-table width,
S sample rows, is_decode. payload on the model's group (device memory under NCCL): every index tensor
of the step, as int64, back to back:
    input_ids [T] | positions [T] | slot_mapping [T] | block_tables [B * width] | context_lens [B]
    | query_start_loc [B + 1] | sample_rows [S]
"""
import torch
import torch.distributed as dist

from ..layers.attention import AttentionMetadata

STEP, STOP = 0, 1
HEADER = 8


class StepChannel:
    def __init__(self, tp, device):
        self.tp, self.device = tp, torch.device(device)

    def send(self, input_ids, positions, meta: AttentionMetadata, sample_rows):
        B, width = meta.block_tables.shape
        header = torch.tensor([STEP, input_ids.numel(), B, width, sample_rows.numel(), int(meta.is_decode), 0, 0],
                              dtype=torch.int64)
        parts = (input_ids, positions, meta.slot_mapping, meta.block_tables.reshape(-1), meta.context_lens,
                 meta.query_start_loc, sample_rows)
        payload = torch.cat([p.to(torch.int64) for p in parts])
        dist.broadcast(header, src=0, group=self.tp.cpu_group)
        dist.broadcast(payload, src=0, group=self.tp.group)

    def send_stop(self):
        dist.broadcast(torch.tensor([STOP] + [0] * (HEADER - 1), dtype=torch.int64), src=0, group=self.tp.cpu_group)

    def recv(self):
        """The next step's (input_ids, positions, meta, sample_rows), or None when rank 0 says stop."""
        header = torch.empty(HEADER, dtype=torch.int64)
        dist.broadcast(header, src=0, group=self.tp.cpu_group)
        kind, T, B, width, S, is_decode = header[:6].tolist()
        if kind == STOP:
            return None
        sizes = [T, T, T, B * width, B, B + 1, S]
        payload = torch.empty(sum(sizes), dtype=torch.int64, device=self.device)
        dist.broadcast(payload, src=0, group=self.tp.group)
        input_ids, positions, slots, tables, context_lens, query_start, sample_rows = payload.split(sizes)
        meta = AttentionMetadata(
            slot_mapping=slots, block_tables=tables.view(B, width).to(torch.int32),
            context_lens=context_lens.to(torch.int32), query_start_loc=query_start.to(torch.int32),
            is_decode=bool(is_decode))
        return input_ids, positions, meta, sample_rows
