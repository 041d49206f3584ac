"""PrefixKVStore: the KV cache of token sequences a sampler has already run, reused across calls.

    HFSampler(..., prefix_cache_tokens=131072)      # sampler.prefix_cache_tokens in configs/sampler/hf.yaml

An MCTS wave samples from nodes whose paths earlier waves generated: the state ``prompt + path`` of
every node was already run through the model, token by token, when it was sampled. The HF sampler
keeps the keys and values of every sequence it ran (each row's state and the tokens it generated)
here, and a later call prefills only what follows the longest stored prefix of each state: vLLM's
automatic prefix caching, for the laptop sampler (at paper scale vLLM does this itself, in whole
KV blocks; this store reuses to the token).

Stored keys and values are exact for the weights that computed them: the store is cleared whenever
the sampler's weights change, and entirely when it holds more than ``max_tokens`` tokens (simple,
and a rollout's working set is far smaller: see ``HFSampler``). Lookups walk a token trie, one dict
step per token of the state; an entry keeps the whole sequence it was inserted with, so a prefix is
one slice of one entry. The trie is one dict of ints, ``(node << 32 | token) -> (child << 32 |
entry)``: a search stores ~10^5 trie nodes, and as nested dicts and lists they were objects the
garbage collector walked on every full collection (an insert took ~6x longer with it on); a dict of
ints is never tracked.

Layout: what :meth:`PrefixKVStore.get` returns is ``(layers, 2, heads, length, head_dim)``
(``[:, 0]`` keys, ``[:, 1]`` values), in the model's dtype, on its device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tsd.config import check_int

#: largest token id (and entry index) a trie key holds: 32 bits each
_TOKEN = (1 << 32) - 1


class PrefixKVStore:
    """Token sequences and their per-layer keys/values, found by longest stored prefix.

    An entry keeps a way to fetch its keys and values (``fetch(length)``), not a slice of its own:
    the HF sampler hands in the leaving rows of the batch cache (one index per layer, padding
    included), which no later step writes to. Only prefixes that are looked up again are sliced out
    per row, so storing every row a search runs costs one index per layer and a trie walk.

    Args:
        max_tokens: most tokens held (summed over entries); inserting past it clears the store
            first. ``>= 1``.
    """

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = check_int(max_tokens, "PrefixKVStore.max_tokens", low=1)
        #: per entry: fetch(length) -> (layers, 2, heads, length, head_dim)
        self._entries: list[Callable[[int], torch.Tensor]] = []
        # (node << 32 | token) -> (child << 32 | entry); node 0 is the root, and a node at depth d
        # names an entry holding >= d tokens. Ints only: the dict is never tracked by the GC.
        self._trie: dict[int, int] = {}
        self._nodes = 1
        self.tokens = 0
        #: lookups, and state tokens they found stored (the prefill they saved)
        self.lookups = 0
        self.hit_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._trie.clear()
        self._nodes = 1
        self.tokens = 0

    def insert(self, token_ids: Sequence[int], n: int, fetch: Callable[[int], torch.Tensor]) -> None:
        """Hold ``token_ids[:n]``, whose keys and values ``fetch(length)`` returns for any
        ``length <= n`` as (layers, 2, heads, length, head_dim). Nothing is held when those tokens
        are all held already."""
        if n < 1 or n > len(token_ids):
            raise ValueError(
                f"PrefixKVStore.insert: {n} positions of keys/values for {len(token_ids)} tokens"
            )
        if min(token_ids[:n]) < 0 or max(token_ids[:n]) > _TOKEN:
            raise ValueError(f"PrefixKVStore.insert: token ids must lie in [0, {_TOKEN}]")
        # one walk: down the held prefix, then new trie nodes for the rest (none: nothing to hold)
        trie, node, depth = self._trie, 0, 0
        while depth < n:
            child = trie.get(node << 32 | token_ids[depth])
            if child is None:
                break
            node, depth = child >> 32, depth + 1
        if depth == n:
            return
        if self.tokens + n > self.max_tokens:
            self.clear()
            node, depth = 0, 0
        idx = len(self._entries)
        self._entries.append(fetch)
        self.tokens += n
        fresh = self._nodes
        for tok in token_ids[depth:n]:
            trie[node << 32 | tok] = fresh << 32 | idx
            node, fresh = fresh, fresh + 1
        self._nodes = fresh

    def longest_prefix(self, token_ids: Sequence[int], count: bool = True) -> tuple[int, int]:
        """``(length, entry)``: the longest prefix of ``token_ids`` held, and an entry holding it
        (``(0, -1)`` when none)."""
        trie, node, length, entry = self._trie, 0, 0, -1
        for tok in token_ids:
            if not 0 <= tok <= _TOKEN:  # an id that can't have been stored: the prefix ends here
                break
            child = trie.get(node << 32 | tok)
            if child is None:
                break
            node, entry = child >> 32, child & _TOKEN
            length += 1
        if count:
            self.lookups += 1
            self.hit_tokens += length
        return length, entry

    def get(self, entry: int, length: int) -> torch.Tensor:
        """Keys and values of the first ``length`` tokens of ``entry``: (layers, 2, heads, length, head_dim)."""
        return self._entries[entry](length)
