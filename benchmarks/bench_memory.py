"""Peak memory of one trainer step at the article's shapes, per memory knob, and its projection to
Qwen2.5-1.5B's 28 layers on an 80 GB GPU (docs/paper_scale.md).

    nice -n 5 python benchmarks/bench_memory.py                 # ~15 min on an idle 2-core box, ~9 GiB RAM at most
    nice -n 5 python benchmarks/bench_memory.py --min-free-gib 12   # a shared box: wait for memory before each child
    nice -n 5 python benchmarks/bench_memory.py --only plain,chunked   # the acceptance rows alone
    python benchmarks/bench_memory.py --json out.json           # also write every figure

What is measured (CPU, each configuration in a fresh subprocess): a Qwen2 with Qwen2.5-1.5B's
configuration (``src/tsd/assets/qwen2_5_1_5b_config.json``: hidden 1536, intermediate 8960, 12
heads / 2 KV heads, vocabulary 151,936, tied embeddings) at ``--layers`` layers, random weights,
built as ``train.py`` builds the trainer for ``model.dtype=bfloat16``: fp32 master weights, bf16
compute under autocast, the frozen reference; the batch is ``--seqs`` sequences of 148 prompt +
512 completion tokens (660: the article's 512-token completions after a ~150-token chat prompt),
the article's loss (CISPO + value + KL: c_value 1, c_kl 0.05) with the value baseline. After the
model, the module, the batch and the optimiser exist, the process's peak RSS is reset
(``/proc/self/clear_refs`` = 5, Linux >= 4.0) and its RSS read; then ``PolicyValueModule.backward_batch``
(forward and backward of every micro-batch: ``compute_loss`` and its backward when micro-batches
are off) runs, and the peak RSS growth over that baseline is the figure (``VmHWM``). A probe
allocation of a known size checks the method in every child (its growth is printed as a
ratio, ~1.00). Tensors of this size are mmap'ed by glibc and returned on free, so RSS follows the
live tensors. Each row also gives the growth in units of one fp32 (B, L, V) logits tensor
(the issue's yardstick) and against the plain path measured in the same run.

The projection (per trainer GPU, FSDP2 over ``--trainers`` ranks; and one process for
``cispo_countdown_paper``) adds, for 28 layers and ``--batch`` sequences per trainer:

- the sharded fp32 master weights, gradients and AdamW's two moments (16 bytes per parameter over
  the ranks), and the replicated bf16 reference (fp32 in one process: it computes as the policy);
- FSDP2's gathered units (the root's bf16 embeddings, two blocks, their bf16 gradients and the
  fp32 reduce-scatter buffer of the largest unit) and the chunked log-prob's fp32 copy of the
  gathered bf16 head, forward and backward;
- what a forward pass leaves for its backward (the growth when the first backward starts, the
  "held" column), fitted as ``c0 + cL * layers + cB * m + cLB * layers * m`` (least squares, the
  slopes >= 0) over (2 layers, 2 seqs), (2, 4), (4, 2), (4, 4) and the micro-batched row, and
  evaluated at 28 layers and micro-batches of m sequences:
  measured with fp32 residuals and autocast's bf16 copies of the weights (one process), which
  FSDP2's bf16 compute halves and frees: an over-estimate for the trainers;
- the backward's working set on top of it, measured at 2 layers (the largest ``peak - held`` of the
  configuration's rows): it holds the 2 layers' gradients, the embedding's and head's fp32
  gradients and the recomputed chunks; it does not grow with the layers, whose gradients are
  counted in the sharded state (an over-estimate again: those at 2 layers are counted twice);
- an allowance for what no CPU measures (CUDA context, NCCL, the caching allocator's
  fragmentation): 2 GiB + 10% of the rest, an assumption a GPU run must check.

The budget is 78 GiB (what an H100 80 GB gives a process here); the margin is what is left.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
PROMPT, COMPLETION = 148, 512  # 660 tokens: a ~150-token chat prompt + the article's 512
BUDGET_GIB = 78.0
PAPER_LAYERS = 28

#: name -> module knobs (logprob_chunk_tokens, micro_batch_size, activation_checkpointing)
CONFIGS = {
    "plain": {"logprob_chunk_tokens": 0, "micro_batch_size": 0, "activation_checkpointing": False},
    "chunked": {"logprob_chunk_tokens": 1024, "micro_batch_size": 0, "activation_checkpointing": False},
    "chunked+ckpt": {"logprob_chunk_tokens": 1024, "micro_batch_size": 0, "activation_checkpointing": True},
    "chunked+ckpt+micro1": {
        "logprob_chunk_tokens": 1024,
        "micro_batch_size": 1,
        "activation_checkpointing": True,
    },
}


# ---------------------------------------------------------------------------------- one child
def _status() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024 / GIB  # kB -> GiB
    return out


def _reset_peak() -> float:
    """Reset the peak RSS to the current RSS; returns the current RSS (GiB)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return _status()["VmRSS"]


def child(spec: dict) -> dict:
    """One configuration in this (fresh) process: build, reset the peak, step, measure."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tsd import ASSETS_DIR
    from tsd.data.collate import collate_trajectories
    from tsd.models.policy_value import PolicyValueModel
    from tsd.models.precision import Precision
    from tsd.module import PolicyValueModule
    from tsd.rl.losses import CISPOLoss, RLObjective
    from tsd.rl.trajectory import Trajectory

    torch.set_num_threads(spec["threads"])
    config = json.loads((ASSETS_DIR / "qwen2_5_1_5b_config.json").read_text())
    config.update(num_hidden_layers=spec["layers"], pad_token_id=0)
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(**config))  # fp32 random weights: the masters
    policy = PolicyValueModel(lm)
    objective = RLObjective(CISPOLoss(eps_high=5.0), c_ppo=1.0, c_value=1.0, c_kl=0.05)  # the article's
    module = PolicyValueModule(
        policy,
        objective,
        optimizer=partial(torch.optim.AdamW, lr=5e-6),
        banned_token_ids=[0],
        precision=Precision(torch.bfloat16),  # model.dtype: bfloat16
        **CONFIGS[spec["config"]],
    ).train()
    g = torch.Generator().manual_seed(0)
    V = config["vocab_size"]
    trajs = [
        Trajectory(
            problem_id=i,
            prompt_ids=torch.randint(1, V, (PROMPT,), generator=g).tolist(),
            completion_ids=torch.randint(1, V, (COMPLETION,), generator=g).tolist(),
            behaviour_logprobs=(-torch.rand(COMPLETION, generator=g) * 5).tolist(),
            reward=float(torch.rand((), generator=g) * 2 - 1),
            correct=False,
            policy_version=0,
            rollout="bench",
        )
        for i in range(spec["seqs"])
    ]
    batch = collate_trajectories(trajs, pad_id=0)
    B, L = batch.input_ids.shape
    trainable = [p for p in module.policy.parameters() if p.requires_grad]
    grads_gib = sum(p.numel() * 4 for p in trainable) / GIB  # fp32 gradients of the masters

    # the method, checked: a known allocation's growth
    base = _reset_peak()
    probe = torch.ones(2**27)  # 0.5 GiB
    probe_ratio = (_status()["VmHWM"] - base) / 0.5
    del probe

    base = _reset_peak()
    held: list[float] = []

    def backward(loss: torch.Tensor) -> None:
        held.append(_status()["VmRSS"] - base)  # what a forward leaves for its backward
        loss.backward()

    t0 = time.perf_counter()
    out = module.backward_batch(batch, backward=backward)  # compute_loss + backward (per micro-batch)
    seconds = time.perf_counter() - t0
    peak = _status()["VmHWM"] - base
    after = _status()["VmRSS"] - base  # what stays: the gradients
    return {
        **spec,
        "knobs": CONFIGS[spec["config"]],
        "B": B,
        "L": L,
        "logits_gib": B * L * V * 4 / GIB,
        "peak_gib": peak,
        "held_gib": held[0],  # the first (micro-)batch's, before any gradient exists
        "after_gib": after,
        "grads_gib": grads_gib,
        "probe_ratio": probe_ratio,
        "seconds": seconds,
        "loss": float(out.loss),
        "params": sum(p.numel() for p in module.policy.parameters()),
    }


def wait_for_memory(gib: float) -> None:
    """Block until ``MemAvailable`` is at least ``gib`` GiB (a line every minute while waiting)."""

    def available() -> float:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB
        return float("inf")

    t0 = time.monotonic()
    while (free := available()) < gib:
        if int(time.monotonic() - t0) % 60 < 5:
            print(f"waiting for {gib:.0f} GiB of free memory ({free:.1f} now)", file=sys.stderr, flush=True)
        time.sleep(5)


def run_child(spec: dict, timeout: float, min_free_gib: float = 0.0, tries: int = 3) -> dict:
    """One configuration in a fresh process; a child the kernel killed for memory (SIGKILL, on a
    box shared with other jobs) is run again, up to ``tries`` times, after waiting for memory."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    for attempt in range(1, tries + 1):
        wait_for_memory(min_free_gib)
        proc = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        if proc.returncode == 0 and lines:
            return json.loads(lines[-1])
        if proc.returncode != -9 or attempt == tries:
            raise RuntimeError(f"child {spec} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        print(
            f"child {spec['config']} killed (out of memory?); again ({attempt}/{tries})",
            file=sys.stderr,
            flush=True,
        )
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------- projection
def qwen_params(layers: int) -> dict[str, int]:
    """Parameter counts of Qwen2.5-1.5B's pieces (bias on q, k, v; tied embeddings)."""
    H, inter, V, kv = 1536, 8960, 151936, 256  # kv: 2 KV heads x 128
    attn = H * H + H + 2 * (H * kv + kv) + H * H  # q (+b), k, v (+b), o
    block = attn + 3 * H * inter + 2 * H  # + gate, up, down, 2 norms
    return {"embed": V * H, "block": block, "norm": H, "value_head": H * H + H + H + 1, "layers": layers}


#: the (layers, sequences) points the activations are fitted through (with the micro-batched rows'
#: first micro-batch: 2 layers, its sequences)
SLOPE_POINTS = ((2, 2), (2, 4), (4, 2), (4, 4))


def fit_held(points: list[tuple[int, int, float]]) -> tuple[float, float, float, float]:
    """``held(L, B) = c0 + cL * L + cB * B + cLB * L * B`` (GiB), least squares over ``points``
    ``(L, B, held)`` with ``cL, cB, cLB >= 0`` (memory does not shrink with more layers or
    sequences; at a few layers with activation checkpointing the per-sequence terms are a few MiB,
    below the measurement's noise, and an unconstrained fit can turn them negative): the best of
    the fits over every subset of the three, the others at 0. What a forward pass leaves for its
    backward: the activations autograd saved and, in one process, autocast's bf16 copies of the
    weights (which grow with the layers alone)."""
    import itertools

    import numpy as np

    X = np.array([[1.0, L, B, L * B] for L, B, _ in points])
    y = np.array([h for _, _, h in points])
    best: tuple[float, np.ndarray] | None = None
    for k in range(4):
        for free in itertools.combinations((1, 2, 3), k):
            cols = [0, *free]
            coef, *_ = np.linalg.lstsq(X[:, cols], y, rcond=None)
            if any(coef[i] < 0 for i in range(1, len(cols))):
                continue
            full = np.zeros(4)
            full[cols] = coef
            err = float(((X @ full - y) ** 2).sum())
            if best is None or err < best[0] - 1e-12:
                best = (err, full)
    assert best is not None
    c0, cL, cB, cLB = (float(v) for v in best[1])
    return c0, cL, cB, cLB


def project(
    c: tuple[float, float, float, float], backward_extra: float, micro: int, trainers: int
) -> dict[str, float]:
    """One trainer's GPU memory (GiB) at 28 layers, micro-batches of ``micro`` sequences."""
    p = qwen_params(PAPER_LAYERS)
    P = p["embed"] + PAPER_LAYERS * p["block"] + p["norm"] + p["value_head"]
    P_lm = P - p["value_head"]
    c0, cL, cB, cLB = c
    terms = {
        # fp32 masters + fp32 grads + AdamW exp_avg + exp_avg_sq, sharded
        "state (fp32 weights+grads+AdamW) / ranks": 16 * P / trainers / GIB,
        "reference": (2 if trainers > 1 else 4) * P_lm / GIB,
        "FSDP2 gathered units + reduce buffers": 0.0,
        "head: fp32 copy + fp32 grad (chunked)": 0.0,
    }
    if trainers > 1:
        # gathered bf16: the root (embeddings) held through forward and backward, 2 blocks (one
        # prefetched), their bf16 grads, the fp32 reduce-scatter input of the largest unit; the
        # chunked log-probs' fp32 copy of the bf16 head and its fp32 gradient accumulator
        terms["FSDP2 gathered units + reduce buffers"] = (
            2 * (p["embed"] + 2 * p["block"]) * 2 + 4 * p["embed"]
        ) / GIB
        terms["head: fp32 copy + fp32 grad (chunked)"] = 2 * 4 * p["embed"] / GIB
    L = PAPER_LAYERS
    terms["forward's activations (fit)"] = c0 + cL * L + cB * micro + cLB * L * micro
    terms["backward's working set (measured)"] = backward_extra
    subtotal = sum(terms.values())
    terms["allowance (CUDA, NCCL, fragmentation)"] = 2.0 + 0.1 * subtotal
    terms["total"] = sum(terms.values())
    return terms


# ---------------------------------------------------------------------------------- tables
def print_measured(rows: list[dict], seqs: int) -> None:
    plain = next((r for r in rows if r["config"] == "plain" and (r["layers"], r["seqs"]) == (2, seqs)), None)
    print(
        f"\nOne trainer step, Qwen2.5-1.5B's width and vocabulary, random weights, fp32 masters + bf16 "
        f"autocast, CISPO + value + KL, sequences of {PROMPT + COMPLETION} tokens; peak RSS growth over "
        "the post-load baseline (compute_loss + backward of every micro-batch), a fresh process per row:\n"
    )
    head = (
        f"{'config':<20} {'layers':>6} {'seqs':>4} {'chunk':>5} {'micro':>5} {'ckpt':>4} {'peak GiB':>9} "
        f"{'x logits':>8} {'vs plain':>8} {'held GiB':>8} {'grads GiB':>9} {'after GiB':>9} {'probe':>5} {'s':>5}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        k = r["knobs"]
        same = plain is not None and (r["layers"], r["seqs"]) == (2, seqs)
        vs = f"{r['peak_gib'] / plain['peak_gib']:.2f}x" if same and plain else ""
        print(
            f"{r['config']:<20} {r['layers']:>6} {r['seqs']:>4} {k['logprob_chunk_tokens']:>5} "
            f"{k['micro_batch_size']:>5} {'on' if k['activation_checkpointing'] else 'off':>4} "
            f"{r['peak_gib']:>9.2f} {r['peak_gib'] / r['logits_gib']:>8.2f} {vs:>8} {r['held_gib']:>8.2f} "
            f"{r['grads_gib']:>9.2f} "
            f"{r['after_gib']:>9.2f} {r['probe_ratio']:>5.2f} {r['seconds']:>5.0f}"
        )
    r0 = rows[0]
    print(
        f"\n'x logits': in units of one fp32 (B, L, V) logits tensor ({r0['seqs']} x {r0['L']}: "
        f"{r0['logits_gib']:.2f} GiB); 'vs plain': against the plain path of this run; 'held GiB': the growth "
        "when the (first micro-)batch's forward is done and its backward starts; 'grads GiB': the "
        "masters' fp32 gradients (part of the peak); 'after GiB': what the step leaves (the gradients); 'probe': "
        "a 0.5 GiB allocation's measured growth / 0.5; 's': the step's seconds (AdamW's two fp32 moments, 8 "
        "bytes per parameter, are counted in the projection, not measured)"
    )


def print_projection(rows: list[dict], trainers: int, batch: int, seqs: int) -> list[dict]:
    print(
        f"\nProjection: Qwen2.5-1.5B (28 layers), {batch} sequences of {PROMPT + COMPLETION} tokens per trainer, "
        f"budget {BUDGET_GIB:.0f} GiB per GPU (H100 80 GB); GiB:\n"
    )
    proj: list[dict] = []
    for n in ("chunked", "chunked+ckpt"):
        ckpt = CONFIGS[n]["activation_checkpointing"]
        family = [
            r for r in rows if r["config"].startswith(n) and r["knobs"]["activation_checkpointing"] == ckpt
        ]
        if not set(SLOPE_POINTS) <= {(r["layers"], r["seqs"]) for r in family if r["config"] == n}:
            continue
        # a micro-batched row's "held" is its first micro-batch's: that many sequences
        points = [(r["layers"], r["knobs"]["micro_batch_size"] or r["seqs"], r["held_gib"]) for r in family]
        c = fit_held(points)
        # the backward's own working set on top of what the forward held: the largest measured
        # (peak - held) of this family at 2 layers and the measured batch, micro-batched rows included
        # (in one process a micro-batch's gradients add to the earlier ones'); the 2 layers' fp32
        # gradients in it are counted again under FSDP2 (in the sharded state): an over-estimate
        extra = max(r["peak_gib"] - r["held_gib"] for r in family if (r["layers"], r["seqs"]) == (2, seqs))
        print(
            f"{n}: held by the forward = {c[0]:.2f} + {c[1]:.3f} x layers + {c[2]:.3f} x seqs + "
            f"{c[3]:.4f} x layers x seqs GiB; the backward's working set on top: {extra:.2f} GiB"
        )
        for ranks in (trainers, 1):
            for micro in (batch, 8, 4, 2, 1):
                proj.append({"config": n, "ranks": ranks, "micro": micro, **project(c, extra, micro, ranks)})
    if not proj:
        return proj
    terms = [k for k in proj[0] if k not in ("config", "ranks", "micro")]
    short = [
        "state/ranks",
        "reference",
        "FSDP2 bufs",
        "head fp32",
        "fwd held",
        "bwd extra",
        "allowance",
        "total",
    ]
    names = short if len(short) == len(terms) else terms
    head = f"{'config':<14} {'ranks':>5} {'micro':>5} " + " ".join(f"{x:>11}" for x in names)
    head += f" {'margin':>7} {'fits':>4}"
    print("\n" + head)
    print("-" * len(head))
    for t in proj:
        vals = " ".join(f"{t[k]:>11.2f}" for k in terms)
        margin = BUDGET_GIB - t["total"]
        micro = "off" if t["micro"] >= batch else str(t["micro"])
        print(
            f"{t['config']:<14} {t['ranks']:>5} {micro:>5} {vals} {margin:>7.2f} {'yes' if margin > 0 else 'NO':>4}"
        )
    print(
        "\n" + "; ".join(f"{s}: {k}" for s, k in zip(names, terms)) + ". ranks 1: one process "
        "(cispo_countdown_paper): no sharding, an fp32 reference, no FSDP2 buffers; its vLLM sampler shares "
        "the GPU and needs the margin (docs/paper_scale.md)."
    )
    return proj


# ---------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument(
        "--only", default=None, help=f"comma-separated configs of {list(CONFIGS)} (no projection)"
    )
    ap.add_argument("--seqs", type=int, default=4, help="sequences of the measured rows (issue: 4)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trainers", type=int, default=2, help="FSDP2 ranks in the projection (article: 2)")
    ap.add_argument("--batch", type=int, default=16, help="sequences per trainer (article: 32 / 2)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per child")
    ap.add_argument(
        "--min-free-gib",
        type=float,
        default=0.0,
        help="on a shared box: before each child, wait until this much memory is available (a child needs up to ~9 GiB)",
    )
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--from-json", default=None, help="print the tables of a run saved with --json (no measuring)"
    )
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return 0

    def spec(config: str, layers: int = 2, seqs: int = args.seqs) -> dict:
        return {"config": config, "layers": layers, "seqs": seqs, "threads": args.threads}

    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())["rows"]
        print_measured(saved, args.seqs)
        print_projection(saved, args.trainers, args.batch, args.seqs)
        return 0
    names = args.only.split(",") if args.only else list(CONFIGS)
    specs = [spec(n) for n in names]
    if not args.only:  # the slopes of the projected configurations
        for n in ("chunked", "chunked+ckpt"):
            specs += [spec(n, L, B) for L, B in SLOPE_POINTS if (2, args.seqs) != (L, B)]
    rows: list[dict] = []
    for i, s in enumerate(specs, 1):
        t0 = time.perf_counter()
        r = run_child(s, args.timeout, args.min_free_gib)
        rows.append(r)
        print(
            f"[{i}/{len(specs)}] {s['config']:<20} {s['layers']} layers x {s['seqs']} seqs: "
            f"peak +{r['peak_gib']:.2f} GiB ({time.perf_counter() - t0:.0f}s)",
            file=sys.stderr,
            flush=True,
        )
    print_measured(rows, args.seqs)
    out: dict = {"rows": rows}
    if not args.only and args.seqs == 4:
        out["projection"] = print_projection(rows, args.trainers, args.batch, args.seqs)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
