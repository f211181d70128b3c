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
