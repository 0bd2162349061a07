"""The distributed transport posts every receive of the step before the peer sends (gloo delivers
into a posted receive at once; a late one waits on the sender's progress thread, and its notice
shares the connection the peer sends on), and a receive it was not told about still arrives."""

from __future__ import annotations

import torch
import torch.distributed as dist

import pipecc
from pipecc.ir import ActionKind
from pipecc.passes.insert_comm import insert_comm
from pipecc.runtime.dist import DirectedLinks, DistTransport
from pipecc.runtime.executor import Message, incoming
from pipecc.testing import run_ranks
from models import build

NUM_MICROBATCHES = 4


def _plan():
    model, inputs, loss_fn, target = build("mlp")
    return pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=2,
                          num_microbatches=NUM_MICROBATCHES)


def _exchange(pre_post: bool) -> list[object] | None:
    """Rank 0 sends stage 0's activations of every micro-batch (filled with the micro-batch number);
    rank 1 takes them in its schedule's order: per micro-batch, the messages posted before its
    receive, and the value received."""
    plan = _plan()
    transport = DistTransport(plan.schedule, plan.stages, torch.device("cpu"), timeout_s=60.0, links=DirectedLinks(60.0))
    receives = [a for a in insert_comm(plan.schedule).rank_actions[1] if a.kind is ActionKind.RECV_F]
    if dist.get_rank() == 0:
        dist.barrier()  # rank 1 has posted (or not) before anything is sent
        for mb in range(NUM_MICROBATCHES):
            specs = incoming(receives[mb], plan.stages, plan.schedule)[1]
            transport.send(Message("F", 0, mb), [torch.full(s.shape, float(mb)) for s in specs], 1)
        transport.flush()
        return None
    if pre_post:
        transport.post_receives([incoming(a, plan.stages, plan.schedule) for a in receives])
    dist.barrier()
    seen = []
    for action in receives:
        posted = sorted(m.microbatch for m in transport.posted)
        tensors = transport.recv(*incoming(action, plan.stages, plan.schedule))
        seen.append((posted, sorted({float(t.flatten()[0]) for t in tensors})))
    transport.flush()
    return seen


def test_every_receive_of_the_step_is_posted_before_the_first_is_taken() -> None:
    seen = run_ranks(_exchange, 2, True)[1]
    for mb, (posted, values) in enumerate(seen):
        assert posted == list(range(mb, NUM_MICROBATCHES)), mb
        assert values == [float(mb)]


def test_a_receive_not_posted_ahead_still_arrives() -> None:
    seen = run_ranks(_exchange, 2, False)[1]
    assert [values for _, values in seen] == [[float(mb)] for mb in range(NUM_MICROBATCHES)]
    assert all(posted == [] for posted, _ in seen)


def _directions() -> tuple[bool, bool, bool, bool]:
    links = DirectedLinks(60.0)
    peer = 1 - dist.get_rank()
    again = DirectedLinks(60.0)  # a second runner shares the groups (made once per default group)
    payload = torch.full((4,), float(dist.get_rank()))
    received = torch.empty(4)
    work = dist.irecv(received, peer, group=links.from_peer(peer))
    dist.isend(payload, peer, group=links.to_peer(peer)).wait()
    work.wait()
    return (links.to_peer(peer) is not links.from_peer(peer),  # the two directions of a link: two groups
            links.to_peer(peer) is (links.upward if dist.get_rank() == 0 else links.downward),
            again.upward is links.upward and again.downward is links.downward,
            received.tolist() == [float(peer)] * 4)


def test_each_direction_of_a_link_has_its_own_group() -> None:
    """Rank 0 sends on the upward group and rank 1 on the downward one, so on no gloo connection do
    both sides send (each would spin on the other's lock: see DirectedLinks)."""
    for rank, checks in enumerate(run_ranks(_directions, 2)):
        assert checks == (True, True, True, True), (rank, checks)


def test_freed_memory_is_kept_for_the_next_step_on_glibc() -> None:
    """glibc's malloc accepts the settings (this machine's C library is glibc), once per process."""
    import platform

    from pipecc.runtime import memory

    if platform.libc_ver()[0] != "glibc":
        import pytest

        pytest.skip("not a glibc machine")
    assert memory.keep_freed_memory() is True
    assert memory.keep_freed_memory() is True  # applied once, remembered
