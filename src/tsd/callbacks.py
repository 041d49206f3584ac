"""Callbacks that tie the loop together without the module knowing about generation.

- :class:`RolloutSync`: after each optimiser step, acknowledge the batch's buffer entries (so a
  crash before the step loses nothing) and, every ``sync_every`` steps, publish the weights to the
  generator(s) with a new policy version (the article: every 8 gradient steps).
- :class:`MeanAtKEval`: eval mean@k of the current policy at step 0, every n steps and at the end.
- :class:`ExportPolicy`: at the end, the trained policy as a transformers directory + value head.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L
import torch

from tsd.envs.countdown import CountdownEnv
from tsd.eval.runner import evaluate_mean_at_k

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
        """
        if every_n_steps < 0 or k < 1 or (num_problems is not None and num_problems < 1):
            raise ValueError(
                "callbacks.eval: every_n_steps must be >= 0, k >= 1 and num_problems >= 1 or null, got "
                f"{every_n_steps}, {k}, {num_problems}"
            )
        self.every, self.num_problems, self.k = every_n_steps, num_problems, k
        self.max_new_tokens, self.ppb = max_new_tokens, problems_per_batch
        self.temperature, self.top_p, self.seed, self.at_start = temperature, top_p, seed, at_start
        self.env: CountdownEnv | None = None
        self.tokenizer = None
        self.history: list[dict] = []
        self._last_step = -1

    def setup_eval(self, env: CountdownEnv, tokenizer) -> None:
        self.env, self.tokenizer = env, tokenizer

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
        res = evaluate_mean_at_k(
            sampler,
            self.env,
            problems,
            k=self.k,
            max_new_tokens=self.max_new_tokens,
            problems_per_batch=self.ppb,
            progress=False,
        )
        policy.train(was_training)
        gen = float(trainer.datamodule.stats().get("compute/generated_tokens", 0.0))
        row = {
            "step": trainer.global_step,
            f"eval/mean@{self.k}": res[f"mean@{self.k}"],
            f"eval/pass@{self.k}": res[f"pass@{self.k}"],
            "eval/dense_mean": res["dense_mean"],
            "compute/generated_tokens": gen,
            "perf/eval_seconds": res["seconds"],
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
        for lg in trainer.loggers:
            lg.log_metrics({k: v for k, v in row.items() if k != "step"}, step=trainer.global_step)

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
        """Writes ``dirpath`` (transformers ``save_pretrained`` + ``value_head.safetensors`` +
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
