"""Checkpoint -> model parameters: sharded safetensors, sharded PyTorch .bin, or dummy random weights.

Shards stream one at a time (one tensor at a time for safetensors, memory-mapped for .bin), each tensor
copied straight into its slot of the model's parameters, so peak host memory stays near one shard.
Each checkpoint name maps to (parameter, slice): q/k/v rows of qkv_proj, expert e's gate/up/down rows
of the stacked w13 / w2, gate/up rows of a gate_up_proj. The shared experts' one SwiGLU of S * I goes into
the stack as S more experts of I (E .. E+S-1) when the model folds them there (MoE with lean=True): the
intermediate dim splits exactly, since down(silu(g) * u) is a sum over it. Every expected tensor must arrive exactly once
with its exact shape; anything else is an error naming the tensor and the file.

Tensor parallel: a `sharding` (distributed/sharding.py) says which rows or columns of each tensor this rank
holds; only those bytes are read (safetensors slices, memory-mapped .bin views), and other ranks' experts
are never touched, so a rank's host memory stays near its share of the model.
"""
import glob
import json
import os
import re

import torch
from tqdm import tqdm

LOAD_FORMATS = ("auto", "safetensors", "pt", "dummy")


class CheckpointError(ValueError):
    """A checkpoint that does not hold what the config says; the message names the tensor or file."""


def expected_tensors(config) -> dict:
    """Every tensor name of a Hugging Face XVERSE checkpoint for `config`, with its shape."""
    H, V, D = config.hidden_size, config.vocab_size, config.head_dim
    q_rows, kv_rows = config.num_attention_heads * D, config.num_key_value_heads * D
    names = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = (V, H)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        names[p + "input_layernorm.weight"] = (H,)
        names[p + "post_attention_layernorm.weight"] = (H,)
        names[p + "self_attn.q_proj.weight"] = (q_rows, H)
        names[p + "self_attn.k_proj.weight"] = (kv_rows, H)
        names[p + "self_attn.v_proj.weight"] = (kv_rows, H)
        names[p + "self_attn.o_proj.weight"] = (H, q_rows)
        if config.is_moe:
            I, S = config.intermediate_size, config.shared_intermediate_size
            names[p + "mlp.router.weight"] = (config.num_experts, H)
            for e in range(config.num_experts):
                names[p + f"mlp.experts.{e}.gate_proj.weight"] = (I, H)
                names[p + f"mlp.experts.{e}.up_proj.weight"] = (I, H)
                names[p + f"mlp.experts.{e}.down_proj.weight"] = (H, I)
            if S:
                names[p + "mlp.shared_experts.gate_proj.weight"] = (S, H)
                names[p + "mlp.shared_experts.up_proj.weight"] = (S, H)
                names[p + "mlp.shared_experts.down_proj.weight"] = (H, S)
        else:
            I = config.intermediate_size
            names[p + "mlp.gate_proj.weight"] = (I, H)
            names[p + "mlp.up_proj.weight"] = (I, H)
            names[p + "mlp.down_proj.weight"] = (H, I)
    return names


_EXPERT = re.compile(r"^(layers\.\d+\.mlp)\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_QKV = re.compile(r"^(layers\.\d+\.self_attn)\.([qkv])_proj\.weight$")
_GATE_UP = re.compile(r"^(layers\.\d+\.mlp(?:\.shared_experts)?)\.(gate|up)_proj\.weight$")
_SHARED = re.compile(r"^(layers\.\d+\.mlp)\.shared_experts\.(gate|up|down)_proj\.weight$")


def parameter_slot(params: dict, config, name: str) -> torch.Tensor:
    """The view of a model parameter that checkpoint tensor `name` fills."""
    short = name[len("model."):] if name.startswith("model.") else name
    m = _SHARED.match(short)
    if m and m.group(1) + ".shared_experts.gate_up_proj.weight" not in params:  # folded: experts E .. E+S-1
        prefix, which = m.group(1), m.group(2)
        E, I, S = config.num_experts, config.intermediate_size, config.num_shared_experts
        if which == "down":
            return params[prefix + ".w2"][E:E + S]                             # [S, H, I]
        rows = slice(0, I) if which == "gate" else slice(I, 2 * I)
        return params[prefix + ".w13"][E:E + S, rows]                         # [S, I, H]
    if m := _EXPERT.match(short):
        prefix, expert, which = m.group(1), int(m.group(2)), m.group(3)
        if which == "down":
            return params[prefix + ".w2"][expert]
        I = config.intermediate_size
        rows = slice(0, I) if which == "gate" else slice(I, 2 * I)
        return params[prefix + ".w13"][expert, rows]
    if m := _QKV.match(short):
        D = config.head_dim
        q_rows, kv_rows = config.num_attention_heads * D, config.num_key_value_heads * D
        start = {"q": 0, "k": q_rows, "v": q_rows + kv_rows}[m.group(2)]
        size = q_rows if m.group(2) == "q" else kv_rows
        return params[m.group(1) + ".qkv_proj.weight"][start:start + size]
    if m := _GATE_UP.match(short):
        packed = params[m.group(1) + ".gate_up_proj.weight"]
        half = packed.shape[0] // 2
        return packed[:half] if m.group(2) == "gate" else packed[half:]
    return params[short]


def fit_to_slot(tensor: torch.Tensor, slot: torch.Tensor, name: str) -> torch.Tensor:
    """The checkpoint tensor viewed in its slot's shape: a folded shared expert's [S * I, H] gate/up rows
    become [S, I, H], its [H, S * I] down columns [S, H, I]; anything else is already in shape."""
    if tuple(tensor.shape) == tuple(slot.shape):
        return tensor
    if name.endswith("down_proj.weight"):
        return tensor.view(tensor.shape[0], slot.shape[0], slot.shape[2]).transpose(0, 1)
    return tensor.view(slot.shape)


def find_weight_files(path: str, load_format: str):
    """(format, shard files) of a checkpoint directory; safetensors preferred under "auto"."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format={load_format!r} is not one of {LOAD_FORMATS}")
    candidates = {
        "safetensors": ("model.safetensors.index.json", "*.safetensors"),
        "pt": ("pytorch_model.bin.index.json", "*.bin"),
    }
    formats = ["safetensors", "pt"] if load_format == "auto" else [load_format]
    for fmt in formats:
        index_name, pattern = candidates[fmt]
        index_file = os.path.join(path, index_name)
        if os.path.isfile(index_file):
            with open(index_file) as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError) as error:
                    raise CheckpointError(f"{index_file} is not a valid index (needs 'weight_map'): {error}") from None
            files = [os.path.join(path, shard) for shard in dict.fromkeys(weight_map.values())]
            for file in files:
                if not os.path.isfile(file):
                    raise CheckpointError(f"{index_file} names shard {os.path.basename(file)!r}, which is missing "
                                          f"from {path}")
            return fmt, files
        files = sorted(glob.glob(os.path.join(path, pattern)))
        if fmt == "pt":
            files = [f for f in files if not os.path.basename(f).startswith("training_args")]
        if files:
            return fmt, files
    present = sorted(os.listdir(path))
    raise CheckpointError(f"no weights for load_format={load_format!r} in {path} (found {present}); expected "
                          f"*.safetensors or pytorch_model*.bin shards, or use load_format='dummy'")


def _narrow(tensor, selection):
    return tensor if selection is None else tensor.narrow(selection[0], selection[1], selection[2])


def _read_shard(file: str, fmt: str):
    """Yields (name, shape, read) of one shard, a tensor at a time; read(selection) returns the tensor, or
    only the (dim, start, count) part of it, reading no other bytes."""
    try:
        if fmt == "safetensors":
            from safetensors import safe_open
            with safe_open(file, framework="pt") as shard:
                for name in shard.keys():
                    lazy = shard.get_slice(name)
                    shape = tuple(lazy.get_shape())

                    def read(selection, name=name, lazy=lazy):
                        if selection is None:
                            return shard.get_tensor(name)
                        dim, start, count = selection
                        return lazy[(slice(None),) * dim + (slice(start, start + count),)]
                    yield name, shape, read
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            for name in list(state.keys()):
                tensor = state.pop(name)  # memory-mapped: only the bytes a selection copies are read
                yield name, tuple(tensor.shape), lambda selection, tensor=tensor: _narrow(tensor, selection)
    except CheckpointError:
        raise
    except Exception as error:  # truncated, corrupt or foreign file: name it
        raise CheckpointError(f"cannot read weight file {file}: {type(error).__name__}: {error}. The file may be "
                              f"truncated or corrupt; download it again") from None


def load_weights(model, config, path: str, load_format: str = "auto", show_progress: bool = True,
                 sharding=None):
    """Fills `model`'s parameters from the checkpoint at `path` (or randomly for "dummy"); with a tensor
    parallel `sharding`, only this rank's slices."""
    if load_format == "dummy":
        return init_dummy_weights(model, config)
    fmt, files = find_weight_files(path, load_format)
    expected = expected_tensors(config)
    params = dict(model.named_parameters())
    loaded = set()
    bar = tqdm(files, desc=f"Loading {len(files)} {fmt} shard(s)", unit="shard", disable=not show_progress)
    for file in bar:
        for name, shape, read in _read_shard(file, fmt):
            if name.endswith("rotary_emb.inv_freq"):
                continue  # a buffer some exports keep; we compute it
            if name not in expected:
                raise CheckpointError(f"unexpected tensor {name!r} in {os.path.basename(file)}: not part of an "
                                      f"XVERSE model with this config.json (check num_experts, num_hidden_layers)")
            if shape != expected[name]:
                raise CheckpointError(f"tensor {name!r} in {os.path.basename(file)} has shape {shape}, "
                                      f"config.json implies {expected[name]}")
            if name in loaded:
                raise CheckpointError(f"tensor {name!r} appears twice (again in {os.path.basename(file)})")
            loaded.add(name)
            if sharding is None:
                slot = parameter_slot(params, config, name)
                slot.copy_(fit_to_slot(read(None), slot, name))
            elif (selection := sharding.selection(name)) != "skip":  # "skip": another rank's expert
                sharding.slot(params, name).copy_(read(selection))
    missing = [name for name in expected if name not in loaded]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint {path} is missing {len(missing)} tensor(s): {shown}")


@torch.no_grad()
def init_dummy_weights(model, config, seed: int = 0):
    """Random weights of the real shapes, made on the target device (benchmarks without a checkpoint).
    Scales keep activations O(1) so the router spreads tokens over experts as real weights do."""
    generator_device = next(model.parameters()).device
    generator = torch.Generator(device=generator_device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            fan_in = param.shape[-1]
            param.normal_(0.0, fan_in ** -0.5 if "embed" not in name else 1.0, generator=generator)
