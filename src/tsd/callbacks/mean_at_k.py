"""MeanAtKEval: eval mean@k of the current policy at step 0, every n steps (or every n generated
tokens) and at the end; W&B loggers also get a table of sampled completions and (MCTS runs) a
picture of a search tree.

Two instances can run side by side: ``callbacks.eval`` on the first test problems (``eval/``) and,
under ``stop=plateau``, ``callbacks.val`` on the validation slice (``val/``), whose score the
plateau rule (:class:`~tsd.callbacks.stopping.PlateauStop`) and the best checkpoint
(``ModelCheckpoint(monitor="val/mean@16")``) read from ``trainer.callback_metrics``. Each
evaluation's per-problem results can be journaled (``journal``) for paired comparisons later.

It samples with the run's own sampler (``configs/sampler``: the factory the generation uses), so a
paper-scale run evaluates through vLLM. The eval sampler is made once, on the first evaluation,
from the policy as it is then, with this callback's temperature, top-p and seed; each later
evaluation loads the current weights into it (``Sampler.load_weights``) and, when the sampler keeps
its own random generator (HFSampler), reseeds it, so the same weights give the same samples. vLLM
seeds its engine once: its evaluations draw fresh samples each time (mean@k stays unbiased).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from tsd.config import check_choice, check_int, check_number, require
from tsd.envs.base import Env
from tsd.eval.runner import evaluate_mean_at_k
from tsd.rollouts.mcts import MCTSRollout
from tsd.samplers.base import Sampler

log = logging.getLogger(__name__)


class MeanAtKEval(L.Callback):
    def __init__(
        self,
        every_n_steps: int = 50,
        num_problems: int | None = 100,
        split: str = "test",
        prefix: str = "eval",
        every_n_tokens: int = 0,
        journal: str | None = None,
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
        sampler_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        """
        Args:
            every_n_steps: optimiser steps between evaluations (0: only at start and end).
            num_problems: problems evaluated (the first ones of the split; None: all of it).
            split: the env's split evaluated: ``test`` (the 820) or ``val`` (``env.n_val`` problems
                drawn after the train split: what a stop rule may look at without touching test).
            prefix: the metrics' prefix (``eval/mean@16``, ``val/mean@16``); one per instance.
            every_n_tokens: also evaluate each time the run's generated tokens cross a multiple of
                this (0: off): a cadence that is the same for methods with different tokens per step.
            journal: a JSONL file that gets one line per evaluation (step, tokens, mean@k and the
                per-problem correct counts, for paired comparisons); None: not kept.
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
            sampler_kwargs: arguments of the eval sampler over the run's sampler config (which
                also gives it temperature, top_p and seed from above), e.g. a vLLM engine beside
                a trainer on one GPU: ``{gpu_memory_utilization: 0.2}``; None: none.
        """
        name = f"callbacks.{'eval' if prefix == 'eval' else prefix}"
        check_int(every_n_steps, f"{name}.every_n_steps", low=0)
        check_int(every_n_tokens, f"{name}.every_n_tokens", low=0)
        check_int(k, f"{name}.k", low=1)
        if num_problems is not None:
            check_int(num_problems, f"{name}.num_problems", low=1)
        check_int(max_new_tokens, f"{name}.max_new_tokens", low=1)
        check_int(problems_per_batch, f"{name}.problems_per_batch", low=1)
        check_number(temperature, f"{name}.temperature", low=0)
        check_number(top_p, f"{name}.top_p", low=0, high=1, low_open=True)
        check_int(table_rows, f"{name}.table_rows", low=0)
        check_choice(split, f"{name}.split", ("test", "val"))
        require(
            isinstance(prefix, str) and prefix.isidentifier(),
            f"{name}.prefix",
            "a metric prefix (a name)",
            prefix,
        )
        self.every, self.num_problems, self.k = every_n_steps, num_problems, k
        self.split, self.prefix, self.every_tokens = split, prefix, every_n_tokens
        self.journal = Path(journal) if journal else None
        self.max_new_tokens, self.ppb = max_new_tokens, problems_per_batch
        self.temperature, self.top_p, self.seed, self.at_start = temperature, top_p, seed, at_start
        self.table_rows, self.draw_tree = table_rows, bool(draw_tree)
        self.dirpath = Path(dirpath) if dirpath else None
        self.sampler_kwargs = dict(sampler_kwargs or {})
        self.env: Env | None = None
        self.tokenizer = None
        self.search: MCTSRollout | None = None
        self.make_sampler: Callable[..., Sampler] | None = None
        #: the eval sampler, made at the first evaluation and reused (vLLM: one engine per run)
        self.sampler: Sampler | None = None
        self.history: list[dict] = []
        self._last_step = -1
        #: the multiple of ``every_n_tokens`` last evaluated at (resumed from the checkpoint)
        self._token_mark = 0
        #: when this process started fitting (the eval rows' perf/elapsed_s counts from here)
        self._fit_t0: float | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fit_t0 = time.monotonic()

    def setup_eval(
        self, env: Env, tokenizer, make_sampler: Callable[..., Sampler], search: MCTSRollout | None = None
    ) -> None:
        """The env and tokenizer to evaluate with; ``make_sampler``: the run's sampler factory
        (``configs/sampler``, called as ``make_sampler(policy, tokenizer, device=..., seed=...,
        temperature=..., top_p=..., **sampler_kwargs)``); ``search``: the run's MCTS rollout, whose
        settings draw the tree pictures (None: no tree)."""
        self.env, self.tokenizer, self.make_sampler = env, tokenizer, make_sampler
        self.search = search if self.draw_tree else None

    def _sampler(self, policy, device, step: int) -> Sampler:
        """The eval sampler holding ``policy``'s current weights, its generator reseeded."""
        if self.make_sampler is None:
            raise RuntimeError("MeanAtKEval: setup_eval() was not called (train.py does it)")
        if self.sampler is None:
            # on another device the sampler gets a copy of its own: it moves its model to its
            # device (HFSampler, the value copy of VLLMSampler), and the policy handed over may be
            # the trainers' CPU copy (GeneratorTrainerStrategy's shadow), which must stay on the host
            on_its_device = next(policy.parameters()).device == torch.device(device)
            self.sampler = self.make_sampler(
                policy if on_its_device else copy.deepcopy(policy),
                self.tokenizer,
                device=device,
                seed=self.seed,
                temperature=self.temperature,
                top_p=self.top_p,
                **self.sampler_kwargs,
            )
            log.info("eval sampler: %s", type(self.sampler).__name__)
        else:
            self.sampler.load_weights(policy.state_dict(), version=step)
        if self.sampler.generator is not None:
            self.sampler.generator.manual_seed(self.seed)
        return self.sampler

    def _problems(self) -> list:
        assert self.env is not None
        problems = self.env.val if self.split == "val" else self.env.test
        if not problems:
            raise RuntimeError(
                f"callbacks.{self.prefix}: the env's {self.split} split is empty"
                + (" (set env.n_val, e.g. env.n_val=256)" if self.split == "val" else "")
            )
        return list(problems if self.num_problems is None else problems[: self.num_problems])

    def _run(self, trainer, pl_module) -> None:
        if self.env is None or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        # sharded (GeneratorTrainerStrategy): every trainer rank helps gather the full policy
        policy = trainer.strategy.full_policy(pl_module)
        score = None
        if policy is not None and trainer.is_global_zero:
            score = self._evaluate(trainer, pl_module, policy)
        # every trainer rank learns the score, so that a stop rule reading it decides the same on all
        score = trainer.strategy.broadcast(score, src=0)
        if score is not None and trainer.global_step > 0:
            # what EarlyStopping / ModelCheckpoint(monitor=...) read; the base policy (step 0) is a
            # curve point, not a candidate: a run's best policy is one it trained
            trainer.callback_metrics[f"{self.prefix}/mean@{self.k}"] = torch.tensor(score)
            trainer.callback_metrics[f"{self.prefix}/step"] = torch.tensor(trainer.global_step)

    def _evaluate(self, trainer, pl_module, policy) -> float:
        """One evaluation on rank 0: log it, journal it, return mean@k."""
        assert self.env is not None  # _run returns before this when setup_eval() was not called
        was_training = policy.training
        sampler = self._sampler(policy, pl_module.device, trainer.global_step)
        problems = self._problems()
        p = self.prefix
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
        generation = trainer.datamodule.generation
        gen = float(generation.generated_tokens())
        row = {
            "step": trainer.global_step,
            f"{p}/mean@{self.k}": res[f"mean@{self.k}"],
            f"{p}/pass@{self.k}": res[f"pass@{self.k}"],
            f"{p}/dense_mean": res["dense_mean"],
            "compute/generated_tokens": gen,
            "compute/prefill_tokens": float(generation.prefill_tokens()),
            "compute/trained_tokens": float(getattr(pl_module, "trained_tokens", 0)),
            f"perf/{p}_seconds": res["seconds"],
            # wall seconds since this process started fitting (a resumed run counts from its resume)
            "perf/elapsed_s": time.monotonic() - self._fit_t0 if self._fit_t0 is not None else 0.0,
        }
        self.history.append(row)
        if self.journal is not None:  # per-problem results, for paired comparisons between runs
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            with self.journal.open("a") as f:
                entry = {**row, "split": self.split, "per_problem_correct": res["per_problem_correct"]}
                f.write(json.dumps({**entry, "samples_per_problem": self.k}) + "\n")
        log.info(
            "%s step %d: mean@%d=%.4f pass@%d=%.4f (%d %s problems, %.1fs, %s)",
            p,
            trainer.global_step,
            self.k,
            res[f"mean@{self.k}"],
            self.k,
            res[f"pass@{self.k}"],
            len(problems),
            self.split,
            res["seconds"],
            type(sampler).__name__,
        )
        scalars = {k: v for k, v in row.items() if k != "step"}
        for lg in trainer.loggers:
            # W&B: the table and the tree in the same row as the compute axes they are drawn against
            lg.log_metrics({**scalars, **media} if lg in wandb_loggers else scalars, step=trainer.global_step)
        return float(res[f"mean@{self.k}"])

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
                desc = (
                    self.env.describe(p) if p is not None and self.env is not None else str(s["problem_id"])
                )
                rows.append([desc, s["completion"], float(s["dense"]), bool(s["correct"])])
            media["eval/samples"] = wandb.Table(
                columns=["problem", "completion", "reward", "correct"], data=rows
            )
        if tree is not None:
            media["eval/search_tree"] = wandb.Image(str(tree[0]), caption=tree[1])
        return media

    @property
    def state_key(self) -> str:
        # one state per instance in a checkpoint (eval and val side by side); the test evaluator
        # keeps the class's own key, which older checkpoints hold
        return super().state_key if self.prefix == "eval" else self._generate_state_key(prefix=self.prefix)

    def on_train_start(self, trainer, pl_module) -> None:
        # the base policy, once: a resumed run (step > 0) was evaluated by the run it continues
        if self.at_start and trainer.global_step == 0:
            self._run(trainer, pl_module)

    @staticmethod
    def _ends_after(trainer) -> bool:
        """The run ends after this step: max_steps reached, or a stop rule said stop."""
        return bool(
            trainer.should_stop or (trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps)
        )

    def _due(self, trainer) -> bool:
        step = trainer.global_step
        if step <= 0:
            return False
        due = bool(self.every and step % self.every == 0)
        if self.every_tokens:
            # every trainer rank decides alike: rank 0's count of generated tokens
            gen = trainer.strategy.broadcast(int(trainer.datamodule.generation.generated_tokens()), src=0)
            mark = gen // self.every_tokens
            if mark > self._token_mark:
                self._token_mark = mark
                due = True
        # the run's last step evaluates here, not in on_train_end, so that a best checkpoint (which
        # Lightning saves in this hook) can hold it: max_steps reached, or a stop rule said stop
        return due or self._ends_after(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._due(trainer):
            self._run(trainer, pl_module)
            if self._ends_after(trainer):
                # no evaluation comes after the last step's (on_train_end finds this step done):
                # the engine goes now, before the checkpoint Lightning saves next in this hook
                # gathers the full model and optimiser state on this host (the rehearsal's rank 0
                # was killed for memory with both at once)
                self._close_sampler()

    def on_train_end(self, trainer, pl_module) -> None:
        self._run(trainer, pl_module)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        # the eval engine (vLLM: a process of its own) goes with the run, not with the interpreter
        self._close_sampler()

    def _close_sampler(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None

    def state_dict(self) -> dict:
        return {"history": self.history, "token_mark": self._token_mark}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state.get("history", []))
        self._token_mark = int(state.get("token_mark", 0))
        # a run resumed at a step it already evaluated (the checkpoint came after the evaluation)
        # does not evaluate it again at the end
        self._last_step = int(self.history[-1]["step"]) if self.history else -1
