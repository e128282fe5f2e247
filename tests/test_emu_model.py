"""The whole model with every custom op running its real CUDA kernel under the CPU SIMT emulator: the same
greedy tokens as the float64 reference (fp32: SIMT GEMM and attention paths) and as the C++ CPU kernels
(bf16: the tensor-core prefill and the weight-streaming decode GEMM)."""
import pytest
import torch

from reference import reference_greedy
from test_model_vs_reference import PROMPT
from xverse_engine import Engine, SamplingParams

pytestmark = [pytest.mark.emu, pytest.mark.slow]


class CountingNamespace:
    """Stands in for torch.ops.xverse: every op call goes to torch.ops.xverse_emu and is counted."""

    def __init__(self, emulated_namespace):
        self.emulated, self.calls = emulated_namespace, {}

    def __getattr__(self, name):
        op = getattr(self.emulated, name)

        def call(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return op(*args, **kwargs)
        return call


@pytest.fixture
def all_ops_emulated(emu, monkeypatch):
    namespace = CountingNamespace(torch.ops.xverse_emu)
    monkeypatch.setattr(torch.ops, "xverse", namespace)
    return namespace.calls


def greedy(path, dtype, prompts, max_new_tokens):
    engine = Engine(str(path), device="cpu", dtype=dtype, kernels="cpu", num_kv_blocks=64, block_size=8,
                    show_progress=False)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0, repetition_penalty=1.0, ignore_eos=True)
    return [o.token_ids for o in engine.generate(prompt_token_ids=prompts, sampling_params=params)]


def test_fp32_greedy_equals_the_reference(real_head_ckpt, reference_data, all_ops_emulated):
    state_dict, config = reference_data(real_head_ckpt)
    prompt = [i % config["vocab_size"] for i in PROMPT]
    expected = reference_greedy(state_dict, config, prompt, 6)
    assert greedy(real_head_ckpt, "float32", [prompt], 6) == [expected]
    for op in ("gating_topk", "moe_align", "moe_gate_up", "moe_down_combine", "paged_attention_prefill",
               "paged_attention_decode"):
        assert all_ops_emulated.get(op, 0) > 0, f"{op} never ran emulated: {all_ops_emulated}"


def test_bf16_greedy_equals_the_cpu_kernels(real_head_ckpt, all_ops_emulated, monkeypatch):
    prompts = [[(i * 37 + j * 11) % 500 + 6 for j in range(n)] for i, n in enumerate((21, 9))]
    emulated = greedy(real_head_ckpt, "bfloat16", prompts, 5)
    assert all_ops_emulated.get("paged_attention_decode", 0) > 0 and all_ops_emulated.get("moe_gate_up", 0) > 0
    monkeypatch.undo()  # back to the C++ CPU kernels
    assert emulated == greedy(real_head_ckpt, "bfloat16", prompts, 5)
