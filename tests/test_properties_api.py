"""UsageError is the only exception a person's input can produce from nbgpu's public functions.

Each public function is driven with arbitrary arguments (ints of every size, floats with NaN and infinities, strings,
bytes, None, bools, numpy scalars, lists, dicts, arbitrary objects), mixed with valid ones so that the deeper paths
run too. The property: the call returns, or raises UsageError; and a refused call changes nothing."""

from __future__ import annotations

import os

import pytest

hypothesis = pytest.importorskip("hypothesis")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from strategies import anything, examples, small_anything  # noqa: E402

import nbgpu  # noqa: E402
from nbgpu import devices, monitoring, visibility  # noqa: E402
from nbgpu.errors import UsageError  # noqa: E402

REFUSED = object()
TINY = dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)


def outcome(call, *args, **kwargs):
    """The call's result, or REFUSED for a UsageError; any other exception fails the property."""
    try:
        out = call(*args, **kwargs)
    except UsageError:
        hypothesis.event("refused")
        return REFUSED
    hypothesis.event("carried out")
    return out


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Strings that look like hub ids are refused from the cache check alone, without asking the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@st.composite
def arguments(draw, garbage=anything, **valid):
    """Keyword arguments: each from its valid strategy, except up to two drawn from `garbage` (so that most calls
    get far enough to run, and every argument is also tried with anything at all)."""
    broken = draw(st.sets(st.sampled_from(sorted(valid)), max_size=2))
    return {name: draw(garbage if name in broken else strategy) for name, strategy in valid.items()}


def one_of(*values):
    return st.sampled_from(values)


configs = st.one_of(st.just(TINY), st.builds(lambda k, v: {**TINY, k: v}, st.sampled_from(sorted(TINY)), anything))


@examples(250)
@given(arguments(model=configs, gpus=one_of(None, 1, 2, "2x24GiB", "24GiB,80GiB", ["24GiB", 80e9], ("H100", "T4")),
                 dtype=one_of("bfloat16", "bf16", "double", "half", "float32", torch.float16),
                 batch=st.integers(1, 64), seq_len=st.integers(1, 8192),
                 strategy=one_of("balanced", "sequential", "accelerate", [1, 1], [2, 0], {"model.layers.0-1": 1}),
                 reserve=one_of("1GiB", 0, 2**20), offload=one_of(False, "cpu", "disk", True),
                 context=one_of("700MiB", 0), cpu_memory=one_of(None, "8GiB"), trust_remote_code=one_of(False)))
def test_plan(kwargs):
    devices.simulate("2x24GiB")
    p = outcome(nbgpu.plan, **kwargs)
    if p is not REFUSED:
        assert p.dtype in ("bfloat16", "float16", "float32", "float64") and type(p.batch) is int
        assert all(isinstance(d, int) and not isinstance(d, bool) or d in ("cpu", "disk")
                   for d in p.device_map.values())
        p.explain()


@pytest.fixture(scope="module")
def tiny_plan():
    devices.simulate("2x24GiB")
    plan = nbgpu.plan(TINY, gpus="2x24GiB", strategy=[1, 1])
    devices.simulate(None)
    return plan


@examples(400)
@given(method=st.sampled_from(["move", "set_boundaries", "with_batch", "layers_on", "save", "load"]),
       args=arguments(first=one_of("model.layers.0", "model.layers.0-1", "lm_head", ["lm_head", "model.embed_tokens"],
                                   [1, 1], [2, 0], 0, 1, "cpu", "plan.json", "."),
                      second=one_of(0, 1, "cpu", "disk", "cuda:1", None, 16)))
def test_plan_methods(tiny_plan, tmp_path, monkeypatch, method, args):
    monkeypatch.chdir(tmp_path)  # a relative path given to save lands here
    first, second = args["first"], args["second"]
    plan = tiny_plan.copy()
    before = plan.to_dict()
    if method == "move":
        out = outcome(plan.move, first, second)
    elif method == "set_boundaries":
        out = outcome(plan.set_boundaries, first)
    elif method == "with_batch":
        out = outcome(plan.with_batch, first, second)
    elif method == "layers_on":
        out = outcome(plan.layers_on, first)
    elif method == "save":
        out = outcome(plan.save, first)
    else:
        out = outcome(nbgpu.Plan.load, first, trust_remote_code=second)
    if out is REFUSED:
        assert plan.to_dict() == before  # a refused edit leaves the plan as it was
    elif method in ("move", "set_boundaries"):
        assert sum(d.weights for d in plan.devices) + plan.cpu_weights + plan.disk_weights == \
            sum(u.size for u in plan.units)  # every weight still counted once


def _visibility_state():
    sim = devices.simulated()
    return os.environ.get(visibility.VISIBLE), os.environ.get(visibility.ORDER), sim.visible


@examples(400)
@given(arguments(selection=one_of(None, "1,3", "none", "all", 2, [0, 1]), auto=one_of(None, 1, 2),
                 min_free=one_of(None, "20GiB", 0), max_util=one_of(None, 50, 0.5)))
def test_use(kwargs):
    devices.simulate("4x24GiB")
    before = _visibility_state()
    selection = kwargs.pop("selection")
    out = outcome(nbgpu.use, selection, **kwargs)
    if out is REFUSED:
        assert _visibility_state() == before
    else:
        assert isinstance(out, visibility.Visibility) and os.environ.get(visibility.VISIBLE) == before[0]


@examples(300)
@given(st.one_of(anything, one_of("4x24GiB", "off", None, "2xA100-80GB", "24GiB,80GiB")))
def test_simulate(spec):
    devices.simulate("2x24GiB")
    before = devices.simulated()
    out = outcome(nbgpu.simulate, spec)
    if out is REFUSED:
        assert devices.simulated() is before
    devices.simulate(None)


@examples(200)
@given(arguments(interval=one_of(0.05, 1, 3600, 0.01), history=st.integers(1, 1000),
                 gpus=one_of(None, 0, [0, 1], "0,1"), show=one_of("memory", ("memory", "utilization"), ["power"]),
                 temperature=st.booleans(), power=st.booleans()))
def test_monitor(kwargs):
    devices.simulate("2x24GiB")
    try:
        out = outcome(nbgpu.monitor, **kwargs)
    finally:
        monitoring.stop_all()
    if out is not REFUSED:
        assert 0.01 <= out.interval <= 3600 and not out.errors


@examples(400)
@given(arguments(nbytes=st.one_of(st.integers(0, 2**62), st.floats(0, 1e18), st.none()),
                 unit=one_of("GiB", "auto", "MB", "B"), digits=st.integers(0, 12)))
def test_sizes(kwargs):
    parsed = outcome(nbgpu.parse_size, kwargs["nbytes"])
    assert parsed is REFUSED or (type(parsed) is int and parsed >= 0)
    text = outcome(nbgpu.format_size, **kwargs)
    assert text is REFUSED or isinstance(text, str)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    config = transformers.AutoConfig.for_model(**TINY)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def model(folder):
    return nbgpu.load(folder, show=False)


@pytest.fixture(scope="module")
def result(model):
    return nbgpu.bench(model, prompt_len=4, new_tokens=3, repeats=1, warmup=0)


@examples(100)
@given(results=st.one_of(anything, st.lists(st.one_of(st.just("result"), anything), max_size=3),
                         st.dictionaries(st.text(max_size=4), st.sampled_from(["result", 5]), max_size=2)))
def test_compare(result, results):
    def real(x):
        return result if isinstance(x, str) and x == "result" else x

    if isinstance(results, list):
        results = [real(r) for r in results]
    elif isinstance(results, dict):
        results = {k: real(v) for k, v in results.items()}
    out = outcome(nbgpu.compare, results)
    assert out is REFUSED or len(out.rows()) >= 1


@examples(50)
@given(arguments(target=one_of("folder"), show=one_of(False),
                 device_map=one_of("auto", "cpu", {"": "cpu"}, "sequential"), dtype=one_of("float32", "auto", "bf16"),
                 trust_remote_code=one_of(False)))
def test_load(folder, kwargs):
    target = kwargs.pop("target")
    out = outcome(nbgpu.load, folder if target == "folder" else target, **kwargs)
    assert out is REFUSED or out.nbgpu_load is not None


@examples(60)
@given(arguments(small_anything, target=one_of("model"), batch=st.integers(1, 2), prompt_len=st.integers(1, 8),
                 new_tokens=st.integers(2, 3), repeats=st.just(1), warmup=st.integers(0, 1),
                 compile=st.booleans(), label=one_of(None, "run"), explain=st.booleans(),
                 seed=st.integers(0, 2**63 - 1)))
def test_bench(model, kwargs):
    target = kwargs.pop("target")
    out = outcome(nbgpu.bench, model if target == "model" else target, **kwargs)
    assert out is REFUSED or out.generated_tokens == out.batch * out.new_tokens
