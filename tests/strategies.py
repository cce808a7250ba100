"""Hypothesis strategies shared by the property tests: what a careless (or curious) person might pass."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st

SCALE = float(os.environ.get("NBGPU_HYPOTHESIS_SCALE", "1"))


def examples(n: int) -> settings:
    """`n` generated cases (scaled by NBGPU_HYPOTHESIS_SCALE), other settings from the loaded profile."""
    return settings(max_examples=max(1, int(n * SCALE)))


WORDS = ["", " ", "0", "1", "2", "-1", "2,3", "0,0", "1,", "all", "none", "off", "stop", "4x24GiB", "2xA100-80GB",
         "H100", "8xT4", "24GiB,80GiB", "65x1GiB", "0x24GiB", "24", "1e10", "nan", "inf", "-inf", "20GiB", "1.5TiB",
         "0.5GiB", "512MiB", "bfloat16", "double", "half", "int8", "torch.float16", "cpu", "disk", "cuda:1", "cuda:9",
         "model.layers.0", "model.layers.0-1", "model.layers.3-0", "model.layers.0-99999999", "lm_head", "balanced",
         "sequential", "accelerate", "manual", "layers", "tensor", '"', "'", "\\", "org/model", "/", ".", "/tmp",
         "GPU-00000000-0000-0000-0000-000000000000", "MIG-GPU-x/1/0", "--auto", "-h", "\x00", "\n", "ｘ", "٣GiB",
         "9" * 40 + "GiB", "memory", "utilisation", "fan", "a\nb", "{}", "[]"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-3, 70),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1.0, 1.5, -0.0, 1e10, 1e300]),
    st.text(max_size=12), st.sampled_from(WORDS), st.binary(max_size=6),
    st.integers(-2**63, 2**63 - 1).map(np.int64), st.integers(0, 255).map(np.uint8),
    st.floats(width=32, allow_nan=True).map(np.float32), st.sampled_from([np.True_, np.False_]),
    st.just(object()), st.just(Path("/nonexistent/model")), st.just(Ellipsis),
)
anything = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.tuples(inner, inner), st.dictionaries(st.sampled_from(WORDS), inner, max_size=3),
    st.sets(st.integers(-2, 5), max_size=3)), max_leaves=6)

# the same, without valid large integers: for calls whose valid arguments would run for long (bench, generate)
small_ints = st.one_of(st.integers(-3, 4), st.sampled_from([2**40, 2**63, 10**30]),
                       st.integers(-3, 4).map(np.int64))
small_anything = st.one_of(small_ints, st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True),
                           st.text(max_size=8), st.sampled_from(WORDS), st.lists(small_ints, max_size=3),
                           st.just(object()))

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-3, 70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=10), st.sampled_from(WORDS))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=5)
