"""tensor_parallel_size=N on the CPU (gloo, spawned worker processes): the same tokens as one process on
every preset, the serving loop unchanged under N=2, a rank's loader memory near its share, and workers
that start, fail and stop cleanly (checked through their pids).

Each N=2 engine costs a spawned worker (a Python + torch start-up): engines are shared per module.
"""
import contextlib
import gc
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from checkpoints import make_checkpoint
from xverse_engine import Engine, SamplingParams
from xverse_engine.distributed.launcher import WorkerDiedError
from xverse_engine.distributed.parallel_state import TensorParallelError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Checkpoints in the real layout (tests/checkpoints.py). Head_dim 80 and top-6 as XVERSE-MoE-A4.2B with
# 64 and with 16 experts; vocab 515 so the vocab-parallel lm_head's last shard is padded.
PRESETS = {
    "moe-64": dict(hidden_size=160, num_attention_heads=2, num_experts=64, moe_top_k=6, intermediate_size=48),
    "moe-16": dict(hidden_size=320, num_attention_heads=4, num_experts=16, moe_top_k=6, intermediate_size=48,
                   vocab_size=515),
    "dense": dict(dense=True, intermediate_size=96),
    "gqa": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2),
}
KERNELS = {"moe-64": "cpu", "moe-16": "cpu", "dense": "torch", "gqa": "torch"}   # C++ ops and the twins

GREEDY = SamplingParams(max_new_tokens=6, temperature=0, repetition_penalty=1.0, ignore_eos=True)
SEEDED = SamplingParams(max_new_tokens=6, temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.1,
                        seed=1234, ignore_eos=True)


def prompts_of_lengths(lengths, vocab=500):
    return [[(i * 31 + j * 7) % (vocab - 6) + 6 for j in range(n)] for i, n in enumerate(lengths)]


def make_engine(path, kernels, **kw):
    settings = dict(device="cpu", kernels=kernels, block_size=4, max_model_len=96, num_kv_blocks=128,
                    show_progress=False)
    settings.update(kw)
    return Engine(str(path), **settings)


def wait_gone(pids, timeout=15.0):
    """True once no process of `pids` exists (zombies of our own children count as gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().split(")")[-1].split()[0] != "Z":
                        alive.append(pid)
            except FileNotFoundError:
                pass
        if not alive:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {name: make_checkpoint(tmp_path_factory.mktemp(name), max_position_embeddings=512, rope_theta=10000,
                                  **preset) for name, preset in PRESETS.items()}


# ---- N=2 gives N=1's tokens on every preset ---------------------------------------------------------------

PROMPTS = prompts_of_lengths([1, 7, 19])


@pytest.fixture(scope="module")
def one_rank(checkpoints):
    """(greedy, seeded) tokens of PROMPTS from one process, per preset."""
    cache = {}

    def get(preset):
        if preset not in cache:
            single = make_engine(checkpoints[preset], KERNELS[preset])
            cache[preset] = tuple([o.token_ids for o in single.generate(prompt_token_ids=PROMPTS, sampling_params=p)]
                                  for p in (GREEDY, SEEDED))
        return cache[preset]
    return get


@pytest.mark.parametrize("preset", ["moe-16", "dense", "gqa"])
def test_two_ranks_give_the_tokens_of_one(checkpoints, one_rank, preset):
    prompts = PROMPTS
    expected, expected_sampled = one_rank(preset)
    engine = make_engine(checkpoints[preset], KERNELS[preset], tensor_parallel_size=2)
    pids = engine.worker_pids
    assert len(pids) == 1 and all(wait_gone([pid], timeout=0) is False for pid in pids)
    assert [o.token_ids for o in engine.generate(prompt_token_ids=prompts, sampling_params=GREEDY)] == expected
    assert [o.token_ids for o in engine.generate(prompt_token_ids=prompts, sampling_params=SEEDED)] == expected_sampled
    del engine          # shutdown at garbage collection: the worker exits
    gc.collect()
    assert wait_gone(pids)


def test_four_ranks_give_the_tokens_of_one(checkpoints, one_rank):
    engine = make_engine(checkpoints["moe-16"], KERNELS["moe-16"], tensor_parallel_size=4)
    assert len(engine.worker_pids) == 3
    assert [o.token_ids for o in engine.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)] == \
        one_rank("moe-16")[0]
    pids = engine.worker_pids
    engine.shutdown()
    assert wait_gone(pids)


# ---- the serving loop under N=2 (MoE, 64 experts, top-6) ---------------------------------------------------

def workload(n=12):
    prompts = [[(i * 13 + j * 5) % 490 + 6 for j in range(2 + (i * 7) % 23)] for i in range(n)]
    params = [SamplingParams(max_new_tokens=3 + (i * 5) % 9, temperature=0, repetition_penalty=1.0,
                             ignore_eos=True) if i % 3 else
              SamplingParams(max_new_tokens=3 + (i * 5) % 9, temperature=0.8, top_p=0.9, seed=i, ignore_eos=True)
              for i in range(n)]
    return prompts, params


@pytest.fixture(scope="module")
def moe64_alone(checkpoints):
    """Each workload request run by itself in one process."""
    engine = make_engine(checkpoints["moe-64"], "cpu")
    prompts, params = workload()
    return [engine.generate(prompt_token_ids=[p], sampling_params=s)[0].token_ids for p, s in zip(prompts, params)]


@pytest.fixture(scope="class")
def moe64_tp2(checkpoints):
    """N=2 with a KV cache too small for the workload at once (24 blocks of 4 tokens: preemption) and a
    token budget that splits long prompts (chunked prefill)."""
    engine = make_engine(checkpoints["moe-64"], "cpu", tensor_parallel_size=2, num_kv_blocks=24,
                         max_num_seqs=8, max_num_batched_tokens=16)
    yield engine
    pids = engine.worker_pids
    engine.shutdown()
    assert wait_gone(pids)


class TestServingUnderTwoRanks:
    """One N=2 engine (stopped when the class ends: one tensor-parallel engine per process at a time)."""

    def test_batch_with_preemption_and_chunked_prefill_equals_each_alone(self, moe64_tp2, moe64_alone):
        prompts, params = workload()
        before = moe64_tp2.scheduler.num_preemptions
        outs = moe64_tp2.generate(prompt_token_ids=prompts, sampling_params=params)
        assert moe64_tp2.scheduler.num_preemptions > before
        assert [o.token_ids for o in outs] == moe64_alone

    def test_arrivals_while_running_equal_each_alone(self, moe64_tp2, moe64_alone):
        prompts, params = workload()
        ids, pending = [], list(zip(prompts, params))
        while pending or moe64_tp2.has_unfinished():
            for _ in range(3):
                if pending:
                    p, s = pending.pop(0)
                    ids.append(moe64_tp2.add_request(None, s, prompt_token_ids=p))
            moe64_tp2.step()
        assert [moe64_tp2.get_output(i).token_ids for i in ids] == moe64_alone

    def test_prefix_cache_hits_equal_each_alone(self, moe64_tp2, checkpoints):
        header = [(j * 11) % 490 + 6 for j in range(20)]      # 5 full blocks of 4, shared
        prompts = [header + [100 + i, 200 + i] for i in range(3)]
        single = make_engine(checkpoints["moe-64"], "cpu", enable_prefix_caching=False)
        expected = [single.generate(prompt_token_ids=[p], sampling_params=GREEDY)[0].token_ids for p in prompts]
        first = moe64_tp2.generate(prompt_token_ids=prompts[:1], sampling_params=GREEDY)[0]
        rest = moe64_tp2.generate(prompt_token_ids=prompts[1:], sampling_params=GREEDY)
        assert [first.token_ids] + [o.token_ids for o in rest] == expected
        assert all(o.metrics.num_cached_prompt_tokens == 20 for o in rest)

    def test_each_rank_caches_only_its_heads_and_holds_only_its_experts(self, moe64_tp2, checkpoints):
        single = make_engine(checkpoints["moe-64"], "cpu", num_kv_blocks=24)
        assert moe64_tp2.runner.kv_cache.shape[3] * 2 == single.runner.kv_cache.shape[3] == 2
        assert moe64_tp2.model.layers[0].mlp.w13.shape[0] == 32          # experts [0, 32) on rank 0


# ---- errors and shutdown -----------------------------------------------------------------------------------

def test_a_size_that_does_not_divide_is_rejected_before_any_process_starts(checkpoints, tmp_path):
    before = multiprocessing.active_children()
    with pytest.raises(TensorParallelError, match="num_attention_heads=4"):
        make_engine(checkpoints["gqa"], "torch", tensor_parallel_size=3)
    with pytest.raises(TensorParallelError, match="num_key_value_heads=2"):
        make_engine(checkpoints["gqa"], "torch", tensor_parallel_size=4)
    six = make_checkpoint(tmp_path / "six", num_experts=6, moe_top_k=2, tokenizer=False, num_shards=1)
    with pytest.raises(TensorParallelError, match="num_experts=6"):
        make_engine(six, "torch", tensor_parallel_size=4)
    assert multiprocessing.active_children() == before


def test_a_killed_worker_is_a_clear_error_not_a_hang(moe_ckpt):
    engine = make_engine(moe_ckpt, "cpu", tensor_parallel_size=2)
    pid = engine.worker_pids[0]
    long = SamplingParams(max_new_tokens=80, temperature=0, ignore_eos=True)
    threading.Timer(1.0, os.kill, (pid, signal.SIGKILL)).start()    # dies while steps are running
    start = time.monotonic()
    with pytest.raises(WorkerDiedError, match=rf"rank 1 \(pid {pid}\) was killed by signal 9"):
        for _ in range(100):
            engine.generate(prompt_token_ids=prompts_of_lengths([5, 9]), sampling_params=long)
    assert time.monotonic() - start < 60
    with pytest.raises(WorkerDiedError):        # and it stays failed
        engine.generate(prompt_token_ids=[[7, 8]], sampling_params=GREEDY)
    assert wait_gone([pid])


def test_a_stuck_worker_times_out_instead_of_hanging(moe_ckpt, monkeypatch):
    """A worker that is alive but never answers (stopped): the step's collective times out after
    XVERSE_TP_TIMEOUT seconds, the engine raises, and the stuck worker is killed."""
    monkeypatch.setenv("XVERSE_TP_TIMEOUT", "5")
    engine = make_engine(moe_ckpt, "torch", tensor_parallel_size=2)
    pid = engine.worker_pids[0]
    os.kill(pid, signal.SIGSTOP)
    start = time.monotonic()
    try:
        with pytest.raises(WorkerDiedError, match="step failed"):
            engine.generate(prompt_token_ids=[[7, 8, 9]], sampling_params=GREEDY)
        assert time.monotonic() - start < 60
        assert wait_gone([pid])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


SCRIPT = """
import sys, time
from xverse_engine import Engine, SamplingParams
if __name__ == "__main__":
    engine = Engine(sys.argv[1], device="cpu", kernels="torch", num_kv_blocks=64, block_size=4, max_model_len=64,
                    show_progress=False, tensor_parallel_size=2)
    print("PIDS", *engine.worker_pids, flush=True)
    if sys.argv[2] == "exit":
        sys.exit(0)    # no del, no shutdown: the interpreter's exit must stop the worker
    while True:        # until Ctrl-C
        engine.generate(prompt_token_ids=[[7, 8, 9]], sampling_params=SamplingParams(max_new_tokens=8, temperature=0))
"""


@pytest.mark.parametrize("how", ["exit", "ctrl-c"])
def test_no_orphan_workers_after_exit_or_ctrl_c(moe_ckpt, tmp_path, how):
    script = tmp_path / "serve.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # its own session, so Ctrl-C can go to the whole process group as a terminal sends it
    proc = subprocess.Popen([sys.executable, str(script), str(moe_ckpt), how], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("PIDS"), proc.stderr.read()
        pids = [int(p) for p in line.split()[1:]]
        if how == "ctrl-c":
            time.sleep(1.0)
            os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert wait_gone(pids), f"orphaned worker(s) {pids} after {how}"


def test_a_worker_that_fails_to_start_is_a_clear_error(moe_ckpt, tmp_path):
    """The usual start-up failure: a script that builds the Engine at module level without the main guard
    (spawned workers re-import it). The error says so, and the program ends instead of hanging."""
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(f"""
        from xverse_engine import Engine
        engine = Engine({str(moe_ckpt)!r}, device="cpu", kernels="torch", num_kv_blocks=64, block_size=4,
                        max_model_len=64, show_progress=False, tensor_parallel_size=2)
    """))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0
    assert "WorkerDiedError: tensor-parallel worker rank 1" in out.stderr
    assert 'if __name__ == "__main__":' in out.stderr


# ---- benchmarks: communication volume ----------------------------------------------------------------------

def test_communication_volume_of_the_real_model():
    from xverse_engine.config import ModelConfig, resolve_model_path
    from xverse_engine.distributed.comm_volume import communication_volume
    config = ModelConfig.from_pretrained(resolve_model_path("xverse-moe-a4.2b"))
    decode = communication_volume(config, 2, tokens=64, sample_rows=64, activation_bytes=2)
    assert decode["all_reduce_bytes"] == 2 * 64 * 2560 * 2                 # 2 T H bytes
    assert decode["bytes_per_layer"] == 2 * decode["all_reduce_bytes"]     # after attention, after the MoE
    padded_vocab = 100534                                                  # even: no padding at N=2
    assert decode["logits_gather_bytes"] == 64 * padded_vocab * 4 // 2
    assert decode["bytes_per_step"] == 28 * decode["bytes_per_layer"] + decode["logits_gather_bytes"]
    assert communication_volume(config, 1, 64, 64, 2)["bytes_per_step"] == 0


def test_throughput_benchmark_runs_with_two_ranks_on_the_embedded_model(tmp_path):
    sys.path.insert(0, ROOT)
    from benchmarks import throughput
    payload = throughput.main(["--device", "cpu", "--tensor-parallel-size", "2", "--num-prompts", "4",
                               "--input-len", "8", "--output-len", "4", "--json", str(tmp_path / "t.json")])
    assert payload["engine"]["tensor_parallel_size"] == 2
    assert payload["results"]["output_tokens"] == 16
    comm = payload["communication"]["decode_step"]
    assert comm["tokens"] == 4 and comm["all_reduce_bytes"] == 2 * 4 * 128 * 4   # tiny model: H=128, fp32
    del payload
    gc.collect()   # the engine main() made stops its worker


# ---- loader: a rank reads its share ------------------------------------------------------------------------

LOAD_RANK = """
import sys, torch
from xverse_engine.config import ModelConfig
from xverse_engine.distributed import TensorParallel
from xverse_engine.distributed.sharding import CheckpointSharding
from xverse_engine.loader import load_weights
from xverse_engine.model import XverseForCausalLM

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

path, fmt, rank, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
config = ModelConfig.from_pretrained(path)
before = rss("VmRSS:")
tp = TensorParallel(rank=rank, size=size)
model = XverseForCausalLM(config, torch.float32, "cpu", "torch", 64, tp=tp)
load_weights(model, config, path, fmt, show_progress=False, sharding=CheckpointSharding(config, tp) if size > 1 else None)
print(rss("VmHWM:") - before, sum(p.numel() * p.element_size() for p in model.parameters()))
"""


def test_a_rank_loads_near_its_share_of_host_memory(tmp_path):
    """64 experts make ~95% of this 100 MB checkpoint: a rank of 2 must stay near half of what loading the
    whole model costs (peak RSS, counting the pages of the files it reads), in both formats: safetensors
    read by slices, .bin through a memory map."""
    shape = dict(hidden_size=256, num_attention_heads=4, intermediate_size=256, num_experts=64, moe_top_k=6,
                 num_shards=3, tokenizer=False)
    paths = {"safetensors": make_checkpoint(tmp_path / "st", **shape),
             "pt": make_checkpoint(tmp_path / "bin", fmt="bin", **shape)}
    script = tmp_path / "load_rank.py"
    script.write_text(LOAD_RANK)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def peak_growth(fmt, rank, size):
        out = subprocess.run([sys.executable, str(script), str(paths[fmt]), fmt, str(rank), str(size)],
                             capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        growth, param_bytes = map(int, out.stdout.split())
        return growth, param_bytes

    whole, whole_bytes = peak_growth("safetensors", 0, 1)
    assert whole >= whole_bytes
    for fmt, rank in (("safetensors", 1), ("pt", 0)):     # rank 1 reads the checkpoints' later half
        growth, share = peak_growth(fmt, rank, 2)
        assert share < 0.52 * whole_bytes
        assert growth < 0.7 * whole, f"{fmt} rank {rank}: peak RSS grew {growth / 2**20:.0f} MiB, loading the " \
                                      f"whole model grew {whole / 2**20:.0f} MiB"
        assert growth < 2 * share   # its parameters, plus the file pages of the slices it read
