"""The KV hand-off: how a prompt's KV gets from a prefill worker into a decode worker's blocks.

The decode worker owns the blocks; the prefill worker writes into exactly those blocks. One request:

  1. reserve      router → decode: blocks for the prompt are held; the answer names them
                  (`KVDestination`: decode worker id + block ids). The first `shared_blocks` of
                  them may hold the prompt's prefix already (the decode worker's prefix cache:
                  engine/prefix_cache.py); those are shared and never written. Request: RESERVED.
  2. prefill      router → prefill, with that destination — or sent beside step 1, and the
                  destination after it by destine() (prefill.overlap_reserve). The prompt is
                  computed into the prefill's scratch blocks and its first token sampled; once
                  it has its destination the step loop hands a `WriteJob` to the link's
                  transfer thread and goes on (sender.py).
  3. begin_write  prefill → decode (awaited): "may I write request R now?" The decode worker
                  answers with a grant if R is still RESERVED and moves it to WRITING; from here
                  its blocks are not freed, not even by a cancel, until the write ends. A two-sided
                  pair posts its receive before it answers, so the sender never waits on a receive
                  that is not there (the NCCL deadlock of old). The router hears the first token
                  once the grant (or its refusal, as the request's error) is in.
  4. write        the blocks from `first_block` (= shared_blocks, checked at the grant) on only.
                  ipc:  the prefill copies its blocks straight into the granted blocks of the
                        decode worker's cache (shared memory on CPU, CUDA IPC on GPU), opened once
                        at start-up. Nothing runs on the decode side.
                  nccl / gloo: the prefill sends the blocks on the pair's own communicator; the
                        decode's receive thread takes them, the decode loop copies them into place.
  5. end          ipc: end_write(ok) is the landing. Any backend: a failed write is reported
                  with end_write(failed), which ends R at once; a two-sided pair is closed and
                  re-opened under a new epoch at its next grant, so one failure costs one request.
  6. landed       the decode loop sees LANDED (R joins the batch with its first token) or FAILED
                  (R ends with an error). A write that neither lands nor fails within
                  transport.timeout_s of its grant FAILS, and only then are its blocks freed; a
                  direct write starts within half that time or not at all, so a freed block is
                  never written into.

Steps 3 and 5 are calls from the prefill worker's link thread to the decode worker: over a socket
of their own (control.py: ~0.1 ms each way), through Ray where none can be made (~1.2 ms).
Backends are chosen per pair at start-up (`choose_backend`); the state of a request's write is
`HandoffStatus` (RESERVED → WRITING → LANDED | FAILED). Workers are known by stable ids.
"""
from engine.kv_handoff.channel import FakeHub, PairChannel, TorchPairChannel, TransferError
from engine.kv_handoff.control import ControlServer, SocketPeer
from engine.kv_handoff.receiver import Handoff, HandoffReceiver
from engine.kv_handoff.sender import DecodePeer, HandoffSender, WriteJob
from engine.kv_handoff.shared_cache import SharedCache
from engine.kv_handoff.types import (
    Backend, ControlAddress, DecodeEndpoint, HandoffStatus, KVDestination, WriteGrant, WriteIntent, WriteOutcome,
    choose_backend,
)

__all__ = [
    "Backend", "ControlAddress", "ControlServer", "DecodeEndpoint", "DecodePeer", "FakeHub", "Handoff",
    "HandoffReceiver", "HandoffSender", "HandoffStatus", "KVDestination", "PairChannel", "SharedCache", "SocketPeer",
    "TorchPairChannel", "TransferError", "WriteGrant", "WriteIntent", "WriteJob", "WriteOutcome", "choose_backend",
]
