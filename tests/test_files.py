"""Every file nbgpu writes is made whole first and renamed into place: a failure leaves the old file byte-identical."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

import nbgpu
from nbgpu import files
from nbgpu.errors import UsageError

transformers = pytest.importorskip("transformers")


def tiny_llama():
    return transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def test_a_plan_holding_a_numpy_integer_saves_whole(tmp_path):
    """The finding: plan.move(..., np.int64(1)) then save raised TypeError half-way and left a truncated file."""
    p = nbgpu.plan(tiny_llama(), gpus="2x24GiB")
    target = tmp_path / "plan.json"
    p.save(target)
    p.move("model.layers.0", np.int64(1))
    assert type(p.device_map["model.layers.0"]) is int  # stored as the plan's own kind of device
    p.save(target)
    again = nbgpu.Plan.load(target)
    assert again.device_map["model.layers.0"] == 1 and again.to_dict() == p.to_dict()


def test_a_failure_while_serialising_leaves_the_old_file_byte_identical(tmp_path, monkeypatch):
    target = tmp_path / "plan.json"
    nbgpu.plan(tiny_llama(), gpus="2x24GiB").save(target)
    before = target.read_bytes()
    p = nbgpu.plan(tiny_llama(), gpus="2x24GiB", batch=3)
    from nbgpu.planning import plan_file

    real = plan_file.to_dict

    def broken(plan):
        data = real(plan)
        data["reserve"] = np.int64(1)  # not JSON: what used to fail half-way through json.dump
        return data

    monkeypatch.setattr(plan_file, "to_dict", broken)
    monkeypatch.setattr(plan_file, "_validate", lambda *a: None)  # let it reach the JSON encoder
    with pytest.raises(TypeError, match="int64"):
        p.save(target)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["plan.json"]  # no temporary file left behind


def test_a_failure_while_writing_or_renaming_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "page.html"
    target.write_text("old page")
    os.chmod(target, 0o640)

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(UsageError, match="No space left on device"):
        files.write_text(target, "new page " * 1000)
    monkeypatch.undo()
    assert target.read_text() == "old page" and os.listdir(tmp_path) == ["page.html"]

    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(13, "Permission denied")))
    with pytest.raises(UsageError, match="Permission denied"):
        files.write_text(target, "new page")
    monkeypatch.undo()
    assert target.read_text() == "old page" and os.listdir(tmp_path) == ["page.html"]

    files.write_text(target, "new page")
    assert target.read_text() == "new page"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640  # the old file's permissions are kept


def test_a_new_file_gets_the_usual_permissions_and_json_is_strict(tmp_path):
    umask = os.umask(0o022)
    try:
        files.write_json(tmp_path / "a.json", {"x": [1, 2]})
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o644
    with pytest.raises(ValueError):
        files.write_json(tmp_path / "b.json", {"x": float("nan")})  # NaN is not JSON: refused before writing
    assert not (tmp_path / "b.json").exists()


def test_writing_where_it_cannot_be_written_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        files.write_text(tmp_path / "no-such-folder" / "x.html", "x")
    with pytest.raises(UsageError, match="is a folder"):
        files.write_text(tmp_path, "x")
    p = nbgpu.plan(tiny_llama(), gpus="1x24GiB")
    with pytest.raises(UsageError, match="does not exist"):
        p.save(tmp_path / "missing" / "plan.json")


def test_the_tour_page_is_written_through_the_same_rename(tmp_path, monkeypatch):
    from nbgpu import tour

    target = tmp_path / "tour.html"
    target.write_text("previous tour")
    monkeypatch.setattr(tour, "execute", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("kernel died")))
    with pytest.raises(RuntimeError):
        tour.tour(target, tour.QUICKSTART)
    assert target.read_text() == "previous tour"
    written = []
    monkeypatch.setattr(files, "write_bytes", lambda path, data: written.append((path, data)))
    nb = __import__("nbformat").v4.new_notebook(cells=[])
    monkeypatch.setattr(tour, "execute", lambda *a, **k: (nb, {}))
    assert tour.tour(target, tour.QUICKSTART) == []
    assert written and written[0][0] == target and written[0][1].startswith(b"<!DOCTYPE html>")
