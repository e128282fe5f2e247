"""ModelConfig as the spec says: Hugging Face's defaults for absent keys, every limit exactly where it is (the
last good value accepted, the first bad one refused), and every refusal naming the field and the bad value.
Also where a model name resolves to (presets shipped in the package, or a directory) and the
generation_config.json that supplies sampling defaults."""
import json
import os

import pytest

from xverse_engine.config import (ASSETS_DIR, DEFAULT_MODEL, PRESETS, ConfigError, ModelConfig,
                                  load_generation_config, resolve_model_path)

MINIMAL = {"model_type": "xverse", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 32,
           "num_hidden_layers": 2, "num_attention_heads": 4}
MOE = {**MINIMAL, "num_experts": 8, "moe_top_k": 2, "num_shared_experts": 2}


def test_absent_keys_take_the_hugging_face_defaults():
    config = ModelConfig.from_dict(MINIMAL)
    assert config.num_key_value_heads == 4                      # no GQA unless the config says so
    assert config.max_position_embeddings == 8192
    assert config.rms_norm_eps == 1e-6
    assert config.rope_theta == 10000.0
    assert config.rope_scaling is None
    assert config.tie_word_embeddings is False
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (1, 2, 3)
    assert config.torch_dtype == "bfloat16"
    assert not config.is_moe and (config.num_experts, config.moe_top_k, config.num_shared_experts) == (0, 0, 0)
    assert config.extra == {"model_type": "xverse"}


def test_present_keys_are_read():
    raw = {**MOE, "num_key_value_heads": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
           "rope_theta": 500000, "rope_scaling": {"type": "linear", "factor": 2.0}, "tie_word_embeddings": True,
           "pad_token_id": 0, "bos_token_id": 5, "eos_token_id": 7, "torch_dtype": "float16", "custom": 1}
    config = ModelConfig.from_dict(raw)
    assert (config.num_key_value_heads, config.max_position_embeddings, config.rms_norm_eps) == (2, 4096, 1e-5)
    assert config.rope_theta == 500000 and config.rope_scaling == {"type": "linear", "factor": 2.0}
    assert config.tie_word_embeddings is True
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 5, 7)
    assert config.torch_dtype == "float16"
    assert (config.num_experts, config.moe_top_k, config.num_shared_experts) == (8, 2, 2)
    assert config.shared_intermediate_size == 64 and config.head_dim == 16
    assert config.extra == {"model_type": "xverse", "custom": 1}


def test_moe_keys_are_ignored_without_num_experts():
    config = ModelConfig.from_dict({**MINIMAL, "moe_top_k": 6, "num_shared_experts": 2, "num_experts": None})
    assert (config.moe_top_k, config.num_shared_experts) == (0, 0)


def test_a_moe_config_without_shared_experts_has_none():
    config = ModelConfig.from_dict({**MOE, "num_shared_experts": None} | {"num_shared_experts": 0})
    assert config.num_shared_experts == 0
    assert ModelConfig.from_dict({k: v for k, v in MOE.items() if k != "num_shared_experts"}).num_shared_experts == 0
    assert ModelConfig.from_dict({k: v for k, v in MOE.items() if k != "moe_top_k"} | {"moe_top_k": 1}).moe_top_k == 1


def test_a_moe_config_without_moe_top_k_is_refused():
    """No default number of routed experts per token: a MoE config must say it (the error names the key)."""
    with pytest.raises(ConfigError, match=r"moe_top_k.*got 0"):
        ModelConfig.from_dict({k: v for k, v in MOE.items() if k != "moe_top_k"})


# (overrides that are still valid, overrides one step past the limit, the field the error must name[, words])
LIMITS = [
    ({"vocab_size": 1, "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}, {"vocab_size": 0}, "vocab_size"),
    ({"hidden_size": 4, "num_attention_heads": 2}, {"hidden_size": 0}, "hidden_size"),
    ({"intermediate_size": 1}, {"intermediate_size": 0}, "intermediate_size"),
    ({"num_hidden_layers": 1}, {"num_hidden_layers": 0}, "num_hidden_layers"),
    ({"num_attention_heads": 32, "hidden_size": 64}, {"num_attention_heads": 0}, "num_attention_heads"),
    ({"num_key_value_heads": 1}, {"num_key_value_heads": 0}, "num_key_value_heads"),
    ({"max_position_embeddings": 1}, {"max_position_embeddings": 0}, "max_position_embeddings"),
    ({"hidden_size": 64, "num_attention_heads": 4}, {"hidden_size": 66, "num_attention_heads": 4}, "num_attention_heads"),
    ({"hidden_size": 8, "num_attention_heads": 4}, {"num_attention_heads": 4, "hidden_size": 12}, "hidden_size",
     "head_dim 3 must be even"),
    ({"num_key_value_heads": 2}, {"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"rms_norm_eps": 1e-12}, {"rms_norm_eps": 0.0}, "rms_norm_eps"),
    ({"rope_theta": 0.5}, {"rope_theta": 0.0}, "rope_theta"),
    ({"moe_top_k": 1}, {"moe_top_k": 0}, "moe_top_k"),
    ({"num_experts": 8, "moe_top_k": 8}, {"num_experts": 8, "moe_top_k": 9}, "moe_top_k"),
    ({"num_experts": 256, "moe_top_k": 8}, {"num_experts": 257}, "num_experts"),
    ({"num_experts": 16, "moe_top_k": 8}, {"num_experts": 16, "moe_top_k": 9}, "moe_top_k"),
    ({"num_shared_experts": 0}, {"num_shared_experts": -1}, "num_shared_experts"),
    ({"rope_scaling": {"type": "linear", "factor": 1}}, {"rope_scaling": {"type": "linear", "factor": 0.99}},
     "rope_scaling"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, {"rope_scaling": {"type": "yarn", "factor": 2.0}},
     "rope_scaling"),
    ({"rope_scaling": {"type": "dynamic", "factor": 4}}, {"rope_scaling": {"type": "dynamic"}}, "rope_scaling"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2}}, {"rope_scaling": {"rope_type": "ntk", "factor": 2}},
     "rope_scaling"),
    ({"pad_token_id": 0}, {"pad_token_id": -1}, "pad_token_id"),
    ({"bos_token_id": 511}, {"bos_token_id": 512}, "bos_token_id"),
    ({"eos_token_id": 0}, {"eos_token_id": 512}, "eos_token_id"),
]


LIMITS = [case if len(case) == 4 else (*case, None) for case in LIMITS]   # 4th: the message's expected words


@pytest.mark.parametrize("good,bad,field,fragment", LIMITS, ids=[f"{c[2]}-{list(c[1].values())[-1]}" for c in LIMITS])
def test_limits_are_exact_and_errors_name_the_field(good, bad, field, fragment):
    ModelConfig.from_dict({**MOE, **good})
    with pytest.raises(ConfigError) as error:
        ModelConfig.from_dict({**MOE, **bad})
    message = str(error.value)
    assert message.startswith(f"config field {field!r}: "), message
    bad_value = bad.get(field, list(bad.values())[-1])
    expected = fragment or (None if isinstance(bad_value, dict) else str(bad_value))
    if expected:
        assert expected in message, message


def test_rope_scaling_error_names_the_bad_type_and_factor():
    with pytest.raises(ConfigError, match=r"type must be 'linear' or 'dynamic', got 'yarn'"):
        ModelConfig.from_dict({**MOE, "rope_scaling": {"type": "yarn", "factor": 2.0}})
    with pytest.raises(ConfigError, match=r"factor must be a number >= 1, got '2'"):
        ModelConfig.from_dict({**MOE, "rope_scaling": {"type": "linear", "factor": "2"}})


def test_non_integer_sizes_are_refused():
    with pytest.raises(ConfigError, match=r"'hidden_size': must be a positive integer, got 64.0"):
        ModelConfig.from_dict({**MOE, "hidden_size": 64.0})


def test_a_missing_required_field_is_named():
    with pytest.raises(ConfigError, match=r"missing required field\(s\) \['hidden_size'\]"):
        ModelConfig.from_dict({k: v for k, v in MOE.items() if k != "hidden_size"})


def test_only_xverse_checkpoints_are_accepted():
    with pytest.raises(ConfigError, match=r"expected 'xverse', got 'llama'; this engine runs XVERSE"):
        ModelConfig.from_dict({**MOE, "model_type": "llama"})


# ---- where a model comes from ----------------------------------------------------------------------------------

def test_no_model_means_the_embedded_default(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path(None) == os.path.join(ASSETS_DIR, DEFAULT_MODEL)
    for name in PRESETS:
        assert resolve_model_path(name) == os.path.join(ASSETS_DIR, name)
        assert os.path.isfile(os.path.join(resolve_model_path(name), "config.json"))


def test_a_local_directory_wins_over_a_preset_of_the_same_name(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / DEFAULT_MODEL).mkdir()
    assert resolve_model_path(DEFAULT_MODEL) == DEFAULT_MODEL
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)


def test_bad_model_paths_say_what_to_give(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; give a checkpoint directory .* presets"):
        resolve_model_path(str(tmp_path / "nope"))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match=r"is a file; give the checkpoint's directory"):
        resolve_model_path(str(tmp_path / "weights.bin"))


def test_generation_config_is_read_from_the_checkpoint(tmp_path, monkeypatch):
    assert load_generation_config(str(tmp_path)) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_k": 30}))
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)                 # the file is found beside config.json, not in the cwd
    assert load_generation_config(str(tmp_path)) == {"top_k": 30}
    (other / "generation_config.json").write_text(json.dumps({"top_k": 1}))
    assert load_generation_config(str(tmp_path)) == {"top_k": 30}
