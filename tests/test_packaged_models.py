"""Models shipped inside the package load by name; a name whose files are missing gets a clear error."""

from __future__ import annotations

import shutil

import pytest

from omnimini.weights import packaged
from omnimini.weights.checkpoint import CheckpointError
from omnimini.weights.convert import detect, load_any


def test_a_packaged_name_loads_its_directory(tiny_ckpt, tmp_path, monkeypatch):
    shutil.copytree(tiny_ckpt / "model", tmp_path / "omnimini-nano")
    monkeypatch.setattr(packaged, "ASSET_DIR", tmp_path)
    assert detect("omnimini-nano") == "omnimini"
    model, tok = load_any("OMNIMINI-NANO")
    assert model.vision is not None and tok.image_token_id is not None
    # a path that exists wins over the name
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    shutil.copytree(tiny_ckpt / "model", tmp_path / "here" / "omnimini-nano")
    assert packaged.resolve("omnimini-nano") == "omnimini-nano"


def test_a_packaged_name_without_its_files_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(packaged, "ASSET_DIR", tmp_path)
    with pytest.raises(CheckpointError, match="omnimini-nano: this install does not ship it"):
        load_any("omnimini-nano")
