"""Decode tokens/s on the CPU with our C++ kernels (kernels="cpu"), the lean decoder layer beside the unfused
one, on the same weights in the same run.

    python -m benchmarks.decode_cpu                       # the embedded tiny model, bf16, batch 1 and 4
    python -m benchmarks.decode_cpu --json out.json --dtype float32 --batch 1 8

"before" (unfused): separate residual add and RMSNorm ops, RoPE and the cache write as two steps, the shared
experts as their own SwiGLU MLP. "after" (lean): add_rmsnorm, rope_cache, and the shared experts folded into
the grouped GEMM (model.py). Both models are built from the same checkpoint; runs alternate (before, after,
before, ...) so that load on a shared machine hits both alike, and the median of the repeats is reported.
Decode time is the time of the decode steps only (every step after the prefill).
"""
import argparse
import statistics
import time

import torch

from benchmarks.common import machine_info, print_table, write_json
from xverse_engine import Engine, SamplingParams
from xverse_engine.loader import load_weights
from xverse_engine.model import XverseForCausalLM


def decode_tokens_per_s(engine, batch: int, new_tokens: int, prompt_len: int) -> float:
    """Adds `batch` requests, runs the prefill step(s), then times the decode steps."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, repetition_penalty=1.0, ignore_eos=True)
    ids = [engine.add_request(prompt_token_ids=[(7 * i + 3 * j) % 900 + 6 for j in range(prompt_len)],
                              params=params) for i in range(batch)]
    while engine.scheduler.waiting:  # the prefill step(s), untimed
        engine.step()
    tokens, start = 0, time.perf_counter()
    while engine.has_unfinished():
        tokens += len(engine.step())
    elapsed = time.perf_counter() - start
    for request_id in ids:
        engine.get_output(request_id)  # release the finished requests
    return tokens / elapsed


def build_model(engine, lean: bool):
    model = XverseForCausalLM(engine.config, engine.dtype, engine.device, engine.kernels, engine.max_model_len,
                              lean=lean)
    load_weights(model, engine.config, engine.model_path, show_progress=False)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint dir (default: the embedded tiny model)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: stable numbers on a shared machine, no OpenMP spin-waits)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    engine = Engine(args.model, device="cpu", dtype=args.dtype, kernels="cpu", num_kv_blocks=256, max_model_len=512,
                    show_progress=False)
    models = {"before (unfused)": build_model(engine, lean=False), "after (lean)": build_model(engine, lean=True)}
    rows = []
    for batch in args.batch:
        samples = {name: [] for name in models}
        for _ in range(args.repeats):
            for name, model in models.items():
                engine.model = engine.runner.model = model
                samples[name].append(decode_tokens_per_s(engine, batch, args.new_tokens, args.prompt_len))
        base = statistics.median(samples["before (unfused)"])
        for name, values in samples.items():
            rate = statistics.median(values)
            rows.append({"batch": batch, "model": name, "tokens_per_s": rate, "speedup": rate / base,
                         "samples": values})
    print(f"decode on the CPU, kernels='cpu', {args.dtype}, {torch.get_num_threads()} threads, "
          f"{args.new_tokens} new tokens per sequence, median of {args.repeats}")
    print_table(rows, [("batch", "batch", "{}"), ("model", "layer", "{}"), ("tokens_per_s", "tokens/s", "{:.1f}"),
                       ("speedup", "vs before", "{:.2f}x")])
    write_json(args.json, {"benchmark": "decode_cpu", "machine": machine_info("cpu"), "dtype": args.dtype,
                           "model": args.model or "embedded tiny-xverse-moe", "results": rows})
    return rows


if __name__ == "__main__":
    main()
