"""examples/train_library.py and examples/train_compile.py train like eager PyTorch: under torchrun
on 2 gloo ranks, and in one process without torchrun."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from examples.train_library import batch, build, make_parser

REPO = Path(__file__).parent.parent
SMALL = ["--steps", "3", "--batch-size", "4", "--microbatches", "2", "--vocab-size", "256", "--d-model", "32",
         "--layers", "2", "--seq-len", "8", "--lr", "0.5"]


def _eager_losses(argv: list[str]) -> list[float]:
    """The loss of each step of plain SGD on the unpartitioned model, with the examples' data."""
    args = make_parser("").parse_args(argv)
    model, loss_fn = build(args)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    losses = []
    for step in range(args.steps):
        tokens, target = batch(step, args)
        optimizer.zero_grad()
        loss = loss_fn(model(tokens), target)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def _losses(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(r"^step \d+ loss ([0-9.]+)$", stdout, flags=re.M)]


def _run(command: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.dist
@pytest.mark.parametrize("script", ["train_library.py", "train_compile.py"])
def test_example_trains_under_torchrun_like_eager(script: str) -> None:
    stdout = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   f"examples/{script}", *SMALL])
    losses = _losses(stdout)
    assert len(losses) == 3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(_eager_losses(SMALL)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("script", ["train_library", "train_compile"])
def test_example_trains_in_one_process_like_eager(script: str, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Without torchrun every stage runs in this process (called in-process: no interpreter start-up)."""
    module = importlib.import_module(f"examples.{script}")
    torch._dynamo.reset()
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *SMALL])
    module.main()
    losses = _losses(capsys.readouterr().out)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(_eager_losses(SMALL)), rtol=1e-5, atol=1e-6)
