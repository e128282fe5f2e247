"""Dynamic-NTK RoPE beyond the trained length, against the float64 reference.

transformers' dynamic NTK scaling grows the rotary base once a sequence is longer than
max_position_embeddings: base' = base * (factor * L / max_pos - (factor - 1)) ** (D / (D - 2)) for a
sequence of length L. A paged cache cannot re-rotate keys already written, so the engine fixes L at the
longest length it serves (max_model_len), which is exactly the reference's computation for a sequence of
max_model_len tokens: that is the comparison made here, at every position, half of them past the trained
length.
"""
import pytest

from checkpoints import make_checkpoint
from reference import reference_logits
from test_model_vs_reference import engine_prompt_logits
from xverse_engine import Engine

TRAINED, FACTOR = 32, 2.0


@pytest.fixture(scope="module")
def dynamic_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("dynamic"), max_position_embeddings=TRAINED, rope_theta=10000,
                           rope_scaling={"type": "dynamic", "factor": FACTOR}, tokenizer=False)


@pytest.mark.parametrize("kernels", ["torch", "cpu"])
def test_dynamic_ntk_beyond_the_trained_length_matches_reference(dynamic_ckpt, reference_data, kernels):
    max_model_len = int(TRAINED * FACTOR)
    engine = Engine(str(dynamic_ckpt), device="cpu", kernels=kernels, num_kv_blocks=16, block_size=8,
                    max_model_len=max_model_len, show_progress=False)
    state_dict, config = reference_data(dynamic_ckpt)
    ids = [(7 * j + 3) % 500 + 6 for j in range(max_model_len)]
    expected = reference_logits(state_dict, config, ids)          # base grown for a 64-token sequence
    got = engine_prompt_logits(engine, ids)
    scale = expected.abs().max()
    err = ((got - expected).abs().max(dim=-1).values / scale)     # [S] per position
    assert err.max() < 2e-5, f"max relative logit error {err.max():.2e} at position {int(err.argmax())}"


def test_dynamic_ntk_base_really_grows(dynamic_ckpt, reference_data):
    """The comparison above can fail: the unscaled base gives logits far from the reference past the trained
    length (so a dynamic branch that never runs, or runs with the wrong length, is caught)."""
    state_dict, config = reference_data(dynamic_ckpt)
    ids = [(7 * j + 3) % 500 + 6 for j in range(int(TRAINED * FACTOR))]
    scaled = reference_logits(state_dict, config, ids)
    unscaled = reference_logits(state_dict, {**config, "rope_scaling": None}, ids)
    assert (scaled - unscaled)[TRAINED:].abs().max() / scaled.abs().max() > 1e-2
