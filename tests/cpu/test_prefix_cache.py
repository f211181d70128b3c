import random

import pytest

from engine.prefix_cache import PrefixCache, block_digests

BS = 4


def test_a_prompt_reuses_the_whole_blocks_it_shares_and_never_the_last_tokens_block() -> None:
    c = PrefixCache(16, BS)
    a = list(range(10))  # blocks [0-3] [4-7], partial [8 9]
    assert c.allocate_prompt("a", a) == 0
    c.release("a", computed=10)
    assert c.num_cached == 2 and c.num_used == 0
    assert c.allocate_prompt("b", a[:8] + [99, 98, 97]) == 8  # both full blocks
    assert c.table("b")[:2] == [0, 1]
    assert c.allocate_prompt("c", a[:8]) == 4  # exactly two blocks: the second holds the last token
    assert c.allocate_prompt("d", [7] + a[1:10]) == 0  # a different first token: nothing after it matches
    c.check()


def test_a_shared_block_stays_held_until_its_last_holder_releases_it() -> None:
    c = PrefixCache(8, BS)
    c.allocate_prompt("a", list(range(9)))
    c.release("a", 9)
    c.allocate_prompt("b", list(range(9)))
    c.allocate_prompt("c", list(range(9)))
    assert c.table("b")[:2] == c.table("c")[:2] == [0, 1]
    c.release("b", 9)
    assert c.num_cached == 0 and c.num_used == 3  # blocks 0, 1 (still c's) + c's own for its last token
    c.check()
    c.release("c", 9)
    assert c.num_used == 0 and c.num_cached == 2
    c.check()


def test_room_comes_from_free_blocks_then_from_the_least_recently_used_cached_tail() -> None:
    c = PrefixCache(6, BS)
    c.allocate_prompt("a", list(range(12)))  # 3 blocks
    c.release("a", 12)
    c.allocate_prompt("b", list(range(100, 109)))  # 3 blocks: the free ones
    assert c.num_cached == 3
    c.release("b", 0)  # nothing computed: freed, not cached
    assert c.allocate_prompt("x", list(range(200, 213))) is not None  # 4 blocks: 3 free + 1 evicted from a
    assert c.num_cached == 2
    c.release("x", 0)
    assert c.allocate_prompt("again", list(range(12)) + [5]) == 8  # a's first two blocks survived: its last went first
    c.check()


def test_no_room_changes_nothing() -> None:
    c = PrefixCache(4, BS)
    c.allocate_prompt("a", list(range(8)))
    c.release("a", 8)
    c.allocate_prompt("hold", list(range(9)))  # its 2 cached blocks + 1 fresh: 1 block left
    before = (c.num_used, c.num_cached, c.hit_tokens)
    assert c.allocate_prompt("big", list(range(50, 60))) is None  # needs 3
    assert (c.num_used, c.num_cached, c.hit_tokens) == before
    c.check()


def test_a_prompt_waits_for_the_one_computing_its_prefix_and_finds_each_block_once_computed() -> None:
    c = PrefixCache(16, BS)
    c.allocate_prompt("a", list(range(12)))
    assert c.allocate_prompt("twin", list(range(12)) + [5]) is None  # a is computing its first block: wait
    assert c.allocate_prompt("other", [7] * 12) == 0  # nothing shared: no wait
    c.commit("a", 8)  # a step computed a's first 8 tokens: blocks 0, 1 findable while a still holds them
    assert c.num_cached == 0 and c.allocate_prompt("twin", list(range(12)) + [5]) is None  # block 2 still computing
    c.release("a", computed=9)  # cancelled with block 2 half done: block 2 is freed, not kept
    assert c.num_cached == 2
    assert c.allocate_prompt("twin", list(range(12)) + [5]) == 8
    c.release("twin", 13)
    assert c.num_cached == 3 and c.allocate_prompt("late", list(range(12)) + [6]) == 12
    c.check()


def test_disabled_keeps_nothing() -> None:
    c = PrefixCache(8, BS, enabled=False)
    c.allocate_prompt("a", list(range(9)))
    c.release("a", 9)
    assert c.num_cached == 0 and c.allocate_prompt("b", list(range(9))) == 0


def test_digests_cover_the_whole_prefix() -> None:
    one, two = block_digests([1, 2, 3, 4, 5, 6, 7, 8], BS), block_digests([9, 2, 3, 4, 5, 6, 7, 8], BS)
    assert len(one) == 2 and one[0] != two[0] and one[1] != two[1]  # same second block, other prefix
    assert block_digests([1, 2, 3], BS) == []


@pytest.mark.parametrize("seed", range(3))
def test_random_traffic_keeps_every_block_accounted_for(seed: int) -> None:
    rng = random.Random(seed)
    c = PrefixCache(40, BS)
    stems = [[rng.randrange(50) for _ in range(rng.randrange(4, 30))] for _ in range(5)]
    live: dict[str, list[int]] = {}
    for i in range(400):
        if live and rng.random() < 0.2:  # a step computed part of a prompt
            owner = rng.choice(sorted(live))
            c.commit(owner, rng.randrange(len(live[owner]) + 1))
        elif live and (rng.random() < 0.5 or len(live) > 6):
            owner = rng.choice(sorted(live))
            c.release(owner, rng.choice([0, len(live[owner]), rng.randrange(len(live[owner]) + 1)]))
            del live[owner]
        else:
            tokens = rng.choice(stems)[: rng.randrange(1, 30)] + [rng.randrange(50) for _ in range(rng.randrange(3))]
            got = c.allocate_prompt(f"r{i}", tokens)
            if got is not None:
                assert got % BS == 0 and got < len(tokens)
                assert len(c.table(f"r{i}")) == -(-len(tokens) // BS)
                live[f"r{i}"] = tokens
        c.check()
    assert c.hit_tokens > 0


def test_a_salt_keeps_prefixes_apart() -> None:
    c = PrefixCache(16, BS)
    c.allocate_prompt("a", list(range(9)), salt="tenant-a")
    c.release("a", 9)
    assert c.allocate_prompt("plain", list(range(9))) == 0
    assert c.allocate_prompt("b", list(range(9)), salt="tenant-b") == 0
    assert c.allocate_prompt("a2", list(range(9)), salt="tenant-a") == 8
    c.check()


def test_an_owner_with_fresh_blocks_shares_the_cached_prefix_and_its_output_is_cached_too() -> None:
    """The decode side: blocks reserved before the prompt is looked up (share_prefix), and a sequence
    that grows past its prompt (commit with the longer token list)."""
    c = PrefixCache(16, BS)
    prompt = list(range(10))
    c.allocate("a", 10)
    c.track("a", prompt, "")
    output = [50, 51, 52, 53, 54, 55, 56]
    c.grow("a", 17)  # as it decoded: 5 blocks
    assert c.release("a", 16, prompt + output) == 5  # 16 tokens of KV: 4 whole blocks, output ones too
    assert c.num_cached == 4
    c.allocate("b", 13)  # 4 fresh blocks
    assert c.share_prefix("b", prompt + output[:3]) == 12  # 3 blocks (the 4th holds its last token)
    assert c.table("b")[:3] == c.find(block_digests(prompt + output, BS))[:3]
    c.check()
    c.release("b", 0)
    c.allocate("twin", 13)
    c.allocate("c", 13)
    assert c.share_prefix("c", [9] * 13) == 0 and c.share_prefix("twin", [9] * 13) is None  # c computes those
    c.commit("c", 12)
    assert c.share_prefix("twin", [9] * 13) == 12
    c.check()
