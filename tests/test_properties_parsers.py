"""Properties of the parsers a person types into: sizes, simulate specs, and the %gpus / %gpu_monitor lines."""

from __future__ import annotations

import math
import os
from fractions import Fraction

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from strategies import WORDS, anything, examples  # noqa: E402

from nbgpu import devices, gpu_table, visibility  # noqa: E402
from nbgpu.devices import specs  # noqa: E402
from nbgpu.devices.simulated import MAX_SIMULATED, SimulateSpecError, parse_simulate_spec  # noqa: E402
from nbgpu.errors import UsageError  # noqa: E402
from nbgpu.magics import gpu_monitor_magic, gpus_magic  # noqa: E402
from nbgpu.units import MAX_SIZE, SizeError, format_size, parse_size  # noqa: E402

UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
         "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}  # the units' definitions


def _cased(text: str, flips: list[bool]) -> str:
    return "".join(c.upper() if f else c for c, f in zip(text, flips + [False] * len(text)))


sizes = st.builds(
    lambda whole, frac, unit, flips, pad: (f"{pad}{whole}{'.' + frac if frac is not None else ''}{pad}"
                                           f"{_cased(unit, flips)}{pad}", whole, frac, unit),
    st.one_of(st.integers(0, 10**6), st.integers(0, 10**25)).map(str),
    st.one_of(st.none(), st.text("0123456789", min_size=0, max_size=8)),
    st.sampled_from(sorted(UNITS)), st.lists(st.booleans(), max_size=3), st.sampled_from(["", " ", "  "]))


@examples(1200)
@given(sizes)
def test_a_written_size_is_read_exactly(case):
    text, whole, frac, unit = case
    exact = Fraction(f"{whole}.{frac or 0}") * UNITS[unit]  # oracle: exact rational arithmetic, then floor
    if exact > MAX_SIZE:
        with pytest.raises(SizeError, match="more than 1 EiB"):
            parse_size(text)
    else:
        assert parse_size(text) == math.floor(exact)


@examples(1000)
@given(st.one_of(anything, st.text(max_size=30), st.text("0123456789.kKmMgGtTiIbB -+eE", max_size=12)))
def test_anything_else_is_a_size_or_a_size_error(value):
    try:
        out = parse_size(value)
    except SizeError:
        return
    assert type(out) is int and 0 <= out <= MAX_SIZE


@examples(300)
@given(st.integers(0, MAX_SIZE))
def test_whole_bytes_round_trip_through_their_text(n):
    assert parse_size(str(n)) == n and parse_size(f"{n} B") == n
    text = format_size(n, "auto")  # rounded to one digit after the point: within half of that digit
    assert abs(parse_size(text) - n) <= 0.05 * UNITS[text.split()[1].lower()] + 1


spec_items = st.one_of(
    st.builds(lambda n, key: (f"{n}x{key}" if n > 1 else key, n, specs.lookup(key).memory),
              st.integers(1, 8), st.sampled_from(specs.known_names())),
    st.builds(lambda n, gib, x: (f"{n}{x}{gib}GiB", n, gib * 2**30), st.integers(1, 8), st.integers(1, 200),
              st.sampled_from(["x", "X", "*", " x "])))


@examples(600)
@given(st.lists(spec_items, min_size=1, max_size=5))
def test_a_written_simulate_spec_is_read_exactly(items):
    text = ",".join(t for t, _, _ in items)
    expected = [memory for _, n, memory in items for _ in range(n)]  # oracle: the spec table and the size units
    if len(expected) > MAX_SIMULATED:
        with pytest.raises(SimulateSpecError, match=f"at most {MAX_SIMULATED}"):
            parse_simulate_spec(text)
    else:
        assert [memory for _, memory, _ in parse_simulate_spec(text)] == expected


@examples(500)
@given(st.one_of(anything, st.text(max_size=30), st.lists(st.sampled_from(WORDS), max_size=4).map(",".join)))
def test_any_spec_is_gpus_or_a_spec_error_and_a_refusal_keeps_the_gpus(value):
    devices.simulate("2x24GiB")
    before = devices.simulated()
    try:
        gpus = parse_simulate_spec(value)
        table = devices.simulate(value)
    except SimulateSpecError:
        assert devices.simulated() is before
        return
    finally:
        devices.simulate(None)
    assert 1 <= len(gpus) <= MAX_SIMULATED and all(m >= 2**30 for _, m, _ in gpus)
    assert table is None or len(table) == len(gpus)


magic_words = st.one_of(st.sampled_from(WORDS + ["--auto", "--min-free", "--max-util", "--simulate", "--help",
                                                 "--auto=2", "--frob", "--", "-", "0", "3", "4", "2", "50"]),
                        st.text(max_size=6))
lines = st.lists(magic_words, max_size=5).map(" ".join)


def _state():
    sim = devices.simulated()
    return (os.environ.get(visibility.VISIBLE), os.environ.get(visibility.ORDER),
            None if sim is None else (sim.spec_text, sim.visible))


@examples(800)
@given(lines)
def test_any_gpus_line_is_a_table_a_choice_or_a_usage_error_that_changes_nothing(line):
    devices.simulate("4x24GiB")
    before = _state()
    try:
        out = gpus_magic(line)
    except UsageError:
        assert _state() == before
        return
    finally:
        devices.simulate(None)
    assert isinstance(out, (gpu_table.GPUTable, visibility.Visibility))


monitor_words = st.one_of(st.sampled_from(["--interval", "--history", "--temperature", "--power", "stop", "0.05",
                                           "0.2", "inf", "nan", "-1", "1e10", "0", "3600", "3601", "10", "1e9",
                                           "--help", '"', "start"]), st.text(max_size=5))


@examples(200)
@given(st.lists(monitor_words, max_size=5).map(" ".join))
def test_any_monitor_line_starts_a_monitor_stops_them_or_is_a_usage_error(line):
    from nbgpu import monitoring

    devices.simulate("2x24GiB")
    try:
        out = gpu_monitor_magic(line)
    except UsageError:
        return
    finally:
        monitoring.stop_all()
        devices.simulate(None)
    assert out is None or (isinstance(out, monitoring.Monitor) and 0.01 <= out.interval <= 3600)
