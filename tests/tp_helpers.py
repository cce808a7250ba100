"""Logits processors for the tensor-parallel tests: importable by the worker processes (they unpickle them)."""

import os
import sys
import time


class PrintEachStep:
    """Prints one line per generated token on each rank, to stdout (and, on rank 1, a line to stderr)."""

    def __call__(self, input_ids, scores):
        rank = os.environ.get("RANK")
        print(f"token {input_ids.shape[1]} on rank {rank}")
        if rank == "1":
            print(f"warning {input_ids.shape[1]}", file=sys.stderr)
        return scores


class SlowSteps:
    """Makes every token take `seconds`, so a test can act while generate runs."""

    def __init__(self, seconds):
        self.seconds = seconds

    def __call__(self, input_ids, scores):
        time.sleep(self.seconds)
        return scores


class FailOnRank:
    """Raises on one rank only, at the first token: the other rank then waits for it in its next all-reduce."""

    def __init__(self, rank):
        self.rank = str(rank)

    def __call__(self, input_ids, scores):
        if os.environ.get("RANK") == self.rank:
            raise RuntimeError(f"a failure on rank {self.rank} only")
        return scores
