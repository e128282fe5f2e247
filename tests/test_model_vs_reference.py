"""The engine's model against the independent float64 reference (tests/reference.py), on small random
checkpoints in the real layout: logits, greedy continuations, and the paged cache against recomputation."""
import pytest
import torch

from checkpoints import make_checkpoint, make_preset_checkpoint
from conftest import kernel_choices
from reference import reference_greedy, reference_logits
from xverse_engine import Engine, SamplingParams
from xverse_engine.layers.attention import AttentionMetadata

PROMPT = [7, 100, 33, 250, 9, 41, 41, 300, 12, 5, 77, 150, 201, 18, 64, 99, 3 + 10, 450, 23]


def engine_prompt_logits(engine, token_ids):
    """Logits [S, V] at every prompt position, through the engine's model and its paged KV cache
    (blocks 0.. of an idle engine, in reverse order so that the block table really matters)."""
    n = len(token_ids)
    bs = engine.runner.block_size
    nblocks = (n + bs - 1) // bs
    blocks = list(range(nblocks))[::-1]
    slots = [blocks[p // bs] * bs + p % bs for p in range(n)]
    meta = AttentionMetadata(slot_mapping=torch.tensor(slots), block_tables=torch.tensor([blocks], dtype=torch.int32),
                             context_lens=torch.tensor([n], dtype=torch.int32),
                             query_start_loc=torch.tensor([0, n], dtype=torch.int32), is_decode=False)
    with torch.inference_mode():
        hidden = engine.model(torch.tensor(token_ids), torch.arange(n), meta, engine.runner.kv_caches)
        return engine.model.compute_logits(hidden).double()


def assert_close_to_reference(engine, path, reference_data, ids=PROMPT):
    state_dict, config = reference_data(path)
    ids = [i % config["vocab_size"] for i in ids]
    expected = reference_logits(state_dict, config, ids)
    got = engine_prompt_logits(engine, ids)
    scale = expected.abs().max()
    err = (got - expected).abs().max() / scale
    assert err < 2e-5, f"max relative logit error {err:.2e} (scale {scale:.2f})"


@pytest.mark.parametrize("kernels", kernel_choices())
def test_logits_match_reference_moe(moe_ckpt, reference_data, kernels):
    engine = Engine(str(moe_ckpt), device="cpu", kernels=kernels, num_kv_blocks=64, show_progress=False)
    assert_close_to_reference(engine, moe_ckpt, reference_data)


@pytest.mark.parametrize("kernels", kernel_choices())
def test_logits_match_reference_real_head_dim_and_top6(real_head_ckpt, reference_data, kernels):
    engine = Engine(str(real_head_ckpt), device="cpu", kernels=kernels, num_kv_blocks=64, show_progress=False)
    assert engine.config.head_dim == 80 and engine.config.moe_top_k == 6
    assert_close_to_reference(engine, real_head_ckpt, reference_data)


@pytest.mark.parametrize("kernels", kernel_choices())
@pytest.mark.parametrize("preset", ["gqa", "dense"])
def test_logits_match_reference_variants(tmp_path, reference_data, preset, kernels):
    path = make_preset_checkpoint(tmp_path / preset, preset, max_position_embeddings=512)
    engine = Engine(str(path), device="cpu", kernels=kernels, num_kv_blocks=64, show_progress=False)
    assert_close_to_reference(engine, path, reference_data)


@pytest.mark.parametrize("fmt,shards,scaling", [("bin", 3, "linear"), ("safetensors", 1, "dynamic")])
def test_logits_match_reference_other_layouts(tmp_path, reference_data, fmt, shards, scaling):
    """.bin shards, a single unindexed file, and both rope_scaling kinds (dynamic within the trained length,
    where transformers keeps the base)."""
    path = make_checkpoint(tmp_path / fmt, fmt=fmt, num_shards=shards, max_position_embeddings=512,
                           rope_scaling={"type": scaling, "factor": 2.0})
    engine = Engine(str(path), device="cpu", kernels="torch", num_kv_blocks=64, max_model_len=512,
                    show_progress=False)
    assert_close_to_reference(engine, path, reference_data)


@pytest.mark.parametrize("kernels", kernel_choices())
def test_greedy_matches_reference_recomputation(real_head_ckpt, reference_data, kernels):
    """Decoding through the paged cache gives exactly the tokens of full recomputation at every step,
    with the checkpoint's repetition_penalty 1.1 applied as transformers does."""
    state_dict, config = reference_data(real_head_ckpt)
    prompt = [i % config["vocab_size"] for i in PROMPT]
    expected = reference_greedy(state_dict, config, prompt, 12, repetition_penalty=1.1)
    engine = Engine(str(real_head_ckpt), device="cpu", kernels=kernels, num_kv_blocks=64, block_size=8,
                    show_progress=False)
    out = engine.generate(prompt_token_ids=[prompt],
                          sampling_params=SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    assert out.token_ids == expected


def test_cpu_kernels_equal_torch_twins_on_many_blocks(real_head_ckpt):
    """kernels="cpu" and kernels="torch" give the same greedy tokens when prompts span many blocks."""
    prompts = [[(i * 37 + j * 11) % 500 + 6 for j in range(n)] for i, n in enumerate((40, 75, 9))]
    params = SamplingParams(max_new_tokens=10, temperature=0, repetition_penalty=1.0, ignore_eos=True)
    outs = {}
    for kernels in ("torch", "cpu"):
        engine = Engine(str(real_head_ckpt), device="cpu", kernels=kernels, num_kv_blocks=64, block_size=8,
                        show_progress=False)
        outs[kernels] = [o.token_ids for o in engine.generate(prompt_token_ids=prompts, sampling_params=params)]
    assert outs["cpu"] == outs["torch"]
