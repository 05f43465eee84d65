"""CPU cache blocking for multi-pass ``torch._foreach_*`` updates.

An update that makes several passes over the same tensors (lerp then weight decay; the adds of
the buffers into the parameters) reads each tensor from memory once per pass when the lists are
large. Run block by block over ~``block_bytes`` of tensors, the later passes find the block in
cache. Only the CPU gains from it; on accelerators one foreach call per list is best.
"""

from __future__ import annotations

from typing import Any, List, Sequence, Tuple

import torch

__all__ = ["CPU_BLOCK_BYTES", "block_bytes_for", "cache_blocks"]

# ~2 MiB of parameters per block: the working set is a few of those, well inside a 32 MiB L3.
CPU_BLOCK_BYTES = 2 * 2**20


def block_bytes_for(tensors: Sequence[torch.Tensor], cpu_block_bytes: int = CPU_BLOCK_BYTES) -> int:
    """The block size for an update over ``tensors``: ``cpu_block_bytes`` on CPU, 0 (one block) elsewhere."""
    if not tensors or tensors[0].device.type != "cpu":
        return 0
    return cpu_block_bytes


def cache_blocks(rows: Sequence[Tuple[tuple, Any]], block_bytes: int) -> List[List[Tuple[tuple, Any]]]:
    """Groups rows ``(tensors, meta)`` (same-shaped tensors) into blocks of ~``block_bytes`` of the first.

    A row larger than a block is cut into flat views when all its tensors are contiguous, so
    big tensors are blocked too. ``block_bytes == 0`` keeps everything in one block.
    """
    if not block_bytes:
        return [list(rows)]
    blocks: List[List[Tuple[tuple, Any]]] = []
    current: List[Tuple[tuple, Any]] = []
    size = 0
    for tensors, meta in rows:
        first = tensors[0]
        nbytes = first.numel() * first.element_size()
        if nbytes > block_bytes and all(t.is_contiguous() for t in tensors):
            if current:
                blocks.append(current)
                current, size = [], 0
            pieces = [t.view(-1).split(max(1, block_bytes // first.element_size())) for t in tensors]
            blocks.extend([(parts, meta)] for parts in zip(*pieces))
            continue
        if current and size + nbytes > block_bytes:
            blocks.append(current)
            current, size = [], 0
        current.append((tensors, meta))
        size += nbytes
    if current:
        blocks.append(current)
    return blocks
