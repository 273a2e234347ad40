"""`chimera generate` end to end on a seconds-long run: its greedy text is `generate`'s (one-pass prefill), several
prompts of different lengths each get their own continuation, `--stop` cuts the text, `--seed` repeats a sample, the
text reaches the terminal piece by piece, and bad sampling flags are one-line errors (exit 2)."""

import argparse
import io

import pytest
import torch

import chimera
from chimera.data.tokenizers import ByteTokenizer
from chimera.inference.cli import print_generations
from chimera.inference.generate import generate
from helpers import REPO, run_chimera, run_chimera_here

TINY = REPO / "configs/runs/tiny.yaml"
NEW = 24


def assert_user_error(proc, expected):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("chimera: error:") and expected in lines[0], proc.stderr


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    proc = run_chimera("train", TINY, "--run-dir", run_dir, "--set", "logging.progress=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def greedy_alone(model, prompt: str, n: int = NEW) -> str:
    ids = torch.tensor([list(prompt.encode())])
    return ByteTokenizer().decode(generate(model, ids, n, temperature=0, vocab_limit=257)[0].tolist())


def test_greedy_text_single_and_batched(run_dir, single_process):
    model = chimera.load_model(run_dir)
    one = run_chimera_here("generate", run_dir, "--prompt", "def ", "--max-new-tokens", NEW, "--temperature", 0)
    assert one.returncode == 0, one.stderr[-2000:]
    assert one.stdout == greedy_alone(model, "def ") + "\n"
    prompts = ["import os\n", "x", "class Point:\n    def "]
    many = run_chimera_here("generate", run_dir, *[a for p in prompts for a in ("--prompt", p)],
                       "--max-new-tokens", NEW, "--temperature", 0)
    assert many.returncode == 0, many.stderr[-2000:]
    expected = "".join(f"--- prompt {i + 1} of 3 ---\n{greedy_alone(model, p)}\n" for i, p in enumerate(prompts))
    assert many.stdout == expected


def test_prompts_file_stop_and_seed(run_dir, tmp_path, single_process):
    model = chimera.load_model(run_dir)
    full = greedy_alone(model, "def ", 40)[len("def "):]
    stop = full[10:12]
    proc = run_chimera_here("generate", run_dir, "--prompt", "def ", "--max-new-tokens", 40, "--temperature", 0,
                       "--stop", "never-made", "--stop", stop)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "def " + full[: full.find(stop)] + "\n"

    (tmp_path / "prompts.txt").write_text("def \n\nimport \n")
    sampled = [run_chimera_here("generate", run_dir, "--prompts-file", tmp_path / "prompts.txt", "--seed", seed,
                           "--max-new-tokens", 30, "--temperature", 1.0) for seed in (1, 1, 2)]
    assert all(p.returncode == 0 for p in sampled), sampled[0].stderr[-2000:]
    assert sampled[0].stdout.count("--- prompt") == 2
    assert sampled[0].stdout == sampled[1].stdout != sampled[2].stdout


def test_text_reaches_the_terminal_piece_by_piece(run_dir, single_process):
    class Terminal(io.StringIO):
        flushed: list

        def flush(self):
            self.flushed.append(self.getvalue())

    term = Terminal()
    term.flushed = []
    args = argparse.Namespace(temperature=0.0, top_k=None, top_p=None, max_new_tokens=NEW, seed=0, stop=[])
    model = chimera.load_model(run_dir)
    print_generations(model, ByteTokenizer(), [list(b"def ")], args, out=term)
    assert term.getvalue() == greedy_alone(model, "def ") + "\n"
    assert len(set(term.flushed)) > NEW // 2  # shown as it grew, not once at the end


@pytest.mark.parametrize(("flags", "expected"), [
    (["--top-k", "-3"], "--top-k -3: must be at least 1"),
    (["--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature -1.0: must be >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
])
def test_bad_sampling_flags(flags, expected, run_here):
    assert_user_error(run_here("generate", REPO, "--prompt", "x", *flags), expected)


def test_no_prompt_and_unreadable_prompts_file(tmp_path, run_here):
    assert_user_error(run_here("generate", REPO), "no prompt: give --prompt TEXT")
    assert_user_error(run_here("generate", REPO, "--prompts-file", tmp_path / "none.txt"),
                      "--prompts-file")


def test_serve_cli_answers_on_localhost_until_interrupted(run_dir, single_process):
    import json
    import os
    import re
    import signal
    import subprocess
    import sys
    import urllib.request

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    server = subprocess.Popen([sys.executable, "-m", "chimera.launch.cli", "serve", str(run_dir), "--port", "0",
                               "--max-tokens", "32"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env)
    try:
        line = server.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        request = urllib.request.Request(url + "/v1/completions", data=json.dumps(
            {"prompt": "def ", "max_tokens": NEW, "temperature": 0}).encode())
        with urllib.request.urlopen(request, timeout=60) as answer:
            text = json.loads(answer.read())["choices"][0]["text"]
        assert "def " + text == greedy_alone(chimera.load_model(run_dir), "def ")
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        server.stdout.close()
        server.stderr.close()


@pytest.mark.parametrize(("flags", "expected"), [
    (["--port", "70000"], "--port 70000: must be in 0..65535"),
    (["--port", "0", "--max-tokens", "0"], "--max-tokens 0: must be at least 1"),
    (["--port", "0", "--max-concurrent", "-1"], "--max-concurrent -1: must be at least 1"),
])
def test_bad_serve_flags(flags, expected, run_here):
    assert_user_error(run_here("serve", REPO, *flags), expected)
