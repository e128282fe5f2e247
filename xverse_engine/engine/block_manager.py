"""KV cache blocks: allocation on demand, reference counts, and prefix caching by content hash.

A full block is found by the hash of its tokens chained with the hash of the block before it, so two
sequences that share a prompt prefix share its blocks. A hash only finds a candidate: a hit also needs
the block's own tokens to be equal and its parent to be exactly the block the sequence already matched
(by registration number, which changes whenever a block is overwritten), so by induction the whole prefix
is verified and a hash collision can only cost a miss, never another request's KV.

Freed blocks keep their content until handed out again, least recently freed first, so a later request
with the same prefix still finds them (an LRU cache for free). The free list is an ordered dict, so taking
a cached block back out of it is O(1).
"""
from collections import OrderedDict

from .sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids", "registration", "parent_registration")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash = None
        self.token_ids = None               # the block's tokens (a list) once registered
        self.registration = None            # unique number of the current registration; None: not findable
        self.parent_registration = None     # the previous block's registration when this one was computed


def chain_hash(token_ids, previous_hash) -> int:
    return hash((previous_hash, tuple(token_ids)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids = OrderedDict.fromkeys(range(num_blocks))   # least recently freed first
        self.hash_to_block = {}
        self.num_registrations = 0
        self.prefix_queries = 0     # full prompt blocks looked up
        self.prefix_hits = 0        # of those, found in the cache

    # ---- accounting ----------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    # ---- allocation ------------------------------------------------------------------------------------
    def _take_free_block(self) -> Block:
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) is block:
            del self.hash_to_block[block.hash]   # its old content is about to be overwritten
        block.hash = block.token_ids = block.registration = block.parent_registration = None
        block.ref_count = 1
        return block

    def _reuse(self, block: Block):
        if block.ref_count == 0:
            del self.free_block_ids[block.block_id]
        block.ref_count += 1

    def _lookup(self, block_hash: int, tokens: list, parent: "Block | None"):
        """The cached block holding `tokens` right after `parent` (None: at the start), or None."""
        cached = self.hash_to_block.get(block_hash)
        if cached is None or cached.token_ids != tokens:
            return None
        if cached.parent_registration != (parent.registration if parent is not None else None):
            return None
        return cached

    def can_allocate(self, seq: Sequence) -> bool:
        """Enough free blocks for all of seq's tokens, counting none as cached (the safe bound)."""
        return self.blocks_needed(seq.num_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence):
        """Blocks for all of seq's current tokens. Leading full blocks come from the prefix cache when their
        content matches; the last token is always computed, since its logits are needed."""
        assert not seq.block_table, "sequence already holds blocks"
        previous_hash, parent = None, None
        looking = self.enable_prefix_caching
        num_cached = 0
        for i in range(self.blocks_needed(seq.num_tokens)):
            end = (i + 1) * self.block_size
            block = None
            if looking and end < seq.num_tokens:
                tokens = seq.token_ids[end - self.block_size:end]
                previous_hash = chain_hash(tokens, previous_hash)
                cached = self._lookup(previous_hash, tokens, parent)
                self.prefix_queries += 1
                if cached is not None:
                    parent = cached
                    self._reuse(cached)
                    block = cached
                    num_cached = end
                    self.prefix_hits += 1
                else:
                    looking = False  # the shared prefix ends at the first miss
            if block is None:
                block = self._take_free_block()
            seq.block_table.append(block.block_id)
        seq.num_computed_tokens = num_cached
        seq.num_cached_prompt_tokens = num_cached
        seq.num_hashed_blocks = num_cached // self.block_size

    def register_computed_blocks(self, seq: Sequence):
        """After a step is launched: blocks that are now full become findable by content. Only blocks whose
        KV a launched step writes are registered (a later reader runs after it on the same stream), and only
        once all their tokens are known on the host (not pending)."""
        num_full = min(seq.num_computed_tokens, len(seq.token_ids)) // self.block_size
        if num_full <= seq.num_hashed_blocks or not self.enable_prefix_caching:
            return
        for i in range(seq.num_hashed_blocks, num_full):
            parent = self.blocks[seq.block_table[i - 1]] if i > 0 else None
            block = self.blocks[seq.block_table[i]]
            if block.registration is not None:
                continue   # a block found in the cache: already registered, with this very content
            tokens = seq.token_ids[i * self.block_size:(i + 1) * self.block_size]
            block.hash = chain_hash(tokens, parent.hash if parent is not None else None)
            block.token_ids = tokens
            block.parent_registration = parent.registration if parent is not None else None
            self.num_registrations += 1
            block.registration = self.num_registrations
            self.hash_to_block[block.hash] = block
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, num_full)

    def free(self, seq: Sequence):
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0

    def can_append(self, seq: Sequence) -> bool:
        """Room for the KV of seq's newest token (a new block if the last one is full)."""
        return len(seq.block_table) * self.block_size >= seq.num_tokens or self.num_free_blocks > 0

    def append_slot(self, seq: Sequence):
        if len(seq.block_table) * self.block_size < seq.num_tokens:
            seq.block_table.append(self._take_free_block().block_id)
