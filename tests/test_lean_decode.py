"""The lean decode path at model level: operations dispatched per decoder layer in one decode step (goal
<= 12 on the MoE model), the lean layer against the unfused one and the float64 reference, and graph padding
rows that route to no expert."""
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from checkpoints import make_checkpoint
from reference import reference_greedy
from xverse_engine import Engine, SamplingParams
from xverse_engine.layers.attention import AttentionMetadata
from xverse_engine.loader import load_weights
from xverse_engine.model import XverseForCausalLM

MAX_OPS_PER_LAYER = 12


class LayerOpCounter(TorchDispatchMode):
    """Counts every computing aten / xverse op (views excluded) dispatched inside each decoder layer."""

    def __init__(self, layers):
        super().__init__()
        self.per_layer = [Counter() for _ in layers]
        self.current = None
        self.hooks = []
        for i, layer in enumerate(layers):
            self.hooks.append(layer.register_forward_pre_hook(lambda module, args, i=i: self._enter(i)))
            self.hooks.append(layer.register_forward_hook(lambda module, args, out: self._enter(None)))

    def _enter(self, layer):
        self.current = layer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.current is not None and not func.is_view:
            self.per_layer[self.current][f"{func.namespace}.{func._schema.name.split('::')[-1]}"] += 1
        return func(*args, **(kwargs or {}))

    def remove(self):
        for hook in self.hooks:
            hook.remove()


def decode_step_op_counts(engine, prompt):
    engine.add_request(prompt_token_ids=prompt, params=SamplingParams(max_new_tokens=4, ignore_eos=True))
    engine.step()  # prefill
    counter = LayerOpCounter(engine.model.layers)
    try:
        with torch.inference_mode(), counter:
            engine.step()  # one decode step
    finally:
        counter.remove()
    return counter.per_layer


def test_decode_ops_per_layer_at_most_12():
    """The embedded MoE model (bf16, 8 experts top-2 + 2 shared), kernels="cpu": one decode step."""
    engine = Engine(device="cpu", kernels="cpu", dtype="bfloat16", num_kv_blocks=32, max_model_len=256,
                    show_progress=False)
    assert engine.config.is_moe and engine.config.num_shared_experts == 2
    assert engine.model.embed_tokens.weight.dtype == torch.bfloat16
    per_layer = decode_step_op_counts(engine, [5, 17, 99, 250, 7])
    totals = [sum(c.values()) for c in per_layer]
    print(f"\nops per decoder layer in one decode step (kernels='cpu', bf16 MoE): {totals}; "
          f"layer 0: {dict(per_layer[0])}")
    assert all(t == totals[0] for t in totals), f"every layer dispatches the same ops: {totals}"
    assert totals[0] <= MAX_OPS_PER_LAYER, f"{totals[0]} ops per layer > {MAX_OPS_PER_LAYER}: {dict(per_layer[0])}"


def test_unfused_baseline_counts_more_ops():
    """The counter sees the unfused layer's many small ops (the baseline the lean path replaces)."""
    engine = Engine(device="cpu", kernels="cpu", dtype="bfloat16", num_kv_blocks=32, max_model_len=256,
                    show_progress=False)
    lean = sum(decode_step_op_counts(engine, [5, 17, 99])[0].values())
    unfused_model = XverseForCausalLM(engine.config, torch.bfloat16, torch.device("cpu"), "cpu",
                                      engine.runner.max_model_len, lean=False)
    load_weights(unfused_model, engine.config, engine.model_path, show_progress=False)
    engine.model = engine.runner.model = unfused_model
    unfused = sum(decode_step_op_counts(engine, [5, 17, 99])[0].values())
    print(f"\nops per layer: lean {lean}, unfused {unfused}")
    assert unfused > 2 * lean


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("bf16"), dtype=torch.bfloat16, max_position_embeddings=512)


@pytest.mark.parametrize("kernels", ["torch", "cpu"])
def test_lean_and_unfused_models_agree(real_head_ckpt, kernels):
    """Same checkpoint, lean vs unfused layer: the same greedy tokens, logits within fp32 rounding."""
    config_engine = Engine(str(real_head_ckpt), device="cpu", kernels=kernels, num_kv_blocks=64, block_size=8,
                           show_progress=False)
    prompts = [[(i * 37 + j * 11) % 500 + 6 for j in range(n)] for i, n in enumerate((12, 30, 5))]
    params = SamplingParams(max_new_tokens=8, temperature=0, repetition_penalty=1.0, ignore_eos=True)
    lean = [o.token_ids for o in config_engine.generate(prompt_token_ids=prompts, sampling_params=params)]
    unfused_model = XverseForCausalLM(config_engine.config, config_engine.model.embed_tokens.weight.dtype,
                                      torch.device("cpu"), kernels, config_engine.runner.max_model_len, lean=False)
    load_weights(unfused_model, config_engine.config, config_engine.model_path, show_progress=False)
    config_engine.model = config_engine.runner.model = unfused_model
    unfused = [o.token_ids for o in config_engine.generate(prompt_token_ids=prompts, sampling_params=params)]
    assert lean == unfused


@pytest.mark.parametrize("kernels", ["torch", "cpu"])
def test_greedy_bf16_matches_reference(bf16_ckpt, reference_data, kernels):
    """A bf16 checkpoint run in bf16 (the real dtype), lean path: greedy tokens equal the float64 reference's."""
    state_dict, config = reference_data(bf16_ckpt)
    prompt = [7, 100, 33, 250, 9, 41, 41, 300, 12, 5]
    expected = reference_greedy(state_dict, config, prompt, 8)
    engine = Engine(str(bf16_ckpt), device="cpu", dtype="bfloat16", kernels=kernels, num_kv_blocks=64, block_size=8,
                    show_progress=False)
    out = engine.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
        max_new_tokens=8, temperature=0, repetition_penalty=1.0, ignore_eos=True))[0]
    assert out.token_ids == expected


@pytest.mark.parametrize("kernels", ["torch", "cpu"])
def test_graph_padding_rows_route_to_no_expert(real_head_ckpt, kernels):
    """A decode batch padded as a CUDA graph pads it (rows with slot -1, context 0, stale inputs): align sees
    only the real row's pairs in every layer (no stale expert traffic), and the real row's output is unchanged."""
    engine = Engine(str(real_head_ckpt), device="cpu", kernels=kernels, num_kv_blocks=64, block_size=8,
                    show_progress=False)
    model, kv = engine.model, engine.runner.kv_caches
    prompt = list(range(10, 19))
    n = len(prompt)
    prefill = AttentionMetadata(torch.arange(n), torch.tensor([[0, 1]], dtype=torch.int32),
                                torch.tensor([n], dtype=torch.int32), torch.tensor([0, n], dtype=torch.int32), False)
    seen = []

    def decode(batch):
        # row 0 is the real token (slot n, position n); rows 1.. are padding with stale inputs
        slots = torch.full((batch,), -1, dtype=torch.int64)
        slots[0] = n
        tables = torch.zeros((batch, 2), dtype=torch.int32)
        tables[0] = torch.tensor([0, 1])
        lens = torch.zeros(batch, dtype=torch.int32)
        lens[0] = n + 1
        meta = AttentionMetadata(slots, tables, lens, torch.arange(batch + 1, dtype=torch.int32), True)
        ids = torch.full((batch,), 77, dtype=torch.int64)
        ids[0] = 5
        positions = torch.full((batch,), 3, dtype=torch.int64)
        positions[0] = n
        return model(ids, positions, meta, kv)[0]

    from xverse_engine.ops import moe as moe_ops
    original = moe_ops.op

    def spying_op(name, kernels_):
        impl = original(name, kernels_)
        if name != "moe_align":
            return impl

        def spy(ids, num_experts, block_m, token_mask=None):
            out = impl(ids, num_experts, block_m, token_mask)
            seen.append(int(out[2]))
            return out
        return spy

    with torch.inference_mode():
        model(torch.tensor(prompt), torch.arange(n), prefill, kv)
        moe_ops.op = spying_op
        try:
            alone = decode(1)
            alone_padded = list(seen)
            seen.clear()
            padded = decode(4)
        finally:
            moe_ops.op = original
    assert seen == alone_padded, f"padding rows changed the routed rows per layer: {seen} vs {alone_padded}"
    # equal up to the dense GEMMs' batch-size-dependent summation order
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)
