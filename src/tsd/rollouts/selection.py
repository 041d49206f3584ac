"""Which trajectory a finished search emits: the rules, each a callable ``rule(tree) -> path``.

    python train.py rollout/selection=best_terminal        # or max_visit (the article), max_q

A rule returns the nodes root ... end of the emitted trajectory. If the path ends short of a
terminal, :class:`~tsd.rollouts.mcts.MCTSRollout` completes it with one ``stop="answer"`` sample.
Every node's tokens were sampled by the sampler from its parent's state, so whichever path a rule
picks carries exact behaviour log-probs. Rules are pure tree logic (no model, no env), tested by
hand in ``tests/test_mcts.py``; when they are called every terminal of the tree has been graded.
"""

from __future__ import annotations

from tsd.rollouts.tree import Node, SearchTree


class MaxVisit:
    """The article's rule: from the root, greedily the child with the most visits (ties: higher
    Q, then larger prior, then lower index) until a node without children: a terminal, or a leaf
    never expanded. A node expanded in the last wave has only unvisited children; the rule then
    takes the child of largest prior (a step the policy sampled), as the tie-breaks say."""

    def __call__(self, tree: SearchTree) -> list[Node]:
        node, path = tree.root, [tree.root]
        while node.children:
            kids = node.children
            best = max(
                range(len(kids)),
                key=lambda i: (kids[i].visits, kids[i].q(tree.unvisited_value), kids[i].prior, -i),
            )
            node = kids[best]
            path.append(node)
        return path


class BestTerminal:
    """The graded terminal of highest dense reward anywhere in the tree (ties: more visits, then
    the earlier node), i.e. best-of-N over the complete trajectories the search generated, which
    share their prefixes. Falls back to :class:`MaxVisit` when the tree has no graded terminal.

    It reads the reward, which knows the target: right for choosing training trajectories (as
    best-of-N does); as an evaluation harness (``eval.py search=mcts``) its accuracy is an
    oracle's, like pass@k, not a policy's."""

    def __call__(self, tree: SearchTree) -> list[Node]:
        graded = [n for n in tree.nodes if n.terminal and n.reward is not None]
        if not graded:
            return MaxVisit()(tree)
        best = max(graded, key=lambda n: (n.reward, n.visits, -n.id))
        return best.path()


class MaxQ:
    """From the root, greedily the visited child with the highest mean backed-up value Q (ties:
    more visits, larger prior, lower index) until a node with no visited child. With rollout
    values (``rollout_mix > 0``) Q is the mean reward of the completions below a step, so this
    follows the steps whose completions scored best on average rather than the most visited."""

    def __call__(self, tree: SearchTree) -> list[Node]:
        node, path = tree.root, [tree.root]
        while True:
            kids = [(i, c) for i, c in enumerate(node.children) if c.visits > 0]
            if not kids:
                return path
            _, node = max(kids, key=lambda ic: (ic[1].q(), ic[1].visits, ic[1].prior, -ic[0]))
            path.append(node)
