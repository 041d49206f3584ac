"""Train a policy by distilling rollouts (MCTS, best-of-N or group sampling) with online RL.

    python train.py                                # the default experiment on the bundled tiny policy
    python train.py experiment=cispo_countdown     # group-sampling CISPO baseline
    python train.py experiment=mcts_countdown debug=smoke
    python train.py -m experiment=mcts_countdown rollout.workers=1,4 rollout.iterations=4,8

Compose, validate, instantiate in order, fit, evaluate, export; returns the final metrics.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig

from tsd.config import (
    DTYPES,
    ConfigError,
    apply_threads,
    build,
    check_bool,
    check_choice,
    check_int,
    check_number,
    config_dir,
    require,
)
from tsd.config_checks import (
    check_known_keys,
    check_policy_source,
    check_target_keys,
)
from tsd.fileio import write_text_atomic
from tsd.resume import read_checkpoint, resolve_run_id

log = logging.getLogger("tsd.train")

# noise that says nothing about a tsd run: manual optimisation is deliberate (one step per batch,
# NaN steps skipped), and the frozen reference policy is in eval mode on purpose
warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")

GROUPS = (
    *("model", "env", "sampler", "rollout", "loss", "buffer"),
    *("generation", "data", "module", "strategy", "trainer"),
)
#: the keys of the config nodes train() reads itself (the ``_target_`` nodes are checked against
#: their targets' signatures): any other key is a typo, refused (``+model.dtypo=float32``)
KNOWN_KEYS = {
    "": {
        *GROUPS,
        *("callbacks", "logger", "paths"),
        *("task_name", "seed", "threads", "tags", "ckpt_path", "run_id", "optimized_metric"),
    },
    "model": {"name_or_path", "dtype"},
    "paths": {"root_dir", "output_dir"},
}


#: Lightning precision settings that leave the module's own (model.dtype) alone
TRAINER_PRECISIONS = ("32-true", "32", "None")


def _validate(cfg: DictConfig) -> None:
    """Cheap checks of keys and plain values, before any heavy import or model load: a bad value
    fails in seconds with one line naming the field."""
    check_known_keys(cfg, KNOWN_KEYS, containers=("callbacks", "logger"))
    for group in GROUPS:
        require(cfg.get(group) is not None, group, "a config group (see configs/)", None)
    check_int(cfg.seed, "seed")
    d = cfg.data
    for k in ("batch_size", "sync_every"):
        check_int(d.get(k), f"data.{k}", low=1)
    check_int(d.get("max_lag"), "data.max_lag", low=0)
    check_number(d.get("max_wait"), "data.max_wait", low=0, low_open=True)
    if d.get("start_wait") is not None:
        check_number(d.start_wait, "data.start_wait", low=0, low_open=True)
    check_int(cfg.generation.get("problems_per_rollout"), "generation.problems_per_rollout", low=1)
    check_int(cfg.trainer.get("max_steps", -1), "trainer.max_steps", low=1)
    m = cfg.module
    lr = m.optimizer.get("lr") if m.get("optimizer") else None
    check_number(lr, "module.optimizer.lr", low=0, high=1, low_open=True, high_open=True)
    check_number(m.grad_clip, "module.grad_clip", low=0)
    check_int(m.max_bad_steps, "module.max_bad_steps", low=1)
    check_bool(m.value_trunk_grad, "module.value_trunk_grad")
    check_number(cfg.sampler.get("temperature", 1.0), "sampler.temperature", low=0, low_open=True)
    check_number(cfg.sampler.get("top_p", 1.0), "sampler.top_p", low=0, high=1, low_open=True)
    check_choice(cfg.model.dtype, "model.dtype", DTYPES)
    # the compute dtype is model.dtype's alone (autocast / FSDP2 over fp32 masters, models/precision.py):
    # Lightning's precision plugin would autocast on top ("*-mixed") or cast the masters ("*-true")
    require(
        str(cfg.trainer.get("precision", "32-true")) in TRAINER_PRECISIONS,
        "trainer.precision",
        f"one of {', '.join(TRAINER_PRECISIONS)}; the compute dtype is model.dtype (e.g. model.dtype=bfloat16 "
        "computes in bf16 over fp32 master weights)",
        cfg.trainer.get("precision"),
    )
    check_policy_source(cfg.model.name_or_path)


def train(cfg: DictConfig) -> dict:
    """Compose (Hydra did), validate, instantiate in order, fit, write the results."""
    _validate(cfg)
    ckpt = read_checkpoint(cfg.ckpt_path) if cfg.get("ckpt_path") else None
    cfg.run_id = resolve_run_id(cfg.get("run_id"), ckpt, cfg.paths.output_dir)
    check_target_keys(cfg)  # imports every _target_ (Lightning among them)
    apply_threads(cfg.get("threads"))

    # the heavy imports only now: a bad command above fails before paying for them
    import lightning as L
    from lightning.pytorch.callbacks import ProgressBar
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from tsd.callbacks import (
        AckAfterStep,
        ExportPolicy,
        LogRunConfig,
        MeanAtKEval,
        StepProgressBar,
        WeightSync,
    )
    from tsd.callbacks.stopping import best_checkpoint, stop_reason
    from tsd.data.record_check import RecordCheck
    from tsd.lightning_logs import route_lightning_logs
    from tsd.loggers.run_info import logged_config
    from tsd.models.loading import load_policy
    from tsd.models.precision import Precision
    from tsd.rollouts.mcts import MCTSRollout
    from tsd.samplers.hf import banned_token_ids, eos_token_ids

    route_lightning_logs()  # each Lightning line once, through Hydra's handlers; no advertising
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    out_dir = Path(cfg.paths.output_dir)

    # light objects first: a bad value fails here, before the model is loaded
    env = build(cfg.env, "env")
    try:  # the env reads or generates its problems on first use: a bad problems file fails here
        n_train, n_test = len(env.train), len(env.test)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{'env.data_dir' if cfg.env.get('data_dir') else 'env'}: {e}") from None
    require(n_train >= 1, "env.n_train", "an integer >= 1 (training draws its problems from it)", n_train)
    rollout = build(cfg.rollout, "rollout")
    objective = build(cfg.loss, "loss")
    make_sampler = build(cfg.sampler, "sampler")
    callbacks = {k: build(v, f"callbacks.{k}") for k, v in (cfg.get("callbacks") or {}).items() if v}
    if any(isinstance(cb, MeanAtKEval) for cb in callbacks.values()):
        require(n_test >= 1, "env.n_test", "an integer >= 1 (callbacks.eval evaluates on it)", n_test)
    loggers = [build(v, f"logger.{k}") for k, v in (cfg.get("logger") or {}).items() if v]
    buffer = build(cfg.buffer, "buffer")
    # the data flow's own callbacks first (ack, then clock and weight sync), then the configured
    # ones; every logger gets the resolved config + the run's identity
    run_callbacks = [AckAfterStep(), WeightSync(), *callbacks.values()]
    # the bar counts optimiser steps (Lightning's own read "Epoch 0/-2"), unless off or configured;
    # first, so that it closes before the final evaluation logs
    if cfg.trainer.get("enable_progress_bar", True) and not any(
        isinstance(cb, ProgressBar) for cb in callbacks.values()
    ):
        run_callbacks.insert(0, StepProgressBar())
    if loggers:
        run_callbacks.append(LogRunConfig(logged_config(cfg)))
    strategy = build(cfg.strategy, "strategy")  # refuses a world it cannot run, with the trainer
    check_memory_plan(cfg, strategy, rollout, make_sampler, callbacks.values())
    trainer = build(
        cfg.trainer, "trainer", strategy=strategy, callbacks=run_callbacks, logger=loggers or False
    )
    out_dir.mkdir(parents=True, exist_ok=True)

    log.info("loading policy %s", cfg.model.name_or_path)
    # model.dtype is the compute dtype; the trained weights are fp32 masters, loaded as such (a bf16
    # checkpoint upcasts exactly). Every other copy's dtype follows from this Precision (the module
    # holds it: the reference, the generators, the weight sync, evaluation and export)
    precision = Precision.named(cfg.model.dtype)
    policy, tokenizer = load_policy(cfg.model.name_or_path, dtype=precision.master)
    module = build(
        cfg.module,
        "module",
        policy=policy,
        objective=objective,
        precision=precision,
        banned_token_ids=banned_token_ids(tokenizer, eos_token_ids(tokenizer, policy)),
    )
    generation = build(
        cfg.generation,
        "generation",
        rollout=rollout,
        env=env,
        make_sampler=make_sampler,
        tokenizer=tokenizer,
        buffer=buffer,
    )
    generation.attach(trainer)  # the generation and the strategy agree on where rollouts run
    datamodule = build(
        cfg.data,
        "data",
        buffer=buffer,
        generation=generation,
        pad_id=tokenizer.pad_token_id,
        record_check=RecordCheck.for_policy(policy),
        run_id=cfg.run_id,
    )
    for cb in callbacks.values():
        if isinstance(cb, MeanAtKEval):  # an MCTS run also draws one search tree per evaluation
            # it samples with the run's sampler (vLLM at paper scale)
            search = rollout if isinstance(rollout, MCTSRollout) else None
            cb.setup_eval(env, tokenizer, make_sampler, search=search)
        if isinstance(cb, ExportPolicy):
            cb.tokenizer = tokenizer

    # a run (or its resume) starts from an empty buffer: what an interrupted incarnation of it left
    # behind was made by weights this checkpoint may not have. Rank zero empties it before any other
    # rank can read or write (under torchrun the others wait for it in the process-group setup).
    if rank_zero_only.rank == 0:  # type: ignore[attr-defined]  # Lightning sets it on its function
        dropped = buffer.clear()
        if dropped:
            log.warning(
                "buffer: dropped %d records an earlier incarnation of run %s left", dropped, cfg.run_id
            )
    log.info(
        "output dir: %s, run id: %s%s", out_dir, cfg.run_id, f", resuming from {ckpt.path}" if ckpt else ""
    )
    fit_t0 = time.monotonic()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt.path) if ckpt else None, weights_only=True)

    result: dict = {
        "global_step": trainer.global_step,
        "skipped_steps": module.skipped_steps,
        "run_id": cfg.run_id,
        "wall_seconds": time.monotonic() - fit_t0,  # this process's fit (evaluations and export included)
    }
    if trainer.is_global_zero:
        # the run finished: what it kept on a shared server goes (Redis: its stream; the dead letters
        # expire later). A run that fails or is killed never gets here: its keys expire by themselves.
        left = buffer.finish()
        if left:
            log.info(
                "buffer: run %s finished; its stream is deleted (%s)",
                cfg.run_id,
                ", ".join(f"{k.split('/')[-1]} {v}" for k, v in left.items()),
            )
        result.update(left)
    # ("step" is the CSV rows' step, logged with the metrics; global_step says it already; an
    # evaluator's "<prefix>/step" is the step of its last evaluation, in its history)
    result.update(
        {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if v.numel() == 1 and k != "step" and not k.endswith("/step")
        }
    )
    result["stop_reason"] = stop_reason(trainer)
    for ev in (cb for cb in callbacks.values() if isinstance(cb, MeanAtKEval)):
        if not ev.history:
            continue
        # the test evaluator's rows as before (eval_history, final/..., base/...), the validation
        # evaluator's under its prefix (val_history, final/val/..., base/val/...)
        test = ev.prefix == "eval"
        result["eval_history" if test else f"{ev.prefix}_history"] = ev.history
        for tag, row in (("final", ev.history[-1]), ("base", ev.history[0])):
            result.update(
                {f"{tag}/{k}": v for k, v in row.items() if k != "step" and (test or k.startswith(ev.prefix))}
            )
    best = best_checkpoint(trainer)
    if best is not None:
        result["best"] = best.summary()
    if trainer.is_global_zero:
        write_text_atomic(out_dir / "results.json", json.dumps(result, indent=1))
        for line in summary_lines(result, out_dir):
            log.info("%s", line)
    return result


def check_memory_plan(cfg: DictConfig, strategy, rollout, make_sampler, callbacks) -> None:
    """Generator and trainer ranks: what each puts on its device must fit it
    (:mod:`tsd.distributed.memory_plan`), checked before any model is loaded or rank started; a
    plan that does not fit is refused with one line naming the settings to change."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from tsd.callbacks import MeanAtKEval
    from tsd.distributed.memory_plan import plan_run
    from tsd.distributed.strategy import GeneratorTrainerStrategy

    if not isinstance(strategy, GeneratorTrainerStrategy):
        return
    ev = next((cb for cb in callbacks if isinstance(cb, MeanAtKEval)), None)
    plan = plan_run(cfg, rollout=rollout, make_sampler=make_sampler, eval_callback=ev)
    if getattr(rank_zero_only, "rank", 0) == 0:
        log.info("%s", plan.table())
    plan.check()


def _points(x: float) -> str:
    return f"{100 * x:.2f}%"


def _count(n: float) -> str:
    """1,234,567 -> 1.23M; 645,123 -> 645k; 555 -> 555."""
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:,.0f}k" if n >= 1e4 else f"{n:,.0f}"


def summary_lines(result: dict, out_dir: Path) -> list[str]:
    """What a finished run prints last: a few readable lines (the JSON is in results.json): the
    final evaluation against the base, the best validation score under a plateau rule, the
    tokens, the wall time, and where the policy and results.json are."""
    secs = float(result.get("wall_seconds", 0.0))
    lines = [
        f"run finished: {result['global_step']} optimiser steps in {int(secs // 60)} min {secs % 60:.0f} s "
        f"({result.get('stop_reason', '?')}; {result.get('skipped_steps', 0)} steps skipped)"
    ]
    for prefix, what in (("eval", "test"), ("val", "validation")):
        metric = next((k for k in result if k.startswith(f"final/{prefix}/mean@")), None)
        if metric is None:
            continue
        name = metric.split("/")[-1]
        final, base = result[metric], result.get(f"base/{prefix}/{name}")
        vs = "" if base is None else f" (base {_points(base)}, {100 * (final - base):+.2f} points)"
        lines.append(f"  {what} {name} at the end: {_points(final)}{vs}")
    best = result.get("best")
    if best and best.get("score") is not None:
        tokens = best.get("generated_tokens")
        lines.append(
            f"  best {best['metric']}: {_points(best['score'])} at step {best['step']}"
            + (f" ({_count(tokens)} generated tokens)" if tokens else "")
        )
    tok = {k: result.get(f"compute/{k}_tokens") for k in ("generated", "trained", "prefill")}
    lines.append("  tokens: " + ", ".join(f"{_count(v)} {k}" for k, v in tok.items() if v is not None))
    policy = out_dir / "policy"
    if policy.exists():
        best_dir = out_dir / "policy_best"
        lines.append(f"  policy: {policy}" + (f" (validation-best: {best_dir})" if best_dir.exists() else ""))
    lines.append(f"  results: {out_dir / 'results.json'}")
    return lines


def _stop_on_sigterm(signum, frame) -> None:
    """``kill PID`` stops the run at once, as SIGTERM's default action does (exit 143). Lightning
    installs its own SIGTERM handler that only sets a flag for SLURM requeueing, which this run
    never reads: a killed single-process run went on training. Lightning keeps an existing handler
    and calls it after its own, so this one still runs. It restores the default action and sends
    the signal again instead of raising ``SystemExit``: an exiting Python joins its
    ``multiprocessing`` children, so a launcher would wait on its training ranks instead of dying
    (they die with it through ``PR_SET_PDEATHSIG``). Checkpoints already written stay."""
    log.error("SIGTERM: stopping")
    logging.shutdown()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        result = train(cfg)
    except ConfigError as e:
        log.error("config error: %s", e)
        raise SystemExit(2) from None
    # the value Hydra sweepers optimise
    metric = cfg.get("optimized_metric")
    return result.get(metric) if metric else None


#: what the default experiment (configs/train.yaml: tree_countdown) fixes of the rollout group
DEFAULT_EXPERIMENT_ROLLOUT = "mcts"


def refuse_rollout_without_experiment(argv: list[str]) -> None:
    """``rollout=X`` (X not ``mcts``) on top of the default experiment: the default experiment sets
    the MCTS rollout's ``emission`` subgroup, which another rollout has not, and Hydra's error
    ("Could not override 'rollout/emission'") does not say what to do. One line that does, exit 2."""
    if any(a.startswith(("experiment=", "~experiment", "+experiment=")) for a in argv):
        return
    for a in argv:
        name, eq, value = a.partition("=")
        if eq and name.lstrip("+") == "rollout" and value != DEFAULT_EXPERIMENT_ROLLOUT:
            log.error(
                "config error: rollout=%s: the default experiment (tree_countdown) searches with "
                "rollout=mcts and distils its tree; choose a method by its experiment (accepted: "
                "experiment=bon_countdown | cispo_countdown | mcts_countdown | ..., or ~experiment "
                "for the groups' bare defaults, then rollout=%s)",
                value,
                value,
            )
            raise SystemExit(2)


def cli() -> None:
    """``python train.py``'s entry point: the argument checks Hydra cannot phrase, then :func:`main`."""
    import sys

    logging.basicConfig(format="[%(name)s][%(levelname)s] %(message)s")
    refuse_rollout_without_experiment(sys.argv[1:])
    main()


if __name__ == "__main__":
    cli()
