"""PrefixKVStore: the KV cache of token sequences a sampler has already run, reused across calls.

    HFSampler(..., prefix_cache_tokens=131072)      # sampler.prefix_cache_tokens in configs/sampler/hf.yaml

An MCTS wave samples from nodes whose paths earlier waves generated: the state ``prompt + path`` of
every node was already run through the model, token by token, when it was sampled. The HF sampler
keeps the keys and values of every sequence it ran (each row's state and the tokens it generated)
here, and a later call prefills only what follows the longest stored prefix of each state: vLLM's
automatic prefix caching, for the laptop sampler (at paper scale vLLM does this itself).

Stored keys and values are exact for the weights that computed them: the store is cleared whenever
the sampler's weights change, and entirely when it holds more than ``max_tokens`` tokens (simple,
and a rollout's working set is far smaller: see ``HFSampler``). Lookups walk a token trie, one dict
step per token of the state; an entry keeps the whole sequence it was inserted with, so a prefix is
one slice of one entry.

Layout: what :meth:`PrefixKVStore.get` returns is ``(layers, 2, heads, length, head_dim)``
(``[:, 0]`` keys, ``[:, 1]`` values), in the model's dtype, on its device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tsd.config import check_int


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
        # token -> [entry index, children]; a node at depth d names an entry holding >= d tokens
        self._trie: dict[int, list] = {}
        self.tokens = 0
        #: lookups, and state tokens they found stored (the prefill they saved)
        self.lookups = 0
        self.hit_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._trie.clear()
        self.tokens = 0

    def insert(self, token_ids: Sequence[int], n: int, fetch: Callable[[int], torch.Tensor]) -> None:
        """Hold ``token_ids[:n]``, whose keys and values ``fetch(length)`` returns for any
        ``length <= n`` as (layers, 2, heads, length, head_dim). Nothing is held when those tokens
        are all held already."""
        if n < 1 or n > len(token_ids):
            raise ValueError(
                f"PrefixKVStore.insert: {n} positions of keys/values for {len(token_ids)} tokens"
            )
        # one walk: down the held prefix, then new trie nodes for the rest (none: nothing to hold)
        level, depth = self._trie, 0
        while depth < n:
            node = level.get(token_ids[depth])
            if node is None:
                break
            level, depth = node[1], depth + 1
        if depth == n:
            return
        if self.tokens + n > self.max_tokens:
            self.clear()
            level, depth = self._trie, 0
        idx = len(self._entries)
        self._entries.append(fetch)
        self.tokens += n
        for tok in token_ids[depth:n]:
            fresh: dict[int, list] = {}
            level[tok] = [idx, fresh]
            level = fresh

    def longest_prefix(self, token_ids: Sequence[int], count: bool = True) -> tuple[int, int]:
        """``(length, entry)``: the longest prefix of ``token_ids`` held, and an entry holding it
        (``(0, -1)`` when none)."""
        level, length, entry = self._trie, 0, -1
        for tok in token_ids:
            node = level.get(tok)
            if node is None:
                break
            entry, level = node[0], node[1]
            length += 1
        if count:
            self.lookups += 1
            self.hit_tokens += length
        return length, entry

    def get(self, entry: int, length: int) -> torch.Tensor:
        """Keys and values of the first ``length`` tokens of ``entry``: (layers, 2, heads, length, head_dim)."""
        return self._entries[entry](length)
