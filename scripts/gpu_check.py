"""The paper-scale path on one GPU, timed: vLLM sampling with behaviour log-probs, one MCTS wave
batch, one FSDP2 trainer step, one weight sync into vLLM; printed as a table.

    python scripts/gpu_check.py                          # one GPU, a Qwen2.5-1.5B-shaped model (< 8 min on an H200)
    python scripts/gpu_check.py --device cpu --shape tiny  # the same code on CPU (the test suite runs it)
    python scripts/gpu_check.py --parts fsdp             # only some parts (sample, mcts, sync, fsdp)

No download: the model is ``Qwen2ForCausalLM`` with random weights, built from the Qwen2.5-1.5B
config the project ships (``src/tsd/assets/qwen2_5_1_5b_config.json``: 28 layers, hidden 1536,
12 heads of 128, 2 KV heads, vocabulary 151,936, tied embeddings), in bf16; ``--shape tiny`` is the
same architecture at hidden 128, 2 layers (head_dim 32, what the CPU attention takes). The tokenizer
is the bundled character tokenizer padded with filler tokens to the model's vocabulary
(``build_char_tokenizer(vocab_size=...)``), so every id a random model samples decodes. Random weights rarely stop early: the timings are of full-length
continuations, an upper bound for a trained policy's.

Parts (in this order: the vLLM ones first, the FSDP one, then the plan and the node's processes;
an in-process vLLM engine starts its own one-rank process group, which the trainer step then reuses):
- ``sample``: :class:`VLLMSampler` (fp32 LM head, behaviour log-probs from its logits processor, on
  vLLM's V1 model runner), ``--states`` prompts x ``--n`` continuations of ``--tokens`` tokens;
  tokens/s of generated tokens, log-probs recorded.
- ``mcts``: :class:`MCTSRollout` with the article's N=16 workers and K=4, one wave (``iterations=1``)
  over ``--problems`` Countdown problems sharing the wave's one sampler call, then the emitted
  paths completed and graded (the rollout's full cost at M=1).
- ``sync``: ``VLLMSampler.load_weights`` of a second model's full state dict (safetensors blobs over
  ``collective_rpc`` into vLLM's in-place reload, the prefix cache reset, the value copy updated).
- ``fsdp``: one optimiser step of :class:`PolicyValueModule` (CISPO + value + KL against a frozen
  reference, AdamW, grad clip; fp32 master shards computing in the run's dtype, activation
  checkpointing) on a policy sharded as ``GeneratorTrainerStrategy`` does
  (:func:`~tsd.distributed.strategy.shard_policy`) over a one-rank mesh (NCCL on a GPU, gloo on CPU), on the
  trajectories the ``mcts`` part emitted (else random ones of the same shape).

- ``plan``: the paper run's per-device memory plan (:mod:`tsd.distributed.memory_plan`) against
  this device's memory (``torch.cuda.mem_get_info``), printed whole.
- ``ranks``: the node's processes, spawned on this one device: a *trainer* (its own one-rank group
  on NCCL: FSDP2 ``fully_shard`` and the bucketed gather; the sender of a gloo sync group, since
  NCCL refuses two ranks of one communicator on one GPU; the evaluation callback, whose vLLM engine
  runs in a process of its own beside the trainer; a Redis reader) and a *generator* (narrows
  ``CUDA_VISIBLE_DEVICES`` before CUDA starts, receives the weights, loads them into its vLLM engine
  in its own process, samples, writes MCTS trajectories to Redis); the tokenizer is Qwen's with its
  chat template where its files are (``--tokenizer`` or the hub cache), else the rehearsal's
  (``scripts/rehearsal.py``). Printed: the sync's time and MiB, the generator's load, tokens/s, the
  evaluation's time, Redis, and the peak memory of each process (the allocator's peak, and every
  process's use as NVML sees it, the engine processes included).

Without a GPU this session could not run the GPU mode; its CPU mode runs in
``tests/test_gpu_check.py`` so the code cannot rot (every part, in the vLLM venv).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import sys
import time
from pathlib import Path

import torch

from tsd import ASSETS_DIR
from tsd.models.char_tokenizer import build_char_tokenizer
from tsd.models.policy_value import PolicyValueModel
from tsd.rl.trajectory import Trajectory

QWEN_CONFIG = ASSETS_DIR / "qwen2_5_1_5b_config.json"
PARTS = ("plan", "sample", "mcts", "sync", "fsdp", "ranks")


def build_policy(shape: str, tokenizer, dtype: torch.dtype, device: str, seed: int) -> PolicyValueModel:
    """A random Qwen2 policy + value head of the shipped 1.5B shape (or the tiny one)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = json.loads(QWEN_CONFIG.read_text())
    if shape == "tiny":
        cfg.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
        cfg.update(num_key_value_heads=2, vocab_size=1024, max_position_embeddings=2048)
    cfg.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    cfg.update(pad_token_id=tokenizer.pad_token_id)
    cfg.pop("architectures", None)
    cfg.pop("torch_dtype", None)
    torch.manual_seed(seed)
    with torch.device(device):
        lm = Qwen2ForCausalLM(Qwen2Config(**cfg)).to(dtype)
        return PolicyValueModel(lm).to(device).eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sync_device(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def part_sample(sampler, env, args) -> dict:
    from tsd.rollouts.base import encode_prompt

    problems = [env.test[i % len(env.test)] for i in range(args.states)]
    states = [encode_prompt(env, p, sampler.tokenizer) for p in problems]
    sampler.sample(states[:2], n=1, max_new_tokens=4, stop="answer")  # warm-up
    before = sampler.generated_tokens
    t0 = time.perf_counter()
    out = sampler.sample(states, n=args.n, max_new_tokens=args.tokens, stop="answer")
    dt = time.perf_counter() - t0
    tokens = sampler.generated_tokens - before
    assert all(len(c.logprobs) == len(c.token_ids) for conts in out for c in conts)
    return {
        "shape": f"{args.states} states x n={args.n} x <= {args.tokens} tokens",
        "seconds": dt,
        "throughput": f"{tokens / dt:,.0f} tokens/s",
    }


def part_mcts(sampler, env, args) -> tuple[dict, list[Trajectory]]:
    from tsd.rollouts.mcts import MCTSRollout

    rollout = MCTSRollout(
        workers=16, completions_per_node=4, iterations=1, max_step_tokens=args.step_tokens,
        max_new_tokens=2 * args.step_tokens, seed=args.seed,
    )  # fmt: skip
    problems = env.train[: args.problems]
    before = sampler.generated_tokens
    t0 = time.perf_counter()
    trajs = rollout.run(problems, sampler, env).trajectories
    dt = time.perf_counter() - t0
    tokens = sampler.generated_tokens - before
    return {
        "shape": f"{args.problems} trees x 16 workers x K=4, 1 wave (+ completion)",
        "seconds": dt,
        "throughput": f"{tokens / dt:,.0f} tokens/s, {len(trajs)} trajectories",
    }, trajs


def part_sync(sampler, tokenizer, args, dtype) -> dict:
    other = build_policy(args.shape, tokenizer, dtype, args.device, seed=args.seed + 1)
    state = other.state_dict()
    n_bytes = sum(t.numel() * t.element_size() for t in state.values())
    t0 = time.perf_counter()
    sampler.load_weights(state, version=1)
    dt = time.perf_counter() - t0
    del other, state
    return {
        "shape": f"{n_bytes / 2**20:,.1f} MiB of weights",
        "seconds": dt,
        "throughput": f"{n_bytes / 2**20 / dt:,.0f} MiB/s",
    }


def random_trajectories(tokenizer, vocab: int, count: int, prompt: int, completion: int) -> list[Trajectory]:
    g = random.Random(0)
    return [
        Trajectory(
            problem_id=i,
            prompt_ids=[g.randrange(8, vocab) for _ in range(prompt)],
            completion_ids=[g.randrange(8, vocab) for _ in range(completion)],
            behaviour_logprobs=[-g.random() * 5 for _ in range(completion)],
            reward=g.uniform(-1, 1),
            correct=False,
            policy_version=0,
            rollout="random",
        )
        for i in range(count)
    ]


def part_fsdp(tokenizer, trajs: list[Trajectory], args, dtype) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from tsd.data.collate import collate_trajectories
    from tsd.distributed.strategy import shard_policy
    from tsd.models.precision import Precision
    from tsd.module import PolicyValueModule
    from tsd.rl.losses import CISPOLoss, RLObjective

    on_gpu = args.device.startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if on_gpu else "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
        )
    mesh = init_device_mesh("cuda" if on_gpu else "cpu", (1,))
    policy = build_policy(args.shape, tokenizer, dtype, args.device, seed=args.seed).train()
    module = PolicyValueModule(
        policy,
        RLObjective(CISPOLoss(eps_high=5.0), c_ppo=1.0, c_value=1.0, c_kl=0.05),  # the article's
        optimizer=lambda params: torch.optim.AdamW(params, lr=5e-6),
        grad_clip=0.1,
        precision=Precision(dtype),  # fp32 master shards, the LM gathered in `dtype`
        activation_checkpointing=True,  # as the *_paper experiments
    )
    shard_policy(module.policy, mesh, module.precision)  # as GeneratorTrainerStrategy does
    module.precision.cast_(module.ref)  # the reference in the dtype the shards are gathered in
    opt = torch.optim.AdamW(module.policy.parameters(), lr=5e-6)
    if len(trajs) < args.batch:
        vocab = policy.config.vocab_size
        trajs = trajs + random_trajectories(tokenizer, vocab, args.batch - len(trajs), 64, args.tokens)
    batch = collate_trajectories(trajs[: args.batch], tokenizer.pad_token_id).to(args.device)
    tokens = int(batch.mask.sum())
    sync_device(args.device)
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    out = module.backward_batch(batch)
    norm = torch.nn.utils.clip_grad_norm_(module.policy.parameters(), 0.1)
    opt.step()
    sync_device(args.device)
    dt = time.perf_counter() - t0
    loss = float(out.loss.detach().float())
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if not (torch.isfinite(torch.tensor(loss)) and torch.isfinite(torch.tensor(norm))):
        raise RuntimeError(f"fsdp step: loss {loss}, grad norm {norm}")
    return {
        "shape": f"B={len(trajs[: args.batch])}, {batch.input_ids.shape[1]} positions, {tokens} trained tokens",
        "seconds": dt,
        "throughput": f"{tokens / dt:,.0f} tokens/s (loss {loss:.3f}, grad norm {norm:.3g})",
    }


# ---------------------------------------------------------------------------- the node's processes
def _peak_gib(device: str) -> str:
    """This process's peak device memory (torch's allocator), or its peak RSS on CPU."""
    if device.startswith("cuda"):
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (allocator peak)"
    import resource

    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (peak RSS)"


def _gpu_processes() -> str:
    """Every process's memory on the GPU, as NVML sees it (the vLLM engine processes included)."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h)
        return ", ".join(f"pid {p.pid}: {(p.usedGpuMemory or 0) / 2**30:.1f} GiB" for p in procs)
    except Exception as e:  # noqa: BLE001 - no NVML: the allocator peaks above stand
        return f"(NVML unavailable: {type(e).__name__})"


def _rank(role: str, port: int, args: argparse.Namespace, queue) -> None:
    """One rank of the node check (spawned): ``trainer`` (its own one-rank FSDP2 group: the NCCL
    gather; the sync group's sender; the evaluation callback with its vLLM engine in a process of its
    own; Redis reader) or ``generator`` (narrows CUDA_VISIBLE_DEVICES to its GPU, receives the weights
    on the sync group, loads them into its vLLM engine in its own process, samples, writes to Redis)."""
    import functools
    from datetime import timedelta

    import torch.distributed as dist

    from tsd.distributed.placement import narrow_to_rank_gpu
    from tsd.distributed.weight_sync import (
        ControlChannel,
        WeightLayout,
        WeightReceiver,
        WeightSender,
        sync_group,
    )

    out: dict = {"role": role}
    engines: list = []  # the samplers whose engine processes this rank must shut down, error or not
    try:
        on_gpu = args.device.startswith("cuda")
        if role == "generator" and on_gpu:
            out["CUDA_VISIBLE_DEVICES"] = narrow_to_rank_gpu(0)  # before CUDA starts (one GPU: GPU 0's)
        torch.set_num_threads(1) if not on_gpu else None
        device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
        tokenizer = _tokenizer(args)
        from tsd.envs.countdown import CountdownEnv

        env = CountdownEnv(n_train=64, n_test=16, seed=args.seed, template="chat")
        dtype = torch.bfloat16 if on_gpu else torch.float32
        store = dist.TCPStore(
            "127.0.0.1", port, 2, is_master=role == "trainer", timeout=timedelta(seconds=300)
        )
        control = ControlChannel(store)
        # NCCL refuses two ranks of one communicator on one GPU ("Duplicate GPU"), so on one GPU the
        # sync group is gloo (the strategy's choice with backend=gloo; CPU buffers), and NCCL runs
        # the trainer's own group (a one-rank FSDP2 mesh: the gather's code path)
        group = sync_group(dist.PrefixStore("sync/", store), 0 if role == "trainer" else 1, 2, "gloo",
                           timedelta(seconds=600))  # fmt: skip
        policy = build_policy(args.shape, tokenizer, dtype, str(device), seed=args.seed)
        layout = WeightLayout.of(policy.state_dict())
        if role == "trainer":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            from tsd.distributed.gather import gather_full_state

            dist.init_process_group("nccl" if on_gpu else "gloo", store=dist.PrefixStore("trainers/", store),
                                    rank=0, world_size=1)  # fmt: skip
            shadow = build_policy(args.shape, tokenizer, dtype, "cpu", seed=args.seed)
            mesh = init_device_mesh(device.type, (1,))
            for block in policy.transformer_blocks():
                fully_shard(block, mesh=mesh)
            fully_shard(policy, mesh=mesh)
            sender = WeightSender(layout, group, torch.device("cpu"))
            sender.handshake()
            with torch.no_grad():  # the "trained" weights: different from the generator's
                for p in policy.parameters():
                    p.add_(0.001)
            sync_device(args.device)
            t0 = time.perf_counter()
            full = gather_full_state(policy, dst=0)
            t1 = time.perf_counter()
            shadow.load_state_dict(full)
            nbytes = sender.send(shadow.state_dict(), 1, control)
            t2 = time.perf_counter()
            out["sync"] = {"gather_s": t1 - t0, "broadcast_s": t2 - t1, "mib": nbytes / 2**20}
            # the evaluation callback, as trainer rank 0 runs it: its engine in a process of its own
            from types import SimpleNamespace

            from tsd.callbacks.mean_at_k import MeanAtKEval
            from tsd.samplers.vllm import VLLMSampler

            make = functools.partial(VLLMSampler, **_engine_kwargs(args, kv=args.eval_kv_gib))
            cb = MeanAtKEval(
                num_problems=4, k=4, max_new_tokens=args.tokens, draw_tree=False, problems_per_batch=4
            )
            cb.setup_eval(env, tokenizer, make)
            engines.append(cb)
            trainer = SimpleNamespace(
                global_step=1, is_global_zero=True, callback_metrics={},
                strategy=SimpleNamespace(full_policy=lambda m: shadow, broadcast=lambda obj, src=0: obj),
                loggers=[], datamodule=SimpleNamespace(generation=SimpleNamespace(
                    generated_tokens=lambda: 0, prefill_tokens=lambda: 0)),
            )  # fmt: skip
            t0 = time.perf_counter()
            cb._run(trainer, SimpleNamespace(device=device, trained_tokens=0))
            out["eval"] = {"seconds": time.perf_counter() - t0, "mean": cb.history[-1]["eval/mean@4"]}
            out["eval_in_own_process"] = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "1"
            if args.redis_url:
                from tsd.buffers.redis import RedisBuffer

                buf = RedisBuffer(args.redis_url, stream=f"tsd-gpu-check-{port}", consumer="trainer")
                items = buf.get(64, timeout=300)
                buf.ack([it.id for it in items])
                out["redis"] = f"{len(items)} trajectories read and acked"
                buf.finish()
                buf.close()
            dist.destroy_process_group()
        else:
            from tsd.samplers.vllm import VLLMSampler

            receiver = WeightReceiver(layout, group, torch.device("cpu"), control)
            receiver.handshake()
            receiver.start()
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"  # the engine in its own process
            t0 = time.perf_counter()
            sampler = VLLMSampler(policy, tokenizer, temperature=0.8, seed=args.seed, device=device,
                                  **_engine_kwargs(args, kv=args.kv_cache_gib))  # fmt: skip
            engines.append(sampler)
            out["engine_start_s"] = time.perf_counter() - t0
            deadline = time.monotonic() + 600
            while (staged := receiver.take()) is None:
                receiver.check()
                assert time.monotonic() < deadline, "no weights arrived"
                time.sleep(0.05)
            t0 = time.perf_counter()
            sampler.load_weights(*staged)
            out["load_s"] = time.perf_counter() - t0
            from tsd.rollouts.base import encode_prompt

            states = [encode_prompt(env, p, tokenizer) for p in env.test[:8]]
            t0 = time.perf_counter()
            conts = sampler.sample(states, n=args.n, max_new_tokens=args.tokens, stop="answer")
            dt = time.perf_counter() - t0
            out["tokens_per_s"] = sum(len(c.token_ids) for cs in conts for c in cs) / dt
            if args.redis_url:
                from tsd.buffers.redis import RedisBuffer
                from tsd.rollouts.mcts import MCTSRollout

                rollout = MCTSRollout(workers=4, completions_per_node=2, iterations=1,
                                      max_step_tokens=args.step_tokens, max_new_tokens=2 * args.step_tokens)  # fmt: skip
                trajs = rollout.run(env.train[:2], sampler, env).trajectories
                buf = RedisBuffer(args.redis_url, stream=f"tsd-gpu-check-{port}")
                buf.put(trajs)
                buf.close()
                out["redis"] = f"{len(trajs)} trajectories written"
            receiver.stopped.wait(600)
        out["peak"] = _peak_gib(args.device)
        from tsd.distributed.weight_sync import shutdown_group

        shutdown_group(group)
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        import traceback

        out["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"
    finally:
        if role == "trainer" and "control" in locals():
            control.stop("done" if "error" not in out else "error")  # the generator leaves either way
        # the engine processes go with the rank, as the callback's teardown and the generator loop
        # do in a run: left to vLLM's finaliser, the spawned rank's exit joined its engine process
        # forever (an error in the trainer hung the vLLM-venv test until its 600 s timeout)
        for e in engines:
            with contextlib.suppress(Exception):
                e.teardown(None, None, "fit") if hasattr(e, "teardown") else e.close()
    queue.put(out)


def _engine_kwargs(args: argparse.Namespace, kv: float) -> dict:
    on_gpu = args.device.startswith("cuda")
    return {
        "kv_cache_gib": kv,
        # vLLM starts only with gpu_memory_utilization x total free: three processes share the GPU
        "gpu_memory_utilization": 0.15,
        "max_model_len": 1024 if args.shape != "tiny" else 512,
        "block_size": None if on_gpu else 32,
        "llm_kwargs": {} if on_gpu else {"enforce_eager": True},
    }


def _tokenizer(args: argparse.Namespace):
    """Qwen's tokenizer and chat template where its files are (``--tokenizer``, or the hub cache);
    else the rehearsal's (``scripts/rehearsal.py``: a byte-level BPE on Countdown text, Qwen's special
    tokens at Qwen's ids, Qwen's chat template), padded to the model's vocabulary."""
    from transformers import AutoTokenizer

    if args.shape == "tiny":
        return build_char_tokenizer(vocab_size=1024)
    for source in (args.tokenizer, "Qwen/Qwen2.5-1.5B-Instruct"):
        if not source:
            continue
        try:
            tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
            args.tokenizer_used = f"Qwen's ({source})"
            return tok
        except Exception:  # noqa: BLE001 - not here: the rehearsal's
            continue
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from rehearsal import build_tokenizer, countdown_corpus

    folder = Path(os.environ.get("TMPDIR", "/tmp")) / "tsd-gpu-check-tokenizer"
    if not (folder / "tokenizer.json").exists():
        build_tokenizer(
            folder, json.loads(QWEN_CONFIG.read_text())["vocab_size"], 1024, countdown_corpus(2000)
        )
    args.tokenizer_used = "the rehearsal's (Qwen's files not found)"
    return AutoTokenizer.from_pretrained(str(folder))


def part_ranks(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """Two processes on one device, spawned: a trainer and a generator (see :func:`_rank`)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(role, port, args, queue)) for role in ("trainer", "generator")]
    for p in procs:
        p.start()
    results: dict[str, dict] = {}
    deadline = time.monotonic() + 1200
    while len(results) < len(procs):
        try:
            r = queue.get(timeout=5)
            results[r["role"]] = r
        except Exception:  # noqa: BLE001 - queue.Empty: is everybody still alive?
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise RuntimeError(
                    f"node check: a rank died (exit codes {[p.exitcode for p in procs]})"
                ) from None
    for p in procs:
        p.join(timeout=120)
    errors = [f"{k}: {v['error']}" for k, v in results.items() if "error" in v]
    if errors:
        raise RuntimeError("node check failed:\n" + "\n".join(errors))
    t, g = results["trainer"], results["generator"]
    s = t["sync"]
    return [
        ("weight sync: FSDP2 gather + broadcast", {
            "shape": f"{s['mib']:,.0f} MiB (tied embedding once)", "seconds": s["gather_s"] + s["broadcast_s"],
            "throughput": f"gather {s['gather_s']:.2f} s, broadcast {s['broadcast_s']:.2f} s"}),
        ("generator: load into its engine process", {
            "shape": f"CUDA_VISIBLE_DEVICES={g.get('CUDA_VISIBLE_DEVICES')}", "seconds": g["load_s"],
            "throughput": f"engine start {g['engine_start_s']:.1f} s"}),
        ("generator: sampling", {"shape": f"8 prompts x n={args.n}", "seconds": 0.0,
                                 "throughput": f"{g['tokens_per_s']:,.0f} tokens/s"}),
        ("eval callback (engine in its own process)", {
            "shape": f"4 problems x k=4, own process: {t['eval_in_own_process']}", "seconds": t["eval"]["seconds"],
            "throughput": f"mean@4 {t['eval']['mean']:.3f}"}),
        ("Redis", {"shape": f"{g.get('redis', 'skipped')}; {t.get('redis', 'skipped')}", "seconds": 0.0,
                   "throughput": ""}),
        ("peak memory", {"shape": f"trainer {t['peak']}; generator {g['peak']}", "seconds": 0.0,
                         "throughput": _gpu_processes() if args.device.startswith("cuda") else ""}),
    ]  # fmt: skip


def part_plan(args: argparse.Namespace) -> dict:
    """The paper run's memory plan against this device (``torch.cuda.mem_get_info``'s total)."""
    from tsd.distributed.memory_plan import plan_overrides

    total = torch.cuda.mem_get_info()[1] / 2**30 if args.device.startswith("cuda") else 80.0
    plan = plan_overrides(
        ["experiment=mcts_countdown_paper", "trainer.devices=8", f"strategy.device_memory_gib={total}",
         f"paths.output_dir={Path(os.environ.get('TMPDIR', '/tmp')) / 'tsd-gpu-check'}"]
    )  # fmt: skip
    print(plan.table())
    problems = plan.problems()
    return {
        "shape": f"paper config on {total:.1f} GiB",
        "seconds": 0.0,
        "throughput": "fits: " + ", ".join(f"{d.name} {d.total_gib:.1f} GiB" for d in plan.devices)
        if not problems
        else "DOES NOT FIT: " + "; ".join(problems),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (the GPU check) or cpu")
    ap.add_argument(
        "--shape", default=None, choices=["qwen2.5-1.5b", "tiny"], help="default: 1.5b on cuda, tiny on cpu"
    )
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    ap.add_argument("--states", type=int, default=None, help="prompts for the sampling part")
    ap.add_argument("--n", type=int, default=4, help="continuations per prompt")
    ap.add_argument(
        "--tokens", type=int, default=None, help="tokens per continuation (sampling, trainer batch)"
    )
    ap.add_argument("--problems", type=int, default=None, help="MCTS trees in the wave batch")
    ap.add_argument("--step-tokens", type=int, default=None, help="token cap of one MCTS step")
    ap.add_argument("--batch", type=int, default=32, help="trajectories in the trainer step (article: 32)")
    ap.add_argument(
        "--kv-cache-gib", type=float, default=None, help="vLLM KV cache (default 40 GPU, 0.25 CPU)"
    )
    ap.add_argument(
        "--eval-kv-gib", type=float, default=None, help="the eval engine's KV cache (default 4 GPU, 0.25 CPU)"
    )
    ap.add_argument(
        "--tokenizer",
        default=None,
        help="Qwen's tokenizer files (default: the hub cache, else the rehearsal's)",
    )
    ap.add_argument(
        "--redis-url", default=None, help="a Redis for the ranks part (default: a redis-server started here)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the table here")
    args = ap.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device here; run with --device cpu --shape tiny for the CPU mode",
            file=sys.stderr,
        )
        return 2
    args.shape = args.shape or ("qwen2.5-1.5b" if on_gpu else "tiny")
    big = args.shape != "tiny"
    args.states = args.states or (256 if big else 8)
    args.tokens = args.tokens or (512 if big else 32)
    args.problems = args.problems or (32 if big else 2)
    args.step_tokens = args.step_tokens or (64 if big else 16)
    args.kv_cache_gib = args.kv_cache_gib or (40.0 if on_gpu else 0.25)
    args.eval_kv_gib = args.eval_kv_gib or (4.0 if on_gpu else 0.25)
    args.tokenizer_used = "the char tokenizer (tiny shape)"
    parts = [p for p in args.parts.split(",") if p]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        print(f"gpu_check: --parts: {bad} not in {PARTS}", file=sys.stderr)
        return 2
    if not on_gpu:
        torch.set_num_threads(1)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: 5-7 s start-up

    from tsd.envs.countdown import CountdownEnv

    t_all = time.perf_counter()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    vocab = json.loads(QWEN_CONFIG.read_text())["vocab_size"] if big else 1024
    tokenizer = build_char_tokenizer(vocab_size=vocab)
    env = CountdownEnv(n_train=max(64, args.problems), n_test=max(64, args.states), seed=args.seed)
    rows: list[tuple[str, dict]] = []
    trajs: list[Trajectory] = []
    log = lambda msg: print(f"[gpu_check {time.perf_counter() - t_all:6.1f}s] {msg}", flush=True)  # noqa: E731

    if any(p in parts for p in ("sample", "mcts", "sync")):
        from tsd.samplers.vllm import VLLMSampler

        log(f"building the {args.shape} policy ({dtype}) and the vLLM engine")
        policy = build_policy(args.shape, tokenizer, dtype, args.device, seed=args.seed)
        t0 = time.perf_counter()
        sampler = VLLMSampler(
            policy,
            tokenizer,
            temperature=0.8,
            seed=args.seed,
            kv_cache_gib=args.kv_cache_gib,
            max_model_len=1024 if big else 256,
            block_size=None if on_gpu else 32,
            llm_kwargs={} if on_gpu else {"enforce_eager": True},
        )
        rows.append(
            (
                "vLLM engine start-up",
                {"shape": args.shape, "seconds": time.perf_counter() - t0, "throughput": ""},
            )
        )
        if "sample" in parts:
            log("sampling")
            rows.append(("vLLM sampling + behaviour log-probs", part_sample(sampler, env, args)))
        if "mcts" in parts:
            log("one MCTS wave batch")
            row, trajs = part_mcts(sampler, env, args)
            rows.append(("MCTS wave batch (vLLM)", row))
        if "sync" in parts:
            log("weight sync")
            rows.append(("weight sync into vLLM", part_sync(sampler, tokenizer, args, dtype)))
        del sampler, policy
    if "fsdp" in parts:
        log("FSDP2 trainer step")
        rows.append(("FSDP2 trainer step", part_fsdp(tokenizer, trajs, args, dtype)))
    if "plan" in parts:
        log("the paper run's memory plan against this device")
        rows.append(("memory plan (paper config)", part_plan(args)))
    if "ranks" in parts:
        log("two ranks on the device: a trainer and a generator (vLLM engine processes, sync, eval, Redis)")
        import shutil

        if args.redis_url is None and shutil.which("redis-server"):
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from redis_server import redis_server

            with redis_server() as url:
                args.redis_url = url
                rows += part_ranks(args)
        else:
            rows += part_ranks(args)
        log(f"tokenizer: {args.tokenizer_used}")

    device_name = torch.cuda.get_device_name() if on_gpu else "CPU"
    print(f"\n{device_name}, {args.shape} shape, {dtype}; total {time.perf_counter() - t_all:.1f} s\n")
    print("| part | shape | seconds | throughput |\n|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['shape']} | {r['seconds']:.2f} | {r['throughput']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({name: r for name, r in rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
