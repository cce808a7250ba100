"""Loading and benchmarking models on the GPUs a plan chose (imports torch and transformers)."""

from .bench import BenchResult, bench
from .compare import Comparison, compare
from .load import LoadReport, load
from .oom import NotEnoughMemory
from .prediction import predict

__all__ = ["BenchResult", "Comparison", "LoadReport", "NotEnoughMemory", "bench", "compare", "load", "predict"]
