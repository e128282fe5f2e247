"""What every benchmark shares: timing, the machine's measured roofline, JSON and a human table.

Roofline numbers are measured on the same device in the same run (a device-to-device copy for memory
bandwidth, a large bf16 matmul for tensor-core peak), so every result is printed with the fraction of
what this card actually reaches, not of a datasheet number.
"""
import json
import os
import platform
import statistics
import sys
import time

import torch


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device, warmup: int = 3, iters: int = 10) -> dict:
    """Median / min / mean microseconds of fn() over iters runs (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(iters):
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
    return {"median_us": statistics.median(samples), "min_us": min(samples), "mean_us": statistics.mean(samples)}


def measure_memory_bandwidth(device, megabytes: int = 1024) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    numel = megabytes * (1 << 20) // 4
    if torch.device(device).type == "cpu":
        numel = min(numel, 64 << 20)
    src = torch.empty(numel, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    stats = time_fn(lambda: dst.copy_(src), device, warmup=2, iters=5)
    return 2 * src.numel() * 4 / (stats["median_us"] * 1e-6)


def measure_matmul_peak(device, dtype=torch.bfloat16) -> float:
    """FLOP/s of a large square matmul in `dtype` (fp32 on CPU, where bf16 is slow)."""
    n = 8192 if torch.device(device).type == "cuda" else 1024
    if torch.device(device).type == "cpu":
        dtype = torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    stats = time_fn(lambda: a @ b, device, warmup=2, iters=5)
    return 2 * n ** 3 / (stats["median_us"] * 1e-6)


def machine_info(device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "date": time.strftime("%Y-%m-%d")}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    return info


def print_table(rows: list, columns: list, file=sys.stdout):
    """rows: list of dicts; columns: list of (key, header, format)."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append([("-" if row.get(key) is None else fmt.format(row[key])) for key, _, fmt in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for n, line in enumerate(cells):
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)), file=file)
        if n == 0:
            print("  ".join("-" * width for width in widths), file=file)


def write_json(path: str, payload: dict):
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")
