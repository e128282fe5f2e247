"""Small random XVERSE checkpoints in the real on-disk layout, for tests.

    path = make_checkpoint(tmp_path / "ckpt")                         # MoE, 2 safetensors shards
    path = make_checkpoint(tmp_path / "ckpt", fmt="bin", num_shards=3)
    path = make_preset_checkpoint(tmp_path / "ckpt", "real-head")     # head_dim 80, top-6 of 12
    sd, cfg = load_state_dict(path), load_config(path)                # feed tests/reference.py

A directory holds config.json, generation_config.json, tokenizer.json (+ special_tokens_map.json),
and the weights: `model-0000X-of-0000N.safetensors` + `model.safetensors.index.json`, or
`pytorch_model-0000X-of-0000N.bin` + `pytorch_model.bin.index.json` (one shard: `model.safetensors`
or `pytorch_model.bin`, no index, as Hugging Face writes them). Router weights are float32 always.

Weight scales: norms near 1 (random, so a missing weight multiply shows), projections
~1/sqrt(fan_in) so activations stay O(1), router ~1.5/sqrt(H) so routing differs from token to
token, lm_head ~3/sqrt(H) so logits are O(1) with clear argmax margins.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

try:  # imported as tests.checkpoints or as a top-level module (pytest rootdir / sys.path)
    from .tokenizer_builder import SPECIAL_TOKENS, make_tokenizer_json
except ImportError:
    from tokenizer_builder import SPECIAL_TOKENS, make_tokenizer_json

GENERATION_CONFIG = {  # the release's generation_config.json
    "pad_token_id": 1,
    "bos_token_id": 2,
    "eos_token_id": 3,
    "temperature": 0.5,
    "top_k": 30,
    "top_p": 0.85,
    "repetition_penalty": 1.1,
    "do_sample": False,
}

SPECIAL_TOKENS_MAP = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "pad_token": "<pad>",
    "additional_special_tokens_with_ids": {t: i for i, t in enumerate(SPECIAL_TOKENS)},
}

PRESETS: dict[str, dict] = {
    # The real head_dim (80) and top_k (6); 12 experts so the choice of 6 still varies.
    "real-head": dict(hidden_size=160, num_attention_heads=2, num_experts=12, moe_top_k=6, intermediate_size=48),
    # Grouped-query attention (as XVERSE-MoE-A36B, which sets num_key_value_heads).
    "gqa": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2),
    # Dense XVERSE (mlp.{gate,up,down}_proj, no num_experts in config.json).
    "dense": dict(dense=True, intermediate_size=96),
}

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def make_config(*, hidden_size: int = 64, num_attention_heads: int = 4, num_key_value_heads: int | None = None,
                num_hidden_layers: int = 2, intermediate_size: int = 32, num_experts: int = 8, moe_top_k: int = 2,
                num_shared_experts: int = 2, vocab_size: int = 512, dtype: torch.dtype = torch.float32,
                rope_scaling: dict | None = None, dense: bool = False, **extra_config) -> dict:
    """config.json contents with the real file's keys (MODEL.md, model-facts/config.json)."""
    cfg = {
        "architectures": ["XverseForCausalLM"],
        "model_type": "xverse",
        "pad_token_id": 1,
        "bos_token_id": 2,
        "eos_token_id": 3,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": 8192,
        "max_tokenizer_truncation": 6144,
        "num_attention_heads": num_attention_heads,
        "num_hidden_layers": num_hidden_layers,
        "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False,
        "rope_theta": 500000,
        "moe_top_k": moe_top_k,
        "num_experts": num_experts,
        "num_shared_experts": num_shared_experts,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.01,
        "torch_dtype": DTYPE_NAMES[dtype],
        "transformers_version": "4.38.2",
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    if dense:
        for key in ("moe_top_k", "num_experts", "num_shared_experts", "output_router_logits", "router_aux_loss_coef"):
            del cfg[key]
    if num_key_value_heads is not None:
        cfg["num_key_value_heads"] = num_key_value_heads
    if rope_scaling is not None:
        cfg["rope_scaling"] = rope_scaling
    cfg.update(extra_config)
    return cfg


def weight_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, in Hugging Face order, with its shape (MODEL.md)."""
    H, V, L = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]
    N = config["num_attention_heads"]
    D = H // N
    K = config.get("num_key_value_heads") or N
    I = config["intermediate_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H)}
    for i in range(L):
        pre = f"model.layers.{i}."
        shapes[pre + "input_layernorm.weight"] = (H,)
        shapes[pre + "self_attn.q_proj.weight"] = (N * D, H)
        shapes[pre + "self_attn.k_proj.weight"] = (K * D, H)
        shapes[pre + "self_attn.v_proj.weight"] = (K * D, H)
        shapes[pre + "self_attn.o_proj.weight"] = (H, N * D)
        shapes[pre + "post_attention_layernorm.weight"] = (H,)
        mlps = []
        if config.get("num_experts") is None:
            mlps.append((pre + "mlp.", I))
        else:
            shapes[pre + "mlp.router.weight"] = (config["num_experts"], H)
            mlps += [(f"{pre}mlp.experts.{e}.", I) for e in range(config["num_experts"])]
            if config.get("num_shared_experts"):
                mlps.append((pre + "mlp.shared_experts.", config["num_shared_experts"] * I))
        for mp, inter in mlps:
            shapes[mp + "gate_proj.weight"] = (inter, H)
            shapes[mp + "up_proj.weight"] = (inter, H)
            shapes[mp + "down_proj.weight"] = (H, inter)
    shapes["model.norm.weight"] = (H,)
    shapes["lm_head.weight"] = (V, H)
    return shapes


def random_weights(config: dict, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights with the scales described at the top; router float32, the rest in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    H = config["hidden_size"]
    out = {}
    for name, shape in weight_shapes(config).items():
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name == "model.embed_tokens.weight":
            t = torch.randn(shape, generator=g)
        elif name == "lm_head.weight":
            t = torch.randn(shape, generator=g) * (3.0 / H**0.5)
        elif name.endswith("router.weight"):
            t = torch.randn(shape, generator=g) * (1.5 / H**0.5)
        else:  # projections [out, in]: unit-variance outputs for unit-variance inputs
            t = torch.randn(shape, generator=g) / shape[1] ** 0.5
        out[name] = t.to(torch.float32 if name.endswith("router.weight") else dtype)
    return out


def _split_shards(names: list[str], tensors: dict[str, torch.Tensor], num_shards: int) -> list[list[str]]:
    """Contiguous groups of tensor names of roughly equal bytes (as HF's max_shard_size does)."""
    if not 1 <= num_shards <= len(names):
        raise ValueError(f"num_shards must be in 1..{len(names)}, got {num_shards}")
    sizes = [tensors[n].numel() * tensors[n].element_size() for n in names]
    target = sum(sizes) / num_shards
    shards: list[list[str]] = [[]]
    acc = 0.0
    for i, (n, s) in enumerate(zip(names, sizes)):
        left_names, left_shards = len(names) - i, num_shards - len(shards)
        # start a new shard when this one is full, or when every remaining shard needs a tensor
        if shards[-1] and left_shards > 0 and (acc + s / 2 > target * len(shards) or left_names <= left_shards):
            shards.append([])
        shards[-1].append(n)
        acc += s
    assert len(shards) == num_shards
    return shards


def save_weights(path: str | Path, tensors: dict[str, torch.Tensor], *, fmt: str = "safetensors",
                 num_shards: int = 1) -> list[Path]:
    """Write `tensors` as HF shards (+ index when num_shards > 1). Returns the weight files."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        stem, ext, index_name = "model", "safetensors", "model.safetensors.index.json"

        def write(chunk: dict, file: Path) -> None:
            save_file(chunk, str(file), metadata={"format": "pt"})
    elif fmt == "bin":
        stem, ext, index_name = "pytorch_model", "bin", "pytorch_model.bin.index.json"

        def write(chunk: dict, file: Path) -> None:
            torch.save(chunk, file)
    else:
        raise ValueError(f"fmt must be 'safetensors' or 'bin', got {fmt!r}")

    names = list(tensors)
    if num_shards == 1:
        file = path / f"{stem}.{ext}"
        write({n: tensors[n].contiguous() for n in names}, file)
        return [file]
    files, weight_map = [], {}
    for j, group in enumerate(_split_shards(names, tensors, num_shards)):
        file = path / f"{stem}-{j + 1:05d}-of-{num_shards:05d}.{ext}"
        write({n: tensors[n].contiguous() for n in group}, file)
        files.append(file)
        weight_map.update({n: file.name for n in group})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / index_name).write_text(json.dumps(index, indent=2) + "\n")
    return files


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_checkpoint(path: str | Path, *, hidden_size: int = 64, num_attention_heads: int = 4,
                    num_key_value_heads: int | None = None, num_hidden_layers: int = 2, intermediate_size: int = 32,
                    num_experts: int = 8, moe_top_k: int = 2, num_shared_experts: int = 2, vocab_size: int = 512,
                    fmt: str = "safetensors", num_shards: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0,
                    tokenizer: bool = True, rope_scaling: dict | None = None, dense: bool = False,
                    **extra_config) -> Path:
    """Write a random XVERSE checkpoint directory at `path` (created) and return it.

    extra_config: more config.json keys, e.g. rope_theta=10000, max_position_embeddings=256.
    tokenizer=True needs vocab_size >= 264 (6 special + >= 2 BPE + 256 byte tokens).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = make_config(hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                      num_key_value_heads=num_key_value_heads, num_hidden_layers=num_hidden_layers,
                      intermediate_size=intermediate_size, num_experts=num_experts, moe_top_k=moe_top_k,
                      num_shared_experts=num_shared_experts, vocab_size=vocab_size, dtype=dtype,
                      rope_scaling=rope_scaling, dense=dense, **extra_config)
    if hidden_size % num_attention_heads or num_attention_heads % (num_key_value_heads or num_attention_heads):
        raise ValueError("hidden_size must divide by num_attention_heads, and heads by num_key_value_heads")
    write_json(path / "config.json", cfg)
    write_json(path / "generation_config.json", GENERATION_CONFIG)
    save_weights(path, random_weights(cfg, seed=seed, dtype=dtype), fmt=fmt, num_shards=num_shards)
    if tokenizer:
        make_tokenizer_json(path, vocab_size)
        write_json(path / "special_tokens_map.json", SPECIAL_TOKENS_MAP)
    return path


def make_preset_checkpoint(path: str | Path, preset: str, **overrides) -> Path:
    """make_checkpoint with one of PRESETS ("real-head", "gqa", "dense"), overridable."""
    return make_checkpoint(path, **{**PRESETS[preset], **overrides})


def load_config(path: str | Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (either format, sharded or not), as stored."""
    path = Path(path)
    files: list[Path] = []
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index_name).exists():
            weight_map = json.loads((path / index_name).read_text())["weight_map"]
            files = [path / f for f in dict.fromkeys(weight_map.values())]
            break
    else:
        files = [f for f in (path / "model.safetensors", path / "pytorch_model.bin") if f.exists()]
    if not files:
        raise FileNotFoundError(f"no weights in {path}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            out.update(load_file(str(f)))
        else:
            out.update(torch.load(f, map_location="cpu", weights_only=True))
    return out
