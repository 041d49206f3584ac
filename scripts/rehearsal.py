"""Dress rehearsal of the paper run on CPU: ``experiment=mcts_countdown_paper`` end to end on a model
with Qwen2.5-1.5B's configuration cut to a few layers, random weights and a tokenizer made here, with
every part the GPU run uses except CUDA and NCCL.

    .venv-vllm/bin/python scripts/rehearsal.py               # Qwen's width: 19-21 GiB at its peak, ~10-15 min on 2 cores
    .venv-vllm/bin/python scripts/rehearsal.py --hidden 512  # CI's: 8.8 GiB, ~10 min (build, 4 steps, resume to 6)
    .venv-vllm/bin/python scripts/rehearsal.py --layers 4 --steps 4 --resume-steps 2 --json rehearsal.json

What runs (``.ci/run`` runs it 512 wide after the tests, in the vLLM venv; figures in
docs/paper_scale.md, "The dress rehearsal"):

- **the model**: ``Qwen2ForCausalLM`` with ``src/tsd/assets/qwen2_5_1_5b_config.json`` (hidden 1536,
  12/2 heads, vocabulary 151,936, tied embeddings) but ``--layers`` layers, random weights, bf16,
  saved as a transformers directory with a fresh value head (``value_head/``);
- **the tokenizer**: a byte-level BPE trained here with ``tokenizers`` on Countdown text (the chat
  prompt, worked solutions), the GPT-2/Qwen pre-tokenizer (so ``</step>`` is several tokens, as with
  Qwen's: ``</``, ``step``, ``>``), Qwen's special tokens at Qwen's ids (``<|endoftext|>`` 151643,
  ``<|im_start|>`` 151644, ``<|im_end|>`` 151645), every other id up to the vocabulary's size a
  filler token (a random model samples any id, and every id must decode), and Qwen2.5's chat
  template written out by hand (:data:`QWEN_CHAT_TEMPLATE`);
- **the run**: ``train.py experiment=mcts_countdown_paper`` on it: vLLM's CPU build as generator
  engines in processes of their own (``VLLM_ENABLE_V1_MULTIPROCESSING=1``), FSDP2 trainers on gloo,
  the Redis buffer (a ``redis-server`` started here), the weight sync at the real tensor sizes
  (the 233M-parameter embedding included), the evaluation callback (its own vLLM engine on trainer
  rank 0), W&B offline and a CSV log, a checkpoint at the run's last step, the HF export; then a second run
  resumes from the last checkpoint. The search budget is cut by overrides (``--workers``,
  ``--iterations``, short steps); everything else is the experiment's.

Printed: wall time of both runs, the weight sync's time and bytes (gather, broadcast, the
generator's load into vLLM), peak memory (PSS, per process kind) against the memory plan's host
total, and what stays unverified until a GPU run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' throwaway redis-server

#: Qwen2.5-Instruct's chat template (its tool-calling branches left out: Countdown sends no tools)
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)
#: Qwen2.5's special tokens and their ids
QWEN_SPECIAL = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}


# ---------------------------------------------------------------------------- the model directory
def countdown_corpus(n: int, seed: int = 0) -> list[str]:
    """Chat prompts and worked solutions of ``n`` Countdown problems: what the BPE learns from."""
    from tsd.envs.countdown import CountdownEnv
    from tsd.envs.countdown.prompts import chat_messages, default_system_prompt, format_completion
    from tsd.envs.countdown.solver import solve, steps_to_expression

    env = CountdownEnv(n_train=n, n_test=8, seed=seed)
    system = default_system_prompt()
    texts = [system]
    for p in env.train:
        texts.append(chat_messages(p, system)[1]["content"])
        steps = solve(p.numbers, p.target)
        if steps:
            texts.append(format_completion(steps, steps_to_expression(p.numbers, steps)))
    return texts


def build_tokenizer(out: Path, vocab_size: int, bpe_size: int, corpus: list[str]):
    """A byte-level BPE over ``corpus`` padded to ``vocab_size`` ids, Qwen's special tokens at
    Qwen's ids, Qwen's chat template; saved to ``out`` and returned (a transformers fast tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # GPT-2's split (letters, digits, punctuation runs apart), as Qwen's: </step> is "</" "step" ">"
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    first_special = min(QWEN_SPECIAL.values())
    # every id a random model can sample must decode: filler tokens (printable ASCII, which the
    # byte-level alphabet maps to itself; no merge ever produces them) up to Qwen's special tokens,
    # and after them up to the embedding's size, as Qwen's unused rows
    taken = set(vocab.values())
    ids = [i for i in range(vocab_size) if i not in taken and i not in QWEN_SPECIAL.values()]
    for i in ids:
        vocab[f"~{i}~"] = i
    vocab.update(QWEN_SPECIAL)  # in the model's vocabulary too: added tokens take the ids found there
    data["added_tokens"] = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for t, i in QWEN_SPECIAL.items()
    ]  # fmt: skip
    assert max(vocab.values()) < vocab_size and first_special > len(taken)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = QWEN_CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    return fast


def build_model(out: Path, tokenizer, layers: int, seed: int, dtype: str, hidden: int | None = None) -> int:
    """Qwen2.5-1.5B's configuration with ``layers`` layers and random weights, plus a fresh value
    head, saved to ``out``; returns the parameter count. ``hidden``: a narrower model (CI's smaller
    host), its MLP and heads scaled alike (head size 128, 2 KV heads), Qwen's vocabulary kept."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tsd import ASSETS_DIR
    from tsd.models.policy_value import PolicyValueModel

    cfg = json.loads((ASSETS_DIR / "qwen2_5_1_5b_config.json").read_text())
    for k in ("architectures", "torch_dtype", "model_type"):
        cfg.pop(k, None)
    cfg.update(num_hidden_layers=layers, max_window_layers=layers, max_position_embeddings=4096)
    if hidden is not None and hidden != cfg["hidden_size"]:
        if hidden % 256:
            raise SystemExit(f"--hidden must be a multiple of 256 (2 KV heads of 128), got {hidden}")
        mlp = round(cfg["intermediate_size"] * hidden / cfg["hidden_size"] / 64) * 64
        cfg.update(hidden_size=hidden, intermediate_size=mlp, num_attention_heads=hidden // 128)
    cfg.update(bos_token_id=QWEN_SPECIAL["<|endoftext|>"], eos_token_id=QWEN_SPECIAL["<|im_end|>"])
    cfg.update(pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    lm = Qwen2ForCausalLM(Qwen2Config(**cfg)).to(getattr(torch, dtype))
    lm.generation_config.eos_token_id = [QWEN_SPECIAL["<|im_end|>"], QWEN_SPECIAL["<|endoftext|>"]]
    policy = PolicyValueModel(lm)
    policy.save_pretrained(out)
    return sum(p.numel() for p in policy.parameters())


# ---------------------------------------------------------------------------- watching the run
class MemoryWatch(threading.Thread):
    """Samples the PSS of every process under ``pid`` (shared pages split between their users:
    forked ranks share the parent's) every ``every_s``; keeps the peak of the sum and of each kind."""

    def __init__(self, pid: int, every_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.peak_total = 0.0
        self.peak_by_kind: dict[str, float] = {}
        self.kinds_seen: set[str] = set()
        self.peak_by_pid: dict[int, tuple[float, str]] = {}
        self._halt = threading.Event()

    @staticmethod
    def _tree(root: int) -> list[int]:
        children: dict[int, list[int]] = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(d.name))
        out, todo = [], [root]
        while todo:
            p = todo.pop()
            out.append(p)
            todo += children.get(p, [])
        return out

    @staticmethod
    def _kind(pid: int) -> str:
        try:
            cmd = (Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")).decode(errors="replace")
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return "gone"
        if "EngineCore" in cmd or "EngineCore" in comm:
            return "vLLM engine process"
        if "redis-server" in cmd:
            return "redis"
        if "train.py" in cmd:
            return "train.py (parent or rank)"
        return comm or "other"

    @staticmethod
    def _pss_gib(pid: int) -> float:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 2**20
        except OSError:
            pass
        return 0.0

    def run(self) -> None:
        while not self._halt.wait(self.every_s):
            by_kind: dict[str, float] = {}
            for p in self._tree(self.pid):
                kind = self._kind(p)
                self.kinds_seen.add(kind)
                pss = self._pss_gib(p)
                by_kind[kind] = by_kind.get(kind, 0.0) + pss
                if pss > self.peak_by_pid.get(p, (0.0, ""))[0]:
                    self.peak_by_pid[p] = (pss, kind)
            self.peak_total = max(self.peak_total, sum(by_kind.values()))
            for k, v in by_kind.items():
                self.peak_by_kind[k] = max(self.peak_by_kind.get(k, 0.0), v)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def run_train(
    overrides: list[str], log: Path, env: dict[str, str], timeout: float
) -> tuple[int, float, MemoryWatch]:
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *overrides], cwd=ROOT, env=env, stdout=f,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        watch = MemoryWatch(proc.pid)
        watch.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            rc = proc.wait()
        watch.stop()
    return rc, time.monotonic() - t0, watch


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def wait_for_memory(gib: float, patience_s: float = 1800.0) -> None:
    """On a shared host: wait (up to ``patience_s``) until ``gib`` GiB are available."""
    t0 = time.monotonic()
    while available_gib() < gib and time.monotonic() - t0 < patience_s:
        print(f"[rehearsal] {available_gib():.1f} GiB available, waiting for {gib:g}", flush=True)
        time.sleep(30)


def sync_rows(run_dir: Path) -> list[dict[str, float]]:
    """The steps with a weight sync, from the CSV log: gather, broadcast, total seconds and MiB."""
    rows = []
    for path in run_dir.rglob("metrics.csv"):
        with open(path) as f:
            for r in csv.DictReader(f):
                if r.get("perf/weight_sync_seconds"):
                    rows.append(
                        {k: float(r[k]) for k in r if (k.startswith("perf/weight_") or k == "step") and r[k]}
                    )
    return rows


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "rehearsal")
    ap.add_argument("--layers", type=int, default=2, help="of Qwen2.5-1.5B's 28")
    ap.add_argument(
        "--hidden", type=int, default=None, help="a narrower model (Qwen2.5-1.5B's: 1536); CI runs 512"
    )
    ap.add_argument("--trainers", type=int, default=2)
    ap.add_argument("--generators", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4, help="optimiser steps of the first run")
    ap.add_argument("--resume-steps", type=int, default=2, help="steps the resumed run adds")
    ap.add_argument("--workers", type=int, default=2, help="rollout.workers (article: 16)")
    ap.add_argument("--iterations", type=int, default=2, help="rollout.iterations (article: 100)")
    ap.add_argument("--bpe", type=int, default=1024, help="BPE merges' vocabulary (the rest is filler)")
    ap.add_argument("--dtype", default="bfloat16", help="model.dtype (the paper's: bfloat16)")
    ap.add_argument(
        "--head-dtype", default="model", help="sampler.head_dtype (the paper's: float32; see below)"
    )
    ap.add_argument("--kl", action="store_true", help="keep the KL term and its reference (2.6 GB more here)")
    ap.add_argument(
        "--chunked", action="store_true", help="the paper's chunked log-probs (1.7 GiB more per trainer)"
    )
    ap.add_argument("--timeout", type=float, default=1500.0, help="seconds one run may take")
    ap.add_argument(
        "--plan-gib", type=float, default=40.0, help="strategy.device_memory_gib for the plan's check"
    )
    ap.add_argument(
        "--min-free-gib", type=float, default=16.0, help="wait until the host has this much available"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--set", nargs="*", default=[], help="more train.py overrides")
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    wait_for_memory(a.min_free_gib)
    t_all = time.monotonic()
    a.out.mkdir(parents=True, exist_ok=True)
    model_dir = a.out / "model"
    print(f"[rehearsal] building the model and tokenizer in {model_dir}", flush=True)
    tok = build_tokenizer(model_dir, 151936, a.bpe, countdown_corpus(3000))
    step_ids = tok.encode("</step>", add_special_tokens=False)
    assert len(step_ids) > 1, step_ids  # several tokens, as with Qwen's tokenizer
    params = build_model(model_dir, tok, a.layers, seed=0, dtype=a.dtype, hidden=a.hidden)
    print(f"[rehearsal] {params / 1e6:.1f}M parameters, '</step>' is {len(step_ids)} tokens", flush=True)

    from redis_server import redis_server

    env = {
        **os.environ,
        "MALLOC_ARENA_MAX": "2",  # glibc keeps fewer per-thread arenas of freed memory
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1",  # separate-process engines: the path that never ran
        # how vLLM starts them on a GPU (CUDA is up in the rank by then): spawn, not fork
        "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p),
    }
    # eager (no compile), few sequences and tokens per step: a small profile run and workspace
    vllm_args = "{enforce_eager: true, max_num_seqs: 32, max_num_batched_tokens: 512}"
    common = [
        "experiment=mcts_countdown_paper",
        f"model.name_or_path={model_dir}",
        f"model.dtype={a.dtype}",
        "trainer.accelerator=cpu",
        f"trainer.devices={a.trainers + a.generators}",
        f"strategy.num_generators={a.generators}",
        "logger=many",  # W&B (offline) as the paper run, and a CSV to read the figures from
        # the search budget, cut (the article: 16 workers x 100 iterations, 64-token steps, 512 tokens)
        f"rollout.workers={a.workers}",
        f"rollout.iterations={a.iterations}",
        "rollout.max_step_tokens=16",
        "rollout.max_depth=3",
        "rollout.max_new_tokens=48",
        "generation.problems_per_rollout=2",
        "data.batch_size=2",
        "module.micro_batch_size=1",  # two micro-batches per optimiser step (the paper: 4 of 16)
        # the chunked log-probs upcast the LM head to fp32 in the backward (weight + gradient: 1.7 GiB per
        # trainer at this vocabulary, tsd.models.logprobs); at micro-batches of one 300-token sequence the
        # plain path's logits are less (0.2 GiB per copy). --chunked keeps the paper's 1024-token chunks
        f"module.logprob_chunk_tokens={1024 if a.chunked else 0}",
        "+sampler.value_batch_size=8",  # the value forward's states at a time (a shared 24 GiB host)
        "data.sync_every=1",
        "data.max_lag=2",
        "env.n_train=200",
        "env.n_test=8",
        # vLLM's CPU build: KV-cache blocks of 32 tokens, eager mode, small caches
        "sampler.kv_cache_gib=0.25",
        # vLLM's CPU path runs an fp32 head by casting the whole (151,936 x 1536) weight at every
        # step (0.9 GB per engine); on a GPU it accumulates a bf16 product in fp32 without a copy
        # (LogitsProcessor._apply_head): the GPU path's head dtype stays unverified here
        f"sampler.head_dtype={a.head_dtype}",
        "sampler.block_size=32",
        "sampler.max_model_len=1024",
        f"+sampler.llm_kwargs={vllm_args}",
        "callbacks.eval.num_problems=2",
        "callbacks.eval.k=2",
        "callbacks.eval.max_new_tokens=32",
        # evaluated at the end of each run: its engine (a process of its own, ~3 GB on CPU) is not
        # held through the training steps, which a shared 24 GiB host cannot also give it
        "callbacks.eval.every_n_steps=0",
        "callbacks.eval.at_start=false",
        "callbacks.eval.problems_per_batch=2",
        "callbacks.eval.table_rows=4",
        "callbacks.eval.sampler_kwargs={kv_cache_gib: 0.25}",
        "callbacks.checkpoint.every_n_train_steps=2",
        "callbacks.log_line.every_n_steps=1",
        "trainer.enable_progress_bar=false",
        # the KL term's frozen reference is a replicated model: an fp32 copy in train.py (before the
        # fork) and a bf16 one in each trainer, 2.6 GB here; --kl keeps it (the paper's c_kl 0.05)
        *([] if a.kl else ["loss.c_kl=0"]),
        # one checkpoint per run, the last (the full fp32 model + AdamW state gathered on rank 0: 3.7 GB)
        f"callbacks.checkpoint.every_n_train_steps={a.steps}",
        # the memory plan sums every item as if all coincided (the checkpoint's gather, the eval engine
        # started at the run's end, each push in flight): 33 GiB, more than this host's 23.5; it is
        # printed in the run's log, compared with the peak measured here, and checked against this instead
        f"strategy.device_memory_gib={a.plan_gib}",
        *a.set,
    ]
    runs = {}
    with redis_server() as url:
        first_dir, resumed_dir = a.out / "run", a.out / "resumed"
        for name, run_dir, extra in (
            ("first", first_dir, [f"trainer.max_steps={a.steps}"]),
            (
                "resumed",
                resumed_dir,
                [
                    f"trainer.max_steps={a.steps + a.resume_steps}",
                    f"ckpt_path={first_dir}/checkpoints/last.ckpt",
                ],
            ),
        ):
            overrides = [*common, f"buffer.url={url}", f"hydra.run.dir={run_dir}", *extra]
            print(f"[rehearsal] {name} run: train.py {' '.join(extra)} (log: {run_dir}.log)", flush=True)
            wait_for_memory(a.min_free_gib)
            rc, seconds, watch = run_train(overrides, Path(f"{run_dir}.log"), env, a.timeout)
            text = Path(f"{run_dir}.log").read_text(errors="replace")
            if rc != 0:
                print(text[-6000:])
                print(
                    f"[rehearsal] {name} run FAILED (exit {rc}) after {seconds:.0f}s; peak PSS {watch.peak_total:.1f} GiB "
                    f"{json.dumps({k: round(v, 2) for k, v in watch.peak_by_kind.items()})}; per process "
                    f"{sorted(((round(v, 2), k, p) for p, (v, k) in watch.peak_by_pid.items()), reverse=True)[:8]}"
                )
                return 1
            res = json.loads((run_dir / "results.json").read_text())
            runs[name] = {
                "seconds": seconds,
                "global_step": res["global_step"],
                "peak_pss_gib": watch.peak_total,
                "peak_pss_by_kind_gib": watch.peak_by_kind,
                "engine_processes": "vLLM engine process" in watch.kinds_seen,
                "syncs": sync_rows(run_dir),
                "eval_steps": [h["step"] for h in res.get("eval_history", [])],
                "loads": [float(x) for x in re.findall(r"policy version \d+ loaded \((\d+\.\d+)s\)", text)],
                "plan_total_gib": _plan_total(text),
            }
            print(f"[rehearsal] {name} run: exit 0 in {seconds:.0f}s, step {res['global_step']}", flush=True)

    first, resumed = runs["first"], runs["resumed"]
    problems = []
    if first["global_step"] != a.steps or resumed["global_step"] != a.steps + a.resume_steps:
        problems.append(f"steps {first['global_step']}, {resumed['global_step']}")
    if not (first["engine_processes"] and resumed["engine_processes"]):
        problems.append("no vLLM engine process was seen")
    if not (first_dir / "checkpoints" / "last.ckpt").exists():
        problems.append("no checkpoint")
    if not (resumed_dir / "policy" / "config.json").exists():
        problems.append("no exported policy")
    if not first["syncs"]:
        problems.append("no weight sync logged")
    # the resumed run's CSV holds the first run's rows too: its own are the later steps
    syncs = first["syncs"] + [r for r in resumed["syncs"] if r.get("step", 0) > a.steps]
    med = lambda xs: sorted(xs)[len(xs) // 2] if xs else float("nan")  # noqa: E731
    print(
        f"\n## dress rehearsal: {a.layers} layers of width {a.hidden or 1536} ({params / 1e6:.0f}M parameters, {a.dtype}), "
        f"{a.trainers} trainers + {a.generators} generator(s), engines in their own processes\n"
    )
    print("| run | wall s | steps | evaluations at | peak PSS GiB (all processes) | plan's host total GiB |")
    print("|---|---|---|---|---|---|")
    for name, r in runs.items():
        print(
            f"| {name} | {r['seconds']:.0f} | {r['global_step']} | {r['eval_steps']} | {r['peak_pss_gib']:.1f} | {r['plan_total_gib']} |"
        )
    if syncs:
        mb = med([s.get("perf/weight_sync_mb", 0.0) for s in syncs])
        print(
            f"\nweight sync ({len(syncs)} syncs, medians): {mb:.0f} MiB, "
            f"gather {med([s.get('perf/weight_gather_seconds', 0.0) for s in syncs]):.2f} s, "
            f"broadcast {med([s.get('perf/weight_broadcast_seconds', 0.0) for s in syncs]):.2f} s, "
            f"total {med([s['perf/weight_sync_seconds'] for s in syncs]):.2f} s on the trainers; "
            f"the generator's load into vLLM {med(first['loads'] + resumed['loads']):.2f} s"
        )
    print(
        "peak PSS by process kind (GiB):",
        json.dumps({k: round(v, 2) for k, v in first["peak_pss_by_kind_gib"].items()}),
    )
    print(f"total {time.monotonic() - t_all:.0f}s")
    if a.json:
        a.json.write_text(
            json.dumps(
                {"params": params, "layers": a.layers, "hidden": a.hidden or 1536, "runs": runs}, indent=1
            )
        )
    if problems:
        print("[rehearsal] FAILED: " + "; ".join(problems))
        return 1
    return 0


def _plan_total(text: str) -> str:
    m = re.search(r"\| \*\*the host\*\* \| \| \*\*total\*\* \| \*\*([\d.]+)\*\*", text)
    return m.group(1) if m else "?"


if __name__ == "__main__":
    sys.exit(main())
