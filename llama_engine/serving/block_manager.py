"""Allocator of the paged KV cache's blocks (PagedAttention, Kwon et al. 2023).

The cache is ``num_blocks`` blocks of ``block_size`` token slots (TensorRT-LLM's
``tokens_per_block``). A sequence's ``block_table[i]`` is the physical block that holds its
tokens ``i*block_size .. (i+1)*block_size - 1``; token ``t`` lives in slot
``block_table[t // block_size] * block_size + t % block_size``.

Blocks are reference counted so that several sequences could share a prefix; a block returns
to the free list when its count reaches zero, and freeing a block that is already free is an
assertion error (a double free would hand one block to two sequences).

Pure Python: no tensors, testable without a model.
"""
from __future__ import annotations

from llama_engine.config import ConfigError
from llama_engine.serving.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """Hands out KV blocks to sequences: allocate / append / free."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0:
            raise ConfigError(f"the KV cache must have at least one block, got {num_blocks}")
        if block_size <= 0:
            raise ConfigError(f"tokens_per_block must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        # A stack: the block freed last is reused first (it is likely still in the L2 cache).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))

    # -- queries -----------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_needed(self, seq: Sequence, num_slots: int) -> int:
        """New blocks ``seq`` needs so that its first ``num_slots`` token slots exist."""
        return max(0, cdiv(num_slots, self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_slots: int) -> bool:
        return self.blocks_needed(seq, num_slots) <= len(self._free)

    # -- changes -----------------------------------------------------------------------------
    def allocate(self, seq: Sequence, num_slots: int) -> None:
        """Grow ``seq.block_table`` until it covers ``num_slots`` token slots."""
        n = self.blocks_needed(seq, num_slots)
        assert n <= len(self._free), (f"request {seq.request_id}: {n} blocks needed, "
                                      f"{len(self._free)} free; call can_allocate first")
        for _ in range(n):
            block = self._free.pop()
            assert self.ref_counts[block] == 0, f"block {block} was free with references"
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def append(self, seq: Sequence) -> None:
        """Make room for one more token: a new block only when the last one is full."""
        self.allocate(seq, seq.num_computed_tokens + 1)

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references; blocks nobody else holds go back to the free list."""
        for block in reversed(seq.block_table):
            assert self.ref_counts[block] > 0, f"double free of block {block}"
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self._free.append(block)
        seq.block_table = []

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
