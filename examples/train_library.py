"""Train the GPT example through pipecc's library API, one pipeline stage per process.

    torchrun --nproc-per-node 2 examples/train_library.py --steps 20
    python examples/train_library.py --steps 20          # no torchrun: every stage in this process

Every rank compiles the same plan (compilation is deterministic), draws the same batch each
step (a seeded generator), and runs its own stages; the loss is broadcast from the last stage
so every rank can log it. The optimizer holds only this rank's parameters.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import pipecc  # noqa: E402
from examples import gpt  # noqa: E402


def make_parser(description: str) -> argparse.ArgumentParser:
    """The options both training examples share."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32)
    return parser


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, Callable[..., torch.Tensor]]:
    """The GPT model and its loss; the same seed on every rank gives the same weights."""
    model, _, loss_fn, _ = gpt.build(batch_size=args.batch_size, vocab_size=args.vocab_size,
                                     d_model=args.d_model, n_layers=args.layers, seq_len=args.seq_len)
    return model, loss_fn


def batch(step: int, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Step `step`'s (tokens, next tokens): random, but the same on every rank."""
    generator = torch.Generator().manual_seed(1000 + step)
    sequence = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1), generator=generator)
    return sequence[:, :-1].contiguous(), sequence[:, 1:].contiguous()


def init_distributed() -> bool:
    """Join torchrun's process group (gloo on CPU); False when not launched by torchrun."""
    if "RANK" not in os.environ:
        return False
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def main() -> None:
    args = make_parser(__doc__.splitlines()[0]).parse_args()
    distributed = init_distributed()
    model, loss_fn = build(args)
    tokens, target = batch(0, args)
    num_stages = dist.get_world_size() if distributed else 2
    plan = pipecc.compile(model, (tokens,), loss_fn=loss_fn, example_target=target, num_stages=num_stages,
                          num_microbatches=args.microbatches, schedule=args.schedule)
    runner = plan.runner() if distributed else None
    params = list(runner.parameters()) if runner else list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=args.lr)
    is_logger = not distributed or dist.get_rank() == 0
    if is_logger:
        print(plan.report().splitlines()[0], flush=True)
    for step in range(args.steps):
        tokens, target = batch(step, args)
        optimizer.zero_grad()
        if runner:
            loss = runner.step(tokens, target=target, broadcast_loss=True)
        else:
            loss = plan.run_local(tokens, target=target)
        optimizer.step()
        if is_logger:
            print(f"step {step + 1} loss {float(loss):.8f}", flush=True)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
