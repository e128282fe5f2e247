"""Paged decode attention at the real shapes (32 heads x 80, MHA, bf16) beside torch SDPA on contiguous K/V.

For each batch x context: microseconds, TB/s over the K/V bytes read, and the fraction of this card's
measured HBM bandwidth (a device-to-device copy in the same run). Each row also checks that the paged
kernel's output matches SDPA's (max abs difference), so a fast wrong kernel cannot hide here.
FlexAttention's paged mode (torch.nn.attention.experimental) needs torch.compile and its own page-table
objects: not a drop-in baseline, so it is skipped and the JSON says so.

    python -m benchmarks.kernels.bench_attention --json out.json [--png out.png] [--device cpu]
"""
import argparse
import math
import sys

import torch
import torch.nn.functional as F

from benchmarks.common import machine_info, measure_memory_bandwidth, print_table, time_fn, write_json

NUM_HEADS, HEAD_DIM = 32, 80  # XVERSE-MoE-A4.2B: full MHA
GPU_SHAPES = [(1, 1024), (1, 8192), (16, 2048), (64, 1024), (64, 4096), (256, 1024)]
CPU_SHAPES = [(1, 256), (2, 512), (4, 256)]
# Largest |paged - SDPA| allowed. Both read the same K/V values; they differ by summation order and by the
# output's rounding: the output is a convex mix of V rows, so 4 roundings of max|V| (u = 2^-8 in bf16).
MAX_ABS_DIFF_PER_MAX_V = {"float32": 1e-5, "float16": 4 * 2.0 ** -11, "bfloat16": 4 * 2.0 ** -8}


class KernelCheckFailed(RuntimeError):
    """The paged kernel's output is off SDPA's: the benchmark must not publish its timing."""


def paged_decode(query, key_cache, value_cache, block_tables, context_lens, scale):
    return torch.ops.xverse.paged_attention_decode(query, key_cache, value_cache, block_tables, context_lens, scale)


def make_inputs(batch, context, block_size, dtype, device, seed=0):
    """A paged cache holding `batch` sequences of `context` tokens in shuffled blocks, and the same K/V
    contiguous for SDPA. Returns (query, key_cache, value_cache, block_tables, context_lens, k, v)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    blocks_per_seq = math.ceil(context / block_size)
    num_blocks = batch * blocks_per_seq
    # k, v: [B, H, C, D] (SDPA layout)
    k = torch.randn(batch, NUM_HEADS, context, HEAD_DIM, generator=gen, dtype=torch.float32).to(dtype).to(device)
    v = torch.randn(batch, NUM_HEADS, context, HEAD_DIM, generator=gen, dtype=torch.float32).to(dtype).to(device)
    query = torch.randn(batch, NUM_HEADS, HEAD_DIM, generator=gen).to(dtype).to(device)
    tables = torch.randperm(num_blocks, generator=gen).to(torch.int32).view(batch, blocks_per_seq).to(device)
    shape = (num_blocks, NUM_HEADS, block_size, HEAD_DIM)
    key_cache = torch.zeros(shape, dtype=dtype, device=device)
    value_cache = torch.zeros(shape, dtype=dtype, device=device)
    pad = blocks_per_seq * block_size - context
    for cache, src in ((key_cache, k), (value_cache, v)):
        src = F.pad(src, (0, 0, 0, pad))                                       # [B, H, nb * bs, D]
        src = src.view(batch, NUM_HEADS, blocks_per_seq, block_size, HEAD_DIM).permute(0, 2, 1, 3, 4)
        cache[tables.long().view(-1)] = src.reshape(-1, NUM_HEADS, block_size, HEAD_DIM)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    return query, key_cache, value_cache, tables, lens, k, v


def bench_shape(batch, context, args, hbm):
    dtype = getattr(torch, args.dtype)
    query, key_cache, value_cache, tables, lens, k, v = make_inputs(batch, context, args.block_size, dtype,
                                                                    args.device)
    scale = HEAD_DIM ** -0.5
    kv_bytes = 2 * batch * context * NUM_HEADS * HEAD_DIM * key_cache.element_size()

    def paged():
        return paged_decode(query, key_cache, value_cache, tables, lens, scale)

    q4 = query.unsqueeze(2)  # [B, H, 1, D]

    def sdpa():
        return F.scaled_dot_product_attention(q4, k, v, scale=scale)

    diff = (paged().float() - sdpa().squeeze(2).float()).abs().max().item()
    allowed = MAX_ABS_DIFF_PER_MAX_V[args.dtype] * v.abs().max().item()
    row = {"batch": batch, "context": context, "tokens": batch * context, "kv_mb": kv_bytes / 1e6,
           "max_abs_diff_vs_sdpa": diff, "ok": bool(diff <= allowed)}   # NaN fails too
    for name, fn in (("paged", paged), ("sdpa", sdpa)):
        stats = time_fn(fn, args.device, warmup=args.warmup, iters=args.iters)
        row[f"{name}_us"] = stats["median_us"]
        row[f"{name}_tbps"] = kv_bytes / (stats["median_us"] * 1e-6) / 1e12
        row[f"{name}_frac_hbm"] = kv_bytes / (stats["median_us"] * 1e-6) / hbm
    row["speedup_vs_sdpa"] = row["sdpa_us"] / row["paged_us"]
    del query, key_cache, value_cache, k, v
    return row


def plot(rows, hbm, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
        return
    labels = [f"{r['batch']}x{r['context']}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([x - 0.2 for x in xs], [r["paged_tbps"] for r in rows], 0.4, label="xverse paged decode")
    ax.bar([x + 0.2 for x in xs], [r["sdpa_tbps"] for r in rows], 0.4, label="SDPA, contiguous K/V")
    ax.axhline(hbm / 1e12, color="k", linestyle="--", label="measured HBM copy bandwidth")
    ax.set_xticks(list(xs), labels)
    ax.set_xlabel("batch x context")
    ax.set_ylabel("TB/s over K/V bytes read")
    ax.set_title(f"Decode attention, {NUM_HEADS} heads x {HEAD_DIM}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--png", default=None, help="plot here (default: beside --json)")
    args = parser.parse_args(argv)
    import xverse_engine.ops  # noqa: F401  (loads the extension: torch.ops.xverse)
    on_gpu = torch.device(args.device).type == "cuda"
    args.warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    args.iters = args.iters if args.iters is not None else (50 if on_gpu else 3)
    hbm = measure_memory_bandwidth(args.device)
    rows = [bench_shape(b, c, args, hbm) for b, c in (GPU_SHAPES if on_gpu else CPU_SHAPES)]

    print(f"\npaged decode attention, {NUM_HEADS} heads x {HEAD_DIM}, {args.dtype}, block_size {args.block_size}; "
          f"measured memory bandwidth {hbm / 1e12:.3f} TB/s ({args.device})")
    print_table(rows, [("batch", "B", "{}"), ("context", "ctx", "{}"), ("kv_mb", "KV MB", "{:.1f}"),
                       ("paged_us", "paged us", "{:.1f}"), ("paged_tbps", "TB/s", "{:.3f}"),
                       ("paged_frac_hbm", "of HBM", "{:.0%}"), ("sdpa_us", "SDPA us", "{:.1f}"),
                       ("sdpa_tbps", "TB/s", "{:.3f}"), ("sdpa_frac_hbm", "of HBM", "{:.0%}"),
                       ("speedup_vs_sdpa", "speedup", "{:.2f}x"), ("max_abs_diff_vs_sdpa", "max diff", "{:.1e}")])
    payload = {"benchmark": "paged_attention_decode", "machine": machine_info(args.device),
               "config": {"num_heads": NUM_HEADS, "num_kv_heads": NUM_HEADS, "head_dim": HEAD_DIM,
                          "dtype": args.dtype, "block_size": args.block_size, "iters": args.iters},
               "hbm_bytes_per_s": hbm, "results": rows,
               "baselines": {"sdpa": "F.scaled_dot_product_attention on contiguous [B, H, ctx, D] K/V",
                             "flex_attention_paged": "skipped: needs torch.compile and its own PagedAttention "
                                                     "page tables; not a drop-in baseline"}}
    if args.json:
        write_json(args.json, payload)
    png = args.png or (args.json[:-5] + ".png" if args.json and args.json.endswith(".json") else None)
    if png:
        plot(rows, hbm, png)
    wrong = [f"B={r['batch']} ctx={r['context']}: max |paged - SDPA| {r['max_abs_diff_vs_sdpa']:.2e}"
             for r in rows if not r["ok"]]
    if wrong:
        raise KernelCheckFailed("paged decode attention gave wrong results (timings not to be trusted): "
                                + "; ".join(wrong))
    return payload


if __name__ == "__main__":
    try:
        main()
    except KernelCheckFailed as failure:
        print(f"FAILED: {failure}", file=sys.stderr)
        sys.exit(1)
