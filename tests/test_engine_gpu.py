"""The whole engine on a GPU (skipped without one): our CUDA kernels against the PyTorch twins inside the
model, CUDA-graph decode against eager, and the KV cache sized from free memory."""
import pytest
import torch

from checkpoints import make_checkpoint, make_preset_checkpoint
from xverse_engine import Engine, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PARAMS = SamplingParams(max_new_tokens=24, temperature=0, repetition_penalty=1.1, ignore_eos=True)


def prompts(n, vocab=500):
    return [[(i * 29 + j * 13) % (vocab - 6) + 6 for j in range(3 + (i * 11) % 70)] for i in range(n)]


@pytest.fixture(scope="module")
def head80_ckpt(tmp_path_factory):
    return make_preset_checkpoint(tmp_path_factory.mktemp("gpu_head80"), "real-head", dtype=torch.bfloat16,
                                  max_position_embeddings=1024)


def generate(path, **kw):
    engine = Engine(str(path), device="cuda", dtype=kw.pop("dtype", "bfloat16"), num_kv_blocks=kw.pop(
        "num_kv_blocks", 256), max_model_len=1024, show_progress=False, **kw)
    outs = engine.generate(prompt_token_ids=prompts(12), sampling_params=PARAMS)
    return engine, [o.token_ids for o in outs]


def test_cuda_graph_decode_equals_eager(head80_ckpt):
    graphed, with_graphs = generate(head80_ckpt, kernels="cuda", max_num_seqs=16)
    assert graphed.runner.use_cuda_graphs and graphed.runner.graphs
    _, eager = generate(head80_ckpt, kernels="cuda", max_num_seqs=16, enforce_eager=True)
    assert with_graphs == eager


def test_cuda_kernels_match_torch_twins_in_fp32(tmp_path):
    """In fp32 our kernels and the twins agree to rounding, so greedy tokens are identical."""
    path = make_checkpoint(tmp_path / "fp32", max_position_embeddings=1024)
    _, ours = generate(path, kernels="cuda", dtype="float32", enforce_eager=True)
    _, twins = generate(path, kernels="torch", dtype="float32", enforce_eager=True)
    assert ours == twins


def test_kv_cache_sized_from_free_memory(head80_ckpt):
    engine = Engine(str(head80_ckpt), device="cuda", kernels="cuda", max_model_len=1024,
                    gpu_memory_utilization=0.5, show_progress=False)
    free, total = torch.cuda.mem_get_info()
    kv_bytes = engine.runner.kv_cache.numel() * engine.runner.kv_cache.element_size()
    assert engine.runner.num_kv_blocks * engine.runner.block_size >= 1024
    assert kv_bytes <= 0.5 * total
    out = engine.generate(prompt_token_ids=prompts(4), sampling_params=PARAMS)
    assert all(len(o.token_ids) == 24 for o in out)
