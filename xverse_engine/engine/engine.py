"""Engine: the public API. Loads a checkpoint, owns the scheduler and the model runner, and turns steps
into outputs (generate), per-request deltas (stream), and metrics.

Asynchronous scheduling (the default): step() plans and launches step n+1 before it reads step n's sampled
tokens, so the host's work for one step overlaps the device's work on the previous one. The tokens, stop
checks and outputs are exactly those of synchronous stepping (async_scheduling=False): a sequence that
stops at step n has its step n+1 token discarded, and max_tokens is never exceeded because the scheduler
counts the pending token.
"""
import logging
import random
import time
from itertools import repeat
from typing import Iterator, NamedTuple, Optional, Union

import torch
from tqdm import tqdm

from ..config import ModelConfig, load_generation_config, resolve_model_path
from ..distributed import SINGLE, check_tensor_parallel
from ..distributed.launcher import start as start_workers
from ..distributed.runner import DriverRunner
from ..distributed.sharding import CheckpointSharding
from ..distributed.worker import RankSpec, rank_device
from ..loader import LOAD_FORMATS, load_weights
from ..model import XverseForCausalLM
from ..ops import resolve_kernels
from ..sampling_params import SamplingParams, seed_as_int64
from ..tokenizer import Tokenizer
from .block_manager import BlockManager
from .detokenizer import OutputText
from .model_runner import ModelRunner
from .outputs import RequestDelta, RequestMetrics, RequestOutput, StreamDelta
from .scheduler import Scheduler
from .sequence import Sequence, SequenceStatus

logger = logging.getLogger("xverse_engine")

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


class RequestError(ValueError):
    """A request the engine cannot serve (too long, empty, bad ids); it fails alone."""


class Request(NamedTuple):
    """What the engine keeps per request: the scheduler's sequence, its output text, its stop tokens."""
    seq: Sequence
    text: OutputText
    stop_token_ids: set


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={device!r} is not a device; use 'cuda', 'cuda:N', 'cpu' or 'auto'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA GPU is visible to torch; use device='cpu'")
    if resolved.type not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r} is not supported; use 'cuda' or 'cpu'")
    return resolved


def resolve_dtype(dtype: str, config: ModelConfig, device: torch.device) -> torch.dtype:
    if dtype == "auto":  # the checkpoint's dtype on a GPU; float32 on the CPU, where bf16 math is slow
        return DTYPES.get(config.torch_dtype, torch.bfloat16) if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not known; use one of 'auto', 'bfloat16', 'float16', 'float32'")
    return DTYPES[dtype]


class Engine:
    def __init__(self, model: Optional[str] = None, *, dtype: str = "auto", device: str = "auto",
                 kernels: str = "auto", load_format: str = "auto", max_num_seqs: int = 256,
                 max_model_len: Optional[int] = None, gpu_memory_utilization: float = 0.90, block_size: int = 16,
                 num_kv_blocks: Optional[int] = None, enable_prefix_caching: bool = True,
                 enforce_eager: bool = False, tensor_parallel_size: int = 1, seed: int = 0,
                 max_num_batched_tokens: Optional[int] = None, show_progress: bool = True,
                 log_stats_interval: float = 10.0, async_scheduling: bool = True):
        if load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format={load_format!r} is not one of {LOAD_FORMATS}")
        for name, value in (("max_num_seqs", max_num_seqs), ("block_size", block_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if num_kv_blocks is not None and (not isinstance(num_kv_blocks, int) or num_kv_blocks < 1):
            raise ValueError(f"num_kv_blocks must be a positive integer or None, got {num_kv_blocks!r}")

        self.model_path = resolve_model_path(model)
        self.config = ModelConfig.from_pretrained(self.model_path)
        check_tensor_parallel(self.config, tensor_parallel_size)  # before any process starts
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.config, self.device)
        self.kernels = resolve_kernels(kernels, self.device.type)
        self.generation_config = load_generation_config(self.model_path)
        try:
            self.tokenizer = Tokenizer(self.model_path)
        except FileNotFoundError:
            self.tokenizer = None  # token ids in and out still work (e.g. dummy weights of a preset)

        positions = self.config.max_position_embeddings
        if self.config.rope_scaling:
            positions = int(positions * self.config.rope_scaling["factor"])
        self.max_model_len = max_model_len or min(positions, 8192)
        if self.max_model_len > positions:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's {positions} positions "
                             f"(max_position_embeddings, times the rope_scaling factor)")
        default_budget = 8192 if self.device.type == "cuda" else 2048
        self.max_num_batched_tokens = max_num_batched_tokens or max(default_budget, max_num_seqs)
        if self.max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} is below "
                             f"max_num_seqs={max_num_seqs}: "
                             f"a step must hold one token of every running sequence; raise max_num_batched_tokens "
                             f"or lower max_num_seqs")

        runner_kwargs = dict(block_size=block_size, max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=self.max_num_batched_tokens, num_kv_blocks=num_kv_blocks,
                             gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager)
        # -- tensor parallel (xverse_engine/distributed): spawn / join the workers; this process is rank 0
        self.workers, tp = None, SINGLE
        if tensor_parallel_size > 1:
            self.workers = start_workers(tensor_parallel_size, RankSpec(
                self.model_path, self.device.type, self.dtype, self.kernels, load_format, self.max_model_len, seed,
                runner_kwargs, cpu_threads=max(1, torch.get_num_threads() // tensor_parallel_size)))
            tp = self.workers.tp
            self.device = rank_device(self.device.type, 0)
        try:
            torch.manual_seed(seed)
            start = time.perf_counter()
            self.model = XverseForCausalLM(self.config, self.dtype, self.device, self.kernels, self.max_model_len,
                                           tp=tp)
            load_weights(self.model, self.config, self.model_path, load_format, show_progress=show_progress,
                         sharding=CheckpointSharding(self.config, tp) if tp.size > 1 else None)
            self.load_seconds = time.perf_counter() - start
            runner_class, extra = ModelRunner, {}
            if self.workers is not None:
                self.workers.wait_ready()
                runner_class, extra = DriverRunner, {"workers": self.workers}
            self.runner = runner_class(self.model, self.config, device=self.device, dtype=self.dtype,
                                       kernels=self.kernels, max_model_len=self.max_model_len, **runner_kwargs,
                                       **extra)
        except BaseException:  # a failed (or interrupted) start stops the workers it started
            self.shutdown()
            raise
        self.block_manager = BlockManager(self.runner.num_kv_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, self.max_num_batched_tokens)
        self.rng = random.Random(seed)
        self.async_scheduling = async_scheduling
        self._in_flight = None   # the launched step whose sampled tokens the host has not read yet
        self.show_progress = show_progress
        self.log_stats_interval = log_stats_interval
        self._last_log = time.perf_counter()
        self._next_request_id = 0
        self._requests = {}      # request id -> Request
        self._num_taken = {}     # request id -> output tokens handed out by take_delta
        self.num_generated_tokens = 0
        logger.info("engine ready: %s on %s (%s, kernels=%s), %d KV blocks of %d tokens, max_model_len=%d",
                    self.model_path, self.device, str(self.dtype).replace("torch.", ""), self.kernels,
                    self.runner.num_kv_blocks, block_size, self.max_model_len)

    # ---- requests ----------------------------------------------------------------------------------------
    def _stop_token_ids(self, params: SamplingParams) -> set:
        stops = set(params.stop_token_ids)
        if not params.ignore_eos:
            eos = self.generation_config.get("eos_token_id", self.config.eos_token_id)
            stops.update(eos if isinstance(eos, list) else [eos])
        return stops

    def add_request(self, prompt: Union[str, list, None] = None, params: Optional[SamplingParams] = None, *,
                    prompt_token_ids: Optional[list] = None) -> int:
        """Queues one request; returns its id. Raises RequestError if it cannot be served."""
        params = (params or SamplingParams()).resolved(self.generation_config)
        params.validate()
        if prompt_token_ids is None:
            if isinstance(prompt, list):
                prompt, prompt_token_ids = None, prompt
            elif isinstance(prompt, str):
                if self.tokenizer is None:
                    raise RequestError(f"{self.model_path} has no tokenizer; pass prompt_token_ids instead of text")
                prompt_token_ids = self.tokenizer.encode(prompt)
            else:
                raise RequestError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        prompt_token_ids = list(prompt_token_ids)
        if not prompt_token_ids:
            raise RequestError("the prompt is empty: give at least one token")
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < self.config.vocab_size]
        if bad:
            raise RequestError(f"prompt token id {bad[0]!r} is outside the vocabulary [0, {self.config.vocab_size})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(prompt_token_ids)} tokens, but max_model_len={self.max_model_len} "
                               f"leaves no room to generate; shorten the prompt or raise max_model_len")
        request_id = self._next_request_id
        self._next_request_id += 1
        seed = seed_as_int64(params.seed) if params.seed is not None else self.rng.getrandbits(63)
        seq = Sequence(request_id, prompt, prompt_token_ids, params, seed,
                       max_tokens=min(self.max_model_len, len(prompt_token_ids) + params.max_new_tokens))
        self._requests[request_id] = Request(
            seq, OutputText(self.tokenizer, params.stop, prompt_token_ids, source=seq.token_ids),
            self._stop_token_ids(params))
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: int):
        """Stops a request now; its blocks are freed and its output ends with finish_reason "abort"."""
        request = self._requests.get(request_id)
        if request is None or request.seq.is_finished:
            return
        self._finish(request.seq, "abort")

    def _finish(self, seq: Sequence, reason: str):
        self.scheduler.remove(seq)
        self.runner.release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.finish_time = time.perf_counter()

    def has_unfinished(self) -> bool:
        # a sequence whose token is in flight is still running (or preempted, waiting): the scheduler has it
        return self.scheduler.has_unfinished()

    # ---- one step --------------------------------------------------------------------------------------
    def step(self) -> list:
        """Runs one scheduled step; returns the ids of requests that got new tokens or finished. With
        asynchronous scheduling those tokens are the previous step's: this step is launched first."""
        scheduled = self.scheduler.schedule()
        for seq in self.scheduler.take_preempted():
            self.runner.release(seq)
        launched = None
        if scheduled:
            launched = self.runner.run(scheduled)
            register = self.block_manager.register_computed_blocks
            for item in scheduled:
                if item.num_new_tokens > 1:   # prompt chunks: their tokens are known, their blocks findable now
                    register(item.seq)
        elif self._in_flight is None:
            if self.scheduler.has_unfinished():  # cannot happen while the cache holds max_model_len tokens
                raise RuntimeError("the scheduler could not place any waiting request; please report this")
            return []
        if self.async_scheduling:
            previous, self._in_flight = self._in_flight, launched
        else:
            previous = launched
        touched = self._process(previous) if previous is not None else []
        self._maybe_log_stats()
        return touched

    def _process(self, output) -> list:
        """The sampled tokens of a step reach their sequences: stop checks, logprobs, finishing."""
        tokens, logprobs = output.fetch()
        now = time.perf_counter()
        touched = []
        requests = self._requests
        register = self.block_manager.register_computed_blocks
        block_size = self.block_manager.block_size
        finished = SequenceStatus.FINISHED
        for seq, token, entry in zip(output.seqs, tokens, logprobs or repeat(None)):
            if seq.status is finished:
                continue        # stopped or aborted while this step ran: its token is dropped
            seq.num_pending -= 1
            token_ids = seq.token_ids
            token_ids.append(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
            if entry is not None:
                seq.logprobs.append(entry)
            request = requests[seq.request_id]
            if request.text.checks_stops and request.text.update():
                self._finish(seq, "stop")
            elif token in request.stop_token_ids:
                self._finish(seq, "stop")
            elif len(token_ids) >= seq.max_tokens:
                self._finish(seq, "length")
            elif len(token_ids) // block_size > seq.num_hashed_blocks:
                register(seq)     # a block of known tokens filled up: findable by later prompts
            touched.append(seq.request_id)
        self.num_generated_tokens += len(touched)
        return touched

    # ---- outputs -----------------------------------------------------------------------------------------
    def get_output(self, request_id: int, release: bool = True) -> RequestOutput:
        """The output of a request added with add_request (so far, or final). A finished request is
        forgotten once fetched unless release=False."""
        if request_id not in self._requests:
            raise KeyError(f"no request {request_id} (unknown, or already fetched)")
        output = self._output(request_id)
        if release and output.finished:
            del self._requests[request_id]
            self._num_taken.pop(request_id, None)
        return output

    def take_delta(self, request_id: int, text: bool = True) -> RequestDelta:
        """What a request added with add_request produced since the previous take_delta: each token, logprob
        and character exactly once, without copying what was handed out before (a server calls this for every
        request it touched, every step). Text that could still grow into a stop string is held back until it
        cannot. The delta that says finished carries the metrics, and the request is forgotten then.
        text=False: the caller decodes the tokens itself (delta.text is ""; a request without stop strings is
        then never decoded here), as the server does on its HTTP side to leave the engine's core the steps."""
        entry = self._requests.get(request_id)   # one lookup: a server calls this per request per step
        if entry is None:
            raise KeyError(f"no request {request_id} (unknown, or already finished and taken)")
        seq, output_text, _ = entry
        taken = self._num_taken.get(request_id, 0)
        token_ids = seq.token_ids[seq.num_prompt_tokens + taken:]
        logprobs = seq.logprobs[taken:] if seq.params.logprobs is not None else []
        finished = seq.is_finished
        delta = RequestDelta(request_id, output_text.take_delta(final=finished) if text else "", token_ids, logprobs,
                             finished, seq.finish_reason, seq.error, self._metrics_of(seq) if finished else None)
        if finished:
            del self._requests[request_id]
            self._num_taken.pop(request_id, None)
        else:
            self._num_taken[request_id] = taken + len(token_ids)
        return delta

    def _output(self, request_id: int) -> RequestOutput:
        seq, text, _ = self._requests[request_id]
        return RequestOutput(
            request_id=request_id, prompt=seq.prompt, prompt_token_ids=seq.prompt_token_ids,
            text=text.text, token_ids=seq.output_token_ids, finish_reason=seq.finish_reason,
            logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
            metrics=self._metrics_of(seq), error=seq.error)

    @staticmethod
    def _metrics_of(seq: Sequence) -> RequestMetrics:
        m = RequestMetrics(num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=seq.num_output_tokens,
                           num_cached_prompt_tokens=seq.num_cached_prompt_tokens,
                           num_preemptions=seq.num_preemptions)
        if seq.first_scheduled_time is not None:
            m.queue_time = seq.first_scheduled_time - seq.arrival_time
        if seq.first_token_time is not None:
            m.ttft = seq.first_token_time - seq.arrival_time
        if seq.finish_time is not None:
            m.e2e_latency = seq.finish_time - seq.arrival_time
            if seq.first_token_time is not None and seq.num_output_tokens > 1:
                m.tpot = (seq.finish_time - seq.first_token_time) / (seq.num_output_tokens - 1)
        return m

    def _failed_output(self, prompt, prompt_token_ids, error: Exception) -> RequestOutput:
        return RequestOutput(request_id=-1, prompt=prompt if isinstance(prompt, str) else None,
                             prompt_token_ids=list(prompt_token_ids or (prompt if isinstance(prompt, list) else [])),
                             text="", token_ids=[], finish_reason="error", error=str(error))

    def _add_all(self, prompts, sampling_params, prompt_token_ids) -> list:
        """Queues a batch; returns per input either a request id or a failed RequestOutput."""
        if prompts is None and prompt_token_ids is None:
            raise ValueError("give prompts (text) or prompt_token_ids")
        if prompts is not None and prompt_token_ids is not None:
            raise ValueError("give prompts or prompt_token_ids, not both")
        if prompt_token_ids is not None:
            single = bool(prompt_token_ids) and isinstance(prompt_token_ids[0], int)
            inputs = [prompt_token_ids] if single else list(prompt_token_ids)
        else:
            inputs = [prompts] if isinstance(prompts, str) else list(prompts)
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(inputs):
                raise ValueError(f"{len(sampling_params)} sampling_params for {len(inputs)} prompts: give one, "
                                 f"or one per prompt")
            per_request = sampling_params
        else:
            per_request = [sampling_params] * len(inputs)
        entries = []
        for item, params in zip(inputs, per_request):
            try:
                if prompt_token_ids is not None:
                    entries.append(self.add_request(None, params, prompt_token_ids=item))
                else:
                    entries.append(self.add_request(item, params))
            except RequestError as error:
                logger.warning("request rejected: %s", error)
                entries.append(self._failed_output(item if prompt_token_ids is None else None,
                                                   item if prompt_token_ids is not None else None, error))
        return entries

    def generate(self, prompts=None, sampling_params=None, *, prompt_token_ids=None,
                 use_tqdm: Optional[bool] = None) -> list:
        """Runs prompts (text, or prompt_token_ids) to completion; outputs in input order. A request that
        cannot be served comes back with finish_reason "error" and .error, and the others still run."""
        entries = self._add_all(prompts, sampling_params, prompt_token_ids)
        ids = [e for e in entries if isinstance(e, int)]
        show = self.show_progress if use_tqdm is None else use_tqdm
        bar = tqdm(total=len(ids), desc="Generating", unit="req", disable=not show or len(ids) < 2)
        pending = set(ids)
        try:
            while pending:
                done = [i for i in self.step() if i in pending and self._requests[i].seq.is_finished]
                bar.update(len(done))
                pending.difference_update(done)
        finally:
            bar.close()
            for i in pending:  # interrupted: leave nothing behind
                self.abort(i)
        outputs = [self._output(e) if isinstance(e, int) else e for e in entries]
        for i in ids:
            del self._requests[i]
        return outputs

    def stream(self, prompts=None, sampling_params=None, *, prompt_token_ids=None) -> Iterator[StreamDelta]:
        """Yields StreamDelta as text arrives, for one prompt or many running together. Closing the iterator
        early aborts the requests it started."""
        entries = self._add_all(prompts, sampling_params, prompt_token_ids)
        index_of = {}
        for index, entry in enumerate(entries):
            if isinstance(entry, int):
                index_of[entry] = index
            else:
                yield StreamDelta(-1, index, "", [], True, "error", entry.error)
        sent_tokens = {i: 0 for i in index_of}
        pending = set(index_of)
        try:
            while pending:
                for request_id in self.step():
                    if request_id not in pending:
                        continue
                    seq, text, _ = self._requests[request_id]
                    new_tokens = seq.token_ids[seq.num_prompt_tokens + sent_tokens[request_id]:]
                    sent_tokens[request_id] += len(new_tokens)
                    delta = text.take_delta(final=seq.is_finished)
                    if delta or new_tokens or seq.is_finished:
                        yield StreamDelta(request_id, index_of[request_id], delta, new_tokens, seq.is_finished,
                                          seq.finish_reason)
                    if seq.is_finished:
                        pending.discard(request_id)
        finally:
            for request_id in pending:
                self.abort(request_id)
            for request_id in index_of:
                self._requests.pop(request_id, None)

    # ---- tensor parallel -----------------------------------------------------------------------------
    @property
    def tensor_parallel_size(self) -> int:
        """tensor_parallel_size: ranks the model is split over."""
        return self.workers.tp.size if self.workers is not None else 1

    @property
    def worker_pids(self) -> list:
        """The pids of the tensor-parallel worker processes this engine started ([] when N = 1)."""
        return self.workers.worker_pids if self.workers is not None else []

    def shutdown(self):
        """Stops the tensor-parallel workers (also done at `del engine` and at interpreter exit)."""
        if self.workers is not None:
            self.workers.shutdown()

    # ---- metrics -------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        bm = self.block_manager
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_free": bm.num_free_blocks,
            "kv_usage": 1.0 - bm.num_free_blocks / bm.num_blocks,
            "prefix_cache_hit_rate": bm.prefix_hit_rate,
            "num_preemptions": self.scheduler.num_preemptions,
            "generated_tokens": self.num_generated_tokens,
        }

    def _maybe_log_stats(self):
        now = time.perf_counter()
        if now - self._last_log < self.log_stats_interval:
            return
        self._last_log = now
        s = self.stats()
        logger.info("running %d, waiting %d, KV %.0f%% used, prefix-cache hits %.0f%%, preemptions %d",
                    s["running"], s["waiting"], 100 * s["kv_usage"], 100 * s["prefix_cache_hit_rate"],
                    s["num_preemptions"])
