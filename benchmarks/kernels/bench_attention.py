"""Paged attention at the real shapes (32 heads x 80, MHA, bf16) beside torch SDPA on contiguous K/V (and
FlashAttention when it is installed).

- prefill (one causal prompt of 1k / 4k / 8k tokens): TFLOP/s and the fraction of this card's measured bf16
  matmul peak (compute bound). FLOPs count only the unmasked half: 4 * D * H * T (T + 1) / 2.
- decode (batch 1 at 1k / 8k / 32k context, batch 64 at 1k): GB/s over the K/V bytes read and the fraction of
  this card's measured HBM bandwidth (a device-to-device copy in the same run; memory bound).
- grouped-query decode (32 query heads over 8 KV heads x 128, as the dense XVERSE / GQA checkpoints; batch 1 at
  8k, batch 64 at 1k): the same, with each KV byte counted once (the kernel reads a KV head once per group of 4
  query heads; SDPA gets the K/V expanded to 32 heads, so its GB/s is over the same unique bytes).
Every row carries its bytes and FLOPs and checks the paged kernel against SDPA (max abs difference): a wrong
result fails the run (exit 1, KernelCheckFailed), so a fast wrong kernel cannot hide here. JSON: "results" are
the decode rows, "gqa_results" the grouped-query decode rows, "prefill_results" the prefill rows, "arithmetic"
the GPU shapes' bytes / FLOPs. Without a GPU the same code runs small shapes on the CPU (shape coverage only: the
CPU kernels are the reference path, not tuned), prints the arithmetic of the GPU shapes with the time each would
take at a datasheet roofline, and says that no GPU was lent.

    python -m benchmarks.kernels.bench_attention --json out.json [--png out.png] [--device cpu]
"""
import argparse
import math
import sys

import torch
import torch.nn.functional as F

from benchmarks.common import (machine_info, measure_matmul_peak, measure_memory_bandwidth, print_table, time_fn,
                               write_json)

NUM_HEADS, HEAD_DIM = 32, 80  # XVERSE-MoE-A4.2B: full MHA
GPU_PREFILL = [1024, 4096, 8192]
GPU_DECODE = [(1, 1024), (1, 8192), (1, 32768), (64, 1024)]
CPU_PREFILL = [64, 200]
CPU_SHAPES = [(1, 256), (2, 512), (4, 256)]  # decode (batch, context) on the CPU
GQA_HEADS, GQA_KV_HEADS, GQA_HEAD_DIM = 32, 8, 128  # grouped-query decode: 4 query heads per KV head
GPU_GQA_DECODE = [(1, 8192), (64, 1024)]
CPU_GQA_SHAPES = [(1, 64), (2, 33)]
VS_SDPA = [("speedup_vs_sdpa", "speedup", "{:.2f}x"), ("max_abs_diff_vs_sdpa", "max diff", "{:.1e}")]  # table columns
# Datasheet rooflines for the arithmetic printed without a GPU (dense bf16 FLOP/s, HBM bytes/s).
DATASHEET = {"H100 SXM": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}
# Largest |paged - SDPA| allowed. Both read the same K/V values; they differ by summation order and by the
# output's rounding: the output is a convex mix of V rows, so 4 roundings of max|V| (u = 2^-8 in bf16).
# (The tensor-core prefill also rounds P to 16 bits before P V, as FlashAttention does: within the same bound.)
MAX_ABS_DIFF_PER_MAX_V = {"float32": 1e-5, "float16": 4 * 2.0 ** -11, "bfloat16": 4 * 2.0 ** -8}


class KernelCheckFailed(RuntimeError):
    """The paged kernel's output is off SDPA's: the benchmark must not publish its timing."""


def paged_decode(query, key_cache, value_cache, block_tables, context_lens, scale, max_context_len=0):
    return torch.ops.xverse.paged_attention_decode(query, key_cache, value_cache, block_tables, context_lens, scale,
                                                   max_context_len)


def paged_prefill(query, key_cache, value_cache, block_tables, query_start_loc, context_lens, scale):
    return torch.ops.xverse.paged_attention_prefill(query, key_cache, value_cache, block_tables, query_start_loc,
                                                    context_lens, scale)


# ---- arithmetic --------------------------------------------------------------------------------------------

def prefill_flops(tokens, heads=NUM_HEADS, head_dim=HEAD_DIM):
    """QK^T and PV over the causal (unmasked) pairs: 2 matmuls x 2 FLOPs x D per (query, visible key)."""
    return 4 * head_dim * heads * tokens * (tokens + 1) // 2


def prefill_bytes(tokens, heads=NUM_HEADS, head_dim=HEAD_DIM, elem=2):
    """Q, K, V read once and O written once (the least any kernel moves)."""
    return 4 * tokens * heads * head_dim * elem


def decode_bytes(batch, context, heads=NUM_HEADS, head_dim=HEAD_DIM, elem=2):
    """The K and V of every context token (q and the output are ~1/context of that). heads: the KV heads, so
    under grouped-query attention each KV byte counts once, however many query heads read it."""
    return 2 * batch * context * heads * head_dim * elem


def decode_flops(batch, context, heads=NUM_HEADS, head_dim=HEAD_DIM):
    return 4 * batch * context * heads * head_dim


def arithmetic_rows():
    """Bytes, FLOPs and the roofline time of every GPU shape, on each datasheet card."""
    rows = []
    for tokens in GPU_PREFILL:
        flops, nbytes = prefill_flops(tokens), prefill_bytes(tokens)
        row = {"kind": "prefill", "shape": f"T={tokens}", "gflop": flops / 1e9, "mbytes": nbytes / 1e6,
               "flop_per_byte": flops / nbytes}
        for card, (peak, hbm) in DATASHEET.items():
            row[f"{card} us"] = max(flops / peak, nbytes / hbm) * 1e6
        rows.append(row)
    decode_shapes = [("decode", b, c, NUM_HEADS, NUM_HEADS, HEAD_DIM) for b, c in GPU_DECODE]
    decode_shapes += [("decode GQA", b, c, GQA_HEADS, GQA_KV_HEADS, GQA_HEAD_DIM) for b, c in GPU_GQA_DECODE]
    for kind, batch, context, heads, kv_heads, head_dim in decode_shapes:
        flops = decode_flops(batch, context, heads, head_dim)
        nbytes = decode_bytes(batch, context, kv_heads, head_dim)
        row = {"kind": kind, "shape": f"B={batch} ctx={context} {heads}q/{kv_heads}kv x{head_dim}",
               "gflop": flops / 1e9, "mbytes": nbytes / 1e6, "flop_per_byte": flops / nbytes}
        for card, (peak, hbm) in DATASHEET.items():
            row[f"{card} us"] = max(flops / peak, nbytes / hbm) * 1e6
        rows.append(row)
    return rows


# ---- inputs ------------------------------------------------------------------------------------------------

def paged_copy(k, v, block_size, gen):
    """k, v: [B, H, C, D] contiguous -> (key_cache, value_cache, block_tables) holding them in shuffled blocks."""
    batch, heads, context, head_dim = k.shape
    blocks_per_seq = math.ceil(context / block_size)
    num_blocks = batch * blocks_per_seq
    tables = torch.randperm(num_blocks, generator=gen).to(torch.int32).view(batch, blocks_per_seq).to(k.device)
    shape = (num_blocks, heads, block_size, head_dim)
    caches = []
    pad = blocks_per_seq * block_size - context
    for src in (k, v):
        cache = torch.zeros(shape, dtype=k.dtype, device=k.device)
        src = F.pad(src, (0, 0, 0, pad))                                        # [B, H, nb * bs, D]
        src = src.view(batch, heads, blocks_per_seq, block_size, head_dim).permute(0, 2, 1, 3, 4)
        cache[tables.long().view(-1)] = src.reshape(-1, heads, block_size, head_dim)
        caches.append(cache)
    return caches[0], caches[1], tables


def random_kv(batch, context, dtype, device, gen, heads=NUM_HEADS, head_dim=HEAD_DIM):
    """Random K and V, each [B, H, C, D] (SDPA layout)."""
    return [torch.randn(batch, heads, context, head_dim, generator=gen).to(dtype).to(device) for _ in range(2)]


def flash_attn_func():
    try:
        from flash_attn import flash_attn_func as fa  # noqa: F401
        return fa
    except ImportError:
        return None


# ---- benchmarks ----------------------------------------------------------------------------------------------

def bench_prefill(tokens, args, peak):
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(tokens)
    k, v = random_kv(1, tokens, dtype, args.device, gen)
    q = torch.randn(1, NUM_HEADS, tokens, HEAD_DIM, generator=gen).to(dtype).to(args.device)  # [1, H, T, D]
    key_cache, value_cache, tables = paged_copy(k, v, args.block_size, gen)
    query = q[0].transpose(0, 1).contiguous()                                                 # [T, H, D]
    qsl = torch.tensor([0, tokens], dtype=torch.int32, device=args.device)
    lens = torch.tensor([tokens], dtype=torch.int32, device=args.device)
    scale = HEAD_DIM ** -0.5

    def paged():
        return paged_prefill(query, key_cache, value_cache, tables, qsl, lens, scale)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

    fns = {"paged": paged, "sdpa": sdpa}
    fa = flash_attn_func() if torch.device(args.device).type == "cuda" else None
    if fa is not None:
        q_fa, k_fa, v_fa = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # [1, T, H, D]
        fns["flash_attn"] = lambda: fa(q_fa, k_fa, v_fa, causal=True, softmax_scale=scale)
    flops, nbytes = prefill_flops(tokens), prefill_bytes(tokens, elem=query.element_size())
    diff = (paged().float() - sdpa()[0].transpose(0, 1).float()).abs().max().item()
    allowed = MAX_ABS_DIFF_PER_MAX_V[args.dtype] * v.abs().max().item()
    row = {"tokens": tokens, "gflop": flops / 1e9, "mbytes": nbytes / 1e6, "max_abs_diff_vs_sdpa": diff,
           "ok": bool(diff <= allowed)}  # NaN fails too
    for name, fn in fns.items():
        stats = time_fn(fn, args.device, warmup=args.warmup, iters=args.iters)
        row[f"{name}_us"] = stats["median_us"]
        row[f"{name}_tflops"] = flops / (stats["median_us"] * 1e-6) / 1e12
        row[f"{name}_frac_peak"] = flops / (stats["median_us"] * 1e-6) / peak
    row["speedup_vs_sdpa"] = row["sdpa_us"] / row["paged_us"]
    return row


def bench_decode(batch, context, args, hbm, heads=NUM_HEADS, kv_heads=NUM_HEADS, head_dim=HEAD_DIM):
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(batch * 100003 + context)
    k, v = random_kv(batch, context, dtype, args.device, gen, kv_heads, head_dim)           # [B, Hkv, C, D]
    query = torch.randn(batch, heads, head_dim, generator=gen).to(dtype).to(args.device)    # [B, Hq, D]
    key_cache, value_cache, tables = paged_copy(k, v, args.block_size, gen)
    lens = torch.full((batch,), context, dtype=torch.int32, device=args.device)
    scale = head_dim ** -0.5
    if kv_heads != heads:  # SDPA: each KV head repeated for its query heads (outside the timing)
        k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))                # [B, Hq, C, D]
    bucket = 1 << (context - 1).bit_length()  # the bound a graph-capturing runner would pass: next power of 2

    def paged():
        return paged_decode(query, key_cache, value_cache, tables, lens, scale, bucket)

    q4 = query.unsqueeze(2)  # [B, H, 1, D]

    def sdpa():
        return F.scaled_dot_product_attention(q4, k, v, scale=scale)

    fns = {"paged": paged, "sdpa": sdpa}
    fa = flash_attn_func() if torch.device(args.device).type == "cuda" else None
    if fa is not None:
        q_fa, k_fa, v_fa = (t.transpose(1, 2).contiguous() for t in (q4, k, v))
        fns["flash_attn"] = lambda: fa(q_fa, k_fa, v_fa, softmax_scale=scale)
    nbytes = decode_bytes(batch, context, kv_heads, head_dim, elem=key_cache.element_size())
    diff = (paged().float() - sdpa().squeeze(2).float()).abs().max().item()
    allowed = MAX_ABS_DIFF_PER_MAX_V[args.dtype] * v.abs().max().item()
    row = {"batch": batch, "context": context, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
           "mbytes": nbytes / 1e6, "gflop": decode_flops(batch, context, heads, head_dim) / 1e9,
           "max_abs_diff_vs_sdpa": diff,
           "ok": bool(diff <= allowed)}  # NaN fails too
    for name, fn in fns.items():
        stats = time_fn(fn, args.device, warmup=args.warmup, iters=args.iters)
        row[f"{name}_us"] = stats["median_us"]
        row[f"{name}_gbps"] = nbytes / (stats["median_us"] * 1e-6) / 1e9
        row[f"{name}_frac_hbm"] = nbytes / (stats["median_us"] * 1e-6) / hbm
    row["speedup_vs_sdpa"] = row["sdpa_us"] / row["paged_us"]
    return row


def plot(decode_rows, prefill_rows, hbm, peak, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, rows, key, unit, roof, label in (
            (axes[0], prefill_rows, "tflops", "TFLOP/s", peak / 1e12, lambda r: f"T={r['tokens']}"),
            (axes[1], decode_rows, "gbps", "GB/s over K/V", hbm / 1e9, lambda r: f"{r['batch']}x{r['context']}")):
        names = [n for n in ("paged", "sdpa", "flash_attn") if rows and f"{n}_{key}" in rows[0]]
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            ax.bar([x + i * width for x in range(len(rows))], [r[f"{name}_{key}"] for r in rows], width, label=name)
        ax.axhline(roof, color="k", linestyle="--", label="measured roofline")
        ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(rows))], [label(r) for r in rows])
        ax.set_ylabel(unit)
        ax.legend()
    axes[0].set_title(f"prefill, {NUM_HEADS} heads x {HEAD_DIM}")
    axes[1].set_title("decode")
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
    args.warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    args.iters = args.iters if args.iters is not None else (20 if on_gpu else 2)
    hbm = measure_memory_bandwidth(args.device)
    peak = measure_matmul_peak(args.device)

    arithmetic = arithmetic_rows()
    print(f"\narithmetic of the GPU shapes ({NUM_HEADS} heads x {HEAD_DIM}, bf16): the time at each datasheet "
          "roofline, max(FLOPs / peak, bytes / HBM)")
    print_table(arithmetic, [("kind", "kind", "{}"), ("shape", "shape", "{}"), ("gflop", "GFLOP", "{:.2f}"),
                             ("mbytes", "MB", "{:.1f}"), ("flop_per_byte", "FLOP/B", "{:.1f}")] +
                [(f"{card} us", f"{card} us", "{:.1f}") for card in DATASHEET])
    if not on_gpu:
        print("\nno GPU here: the rows below are a CPU shape-coverage run (C++ reference kernels), not performance")

    prefill_rows = [bench_prefill(t, args, peak) for t in (GPU_PREFILL if on_gpu else CPU_PREFILL)]
    decode_rows = [bench_decode(b, c, args, hbm) for b, c in (GPU_DECODE if on_gpu else CPU_SHAPES)]
    gqa_rows = [bench_decode(b, c, args, hbm, GQA_HEADS, GQA_KV_HEADS, GQA_HEAD_DIM)
                for b, c in (GPU_GQA_DECODE if on_gpu else CPU_GQA_SHAPES)]
    has_fa = prefill_rows and "flash_attn_us" in prefill_rows[0]

    print(f"\nprefill (causal, one prompt), {args.dtype}, block_size {args.block_size}; measured matmul peak "
          f"{peak / 1e12:.1f} TFLOP/s ({args.device})")
    cols = [("tokens", "T", "{}"), ("gflop", "GFLOP", "{:.1f}"), ("mbytes", "MB", "{:.1f}"),
            ("paged_us", "paged us", "{:.1f}"), ("paged_tflops", "TFLOP/s", "{:.2f}"),
            ("paged_frac_peak", "of peak", "{:.0%}"), ("sdpa_us", "SDPA us", "{:.1f}"),
            ("sdpa_tflops", "TFLOP/s", "{:.2f}"), ("sdpa_frac_peak", "of peak", "{:.0%}")]
    if has_fa:
        cols += [("flash_attn_us", "FA us", "{:.1f}"), ("flash_attn_tflops", "TFLOP/s", "{:.2f}")]
    print_table(prefill_rows, cols + VS_SDPA)

    print(f"\ndecode, {args.dtype}, block_size {args.block_size}; measured memory bandwidth "
          f"{hbm / 1e9:.0f} GB/s ({args.device})")
    cols = [("batch", "B", "{}"), ("context", "ctx", "{}"), ("mbytes", "KV MB", "{:.1f}"),
            ("paged_us", "paged us", "{:.1f}"), ("paged_gbps", "GB/s", "{:.0f}"),
            ("paged_frac_hbm", "of HBM", "{:.0%}"), ("sdpa_us", "SDPA us", "{:.1f}"),
            ("sdpa_gbps", "GB/s", "{:.0f}"), ("sdpa_frac_hbm", "of HBM", "{:.0%}")]
    if has_fa:
        cols += [("flash_attn_us", "FA us", "{:.1f}"), ("flash_attn_gbps", "GB/s", "{:.0f}")]
    print_table(decode_rows, cols + VS_SDPA)
    print(f"\ngrouped-query decode ({GQA_HEADS} query heads over {GQA_KV_HEADS} KV heads x {GQA_HEAD_DIM}), "
          f"{args.dtype}: GB/s over the unique K/V bytes (each KV byte once)")
    print_table(gqa_rows, cols + VS_SDPA)
    if not on_gpu:
        print("\nno GPU was lent for this run: every row above is CPU shape coverage; no roofline fraction is a "
              "GPU measurement")

    payload = {"benchmark": "paged_attention", "machine": machine_info(args.device),
               "config": {"num_heads": NUM_HEADS, "num_kv_heads": NUM_HEADS, "head_dim": HEAD_DIM,
                          "dtype": args.dtype, "block_size": args.block_size, "iters": args.iters},
               "hbm_bytes_per_s": hbm, "matmul_flops_per_s": peak, "gpu": on_gpu,
               "results": decode_rows, "gqa_results": gqa_rows, "prefill_results": prefill_rows,
               "arithmetic": arithmetic,
               "baselines": {"sdpa": "F.scaled_dot_product_attention on contiguous [B, H, ctx, D] K/V",
                             "flash_attn": "flash_attn_func on contiguous K/V" if has_fa else "not installed"}}
    if args.json:
        write_json(args.json, payload)
    png = args.png or (args.json[:-5] + ".png" if args.json and args.json.endswith(".json") else None)
    if png:
        plot(decode_rows, prefill_rows, hbm, peak, png)
    wrong = [f"T={r['tokens']}: max |paged - SDPA| {r['max_abs_diff_vs_sdpa']:.2e}" for r in prefill_rows
             if not r["ok"]]
    wrong += [f"B={r['batch']} ctx={r['context']} {r['heads']}q/{r['kv_heads']}kv: max |paged - SDPA| "
              f"{r['max_abs_diff_vs_sdpa']:.2e}" for r in decode_rows + gqa_rows if not r["ok"]]
    if wrong:
        raise KernelCheckFailed("paged attention gave wrong results (timings not to be trusted): " + "; ".join(wrong))
    return payload


if __name__ == "__main__":
    try:
        main()
    except KernelCheckFailed as failure:
        print(f"FAILED: {failure}", file=sys.stderr)
        sys.exit(1)
