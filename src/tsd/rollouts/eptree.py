"""EPTree-style forking (TreeRL, Hou et al., ACL 2025; code THUDM/TreeRL): chains first, then
branches from the most uncertain positions inside them, the whole tree trained with TreeRL's step
advantages (DESIGN.md "Branching where it pays").

    python train.py experiment=eptree_countdown                       # surprise forks, every problem
    python train.py experiment=eptree_countdown rollout/forks=entropy # entropy forks (HF sampler)
    python train.py experiment=eptree_countdown rollout/gate=mixed_or_near_miss   # adaptive allocation
    python scripts/screen_branching.py                                # against i.i.d. sampling, equal tokens

For every problem of the batch:

1. **chains**: ``chains`` whole completions (``stop="answer"``), all problems in one sampler call;
   graded;
2. **gate** (:mod:`tsd.rollouts.fork_gates`): which problems are forked (all, or only those whose
   chains are mixed or near misses);
3. **forks**, ``rounds`` times: on every path the last round made (round 1: the chains), the fork
   rule (:mod:`tsd.rollouts.forks`) picks ``forks_per_chain`` positions ``t`` in the path's own
   tokens, before its answer span (``answer_tag`` on is never forked) and after ``min_prefix``
   tokens; from each, ``branches`` new completions of the path's first ``t`` tokens are sampled
   (all forks of all problems in one call; ``without_replacement``: never a completion the tree
   already holds below that prefix, so every fork is a new path). The prefix is not generated
   again: it is prefilled (reused from the HF sampler's prefix store) and its tokens counted once,
   where the chain generated them;
4. **the tree** (:func:`~tsd.rollouts.path_tree.tree_from_paths`): every path a branch of one
   radix tree, a node per run of shared tokens, a graded answer per leaf; emitted by the tree
   emission (``rollout/emission=tree``: every leaf's path, TreeRL's ``V(n) - V(root)`` plus
   ``V(n) - V(parent)`` over ``sqrt(L(n))`` per segment, :mod:`tsd.rollouts.tree_targets`).

The behaviour log-probs of every token are the ones the sampler recorded when it drew it (a
branch carries its parent's for the shared prefix). A forked position may be drawn again: the
branch parts from its parent wherever its tokens first differ.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from tsd.config import check_bool, check_int, require
from tsd.envs.base import Env, Problem, Score
from tsd.rl.trajectory import Trajectory
from tsd.rollouts.base import (
    Rollout,
    RolloutOutput,
    decode_completion,
    encode_prompt,
)
from tsd.rollouts.fork_gates import ForkAll, ForkGate
from tsd.rollouts.forks import ForkRule, SampledPath, SurpriseForks
from tsd.rollouts.path_tree import tree_from_paths
from tsd.rollouts.tree import SearchTree
from tsd.rollouts.tree_stats import nonzero_advantage_fraction, shape_stats, whole_tree_stats
from tsd.rollouts.tree_targets import TreePaths, TreeRLAdvantage, tree_trajectories
from tsd.samplers.base import Continuation, Sampler


class EPTreeRollout(Rollout):
    """M chains per problem, then forks at the most uncertain positions; the whole tree emitted."""

    name = "eptree"

    def __init__(
        self,
        chains: int = 8,
        forks_per_chain: int = 2,
        branches: int = 1,
        rounds: int = 1,
        forks: ForkRule | None = None,
        gate: ForkGate | None = None,
        emission: TreePaths | None = None,
        max_new_tokens: int = 128,
        min_prefix: int = 1,
        without_replacement: bool = True,
        answer_tag: str = "<answer>",
        record_trees: bool = False,
    ) -> None:
        """
        Args:
            chains: M, whole completions sampled per problem first, ``>= 1``.
            forks_per_chain: fork positions per path of the last round, ``>= 0`` (0: the chains alone).
            branches: T, new completions sampled at each fork position, ``>= 1``.
            rounds: forking rounds, ``>= 0``; round 2 forks the branches round 1 made.
            forks: the rule that ranks positions (:mod:`tsd.rollouts.forks`); ``None`` =
                :class:`~tsd.rollouts.forks.SurpriseForks`, TreeRL's ``-log p``.
            gate: which problems are forked after the chains (:mod:`tsd.rollouts.fork_gates`);
                ``None`` = :class:`~tsd.rollouts.fork_gates.ForkAll`.
            emission: what the tree trains (:class:`~tsd.rollouts.tree_targets.TreePaths`);
                ``None`` = every leaf's path with TreeRL's advantages.
            max_new_tokens: token cap of one whole completion (a branch's prefix included).
            min_prefix: a fork shares at least this many tokens with its parent path, ``>= 1``.
            without_replacement: a fork never samples a completion already in the tree below its
                prefix (the sampler's exclusion; the behaviour log-probs stay the policy's).
            answer_tag: where the answer span starts; no fork at or after it.
            record_trees: keep the last run's trees in :attr:`trees`.
        """
        o = "EPTreeRollout"
        self.chains = check_int(chains, f"{o}.chains", low=1)
        self.forks_per_chain = check_int(forks_per_chain, f"{o}.forks_per_chain", low=0)
        self.branches = check_int(branches, f"{o}.branches", low=1)
        self.rounds = check_int(rounds, f"{o}.rounds", low=0)
        require(
            forks is None or isinstance(forks, ForkRule), f"{o}.forks", "a tsd.rollouts.forks rule", forks
        )
        self.forks = forks if forks is not None else SurpriseForks()
        require(gate is None or callable(gate), f"{o}.gate", "a tsd.rollouts.fork_gates gate", gate)
        self.gate = gate if gate is not None else ForkAll()
        require(
            emission is None or isinstance(emission, TreePaths),
            f"{o}.emission",
            "a tsd.rollouts.tree_targets.TreePaths",
            type(emission).__name__,
        )
        self.emission = emission if emission is not None else TreePaths(TreeRLAdvantage())
        self.max_new_tokens = check_int(max_new_tokens, f"{o}.max_new_tokens", low=2)
        self.min_prefix = check_int(min_prefix, f"{o}.min_prefix", low=1)
        self.without_replacement = check_bool(without_replacement, f"{o}.without_replacement")
        require(
            isinstance(answer_tag, str) and bool(answer_tag),
            f"{o}.answer_tag",
            "a non-empty string",
            answer_tag,
        )
        self.answer_tag = answer_tag
        self.record_trees = check_bool(record_trees, f"{o}.record_trees")
        #: the last run's trees (only with ``record_trees``), in problem order
        self.trees: list[SearchTree] = []

    # ------------------------------------------------------------------ public API
    def run(self, problems: Sequence[Problem], sampler: Sampler, env: Env) -> RolloutOutput:
        if not problems:
            return RolloutOutput([], {}, 0)
        tok: Any = sampler.tokenizer
        version = sampler.version
        cap = self.max_new_tokens
        draw = sampler.sample_with_entropy if self.forks.needs_entropy else sampler.sample
        prompts = [encode_prompt(env, p, tok) for p in problems]
        grades: list[dict[tuple[int, ...], Score]] = [{} for _ in problems]

        def graded(i: int, path: SampledPath) -> Score:
            key = tuple(path.token_ids)
            if key not in grades[i]:  # one grade per distinct completion
                grades[i][key] = env.score(decode_completion(tok, path.token_ids), problems[i])
            return grades[i][key]

        # 1. the chains
        outs = draw(prompts, n=self.chains, max_new_tokens=cap, stop="answer")
        tokens = [sum(len(c.token_ids) for c in conts) for conts in outs]
        chain_tokens = sum(tokens)
        paths = [[self._path(sampler, c, [], [], [], 0, 0) for c in conts] for conts in outs]
        # 2. the gate
        forked = [self.gate([graded(i, p) for p in paths[i]]) for i in range(len(problems))]
        # 3. the forks
        frontier = [list(paths[i]) if forked[i] else [] for i in range(len(problems))]
        seen: list[set[tuple[int, ...]]] = [set() for _ in problems]  # prefixes forked from
        forks_made: list[tuple[int, int]] = []  # (fork position, length of the path it forked)
        for r in range(1, self.rounds + 1):
            requests: list[tuple[int, SampledPath, int]] = []
            for i, front in enumerate(frontier):
                for path in front:
                    lo, hi = max(self.min_prefix, path.start + 1), path.answer_start
                    for t in self.forks.choose(path, self.forks_per_chain, lo, hi):
                        key = tuple(path.token_ids[:t])
                        if key not in seen[i]:
                            seen[i].add(key)
                            requests.append((i, path, t))
            if not requests:
                break
            states = [prompts[i] + path.token_ids[:t] for i, path, t in requests]
            exclude = (
                [self._below(paths[i], path.token_ids[:t]) for i, path, t in requests]
                if self.without_replacement
                else None
            )
            outs = draw(
                states,
                n=self.branches,
                max_new_tokens=max(cap - t for _, _, t in requests),
                stop="answer",
                exclude=exclude,
            )
            frontier = [[] for _ in problems]
            for (i, parent, t), conts in zip(requests, outs):
                for c in conts:
                    tokens[i] += len(c.token_ids)  # paid, even past the cap
                    branch = self._path(sampler, c, parent.token_ids[:t], parent.logprobs[:t],
                                        parent.entropies[:t] if parent.entropies is not None else None,
                                        t, r)  # fmt: skip
                    paths[i].append(branch)
                    frontier[i].append(branch)
                    forks_made.append((t, len(parent.token_ids)))
        # 4. the trees, graded, emitted
        trees: list[SearchTree] = []
        trajectories: list[Trajectory] = []
        for i, problem in enumerate(problems):
            tree, ends = tree_from_paths(prompts[i], paths[i], cap)
            for path, end in zip(paths[i], ends):
                if end.reward is None:
                    s = graded(i, path)
                    end.reward, end.correct = float(s.dense), bool(s.correct)
            tree.generated_tokens = tokens[i]
            trees.append(tree)
            trajectories += self._emit(problem, tree, version)
        if sampler.version != version:  # a trajectory must come from one set of weights
            raise RuntimeError(
                f"EPTreeRollout: the sampler's weights changed during the rollout (version {version} -> "
                f"{sampler.version}); load weights between rollouts"
            )
        self.trees = trees if self.record_trees else []
        stats = self._stats(problems, trees, trajectories, forked, forks_made, chain_tokens, paths)
        return RolloutOutput(trajectories, stats, generated_tokens=sum(tokens))

    # ------------------------------------------------------------------ internals
    def _path(
        self,
        sampler: Sampler,
        c: Continuation,
        prefix: list[int],
        prefix_lps: list[float],
        prefix_ents: list[float] | None,
        start: int,
        round_: int,
    ) -> SampledPath:
        """The whole path ``prefix + c`` (``c`` cut to the token cap left after the prefix)."""
        ids, lps, fin = list(c.token_ids), list(c.logprobs), str(c.finish_reason)
        ents = list(c.entropies) if c.entropies is not None else None
        room = self.max_new_tokens - len(prefix)
        if len(ids) > room:  # the prefix's log-probs stand: sampling is left to right
            ids, lps, fin = ids[:room], lps[:room], "length"
            ents = ents[:room] if ents is not None else None
        ids, lps = prefix + ids, prefix_lps + lps
        ents = prefix_ents + ents if prefix_ents is not None and ents is not None else None
        whole = Continuation(ids, lps, fin)  # type: ignore[arg-type]
        starts, at = [], 0
        for piece in sampler.split_steps(whole)[:-1]:
            at += len(piece.token_ids)
            starts.append(at)
        return SampledPath(ids, lps, fin, start, round_, ents, starts, self._answer_start(sampler, ids))

    def _answer_start(self, sampler: Sampler, ids: list[int]) -> int:
        """The first token of the answer span: the smallest ``t`` whose decoded prefix
        ``ids[:t + 1]`` contains ``answer_tag`` (binary search: containment only grows with ``t``);
        ``len(ids)`` when there is none."""
        tok: Any = sampler.tokenizer

        def has(t: int) -> bool:
            return self.answer_tag in tok.decode(ids[: t + 1], skip_special_tokens=False)

        if not ids or not has(len(ids) - 1):
            return len(ids)
        lo, hi = 0, len(ids) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if has(mid):
                hi = mid
            else:
                lo = mid + 1
        return lo

    @staticmethod
    def _below(paths: Sequence[SampledPath], prefix: list[int]) -> list[Continuation]:
        """The continuations the tree already holds below ``prefix`` (distinct), as a fork excludes them."""
        t, out, seen = len(prefix), [], set()
        for q in paths:
            if q.token_ids[:t] == prefix and len(q.token_ids) > t and tuple(q.token_ids) not in seen:
                seen.add(tuple(q.token_ids))
                out.append(Continuation(q.token_ids[t:], q.logprobs[t:], q.finish_reason))  # type: ignore[arg-type]
        return out

    def _emit(self, problem: Problem, tree: SearchTree, version: int) -> list[Trajectory]:
        """Every target of the emission as a trajectory (as :class:`~tsd.rollouts.mcts.MCTSRollout`'s
        tree emission writes them)."""
        return tree_trajectories(problem, tree, self.emission, version, self.name)

    def _stats(
        self,
        problems: Sequence[Problem],
        trees: Sequence[SearchTree],
        trajectories: Sequence[Trajectory],
        forked: Sequence[bool],
        forks_made: Sequence[tuple[int, int]],
        chain_tokens: int,
        paths: Sequence[Sequence[SampledPath]],
    ) -> dict[str, float]:
        n = len(problems)
        tokens = sum(t.generated_tokens for t in trees)
        return {
            **whole_tree_stats(trees, trajectories, n),
            "rollout/nonzero_advantage_token_fraction": nonzero_advantage_fraction(trajectories),
            **shape_stats(trees),
            "search/forked_problem_fraction": sum(forked) / n,
            "search/forks_per_problem": len(forks_made) / n,
            # where forks start, in completion tokens, and as a share of the path they forked
            "search/fork_position_mean": statistics.fmean(t for t, _ in forks_made) if forks_made else 0.0,
            "search/fork_position_relative": (
                statistics.fmean(t / max(1, m) for t, m in forks_made) if forks_made else 0.0
            ),
            "search/chain_token_share": chain_tokens / max(1, tokens),
            "search/duplicate_paths_per_problem": sum(
                len(p) - len({tuple(q.token_ids) for q in p}) for p in paths
            )
            / n,
            "search/sampler_tokens_per_problem": tokens / n,
        }
