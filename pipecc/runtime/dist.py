"""Distributed runtime: this process runs its rank's actions; tensors move by torch.distributed
point-to-point messages (gloo on CPU, NCCL on GPU). Every receive has a timeout."""

from __future__ import annotations

import datetime
import itertools
import json
import logging
import time
import weakref
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from pipecc.errors import ConfigError, PeerLostError
from pipecc.ir import Action, ActionKind, Schedule, Stage, TensorSpec, named_stage_parameters, shared_parameters
from pipecc.passes.insert_comm import insert_comm
from pipecc.passes.rng import dropout_step
from pipecc.passes.simulate import TimedAction
from pipecc.runtime import memory
from pipecc.runtime.executor import Message, RankExecutor, TimelineRecorder, incoming, param_device

log = logging.getLogger(__name__)
DEFAULT_TIMEOUT_S = 300.0


class DirectedLinks:
    """The process groups point-to-point messages travel on: with gloo, one for messages to a
    higher rank and one for messages to a lower rank, so that on every connection only one side
    sends data.

    Why: a gloo connection has one lock, which the sending thread holds while it writes and the
    progress thread must take to read. When two ranks send to each other at once over one
    connection, each progress thread finds its lock held and spins until its scheduler slice ends
    (1-5 ms, while the senders wait). Measured on a 2-core machine, 2 ranks exchanging 16 KB or
    256 KB every 0.5 ms of compute: 12-24 of 300 sends stalled over 1 ms on one group and 0-1 on
    two, and an iteration took 1.22 ms against 0.69 ms. 1F1B sends activations and gradients
    across the same link at once every micro-batch. Other backends keep the default group.

    Creating the groups is a collective: every rank builds its runner (and so this) in the same
    order. They are made once per default process group and shared by every runner of it. Only
    torch's registry holds them: once destroy_process_group() has dropped them they must go with
    it (a gloo group destroyed later, at interpreter exit, can abort the process)."""

    # per default group (by id): weak references to it and to the (upward, downward) groups, or to
    # it alone where the default group serves
    _made: dict[int, tuple[weakref.ref, ...]] = {}

    def __init__(self, timeout_s: float) -> None:
        world = dist.group.WORLD
        made = self._made.get(id(world))
        if made is None or made[0]() is not world:  # none yet, or the default group was destroyed and made anew
            groups = (_new_gloo_group(timeout_s), _new_gloo_group(timeout_s)) if dist.get_backend() == "gloo" else ()
            made = self._made[id(world)] = tuple(weakref.ref(g) for g in (world, *groups))
        self._groups = made[1:]
        self.rank = dist.get_rank()

    @property
    def upward(self) -> dist.ProcessGroup | None:
        """The group of messages to a higher rank (None: the default group)."""
        return self._group(0)

    @property
    def downward(self) -> dist.ProcessGroup | None:
        """The group of messages to a lower rank (None: the default group)."""
        return self._group(1)

    def to_peer(self, peer: int) -> dist.ProcessGroup | None:
        """The group a message from this rank to `peer` travels on."""
        return self.upward if peer > self.rank else self.downward

    def from_peer(self, peer: int) -> dist.ProcessGroup | None:
        """The group a message from `peer` to this rank travels on."""
        return self.upward if peer < self.rank else self.downward

    def _group(self, index: int) -> dist.ProcessGroup | None:
        if not self._groups:
            return None
        group = self._groups[index]()
        if group is None:
            raise ConfigError("this runner's process group was destroyed (torch.distributed.destroy_process_group).\n"
                              "Make a new runner with plan.runner() after init_process_group().")
        return group


def _new_gloo_group(timeout_s: float) -> dist.ProcessGroup:
    """A gloo group of every rank; a peer that never joins fails it within `timeout_s`."""
    try:
        return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as err:
        raise _lost(err, "connecting to the other ranks for the pipeline's messages") from None


class DistTransport:
    """isend for every outgoing tensor (waited at the end of the step), irecv + timed wait for
    incoming, on the groups of `links` (DirectedLinks).

    Every receive of the step is posted at its start (`post_receives`), before the peer sends.
    Gloo delivers a message into a posted receive at once; one whose receive comes later waits for
    the sender's progress thread, which on a busy core can take a scheduler tick (measured on a
    2-core machine: median 3 ms against 0.2 ms pre-posted). And a receive posted mid-step sends
    its recv-ready notice on the connection the peer is sending on, whose lock the peer's send then
    spins on: with a window of the next 2 receives per link instead of all, GPipe steps ran 4-25%
    longer (MLP 4.4 against 3.3 ms, U-Net 25.2 against 22.9 ms). The buffers of a step's incoming
    messages are allocated at its start (the simulator's peak memory counts them from there)."""

    def __init__(self, schedule: Schedule, stages: Sequence[Stage], device: torch.device, timeout_s: float,
                 links: DirectedLinks) -> None:
        self.links = links
        self.num_stages = schedule.num_stages
        self.num_microbatches = schedule.num_microbatches
        self.per_message = 1 + max((len(s.inputs) for s in stages), default=0)
        self.device = device
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.pending: list[tuple[dist.Work, torch.Tensor]] = []
        self.posted: dict[Message, tuple[list[torch.Tensor], list[dist.Work]]] = {}

    def _tag(self, message: Message, index: int) -> int:
        direction = 0 if message.direction == "F" else 1
        return ((direction * self.num_stages + message.stage) * self.num_microbatches + message.microbatch) \
            * self.per_message + index

    def send(self, message: Message, tensors: list[torch.Tensor], dst_rank: int) -> None:
        for i, tensor in enumerate(tensors):
            tensor = tensor.contiguous()
            try:
                self.pending.append((dist.isend(tensor, dst_rank, tag=self._tag(message, i),
                                                group=self.links.to_peer(dst_rank)), tensor))
            except RuntimeError as err:  # gloo fails the post at once when the link is already down
                raise _lost(err, f"sending {_what(message)} of stage {message.stage} for micro-batch "
                                 f"{message.microbatch} to rank {dst_rank}") from None

    def post_receives(self, receives: Sequence[tuple[Message, list[TensorSpec], int]]) -> None:
        """Post the step's receives, before any is taken; `receives` is what the rank's RECV actions
        take, in order (`incoming` of each, computed once per runner)."""
        for message, specs, src_rank in receives:
            self._post(message, specs, src_rank)

    def _post(self, message: Message, specs: Sequence[TensorSpec], src_rank: int) -> None:
        buffers = [torch.empty(s.shape, dtype=s.torch_dtype, device=self.device) for s in specs]
        try:
            group = self.links.from_peer(src_rank)
            works = [dist.irecv(b, src_rank, tag=self._tag(message, i), group=group)
                     for i, b in enumerate(buffers)]
        except RuntimeError as err:
            raise _lost(err, f"receiving {_what(message)} of stage {message.stage} for micro-batch "
                             f"{message.microbatch} from rank {src_rank}") from None
        self.posted[message] = (buffers, works)

    def recv(self, message: Message, specs: Sequence[TensorSpec], src_rank: int) -> list[torch.Tensor]:
        if message not in self.posted:  # not posted ahead: post it now
            self._post(message, specs, src_rank)
        buffers, works = self.posted.pop(message)
        for work in works:
            _wait(work, self.timeout, f"{_what(message)} of stage {message.stage} for micro-batch "
                                      f"{message.microbatch} from rank {src_rank}")
        return buffers

    def flush(self) -> None:
        assert not self.posted, f"receives posted but never taken: {list(self.posted)}"
        for work, _ in self.pending:
            _wait(work, self.timeout, "a send to finish")
        self.pending.clear()


def _what(message: Message) -> str:
    return "activations" if message.direction == "F" else "gradients"


def connection_lost(text: str) -> bool:
    """Whether an error message is gloo's (or a socket's) word for a link whose other end went away."""
    return any(s in text for s in ("closed by peer", "reset by peer", "Broken pipe", "Connection refused"))


def _connection_lost(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and connection_lost(str(err))


def _lost(err: RuntimeError, doing: str) -> PeerLostError:
    """The PeerLostError for a torch.distributed call that failed while `doing` something."""
    reason = str(err).splitlines()[0] if str(err).strip() else type(err).__name__
    if _connection_lost(err):
        reason = "a rank closed its connection (it died, was killed, or exited after an error)"
    return PeerLostError(f"rank {dist.get_rank()} gave up {doing}: {reason}.\n"
                         "The peer rank probably failed or was killed; look at its error first.")


def _wait(work: dist.Work, timeout: datetime.timedelta, what: str) -> None:
    try:
        ok = work.wait(timeout)
    except RuntimeError as err:
        raise _lost(err, f"waiting for {what}") from None
    if ok is False:
        raise PeerLostError(
            f"rank {dist.get_rank()} waited {timeout.total_seconds():.0f} s for {what}.\n"
            "The peer rank probably failed; raise timeout_s if its stage is just slow."
        )


@dataclass(frozen=True)
class FailureReport:
    """What one rank posts when its step fails: where it was and what it raised."""

    rank: int
    action: str  # e.g. "2F1"; "" when it failed before its first action (input checks)
    stage: int  # -1 with no action
    microbatch: int
    error: str  # "ValueError: boom": type and first line
    waiting: bool  # it only lost a peer (a receive failed or timed out): a symptom, not a cause

    def describe(self) -> str:
        where = f"at action {self.action} (stage {self.stage}, micro-batch {self.microbatch})" if self.action \
            else "before its first action"
        return f"rank {self.rank} failed {where}: {self.error}"


class FailureBoard:
    """Failure reports of one step, kept in the process group's store (the rendezvous key-value
    store, reachable when the point-to-point links are not): every rank that fails posts one, so a
    rank that only lost its peer can name the rank and stage that failed first.

    A rank whose report stays missing after `grace_s` died, was killed, or hangs."""

    def __init__(self, prefix: str, num_ranks: int, grace_s: float) -> None:
        self.prefix, self.num_ranks, self.grace_s = prefix, num_ranks, grace_s
        try:
            self.store: dist.Store | None = dist.distributed_c10d._get_default_store()
        except (RuntimeError, AttributeError, ValueError):  # a group made without a store: timeouts only
            self.store = None

    def post(self, report: FailureReport) -> None:
        if self.store is not None:
            try:
                self.store.set(f"{self.prefix}/rank{report.rank}", json.dumps(asdict(report)))
            except RuntimeError as err:  # the store's host died: the others will time out instead
                log.warning("cannot post the failure report of rank %d: %s", report.rank, err)

    def collect(self) -> dict[int, FailureReport] | None:
        """The reports posted within grace_s (sooner once one names a cause); None if the store is gone.

        Then it waits (within the same grace_s) until every rank that posted a waiting report has
        read too: the store lives in one rank's process, which must not exit while others read."""
        if self.store is None:
            return None
        deadline = time.monotonic() + self.grace_s
        try:
            while True:
                reports = self._reports()
                if len(reports) == self.num_ranks or any(not r.waiting for r in reports.values()) \
                        or time.monotonic() >= deadline:
                    break
                time.sleep(0.05)
            read = self.store.add(f"{self.prefix}/read", 1)
            while read < sum(r.waiting for r in self._reports().values()) and time.monotonic() < deadline:
                time.sleep(0.05)
                read = self.store.add(f"{self.prefix}/read", 0)
        except RuntimeError:  # the store's host is gone
            return None
        return reports

    def _reports(self) -> dict[int, FailureReport]:
        reports = {}
        for rank in range(self.num_ranks):
            key = f"{self.prefix}/rank{rank}"
            if self.store.check([key]):
                reports[rank] = FailureReport(**json.loads(self.store.get(key)))
        return reports


def failure_summary(own: FailureReport, reports: dict[int, FailureReport] | None, schedule: Schedule) -> str:
    """Line one of a waiting rank's error: the rank and stage that failed first, as far as the reports tell."""
    if reports is None:
        return f"{own.describe()}; the other ranks' reports are unreadable (the rendezvous store is gone, " \
               "so the rank hosting it, usually rank 0, probably died)"
    causes = sorted((r for r in reports.values() if not r.waiting), key=lambda r: r.rank)
    if causes:
        return causes[0].describe()
    silent = [r for r in range(schedule.num_ranks) if r not in reports]
    if not silent:
        return f"every rank lost a peer and none failed on its own; first: {own.describe()}"
    named = ", ".join(f"rank {r} (stage{'s' if len(schedule.stages_of(r)) > 1 else ''} "
                      f"{', '.join(map(str, schedule.stages_of(r)))})" for r in silent)
    return f"{named} sent no failure report: died, was killed, or hangs"


_runner_ids = itertools.count()


class DistRunner:
    """Runs the stages that a plan places on this process's rank, one training step per `step`."""

    def __init__(self, stages: Sequence[Stage], schedule: Schedule, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 validate: object = None, check_finite: bool = False, dropout_seed: int = 0,
                 record_timeline: bool = False, keep_freed_memory: bool = True) -> None:
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise ConfigError(f"timeout_s={timeout_s!r}; it must be a positive number of seconds.\n"
                              f"Pass the longest a rank may wait for a peer, e.g. timeout_s={DEFAULT_TIMEOUT_S:.0f}.")
        if not dist.is_available() or not dist.is_initialized():
            raise ConfigError(
                "plan.runner() needs an initialised torch.distributed process group.\n"
                "Launch with torchrun and call torch.distributed.init_process_group() first, "
                "or use plan.run_local() to run every rank in this process."
            )
        if dist.get_world_size() != schedule.num_ranks:
            raise ConfigError(
                f"the plan has {schedule.num_ranks} ranks but the process group has {dist.get_world_size()}.\n"
                f"Launch with --nproc-per-node={schedule.num_ranks} (or compile for {dist.get_world_size()} ranks)."
            )
        self.rank = dist.get_rank()
        self.stages = tuple(stages)
        self.schedule = schedule
        self.local_stages = tuple(s for s in stages if s.rank == self.rank)
        self.actions = insert_comm(schedule).rank_actions[self.rank]
        self.receives = tuple(incoming(a, self.stages, schedule) for a in self.actions
                              if a.kind in (ActionKind.RECV_F, ActionKind.RECV_B))
        self.device = param_device([s.graph for s in self.local_stages])
        if keep_freed_memory and self.device.type == "cpu":
            memory.keep_freed_memory()  # no page faults to touch each step's activations again (runtime/memory.py)
        self.timeout_s = timeout_s
        self._validate = validate
        self.links = DirectedLinks(timeout_s)  # a collective: every rank makes its runners in the same order
        self.shared = shared_parameters(stages)
        # the tied weights this rank holds: (message tag, canonical name, holders), in the same order on every rank
        self._own_shared = tuple((_SHARED_TAG + index, name, ranks)
                                 for index, (name, ranks) in enumerate(sorted(self.shared.items()))
                                 if self.rank in ranks)
        self.check_finite = check_finite
        self.dropout_seed = dropout_seed
        self._failure_prefix = f"pipecc/failures/{next(_runner_ids)}"  # every rank makes runners in the same order
        self._num_steps = 0
        self.record_timeline = record_timeline  # timestamps of every action: gather_events() after a step
        self._events: tuple[TimedAction, ...] | None = None
        self.last_shared_sync_ms = 0.0  # the last step's tied-weight gradient exchange, waits for peers included

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters, under their names in the original model (each once)."""
        return named_stage_parameters(self.local_stages)

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, param in self.named_parameters():
            yield param

    def step(self, *inputs: torch.Tensor, target: torch.Tensor, broadcast_loss: bool = False) -> torch.Tensor | None:
        """One training step: gradients accumulate in this rank's parameters. Returns the batch loss
        on the rank holding the last stage (on every rank with broadcast_loss=True), else None."""
        self._num_steps += 1
        transport = DistTransport(self.schedule, self.stages, self.device, self.timeout_s, self.links)
        recorder = self._start_timeline() if self.record_timeline else None
        executor = RankExecutor(self.stages, self.schedule, transport, self.device, recorder=recorder,
                                check_finite=self.check_finite)
        try:
            if callable(self._validate):
                self._validate(inputs, target)
            params = dict(self.named_parameters())
            before = self._stash_shared_grads(params)
            transport.post_receives(self.receives)
            shared_receives = self._post_shared_receives(params)
            with dropout_step(self.dropout_seed, self._num_steps - 1):  # the runner's steps count from 0
                loss = executor.run(self.actions, inputs, target)
            if recorder is not None:
                self._events = recorder.events()
            synced = time.perf_counter()
            self._sum_shared_grads(params, before, shared_receives)
            self.last_shared_sync_ms = (time.perf_counter() - synced) * 1e3
            if broadcast_loss:
                loss = self._broadcast_loss(loss)
        except Exception as err:
            raise self._report_failure(err, executor.current) from None
        return loss

    def _start_timeline(self) -> TimelineRecorder:
        """A recorder whose time 0 is the end of a barrier of all ranks, so their clocks line up."""
        _wait(dist.barrier(async_op=True), datetime.timedelta(seconds=self.timeout_s), "every rank to start the step")
        return TimelineRecorder(self.schedule.stage_to_rank)

    def gather_events(self) -> tuple[TimedAction, ...]:
        """Every rank's recorded actions of the last step, on every rank (a collective: all ranks call
        it), ordered by rank then start; times in ms since the barrier that began the step.

        Needs plan.runner(record_timeline=True) and a step run; the events of each rank come in the
        order it ran them."""
        if not self.record_timeline or self._events is None:
            raise ConfigError("gather_events() has no events: "
                              + ("this runner records none.\nCreate it with plan.runner(record_timeline=True)."
                                 if not self.record_timeline else "no step has run yet.\nCall runner.step(...) first."))
        gathered: list[tuple[TimedAction, ...] | None] = [None] * self.schedule.num_ranks
        dist.all_gather_object(gathered, self._events)
        return tuple(event for events in gathered for event in (events or ()))

    def _report_failure(self, err: Exception, action: Action | None) -> Exception:
        """Post this rank's failure; the error to raise. A rank that only lost a peer raises a
        PipelineRuntimeError naming the rank and stage that failed first; any other error is re-raised
        as it is, with a note saying where it happened."""
        lines = str(err).strip().splitlines()
        own = FailureReport(self.rank, str(action) if action else "", action.stage if action else -1,
                            action.microbatch if action else -1,
                            f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ."),
                            waiting=isinstance(err, PeerLostError) or _connection_lost(err))
        board = FailureBoard(f"{self._failure_prefix}/step{self._num_steps}", self.schedule.num_ranks,
                             grace_s=min(3.0, self.timeout_s))
        board.post(own)
        if not own.waiting:
            err.add_note(f"(pipecc: {own.describe()})")
            return err
        where = f"at action {action} (stage {action.stage}, micro-batch {action.microbatch})" if action \
            else "before its first action"
        stopped = PeerLostError(
            f"rank {self.rank} stopped {where}: {failure_summary(own, board.collect(), self.schedule)}.\n"
            "Fix that rank's error (see its log); this rank only waited for it."
        )
        stopped.add_note(f"this rank's own error: {err}")
        return stopped

    def _post_shared_receives(self, params: dict[str, nn.Parameter]
                              ) -> dict[str, dict[int, tuple[torch.Tensor, dist.Work]]]:
        """Before the step's actions: a receive for each peer's contribution to each tied weight this
        rank holds, so that a peer finishing first delivers at once (see DistTransport)."""
        posted: dict[str, dict[int, tuple[torch.Tensor, dist.Work]]] = {}
        for tag, name, ranks in self._own_shared:
            posted[name] = {}
            for peer in ranks:
                if peer != self.rank:
                    buffer = torch.empty_like(params[name])
                    posted[name][peer] = (buffer, dist.irecv(buffer, peer, tag=tag, group=self.links.from_peer(peer)))
        return posted

    def _stash_shared_grads(self, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor | None]:
        """The gradients of the tied weights this rank holds, as they were before the step; each
        parameter's .grad is set to None, so after the actions it holds only this step's
        contribution (what the holders exchange), with no copy of the old gradient taken."""
        before = {}
        for _, name, _ in self._own_shared:
            before[name], params[name].grad = params[name].grad, None
        return before

    def _sum_shared_grads(self, params: dict[str, nn.Parameter], before: dict[str, torch.Tensor | None],
                          posted: dict[str, dict[int, tuple[torch.Tensor, dist.Work]]]) -> None:
        """A parameter held by several ranks (tied weights) gets the sum of their gradients, on each,
        added to the gradient it had before the step (`_stash_shared_grads`).

        Only this step's contribution is exchanged, so gradient accumulation across steps stays right.
        The sum runs in rank order on every holder, so all holders end bitwise equal."""
        for tag, name, ranks in self._own_shared:
            param = params[name]
            own = param.grad if param.grad is not None else torch.zeros_like(param)
            contributions: dict[int, torch.Tensor] = {self.rank: own}
            works = []
            for peer in ranks:
                if peer == self.rank:
                    continue
                works.append(dist.isend(own.contiguous(), peer, tag=tag, group=self.links.to_peer(peer)))
                contributions[peer], received = posted[name][peer]
                works.append(received)
            for work in works:
                _wait(work, datetime.timedelta(seconds=self.timeout_s), f"the gradient of shared parameter {name}")
            total = contributions[ranks[0]]  # this step's own gradient or a receive buffer: both ours to add into
            for peer in ranks[1:]:
                total += contributions[peer]
            param.grad = total if before[name] is None else before[name].add_(total)

    def _broadcast_loss(self, loss: torch.Tensor | None) -> torch.Tensor:
        last_rank = self.schedule.stage_to_rank[-1]
        value = loss.detach().reshape(()).clone() if loss is not None else torch.zeros((), device=self.device)
        _wait(dist.broadcast(value, src=last_rank, async_op=True), datetime.timedelta(seconds=self.timeout_s),
              f"the loss from rank {last_rank}")
        return value


_SHARED_TAG = 1 << 28
