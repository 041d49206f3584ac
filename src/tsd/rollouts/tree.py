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
- Expansion: K sampled continuations become the children; priors are the softmax of each one's
  summed log-probs, and identical continuations (same token ids) are ONE child holding their
  summed softmax mass (= softmax over distinct children of logsumexp of the copies' log-probs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


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
    expanded: bool = False
    #: N: real visits plus any virtual loss currently applied
    visits: float = 0.0
    #: W: sum of backed-up values minus any virtual loss currently applied
    value_sum: float = 0.0
    #: value-head estimate V(s) of this state, when it was evaluated as a leaf
    value_estimate: float | None = None
    #: dense reward (terminal nodes; graded once, on first visit)
    reward: float | None = None
    correct: bool | None = None

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

    def completion_ids(self) -> list[int]:
        """The step tokens from the root to here, concatenated."""
        return [t for n in self.path() for t in n.token_ids]

    def completion_logprobs(self) -> list[float]:
        return [lp for n in self.path() for lp in n.logprobs]


def puct_score(parent: Node, child: Node, c_puct: float, unvisited_value: float = 0.0) -> float:
    """``Q(s, a) + c_puct * P(s, a) * sqrt(N(s)) / (1 + N(s, a))``."""
    return child.q(unvisited_value) + c_puct * child.prior * math.sqrt(parent.visits) / (1.0 + child.visits)


def select_child(parent: Node, c_puct: float, unvisited_value: float = 0.0) -> Node:
    """The child with the highest pUCT score; ties -> larger prior, then lower index."""
    if not parent.children:
        raise ValueError(f"select_child: node {parent.id} has no children")
    best = max(
        range(len(parent.children)),
        key=lambda i: (
            puct_score(parent, parent.children[i], c_puct, unvisited_value),
            parent.children[i].prior,
            -i,
        ),
    )
    return parent.children[best]


def merge_continuations(
    token_ids: Sequence[Sequence[int]], logprob_sums: Sequence[float]
) -> list[tuple[int, float]]:
    """Distinct continuations and their priors.

    Returns ``(index of the first copy, prior)`` per distinct token sequence, in first-seen order.
    The priors are ``softmax(summed log-probs)`` over all K samples with the masses of identical
    samples added, i.e. ``softmax_j(logsumexp_{i in copies of j} s_i)`` over distinct ``j``.
    """
    if not token_ids:
        return []
    m = max(logprob_sums)
    if not math.isfinite(m):  # every sample impossible (cannot happen with a real sampler): uniform
        logprob_sums = [0.0] * len(logprob_sums)
        m = 0.0
    w = [math.exp(s - m) for s in logprob_sums]  # stable softmax numerators
    total = sum(w)
    first: dict[tuple[int, ...], int] = {}
    mass: dict[tuple[int, ...], float] = {}
    for i, ids in enumerate(token_ids):
        key = tuple(ids)
        if key not in first:
            first[key], mass[key] = i, 0.0
        mass[key] += w[i] / total
    return [(first[k], mass[k]) for k in first]


class SearchTree:
    """One problem's tree; grows by :meth:`expand`, is walked by :meth:`select_leaf` and
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
    ) -> None:
        self.prompt_ids = list(prompt_ids)
        self.c_puct = c_puct
        self.virtual_loss = virtual_loss
        self.unvisited_value = unvisited_value
        self.max_depth = max_depth
        self.max_tokens = max_tokens
        self.root = Node(
            id=0, parent=None, token_ids=[], logprobs=[], finish_reason=None, prior=1.0, depth=0, num_tokens=0
        )
        self.nodes: list[Node] = [self.root]
        #: distinct children of each expansion (for ``search/distinct_children_per_expansion``)
        self.expansion_widths: list[int] = []
        #: the chosen trajectory's nodes, set by :meth:`choose_path`
        self.chosen: list[Node] = []
        #: optional token decoder used by :meth:`to_dict` for the step text
        self.decode: Callable[[list[int]], str] | None = None

    # ------------------------------------------------------------------ selection + virtual loss
    def select_leaf(self) -> list[Node]:
        """Descend by pUCT from the root to a node that is unexpanded or terminal, apply virtual
        loss along the way and return the path (root ... leaf); :meth:`backup` must follow."""
        node, path = self.root, [self.root]
        while node.expanded and not node.terminal:
            node = select_child(node, self.c_puct, self.unvisited_value)
            path.append(node)
        self.apply_virtual_loss(path)
        return path

    def apply_virtual_loss(self, path: Sequence[Node]) -> None:
        for n in path:
            n.visits += self.virtual_loss
            n.value_sum -= self.virtual_loss

    def undo_virtual_loss(self, path: Sequence[Node]) -> None:
        for n in path:
            n.visits -= self.virtual_loss
            n.value_sum += self.virtual_loss

    def backup(self, path: Sequence[Node], value: float, *, virtual_loss_applied: bool = True) -> None:
        """Take the path's virtual loss off (if it was applied) and add one visit and ``value``
        to every node on it, once."""
        if virtual_loss_applied:
            self.undo_virtual_loss(path)
        for n in path:
            n.visits += 1.0
            n.value_sum += value

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

    def expand(self, node: Node, continuations: Sequence[Any]) -> list[Node]:
        """Turn K sampled continuations (objects with ``token_ids``, ``logprobs``,
        ``finish_reason``) into ``node``'s children, merging identical ones.

        A continuation longer than the completion-token budget left at ``node`` is cut to it
        (the prefix's behaviour log-probs are unchanged, sampling being left to right) and
        marked ``length``, so one sampler call can serve leaves with different budgets.
        """
        if node.expanded or node.terminal:
            raise ValueError(f"SearchTree.expand: node {node.id} is already expanded or terminal")
        budget = self.max_tokens - node.num_tokens
        cut = []
        for c in continuations:
            ids, lps, fin = list(c.token_ids), list(c.logprobs), c.finish_reason
            if len(ids) > budget:
                ids, lps, fin = ids[:budget], lps[:budget], "length"
            cut.append((ids, lps, fin))
        merged = merge_continuations([c[0] for c in cut], [math.fsum(c[1]) for c in cut])
        for i, prior in merged:
            self.add_child(node, cut[i][0], cut[i][1], cut[i][2], prior)
        node.expanded = True
        self.expansion_widths.append(len(merged))
        return node.children

    # ------------------------------------------------------------------ the result
    def choose_path(self) -> list[Node]:
        """Greedy by visit count from the root (ties -> higher Q, then larger prior, then lower
        index) until a node without children: a terminal, or a leaf that was never expanded. A
        node expanded in the last wave has only unvisited children; the rule then takes the
        child of largest prior (a step the policy sampled), as the tie-breaks say."""
        node, path = self.root, [self.root]
        while node.children:
            kids = node.children
            best = max(
                range(len(kids)),
                key=lambda i: (kids[i].visits, kids[i].q(self.unvisited_value), kids[i].prior, -i),
            )
            node = kids[best]
            path.append(node)
        self.chosen = path
        return path

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
