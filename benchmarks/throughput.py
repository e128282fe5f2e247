"""Offline throughput: N prompts through the engine at once (continuous batching), ignore_eos.

Reports requests/s, output tokens/s and total (prompt + output) tokens/s, the decode roofline (the
tokens/s a decode step could reach at the measured HBM bandwidth, from the bytes a step must read), and,
with --compare-reference, the same workload through the model's own reference path (benchmarks/
reference_path.py: HF-style per-expert loop, contiguous cache) in the same run, with the ratio.

  python -m benchmarks.throughput --device cpu --num-prompts 8 --input-len 16 --output-len 8
  python -m benchmarks.throughput --model xverse-moe-a4.2b --load-format dummy \\
      --num-prompts 64 --input-len 1024 --output-len 128 --compare-reference --json out.json
  python -m benchmarks.throughput --model xverse-moe-a4.2b --load-format dummy \\
      --max-batch --input-len 512 --output-len 512          # the largest batch the KV cache holds
"""
import argparse
import random
import sys
import time

import torch

from benchmarks.common import machine_info, measure_matmul_peak, measure_memory_bandwidth, print_table, write_json

SPECIAL_IDS = 10  # random prompts avoid the special tokens (ids 0..5) and a little margin


# ---- shared by throughput.py and latency.py -----------------------------------------------------------

def add_engine_args(p: argparse.ArgumentParser, title: str = "engine", compare_reference: bool = True):
    e = p.add_argument_group(title)
    e.add_argument("--model", default=None, help="checkpoint directory or preset name (default: the embedded "
                   "tiny model; xverse-moe-a4.2b with --load-format dummy for the real shapes)")
    e.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "pt", "dummy"])
    e.add_argument("--device", default="auto")
    e.add_argument("--dtype", default="auto")
    e.add_argument("--kernels", default="auto", choices=["auto", "cuda", "cpu", "torch"])
    e.add_argument("--max-num-seqs", type=int, default=256)
    e.add_argument("--max-model-len", type=int, default=None)
    e.add_argument("--num-kv-blocks", type=int, default=None)
    e.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    e.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="ranks (GPUs, or CPU processes) to split the model over")
    if compare_reference:
        p.add_argument("--compare-reference", action="store_true",
                       help="also run the workload through the model's own reference path and report the ratio")
    p.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON")


def check_fits(engine, longest_prompt: int, longest_output: int):
    """Fails early, with the knob to turn, when a request could never run."""
    if longest_prompt + longest_output > engine.max_model_len:
        raise ValueError(f"a request of {longest_prompt} prompt + {longest_output} output tokens exceeds "
                         f"max_model_len={engine.max_model_len}; shorten the lengths or raise --max-model-len")


def make_engine(args):
    from xverse_engine import Engine
    return Engine(args.model, dtype=args.dtype, device=args.device, kernels=args.kernels,
                  load_format=args.load_format, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                  num_kv_blocks=args.num_kv_blocks, gpu_memory_utilization=args.gpu_memory_utilization,
                  enforce_eager=args.enforce_eager, seed=args.seed, show_progress=False,
                  tensor_parallel_size=args.tensor_parallel_size)


def engine_info(engine) -> dict:
    return {"model": engine.model_path, "device": str(engine.device), "dtype": str(engine.dtype).replace("torch.", ""),
            "kernels": engine.kernels, "cuda_graphs": engine.runner.use_cuda_graphs,
            "num_kv_blocks": engine.runner.num_kv_blocks, "block_size": engine.runner.block_size,
            "kv_capacity_tokens": engine.runner.num_kv_blocks * engine.runner.block_size,
            "max_num_seqs": engine.runner.max_num_seqs, "max_model_len": engine.max_model_len,
            "load_seconds": engine.load_seconds, "tensor_parallel_size": engine.tensor_parallel_size}


def communication(engine, decode_batch: int) -> dict:
    """Bytes moved between tensor-parallel ranks per layer and per step: a decode step of `decode_batch`
    sequences and a full prefill step of max_num_batched_tokens (2 * T * H * bytes per all-reduce)."""
    from xverse_engine.distributed.comm_volume import communication_volume
    size = torch.empty((), dtype=engine.dtype).element_size()
    n = engine.tensor_parallel_size
    return {"decode_step": communication_volume(engine.config, n, decode_batch, decode_batch, size),
            "prefill_step": communication_volume(engine.config, n, engine.max_num_batched_tokens, 1, size)}


def print_communication(payload: dict):
    comm = payload.get("communication")
    if not comm or comm["decode_step"]["tensor_parallel_size"] == 1:
        return
    for name, c in comm.items():
        print(f"tensor parallel x{c['tensor_parallel_size']}, {name.replace('_', ' ')} of {c['tokens']} tokens: "
              f"{c['all_reduces_per_layer']} all-reduces of {c['all_reduce_bytes'] / 1e6:.3f} MB per layer "
              f"({c['bytes_per_layer'] / 1e6:.3f} MB), {c['bytes_per_step'] / 1e6:.3f} MB per step "
              f"(incl. logits all-gather {c['logits_gather_bytes'] / 1e6:.3f} MB)")


def random_prompts(rng: random.Random, lengths: list, vocab_size: int) -> list:
    return [[rng.randrange(SPECIAL_IDS, vocab_size) for _ in range(n)] for n in lengths]


def greedy_params(max_new_tokens: int):
    """Greedy, no repetition penalty, ignore_eos: the same work as the reference path does."""
    from xverse_engine import SamplingParams
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, top_k=0, top_p=1.0,
                          repetition_penalty=1.0, ignore_eos=True)


def compare_with_reference(engine, payload: dict, json_path, run_reference_path):
    """Runs the reference path after the engine's own run and records it in payload. The JSON is written
    first with the reference marked "running", so a run cut short still keeps the engine's numbers.
    run_reference_path() returns the payload fields to add ("reference", "speedup_vs_reference")."""
    payload["reference"] = {"status": "running"}
    write_json(json_path, payload)
    release_engine_memory(engine)
    try:
        payload.update(run_reference_path())
    except torch.cuda.OutOfMemoryError as error:
        payload["reference"] = {"status": "out of memory", "error": str(error).splitlines()[0]}
    write_json(json_path, payload)


def release_engine_memory(engine):
    """Drops the engine's KV cache and CUDA graphs (its benchmark is over) so that the reference path's own
    contiguous cache fits beside the weights, which both share."""
    runner = engine.runner
    runner.graphs.clear()
    for name in ("kv_cache", "kv_caches", "static", "static_logits"):
        if hasattr(runner, name):
            setattr(runner, name, None)
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
        torch.cuda.empty_cache()


def expected_distinct_experts(num_experts: int, top_k: int, batch: int) -> float:
    """E[# experts chosen by at least one of `batch` tokens], each token picking top_k distinct experts
    uniformly: an expert escapes one token with probability 1 - k/E."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch)


def decode_step_cost(config, weight_bytes: int, kv_bytes: int, batch: int, context_len: float) -> dict:
    """Bytes a decode step of `batch` sequences (mean context `context_len`) must read, and its FLOPs.
    Weights touched: attention, shared experts, router and norms of every layer, the routed experts
    expected to be hit under uniform routing, lm_head; plus each sequence's KV (MODEL.md's arithmetic)."""
    H, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    Nq, Nkv, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    attention = (Nq + 2 * Nkv) * D * H + Nq * D * H                              # qkv + o, parameters
    if config.is_moe:
        expert = 3 * H * config.intermediate_size
        shared = 3 * H * config.shared_intermediate_size
        distinct = expected_distinct_experts(config.num_experts, config.moe_top_k, batch)
        mlp_params_read = shared + distinct * expert
        mlp_params_per_token = shared + config.moe_top_k * expert
        router_bytes = config.num_experts * H * 4                                 # fp32
    else:
        distinct = None
        mlp_params_read = mlp_params_per_token = 3 * H * config.intermediate_size
        router_bytes = 0
    layer_bytes = (attention + mlp_params_read + 2 * H) * weight_bytes + router_bytes
    weights = L * layer_bytes + (V * H + H + batch * H) * weight_bytes           # + lm_head, final norm, embed rows
    kv_per_token = L * 2 * Nkv * D * kv_bytes
    kv = batch * (context_len * kv_per_token + kv_per_token)                    # read the context, write one
    router_params = config.num_experts * H if config.is_moe else 0
    # 2 FLOPs per weight of every matmul a token goes through (the embedding is a lookup), plus attention's
    # QK^T and PV: 2 x 2 FLOPs per head dim per context token per head
    flops_per_token = (2 * (L * (attention + mlp_params_per_token + router_params) + V * H)
                       + 4 * L * Nq * D * context_len)
    return {"batch": batch, "context_len": context_len, "distinct_experts_per_layer": distinct,
            "weight_bytes_per_step": weights, "kv_bytes_per_step": kv, "bytes_per_step": weights + kv,
            "flops_per_step": batch * flops_per_token}


def measure_roofline(device) -> dict:
    return {"hbm_bytes_per_s": measure_memory_bandwidth(device, megabytes=1024 if device.type == "cuda" else 64),
            "matmul_flops_per_s": measure_matmul_peak(device)}


def decode_ceiling(engine, batch: int, context_len: float, measured: dict) -> dict:
    """The decode tokens/s ceiling of this card: the slower of reading the step's bytes at the measured
    bandwidth and doing its FLOPs at the measured matmul peak."""
    size = torch.empty((), dtype=engine.dtype).element_size()
    cost = decode_step_cost(engine.config, size, size, batch, context_len)
    memory_s = cost["bytes_per_step"] / measured["hbm_bytes_per_s"]
    compute_s = cost["flops_per_step"] / measured["matmul_flops_per_s"]
    step_s = max(memory_s, compute_s)
    return {**measured, **cost, "step_s": step_s, "bound": "memory" if memory_s >= compute_s else "compute",
            "ceiling_tokens_per_s": batch / step_s}


# ---- throughput -----------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    w = p.add_argument_group("workload")
    w.add_argument("--num-prompts", type=int, default=64)
    w.add_argument("--input-len", type=int, default=128)
    w.add_argument("--output-len", type=int, default=128)
    w.add_argument("--range-ratio", type=float, default=0.0,
                   help="random lengths, uniform in [len * (1 - r), len * (1 + r)] (0: all equal)")
    w.add_argument("--max-batch", action="store_true",
                   help="run the largest batch the KV cache holds at these lengths (overrides --num-prompts)")
    w.add_argument("--reference-batch-size", type=int, default=None,
                   help="prompts per padded batch of the reference path (default: all, up to --max-num-seqs)")
    add_engine_args(p)
    args = p.parse_args(argv)
    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.range_ratio < 1:
        p.error("--range-ratio must be in [0, 1)")
    return args


def workload_lengths(args, rng: random.Random):
    def draw(n):
        low, high = max(1, round(n * (1 - args.range_ratio))), round(n * (1 + args.range_ratio))
        return [rng.randint(low, high) for _ in range(args.num_prompts)]
    return draw(args.input_len), draw(args.output_len)


def max_batch_that_fits(engine, input_len: int, output_len: int) -> int:
    """Sequences of input_len + output_len tokens that run together: KV blocks, then max_num_seqs."""
    block_size = engine.runner.block_size
    blocks_per_seq = (input_len + output_len + block_size - 1) // block_size
    return min(engine.runner.max_num_seqs, engine.runner.num_kv_blocks // blocks_per_seq)


def run_reference(engine, prompts: list, output_lens: list, batch_size: int) -> dict:
    """The workload through the reference path in padded batches; each batch decodes its longest output.
    Out of memory, it halves the batch and starts over, as a user of transformers would."""
    from benchmarks.reference_path import ReferencePath
    reference = ReferencePath(engine.model, engine.config)
    reference.generate([prompts[0][:8]], 2)  # warm-up: first-call allocations, cuBLAS handles
    while True:
        try:
            start = time.perf_counter()
            for i in range(0, len(prompts), batch_size):
                reference.generate(prompts[i:i + batch_size], max(output_lens[i:i + batch_size]))
            return {"elapsed_s": time.perf_counter() - start, "batch_size": batch_size}
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size //= 2
            torch.cuda.empty_cache()


def rates(num_requests: int, input_tokens: int, output_tokens: int, elapsed: float) -> dict:
    return {"num_requests": num_requests, "input_tokens": input_tokens, "output_tokens": output_tokens,
            "elapsed_s": elapsed, "requests_per_s": num_requests / elapsed,
            "output_tokens_per_s": output_tokens / elapsed,
            "total_tokens_per_s": (input_tokens + output_tokens) / elapsed}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.compare_reference and args.tensor_parallel_size > 1:
        raise ValueError("--compare-reference runs the model in one process; drop it with --tensor-parallel-size")
    engine = make_engine(args)
    if args.max_batch:
        args.num_prompts = max_batch_that_fits(engine, args.input_len, args.output_len)
        if args.num_prompts < 1:
            raise ValueError(f"not even one sequence of {args.input_len}+{args.output_len} tokens fits the KV cache "
                             f"({engine.runner.num_kv_blocks} blocks of {engine.runner.block_size})")
    rng = random.Random(args.seed)
    input_lens, output_lens = workload_lengths(args, rng)
    check_fits(engine, max(input_lens), max(output_lens))
    prompts = random_prompts(rng, input_lens, engine.config.vocab_size)
    params = [greedy_params(n) for n in output_lens]

    # Warm-up: a few short requests at the real prompt length (first-call allocations, cuBLAS, autotuning).
    warm = min(4, args.num_prompts)
    engine.generate(prompt_token_ids=random_prompts(rng, input_lens[:warm], engine.config.vocab_size),
                    sampling_params=greedy_params(4), use_tqdm=False)
    preemptions_before = engine.scheduler.num_preemptions

    start = time.perf_counter()
    outputs = engine.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    elapsed = time.perf_counter() - start
    failed = [o.error for o in outputs if o.error]
    if failed:
        raise RuntimeError(f"{len(failed)} request(s) failed, first: {failed[0]}")
    result = rates(len(prompts), sum(input_lens), sum(len(o.token_ids) for o in outputs), elapsed)
    result["num_preemptions"] = engine.scheduler.num_preemptions - preemptions_before

    # Roofline: the decode ceiling at the batch that runs together and the mean decode context.
    concurrency = min(args.num_prompts, engine.runner.max_num_seqs,
                      max(1, max_batch_that_fits(engine, max(input_lens), max(output_lens))))
    context = sum(input_lens) / len(input_lens) + sum(output_lens) / len(output_lens) / 2
    roofline = decode_ceiling(engine, concurrency, context, measure_roofline(engine.device))
    result["fraction_of_decode_ceiling"] = result["output_tokens_per_s"] / roofline["ceiling_tokens_per_s"]

    payload = {"benchmark": "throughput", "machine": machine_info(engine.device), "engine": engine_info(engine),
               "workload": {"num_prompts": args.num_prompts, "input_len": args.input_len,
                            "output_len": args.output_len, "range_ratio": args.range_ratio,
                            "max_batch": args.max_batch, "sampling": "greedy, ignore_eos"},
               "max_batch_that_fits": max_batch_that_fits(engine, args.input_len, args.output_len),
               "results": result, "roofline": roofline, "communication": communication(engine, concurrency)}
    if args.compare_reference:
        def reference_fields():
            batch = args.reference_batch_size or min(len(prompts), engine.runner.max_num_seqs)
            ref = run_reference(engine, prompts, output_lens, batch)
            reference = {**rates(len(prompts), sum(input_lens), sum(output_lens), ref["elapsed_s"]),
                         "batch_size": ref["batch_size"]}
            return {"reference": reference,
                    "speedup_vs_reference": result["output_tokens_per_s"] / reference["output_tokens_per_s"]}
        compare_with_reference(engine, payload, args.json, reference_fields)
    else:
        write_json(args.json, payload)
    report(payload)
    return payload


def report(payload: dict):
    rows = [{"path": "engine", **payload["results"]}]
    ref = payload.get("reference", {})
    if "output_tokens_per_s" in ref:
        rows.append({"path": "reference", **ref})
    roof = payload["roofline"]
    w = payload["workload"]
    print(f"\nthroughput: {payload['engine']['model']} on {payload['engine']['device']} "
          f"({payload['engine']['dtype']}, kernels={payload['engine']['kernels']}), {w['num_prompts']} prompts x "
          f"{w['input_len']} in / {w['output_len']} out")
    print_table(rows, [("path", "path", "{}"), ("num_requests", "requests", "{}"), ("input_tokens", "in tok", "{}"),
                       ("output_tokens", "out tok", "{}"), ("elapsed_s", "time s", "{:.2f}"),
                       ("requests_per_s", "req/s", "{:.2f}"), ("output_tokens_per_s", "out tok/s", "{:.1f}"),
                       ("total_tokens_per_s", "total tok/s", "{:.1f}")])
    print(f"decode ceiling at batch {roof['batch']}, context {roof['context_len']:.0f}: "
          f"{roof['ceiling_tokens_per_s']:.1f} tok/s ({roof['bound']}-bound; {roof['bytes_per_step'] / 1e9:.3f} GB/step "
          f"at {roof['hbm_bytes_per_s'] / 1e9:.1f} GB/s measured); engine output tok/s = "
          f"{100 * payload['results']['fraction_of_decode_ceiling']:.1f}% of it")
    print(f"largest batch that fits at {w['input_len']}+{w['output_len']} tokens: {payload['max_batch_that_fits']} "
          f"({payload['engine']['kv_capacity_tokens']} KV tokens); preemptions: {payload['results']['num_preemptions']}")
    print_communication(payload)
    if "speedup_vs_reference" in payload:
        print(f"engine / reference path: {payload['speedup_vs_reference']:.2f}x output tokens/s")
    elif ref:
        print(f"reference path: {ref.get('status')}")


def cli(main_fn):
    """Runs a benchmark's main(); a user error (bad model path, cache too small) is one line, exit 2."""
    from xverse_engine.engine.model_runner import KVCacheTooSmall
    try:
        main_fn()
    except (ValueError, OSError, NotImplementedError, KVCacheTooSmall) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli(main)
