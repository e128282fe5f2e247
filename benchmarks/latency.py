"""Latency of one batch: warm-up, then --iters runs of the same shape (fresh random prompts each run, so the
prefix cache cannot help), with TTFT / TPOT / end-to-end p50 / p90 / p99 from each request's metrics,
output tokens/s, and the decode roofline fraction (batch / TPOT against the tokens/s the step's bytes allow
at the measured HBM bandwidth). --compare-reference times the same batches through the model's own
reference path (benchmarks/reference_path.py) in the same run.

  python -m benchmarks.latency --device cpu --batch-size 2 --input-len 16 --output-len 8
  python -m benchmarks.latency --model xverse-moe-a4.2b --load-format dummy --batch-size 1 \\
      --input-len 128 --output-len 128 --compare-reference --json out.json
"""
import argparse
import random
import time

from benchmarks.common import machine_info, print_table, write_json
from benchmarks.throughput import (add_engine_args, check_fits, cli, communication, compare_with_reference,
                                   decode_ceiling, engine_info, greedy_params, make_engine, measure_roofline,
                                   print_communication, random_prompts)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    w = p.add_argument_group("workload")
    w.add_argument("--batch-size", type=int, default=1)
    w.add_argument("--input-len", type=int, default=128)
    w.add_argument("--output-len", type=int, default=128)
    w.add_argument("--warmup-iters", type=int, default=1)
    w.add_argument("--iters", type=int, default=3)
    add_engine_args(p)
    args = p.parse_args(argv)
    for name in ("batch_size", "input_len", "output_len", "iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.output_len < 2:
        p.error("--output-len must be >= 2 (TPOT needs a second token)")
    if args.warmup_iters < 0:
        p.error("--warmup-iters must be >= 0")
    return args


def percentiles(values: list) -> dict:
    """p50 / p90 / p99 (linear interpolation between order statistics) and the mean."""
    values = sorted(values)

    def at(q):
        pos = q * (len(values) - 1)
        low = int(pos)
        high = min(low + 1, len(values) - 1)
        return values[low] + (values[high] - values[low]) * (pos - low)
    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "mean": sum(values) / len(values),
            "n": len(values)}


def run_engine(engine, args, rng) -> dict:
    params = greedy_params(args.output_len)
    batch_prompts = lambda: random_prompts(rng, [args.input_len] * args.batch_size, engine.config.vocab_size)
    for _ in range(args.warmup_iters):
        engine.generate(prompt_token_ids=batch_prompts(), sampling_params=params, use_tqdm=False)
    ttft, tpot, e2e, runs = [], [], [], []
    for _ in range(args.iters):
        start = time.perf_counter()
        outputs = engine.generate(prompt_token_ids=batch_prompts(), sampling_params=params, use_tqdm=False)
        runs.append(time.perf_counter() - start)
        for out in outputs:
            if out.error:
                raise RuntimeError(f"a request failed: {out.error}")
            ttft.append(out.metrics.ttft)
            tpot.append(out.metrics.tpot)
            e2e.append(out.metrics.e2e_latency)
    tokens = args.batch_size * args.output_len
    return {"ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot), "e2e_s": percentiles(e2e),
            "batch_s": percentiles(runs), "output_tokens_per_s": tokens / percentiles(runs)["p50"]}


def run_reference(engine, args, rng) -> dict:
    """The same batches through the reference path; every request of a padded batch shares its timings."""
    from benchmarks.reference_path import ReferencePath
    reference = ReferencePath(engine.model, engine.config)
    batch_prompts = lambda: random_prompts(rng, [args.input_len] * args.batch_size, engine.config.vocab_size)
    if args.warmup_iters:  # one short run: first-call allocations and cuBLAS handles (the path has no graphs)
        reference.generate(batch_prompts(), 2)
    timings = []
    for _ in range(args.iters):
        reference.generate(batch_prompts(), args.output_len)
        timings.append(reference.last_timing)
    e2e = percentiles([t["e2e_s"] for t in timings])
    return {"ttft_s": percentiles([t["ttft_s"] for t in timings]), "tpot_s": percentiles([t["tpot_s"] for t in timings]),
            "e2e_s": e2e, "output_tokens_per_s": args.batch_size * args.output_len / e2e["p50"]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.compare_reference and args.tensor_parallel_size > 1:
        raise ValueError("--compare-reference runs the model in one process; drop it with --tensor-parallel-size")
    engine = make_engine(args)
    check_fits(engine, args.input_len, args.output_len)
    rng = random.Random(args.seed)
    result = run_engine(engine, args, rng)

    # Decode roofline at this batch and the mean decode context; measured decode rate = batch / TPOT.
    context = args.input_len + args.output_len / 2
    roofline = decode_ceiling(engine, args.batch_size, context, measure_roofline(engine.device))
    result["decode_tokens_per_s"] = args.batch_size / result["tpot_s"]["p50"]
    result["fraction_of_decode_ceiling"] = result["decode_tokens_per_s"] / roofline["ceiling_tokens_per_s"]

    payload = {"benchmark": "latency", "machine": machine_info(engine.device), "engine": engine_info(engine),
               "workload": {"batch_size": args.batch_size, "input_len": args.input_len, "output_len": args.output_len,
                            "warmup_iters": args.warmup_iters, "iters": args.iters, "sampling": "greedy, ignore_eos"},
               "results": result, "roofline": roofline, "communication": communication(engine, args.batch_size)}
    if args.compare_reference:
        def reference_fields():
            ref = run_reference(engine, args, rng)
            ref["decode_tokens_per_s"] = args.batch_size / ref["tpot_s"]["p50"]
            return {"reference": ref, "speedup_vs_reference": {
                metric: ref[f"{metric}_s"]["p50"] / result[f"{metric}_s"]["p50"] for metric in ("e2e", "ttft", "tpot")}}
        compare_with_reference(engine, payload, args.json, reference_fields)
    else:
        write_json(args.json, payload)
    report(payload)
    return payload


def report(payload: dict):
    w, eng = payload["workload"], payload["engine"]
    print(f"\nlatency: {eng['model']} on {eng['device']} ({eng['dtype']}, kernels={eng['kernels']}, "
          f"cuda_graphs={eng['cuda_graphs']}), batch {w['batch_size']} x {w['input_len']} in / {w['output_len']} out, "
          f"{w['iters']} iters")
    rows = []
    paths = [("engine", payload["results"])]
    if "ttft_s" in payload.get("reference", {}):
        paths.append(("reference", payload["reference"]))
    for path, res in paths:
        for metric in ("ttft_s", "tpot_s", "e2e_s"):
            rows.append({"path": path, "metric": metric.replace("_s", ""),
                         **{q: res[metric][q] * 1e3 for q in ("p50", "p90", "p99", "mean")},
                         "tok_s": res["output_tokens_per_s"] if metric == "e2e_s" else None})
    print_table(rows, [("path", "path", "{}"), ("metric", "metric", "{}"), ("p50", "p50 ms", "{:.2f}"),
                       ("p90", "p90 ms", "{:.2f}"), ("p99", "p99 ms", "{:.2f}"), ("mean", "mean ms", "{:.2f}"),
                       ("tok_s", "out tok/s", "{:.1f}")])
    roof, res = payload["roofline"], payload["results"]
    print(f"decode: {res['decode_tokens_per_s']:.1f} tok/s (batch / TPOT p50) = "
          f"{100 * res['fraction_of_decode_ceiling']:.1f}% of the {roof['ceiling_tokens_per_s']:.1f} tok/s ceiling "
          f"({roof['bound']}-bound; {roof['bytes_per_step'] / 1e9:.3f} GB/step at "
          f"{roof['hbm_bytes_per_s'] / 1e9:.1f} GB/s measured)")
    print_communication(payload)
    if "speedup_vs_reference" in payload:
        s = payload["speedup_vs_reference"]
        print(f"engine vs reference path (p50): end-to-end {s['e2e']:.2f}x, TTFT {s['ttft']:.2f}x, "
              f"TPOT {s['tpot']:.2f}x faster")
    elif payload.get("reference"):
        print(f"reference path: {payload['reference'].get('status')}")


if __name__ == "__main__":
    cli(main)
