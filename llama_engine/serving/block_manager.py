"""Allocator of the paged KV cache's blocks (PagedAttention, Kwon et al. 2023), with optional
prefix caching.

The cache is ``num_blocks`` blocks of ``block_size`` token slots (TensorRT-LLM's
``tokens_per_block``). A sequence's ``block_table[i]`` is the physical block that holds its
tokens ``i*block_size .. (i+1)*block_size - 1``; token ``t`` lives in slot
``block_table[t // block_size] * block_size + t % block_size``.

Blocks are reference counted; a block returns to the free pool when its count reaches zero,
and freeing a block that is already free is an assertion error (a double free would hand one
block to two sequences).

Prefix caching (``enable_prefix_caching``; TensorRT-LLM's KV block reuse, vLLM's automatic
prefix caching): once a block is full and its K/V computed, it is registered under a key that
hashes its tokens together with the key of the block before it, so a key names a whole
prefix. A new (or recomputing) request whose first blocks have known keys takes those blocks
with one more reference instead of computing them, and starts with ``num_computed_tokens`` past
them. Released cached blocks are not wiped: they wait in least-recently-released order and are
handed out (forgetting their key) only when no never-cached block is free. A block is never
written after it is registered (a sequence writes only at positions past its computed count,
and the last token of a request is always computed by the request itself), so sharing a
cached prefix needs no copy-on-write.

Beam search (llama_engine/beam.py) shares more: a beam takes its parent's whole table by
reference (``share``), and before it writes a position whose block another beam also holds
(the last, partly filled block) it gets a private block to copy into (``cow``). The cache's dtype (fp16, INT8) and tensor parallelism do not matter here:
every rank schedules the same way and keys depend on token ids only.

Pure Python: no tensors, testable without a model.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

from llama_engine.config import ConfigError
from llama_engine.serving.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_key(parent: Optional[int], tokens: tuple) -> int:
    """Key of a full block: its tokens and (through ``parent``, the previous block's key)
    every token before it."""
    return hash((parent, tokens))


class BlockManager:
    """Hands out KV blocks to sequences: allocate / append / free, and cached prefixes."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        if num_blocks <= 0:
            raise ConfigError(f"the KV cache must have at least one block, got {num_blocks}")
        if block_size <= 0:
            raise ConfigError(f"tokens_per_block must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        # A stack: the block freed last is reused first (it is likely still in the L2 cache).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        # Prefix caching: key <-> block of registered blocks; the unreferenced ones in LRU order.
        self._key_to_block: dict[int, int] = {}
        self._block_key: dict[int, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._seq_keys: dict = {}               # request_id -> keys of its registered blocks
        # Counters (tokens of admitted requests looked up / found, and blocks found).
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0
        self.prefix_hit_blocks = 0
        self.num_evictions = 0

    # -- queries -----------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence can get now: never-cached free ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks some sequence holds (cached blocks nobody holds are not counted)."""
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Registered blocks, held or not."""
        return len(self._block_key)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    def blocks_needed(self, seq: Sequence, num_slots: int) -> int:
        """New blocks ``seq`` needs so that its first ``num_slots`` token slots exist."""
        return max(0, cdiv(num_slots, self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_slots: int) -> bool:
        return self.blocks_needed(seq, num_slots) <= self.num_free_blocks

    # -- changes -----------------------------------------------------------------------------
    def _take_free(self) -> int:
        if self._free:
            return self._free.pop()
        block, _ = self._evictable.popitem(last=False)   # least recently released
        del self._key_to_block[self._block_key.pop(block)]
        self.num_evictions += 1
        return block

    def allocate(self, seq: Sequence, num_slots: int) -> None:
        """Grow ``seq.block_table`` until it covers ``num_slots`` token slots."""
        n = self.blocks_needed(seq, num_slots)
        assert n <= self.num_free_blocks, (f"request {seq.request_id}: {n} blocks needed, "
                                           f"{self.num_free_blocks} free; call can_allocate first")
        for _ in range(n):
            block = self._take_free()
            assert self.ref_counts[block] == 0, f"block {block} was free with references"
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def append(self, seq: Sequence) -> None:
        """Make room for one more token: a new block only when the last one is full."""
        self.allocate(seq, seq.num_computed_tokens + 1)

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references; blocks nobody else holds go back to the free pool (cached
        ones to the eviction queue, the last blocks first so a prefix outlives its tails)."""
        for block in reversed(seq.block_table):
            assert self.ref_counts[block] > 0, f"double free of block {block}"
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if block in self._block_key:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        seq.block_table = []
        self._seq_keys.pop(seq.request_id, None)

    # -- beam search ---------------------------------------------------------------------------
    def share(self, table: list) -> None:
        """One more reference to every block of ``table`` (a beam taking its parent's blocks)."""
        for block in table:
            assert self.ref_counts[block] > 0, f"sharing free block {block}"
            self.ref_counts[block] += 1

    def cow(self, seq: Sequence, pos: int) -> Optional[tuple]:
        """Copy-on-write before ``seq`` writes token position ``pos``: when the block holding
        it is shared, ``seq`` gets a fresh block in its place. -> (src, dst) blocks whose
        K/V the caller copies, or None."""
        i = pos // self.block_size
        if i >= len(seq.block_table) or self.ref_counts[seq.block_table[i]] == 1:
            return None
        assert self.num_free_blocks > 0, f"request {seq.request_id}: no block to copy into"
        src, dst = seq.block_table[i], self._take_free()
        self.ref_counts[src] -= 1
        self.ref_counts[dst] = 1
        seq.block_table[i] = dst
        return src, dst

    # -- prefix caching ----------------------------------------------------------------------
    def _keys(self, seq: Sequence, num_blocks: int) -> list[int]:
        """Keys of ``seq``'s first ``num_blocks`` full blocks (computed from its tokens)."""
        bs, keys, parent = self.block_size, [], None
        tokens = seq.token_ids(0, num_blocks * bs)
        for i in range(num_blocks):
            parent = block_key(parent, tuple(tokens[i * bs:(i + 1) * bs]))
            keys.append(parent)
        return keys

    def take_cached_prefix(self, seq: Sequence) -> int:
        """For a sequence holding no blocks: attach the cached blocks of its longest cached
        prefix and mark their tokens computed. At least the last token is left to compute (it
        yields the next token's logits). -> the number of tokens taken from the cache."""
        if not self.enable_prefix_caching:
            return 0
        assert not seq.block_table and seq.num_computed_tokens == 0, seq
        hits = []
        for key in self._keys(seq, (seq.num_tokens - 1) // self.block_size):
            block = self._key_to_block.get(key)
            if block is None:
                break
            hits.append((key, block))
        for key, block in hits:
            if self.ref_counts[block] == 0:
                del self._evictable[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
        self._seq_keys[seq.request_id] = [k for k, _ in hits]
        seq.num_computed_tokens = len(hits) * self.block_size
        return seq.num_computed_tokens

    def record_admission(self, seq: Sequence, cached_tokens: int) -> None:
        """Count an admitted request's lookup (its tokens, the ones found cached)."""
        if self.enable_prefix_caching:
            self.prefix_query_tokens += seq.num_tokens
            self.prefix_hit_tokens += cached_tokens
            self.prefix_hit_blocks += cached_tokens // self.block_size

    def register_computed(self, seq: Sequence) -> None:
        """Register ``seq``'s blocks that became full and computed (after a step). A block
        whose prefix is already cached under another block stays unregistered."""
        if not self.enable_prefix_caching:
            return
        keys = self._seq_keys.setdefault(seq.request_id, [])
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if full <= len(keys):
            return
        bs, parent = self.block_size, (keys[-1] if keys else None)
        for i in range(len(keys), full):
            parent = block_key(parent, tuple(seq.token_ids(i * bs, (i + 1) * bs)))
            keys.append(parent)
            block = seq.block_table[i]
            if parent not in self._key_to_block and block not in self._block_key:
                self._key_to_block[parent] = block
                self._block_key[block] = parent

    def reset_prefix_cache(self) -> None:
        """Forget every cached key (unheld cached blocks become plain free blocks)."""
        for block in self._evictable:
            self._free.append(block)
        self._evictable.clear()
        self._key_to_block.clear()
        self._block_key.clear()
        for keys in self._seq_keys.values():
            keys.clear()

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Keep only the blocks covering ``seq``'s first ``num_tokens`` slots (speculative
        decoding rolls back the slots of rejected proposals); the rest are dropped as in
        ``free``."""
        keep = cdiv(num_tokens, self.block_size)
        while len(seq.block_table) > keep:
            block = seq.block_table.pop()
            assert self.ref_counts[block] > 0, f"double free of block {block}"
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self._free.append(block)

    # -- addressing --------------------------------------------------------------------------
    def slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Cache slots of ``seq``'s tokens at positions [start, end)."""
        bs, table = self.block_size, seq.block_table
        assert end <= len(table) * bs, (f"request {seq.request_id}: position {end - 1} has no "
                                        "block")
        return [table[t // bs] * bs + t % bs for t in range(start, end)]
