"""Client-side LiteRT runtime: real models exported by TensorFlow, run without it, real digits.

TensorFlow is only used here to *produce* the models (fixtures); everything under test runs
through ``client.litert_runtime`` (numpy + ai_edge_litert).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")
tf = pytest.importorskip("tensorflow")

from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from client.litert_runtime import (  # noqa: E402
    InputError,
    LiteRTClassifier,
    ModelFormatError,
    check_input,
    check_sample,
)
from client.litert_training import LiteRTHeadTrainer  # noqa: E402
from fedsync import tflite_export  # noqa: E402
from fedsync.model import build_model  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int32)
    return train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)


@pytest.fixture(scope="module")
def trained(digits):
    x_train, _, y_train, _ = digits
    model = build_model(hidden_units=32, seed=0)
    model.fit(x_train, y_train, epochs=15, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def float_bytes(trained):
    return tflite_export.to_tflite_float32(trained)


@pytest.fixture(scope="module")
def head_bytes(trained):
    return tflite_export.to_trainable_head_tflite(trained)


@pytest.fixture(scope="module")
def hidden_weights(trained):
    layer = trained.get_layer("hidden")
    return layer.kernel.numpy().astype(np.float32), layer.bias.numpy().astype(np.float32)


def _accuracy(probs: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(probs.argmax(axis=1) == y))


# --------------------------------------------------------------------------- no TensorFlow


def test_import_does_not_pull_in_tensorflow():
    code = textwrap.dedent(
        """
        import sys
        import client.litert_runtime as rt
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"tensorflow", "keras", "tf_keras"})
        assert not heavy, heavy
        assert "ai_edge_litert.interpreter" in sys.modules
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


# --------------------------------------------------------------------------- classifier


def test_classifier_properties_and_sources(float_bytes, tmp_path):
    path = tmp_path / "digits.tflite"
    path.write_bytes(float_bytes)
    for source in (float_bytes, path, str(path), bytearray(float_bytes)):
        clf = LiteRTClassifier(source)
        assert clf.input_shape == (-1, 64)
        assert clf.input_dtype == np.float32
        assert clf.num_outputs == 10


def test_classifier_batch_sizes_are_consistent(float_bytes, digits):
    _, x_test, _, _ = digits
    clf = LiteRTClassifier(float_bytes, num_threads=2)
    reference = clf.predict_proba(x_test)
    assert reference.shape == (len(x_test), 10) and reference.dtype == np.float32
    np.testing.assert_allclose(reference.sum(axis=1), 1.0, atol=1e-5)
    # Interleave single samples and batches of varying size: same answers every time.
    for n in (1, 7, 32, 1, 7, 7, 1, 100, 1):
        np.testing.assert_allclose(clf.predict_proba(x_test[:n]), reference[:n], atol=1e-6)
    np.testing.assert_allclose(clf.predict_proba(x_test[5]), reference[5:6], atol=1e-6)
    assert clf.predict_proba(x_test[:0]).shape == (0, 10)
    np.testing.assert_array_equal(clf.predict(x_test[:10]), reference[:10].argmax(1))


def test_classifier_converts_numeric_dtypes(float_bytes, digits):
    _, x_test, _, _ = digits
    clf = LiteRTClassifier(float_bytes)
    expected = clf.predict_proba(x_test[:4])
    np.testing.assert_allclose(clf.predict_proba(x_test[:4].astype(np.float64)), expected, atol=1e-6)
    np.testing.assert_allclose(clf.predict_proba(x_test[:4].tolist()), expected, atol=1e-6)
    ints = np.zeros((2, 64), dtype=np.int64)
    np.testing.assert_allclose(clf.predict_proba(ints), clf.predict_proba(np.zeros((2, 64), np.float32)), atol=1e-7)


def test_classifier_with_quantized_io(trained, digits, float_bytes):
    """Models with int8 input/output tensors are quantized/dequantized by the runtime."""
    x_train, x_test, _, y_test = digits
    rep = x_train[:200]

    def configure(converter):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([row[None]] for row in rep)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8

    int8_io = tflite_export._convert_keras(trained, configure)
    clf = LiteRTClassifier(int8_io)
    assert clf.input_dtype == np.int8
    probs = clf.predict_proba(x_test)
    assert probs.dtype == np.float32
    float_acc = _accuracy(LiteRTClassifier(float_bytes).predict_proba(x_test), y_test)
    assert _accuracy(probs, y_test) >= float_acc - 0.01
    _assert_top1_matches_probabilities(clf, x_test[:100])


def _assert_top1_matches_probabilities(clf: LiteRTClassifier, x: np.ndarray) -> None:
    probs = clf.predict_proba(x)
    for sample, row in zip(x, probs, strict=True):
        label, confidence = clf.top1(sample[None])
        assert label == int(np.argmax(row))  # first index on ties, like argmax
        assert confidence == float(row[label])


def test_top1_is_argmax_and_max_of_predict_proba(float_bytes, digits):
    _, x_test, _, _ = digits
    _assert_top1_matches_probabilities(LiteRTClassifier(float_bytes), x_test[:100])


# --------------------------------------------------------------------------- trainable head


def _reference_step(hidden, head, x, y, lr):
    """Numpy version of the hand-written gradient step in the train signature."""
    w1, b1 = hidden
    w2, b2 = head["head_kernel"].astype(np.float64), head["head_bias"].astype(np.float64)
    features = np.maximum(x.astype(np.float64) @ w1 + b1, 0.0)
    logits = features @ w2 + b2
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    onehot = np.eye(w2.shape[1])[y]
    loss = -np.mean(np.log(probs[np.arange(len(y)), y]))
    dlogits = (probs - onehot) / len(y)
    return loss, {"head_kernel": w2 - lr * features.T @ dlogits, "head_bias": b2 - lr * dlogits.sum(0)}


def test_train_step_matches_numpy_reference(head_bytes, hidden_weights, digits):
    x_train, _, y_train, _ = digits
    trainer = LiteRTHeadTrainer(head_bytes)
    rng = np.random.default_rng(1)
    start = {
        "head_kernel": rng.normal(0, 0.3, (32, 10)).astype(np.float32),
        "head_bias": rng.normal(0, 0.1, 10).astype(np.float32),
    }
    trainer.set_weights(start)
    x, y, lr = x_train[:48], y_train[:48], 0.3
    expected_loss, expected = _reference_step(hidden_weights, start, x, y, lr)
    loss = trainer.train_step(x, y, lr)
    assert loss == pytest.approx(expected_loss, abs=1e-5)
    got = trainer.get_weights()
    for name in ("head_kernel", "head_bias"):
        np.testing.assert_allclose(got[name], expected[name], atol=1e-5)
    # lr=0 reports the loss without changing the weights.
    before = trainer.get_weights()
    trainer.train_step(x, y, 0.0)
    np.testing.assert_array_equal(trainer.get_weights()["head_kernel"], before["head_kernel"])


def test_fit_from_zeroed_head_learns(head_bytes, digits):
    x_train, x_test, y_train, y_test = digits
    trainer = LiteRTHeadTrainer(head_bytes)
    trainer.set_weights({"head_kernel": np.zeros((32, 10), np.float32), "head_bias": np.zeros(10, np.float32)})
    np.testing.assert_allclose(trainer.infer(x_test[:5]), 0.1, atol=1e-6)
    acc_before = _accuracy(trainer.infer(x_test), y_test)
    history = trainer.fit(x_train, y_train, lr=0.5, epochs=5, batch_size=32, seed=0)
    acc_after = _accuracy(trainer.infer(x_test), y_test)
    print(f"head fit from zeros: losses {[round(v, 4) for v in history]}, acc {acc_before:.3f} -> {acc_after:.3f}")
    assert len(history) == 5
    assert history[0] < np.log(10) and history[-1] < history[0] * 0.5
    assert all(b <= a + 1e-6 for a, b in itertools.pairwise(history))
    assert acc_before < 0.2 and acc_after > 0.85


def test_fit_is_deterministic(head_bytes, digits):
    x_train, _, y_train, _ = digits
    runs = []
    for _ in range(2):
        trainer = LiteRTHeadTrainer(head_bytes)
        runs.append(
            (
                trainer.fit(x_train[:200], y_train[:200], epochs=2, batch_size=30, seed=3),
                trainer.get_weights()["head_kernel"],
            )
        )
    assert runs[0][0] == runs[1][0]
    np.testing.assert_array_equal(runs[0][1], runs[1][1])


def test_weights_round_trip_and_fresh_interpreter_restarts(head_bytes, trained):
    trainer = LiteRTHeadTrainer(head_bytes)
    exported = trainer.get_weights()
    assert exported["head_kernel"].shape == (32, 10) and exported["head_bias"].shape == (10,)
    rng = np.random.default_rng(0)
    new = {
        "head_kernel": rng.normal(size=(32, 10)).astype(np.float32),
        "head_bias": rng.normal(size=10).astype(np.float64),
    }  # float64 accepted, stored as float32
    trainer.set_weights(new)
    got = trainer.get_weights()
    np.testing.assert_array_equal(got["head_kernel"], new["head_kernel"])
    np.testing.assert_array_equal(got["head_bias"], new["head_bias"].astype(np.float32))
    got["head_kernel"][:] = 0  # returned arrays are copies
    assert trainer.get_weights()["head_kernel"].any()
    # State is per interpreter: a new trainer on the same bytes starts from the export.
    again = LiteRTHeadTrainer(head_bytes).get_weights()
    np.testing.assert_array_equal(again["head_kernel"], trained.get_layer("head").kernel.numpy())


def test_set_weights_validation(head_bytes):
    trainer = LiteRTHeadTrainer(head_bytes)
    good = trainer.get_weights()
    with pytest.raises(KeyError, match="head_bias"):
        trainer.set_weights({"head_kernel": good["head_kernel"]})
    with pytest.raises(InputError, match="unknown weight names"):
        trainer.set_weights({**good, "digits_mlp/head/kernel": good["head_kernel"]})
    with pytest.raises(InputError, match=r"head_kernel: expected shape \(32, 10\)"):
        trainer.set_weights({**good, "head_kernel": good["head_kernel"].T})
    with pytest.raises(InputError, match="NaN or Inf"):
        trainer.set_weights({**good, "head_bias": np.full(10, np.nan, np.float32)})
    np.testing.assert_array_equal(trainer.get_weights()["head_kernel"], good["head_kernel"])


def test_train_input_validation(head_bytes, digits):
    x_train, _, y_train, _ = digits
    trainer = LiteRTHeadTrainer(head_bytes)
    x, y = x_train[:8], y_train[:8]
    with pytest.raises(InputError, match="integer class indices"):
        trainer.train_step(x, y.astype(np.float32), 0.1)
    with pytest.raises(InputError, match=r"shape \(8,\)"):
        trainer.train_step(x, y[:7], 0.1)
    with pytest.raises(InputError, match=r"in \[0, 10\)"):
        trainer.train_step(x, np.full(8, 10), 0.1)
    with pytest.raises(InputError, match="learning rate"):
        trainer.train_step(x, y, -0.1)
    with pytest.raises(InputError, match="learning rate"):
        trainer.train_step(x, y, float("nan"))
    with pytest.raises(InputError, match="empty"):
        trainer.train_step(x[:0], y[:0], 0.1)
    with pytest.raises(InputError, match="NaN"):
        trainer.fit(np.where(np.eye(8, 64) > 0, np.nan, x), y)
    assert trainer.train_step(x.astype(np.float64), y.astype(np.int64), 0.1) > 0  # converted


# --------------------------------------------------------------------------- corrupt models


def _corruptions(content: bytes) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    cases = {
        "empty": b"",
        "tiny": content[:6],
        "random": rng.bytes(len(content)),
        "random_with_header": content[:8] + rng.bytes(len(content) - 8),
        "text": b"this is not a model, it is a README\n" * 10,
    }
    for k in (16, 64, 200, len(content) // 3, len(content) // 2, len(content) - 100):
        cases[f"truncated_{k}"] = content[:k]
    return cases


@pytest.mark.parametrize("kind", ["classifier", "trainer"])
def test_corrupt_model_bytes_raise_model_format_error(kind, float_bytes, head_bytes, tmp_path):
    cls, content = (LiteRTClassifier, float_bytes) if kind == "classifier" else (LiteRTHeadTrainer, head_bytes)
    for name, bad in _corruptions(content).items():
        with pytest.raises(ModelFormatError) as info:
            cls(bad)
        message = str(info.value)
        assert "\n" not in message and ("TFLite model" in message), (name, message)
    path = tmp_path / "truncated.tflite"
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(ModelFormatError, match="invalid or truncated"):
        cls(path)
    with pytest.raises(FileNotFoundError):
        cls(tmp_path / "missing.tflite")


def test_wrong_kind_of_model_raises_model_format_error(float_bytes, head_bytes):
    with pytest.raises(ModelFormatError, match="missing signature 'train'"):
        LiteRTHeadTrainer(float_bytes)
    with pytest.raises(ModelFormatError, match="use LiteRTHeadTrainer"):
        LiteRTClassifier(head_bytes)


# --------------------------------------------------------------------------- check_input


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (np.zeros((2, 63), np.float32), r"shape must be \(n, 64\) or \(64,\), got \(2, 63\)"),
        (np.zeros((2, 8, 8), np.float32), r"got \(2, 8, 8\)"),
        (np.zeros(63, np.float32), r"got \(63,\)"),
        (np.float32(1.0), r"got \(\)"),
        (np.full((2, 64), "a"), "got string"),
        (np.array([[b"x"] * 64]), "got bytes"),
        (np.zeros((2, 64), dtype=object), "got object"),
        (np.zeros((2, 64), np.complex64), "got complex"),
        (np.zeros((2, 64), bool), "got bool"),
        ([[0.0] * 64, [0.0] * 63], "not a rectangular numeric array"),
        (np.where(np.arange(128).reshape(2, 64) == 70, np.nan, 0.5), r"1 NaN and 0 Inf.*sample index 1"),
        (np.full((1, 64), np.inf), "0 NaN and 64 Inf"),
        (np.full((1, 64), 1e39), "Inf value"),  # finite float64 that overflows float32
    ],
)
def test_check_input_rejects(value, match):
    with pytest.raises(InputError, match=match):
        check_input(value)


def test_check_input_accepts_and_converts():
    single = check_input(np.arange(64, dtype=np.int16))
    assert single.shape == (1, 64) and single.dtype == np.float32 and single.flags.c_contiguous
    batch = check_input(np.ones((64, 3)).T)  # non-contiguous float64
    assert batch.shape == (3, 64) and batch.dtype == np.float32 and batch.flags.c_contiguous
    same = np.ones((4, 64), np.float32)
    assert check_input(same) is same  # no copy for the common case
    assert check_input(np.zeros((0, 64))).shape == (0, 64)
    assert check_input(np.zeros((2, 8, 8)), expected_shape_tail=(8, 8)).shape == (2, 8, 8)


def test_check_sample_returns_what_check_input_returns():
    x = np.linspace(0, 1, 64, dtype=np.float32)
    fast = check_sample(x)
    assert fast.shape == (1, 64) and fast.dtype == np.float32 and fast.flags.c_contiguous
    assert np.shares_memory(fast, x)  # the common case is a view, no copy
    assert np.shares_memory(check_sample(x[None]), x)
    huge = np.full(64, np.finfo(np.float32).max, np.float32)  # finite: accepted
    assert np.shares_memory(check_sample(huge), huge)
    # Everything the fast path does not take is decided by check_input, with its result.
    for value in (x.astype(np.float64), np.arange(64, dtype=np.int16), x.tolist(), np.repeat(x, 2)[::2]):
        got = check_sample(value)
        np.testing.assert_array_equal(got, check_input(value))
        assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == (1, 64)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (np.where(np.arange(64) == 5, np.nan, 0.5).astype(np.float32), "1 NaN"),
        (np.where(np.arange(64) == 5, -np.inf, 0.5).astype(np.float32), "1 Inf"),
        (np.zeros(63, np.float32), "shape"),
        (np.zeros((2, 64), np.float32), "one sample"),
        (np.zeros((1, 1, 64), np.float32), "shape"),
        (np.zeros(64, bool), "bool"),
    ],
)
def test_check_sample_rejects(value, match):
    with pytest.raises(InputError, match=match):
        check_sample(value)


def test_predict_rejects_bad_inputs(float_bytes, head_bytes):
    clf = LiteRTClassifier(float_bytes)
    trainer = LiteRTHeadTrainer(head_bytes)
    for predict in (clf.predict_proba, trainer.infer):
        with pytest.raises(InputError, match="shape"):
            predict(np.zeros((3, 65), np.float32))
        with pytest.raises(InputError, match="NaN"):
            predict(np.full(64, np.nan, np.float32))
        with pytest.raises(InputError, match="string"):
            predict(np.array(["0.5"] * 64))
