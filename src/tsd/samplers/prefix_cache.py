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

Layout: an entry's keys and values are ``(layers, 2, heads, length, head_dim)`` (``[:, 0]`` keys,
``[:, 1]`` values), in the model's dtype, on its device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tsd.config import check_int


class PrefixKVStore:
    """Token sequences and their per-layer keys/values, found by longest stored prefix.

    Args:
        max_tokens: most tokens held (summed over entries); inserting past it clears the store
            first. ``>= 1``.
    """

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = check_int(max_tokens, "PrefixKVStore.max_tokens", low=1)
        self._entries: list[torch.Tensor] = []  # (layers, 2, heads, length, head_dim) each
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

    def insert(self, token_ids: Sequence[int], kv: torch.Tensor) -> None:
        """Store ``kv`` (layers, 2, heads, L, head_dim), the keys and values of ``token_ids[:L]``.
        Nothing is stored when those tokens are all held already."""
        n = int(kv.shape[3])
        if n < 1 or n > len(token_ids):
            raise ValueError(
                f"PrefixKVStore.insert: {n} positions of keys/values for {len(token_ids)} tokens"
            )
        if self.longest_prefix(token_ids[:n], count=False)[0] == n:
            return
        if self.tokens + n > self.max_tokens:
            self.clear()
        idx = len(self._entries)
        self._entries.append(kv)
        self.tokens += n
        level = self._trie
        for tok in token_ids[:n]:
            node = level.get(tok)
            if node is None:
                node = level[tok] = [idx, {}]
            level = node[1]

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
        return self._entries[entry][:, :, :, :length]
