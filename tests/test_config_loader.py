"""Bad inputs get clear errors: config.json, checkpoint files, and Engine arguments. Each error must name
what is wrong (the field, the tensor or the file), so a user can fix it without reading our code."""
import json
import os
import pathlib

import pytest
import torch

from checkpoints import make_checkpoint, make_config, random_weights, save_weights, write_json
from xverse_engine import Engine
from xverse_engine.config import ASSETS_DIR, ConfigError, ModelConfig
from xverse_engine.engine.model_runner import KVCacheTooSmall
from xverse_engine.loader import CheckpointError

SMALL = dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=16, num_experts=4,
             moe_top_k=2, vocab_size=300, max_position_embeddings=256, tokenizer=False)


def engine(path, **kwargs):
    kwargs = {"device": "cpu", "num_kv_blocks": 32, "show_progress": False, **kwargs}
    return Engine(str(path), **kwargs)


def small_config() -> dict:
    return make_config(**{k: v for k, v in SMALL.items() if k != "tokenizer"})


def write_config(path, **overrides) -> pathlib.Path:
    path.mkdir(parents=True, exist_ok=True)
    cfg = {**small_config(), **overrides}
    write_json(path / "config.json", {k: v for k, v in cfg.items() if v is not None})
    return path


def weights_dir(path, tensors, fmt="safetensors", num_shards=1):
    """A checkpoint directory holding SMALL's config.json and exactly `tensors`."""
    write_config(path)
    save_weights(path, tensors, fmt=fmt, num_shards=num_shards)
    return path


def small_weights():
    return random_weights(small_config())


# ---- config.json --------------------------------------------------------------------------------------

def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_pretrained(str(tmp_path))


def test_invalid_json(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "xverse", "hidden_size": ')
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        ModelConfig.from_pretrained(str(tmp_path))


def test_wrong_model_type(tmp_path):
    write_config(tmp_path, model_type="llama")
    with pytest.raises(ConfigError, match="model_type.*llama"):
        ModelConfig.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("field", ["hidden_size", "vocab_size", "num_hidden_layers", "intermediate_size"])
def test_missing_required_field(tmp_path, field):
    write_config(tmp_path, **{field: None})
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("overrides, field", [
    (dict(num_attention_heads=5), "num_attention_heads"),        # 32 is not divisible by 5
    (dict(num_key_value_heads=3, num_attention_heads=4), "num_key_value_heads"),
    (dict(hidden_size=-8), "hidden_size"),
    (dict(moe_top_k=9), "moe_top_k"),                            # more than num_experts=4
    (dict(rope_scaling={"type": "yarn", "factor": 2.0}), "rope_scaling"),
    (dict(eos_token_id=300), "eos_token_id"),                    # outside the vocabulary
])
def test_inconsistent_config_names_the_field(tmp_path, overrides, field):
    write_config(tmp_path, **overrides)
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_pretrained(str(tmp_path))


def test_real_preset_parses():
    config = ModelConfig.from_pretrained(os.path.join(ASSETS_DIR, "xverse-moe-a4.2b"))
    assert config.is_moe
    assert config.head_dim == 80
    assert (config.num_experts, config.moe_top_k, config.num_shared_experts) == (64, 6, 2)
    assert config.num_key_value_heads == 32          # absent from config.json: plain multi-head attention
    assert config.shared_intermediate_size == 3456
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (2560, 28, 100534)
    assert config.rope_theta == 500000 and not config.tie_word_embeddings


def test_dense_detected_when_num_experts_absent():
    raw = json.load(open(os.path.join(ASSETS_DIR, "xverse-moe-a4.2b", "config.json")))
    for key in ("num_experts", "moe_top_k", "num_shared_experts"):
        raw.pop(key)
    dense = ModelConfig.from_dict(raw)
    assert not dense.is_moe and dense.moe_top_k == 0 and dense.num_shared_experts == 0
    assert ModelConfig.from_dict({**raw, "num_experts": None}).is_moe is False


# ---- checkpoint files -------------------------------------------------------------------------------

def test_good_checkpoint_loads_exactly(tmp_path):
    tensors = small_weights()
    path = weights_dir(tmp_path, tensors, num_shards=2)
    params = dict(engine(path, dtype="float32").model.named_parameters())
    w13 = params["layers.0.mlp.w13"]
    assert torch.equal(w13[1, :16], tensors["model.layers.0.mlp.experts.1.gate_proj.weight"])
    assert torch.equal(w13[1, 16:], tensors["model.layers.0.mlp.experts.1.up_proj.weight"])
    assert torch.equal(params["lm_head.weight"], tensors["lm_head.weight"])


def test_missing_tensor(tmp_path):
    tensors = small_weights()
    del tensors["model.layers.0.self_attn.v_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing 1 tensor.*model\.layers\.0\.self_attn\.v_proj\.weight"):
        engine(weights_dir(tmp_path, tensors))


def test_unexpected_tensor(tmp_path):
    tensors = small_weights()
    tensors["model.layers.0.mlp.experts.4.gate_proj.weight"] = torch.zeros(16, 32)   # a 5th of 4 experts
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.experts\.4\.gate_proj"):
        engine(weights_dir(tmp_path, tensors))


def test_wrong_shape(tmp_path):
    tensors = small_weights()
    tensors["model.layers.0.mlp.experts.2.down_proj.weight"] = torch.zeros(32, 17)
    with pytest.raises(CheckpointError, match=r"experts\.2\.down_proj\.weight.*\(32, 17\).*\(32, 16\)"):
        engine(weights_dir(tmp_path, tensors))


def test_truncated_safetensors_shard(tmp_path):
    path = weights_dir(tmp_path, small_weights(), num_shards=2)
    shard = path / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        engine(path)


def test_corrupt_bin(tmp_path):
    path = weights_dir(tmp_path, small_weights(), fmt="bin")
    (path / "pytorch_model.bin").write_bytes(b"not a pickle, not a zip" * 10)
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        engine(path)


def test_bin_loads_with_weights_only(tmp_path):
    """A .bin is a pickle: it loads tensors, and refuses to run code hidden in it (weights_only)."""
    tensors = small_weights()
    good = weights_dir(tmp_path / "good", tensors, fmt="bin", num_shards=2)
    params = dict(engine(good, dtype="float32").model.named_parameters())
    assert torch.equal(params["embed_tokens.weight"], tensors["model.embed_tokens.weight"])

    marker = tmp_path / "code_ran"

    class Payload:  # unpickling this would create `marker`
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))
    evil = weights_dir(tmp_path / "evil", tensors, fmt="bin")
    torch.save({**tensors, "model.norm.weight": Payload()}, evil / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        engine(evil)
    assert not marker.exists()


def test_index_naming_a_missing_shard(tmp_path):
    path = weights_dir(tmp_path, small_weights(), num_shards=3)
    (path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        engine(path)


def test_directory_without_weights(tmp_path):
    write_config(tmp_path)
    with pytest.raises(CheckpointError, match="no weights.*load_format='dummy'"):
        engine(tmp_path)


def test_dummy_weights_are_finite_with_fp32_router(tmp_path):
    e = engine(write_config(tmp_path), load_format="dummy", dtype="bfloat16")
    for name, param in e.model.named_parameters():
        assert torch.isfinite(param.float()).all(), name
        expected = torch.float32 if name.endswith("router.weight") else torch.bfloat16
        assert param.dtype == expected, name
    assert e.model.layers[0].mlp.w13.float().std() > 0      # random, not left empty


# ---- Engine arguments -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), **SMALL)


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(dtype="float8"), ValueError, "dtype='float8'"),
    (dict(kernels="triton"), ValueError, "kernels='triton'"),
    (dict(tensor_parallel_size=3), ValueError, "tensor_parallel_size=3 does not divide"),
    (dict(tensor_parallel_size=0), ValueError, "tensor_parallel_size must be a positive integer"),
    (dict(load_format="gguf"), ValueError, "load_format='gguf'"),
    (dict(num_kv_blocks=4, block_size=16), KVCacheTooSmall, "max_model_len=256"),
    (dict(max_model_len=100000), ValueError, "max_model_len=100000"),
])
def test_bad_engine_arguments(ckpt, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        engine(ckpt, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when no GPU is visible")
def test_cuda_device_without_gpu(ckpt):
    with pytest.raises(ValueError, match="no CUDA GPU"):
        engine(ckpt, device="cuda")


def test_nonexistent_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        engine(tmp_path / "nope")
