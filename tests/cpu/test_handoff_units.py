"""The hand-off's parts alone: backend choice, the fake channel's NCCL semantics, block copies,
the receiver's states and timeouts."""
from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from engine.kv_handoff import Backend, FakeHub, HandoffReceiver, HandoffStatus, TransferError, WriteIntent, WriteOutcome
from engine.kv_handoff.shared_cache import allocate, copy_blocks, open_cache
from engine.kv_handoff.types import choose_backend


def test_backend_choice() -> None:
    assert choose_backend("auto", "cpu", True, True) is Backend.IPC
    assert choose_backend("auto", "cpu", True, False) is Backend.GLOO  # cache could not be shared
    assert choose_backend("auto", "cpu", False, True) is Backend.GLOO
    assert choose_backend("auto", "cuda", False, True) is Backend.NCCL
    assert choose_backend("auto", "cuda", True, True) is Backend.IPC
    assert choose_backend("nccl", "cuda", True, True) is Backend.NCCL
    with pytest.raises(ValueError, match="ipc needs"):
        choose_backend("ipc", "cpu", False, True)
    with pytest.raises(ValueError, match="gloo cannot move CUDA"):
        choose_backend("gloo", "cuda", False, True)


def test_fake_send_waits_for_the_receive_and_matches_in_posting_order() -> None:
    hub = FakeHub()
    tx, rx = hub.channel("p>d", 0), hub.channel("p>d", 1)
    tx.open(0, 1)
    rx.open(0, 1)
    with pytest.raises(TransferError, match="never posted its receive"):
        tx.send(torch.ones(2), 0.1)  # nothing posted: NCCL would block here
    got: list[torch.Tensor] = []

    def receive() -> None:
        for _ in range(2):
            buf = torch.zeros(2)
            rx.recv(buf, 5)
            got.append(buf)

    t = threading.Thread(target=receive)
    t.start()
    tx.send(torch.full((2,), 1.0), 5)
    tx.send(torch.full((2,), 2.0), 5)
    t.join(5)
    assert [float(g[0]) for g in got] == [1.0, 2.0]


def test_closing_a_fake_pair_fails_its_posted_receive_at_once() -> None:
    hub = FakeHub()
    rx = hub.channel("p>d", 1)
    rx.open(0, 1)
    errors: list[str] = []

    def receive() -> None:
        try:
            rx.recv(torch.zeros(2), 30)
        except TransferError as e:
            errors.append(str(e))

    t = threading.Thread(target=receive)
    t.start()
    time.sleep(0.05)
    rx.close()
    t.join(2)
    assert not t.is_alive() and "closed" in errors[0]


def test_shared_cache_is_written_through_a_second_mapping() -> None:
    shape = (2, 2, 8, 4, 1, 2)  # [L, 2, blocks, block_size, kv_heads, head_dim]
    owner, handle = allocate(shape, torch.float32, "cpu", "test")
    assert handle is not None and float(owner.abs().sum()) == 0
    peer = open_cache(handle)  # what a prefill worker on the node maps
    src = torch.randn(shape)
    copy_blocks(peer, [5, 6, 7, 1], src, [0, 1, 2, 3])  # runs: 5-7 ← 0-2, then 1 ← 3
    assert torch.equal(owner[:, :, 5:8], src[:, :, 0:3]) and torch.equal(owner[:, :, 1], src[:, :, 3])
    assert float(owner[:, :, [0, 2, 3, 4]].abs().sum()) == 0  # nothing else touched


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_shared_cache_is_resident_in_both_mappings_before_the_first_write() -> None:
    """A page first written by a hand-off's copy faults (allocated, zeroed, then mapped in the
    writer): a 46 MB write took ~150 ms instead of ~10. Both mappings are populated when made, and
    populating keeps what the memory holds."""
    if tuple(int(x) for x in os.uname().release.split(".")[:2]) < (5, 14):
        pytest.skip("MADV_POPULATE_WRITE needs Linux 5.14")
    shape = (4, 2, 64, 16, 8, 64)  # 16 MiB of fp32
    nbytes = 4 * 2 * 64 * 16 * 8 * 64 * 4
    r0 = _resident_bytes()
    owner, handle = allocate(shape, torch.float32, "cpu", "resident")
    assert handle is not None
    r1 = _resident_bytes()
    assert r1 - r0 >= 0.9 * nbytes, f"the owner's mapping holds {(r1 - r0) >> 20} MiB of {nbytes >> 20}"
    owner[1, 1, 3].fill_(7.0)
    peer = open_cache(handle)
    assert _resident_bytes() - r1 >= 0.9 * nbytes, "the peer's mapping is not resident"
    assert float(peer[1, 1, 3].sum()) == 7.0 * 16 * 8 * 64 and float(peer.abs().sum()) == 7.0 * 16 * 8 * 64


def _intent(rid: str, n: int = 8, backend: Backend = Backend.IPC) -> WriteIntent:
    return WriteIntent(rid, "p0", n, 7, backend)


def test_a_grant_never_covers_the_blocks_that_hold_the_prefix_already() -> None:
    """The first shared_blocks of a destination are the decode worker's cached prefix, held by other
    requests too: the write must start after them, and the receiver expects only the rest."""
    rx = HandoffReceiver("d0", torch.zeros(1, 2, 8, 4, 1, 2), block_size=4, timeout_s=5)
    rx.add_peer("p0", Backend.IPC)
    refused = rx.begin(_intent("a", n=12), (5, 6, 1), shared_blocks=2)  # a writer that would start at 0
    assert not refused.ok and "hold the prefix already" in refused.reason
    shared = WriteIntent("b", "p0", 12, 7, Backend.IPC, first_block=2)
    assert rx.begin(shared, (5, 6, 1), shared_blocks=2).ok
    rx.end(WriteOutcome("b", "p0", True, nbytes=16))
    landed, _ = rx.poll()
    assert [h.block_ids for h in landed] == [(1,)]


def test_receiver_states_and_timeout() -> None:
    rx = HandoffReceiver("d0", torch.zeros(1, 2, 8, 4, 1, 2), block_size=4, timeout_s=0.1)
    assert not rx.begin(_intent("a"), (0, 1)).ok  # unknown peer
    rx.add_peer("p0", Backend.IPC)
    assert not rx.begin(_intent("a", backend=Backend.GLOO), (0, 1)).ok  # not this pair's backend
    assert not rx.begin(_intent("a", n=9), (0, 1)).ok  # does not fit the reservation
    assert rx.begin(_intent("a"), (0, 1, 2)).ok and rx.begin(_intent("b"), (3, 4)).ok
    rx.end(WriteOutcome("a", "p0", True, nbytes=64))
    rx.end(WriteOutcome("a", "p9", False, "not the writer"))  # ignored: another source
    landed, failed = rx.poll()
    assert [h.request_id for h in landed] == ["a"] and landed[0].block_ids == (0, 1) and not failed
    time.sleep(0.15)
    landed, failed = rx.poll()  # b never ended: failed by its timeout
    assert not landed and [h.request_id for h in failed] == ["b"]
    assert failed[0].status is HandoffStatus.FAILED and "did not land" in (failed[0].error or "")
    assert rx.pending == 0 and rx.bytes_placed == 0
