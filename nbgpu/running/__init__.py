"""Loading and benchmarking models on the GPUs a plan chose (imports torch and transformers)."""

from .bench import BenchResult, bench
from .compare import Comparison, compare
from .load import LoadReport, load
from .oom import NotEnoughMemory

__all__ = ["BenchResult", "Comparison", "LoadReport", "NotEnoughMemory", "bench", "compare", "load"]
