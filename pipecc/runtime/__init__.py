"""Runtimes: all ranks in one process (local) or one rank per process (torch.distributed)."""
