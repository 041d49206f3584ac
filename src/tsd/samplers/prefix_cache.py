"""PrefixKVStore: the KV cache of token sequences a sampler has already run, reused across calls.

    HFSampler(..., prefix_cache_tokens=131072)      # sampler.prefix_cache_tokens in configs/sampler/hf.yaml

An MCTS wave samples from nodes whose paths earlier waves generated: the state ``prompt + path`` of
every node was already run through the model, token by token, when it was sampled. The HF sampler
keeps the keys and values of every sequence it ran (each row's state and the tokens it generated)
here, and a later call prefills only what follows the longest stored prefix of each state: vLLM's
automatic prefix caching, for the laptop sampler (at paper scale vLLM does this itself, in whole
KV blocks; this store reuses to the token).

Stored keys and values are exact for the weights that computed them: the store is cleared whenever
the sampler's weights change, and entirely when it would hold more than ``max_tokens`` token
positions (simple, and a rollout's working set is far smaller: see ``HFSampler``). **What it holds
is what it counts**: the rows that leave a batch together are stored as one packed tensor of their
real positions only (no padding, no row whose tokens were all held already), so the memory held is
exactly ``tokens`` positions of keys and values, every layer (:meth:`PrefixKVStore.held_bytes`).
(It once kept a whole padded slice of the batch per group of rows, held by any one of them: several
times what it counted.)

Lookups walk a token trie, one dict step per token of the state; an entry keeps the whole sequence
it was inserted with, so a prefix is one slice of one entry. The trie is one dict of ints,
``(node << 32 | token) -> (child << 32 | entry)``: a search stores ~10^5 trie nodes, and as nested
dicts and lists they were objects the garbage collector walked on every full collection (an insert
took ~6x longer with it on); a dict of ints is never tracked.

Layout: a group is stored as ``(layers, 2, positions, heads, head_dim)`` (``[:, 0]`` keys, ``[:, 1]``
values), each row's positions one after the other; what :meth:`PrefixKVStore.get` returns is a view
``(layers, 2, heads, length, head_dim)``, in the model's dtype, on its device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tsd.config import check_int

#: largest token id (and entry index) a trie key holds: 32 bits each
_TOKEN = (1 << 32) - 1


class PrefixKVStore:
    """Token sequences and their per-layer keys/values, found by longest stored prefix.

    Rows are stored a group at a time (:meth:`insert_group`): the store picks the rows it does not
    hold yet, and the caller gathers exactly their positions into one packed tensor, which their
    entries slice. Only groups with an entry in the trie are referenced, so the positions held are
    the ``tokens`` counted, never more than ``max_tokens``.

    Args:
        max_tokens: most token positions held (summed over entries); a group that would take the
            store past it clears the store first. ``>= 1``.
    """

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = check_int(max_tokens, "PrefixKVStore.max_tokens", low=1)
        #: per entry: (packed keys/values of its group (layers, 2, positions, heads, head_dim), where
        #: its own positions start in it)
        self._entries: list[tuple[torch.Tensor, int]] = []
        # (node << 32 | token) -> (child << 32 | entry); node 0 is the root, and a node at depth d
        # names an entry holding >= d tokens. Ints only: the dict is never tracked by the GC.
        self._trie: dict[int, int] = {}
        self._nodes = 1
        #: token positions held, over every entry (the packed tensors hold exactly these)
        self.tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._trie.clear()
        self._nodes = 1
        self.tokens = 0

    def held_bytes(self) -> int:
        """Bytes of keys and values the store keeps alive (each packed tensor once)."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t, _ in self._entries}
        return sum(storages.values())

    def _held_depth(self, token_ids: Sequence[int], n: int) -> tuple[int, int]:
        """How far ``token_ids[:n]`` is in the trie: ``(depth, node)``."""
        trie, node, depth = self._trie, 0, 0
        while depth < n:
            child = trie.get(node << 32 | token_ids[depth])
            if child is None:
                break
            node, depth = child >> 32, depth + 1
        return depth, node

    def insert_group(
        self, rows: Sequence[Sequence[int]], gather: Callable[[list[int]], torch.Tensor]
    ) -> list[int]:
        """Hold the rows that leave a batch together: ``rows[i]`` the tokens whose keys and values
        exist (all of them). Rows whose tokens are held already (by the store, or by a longer row
        of the group) are skipped; if the rest would take the store past ``max_tokens`` it is
        cleared first, and rows that still do not fit are skipped, longest first kept. Then
        ``gather(chosen)`` is called once and must return the chosen rows' keys and values packed
        one after the other, ``(layers, 2, sum of their lengths, heads, head_dim)``. Returns the
        chosen row indices (in the order they are packed)."""
        for r in rows:
            if r and (min(r) < 0 or max(r) > _TOKEN):
                raise ValueError(f"PrefixKVStore.insert_group: token ids must lie in [0, {_TOKEN}]")
        order = sorted((i for i, r in enumerate(rows) if len(r) > 0), key=lambda i: -len(rows[i]))

        def pick(fresh: bool) -> list[int]:
            chosen: list[int] = []
            for i in order:
                r = rows[i]
                n = len(r)
                if not fresh and self._held_depth(r, n)[0] == n:
                    continue  # the store has all of it
                if any(list(rows[j][:n]) == list(r) for j in chosen):
                    continue  # a longer row of the group has all of it
                chosen.append(i)
            return chosen

        chosen = pick(fresh=False)
        if not chosen:
            return []
        if self.tokens + sum(len(rows[i]) for i in chosen) > self.max_tokens:
            self.clear()
            fit, room = [], self.max_tokens
            for i in pick(fresh=True):  # longest first
                if len(rows[i]) <= room:
                    fit.append(i)
                    room -= len(rows[i])
            chosen = fit
            if not chosen:
                return []
        packed = gather(chosen)  # (layers, 2, P, heads, head_dim)
        total = sum(len(rows[i]) for i in chosen)
        if packed.dim() != 5 or packed.shape[2] != total:
            raise ValueError(
                f"PrefixKVStore.insert_group: gather returned {tuple(packed.shape)}, expected "
                f"(layers, 2, {total}, heads, head_dim)"
            )
        offset = 0
        for i in chosen:
            self._insert(rows[i], packed, offset)
            offset += len(rows[i])
        return chosen

    def _insert(self, token_ids: Sequence[int], packed: torch.Tensor, offset: int) -> None:
        n = len(token_ids)
        depth, node = self._held_depth(token_ids, n)
        idx = len(self._entries)
        self._entries.append((packed, offset))
        self.tokens += n
        trie, fresh = self._trie, self._nodes
        for tok in token_ids[depth:n]:
            trie[node << 32 | tok] = fresh << 32 | idx
            node, fresh = fresh, fresh + 1
        self._nodes = fresh

    def longest_prefix(self, token_ids: Sequence[int]) -> tuple[int, int]:
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
        return length, entry

    def get(self, entry: int, length: int) -> torch.Tensor:
        """Keys and values of the first ``length`` tokens of ``entry``: (layers, 2, heads, length, head_dim)."""
        packed, offset = self._entries[entry]
        return packed[:, :, offset : offset + length].transpose(2, 3)
