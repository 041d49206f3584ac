"""The MCTS search tree over reasoning steps: pUCT selection, virtual loss, expansion, backup.

Pure logic, no model and no env: :class:`tsd.rollouts.mcts.MCTSRollout` drives it with a sampler.
Everything here is single-agent with values in [-1, 1] (no sign flips between levels).

- pUCT (AlphaZero, Silver et al. 2017): ``score(s, a) = Q(s, a) + c_puct * P(s, a) * sqrt(N(s)) / (1 + N(s, a))``
  with ``Q(s, a) = W(s, a) / N(s, a)``, and ``Q = unvisited_value`` while ``N(s, a) == 0``. Ties go
  to the larger prior, then the lower child index, so a search is a function of its inputs only.
- Virtual loss (Chaslot et al. 2008; AlphaGo): a worker that selects a path adds ``virtual_loss``
  to ``N`` and subtracts it from ``W`` of every node on it, so the next worker of the same wave is
  steered elsewhere; :meth:`SearchTree.backup` takes exactly that back off before adding the real
  visit and value. After a wave every node's ``N`` is again an integer count of simulations.
- Backup: each simulation adds ONE visit and ONE value to every node on its path, root included,
  so ``root.visits == simulations`` and ``root.value_sum == sum of backed-up values`` (the
  article's public code adds a freshly expanded leaf's value twice; tests pin that we don't).
- Expansion: sampled continuations become the children; priors are the softmax of each one's
  summed log-probs (divided by ``prior_temperature``), and identical continuations (same token
  ids) are ONE child holding their summed softmax mass (= softmax over distinct children of
  logsumexp of the copies' log-probs). Priors are renormalised over every sample drawn at a node
  whenever more arrive.
- Progressive widening (Coulom 2007; Couëtoux et al. 2011): a node may have drawn at most
  ``ceil(k0 * max(1, N(s))^alpha)`` samples, ``k0 = completions_per_node`` and ``N(s)`` its
  completed simulations (virtual loss excluded). ``alpha = 0`` is the article's fixed K: a leaf is
  expanded once with K samples and never again. With ``alpha > 0`` a node that has room is a place
  where selection stops and more samples are drawn, so visits buy new children instead of
  re-reading the same ones.
- Unseen mass: the sampler records every step's exact probability, so the probability that one
  more sample at a node is a step not yet in the tree is known exactly,
  ``1 - sum_children exp(sum of the child's log-probs)``. A node whose unseen mass is below
  ``min_unseen_mass`` is not widened (another sample would almost surely be a duplicate: paid
  tokens, no new child).
- Exhausted subtrees: with ``skip_exhausted`` selection passes over graded terminals and subtrees
  that may never widen again, so no simulation is spent re-reading a cached reward; a search
  whose root is exhausted stops early. "May never widen" is the search's own rule, not the
  policy's: with a fixed K (the article's, ``widening_alpha = 0``) a node that has drawn its K
  samples never widens, however much of its step distribution is left unsampled (80% with peaked
  priors), so once its children are exhausted it is too; with widening or ``unseen_as_child`` a
  node is exhausted only when less than ``min_unseen_mass`` (at least ``SPENT_MASS``) of its step
  distribution is left unsampled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tsd.samplers.base import EXHAUSTED_MASS

#: unsampled probability below which a node cannot widen whatever ``min_unseen_mass`` says: what
#: is left is rounding of the recorded log-probs. It is the samplers' exhausted-draw threshold
#: itself: at a node with less left, a draw without replacement comes from the policy (a repeat)
SPENT_MASS = EXHAUSTED_MASS


@dataclass
class Node:
    """One state of the search: the root is the prompt; every other node adds one reasoning step
    (the tokens of one sampled continuation) to its parent's state."""

    id: int
    parent: Node | None
    #: tokens of the step on the edge parent -> self (empty for the root)
    token_ids: list[int]
    #: behaviour log-prob of each of those tokens, as recorded by the sampler
    logprobs: list[float]
    #: why the step's continuation stopped (``step|answer|eos|length``); ``None`` for the root
    finish_reason: str | None
    #: P(parent, self)
    prior: float
    #: number of steps from the root
    depth: int
    #: completion tokens from the root up to and including this step
    num_tokens: int
    #: no expansion below: an answer, EOS, a truncated step, or the depth / token budget reached
    terminal: bool = False
    #: why the node is terminal (``answer|eos|length|max_depth|max_tokens``), ``None`` if it isn't
    terminal_reason: str | None = None
    children: list[Node] = field(default_factory=list)
    #: continuations sampled from this state so far, identical copies included (widening counts these)
    samples: int = 0
    #: samples requested from this state in the current wave, not drawn yet
    scheduled: int = 0
    #: workers of the current wave whose virtual loss is on this node
    in_flight: int = 0
    #: (child, summed behaviour log-prob) of every sample drawn here, in draw order (the priors' masses)
    draws: list[tuple[Node, float]] = field(default_factory=list, repr=False)
    #: nothing new can come from this subtree: a graded terminal, or a node that may never widen
    #: again whose children are all exhausted (maintained by :meth:`SearchTree.backup`)
    exhausted: bool = False
    #: N: real visits plus any virtual loss currently applied
    visits: float = 0.0
    #: W: sum of backed-up values minus any virtual loss currently applied
    value_sum: float = 0.0
    #: value-head estimate V(s) of this state, when it was evaluated as a leaf
    value_estimate: float | None = None
    #: dense reward (terminal nodes; graded once, on first visit)
    reward: float | None = None
    correct: bool | None = None
    _step_p: float | None = field(default=None, repr=False, compare=False)

    @property
    def expanded(self) -> bool:
        """Whether anything was ever sampled from this state."""
        return self.samples > 0

    def q(self, unvisited_value: float = 0.0) -> float:
        return self.value_sum / self.visits if self.visits > 0 else unvisited_value

    def path(self) -> list[Node]:
        """Root ... self."""
        out: list[Node] = []
        node: Node | None = self
        while node is not None:
            out.append(node)
            node = node.parent
        return out[::-1]

    def step_probability(self) -> float:
        """Probability the sampler gave this node's step at its parent, ``exp(sum of log-probs)``
        (computed once: a node's tokens never change)."""
        if self._step_p is None:
            self._step_p = math.exp(math.fsum(self.logprobs))
        return self._step_p

    def completion_ids(self) -> list[int]:
        """The step tokens from the root to here, concatenated."""
        return [t for n in self.path() for t in n.token_ids]

    def completion_logprobs(self) -> list[float]:
        return [lp for n in self.path() for lp in n.logprobs]


def puct_score(parent: Node, child: Node, c_puct: float, unvisited_value: float = 0.0) -> float:
    """``Q(s, a) + c_puct * P(s, a) * sqrt(N(s)) / (1 + N(s, a))``."""
    return child.q(unvisited_value) + c_puct * child.prior * math.sqrt(parent.visits) / (1.0 + child.visits)


def select_child(
    parent: Node, c_puct: float, unvisited_value: float = 0.0, skip_exhausted: bool = False
) -> Node:
    """The child with the highest pUCT score; ties -> larger prior, then lower index. With
    ``skip_exhausted`` children whose subtree can yield nothing new are passed over (the caller
    makes sure one is left)."""
    kids = [i for i, c in enumerate(parent.children) if not (skip_exhausted and c.exhausted)]
    if not kids:
        raise ValueError(f"select_child: node {parent.id} has no child to select")
    best = max(
        kids,
        key=lambda i: (
            puct_score(parent, parent.children[i], c_puct, unvisited_value),
            parent.children[i].prior,
            -i,
        ),
    )
    return parent.children[best]


def softmax_weights(logprob_sums: Sequence[float], temperature: float = 1.0) -> list[float]:
    """``softmax(s / temperature)`` of summed log-probs, stably (max subtracted); uniform when every
    sample is impossible (cannot happen with a real sampler)."""
    scaled = [s / temperature for s in logprob_sums]
    m = max(scaled)
    if not math.isfinite(m):
        scaled, m = [0.0] * len(scaled), 0.0
    w = [math.exp(s - m) for s in scaled]  # stable softmax numerators
    total = sum(w)
    return [x / total for x in w]


class SearchTree:
    """One problem's tree; grows by :meth:`add_samples`, is walked by :meth:`select_leaf` and
    :meth:`backup`. All numbers live on the :class:`Node` objects in :attr:`nodes` (index = id)."""

    def __init__(
        self,
        prompt_ids: Sequence[int],
        *,
        c_puct: float = 0.5,
        virtual_loss: float = 1.0,
        unvisited_value: float = 0.0,
        max_depth: int = 12,
        max_tokens: int = 256,
        completions_per_node: int = 4,
        widening_alpha: float = 0.0,
        prior_temperature: float = 1.0,
        min_unseen_mass: float = 0.0,
        skip_exhausted: bool = False,
        unseen_as_child: bool = False,
    ) -> None:
        self.prompt_ids = list(prompt_ids)
        self.c_puct = c_puct
        self.virtual_loss = virtual_loss
        self.unvisited_value = unvisited_value
        self.max_depth = max_depth
        self.max_tokens = max_tokens
        self.completions_per_node = completions_per_node
        self.widening_alpha = widening_alpha
        self.prior_temperature = prior_temperature
        self.min_unseen_mass = min_unseen_mass
        self.skip_exhausted = skip_exhausted
        self.unseen_as_child = unseen_as_child
        self.root = Node(
            id=0, parent=None, token_ids=[], logprobs=[], finish_reason=None, prior=1.0, depth=0, num_tokens=0
        )
        self.nodes: list[Node] = [self.root]
        #: distinct children of each first expansion (for ``search/distinct_children_per_expansion``)
        self.expansion_widths: list[int] = []
        #: tokens the sampler generated for this tree (search and completion of the chosen path)
        self.generated_tokens = 0
        #: the chosen trajectory's nodes, set by the rollout's selection rule
        self.chosen: list[Node] = []
        #: optional token decoder used by :meth:`to_dict` for the step text
        self.decode: Callable[[list[int]], str] | None = None

    # ------------------------------------------------------------------ widening
    def real_visits(self, node: Node) -> float:
        """N(s) without the virtual loss the current wave has put on it."""
        return node.visits - node.in_flight * self.virtual_loss

    def max_samples(self, node: Node) -> int:
        """``ceil(k0 * max(1, N(s))^alpha)``: how many samples the node may have drawn by now."""
        n = max(1.0, self.real_visits(node))
        return max(1, math.ceil(self.completions_per_node * n**self.widening_alpha - 1e-9))

    def unseen_mass(self, node: Node) -> float:
        """Probability that one more sample at ``node`` is a step not among its children (exact:
        the children are disjoint token sequences whose probabilities the sampler recorded)."""
        return max(0.0, 1.0 - math.fsum(c.step_probability() for c in node.children))

    def can_widen(self, node: Node) -> bool:
        """Whether more samples could ever be worth drawing here: not terminal, new steps still
        likely enough (``min_unseen_mass``), and a cap that grows or is not reached yet (no cap
        with ``unseen_as_child``: pUCT decides)."""
        if node.terminal:
            return False
        # below SPENT_MASS nothing is left but rounding: a new draw could only repeat a child (with
        # min_unseen_mass 0 such a node used to ask for paid duplicates for ever)
        if node.expanded and self.unseen_mass(node) < max(self.min_unseen_mass, SPENT_MASS):
            return False
        if self.unseen_as_child:
            return True
        return self.widening_alpha > 0 or node.samples + node.scheduled < self.completions_per_node

    def unseen_score(self, node: Node) -> float:
        """pUCT score of the "step not sampled yet" action at ``node`` (``unseen_as_child``):
        prior = the unseen mass (renormalised as the children's priors are), no visits, and
        ``Q = Q(node)``, the node's own mean value (first-play urgency: a new step is worth what
        this state is worth on average)."""
        prior = self._unseen_prior(node)
        q = node.q(self.unvisited_value)
        return q + self.c_puct * prior * math.sqrt(node.visits)

    def _unseen_prior(self, node: Node) -> float:
        """The unseen mass as a prior beside the children's (same temperature, same sum)."""
        u = self.unseen_mass(node) ** (1 / self.prior_temperature)
        total = math.fsum(c.step_probability() ** (1 / self.prior_temperature) for c in node.children) + u
        return u / total if total > 0 else 1.0

    def widen_count(self, node: Node) -> int:
        """Samples the node may draw now (0 for a terminal, when it is full, or when a new step
        is too unlikely)."""
        if not self.can_widen(node):
            return 0
        return max(0, self.max_samples(node) - node.samples - node.scheduled)

    def _update_exhausted(self, node: Node) -> None:
        node.exhausted = (node.terminal and node.reward is not None) or (
            not node.terminal
            and node.expanded
            and not self.can_widen(node)
            and all(c.exhausted for c in node.children)
        )

    def schedule(self, node: Node, count: int) -> None:
        """Reserve ``count`` samples of ``node`` for this wave (so the next worker sees them)."""
        if node.terminal or count < 1:
            raise ValueError(f"SearchTree.schedule: node {node.id} is terminal or count {count} < 1")
        node.scheduled += count

    # ------------------------------------------------------------------ selection + virtual loss
    def select_leaf(self) -> list[Node]:
        """Descend by pUCT from the root to where this simulation stops: a terminal, a node with
        nothing sampled below it yet, or a node with room to widen. Virtual loss is applied along
        the way; :meth:`backup` (or :meth:`undo_virtual_loss`) must follow."""
        node, path = self.root, [self.root]
        while node.children and not node.terminal:
            if self.unseen_as_child:
                if self.can_widen(node) and self._unseen_wins(node):
                    break
            elif self.widen_count(node) > 0:
                break
            if self.skip_exhausted and all(c.exhausted for c in node.children):
                break  # nothing new below: this node widens past its cap (the root's caller checks it)
            node = select_child(node, self.c_puct, self.unvisited_value, self.skip_exhausted)
            path.append(node)
        self.apply_virtual_loss(path)
        return path

    def _unseen_wins(self, node: Node) -> bool:
        """Whether the unseen-step action outscores every (selectable) child of ``node``."""
        kids = [c for c in node.children if not (self.skip_exhausted and c.exhausted)]
        if not kids:
            return True
        best = max(puct_score(node, c, self.c_puct, self.unvisited_value) for c in kids)
        return self.unseen_score(node) > best

    def apply_virtual_loss(self, path: Sequence[Node]) -> None:
        for n in path:
            n.visits += self.virtual_loss
            n.value_sum -= self.virtual_loss
            n.in_flight += 1

    def undo_virtual_loss(self, path: Sequence[Node]) -> None:
        for n in path:
            n.visits -= self.virtual_loss
            n.value_sum += self.virtual_loss
            n.in_flight -= 1

    def backup(self, path: Sequence[Node], value: float, *, virtual_loss_applied: bool = True) -> None:
        """Take the path's virtual loss off (if it was applied) and add one visit and ``value``
        to every node on it, once."""
        if virtual_loss_applied:
            self.undo_virtual_loss(path)
        for n in path:
            n.visits += 1.0
            n.value_sum += value
        if self.skip_exhausted:
            for n in reversed(path):  # only nodes on the path changed: bottom-up
                self._update_exhausted(n)

    # ------------------------------------------------------------------ expansion
    def add_child(
        self, parent: Node, token_ids: list[int], logprobs: list[float], finish_reason: str, prior: float
    ) -> Node:
        child = Node(
            id=len(self.nodes),
            parent=parent,
            token_ids=list(token_ids),
            logprobs=list(logprobs),
            finish_reason=finish_reason,
            prior=prior,
            depth=parent.depth + 1,
            num_tokens=parent.num_tokens + len(token_ids),
        )
        child.terminal, child.terminal_reason = self._terminal(child)
        parent.children.append(child)
        self.nodes.append(child)
        return child

    def _terminal(self, n: Node) -> tuple[bool, str | None]:
        """A node ends the search below it when its step closed the answer or the sequence
        (``answer``, ``eos``), when its step did not close within the per-step cap (``length``:
        we do not glue two sampler calls into one step; the truncated text is graded as it
        stands), or when the depth or completion-token budget is used up."""
        if n.finish_reason in ("answer", "eos", "length") or not n.token_ids:
            return True, n.finish_reason if n.token_ids else "eos"
        if n.num_tokens >= self.max_tokens:
            return True, "max_tokens"
        if n.depth >= self.max_depth:
            return True, "max_depth"
        return False, None

    def add_samples(self, node: Node, continuations: Sequence[Any]) -> list[Node]:
        """Add sampled continuations of ``node``'s state (objects with ``token_ids``, ``logprobs``,
        ``finish_reason``) below it and return the child each one landed in, in order.

        A continuation identical to an existing child (same token ids) adds its softmax mass to
        that child instead of a new one; the priors of all the node's children are then
        renormalised over every sample drawn here. A continuation longer than the
        completion-token budget left at ``node`` is cut to it (the prefix's behaviour log-probs
        are unchanged, sampling being left to right) and marked ``length``, so one sampler call
        can serve states with different budgets.
        """
        if node.terminal:
            raise ValueError(f"SearchTree.add_samples: node {node.id} is terminal")
        first = not node.expanded
        budget = self.max_tokens - node.num_tokens
        by_tokens = {tuple(c.token_ids): c for c in node.children}
        landed = []
        for c in continuations:
            ids, lps, fin = list(c.token_ids), list(c.logprobs), c.finish_reason
            if len(ids) > budget:
                ids, lps, fin = ids[:budget], lps[:budget], "length"
            key = tuple(ids)
            child = by_tokens.get(key)
            if child is None:
                child = by_tokens[key] = self.add_child(node, ids, lps, fin, prior=0.0)
            node.draws.append((child, math.fsum(lps)))
            node.samples += 1
            landed.append(child)
        if self.unseen_as_child:
            # the step distribution itself: each distinct child's probability, the rest unseen
            raw = [c.step_probability() ** (1 / self.prior_temperature) for c in node.children]
            total = math.fsum(raw) + self.unseen_mass(node) ** (1 / self.prior_temperature)
            for child, r in zip(node.children, raw):
                child.prior = r / total if total > 0 else 1 / len(raw)
        else:
            weights = softmax_weights([s for _, s in node.draws], self.prior_temperature)
            for child in node.children:
                child.prior = 0.0
            for (child, _), w in zip(node.draws, weights):
                child.prior += w
        if first:
            self.expansion_widths.append(len(node.children))
        return landed

    def add_path(self, node: Node, steps: Sequence[Any]) -> list[Node]:
        """Add the consecutive steps of one sampled path below ``node`` (objects as in
        :meth:`add_samples`, each sampled from the state its predecessors reach), one node per step
        (a step identical to an existing child merges into it), until a terminal: steps past a
        terminal (the depth or token budget reached, an answer) are not added. Returns the nodes
        the path went through below ``node``, in order."""
        chain: list[Node] = []
        for step in steps:
            if node.terminal:
                break
            (node,) = self.add_samples(node, [step])
            chain.append(node)
        return chain

    # ------------------------------------------------------------------ the result
    def root_visit_distribution(self) -> list[float]:
        total = sum(c.visits for c in self.root.children)
        return [c.visits / total for c in self.root.children] if total > 0 else []

    def root_visit_entropy(self) -> float:
        """Entropy (nats) of the root's child visit distribution."""
        return -sum(p * math.log(p) for p in self.root_visit_distribution() if p > 0)

    def root_prior_visit_kl(self) -> float:
        """``KL(pi_visits || P)`` at the root (nats): how far search moved off the policy's
        priors. This direction is finite (every prior > 0; unvisited children contribute 0)."""
        pi = self.root_visit_distribution()
        return sum(p * math.log(p / c.prior) for p, c in zip(pi, self.root.children) if p > 0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable picture of the tree (with the chosen path if :meth:`choose_path` ran)."""
        on_path = {n.id for n in self.chosen}

        def num(x: float) -> float | int:
            return int(x) if float(x).is_integer() else float(x)

        nodes = []
        for n in self.nodes:
            nodes.append(
                {
                    "id": n.id,
                    "parent": n.parent.id if n.parent is not None else None,
                    "depth": n.depth,
                    "step": self.decode(n.token_ids) if self.decode is not None else None,
                    "token_ids": n.token_ids,
                    "finish_reason": n.finish_reason,
                    "visits": num(n.visits),
                    "q": n.q(self.unvisited_value),
                    "prior": n.prior,
                    "value_estimate": n.value_estimate,
                    "terminal": n.terminal,
                    "terminal_reason": n.terminal_reason,
                    "reward": n.reward,
                    "correct": n.correct,
                    "on_chosen_path": n.id in on_path,
                }
            )
        return {
            "prompt_ids": self.prompt_ids,
            "prompt": self.decode(self.prompt_ids) if self.decode is not None else None,
            "c_puct": self.c_puct,
            "virtual_loss": self.virtual_loss,
            "unvisited_value": self.unvisited_value,
            "nodes": nodes,
        }
