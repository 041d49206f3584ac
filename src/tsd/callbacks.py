"""Callbacks that tie the loop together without the module knowing about generation.

- :class:`RolloutSync`: after each optimiser step, acknowledge the batch's buffer entries (so a
  crash before the step loses nothing) and, every ``sync_every`` steps, publish the weights to the
  generator(s) with a new policy version (the article: every 8 gradient steps).
- :class:`MeanAtKEval`: eval mean@k of the current policy at step 0, every n steps and at the end;
  W&B loggers also get a table of sampled completions and (MCTS runs) a picture of a search tree.
- :class:`ExportPolicy`: at the end, the trained policy as a transformers directory + value head.
- :class:`LogRunConfig`: the resolved config and the run's identity to every logger, at fit start.
- :class:`LogLine`: a plain log line every n steps.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from tsd.envs.countdown import CountdownEnv
from tsd.eval.runner import evaluate_mean_at_k
from tsd.rollouts.mcts import MCTSRollout

log = logging.getLogger(__name__)


class RolloutSync(L.Callback):
    def __init__(self, sync_every: int = 8) -> None:
        """
        Args:
            sync_every: optimiser steps between weight syncs to the generators (article: 8).
        """
        if sync_every < 1:
            raise ValueError(f"data.sync_every: must be >= 1, got {sync_every}")
        self.sync_every = sync_every

    def on_train_start(self, trainer, pl_module) -> None:
        # resumed: the generator copy was made before the checkpoint was loaded; give it the
        # restored weights under the restored version
        dm = trainer.datamodule
        if trainer.global_step > 0:
            sync = getattr(trainer.strategy, "sync_weights", None)
            if sync is not None:
                sync(pl_module, dm.trainer_version)
            else:
                dm.sync_weights(pl_module.policy.state_dict(), dm.trainer_version)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        dm = trainer.datamodule
        dm.ack(batch["buffer_ids"])
        step = trainer.global_step
        if step > 0 and step % self.sync_every == 0 and dm.trainer_version != step // self.sync_every:
            t0 = time.perf_counter()
            sync = getattr(trainer.strategy, "sync_weights", None)
            version = step // self.sync_every
            if sync is not None:  # distributed: the Strategy gathers and broadcasts
                sync(pl_module, version)
            else:
                dm.sync_weights(pl_module.policy.state_dict(), version)
            dm.trainer_version = version
            pl_module.log("perf/weight_sync_seconds", time.perf_counter() - t0, on_step=True, batch_size=1)


class MeanAtKEval(L.Callback):
    def __init__(
        self,
        every_n_steps: int = 50,
        num_problems: int | None = 100,
        k: int = 16,
        max_new_tokens: int = 256,
        problems_per_batch: int = 8,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 1234,
        at_start: bool = True,
        table_rows: int = 64,
        draw_tree: bool = True,
        dirpath: str | None = None,
    ) -> None:
        """
        Args:
            every_n_steps: optimiser steps between evaluations (0: only at start and end).
            num_problems: test problems evaluated (the first ones of the test split; None: all 820).
            k: samples per problem (mean@k; article: 16).
            max_new_tokens: token cap of one completion.
            problems_per_batch: problems sampled together (k rows each).
            temperature, top_p: sampling for evaluation.
            seed: the eval sampler's seed (the same samples for the same weights).
            at_start: evaluate the base policy at step 0 (not again when a run resumes).
            table_rows: sampled completions (problem, completion, reward, correct) logged to W&B as
                the table ``eval/samples`` at each evaluation, >= 0 (0: none); the first sample of
                every problem first, then the second, ...
            draw_tree: MCTS runs: at each evaluation, search the first test problem with the run's
                MCTS settings and the current policy, and log the tree's picture (``eval/search_tree``
                on W&B; PNG, SVG and JSON in ``dirpath``).
            dirpath: where the tree pictures go (``tree_step<N>.png``); None: not kept on disk.
        """
        if every_n_steps < 0 or k < 1 or (num_problems is not None and num_problems < 1):
            raise ValueError(
                "callbacks.eval: every_n_steps must be >= 0, k >= 1 and num_problems >= 1 or null, got "
                f"{every_n_steps}, {k}, {num_problems}"
            )
        if not isinstance(table_rows, int) or isinstance(table_rows, bool) or table_rows < 0:
            raise ValueError(f"callbacks.eval.table_rows: must be an integer >= 0, got {table_rows!r}")
        self.every, self.num_problems, self.k = every_n_steps, num_problems, k
        self.max_new_tokens, self.ppb = max_new_tokens, problems_per_batch
        self.temperature, self.top_p, self.seed, self.at_start = temperature, top_p, seed, at_start
        self.table_rows, self.draw_tree = table_rows, bool(draw_tree)
        self.dirpath = Path(dirpath) if dirpath else None
        self.env: CountdownEnv | None = None
        self.tokenizer = None
        self.search: MCTSRollout | None = None
        self.history: list[dict] = []
        self._last_step = -1
        #: when this process started fitting (the eval rows' perf/elapsed_s counts from here)
        self._fit_t0: float | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fit_t0 = time.monotonic()

    def setup_eval(self, env: CountdownEnv, tokenizer, search: MCTSRollout | None = None) -> None:
        """The env and tokenizer to evaluate with; ``search``: the run's MCTS rollout, whose settings
        draw the tree pictures (None: no tree)."""
        self.env, self.tokenizer = env, tokenizer
        self.search = search if self.draw_tree else None

    def _run(self, trainer, pl_module) -> None:
        if self.env is None or trainer.global_step == self._last_step:
            return
        from tsd.samplers.hf import HFSampler

        self._last_step = trainer.global_step
        # sharded (GeneratorTrainerStrategy): every trainer rank helps gather the full policy
        full = getattr(trainer.strategy, "full_policy_state_dict", None)
        policy = full(pl_module) if full is not None else pl_module.policy
        if policy is None or not trainer.is_global_zero:
            return
        was_training = policy.training
        sampler = HFSampler(
            policy,
            self.tokenizer,
            temperature=self.temperature,
            top_p=self.top_p,
            device=pl_module.device,
            seed=self.seed,
        )
        problems = self.env.test if self.num_problems is None else self.env.test[: self.num_problems]
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        res = evaluate_mean_at_k(
            sampler,
            self.env,
            problems,
            k=self.k,
            max_new_tokens=self.max_new_tokens,
            problems_per_batch=self.ppb,
            progress=False,
            return_samples=bool(wandb_loggers and self.table_rows),
        )
        tree = self._draw_tree(sampler, trainer.global_step) if self.search is not None else None
        media = self._wandb_media(res.pop("samples", None), tree) if wandb_loggers else {}
        policy.train(was_training)
        gen = float(trainer.datamodule.stats().get("compute/generated_tokens", 0.0))
        row = {
            "step": trainer.global_step,
            f"eval/mean@{self.k}": res[f"mean@{self.k}"],
            f"eval/pass@{self.k}": res[f"pass@{self.k}"],
            "eval/dense_mean": res["dense_mean"],
            "compute/generated_tokens": gen,
            "compute/trained_tokens": float(getattr(pl_module, "trained_tokens", 0)),
            "perf/eval_seconds": res["seconds"],
            # wall seconds since this process started fitting (a resumed run counts from its resume)
            "perf/elapsed_s": time.monotonic() - self._fit_t0 if self._fit_t0 is not None else 0.0,
        }
        self.history.append(row)
        log.info(
            "eval step %d: mean@%d=%.4f pass@%d=%.4f (%d problems, %.1fs)",
            trainer.global_step,
            self.k,
            res[f"mean@{self.k}"],
            self.k,
            res[f"pass@{self.k}"],
            len(problems),
            res["seconds"],
        )
        scalars = {k: v for k, v in row.items() if k != "step"}
        for lg in trainer.loggers:
            # W&B: the table and the tree in the same row as the compute axes they are drawn against
            lg.log_metrics({**scalars, **media} if lg in wandb_loggers else scalars, step=trainer.global_step)

    def _draw_tree(self, sampler, step: int) -> tuple[Path, str]:
        """Search the first test problem with the run's MCTS settings and the current policy; draw
        the tree (``dirpath/tree_step<N>.png``, .svg, .json). Returns (PNG path, title)."""
        import tempfile

        from tsd.viz.tree import search_and_draw

        assert self.search is not None and self.env is not None
        folder = self.dirpath or Path(tempfile.mkdtemp(prefix="tsd_tree_"))
        png, _, title = search_and_draw(
            self.search, self.env.test[0], sampler, self.env, folder / f"tree_step{step}"
        )
        return png, title

    def _wandb_media(self, samples: list[dict] | None, tree: tuple[Path, str] | None) -> dict[str, Any]:
        """W&B objects for one evaluation: ``eval/samples`` (a table of sampled completions) and
        ``eval/search_tree`` (the tree picture)."""
        import wandb

        media: dict[str, Any] = {}
        if samples:
            problems = {p.id: p for p in self.env.test} if self.env is not None else {}
            # the j-th sample of every problem before the (j+1)-th: as many problems as possible
            order = sorted(range(len(samples)), key=lambda i: (i % self.k, i // self.k))[: self.table_rows]
            rows = []
            for i in order:
                s = samples[i]
                p = problems.get(s["problem_id"])
                desc = f"{list(p.numbers)} -> {p.target}" if p is not None else str(s["problem_id"])
                rows.append([desc, s["completion"], float(s["dense"]), bool(s["correct"])])
            media["eval/samples"] = wandb.Table(
                columns=["problem", "completion", "reward", "correct"], data=rows
            )
        if tree is not None:
            media["eval/search_tree"] = wandb.Image(str(tree[0]), caption=tree[1])
        return media

    def on_train_start(self, trainer, pl_module) -> None:
        # the base policy, once: a resumed run (step > 0) was evaluated by the run it continues
        if self.at_start and trainer.global_step == 0:
            self._run(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every and trainer.global_step > 0 and trainer.global_step % self.every == 0:
            self._run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._run(trainer, pl_module)

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state.get("history", []))
        # a run resumed at a step it already evaluated (the checkpoint came after the evaluation)
        # does not evaluate it again at the end
        self._last_step = int(self.history[-1]["step"]) if self.history else -1


class ExportPolicy(L.Callback):
    def __init__(self, dirpath: str, tokenizer=None) -> None:
        """Writes ``dirpath`` (transformers ``save_pretrained`` + ``value_head/`` +
        tokenizer) at the end of training, loadable by ``eval.py model.name_or_path=DIR``."""
        self.dirpath = Path(dirpath)
        self.tokenizer = tokenizer

    def on_train_end(self, trainer, pl_module) -> None:
        # sharded: every trainer rank takes part in gathering; rank 0 gets the full policy
        full = getattr(trainer.strategy, "full_policy_state_dict", None)
        policy = full(pl_module) if full is not None else pl_module.policy
        if policy is None or not trainer.is_global_zero:
            return
        policy.save_pretrained(self.dirpath)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(self.dirpath)
        (self.dirpath / "tsd_export.json").write_text(
            json.dumps({"global_step": trainer.global_step, "torch": torch.__version__}, indent=1)
        )
        log.info("exported policy to %s", self.dirpath)


class LogRunConfig(L.Callback):
    def __init__(self, params: dict[str, Any]) -> None:
        """Gives every logger ``params`` (the resolved config and the run's identity,
        :func:`tsd.loggers.run_info.logged_config`) through ``log_hyperparams`` at fit start: in the
        process that trains on rank 0, never in a parent that forks the ranks (a W&B run must be
        started where it is used)."""
        self.params = params

    def on_fit_start(self, trainer, pl_module) -> None:
        for lg in trainer.loggers:
            lg.log_hyperparams(self.params)


class LogLine(L.Callback):
    def __init__(self, every_n_steps: int = 10) -> None:
        """One plain log line every ``every_n_steps`` optimiser steps (readable in CI logs and files,
        where a progress bar is not)."""
        if every_n_steps < 1:
            raise ValueError(f"callbacks.log_line.every_n_steps: must be >= 1, got {every_n_steps}")
        self.every = every_n_steps
        self.t0 = time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every or not trainer.is_global_zero:
            return
        m = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if isinstance(v, (int, float, torch.Tensor))
        }
        log.info(
            "step %d/%s | loss %.4f | reward %.3f | correct %.3f | kl %.4f | lag %.2f | gen tok %d | %.0fs",
            step,
            trainer.max_steps,
            m.get("train/loss", float("nan")),
            m.get("train/reward", float("nan")),
            m.get("train/correct", float("nan")),
            m.get("train/kl", float("nan")),
            m.get("train/policy_lag", float("nan")),
            int(m.get("compute/generated_tokens", 0)),
            time.perf_counter() - self.t0,
        )
