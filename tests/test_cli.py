"""python -m xverse_engine.generate as a user runs it, in a subprocess (each one imports torch: few of them)."""
import json
import os
import subprocess
import sys

import pytest

from checkpoints import make_checkpoint
from xverse_engine.config import ASSETS_DIR, DEFAULT_MODEL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "hello world"


def cli(*args, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    env.pop("XVERSE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "xverse_engine.generate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(make_checkpoint(tmp_path_factory.mktemp("cli"), max_position_embeddings=256))


@pytest.fixture(scope="module")
def json_run(ckpt):
    """One non-streamed greedy run with --json - (stdout: the JSON)."""
    return cli("--model", ckpt, "--device", "cpu", "--prompt", PROMPT, "--max-new-tokens", "8", "--temperature", "0",
               "--ignore-eos", "--json", "-")


def test_generate_prints_json_and_timing(json_run):
    assert json_run.returncode == 0, json_run.stderr
    try:  # --json -: stdout must be the JSON alone, to pipe into other tools
        payload = json.loads(json_run.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"--json - must print only JSON on stdout; it starts with {json_run.stdout[:60]!r}")
    (out,) = payload["outputs"]
    assert out["prompt"] == PROMPT and out["finish_reason"] == "length"
    assert len(out["token_ids"]) == 8 and out["text"]
    assert payload["generated_tokens"] == 8 and payload["elapsed_s"] > 0
    last = json_run.stderr.strip().splitlines()[-1]
    assert last.startswith("# 1 prompt(s), 8 tokens in") and "tokens/s" in last


@pytest.fixture(scope="module")
def plain_run(ckpt):
    return cli("--model", ckpt, "--device", "cpu", "--prompt", PROMPT, "--max-new-tokens", "8", "--temperature", "0",
               "--ignore-eos", "--quiet")


def test_plain_run_prints_prompt_and_text(plain_run):
    assert plain_run.returncode == 0, plain_run.stderr
    assert plain_run.stdout.startswith(PROMPT) and len(plain_run.stdout.strip()) > len(PROMPT)
    assert "tokens/s" in plain_run.stderr.strip().splitlines()[-1]


def test_stream_equals_non_streamed(ckpt, plain_run):
    streamed = cli("--model", ckpt, "--device", "cpu", "--prompt", PROMPT, "--max-new-tokens", "8", "--temperature",
                   "0", "--ignore-eos", "--stream", "--quiet")
    assert streamed.returncode == 0, streamed.stderr
    assert plain_run.returncode == 0, plain_run.stderr
    assert streamed.stdout == plain_run.stdout      # the prompt, then the same text, then a newline


def test_nonexistent_model_is_one_line_error(tmp_path):
    run = cli("--model", str(tmp_path / "no-such-checkpoint"), "--device", "cpu")
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), run.stderr
    assert "no-such-checkpoint" in lines[0] and "Traceback" not in run.stderr


def test_help():
    run = cli("--help")
    assert run.returncode == 0 and "--max-new-tokens" in run.stdout


def test_default_model_runs_with_no_arguments():
    """A new user's first command: no flags at all, the model embedded in the package, on this CPU."""
    config = os.path.join(ASSETS_DIR, DEFAULT_MODEL, "config.json")
    assert os.path.isfile(config), f"the embedded default model is missing: {config}"
    run = cli()
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()
