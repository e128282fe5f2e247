"""Build the embedded default model: xverse_engine/assets/tiny-xverse-moe/.

An XVERSE-MoE in the real layout (fp32 router, 8 routed experts top-2, merged shared expert, RoPE,
the XVERSE tokenizer pipeline) at tiny size, trained for a few minutes on CPU on
scripts/tiny_corpus.txt (short Chinese and English sentences written for this project) so that
the default CLI run prints recognisable text. Training runs through the independent reference
model of tests/reference.py in float32; weights are saved in bfloat16 (router float32).

    python scripts/make_tiny_model.py            # ~5 minutes on 2 CPU cores, deterministic
    python scripts/make_tiny_model.py --steps 50 --out /tmp/tiny   # quick try
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the reference model, checkpoint writer and tokenizer builder live there

from checkpoints import (GENERATION_CONFIG, SPECIAL_TOKENS_MAP, load_state_dict, make_config,  # noqa: E402
                         random_weights, save_weights, write_json)
from reference import reference_forward, reference_greedy  # noqa: E402
from tokenizer_builder import build_tokenizer  # noqa: E402

CORPUS = ROOT / "scripts" / "tiny_corpus.txt"
OUT = ROOT / "xverse_engine" / "assets" / "tiny-xverse-moe"
EOS = 3
PROMPTS = ["北京的景点：故宫、天坛、万里长城等。\n深圳的景点：", "The capital of France is"]

TINY = dict(hidden_size=128, num_attention_heads=4, num_hidden_layers=4, intermediate_size=64,
            num_experts=8, moe_top_k=2, num_shared_experts=2, vocab_size=1024,
            dtype=torch.bfloat16, max_position_embeddings=2048)

README = """\
# tiny-xverse-moe

The embedded default model of xverse_engine: an XVERSE-MoE in the real layout (config.json keys,
Hugging Face weight names, float32 router, {num_experts} routed experts top-{moe_top_k} plus a merged shared
expert, RoPE, the XVERSE tokenizer pipeline with byte fallback) at tiny size: hidden {hidden_size},
{num_attention_heads} heads, {num_hidden_layers} layers, expert intermediate {intermediate_size}, vocab {vocab_size}, {n_params:,} parameters, bfloat16.

Made by `python scripts/make_tiny_model.py` (seed 0, {steps} AdamW steps on CPU, final training loss
{loss:.3f}) on `scripts/tiny_corpus.txt`, a few KB of short Chinese and English sentences about cities
written for this project. It memorised that text and nothing more; it exists so that
`python -m xverse_engine.generate` shows the whole pipeline working without a download.
"""


def training_stream(tok, text: str, *, shuffles: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """One token stream of "documents" and the offsets where each one starts.

    Documents: each paragraph in its own order, plus `shuffles` random orders of its lines, each
    ending with <|endoftext|>. Every line is then learnt at the start of a text (with the leading
    "▁" the tokenizer adds there) and after a newline, like the prompts it will be given, and after
    any other line: "深圳的景点：" must be followed by Shenzhen's sights whatever line came before.
    """
    g = torch.Generator().manual_seed(seed)
    paragraphs = [[ln for ln in para.strip().split("\n") if ln] for para in text.split("\n\n")]
    docs = list(paragraphs)
    docs += [[lines[j] for j in torch.randperm(len(lines), generator=g).tolist()]
             for _ in range(shuffles) for lines in paragraphs]
    stream: list[int] = []
    starts: list[int] = []
    for lines in docs:
        starts.append(len(stream))
        stream += tok.encode("\n".join(lines)).ids + [EOS]
    return torch.tensor(stream, dtype=torch.int64), starts


def train(config: dict, params: dict[str, torch.Tensor], stream: torch.Tensor, starts: list[int], *,
          steps: int, batch: int, seq: int, lr: float, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    stream = torch.cat([stream, stream[: seq + 1]])  # windows near the end wrap around
    starts_t = torch.tensor(starts)
    matrices = [t for t in params.values() if t.dim() == 2]
    vectors = [t for t in params.values() if t.dim() < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.01}, {"params": vectors, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    warmup = max(steps // 20, 1)
    t0, ema = time.time(), None
    for step in range(steps):
        # linear warmup, cosine decay to 10%
        frac = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = lr * frac
        pick = starts_t[torch.randint(len(starts), (batch,), generator=g)]
        win = torch.stack([stream[s : s + seq + 1] for s in pick.tolist()])  # [B, S+1]
        logits = reference_forward(params, config, win[:, :-1])  # [B, S, V]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), win[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        if step % 25 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  (ema {ema:.4f})  {time.time() - t0:6.1f}s", flush=True)
    return loss.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=96)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--shuffles", type=int, default=40, help="random orders of each paragraph to train on")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    # One thread: the same result on any machine, and on a busy 2-core box a second thread only
    # waits at every op's barrier (10x slower measured).
    torch.set_num_threads(1)
    text = CORPUS.read_text(encoding="utf-8")
    config = make_config(**TINY)
    tok = build_tokenizer(config["vocab_size"], text.splitlines())
    stream, starts = training_stream(tok, text, shuffles=args.shuffles, seed=args.seed)
    print(f"corpus: {len(text)} chars -> {len(stream)} training tokens, {len(starts)} documents")

    params = {n: t.float().requires_grad_() for n, t in random_weights(config, seed=args.seed).items()}
    n_params = sum(t.numel() for t in params.values())
    print(f"model: {n_params:,} parameters")
    loss = train(config, params, stream, starts, steps=args.steps, batch=args.batch, seq=args.seq,
                 lr=args.lr, seed=args.seed)

    # Write the assets: weights in bfloat16 except the router (float32), one file, no index.
    out = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    weights = {n: t.detach().to(torch.float32 if n.endswith("router.weight") else torch.bfloat16)
               for n, t in params.items()}
    save_weights(out, weights, fmt="safetensors", num_shards=1)
    write_json(out / "config.json", config)
    write_json(out / "generation_config.json", GENERATION_CONFIG)
    write_json(out / "special_tokens_map.json", SPECIAL_TOKENS_MAP)
    tok.save(str(out / "tokenizer.json"))
    (out / "README.md").write_text(README.format(n_params=n_params, steps=args.steps, loss=loss, **config))
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.2f} MB)")

    # Samples from the saved (bfloat16) weights, as the engine will run them: greedy, repetition
    # penalty 1.1 (the release's generation_config), stop at <|endoftext|>.
    sd = load_state_dict(out)
    print(f"final training loss: {loss:.4f}")
    for prompt in PROMPTS:
        ids = tok.encode(prompt).ids
        new = reference_greedy(sd, config, ids, 48, dtype=torch.float32, repetition_penalty=1.1, eos_token_id=EOS)
        print(f"--- {prompt!r}\n{tok.decode(ids + new)!r}")


if __name__ == "__main__":
    main()
