"""Publishing .tflite artifacts by writing new weights into a converted template: the result must be
what the TFLite converter itself produces for those weights, and behave the same on LiteRT."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("ai_edge_litert")

import keras
from ai_edge_litert.interpreter import Interpreter

from client.litert_training import LiteRTHeadTrainer, LiteRTTrainer
from coordinator.publisher import EvaluationData, ModelPublisher
from fedsync import tflite_export
from fedsync.manifest import MANIFEST_NAME, Manifest, sha256_file
from fedsync.model import build_model, dense_steps, forward, get_weights, set_weights
from fedsync.sim.data import load_digits_split
from fedsync.tflite_patch import WeightsNotFoundError, locate_weights, patch_weights
from fedsync.tflite_templates import TemplateExporter, build_template

TRAIN, TEST = load_digits_split(seed=0)


def random_weights(model, seed: int, scale: float = 0.3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in get_weights(model).items()}


def infer(content: bytes, x: np.ndarray) -> np.ndarray:
    interpreter = Interpreter(model_content=content)
    if "infer" in interpreter.get_signature_list():
        return interpreter.get_signature_runner("infer")(x=x)["probs"]
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], x.shape)
    interpreter.allocate_tensors()
    if inp["dtype"] == np.int8:
        scale, zero = inp["quantization"]
        x = np.clip(np.round(x / scale + zero), -128, 127).astype(np.int8)
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(out["index"])


@pytest.fixture(scope="module")
def model():
    return build_model(hidden_units=32, seed=0)


def int8_export(model) -> bytes:
    return tflite_export.to_tflite_int8(model, TEST.x)


EXPORTS = {
    "float32": tflite_export.to_tflite_float32,
    "int8": int8_export,
    "trainable-head": tflite_export.to_trainable_head_tflite,
    "trainable": tflite_export.to_trainable_tflite,
}


@pytest.fixture(scope="module")
def templates(model):
    return {name: build_template(model, export) for name, export in EXPORTS.items()}


@pytest.mark.parametrize("name", list(EXPORTS))
def test_rendered_template_is_the_converters_output_for_new_weights(model, templates, name):
    template = templates[name]
    assert template is not None
    # Float models are patched in their final form; int8 replays the converter's quantization stage.
    assert (template.last_stage is not None) == (name == "int8")
    weights = random_weights(model, seed=10)
    set_weights(model, weights)
    converted = EXPORTS[name](model)
    rendered = template.render(weights)
    assert rendered == converted
    x = TEST.x[:50].astype(np.float32)
    np.testing.assert_array_equal(infer(rendered, x), infer(converted, x))


@pytest.mark.parametrize("name", list(EXPORTS))
def test_special_weights_that_the_converter_folds_still_compute_the_same(model, templates, name):
    """Zero biases (a fresh model's): the converter drops them, the template keeps zero-filled
    buffers. The bytes differ; the function may not."""
    fresh = build_model(hidden_units=32, seed=3)
    weights = get_weights(fresh)
    assert not weights["hidden/bias"].any()
    set_weights(model, weights)
    x = TEST.x[:100].astype(np.float32)
    np.testing.assert_array_equal(infer(templates[name].render(weights), x), infer(EXPORTS[name](model), x))


@pytest.mark.parametrize(("name", "trainer"), [("trainable", LiteRTTrainer), ("trainable-head", LiteRTHeadTrainer)])
def test_rendered_trainable_model_trains_exactly_like_the_converted_one(model, templates, name, trainer):
    weights = random_weights(model, seed=11)
    set_weights(model, weights)
    rendered, converted = trainer(templates[name].render(weights)), trainer(EXPORTS[name](model))
    before = rendered.get_weights()
    for key, value in before.items():
        np.testing.assert_array_equal(value, converted.get_weights()[key])
    x, y = TRAIN.x[:64], TRAIN.y[:64]
    losses = [t.fit(x, y, lr=0.5, epochs=3, batch_size=16, seed=4) for t in (rendered, converted)]
    assert losses[0] == losses[1] and losses[0][-1] < losses[0][0]
    after = rendered.get_weights()
    assert any(not np.array_equal(after[k], before[k]) for k in before)
    for key, value in after.items():
        np.testing.assert_array_equal(value, converted.get_weights()[key])


def test_locate_and_patch_weights_in_a_flatbuffer(model, templates):
    weights = random_weights(model, seed=12)
    set_weights(model, weights)
    converted = tflite_export.to_tflite_float32(model)
    slots = locate_weights(converted, weights)
    assert {s.name for s in slots} == set(weights)
    assert {s.name for s in slots if s.transposed} == {"hidden/kernel", "head/kernel"}  # FULLY_CONNECTED kernels
    assert patch_weights(converted, slots, weights) == converted
    other = random_weights(model, seed=13)
    assert patch_weights(converted, slots, other) == templates["float32"].render(other)
    with pytest.raises(WeightsNotFoundError):
        locate_weights(converted, other)
    with pytest.raises(ValueError, match="bytes"):
        patch_weights(converted, slots, {**other, "head/bias": np.zeros(11, np.float32)})


def test_exporter_builds_a_template_once_and_falls_back_when_it_cannot(model):
    exporter = TemplateExporter(cache=None)  # counts conversions: nothing from disk
    calls = itertools.count()

    def counted(m) -> bytes:
        next(calls)
        return tflite_export.to_tflite_float32(m)

    for seed in (20, 21, 22):
        weights = random_weights(model, seed)
        set_weights(model, weights)
        assert exporter.export("float32", model, counted) == tflite_export.to_tflite_float32(model)
    assert next(calls) == 2  # both conversions of the template, none afterwards

    stamps = itertools.count()

    def stamped(m) -> bytes:  # not a function of the weights alone: no template can reproduce it
        return tflite_export.to_tflite_float32(m) + bytes([next(stamps)])

    set_weights(model, random_weights(model, 23))
    out = exporter.export("stamped", model, stamped)
    assert out[-1] == next(stamps) - 1  # the export function's own output
    assert out[:-1] == tflite_export.to_tflite_float32(model)


def test_publisher_publishes_valid_manifests_with_converter_equal_artifacts(tmp_path: Path, model):
    publisher = ModelPublisher(tmp_path / "models", EvaluationData(TEST.x, TEST.y), hidden_units=32)
    for version, seed in ((1, 30), (2, 31)):
        weights = random_weights(publisher.model, seed)
        manifest = publisher.publish(version, version - 1, weights)
        folder = publisher.version_dir(version)
        assert Manifest.from_json((folder / MANIFEST_NAME).read_bytes()) == manifest
        assert {a.kind for a in manifest.artifacts} == {
            "keras",
            "tflite-float32",
            "tflite-int8",
            "tflite-trainable-head",
            "tflite-trainable",
        }
        for artifact in manifest.artifacts:
            path = folder / artifact.name
            assert sha256_file(path) == artifact.sha256 and path.stat().st_size == artifact.size
        set_weights(model, weights)
        converted = {
            "tflite-float32": tflite_export.to_tflite_float32(model),
            "tflite-int8": int8_export(model),
            "tflite-trainable-head": tflite_export.to_trainable_head_tflite(model),
            "tflite-trainable": tflite_export.to_trainable_tflite(model),
        }
        for kind, content in converted.items():
            artifact = manifest.artifact(kind)
            assert artifact is not None and (folder / artifact.name).read_bytes() == content, kind


def keras_metrics(model, weights: dict[str, np.ndarray]) -> dict[str, float]:
    """What the publisher computed with Keras before it ran the model in numpy."""
    set_weights(model, weights)
    probs = model(TEST.x, training=False).numpy()
    labels = TEST.y
    return {
        "accuracy": float(np.mean(np.argmax(probs, axis=1) == labels)),
        "loss": float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0)))),
    }


def test_numpy_forward_pass_computes_what_keras_does(model) -> None:
    steps = dense_steps(model)
    assert steps is not None and [s.activation for s in steps] == ["relu", "softmax"]
    for seed in range(3):
        weights = random_weights(model, seed, scale=1.0)
        set_weights(model, weights)
        np.testing.assert_allclose(forward(steps, weights, TEST.x), model(TEST.x).numpy(), rtol=1e-5, atol=1e-6)
    conv = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3), keras.layers.Flatten()])
    assert dense_steps(conv) is None


def test_publisher_evaluates_as_keras_did_and_publishes_without_loading_the_model(tmp_path: Path, model) -> None:
    publisher = ModelPublisher(
        tmp_path / "models", EvaluationData(TEST.x, TEST.y), hidden_units=32, keras=False, durable=False
    )
    publisher.publish(1, 0, publisher.initial_weights())  # builds the templates
    untouched = get_weights(publisher.model)
    for version, seed in ((2, 40), (3, 41)):
        weights = random_weights(publisher.model, seed)
        manifest = publisher.publish(version, version - 1, weights)
        expected = keras_metrics(model, weights)
        assert manifest.metrics["accuracy"] == expected["accuracy"]
        assert manifest.metrics["loss"] == pytest.approx(expected["loss"], abs=1e-6)
        folder = publisher.version_dir(version)
        assert Manifest.from_json((folder / MANIFEST_NAME).read_bytes()) == manifest
        converted = {
            "tflite-float32": tflite_export.to_tflite_float32(model),
            "tflite-int8": int8_export(model),
            "tflite-trainable-head": tflite_export.to_trainable_head_tflite(model),
            "tflite-trainable": tflite_export.to_trainable_tflite(model),
        }
        for artifact in manifest.artifacts:
            content = (folder / artifact.name).read_bytes()
            assert content == converted[artifact.kind], artifact.kind
            assert sha256_file(folder / artifact.name) == artifact.sha256 and len(content) == artifact.size
    assert all(np.array_equal(untouched[k], v) for k, v in get_weights(publisher.model).items())
    with pytest.raises(KeyError, match="missing"):
        publisher.publish(4, 3, {"hidden/kernel": weights["hidden/kernel"]})
    with pytest.raises(ValueError, match="shape"):
        publisher.publish(4, 3, {**weights, "head/bias": np.zeros(3, np.float32)})
