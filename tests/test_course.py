"""The course helpers: one-line setup, the model helper, and the exercise check."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from nbgpu import course, devices
from nbgpu.course import WrongAnswer, check

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=64)


def test_check_passes_the_right_answer_and_fails_a_wrong_one():
    assert check(16, 16).right and "Right: 16" in repr(check(16, 16))
    assert check(" Tensor ", "tensor").right  # text: case and surrounding spaces ignored
    assert check(2.05, 2.0, tolerance=0.05).right  # within 5%
    with pytest.raises(WrongAnswer, match="2.2 is not it"):
        check(2.2, 2.0, tolerance=0.05)  # 10% off
    with pytest.raises(WrongAnswer):
        check(15, 16)
    with pytest.raises(WrongAnswer):
        check([0, 1], [0, 1, 2])  # a list must have every element
    assert check([0.99, 2], [1.0, 2], tolerance=0.02).right
    with pytest.raises(WrongAnswer):
        check(1, True)  # True is not the number 1 here
    unanswered = check(..., 16)
    assert not unanswered.right and "No answer yet" in repr(unanswered)  # says where to write it, does not fail


def test_a_wrong_answer_shows_one_line_in_ipython():
    try:
        check("layers", "tensor", why="Both GPUs work on every layer.")
    except WrongAnswer as exc:
        lines = exc._render_traceback_()
    assert lines == ["WrongAnswer: 'layers' is not it. Both GPUs work on every layer. Look again at the cells "
                     "above, change your answer and run both cells again."]


def test_setup_simulates_the_course_machine_where_there_is_no_gpu(monkeypatch, fake_nvml, capsys):
    fake_nvml([])  # NVML answers, with no GPU
    monkeypatch.delenv("NBGPU_SIMULATE", raising=False)
    machine = course.setup()
    assert machine.simulated and machine.spec == devices.DEFAULT_SPEC and machine.gpus == 4
    assert f"{devices.DEFAULT_SPEC} SIMULATED GPUs" in capsys.readouterr().out
    assert devices.simulated() is not None and len(devices.read().gpus) == 4
    again = course.setup(show=False)  # run twice, the notebook keeps its machine
    assert again == machine


def test_setup_takes_the_spec_given(monkeypatch, fake_nvml):
    fake_nvml([])
    monkeypatch.setenv("NBGPU_SIMULATE", "2xA100-80GB")
    machine = course.setup(show=False)
    assert machine.spec == "2xA100-80GB" and machine.gpus == 2
    assert course.setup("3x24GiB", show=False).gpus == 3  # the argument before the environment


def test_the_model_is_built_once_and_described_by_its_own_parameters(monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    devices.simulate("2xL4")
    monkeypatch.setattr(course, "_MODELS", {})
    path = course.model(TINY, dtype="float32")
    assert course.model(TINY, dtype="float32") == path  # built once per process
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["num_hidden_layers"] == 2
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    params = sum(p.numel() for p in loaded.parameters()) + loaded.lm_head.weight.numel() * \
        bool(loaded.config.tie_word_embeddings)
    assert f"{params / 1e6:,.1f} M parameters" in course.describe(path)


def test_the_model_folder_is_removed_when_the_process_ends():
    code = ("from nbgpu import course, devices\ndevices.simulate('2xL4')\n"
            f"print(course.model({TINY!r}, dtype='float32'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    folder = out.stdout.strip().splitlines()[-1]
    assert folder and not os.path.exists(folder)
