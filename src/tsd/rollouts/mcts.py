"""MCTS over reasoning steps with N parallel workers per tree (seed article; DESIGN.md "MCTS").

    python scripts/draw_tree.py --problems 3            # search, then draw each tree
    python scripts/search_efficiency.py                 # correct share against generated tokens, vs best-of-N
    python benchmarks/bench_mcts.py                     # simulations/s for N = 1, 4, 16 workers

The root is the prompt, a node is one reasoning step (tokens up to and including ``</step>``)
and a terminal node holds the answer or ends the sequence (:mod:`tsd.rollouts.tree` has the pure
tree logic: pUCT, virtual loss, progressive widening, expansion with merged duplicates, backup;
:mod:`tsd.rollouts.selection` the rules that pick the emitted trajectory).

One *wave* is one iteration of every worker on every tree of the batch:

1. select: for each tree, each of the N workers in turn descends by pUCT to where its simulation
   stops (a terminal, a node never sampled from, or a node with room to widen: at most
   ``ceil(K * N(s)^alpha)`` samples) and applies virtual loss on its path, which steers the next
   workers elsewhere;
2. evaluate, in one of two ways (``rollout_mix``):

   - ``rollout_mix = 0`` (the article): ONE ``sampler.sample_and_value(states, n=K, stop="step")``
     call expands every distinct stopping node of the wave (all workers, all trees: the widest
     batch the sampler can get) and values the same states with the value head, read from the
     pass that starts their sampling; with widening (``alpha > 0``) a node that already has
     children draws the samples it has room for in one more call of the same wave. Two workers
     that stop at the same node share its expansion and both back up its value;
   - ``rollout_mix > 0``: each simulation samples ONE path from where it stopped down to an
     answer, in ONE sampler call for every worker of every tree (``stop="answer"``; the first
     step drawn without replacement when ``without_replacement``), cut into its steps afterwards
     with their exact log-probs, and every step becomes a node (identical steps merge), so the
     rollout's tokens stay in the tree and later simulations branch from its intermediate steps. Its value is
     ``(1 - lambda) * V(s_L) + lambda * z`` (AlphaGo, Silver et al. 2016): ``z`` the dense reward
     of the terminal it reached, ``s_L`` the first node it created (``z`` alone when that is the
     terminal). Every simulation ends on a graded answer, as every best-of-N sample does, but
     samples that share a prefix pay for it once;

   a terminal where selection stops is valued by its dense reward, graded once on its first
   visit and cached on the node;
3. backup: each worker takes its virtual loss off its path and adds one visit and its value to
   every node on it (with rollouts: down to the terminal it reached), once.

M iterations are therefore M waves and N*M simulations per tree. After M waves every terminal is
graded (no tokens), and what is emitted is one of two things (``emission``):

- the article's one path per problem (``emission=None``): the selection rule (``max_visit``, the
  article's; ``best_terminal``; ``max_q``) picks it, it is completed with one ``stop="answer"``
  sample if it ends short of a terminal, graded, and emitted with the behaviour log-probs the
  sampler recorded for every token; ``advantage`` is left ``None``, so the trainer uses the value
  baseline ``A_t = r - sg(V_old(s_t))``;
- the whole tree (``rollout/emission=tree``, :mod:`tsd.rollouts.tree_targets`): the path of every
  graded answer, each token carrying the advantage of its step computed from the tree's values
  (``token_advantages``; no value baseline).
"""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tsd.config import check_bool, check_int, check_number, require
from tsd.envs.base import Env, Problem
from tsd.rl.trajectory import Trajectory
from tsd.rollouts.base import (
    Rollout,
    RolloutOutput,
    encode_prompt,
    grade,
    mean_problem_stats,
    problem_stats,
)
from tsd.rollouts.selection import MaxVisit
from tsd.rollouts.tree import Node, SearchTree
from tsd.rollouts.tree_stats import whole_tree_stats
from tsd.rollouts.tree_targets import TreePaths, graded_terminals, tree_trajectories
from tsd.samplers.base import Continuation, Sampler


@dataclass
class SearchCounters:
    """What one :meth:`MCTSRollout.run` did, for ``search/*`` statistics."""

    waves: int = 0
    simulations: int = 0
    terminal_evaluations: int = 0
    #: simulations whose selection stopped on a terminal graded before (no new information)
    cached_terminal_hits: int = 0
    grades: int = 0
    expansions: int = 0
    sample_calls: int = 0
    value_calls: int = 0
    search_tokens: int = 0
    completion_tokens: int = 0
    #: sampled tokens that ended in no node (past a terminal of a rollout path): paid, not kept
    discarded_tokens: int = 0
    #: draws where the sampler found every token excluded and drew from the policy: a paid repeat
    exhausted_draws: int = 0
    #: samples whose step (a rollout path's first step) landed in a child the node already had or
    #: one drawn beside it in the same call: paid tokens, no new child. Without replacement a draw
    #: never repeats the children its node had when the call was made, but the samples of one call
    #: at one node (the K of an expansion, or the workers that stopped there in one wave) are drawn
    #: independently of each other and may repeat each other
    repeated_steps: int = 0
    #: the tokens of those samples' repeated steps
    repeated_step_tokens: int = 0
    #: rows (state x continuation) of each search ``sample`` call
    sample_widths: list[int] = field(default_factory=list)
    #: nodes created in each wave, all trees together
    new_nodes_per_wave: list[int] = field(default_factory=list)
    #: depth (steps below the root) of every node sampled from because a simulation stopped there
    branch_depths: list[int] = field(default_factory=list)


class MCTSRollout(Rollout):
    """Parallel MCTS over reasoning steps; one trajectory per problem."""

    name = "mcts"

    def __init__(
        self,
        workers: int = 16,
        completions_per_node: int = 4,
        iterations: int = 100,
        c_puct: float = 0.5,
        virtual_loss: float = 1.0,
        unvisited_value: float = 0.0,
        max_step_tokens: int = 64,
        max_depth: int = 12,
        max_new_tokens: int = 256,
        widening_alpha: float = 0.0,
        prior_temperature: float = 1.0,
        rollout_mix: float = 0.0,
        min_unseen_mass: float = 0.0,
        skip_exhausted: bool = False,
        unseen_as_child: bool = False,
        without_replacement: bool = False,
        selection: Callable[[SearchTree], list[Node]] | None = None,
        emission: TreePaths | None = None,
        temperature: float | None = None,
        seed: int = 0,
        record_trees: bool = False,
    ) -> None:
        """
        Args:
            workers: N, workers sharing one tree, each selecting one leaf per wave (article: 16).
            completions_per_node: K, samples drawn at a node before selection descends past it
                (the article's K continuations per expansion: 4); with widening, ``k0``.
            iterations: M, waves per tree; N*M simulations per tree (article: 100).
            c_puct: exploration weight of pUCT (article: 0.5).
            virtual_loss: added to N and taken off W along a selected path until its backup
                (article: 1); 0 turns it off (then a wave's workers all follow one path).
            unvisited_value: Q of a child never visited, in [-1, 1] (article: 0).
            max_step_tokens: token cap of one step; a step that does not close by then ends the
                branch (terminal, finish ``length``) and is graded as it stands.
            max_depth: steps from the root after which a node is terminal.
            max_new_tokens: token cap of the whole completion (search + final completion).
            widening_alpha: progressive widening exponent, ``>= 0``: a node may draw up to
                ``ceil(K * N(s)^alpha)`` samples (Coulom 2007); 0 = the article's fixed K.
            prior_temperature: priors are ``softmax(summed log-probs / prior_temperature)``,
                ``> 0``; 1 = the article's; larger flattens peaked priors.
            rollout_mix: lambda in ``[0, 1]``: 0 = the article's leaf value, the value head
                alone (K one-step children per expansion); > 0 = each simulation samples one path
                to a terminal, keeps its steps as nodes and backs up
                ``(1 - lambda) * V(new leaf) + lambda * reward``.
            min_unseen_mass: in ``[0, 1)``: a node whose children already hold all but this much
                of the sampler's probability for its next step is not widened (one more sample
                would almost surely repeat a child); 0 = off (the article's).
            skip_exhausted: selection passes over graded terminals and subtrees that can yield
                nothing new, and a tree whose root is exhausted stops searching (the article's
                search re-reads cached terminal rewards: False).
            unseen_as_child: widen by value, not by count: priors are the steps' own
                probabilities, and the probability mass not sampled yet at a node is one more
                pUCT action (prior = that mass, Q = the node's mean value); selection stops to
                sample a new step where that action wins. ``completions_per_node`` and
                ``widening_alpha`` then play no part (False: the article's fixed K).
            without_replacement: a node's new samples never repeat a step already among its
                children when they are drawn: the sampler draws from the policy conditioned on a
                new step (the unseen mass); behaviour log-probs stay the policy's own (False: the
                article's). The samples of one call at one node (the K of an expansion, the
                workers that stopped at the node in one wave) are drawn independently of each
                other, so they can repeat each other (merged into one child, paid): counted in
                ``search/repeated_step_tokens_per_problem``, with draws where nothing was left
                (``search/exhausted_draws_per_problem``).
            selection: the rule that picks the emitted path (:mod:`tsd.rollouts.selection`);
                ``None`` = :class:`~tsd.rollouts.selection.MaxVisit`, the article's.
            emission: ``None`` (the article's): one trajectory per problem, the path ``selection``
                picks, trained with the value baseline. A
                :class:`~tsd.rollouts.tree_targets.TreePaths`: the path of every graded answer in
                the tree (up to its ``max_paths``), each token carrying its step's advantage
                computed from the tree (``selection`` then plays no part).
            temperature: informational only: the sampler's temperature is what samples; a
                mismatch warns.
            seed: recorded for the run's provenance. The search itself draws no random numbers
                (ties break by prior, then index), so the tree is a function of the sampler's
                outputs: seed the sampler for a reproducible tree.
            record_trees: keep the last run's trees in :attr:`trees` (``tree.to_dict()`` exports).
        """
        o = "MCTSRollout"
        self.workers = check_int(workers, f"{o}.workers", low=1)
        self.completions_per_node = check_int(completions_per_node, f"{o}.completions_per_node", low=1)
        self.iterations = check_int(iterations, f"{o}.iterations", low=1)
        self.c_puct = check_number(c_puct, f"{o}.c_puct", low=0.0)
        self.virtual_loss = check_number(virtual_loss, f"{o}.virtual_loss", low=0.0)
        self.unvisited_value = check_number(unvisited_value, f"{o}.unvisited_value", low=-1.0, high=1.0)
        self.max_step_tokens = check_int(max_step_tokens, f"{o}.max_step_tokens", low=1)
        self.max_depth = check_int(max_depth, f"{o}.max_depth", low=1)
        self.max_new_tokens = check_int(max_new_tokens, f"{o}.max_new_tokens", low=1)
        self.widening_alpha = check_number(widening_alpha, f"{o}.widening_alpha", low=0.0, high=1.0)
        self.prior_temperature = check_number(prior_temperature, f"{o}.prior_temperature", low=1e-3, high=1e3)
        self.rollout_mix = check_number(rollout_mix, f"{o}.rollout_mix", low=0.0, high=1.0)
        self.min_unseen_mass = check_number(min_unseen_mass, f"{o}.min_unseen_mass", low=0.0, high=0.999)
        self.skip_exhausted = check_bool(skip_exhausted, f"{o}.skip_exhausted")
        self.unseen_as_child = check_bool(unseen_as_child, f"{o}.unseen_as_child")
        self.without_replacement = check_bool(without_replacement, f"{o}.without_replacement")
        require(
            selection is None or callable(selection),
            f"{o}.selection",
            "a rule from tsd.rollouts.selection",
            selection,
        )
        self.selection = selection if selection is not None else MaxVisit()
        require(
            emission is None or isinstance(emission, TreePaths),
            f"{o}.emission",
            "null (one path) or a tsd.rollouts.tree_targets.TreePaths",
            type(emission).__name__,
        )
        self.emission = emission
        self.temperature = (
            None if temperature is None else check_number(temperature, f"{o}.temperature", low=0)
        )
        self.seed = check_int(seed, f"{o}.seed")
        self.record_trees = check_bool(record_trees, f"{o}.record_trees")
        #: the last run's trees (only with ``record_trees``), in problem order
        self.trees: list[SearchTree] = []

    # ------------------------------------------------------------------ public API
    @property
    def sequences_per_problem(self) -> int:
        """A wave: N workers, K samples each (the memory plan's unit)."""
        return self.workers * self.completions_per_node

    def run(
        self,
        problems: Sequence[Problem],
        sampler: Sampler,
        env: Env,
        *,
        on_wave: Callable[[int, list[SearchTree], SearchCounters], None] | None = None,
    ) -> RolloutOutput:
        """Search every problem's tree in shared waves, then emit one trajectory per problem.
        ``on_wave(wave_index, trees, counters)`` is called after each wave (progress printing)."""
        if not problems:
            return RolloutOutput([], {}, 0)
        if self.temperature is not None and abs(self.temperature - float(sampler.temperature)) > 1e-9:
            warnings.warn(
                f"MCTSRollout.temperature={self.temperature} is informational; the sampler samples at "
                f"{sampler.temperature}",
                stacklevel=2,
            )
        tok: Any = sampler.tokenizer
        version = sampler.version
        c = SearchCounters()
        exhausted0 = sampler.exhausted_draws
        trees = [self.new_tree(encode_prompt(env, p, tok)) for p in problems]
        if self.record_trees:
            for t in trees:
                t.decode = lambda ids: tok.decode(ids, skip_special_tokens=False)

        def grade_node(i: int, node: Node) -> None:
            if node.reward is None:  # once per node, on its first visit
                s = grade(env, problems[i], tok, node.completion_ids())
                node.reward, node.correct = float(s.dense), bool(s.correct)
                c.grades += 1

        self._before_search(trees, sampler, c)
        wave = self.rollout_wave if self.rollout_mix > 0 else self.wave
        for w in range(self.iterations):
            before = sum(len(t.nodes) for t in trees)
            wave(trees, sampler, grade_node, c)
            c.new_nodes_per_wave.append(sum(len(t.nodes) for t in trees) - before)
            if on_wave is not None:
                on_wave(w, trees, c)
            if all(t.root.exhausted for t in trees):  # skip_exhausted: nothing left to find anywhere
                break
        for i, tree in enumerate(trees):  # grading costs no tokens: every answer found is known
            for node in tree.nodes:
                if node.terminal:
                    grade_node(i, node)

        c.exhausted_draws = sampler.exhausted_draws - exhausted0
        if self.emission is None:
            trajectories = self._finish(problems, trees, sampler, env, grade_node, c, version)
        else:
            trajectories = self._emit_tree(problems, trees, self.emission, version)
        if sampler.version != version:  # a trajectory must come from one set of weights
            raise RuntimeError(
                f"MCTSRollout: the sampler's weights changed during the search (version {version} -> "
                f"{sampler.version}); load weights between rollouts"
            )
        self.trees = trees if self.record_trees else []
        return RolloutOutput(
            trajectories,
            self._stats(problems, trees, trajectories, c),
            generated_tokens=c.search_tokens + c.completion_tokens,
        )

    def new_tree(self, prompt_ids: Sequence[int]) -> SearchTree:
        return SearchTree(
            prompt_ids,
            c_puct=self.c_puct,
            virtual_loss=self.virtual_loss,
            unvisited_value=self.unvisited_value,
            max_depth=self.max_depth,
            max_tokens=self.max_new_tokens,
            completions_per_node=self.completions_per_node,
            widening_alpha=self.widening_alpha,
            prior_temperature=self.prior_temperature,
            min_unseen_mass=self.min_unseen_mass,
            skip_exhausted=self.skip_exhausted,
            unseen_as_child=self.unseen_as_child,
        )

    def _select(
        self, trees: Sequence[SearchTree], grade_node: Callable[[int, Node], None], c: SearchCounters
    ) -> list[tuple[int, list[Node]]]:
        """Every worker of every tree selects in turn (``(tree index, path)``, virtual loss on);
        terminals where a selection stops are graded (once) and counted."""
        selections: list[tuple[int, list[Node]]] = []
        for i, tree in enumerate(trees):
            if tree.root.exhausted:  # only with skip_exhausted: this tree has nothing left to find
                continue
            for _ in range(self.workers):
                found = self._select_path(i, tree)
                if found is None:
                    break
                path = found
                leaf = path[-1]
                if leaf.terminal:
                    c.terminal_evaluations += 1
                    c.cached_terminal_hits += leaf.reward is not None
                    grade_node(i, leaf)
                else:
                    self._reserve(tree, leaf)
                    c.branch_depths.append(leaf.depth)
                selections.append((i, path))
        return selections

    def _before_search(self, trees: Sequence[SearchTree], sampler: Sampler, counters: SearchCounters) -> None:
        """Called once the trees exist, before the first wave (nothing here; a subclass that
        chooses the root's children itself draws them: :class:`~tsd.rollouts.gumbel.GumbelMCTSRollout`)."""
        return None

    def _select_path(self, index: int, tree: SearchTree) -> list[Node] | None:
        """One worker's selection in tree ``index`` (pUCT from the root, virtual loss on); ``None``
        when a subclass's root rule has nothing left to select this wave."""
        return tree.select_leaf()

    def _reserve(self, tree: SearchTree, leaf: Node) -> None:
        """What a simulation that stopped at the non-terminal ``leaf`` asks of the sampler: the
        article's expansion draws every sample the node has room for (a second worker at the
        same node joins it); a rollout simulation draws its own one."""
        if self.rollout_mix > 0:
            tree.schedule(leaf, 1)
        else:
            m = tree.widen_count(leaf)
            if self.unseen_as_child and leaf.expanded and not leaf.scheduled:
                m = 1  # the unseen-step action won here: one new step
            if m:
                tree.schedule(leaf, m)

    def wave(
        self,
        trees: Sequence[SearchTree],
        sampler: Sampler,
        grade_node: Callable[[int, Node], None],
        counters: SearchCounters,
    ) -> None:
        """One iteration of every worker on every tree, the article's way: select (with virtual
        loss), expand every distinct stopping node and value it with the value head (one
        ``sample_and_value`` call per distinct number of samples asked: one call without
        widening), back up."""
        c = counters
        selections = self._select(trees, grade_node, c)
        # distinct stopping nodes with samples to draw, first-selected order (deterministic)
        pending: dict[tuple[int, int], tuple[int, Node]] = {}
        for i, path in selections:
            leaf = path[-1]
            if leaf.scheduled:
                pending.setdefault((i, leaf.id), (i, leaf))
        by_count: dict[int, list[tuple[int, Node]]] = {}
        for i, leaf in pending.values():
            by_count.setdefault(leaf.scheduled, []).append((i, leaf))
        for n, leaves in by_count.items():
            states = [trees[i].prompt_ids + leaf.completion_ids() for i, leaf in leaves]
            budget = max(self.max_new_tokens - leaf.num_tokens for _, leaf in leaves)
            outs, values = sampler.sample_and_value(
                states,
                n=n,
                max_new_tokens=min(self.max_step_tokens, budget),
                stop="step",
                exclude=[leaf.children for _, leaf in leaves] if self.without_replacement else None,
            )
            c.sample_calls += 1
            c.value_calls += 1
            c.sample_widths.append(len(states) * n)
            for (i, leaf), conts, v in zip(leaves, outs, values):
                tokens = sum(len(x.token_ids) for x in conts)
                c.search_tokens += tokens
                trees[i].generated_tokens += tokens
                leaf.value_estimate = min(1.0, max(-1.0, float(v)))
                c.expansions += not leaf.expanded
                had = {id(x) for x in leaf.children}
                for child in trees[i].add_samples(leaf, conts):
                    if id(child) in had:  # an old child, or a sibling drawn earlier in this call
                        c.repeated_steps += 1
                        c.repeated_step_tokens += len(child.token_ids)
                    had.add(id(child))
                leaf.scheduled = 0

        for i, path in selections:
            leaf = path[-1]
            value = leaf.reward if leaf.terminal else leaf.value_estimate
            assert value is not None  # graded or valued above
            trees[i].backup(path, value)
            c.simulations += 1
        c.waves += 1

    def rollout_wave(
        self,
        trees: Sequence[SearchTree],
        sampler: Sampler,
        grade_node: Callable[[int, Node], None],
        counters: SearchCounters,
    ) -> None:
        """One iteration of every worker on every tree with rollout values: select (with
        virtual loss); from every non-terminal stopping node sample one path to an answer, all
        simulations of all trees in ONE ``stop="answer"`` sampler call (its first step drawn
        without replacement among the node's children when ``without_replacement``; below a new
        node nothing is excluded, exactly as step-by-step calls would sample); cut each path into
        its steps (:meth:`~tsd.samplers.base.Sampler.split_steps`, each capped at
        ``max_step_tokens``), each step a node; grade the terminals; back up
        ``(1 - lambda) * V(first new node) + lambda * reward`` along root ... terminal."""
        c = counters
        selections = self._select(trees, grade_node, c)
        ends = [path[-1] for _, path in selections]  # where each simulation's path is now
        first_new: list[Node | None] = [None] * len(selections)
        chains: list[list[Node]] = [[] for _ in selections]
        live = [s for s, node in enumerate(ends) if not node.terminal]
        if live:
            starts = [ends[s] for s in live]
            states = [
                trees[selections[s][0]].prompt_ids + node.completion_ids() for s, node in zip(live, starts)
            ]
            outs, values = sampler.sample_and_value(
                states,
                n=1,
                max_new_tokens=max(self.max_new_tokens - node.num_tokens for node in starts),
                stop="answer",
                exclude=[node.children for node in starts] if self.without_replacement else None,
            )
            c.sample_calls += 1
            c.value_calls += 1
            c.sample_widths.append(len(states))
            for s, node, (cont,), v in zip(live, starts, outs, values):
                i = selections[s][0]
                tokens = len(cont.token_ids)
                c.search_tokens += tokens
                trees[i].generated_tokens += tokens
                node.value_estimate = min(1.0, max(-1.0, float(v)))
                c.expansions += not node.expanded
                n_before = len(trees[i].nodes)
                chain = trees[i].add_path(node, self._steps(sampler, cont))
                # tokens sampled past the end of the path (a step over max_step_tokens, a node at
                # max_depth): paid for, in no node
                c.discarded_tokens += tokens - (chain[-1].num_tokens - node.num_tokens)
                if chain[0].id < n_before:  # the first step was a child the node had: a repeat
                    c.repeated_steps += 1
                    c.repeated_step_tokens += len(chain[0].token_ids)
                chains[s], ends[s] = chain, chain[-1]
                created = trees[i].nodes[n_before:]
                first_new[s] = created[0] if created else None
        for path in (p for _, p in selections):
            path[-1].scheduled = 0

        lam = self.rollout_mix
        if lam < 1:  # V(first new node) of the simulations that need it: one value-head call
            need = [s for s, leaf in enumerate(first_new) if leaf is not None and not leaf.terminal]
            if need:
                vals = sampler.value(
                    [trees[selections[s][0]].prompt_ids + first_new[s].completion_ids() for s in need]  # type: ignore[union-attr]
                )
                c.value_calls += 1
                for s, v in zip(need, vals):
                    first_new[s].value_estimate = min(1.0, max(-1.0, float(v)))  # type: ignore[union-attr]
        for s, (i, path) in enumerate(selections):
            end = ends[s]
            grade_node(i, end)
            z = end.reward
            assert z is not None
            leaf = first_new[s]
            if lam == 1 or leaf is None or leaf.terminal:
                value = z
            else:
                assert leaf.value_estimate is not None  # valued above
                value = (1 - lam) * leaf.value_estimate + lam * z
            trees[i].undo_virtual_loss(path)
            trees[i].backup(path + chains[s], value, virtual_loss_applied=False)
            c.simulations += 1
        c.waves += 1

    def _steps(self, sampler: Sampler, cont: Continuation) -> list[Continuation]:
        """A sampled path as the steps a step-by-step search would have made of it: split at the
        step stops, a step longer than ``max_step_tokens`` cut there (finish ``length``: the branch
        ends, as a step call capped at ``max_step_tokens`` would have ended it) and nothing after."""
        steps = []
        for step in sampler.split_steps(cont):
            if len(step.token_ids) > self.max_step_tokens:
                cap = self.max_step_tokens
                steps.append(Continuation(step.token_ids[:cap], step.logprobs[:cap], "length"))
                break
            steps.append(step)
        return steps

    # ------------------------------------------------------------------ trajectory selection
    def _finish(
        self,
        problems: Sequence[Problem],
        trees: Sequence[SearchTree],
        sampler: Sampler,
        env: Env,
        grade_node: Callable[[int, Node], None],
        c: SearchCounters,
        version: int,
    ) -> list[Trajectory]:
        tok = sampler.tokenizer
        paths = [self.selection(t) for t in trees]
        for t, p in zip(trees, paths):
            t.chosen = p
        # complete every chosen path that stops short of a terminal, in one sample call
        todo = [i for i, p in enumerate(paths) if not p[-1].terminal]
        completions: dict[int, Continuation] = {}
        if todo:
            budgets = [self.max_new_tokens - paths[i][-1].num_tokens for i in todo]
            states = [trees[i].prompt_ids + paths[i][-1].completion_ids() for i in todo]
            outs = sampler.sample(states, n=1, max_new_tokens=max(budgets), stop="answer")
            for i, b, out in zip(todo, budgets, outs):
                x = out[0]
                c.completion_tokens += len(x.token_ids)
                trees[i].generated_tokens += len(x.token_ids)
                if len(x.token_ids) > b:  # same cut as in expansion: the prefix's log-probs stand
                    x = Continuation(x.token_ids[:b], x.logprobs[:b], "length")
                completions[i] = x

        trajectories = []
        for i, (problem, tree, path) in enumerate(zip(problems, trees, paths)):
            last = path[-1]
            ids, lps = last.completion_ids(), last.completion_logprobs()
            reward: float | None
            correct: bool | None
            finish: str | None
            found = any(n.correct for n in tree.nodes if n.terminal)
            if i in completions:
                x = completions[i]
                ids, lps = ids + list(x.token_ids), lps + list(x.logprobs)
                s = grade(env, problem, tok, ids)
                c.grades += 1
                reward, correct, finish = float(s.dense), bool(s.correct), x.finish_reason
                found = found or correct
            else:
                grade_node(i, last)  # cached: every terminal was graded after the search
                reward, correct, finish = last.reward, last.correct, last.terminal_reason
            assert reward is not None and correct is not None
            root = tree.root
            trajectories.append(
                Trajectory(
                    problem_id=problem.id,
                    prompt_ids=list(tree.prompt_ids),
                    completion_ids=ids,
                    behaviour_logprobs=[float(v) for v in lps],
                    reward=reward,
                    correct=correct,
                    policy_version=version,
                    rollout=self.name,
                    advantage=None,
                    finish_reason=str(finish),
                    stats={
                        "search/tree_size": float(len(tree.nodes)),
                        "search/chosen_depth": float(last.depth),
                        "search/chosen_visits": float(last.visits),
                        "search/chosen_q": last.q(self.unvisited_value),
                        "search/root_q": root.q(self.unvisited_value),
                        "search/completed": float(i in completions),
                        **problem_stats(
                            tokens=tree.generated_tokens,
                            correct_found=found,
                            distinct_completions=sum(n.terminal for n in tree.nodes) + (i in completions),
                        ),
                    },
                )
            )
        return trajectories

    def _emit_tree(
        self, problems: Sequence[Problem], trees: Sequence[SearchTree], emission: TreePaths, version: int
    ) -> list[Trajectory]:
        """Every tree's graded answers as trajectories (:func:`~tsd.rollouts.tree_targets.tree_trajectories`);
        a tree without one emits nothing (``search/trees_without_answer``)."""
        trajectories = []
        for problem, tree in zip(problems, trees):
            trajectories += tree_trajectories(problem, tree, emission, version, self.name, visits=True)
        return trajectories

    def _stats(
        self,
        problems: Sequence[Problem],
        trees: Sequence[SearchTree],
        trajectories: Sequence[Trajectory],
        c: SearchCounters,
    ) -> dict[str, float]:
        n = len(problems)
        widths = [w for t in trees for w in t.expansion_widths]
        waves = c.new_nodes_per_wave
        out = {
            "search/tree_size": statistics.fmean(len(t.nodes) for t in trees),
            "search/distinct_children_per_expansion": statistics.fmean(widths) if widths else 0.0,
            "search/root_visit_entropy": statistics.fmean(t.root_visit_entropy() for t in trees),
            "search/root_prior_visit_kl": statistics.fmean(t.root_prior_visit_kl() for t in trees),
            "search/root_max_prior": statistics.fmean(
                max((k.prior for k in t.root.children), default=1.0) for t in trees
            ),
            # per simulation: the share of leaves that were terminal (graded, not value-headed)
            "search/terminal_fraction": c.terminal_evaluations / max(1, c.simulations),
            # ... and of those, terminals graded before: the simulation learnt nothing new
            "search/cached_terminal_fraction": c.cached_terminal_hits / max(1, c.simulations),
            "search/distinct_terminals": statistics.fmean(sum(x.terminal for x in t.nodes) for t in trees),
            "search/correct_found": statistics.fmean(
                float(any(x.correct for x in t.nodes if x.terminal)) for t in trees
            ),
            # where simulations branch: 0 = a new first step at the root (what best-of-N does)
            "search/branch_depth_mean": statistics.fmean(c.branch_depths) if c.branch_depths else 0.0,
            "search/root_branch_fraction": (
                sum(d == 0 for d in c.branch_depths) / len(c.branch_depths) if c.branch_depths else 0.0
            ),
            "search/new_nodes_per_wave_first": waves[0] / n if waves else 0.0,
            "search/new_nodes_per_wave_last": waves[-1] / n if waves else 0.0,
            "search/waves": float(c.waves),
            "search/simulations_per_problem": c.simulations / n,
            "search/exhausted_fraction": statistics.fmean(float(t.root.exhausted) for t in trees),
            "search/sampler_tokens_per_problem": (c.search_tokens + c.completion_tokens) / n,
            "search/grades_per_problem": c.grades / n,
            "search/discarded_tokens_per_problem": c.discarded_tokens / n,
            "search/exhausted_draws_per_problem": c.exhausted_draws / n,
            "search/repeated_steps_per_problem": c.repeated_steps / n,
            "search/repeated_step_tokens_per_problem": c.repeated_step_tokens / n,
            "search/sample_calls": float(c.sample_calls),
        }
        if self.emission is None:  # one path per problem
            return {
                "rollout/reward_mean": statistics.fmean(t.reward for t in trajectories),
                "rollout/correct_mean": statistics.fmean(float(t.correct) for t in trajectories),
                **mean_problem_stats(trajectories),
                **out,
                "search/chosen_depth": statistics.fmean(len(t.chosen) - 1 for t in trees),
                "search/chosen_reward": statistics.fmean(t.reward for t in trajectories),
                "search/chosen_completed_fraction": statistics.fmean(
                    t.stats["search/completed"] for t in trajectories
                ),
            }
        # the whole tree: per problem from the trees, per path from what is emitted
        ends = [graded_terminals(t) for t in trees]
        return {
            **whole_tree_stats(trees, trajectories, n),
            **out,
            # paths that carry no policy gradient (every step's advantage 0: e.g. all answers equal)
            "rollout/zero_advantage_path_fraction": (
                statistics.fmean(float(not any(t.token_advantages or [])) for t in trajectories)
                if trajectories
                else 0.0
            ),
            "search/trees_without_answer": sum(not e for e in ends) / n,
        }
