"""`nbgpu.compare`: several bench runs side by side, as a table and a chart."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError
from .bench import BenchResult
from .report import SIMULATED_NOTE

COLUMNS = ["run", "timing", "devices", "mode", "batch", "ttft_ms", "prefill_tok_s", "decode_tok_s", "decode_tok_s_min",
           "decode_tok_s_max", "latency_p50_ms", "latency_p90_ms", "roofline_tok_s (estimate)", "roofline_fraction"]


@dataclass(frozen=True)
class Comparison:
    results: tuple[BenchResult, ...]

    def rows(self) -> list[dict]:
        return [r.summary() for r in self.results]

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame([{k: row[k] for k in COLUMNS} for row in self.rows()])

    @property
    def simulated(self) -> bool:
        return any(r.simulated for r in self.results)

    def __repr__(self) -> str:
        head = ["run", "mode", "batch", "TTFT ms", "prefill tok/s", "decode tok/s", "p50 ms", "p90 ms", "roofline"]
        body = []
        for row in self.rows():
            frac = row["roofline_fraction"]
            body.append([row["run"], row["mode"], str(row["batch"]), f"{row['ttft_ms']:.1f}",
                         f"{row['prefill_tok_s']:,.0f}", f"{row['decode_tok_s']:,.1f}", f"{row['latency_p50_ms']:.2f}",
                         f"{row['latency_p90_ms']:.2f}", "n/a" if frac is None else f"{frac:.1%}"])
        widths = [max(len(x) for x in col) for col in zip(head, *body)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [head, *body]]
        if self.simulated:
            lines.append(f"[{SIMULATED_NOTE}]")
        if any(r.modelled for r in self.results):
            lines.append("[runs marked (modelled): timings from nbgpu's cost model for the GPUs named, not measured]")
        return "\n".join(lines)


def compare(results) -> Comparison:
    """A table and chart of BenchResults (a list, or a dict label -> result, whose labels are then used)."""
    if isinstance(results, (str, bytes, BenchResult)) or not isinstance(results, (dict, list, tuple)):
        raise UsageError(f"compare takes a list of nbgpu.bench results (or a dict label -> result), not "
                         f"{type(results).__name__}")
    if isinstance(results, dict):
        items = []
        for label, r in results.items():
            r = _check(r)
            r = BenchResult(**{**r.__dict__, "label": str(label)})
            items.append(r)
    else:
        items = [_check(r) for r in results]
    if not items:
        raise UsageError("compare needs at least one BenchResult, e.g. compare([bench(a), bench(b)])")
    return Comparison(tuple(items))


def _check(r):
    if not isinstance(r, BenchResult):
        raise UsageError(f"compare takes results of nbgpu.bench(...), not {type(r).__name__}")
    return r
