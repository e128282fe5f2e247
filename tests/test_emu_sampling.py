"""The CUDA kernel of the sampler's fused draw (csrc/sampling/draw_top_k_top_p.cu) on the CPU SIMT emulator
(torch.ops.xverse_emu.draw_top_k_top_p) against its twin: one warp per row, widths that cover one lane, a part
of a warp, several warp-sized chunks with a tail (the scan's carry) and the kernel's 1024 limit; the launcher's
checks."""
import pytest
import torch

import test_sampling_ops as sampling_cases
from xverse_engine.ops import sampling

pytestmark = pytest.mark.emu


@pytest.mark.parametrize("rows,width", [(3, 1), (10, 7), (20, 32), (12, 45), (10, 100), (2, 1024)])
def test_draw_top_k_top_p(emu, rows, width):
    for seed in range(2):
        args = sampling_cases.draw_inputs(rows, width, seed=seed)
        expected = sampling.draw_top_k_top_p_torch(*args)
        assert torch.equal(emu.draw_top_k_top_p(*args), expected), f"emulated draw B={rows} K={width} seed={seed}"


def test_hand_made_rules(emu):
    """The exact top-p boundary (equal values: the rank whose mass before equals top_p is removed), and rank 0
    when every value is -inf or top_p = 0."""
    rows = 64
    boundary = (torch.zeros(rows, 4), torch.tensor([[10, 11, 12, 13]]).repeat(rows, 1),
                torch.zeros(rows, dtype=torch.int64), torch.full((rows,), 0.5), torch.arange(rows) * 7919)
    assert set(emu.draw_top_k_top_p(*boundary).tolist()) == {10, 11}
    values = torch.tensor([[float("-inf")] * 5, [3.0, 2.0, 1.0, 0.0, -1.0]])
    token_ids = torch.tensor([[40, 41, 42, 43, 44], [50, 51, 52, 53, 54]])
    nothing_kept = (values, token_ids, torch.tensor([0, 0]), torch.tensor([1.0, 0.0]), torch.tensor([123, 456]))
    assert emu.draw_top_k_top_p(*nothing_kept).tolist() == [40, 50]


def test_launcher_checks(emu):
    args = sampling_cases.draw_inputs(2, sampling.MAX_CUDA_CANDIDATES + 1)
    with pytest.raises(RuntimeError, match="at most 1024 candidates per row, got K = 1025"):
        emu.draw_top_k_top_p(*args)
    values, token_ids, top_ks, top_ps, keys = sampling_cases.draw_inputs(2, 8)
    with pytest.raises(RuntimeError, match="top_ps must be float32"):
        emu.draw_top_k_top_p(values, token_ids, top_ks, top_ps.double(), keys)
    assert emu.draw_top_k_top_p(*sampling_cases.draw_inputs(0, 8)).shape == (0,)
