"""ModelConfig: the model's shape, read from a checkpoint's config.json and validated with clear errors.

XVERSE checkpoints all declare `XverseForCausalLM`; a mixture-of-experts one is recognised by
`num_experts` being set (MODEL.md). Presets ship inside the package (assets/<name>/config.json).
"""
import json
import os
from dataclasses import dataclass, field
from typing import Optional

ASSETS_DIR = os.path.join(os.path.dirname(__file__), "assets")
DEFAULT_MODEL = "tiny-xverse-moe"
PRESETS = ("tiny-xverse-moe", "xverse-moe-a4.2b")


class ConfigError(ValueError):
    """A config.json that cannot describe an XVERSE model; the message names the field."""


def resolve_model_path(model: Optional[str]) -> str:
    """A checkpoint directory, or a preset name shipped in the package (None: the embedded default)."""
    if model is None:
        model = DEFAULT_MODEL
    if model in PRESETS and not os.path.isdir(model):
        return os.path.join(ASSETS_DIR, model)
    if not os.path.exists(model):
        raise FileNotFoundError(f"model path {model!r} does not exist; give a checkpoint directory holding "
                                f"config.json, or one of the presets {PRESETS}")
    if not os.path.isdir(model):
        raise NotADirectoryError(f"model {model!r} is a file; give the checkpoint's directory")
    return model


@dataclass(slots=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int             # one routed expert's (MoE) or the MLP's (dense) intermediate size
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None    # {"type": "linear" | "dynamic", "factor": float}
    num_experts: int = 0                   # 0: a dense XVERSE model
    moe_top_k: int = 0
    num_shared_experts: int = 0
    tie_word_embeddings: bool = False
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 3
    torch_dtype: str = "bfloat16"
    extra: dict = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def shared_intermediate_size(self) -> int:
        """The shared experts run as ONE SwiGLU MLP of num_shared_experts * intermediate_size."""
        return self.num_shared_experts * self.intermediate_size

    def __post_init__(self):
        def need(condition, field_name, problem):
            if not condition:
                raise ConfigError(f"config field {field_name!r}: {problem}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, name, f"must be a positive integer, got {value!r}")
        need(self.hidden_size % self.num_attention_heads == 0, "num_attention_heads",
             f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        need(self.head_dim % 2 == 0, "hidden_size", f"head_dim {self.head_dim} must be even for RoPE")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
             f"{self.num_key_value_heads}")
        need(self.rms_norm_eps > 0, "rms_norm_eps", f"must be positive, got {self.rms_norm_eps}")
        need(self.rope_theta > 0, "rope_theta", f"must be positive, got {self.rope_theta}")
        if self.is_moe:
            need(1 <= self.moe_top_k <= self.num_experts, "moe_top_k",
                 f"must be between 1 and num_experts={self.num_experts}, got {self.moe_top_k}")
            need(self.num_experts <= 256, "num_experts", f"at most 256 experts are supported, got {self.num_experts}")
            need(self.moe_top_k <= 8, "moe_top_k", f"at most 8 are supported, got {self.moe_top_k}")
            need(self.num_shared_experts >= 0, "num_shared_experts", f"must be >= 0, got {self.num_shared_experts}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            need(kind in ("linear", "dynamic"), "rope_scaling",
                 f"type must be 'linear' or 'dynamic', got {kind!r}")
            factor = self.rope_scaling.get("factor")
            need(isinstance(factor, (int, float)) and factor >= 1, "rope_scaling",
                 f"factor must be a number >= 1, got {factor!r}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            need(value is None or 0 <= value < self.vocab_size, name, f"{value} is outside the vocabulary")

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type != "xverse":
            raise ConfigError(f"config field 'model_type': expected 'xverse', got {model_type!r}; this engine runs "
                              f"XVERSE checkpoints only")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [key for key in required if key not in raw]
        if missing:
            raise ConfigError(f"config.json is missing required field(s) {missing}")
        num_experts = raw.get("num_experts") or 0
        known = {f.name for f in cls.__dataclass_fields__.values()}
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=raw["num_attention_heads"],
            # absent or null: as many KV heads as query heads (no GQA); 0 is refused by the validation
            num_key_value_heads=(raw["num_attention_heads"] if raw.get("num_key_value_heads") is None
                                 else raw["num_key_value_heads"]),
            max_position_embeddings=raw.get("max_position_embeddings", 8192),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=raw.get("rope_theta", 10000.0),
            rope_scaling=raw.get("rope_scaling"),
            num_experts=num_experts,
            moe_top_k=raw.get("moe_top_k", 0) if num_experts else 0,
            num_shared_experts=raw.get("num_shared_experts", 0) if num_experts else 0,
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            pad_token_id=raw.get("pad_token_id", 1),
            bos_token_id=raw.get("bos_token_id", 2),
            eos_token_id=raw.get("eos_token_id", 3),
            torch_dtype=raw.get("torch_dtype", "bfloat16"),
            extra={k: v for k, v in raw.items() if k not in known},
        )

    @classmethod
    def from_pretrained(cls, path: str) -> "ModelConfig":
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"no config.json in {path!r}: is this a Hugging Face checkpoint directory?")
        try:
            with open(config_file) as f:
                raw = json.load(f)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{config_file} is not valid JSON: {error}") from None
        return cls.from_dict(raw)


def load_generation_config(path: str) -> dict:
    """The checkpoint's generation_config.json (sampling defaults the release intends), or {}."""
    file = os.path.join(path, "generation_config.json")
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        return json.load(f)
