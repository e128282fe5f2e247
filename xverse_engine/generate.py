"""python -m xverse_engine.generate: text from an XVERSE checkpoint (or the embedded tiny model).

Examples:
  python -m xverse_engine.generate                                   # the embedded tiny model, on CPU
  python -m xverse_engine.generate --model /ckpt/XVERSE-MoE-A4.2B --prompt "北京的景点：" --stream
  python -m xverse_engine.generate --model /ckpt/XVERSE-MoE-A4.2B-Chat --chat --prompt "Hello" --temperature 0.7
  python -m xverse_engine.generate --prompts-file prompts.txt --json out.json
"""
import argparse
import json
import logging
import sys
import time

DEFAULT_PROMPTS = ["北京的景点：故宫、天坛、万里长城等。\n深圳的景点：", "The capital of France is"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m xverse_engine.generate",
        description="Generate text with an XVERSE model. With no --model, runs the tiny model embedded in the "
                    "package (CPU, seconds). Sampling settings left unset come from the checkpoint's "
                    "generation_config.json.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    io = p.add_argument_group("input and output")
    io.add_argument("--model", default=None, help="checkpoint directory (config.json, tokenizer.json, weights) or "
                    "a preset name (tiny-xverse-moe, xverse-moe-a4.2b); default: the embedded tiny model")
    io.add_argument("--prompt", action="append", default=None, help="a prompt; repeat for a batch")
    io.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    io.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template "
                    "('Human: ...\\n\\nAssistant: ') for the Chat model")
    io.add_argument("--system", default=None, help="system prompt for --chat")
    io.add_argument("--stream", action="store_true", help="print text as it is generated")
    io.add_argument("--json", default=None, metavar="FILE", help="also write outputs and timings as JSON "
                    "('-' for stdout)")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=int, default=None)
    s.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=None, help="0 = off")
    s.add_argument("--top-p", type=float, default=None, help="1.0 = off")
    s.add_argument("--repetition-penalty", type=float, default=None)
    s.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    s.add_argument("--stop", action="append", default=[], help="a stop string; repeatable")
    s.add_argument("--ignore-eos", action="store_true")
    e = p.add_argument_group("engine")
    e.add_argument("--device", default="auto", help="cuda, cuda:N, cpu, or auto (default)")
    e.add_argument("--dtype", default="auto", help="bfloat16, float16, float32, or auto: the checkpoint's on GPU, "
                   "float32 on CPU")
    e.add_argument("--kernels", default="auto", choices=["auto", "cuda", "cpu", "torch"],
                   help="our CUDA or C++ kernels, or the pure-PyTorch twins")
    e.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "pt", "dummy"])
    e.add_argument("--max-model-len", type=int, default=None)
    e.add_argument("--max-num-seqs", type=int, default=256)
    e.add_argument("--num-kv-blocks", type=int, default=None)
    e.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    e.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    e.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="split the model over N GPUs (or N CPU processes); under torchrun, the job's world size")
    e.add_argument("--quiet", action="store_true", help="no progress bars or logs")
    return p.parse_args(argv)


def read_prompts(args) -> list:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
        except OSError as error:
            raise ValueError(f"cannot read --prompts-file: {error}") from None
    if not prompts:
        prompts = DEFAULT_PROMPTS if args.model is None else ["北京的景点：故宫、天坛、万里长城等。\n深圳的景点："]
    if args.chat:
        from .tokenizer import apply_chat_template
        prompts = [apply_chat_template(p, system=args.system) for p in prompts]
    return prompts


def run(args) -> int:
    from . import Engine, SamplingParams
    prompts = read_prompts(args)
    text_out = sys.stderr if args.json == "-" else sys.stdout   # stdout carries only JSON with --json -
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=args.stop,
                            ignore_eos=args.ignore_eos, seed=args.seed)
    engine = Engine(args.model, dtype=args.dtype, device=args.device, kernels=args.kernels,
                    load_format=args.load_format, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                    num_kv_blocks=args.num_kv_blocks, gpu_memory_utilization=args.gpu_memory_utilization,
                    enforce_eager=args.enforce_eager, show_progress=not args.quiet,
                    tensor_parallel_size=args.tensor_parallel_size)
    print(f"# model {engine.model_path} | {engine.device} | {str(engine.dtype).replace('torch.', '')} | "
          f"kernels={engine.kernels} | loaded in {engine.load_seconds:.1f}s", file=sys.stderr)
    start = time.perf_counter()
    if args.stream:
        texts = [""] * len(prompts)
        outputs = [None] * len(prompts)
        current = None
        for delta in engine.stream(prompts, params):
            if delta.error:
                print(f"\n[prompt {delta.index + 1}] error: {delta.error}", file=sys.stderr)
                outputs[delta.index] = {"error": delta.error, "finish_reason": "error"}
                continue
            if delta.index != current:
                current = delta.index
                if len(prompts) > 1:
                    print(f"\n--- [{current + 1}] {prompts[current]!r}", file=text_out)
                else:
                    print(prompts[current], end="", file=text_out)
            print(delta.text, end="", flush=True, file=text_out)
            texts[delta.index] += delta.text
            if delta.finished:
                outputs[delta.index] = {"text": texts[delta.index], "finish_reason": delta.finish_reason}
        print(file=text_out)
        results = [dict(prompt=p, **(o or {})) for p, o in zip(prompts, outputs)]
        failed = sum(1 for o in outputs if o and o.get("error"))
        generated = None
    else:
        outs = engine.generate(prompts, params)
        results, failed, generated = [], 0, 0
        for i, out in enumerate(outs):
            if out.error:
                failed += 1
                print(f"[{i + 1}] error: {out.error}", file=sys.stderr)
            else:
                print(f"{out.prompt}{out.text}" if len(outs) == 1 else f"--- [{i + 1}]\n{out.prompt}{out.text}",
                      file=text_out)
            generated += len(out.token_ids)
            results.append({"prompt": out.prompt, "text": out.text, "token_ids": out.token_ids,
                            "finish_reason": out.finish_reason, "error": out.error,
                            "ttft_s": out.metrics.ttft, "tpot_s": out.metrics.tpot,
                            "tokens_per_s": out.metrics.tokens_per_second})
    elapsed = time.perf_counter() - start
    if generated is None:
        generated = engine.num_generated_tokens
    print(f"# {len(prompts)} prompt(s), {generated} tokens in {elapsed:.2f}s ({generated / elapsed:.1f} tokens/s)",
          file=sys.stderr)
    if args.json:
        payload = json.dumps({"model": engine.model_path, "elapsed_s": elapsed, "generated_tokens": generated,
                              "outputs": results}, ensure_ascii=False, indent=2)
        if args.json == "-":
            print(payload)
        else:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(payload)
    return 1 if failed else 0


def main(argv=None) -> int:
    from .engine.model_runner import KVCacheTooSmall
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        return run(args)
    except (ValueError, OSError, NotImplementedError, KVCacheTooSmall) as error:
        # user errors: one line, no traceback (XVERSE_DEBUG=1 shows it)
        import os
        if os.environ.get("XVERSE_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
