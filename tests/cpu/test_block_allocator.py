import pytest

from engine.block_allocator import BlockAllocator


def test_allocate_free_and_integrity() -> None:
    a = BlockAllocator(num_blocks=8, block_size=4)
    x = a.allocate("x", 9)  # 3 blocks
    assert x is not None and len(x.blocks) == 3 and a.num_free == 5
    y = a.allocate("y", 20)  # 5 blocks
    assert y is not None and a.num_free == 0
    assert set(x.blocks).isdisjoint(y.blocks)
    assert a.allocate("z", 1) is None  # all-or-nothing, no partial grab
    a.check()
    assert a.free("x") == 3 and a.num_free == 3
    assert a.free("x") == 0  # double free is a no-op
    a.check()
    a.free("y")
    assert a.num_free == 8 and a.num_used == 0
    a.check()


def test_slots_follow_the_block_table() -> None:
    a = BlockAllocator(num_blocks=4, block_size=2)
    a.allocate("pad", 2)
    alloc = a.allocate("r", 3)
    assert alloc is not None
    b0, b1 = alloc.blocks
    assert a.slots("r", 0, 3) == [b0 * 2, b0 * 2 + 1, b1 * 2]
    with pytest.raises(IndexError):
        a.slots("r", 0, 5)


def test_duplicate_owner_and_corruption_are_caught() -> None:
    a = BlockAllocator(num_blocks=4, block_size=2)
    a.allocate("r", 2)
    with pytest.raises(KeyError):
        a.allocate("r", 2)
    a._free.append(a.table("r")[0])  # simulate a bug: a block both free and owned
    with pytest.raises(AssertionError):
        a.check()


def test_registered_blocks_are_cached_when_let_go_shared_by_reference_and_evicted_last_first() -> None:
    a = BlockAllocator(num_blocks=4, block_size=2)
    x = a.allocate("x", 6)  # 3 blocks
    assert x is not None
    for i, b in enumerate(x.blocks):
        a.register(b, bytes([i]))
    assert a.free("x") == 3 and a.num_cached == 3 and a.num_free == 4 and a.num_used == 0
    head = a.find([b"\x00", b"\x01", b"\x09"])
    assert head == list(x.blocks[:2])  # the run stops at the first unknown digest
    y = a.allocate("y", 6, head)  # 2 held again + 1 fresh (the free one)
    z = a.allocate("z", 4, head)  # the same 2, shared
    assert y is not None and z is not None and y.blocks[:2] == z.blocks == tuple(head)
    assert a.num_used == 3 and a.num_cached == 1
    a.free("y")
    assert a.find([b"\x00", b"\x01"]) == head  # z still holds them
    assert a.grow("z", 8) == [y.blocks[2], x.blocks[2]]  # the free block, then the cached one is evicted
    assert a.find([b"\x00", b"\x01", b"\x02"]) == head  # and is findable no more
    a.check()
    a.free("z")
    a.check()
    assert a.num_used == 0 and a.num_cached == 2


def test_share_head_swaps_fresh_blocks_for_cached_ones_and_frees_them() -> None:
    a = BlockAllocator(num_blocks=6, block_size=2)
    old = a.allocate("old", 4)
    assert old is not None
    a.register(old.blocks[0], b"p0")
    a.register(old.blocks[1], b"p1")
    a.free("old")
    fresh = a.allocate("new", 6)
    assert fresh is not None and set(fresh.blocks).isdisjoint(old.blocks)
    used = a.num_used
    a.share_head("new", a.find([b"p0", b"p1"]))
    assert a.table("new") == [*old.blocks, fresh.blocks[2]] and a.num_used == used and a.num_cached == 0
    a.check()
    with pytest.raises(KeyError):  # only a held block's KV is complete
        a.register(fresh.blocks[0], b"p9")
