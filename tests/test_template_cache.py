"""Converted templates persisted on disk: a coordinator starting again on an architecture it has
seen runs no TFLite conversion and publishes the same bytes; anything odd about the cache means
building as before."""

from __future__ import annotations

import functools
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("ai_edge_litert")

import tensorflow as tf

from coordinator.publisher import EvaluationData, ModelPublisher
from fedsync import _template_cache, tflite_export, tflite_templates
from fedsync._template_cache import TemplateCache, default_cache_dir, template_key
from fedsync.manifest import TFLITE_FLOAT32, sha256_file
from fedsync.model import build_model, get_weights, set_weights
from fedsync.sim.data import load_digits_split
from fedsync.tflite_patch import WeightSlot
from fedsync.tflite_templates import TemplateExporter

_, TEST = load_digits_split(seed=0)
CONVERTERS = ("to_tflite_float32", "to_trainable_head_tflite", "to_trainable_tflite")


def publish_two_versions(models_dir: Path) -> dict[str, str]:
    """A fresh coordinator process as far as templates go: sha256 of every .tflite of v1 (initial
    weights) and v2 (other weights)."""
    publisher = ModelPublisher(models_dir, EvaluationData(TEST.x, TEST.y), hidden_units=32, int8=False)
    v2 = {name: array + 0.1 for name, array in publisher.initial_weights().items()}
    shas = {}
    for version, weights in ((1, publisher.initial_weights()), (2, v2)):
        for artifact in publisher.publish(version, version - 1, weights).artifacts:
            if artifact.kind.startswith("tflite"):
                shas[f"v{version}/{artifact.kind}"] = sha256_file(publisher.version_dir(version) / artifact.name)
    return shas


def fresh_process(patch: pytest.MonkeyPatch, cache_dir: Path | str) -> None:
    patch.setenv("FEDSYNC_CACHE_DIR", str(cache_dir))
    patch.setattr(tflite_templates, "_shared", TemplateExporter())
    patch.setattr(_template_cache, "_warned", set())


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A cache folder filled by a first start, and what that start published."""
    root = tmp_path_factory.mktemp("warm")
    with pytest.MonkeyPatch.context() as patch:
        fresh_process(patch, root / "cache")
        return root / "cache", publish_two_versions(root / "models")


def counting(export: Callable[..., bytes], calls: list[int]) -> Callable[..., bytes]:
    @functools.wraps(export)  # same module and name: the same cache key as `export`
    def counted(model) -> bytes:
        calls.append(1)
        return export(model)

    return counted


def float32_key(hidden_units: int = 32) -> str:
    return template_key(TFLITE_FLOAT32, build_model(hidden_units), tflite_export.to_tflite_float32)


def test_first_start_fills_the_cache(warm):
    folder, shas = warm
    assert len(shas) == 6
    # int8 templates replay a live converter stage and stay in memory: only the 3 float kinds persist.
    assert len(list((folder / "tflite-templates").glob("*.template"))) == 3
    assert not list((folder / "tflite-templates").glob("*.tmp"))


def test_second_start_runs_no_converter_and_publishes_the_same_bytes(warm, tmp_path, monkeypatch):
    folder, shas = warm
    fresh_process(monkeypatch, folder)

    def no_converter(*args, **kwargs):
        raise AssertionError("the TFLite converter ran")

    for name in CONVERTERS:  # a wrapper each: wraps() names the function it is given
        wrapper = functools.wraps(getattr(tflite_export, name))(lambda *a, **k: no_converter())
        monkeypatch.setattr(tflite_export, name, wrapper)
    monkeypatch.setattr(tf.lite.TFLiteConverter, "from_saved_model", no_converter)
    assert publish_two_versions(tmp_path / "models") == shas


def test_another_architecture_misses(warm):
    folder, _ = warm
    exporter, calls = TemplateExporter(TemplateCache(folder / "tflite-templates")), []
    export = counting(tflite_export.to_tflite_float32, calls)
    exporter.export(TFLITE_FLOAT32, build_model(32), export)
    assert calls == []
    assert float32_key(16) != float32_key(32)
    small = build_model(16)
    set_weights(small, {name: array + 0.1 for name, array in get_weights(small).items()})  # no zero bias to drop
    assert exporter.export(TFLITE_FLOAT32, small, export) == tflite_export.to_tflite_float32(small)
    assert len(calls) == 2  # the template's two conversions
    assert (folder / "tflite-templates" / f"{float32_key(16)}.template").exists()


def flip_last_byte(path: Path) -> None:
    content = bytearray(path.read_bytes())
    content[-1] ^= 0xFF
    path.write_bytes(bytes(content))


def misplace_a_weight(path: Path) -> None:
    """A well-formed file (valid checksum) whose slots put the hidden kernel in the wrong layout."""
    cache = TemplateCache(path.parent)
    key = path.name.removesuffix(".template")
    base, slots = cache.load(key)
    wrong = tuple(
        WeightSlot(s.name, s.start, s.size, not s.transposed) if s.name == "hidden/kernel" else s for s in slots
    )
    cache.store(key, base, wrong)


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {  # damage, and what the warning says
    "flipped byte": (flip_last_byte, "checksum mismatch"),
    "truncated": (lambda path: path.write_bytes(path.read_bytes()[:-100]), "checksum mismatch"),
    "garbage": (lambda path: path.write_bytes(b"\x00" * 64), "not a template file"),
    "misplaced weight": (misplace_a_weight, "does not fit the model"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_entry_is_ignored_and_rebuilt(warm, tmp_path, corruption, caplog):
    folder = tmp_path / "cache"
    shutil.copytree(warm[0] / "tflite-templates", folder)
    entry = folder / f"{float32_key()}.template"
    damage, warning = CORRUPTIONS[corruption]
    damage(entry)
    model, calls = build_model(32), []
    set_weights(model, {name: array - 0.2 for name, array in get_weights(model).items()})
    with caplog.at_level(logging.WARNING):
        out = TemplateExporter(TemplateCache(folder)).export(
            TFLITE_FLOAT32, model, counting(tflite_export.to_tflite_float32, calls)
        )
    assert out == tflite_export.to_tflite_float32(model)
    assert len(calls) == 2
    assert warning in caplog.text
    assert TemplateCache(folder).load(float32_key()) is not None  # rewritten whole
    calls.clear()
    TemplateExporter(TemplateCache(folder)).export(
        TFLITE_FLOAT32, model, counting(tflite_export.to_tflite_float32, calls)
    )
    assert calls == []


def test_an_unwritable_cache_folder_still_publishes(warm, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"")
    fresh_process(monkeypatch, blocker)  # mkdir under a file fails, even as root
    with caplog.at_level(logging.WARNING, logger=_template_cache.__name__):
        assert publish_two_versions(tmp_path / "models") == warm[1]
    assert len(caplog.records) == 1  # once, not once per template


def test_cache_location_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDSYNC_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "tflite-templates"
    monkeypatch.setenv("FEDSYNC_CACHE_DIR", "")
    assert default_cache_dir() is None
    monkeypatch.delenv("FEDSYNC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "fedsync" / "tflite-templates"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "fedsync" / "tflite-templates"


def test_an_empty_cache_dir_setting_turns_the_cache_off(tmp_path, monkeypatch):
    fresh_process(monkeypatch, "")
    monkeypatch.chdir(tmp_path)
    model, calls = build_model(32), []
    tflite_templates.shared_exporter().export(TFLITE_FLOAT32, model, counting(tflite_export.to_tflite_float32, calls))
    assert len(calls) == 2
    assert not any(tmp_path.rglob("*.template"))
