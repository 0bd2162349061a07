"""Train the GPT example through torch.compile(backend="pipecc"), one pipeline stage per process.

    torchrun --nproc-per-node 2 examples/train_compile.py --steps 20
    python examples/train_compile.py --steps 20          # no torchrun: every stage in this process

The training loop is the ordinary one: compile the step function that returns the loss, call
it, loss.backward(), optimizer.step(). Under torchrun each rank runs its share of the
pipeline; the loss is the full-batch loss on every rank, and after backward() the parameters
this rank holds have their gradients (the others have none, so the optimizer skips them).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from examples.train_library import batch, build, init_distributed, make_parser  # noqa: E402


def main() -> None:
    args = make_parser(__doc__.splitlines()[0]).parse_args()
    distributed = init_distributed()
    model, loss_fn = build(args)
    options = {"num_microbatches": args.microbatches, "schedule": args.schedule}  # num_stages: the world size

    def train_step(tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return loss_fn(model(tokens), target)

    step_fn = torch.compile(train_step, backend="pipecc", options=options)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    is_logger = not distributed or dist.get_rank() == 0
    for step in range(args.steps):
        tokens, target = batch(step, args)
        optimizer.zero_grad()
        loss = step_fn(tokens, target)
        loss.backward()
        optimizer.step()
        if is_logger:
            print(f"step {step + 1} loss {loss.item():.8f}", flush=True)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
