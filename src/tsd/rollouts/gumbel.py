"""MCTS with a Gumbel root and Sequential Halving (Danihelka et al., "Policy improvement by planning
with Gumbel", ICLR 2022) instead of pUCT at the root; the whole tree emitted as the tree arm does.

    python train.py experiment=gumbel_countdown                  # rollout=gumbel_mcts, emission=tree
    python scripts/screen_branching.py                           # against i.i.d. sampling, equal tokens

The root's actions are ``root_actions`` (m) distinct first steps drawn **without replacement** from
the policy (one ``stop="step"`` call per draw, every tree of the batch in it, each excluding the
steps drawn before): that is Gumbel-top-k sampling of the step distribution. Each drawn step ``a``
gets its Gumbel key ``g(a) + log pi(a)`` from the same law Gumbel-top-k gives it: the largest key of
all steps is ``Gumbel(log 1)``, and given the first ``i - 1`` steps drawn, the ``i``-th key is a
``Gumbel(log(1 - sum_{j<i} pi(a_j)))`` truncated below the ``(i - 1)``-th (the maximum of the steps
left and which step attains it are independent). Step probabilities are exact: the sampler
records every token's log-prob.

The budget ``n = workers x iterations`` simulations is then spent by Sequential Halving: ``P =
ceil(log2 m)`` phases; in a phase every surviving action gets ``max(1, floor(n / (P |A|)))``
simulations (the workers of a wave take them in turn, round robin), then the better half survives
by ``g(a) + log pi(a) + sigma(q(a))``, ``sigma(q) = (c_visit + max_b N(b)) * c_scale * q`` with ``q``
the action's mean backed-up value mapped from [-1, 1] to [0, 1] (as mctx normalises values); as in
mctx, halving stops at 2 survivors and the rest of the budget goes to them in turn. Below a root
action every simulation descends, expands and backs up exactly as :class:`~tsd.rollouts.mcts.MCTSRollout`
does (pUCT, widening, rollout values, virtual loss). A phase ends when its simulations are taken,
so a halving may fall inside a wave: it reads the values backed up so far (virtual loss taken off).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tsd.config import check_int, check_number
from tsd.envs.base import Problem
from tsd.rl.trajectory import Trajectory
from tsd.rollouts.mcts import MCTSRollout, SearchCounters
from tsd.rollouts.tree import Node, SearchTree
from tsd.rollouts.tree_stats import nonzero_advantage_fraction, shape_stats
from tsd.samplers.base import Sampler


def sequential_keys(step_probs: Sequence[float], uniforms: Sequence[float]) -> list[float]:
    """Gumbel keys ``g(a_i) + log pi(a_i)`` of steps drawn one after the other without replacement,
    whose probabilities are ``step_probs`` (in draw order), from one uniform in (0, 1) each:
    ``K_1 ~ Gumbel(0)``, ``K_i ~ Gumbel(log(1 - sum_{j<i} p_j))`` truncated to ``< K_{i-1}``
    (inverse CDF ``F(x) = exp(-exp(-(x - mu)))``, sampled on ``(0, F(K_{i-1}))``). A draw that
    repeats a step (no mass left) gets ``-inf``."""
    keys: list[float] = []
    left = 1.0
    for p, u in zip(step_probs, uniforms):
        if left <= 1e-12:
            keys.append(-math.inf)
            continue
        mu = math.log(left)
        top = 1.0 if not keys else math.exp(-math.exp(-(keys[-1] - mu)))
        x = max(min(u, 1 - 1e-12), 1e-300) * top
        keys.append(mu - math.log(-math.log(x)) if x > 0 else -math.inf)
        left = max(0.0, left - p)
    return keys


@dataclass
class HalvingPlan:
    """Sequential Halving over one tree's root actions: ``next()`` says which action the next
    simulation goes below."""

    keys: dict[int, float]  # root child id -> g(a) + log pi(a)
    budget: int  # simulations of the whole search
    survivors: list[Node] = field(default_factory=list)
    queue: list[Node] = field(default_factory=list)
    phases: int = 1
    halvings: int = 0

    def __post_init__(self) -> None:
        self.phases = max(1, math.ceil(math.log2(max(1, len(self.survivors)))))
        self._refill()

    def _refill(self) -> None:
        per = max(1, self.budget // (self.phases * max(1, len(self.survivors))))
        # round robin: a wave's workers spread over the survivors before any gets a second visit
        self.queue = [a for _ in range(per) for a in self.survivors]


class GumbelMCTSRollout(MCTSRollout):
    """:class:`~tsd.rollouts.mcts.MCTSRollout` whose root is a Gumbel-top-m draw searched by
    Sequential Halving."""

    name = "gumbel_mcts"

    def __init__(self, root_actions: int = 4, c_visit: float = 50.0, c_scale: float = 1.0, **kwargs) -> None:
        """
        Args:
            root_actions: m, distinct first steps drawn at the root (Gumbel-top-m), ``>= 1``.
            c_visit: ``sigma``'s visit offset (Danihelka et al.: 50), ``>= 0``.
            c_scale: ``sigma``'s scale (Danihelka et al.: 1.0 on [0, 1] values), ``> 0``.
            **kwargs: :class:`~tsd.rollouts.mcts.MCTSRollout`'s (the search below the root).
        """
        super().__init__(**kwargs)
        o = "GumbelMCTSRollout"
        self.root_actions = check_int(root_actions, f"{o}.root_actions", low=1)
        self.c_visit = check_number(c_visit, f"{o}.c_visit", low=0.0)
        self.c_scale = check_number(c_scale, f"{o}.c_scale", low=0.0, low_open=True)
        self._plans: list[HalvingPlan] = []
        self._rng = random.Random(self.seed)

    # ------------------------------------------------------------------ the root
    def _before_search(self, trees: Sequence[SearchTree], sampler: Sampler, counters: SearchCounters) -> None:
        """Draw the m root actions of every tree without replacement (one sampler call per draw,
        all trees in it), give each its Gumbel key, and start the halving plans."""
        c = counters
        landed: list[list[Node]] = [[] for _ in trees]
        for _ in range(self.root_actions):
            states = [list(t.prompt_ids) for t in trees]
            outs = sampler.sample(
                states,
                n=1,
                max_new_tokens=min(self.max_step_tokens, self.max_new_tokens),
                stop="step",
                exclude=[list(t.root.children) for t in trees],
            )
            c.sample_calls += 1
            c.sample_widths.append(len(states))
            for i, (tree, (cont,)) in enumerate(zip(trees, outs)):
                tokens = len(cont.token_ids)
                c.search_tokens += tokens
                tree.generated_tokens += tokens
                (child,) = tree.add_samples(tree.root, [cont])
                landed[i].append(child)
        c.expansions += len(trees)
        self._plans = []
        for tree, kids in zip(trees, landed):
            probs, first, seen = [], [], set()
            for k in kids:  # a repeated draw (no mass left) adds nothing
                if k.id in seen:
                    probs.append(0.0)
                    first.append(False)
                    continue
                seen.add(k.id)
                probs.append(k.step_probability())
                first.append(True)
            keys = sequential_keys(probs, self._uniforms(sampler, len(kids)))
            by_id = {k.id: key for k, key, f in zip(kids, keys, first) if f}
            survivors = [k for k in tree.root.children if k.id in by_id]
            self._plans.append(HalvingPlan(by_id, self.workers * self.iterations, survivors))

    def _uniforms(self, sampler: Sampler, n: int) -> list[float]:
        """Uniforms for the keys, from the sampler's generator when it has one (so a checkpointed
        run draws the same), else from this rollout's own seeded one."""
        gen = sampler.generator
        if gen is not None:
            return torch.rand(n, generator=gen, dtype=torch.float64, device=gen.device).tolist()
        return [self._rng.random() for _ in range(n)]

    def _score(self, tree: SearchTree, plan: HalvingPlan, node: Node) -> float:
        """``g(a) + log pi(a) + sigma(q(a))`` with real visits and values (virtual loss off)."""
        n = tree.real_visits(node)
        w = node.value_sum + node.in_flight * tree.virtual_loss
        q = (w / n + 1) / 2 if n > 0 else 0.5
        top = max(tree.real_visits(k) for k in plan.survivors)
        return plan.keys[node.id] + (self.c_visit + top) * self.c_scale * q

    def _halve(self, tree: SearchTree, plan: HalvingPlan) -> None:
        if len(plan.survivors) > 2:
            ranked = sorted(plan.survivors, key=lambda a: (-self._score(tree, plan, a), a.id))
            plan.survivors = ranked[: max(2, math.ceil(len(ranked) / 2))]
            plan.halvings += 1
        plan._refill()

    def _select_path(self, index: int, tree: SearchTree) -> list[Node] | None:
        plan = self._plans[index]
        for _ in range(2):
            while plan.queue:
                a = plan.queue.pop(0)
                if not (self.skip_exhausted and a.exhausted):
                    return tree.select_leaf(a)
            if all(self.skip_exhausted and a.exhausted for a in plan.survivors):
                # every survivor is spent: the root actions still open take over, best first
                open_ = [k for k in tree.root.children if k.id in plan.keys and not k.exhausted]
                if not open_:
                    return None
                plan.survivors = sorted(open_, key=lambda a: (-self._score(tree, plan, a), a.id))[:2]
                plan._refill()
            else:
                self._halve(tree, plan)
        return None

    # ------------------------------------------------------------------ statistics
    def _stats(
        self,
        problems: Sequence[Problem],
        trees: Sequence[SearchTree],
        trajectories: Sequence[Trajectory],
        c: SearchCounters,
    ) -> dict[str, float]:
        out = super()._stats(problems, trees, trajectories, c)
        n = max(1, len(trees))
        out.update(shape_stats(trees))
        out["rollout/nonzero_advantage_token_fraction"] = nonzero_advantage_fraction(trajectories)
        out["search/root_actions"] = sum(len(p.keys) for p in self._plans) / n
        out["search/halvings"] = sum(p.halvings for p in self._plans) / n
        return out
