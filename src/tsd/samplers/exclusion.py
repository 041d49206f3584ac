"""Sampling without replacement inside an engine that samples by itself (vLLM), engine-free parts.

The semantics are :class:`~tsd.samplers.hf.HFSampler`'s (its ``exclusion_trie`` and ``_pick``;
Shi et al. 2020): at a prefix that excluded continuations pass through, token ``t`` keeps
``p(t) - m(t)`` of its probability, ``m(t)`` being the mass of the excluded continuations through
``t`` given the prefix, and the row draws from what is left, renormalised. ``p`` is the policy's
distribution at that position: ``softmax(logits / T)``, top-p applied, pad/BOS banned.

An engine such as vLLM draws the token and reports a number for it, so the exclusion is split in
two. Its logits processor (:class:`RowProcessor`, wrapped for vLLM by
:mod:`tsd.samplers.vllm_logits`) replaces every row it serves by

    v(x) = log p(x)                 x: no excluded continuation passes through it at this prefix
    v(t) = log(p(t) - m(t))         t: one does (-inf when nothing is left of it: never drawn)

Sampling from ``softmax(v)`` is sampling from the conditioned distribution (softmax renormalises),
and the engine, asked for the *processed logits* of the sampled token (vLLM's
``logprobs_mode="processed_logits"``), reports ``v``: ``log p(x)`` as it is, the policy's own
log-prob, or ``log(p(t) - m(t))``, which the driver turns back into ``log p(t) = log(exp(v) + m(t))``
with the ``m(t)`` it sent (:meth:`FlatTrie.restore`). Both are exact to fp32 rounding; no
normaliser has to be known, and the masses need not even be this policy's (recorded by other
weights): a token whose mass is not below its probability is never drawn, every other one is
restored exactly. Rows with nothing to exclude get ``v = log p`` (the same processor applies
temperature and top-p to every row, so what the engine reports is always a log-prob).

When at most :data:`~tsd.samplers.base.EXHAUSTED_MASS` of a prefix's probability is left, the row
draws from the policy itself, as HFSampler does. Two things make a prefix so: the driver flags it
(the payload's ``exhausted``: its masses sum to within ``EXHAUSTED_MASS`` of 1), or the processor
finds it (the policy's probabilities minus the masses leave at most that much: masses recorded by
other weights, or fp32 rounding). Either way the processor serves the row as

    v(x) = log p(x) + FALLBACK_SHIFT        (every x: the policy itself, shifted)

which samples exactly as ``log p`` does (softmax does not see a constant) and tells the driver
what happened: every other value the processor produces is a log-probability, at most 0, while a
token drawn from a shifted row reports more than ``FALLBACK_SHIFT - 104 > 0`` (a token with
``log p`` below -103.3 has probability 0 in fp32 and is never drawn). :meth:`FlatTrie.restore`
then takes the shift off instead of adding a mass back, and counts the token as an exhausted draw
(``VLLMSampler.exhausted_draws``). Without the shift a fallback the processor found by itself was
restored as ``log(p + m)``, above 0 when ``p + m > 1`` (p = 0.6, m = 0.7: +0.262), which the
trajectory check refuses. The shift costs the fallback's log-probs some fp32 precision: values
near 128 are spaced 7.6e-6 apart, so they are exact to ~4e-6 nats (rare draws; the others stay
exact to fp32 rounding).

The trie travels to the engine as a flat payload (lists of ints and floats: vLLM's
``SamplingParams.extra_args`` crosses a msgpack channel) of at most :data:`MAX_TRIE_EDGES` edges
per state. A search's node excludes its own children (a few dozen steps of at most
``max_step_tokens`` tokens), far below it; a larger trie is refused, not truncated, since dropping
part of it would silently sample what the caller excluded.

    python -m pytest tests/test_exclusion.py -q
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tsd.samplers.base import EXHAUSTED_MASS
from tsd.samplers.hf import exclusion_trie, top_p_filter

#: key of this module's arguments in a request's ``extra_args``
EXTRA_ARGS_KEY = "tsd"
#: most trie edges (token positions of distinct excluded prefixes) one state may exclude
MAX_TRIE_EDGES = 1 << 14
#: added to every value of a row the processor serves from the policy itself (an exhausted prefix):
#: a power of two above the -103.3 below which fp32 probabilities are 0, so a value drawn from such
#: a row is > 0 and every other value the processor produces is <= 0 (module docstring)
FALLBACK_SHIFT = 128.0


def trie_payload(excluded: Sequence[Any], max_edges: int = MAX_TRIE_EDGES) -> dict[str, list] | None:
    """The excluded continuations (objects with ``token_ids`` and the policy's ``logprobs``) as a
    flat trie, or None when they exclude nothing. Node 0 is the empty prefix; edge ``e`` goes from
    node ``parent[e]`` by ``token[e]`` to node ``e + 1`` and carries ``mass[e]``, the mass
    :func:`~tsd.samplers.hf.exclusion_trie` puts there; ``exhausted`` lists the nodes with at most
    :data:`EXHAUSTED_MASS` left. Raises ``ValueError`` past ``max_edges`` edges."""
    trie = exclusion_trie(excluded)
    edges = sum(len(masses) for masses in trie.values())
    if edges > max_edges:
        raise ValueError(
            f"exclusion: {edges} trie edges for one state, more than the {max_edges} a request carries "
            "(exclude fewer or shorter continuations)"
        )
    if not edges:
        return None
    node_of: dict[tuple[int, ...], int] = {(): 0}
    parent: list[int] = []
    token: list[int] = []
    mass: list[float] = []
    exhausted: list[int] = []
    for prefix in sorted(trie, key=len):  # a prefix's own prefix, and so its node, comes first
        node = node_of[prefix]
        masses = trie[prefix]
        for tok, m in masses.items():
            parent.append(node)
            token.append(int(tok))
            mass.append(float(m))
            node_of[(*prefix, tok)] = len(parent)  # edge e leads to node e + 1
        if 1.0 - math.fsum(masses.values()) <= EXHAUSTED_MASS:
            exhausted.append(node)
    return {"parent": parent, "token": token, "mass": mass, "exhausted": sorted(exhausted)}


@dataclass(frozen=True)
class FlatTrie:
    """A parsed :func:`trie_payload`: ``edges[node] = {token: (mass, child node)}``."""

    edges: list[dict[int, tuple[float, int]]]
    exhausted: frozenset[int]

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any], max_edges: int = MAX_TRIE_EDGES) -> FlatTrie:
        """Parse and check a payload (it crosses a process boundary); ``ValueError`` names what
        is wrong."""
        if not isinstance(payload, Mapping):
            raise ValueError(f"exclusion trie: a mapping expected, got {type(payload).__name__}")
        try:
            parent, token, mass = (list(payload[k]) for k in ("parent", "token", "mass"))
            exhausted = list(payload.get("exhausted", ()))
        except (KeyError, TypeError) as err:
            raise ValueError(f"exclusion trie: needs lists parent, token, mass ({err})") from None
        n = len(parent)
        if not (len(token) == len(mass) == n):
            raise ValueError(f"exclusion trie: parent/token/mass lengths {n}/{len(token)}/{len(mass)} differ")
        if n > max_edges:
            raise ValueError(f"exclusion trie: {n} edges, more than {max_edges}")
        edges: list[dict[int, tuple[float, int]]] = [{} for _ in range(n + 1)]
        for k, (p, t, m) in enumerate(zip(parent, token, mass)):
            if not (_is_int(p) and 0 <= p <= k):  # a parent node is created before its edges
                raise ValueError(f"exclusion trie: edge {k} has parent {p!r}, expected a node in [0, {k}]")
            if not (_is_int(t) and t >= 0):
                raise ValueError(f"exclusion trie: edge {k} has token {t!r}, expected an id >= 0")
            if not (isinstance(m, (int, float)) and math.isfinite(m) and m >= 0):
                raise ValueError(f"exclusion trie: edge {k} has mass {m!r}, expected a finite number >= 0")
            if t in edges[p]:
                raise ValueError(f"exclusion trie: node {p} has token {t} twice")
            edges[p][int(t)] = (float(m), k + 1)
        if not all(_is_int(x) and 0 <= x <= n for x in exhausted):
            raise ValueError(f"exclusion trie: exhausted nodes must be in [0, {n}]")
        return cls(edges, frozenset(int(x) for x in exhausted))

    def step(self, node: int | None, token: int) -> int | None:
        """The node after ``token`` at ``node``; None once the prefix has left the trie."""
        if node is None:
            return None
        edge = self.edges[node].get(token)
        return edge[1] if edge is not None and self.edges[edge[1]] else None

    def restore(self, token_ids: Sequence[int], reported: Sequence[float]) -> tuple[list[float], int]:
        """The policy's log-probs of a continuation sampled under this trie, from the values the
        engine reported (``v`` above), and how many of its tokens were drawn at an exhausted
        prefix (from the policy itself: the processor shifted their row by :data:`FALLBACK_SHIFT`,
        whether the payload flagged the prefix or the processor found it spent)."""
        out: list[float] = []
        exhausted = 0
        node: int | None = 0
        for tok, v in zip(token_ids, reported):
            edge = self.edges[node].get(tok) if node is not None else None
            if v > FALLBACK_SHIFT / 2:  # a fallback row: log p + shift (never > 0 otherwise)
                exhausted += 1
                out.append(float(v) - FALLBACK_SHIFT)
            elif edge is not None:
                out.append(math.log(math.exp(v) + edge[0]))  # exp(v) = p(t) - m(t)
            else:
                out.append(float(v))
            node = self.step(node, tok)
        return out, exhausted


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class RowArgs:
    """What the processor needs to know about one request."""

    #: the policy's temperature (0: greedy, log-probs under T = 1)
    temperature: float
    #: the policy's top-p in (0, 1]
    top_p: float
    #: what the request excludes; None: nothing
    trie: FlatTrie | None = None


def row_args(temperature: float, top_p: float, payload: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``extra_args`` of a request: this module's arguments under :data:`EXTRA_ARGS_KEY`."""
    args: dict[str, Any] = {"temperature": float(temperature), "top_p": float(top_p)}
    if payload is not None:
        args["exclude"] = payload
    return {EXTRA_ARGS_KEY: args}


def parse_row_args(extra_args: Mapping[str, Any] | None) -> RowArgs | None:
    """:class:`RowArgs` from a request's ``extra_args``; None when it carries none of ours.
    ``ValueError`` for malformed ones (vLLM then rejects the request before it runs)."""
    if not extra_args or EXTRA_ARGS_KEY not in extra_args:
        return None
    args = extra_args[EXTRA_ARGS_KEY]
    if not isinstance(args, Mapping):
        raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}]: a mapping expected, got {type(args).__name__}")
    t, p = args.get("temperature"), args.get("top_p")
    if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
        raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}].temperature: a number >= 0 expected, got {t!r}")
    if not (isinstance(p, (int, float)) and 0 < p <= 1):
        raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}].top_p: a number in (0, 1] expected, got {p!r}")
    payload = args.get("exclude")
    trie = FlatTrie.from_payload(payload) if payload is not None else None
    return RowArgs(float(t), float(p), trie)


@dataclass
class _Row:
    args: RowArgs
    #: the request's output tokens (the engine's own list, which grows as it samples)
    output: list[int]
    #: output tokens walked so far
    seen: int = 0
    #: where the output so far is in the trie; None: outside it (nothing excluded any more)
    node: int | None = field(default=None)

    def __post_init__(self) -> None:
        self.node = 0 if self.args.trie is not None else None

    def advance(self) -> None:
        """Walk the tokens sampled since the last call (a placeholder -1, which an asynchronous
        engine may leave until the token arrives, stops the walk until then)."""
        trie = self.args.trie
        while self.seen < len(self.output) and self.node is not None and trie is not None:
            tok = self.output[self.seen]
            if tok < 0:
                return
            self.node = trie.step(self.node, tok)
            self.seen += 1


class RowProcessor:
    """The logits processor's work, engine-independent: per-row state kept by batch index through
    the engine's batch updates, and the rows' logits turned into ``v`` (module docstring).

    A batch update (vLLM's ``BatchUpdate``) lists ``removed`` indices, ``added`` requests
    ``(index, params, prompt ids, output ids)`` and ``moved`` pairs ``(a, b, direction)``, one-way
    ``a -> b`` or a swap; they are applied in that order, as vLLM's interface asks. ``output ids``
    is the engine's own growing list of the request's tokens, read at :meth:`apply` time.
    """

    def __init__(self) -> None:
        self.rows: dict[int, _Row] = {}

    def update(self, batch_update: Any) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _prompt, output in batch_update.added:
            args = parse_row_args(getattr(params, "extra_args", None))
            if args is None:
                self.rows.pop(index, None)
            else:
                self.rows[index] = _Row(args, output)
        for a, b, direction in batch_update.moved:
            row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if row_a is not None:
                self.rows[b] = row_a
            if row_b is not None and getattr(direction, "name", direction) == "SWAP":
                self.rows[a] = row_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Replace each served row of ``logits`` (B, V) fp32 (pad/BOS bias already applied) by
        ``v``; other rows are left as they are. Modifies ``logits`` in place and returns it."""
        rows = sorted(i for i in self.rows if i < logits.shape[0])
        if not rows:
            return logits
        dev = logits.device
        idx = torch.tensor(rows, dtype=torch.long, device=dev)
        args = [self.rows[i].args for i in rows]
        temps = torch.tensor([a.temperature or 1.0 for a in args], device=dev)  # greedy: T = 1
        x = logits.index_select(0, idx).float() / temps[:, None]  # (R, V)
        top_p = torch.tensor([a.top_p for a in args], device=dev)
        if bool((top_p < 1).any()):
            x = top_p_filter(x, top_p)
        logp = torch.log_softmax(x, dim=-1)  # (R, V): log p, the policy's

        # the masses excluded at each row's prefix: (row, token, mass) triples
        at, toks, masses = [], [], []
        spent: list[int] = []  # rows at a prefix the payload flags exhausted
        vocab = logp.shape[-1]
        for k, i in enumerate(rows):
            row = self.rows[i]
            row.advance()
            trie = row.args.trie
            if row.node is None or trie is None:
                continue  # outside the trie: the policy itself
            if row.node in trie.exhausted:
                spent.append(k)
                continue
            for tok, (m, _) in trie.edges[row.node].items():
                if tok < vocab:
                    at.append(k)
                    toks.append(tok)
                    masses.append(m)
        fallback = torch.zeros(len(rows), dtype=torch.bool, device=dev)  # (R,)
        fallback[spent] = True
        if at:
            rk = torch.tensor(at, dtype=torch.long, device=dev)
            tk = torch.tensor(toks, dtype=torch.long, device=dev)
            # p(t) - m(t) in float64: p and m are close when a whole step is excluded
            p = logp[rk, tk].double().exp()  # (E,)
            left = p - torch.tensor(masses, dtype=torch.float64, device=dev)  # (E,)
            # what is left of each row, as HFSampler counts it: its mass minus what the exclusion
            # took (at most each token's own probability)
            taken = torch.zeros(len(rows), dtype=torch.float64, device=dev).index_add_(
                0, rk, p - left.clamp(min=0)
            )  # (R,)
            touched = torch.unique(rk)  # (U,) the rows with masses to take off
            remaining = logp[touched].double().exp().sum(-1) - taken[touched]  # (U,)
            fallback[touched] |= remaining <= EXHAUSTED_MASS
            use = ~fallback[rk]  # (E,) rows that do sample from what is left
            logp[rk[use], tk[use]] = torch.where(
                left[use] > 0, left[use].clamp(min=1e-300).log(), float("-inf")
            ).float()
        # nothing left (flagged by the payload, or found here): the policy itself, shifted so
        # the driver's restore can tell (module docstring)
        logp[fallback] += FALLBACK_SHIFT
        logits[idx] = logp.to(logits.dtype)
        return logits
