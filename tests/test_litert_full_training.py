"""Whole-model on-device training: the MLP exported by ``to_trainable_tflite`` (real TensorFlow
conversion), trained through ``client.litert_training.LiteRTTrainer`` (real LiteRT, no Flex
delegate) on the real digits data.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")
tf = pytest.importorskip("tensorflow")

from ai_edge_litert.interpreter import Interpreter, OpResolverType  # noqa: E402

from client.litert_runtime import (  # noqa: E402
    InputError,
    LiteRTClassifier,
    ModelFormatError,
)
from client.litert_training import LiteRTHeadTrainer, LiteRTTrainer  # noqa: E402
from fedsync import model as fedsync_model  # noqa: E402
from fedsync import tflite_export  # noqa: E402
from fedsync.sim.data import load_digits_split  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
NAMES = ("hidden/kernel", "hidden/bias", "head/kernel", "head/bias")


@pytest.fixture(scope="module")
def digits():
    train, test = load_digits_split()
    return train.x, test.x, train.y.astype(np.int32), test.y.astype(np.int32)


@pytest.fixture(scope="module")
def fresh():
    """The untrained model, straight from its random initialisation."""
    return fedsync_model.build_model(hidden_units=32, seed=0)


@pytest.fixture(scope="module")
def full_bytes(fresh):
    return tflite_export.to_trainable_tflite(fresh)


def _accuracy(probs: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(probs.argmax(axis=1) == y))


def _keras_probs(model, x: np.ndarray) -> np.ndarray:
    return np.asarray(model.predict(x, batch_size=512, verbose=0), dtype=np.float32)


def _reference_step(weights: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, lr: float):
    """One SGD step of mean softmax cross-entropy on the whole MLP, in float64 numpy."""
    w1, b1, w2, b2 = (weights[name].astype(np.float64) for name in NAMES)
    x = x.astype(np.float64)
    n = len(y)
    hidden = np.maximum(x @ w1 + b1, 0.0)
    logits = hidden @ w2 + b2
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    loss = -np.mean(np.log(probs[np.arange(n), y]))
    dlogits = (probs - np.eye(w2.shape[1])[y]) / n
    d_w2, d_b2 = hidden.T @ dlogits, dlogits.sum(0)
    d_pre = (dlogits @ w2.T) * (hidden > 0)
    d_w1, d_b1 = x.T @ d_pre, d_pre.sum(0)
    new = {
        "hidden/kernel": w1 - lr * d_w1,
        "hidden/bias": b1 - lr * d_b1,
        "head/kernel": w2 - lr * d_w2,
        "head/bias": b2 - lr * d_b2,
    }
    return loss, new, hidden


# --------------------------------------------------------------------------- export


def test_export_is_builtin_only_and_runs_on_litert(full_bytes):
    assert b"Flex" not in full_bytes  # custom (Flex) op codes are stored by name
    plain = Interpreter(
        model_content=full_bytes,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    ops = [op["op_name"] for op in plain._get_ops_details()]
    assert not [n for n in ops if n.upper().startswith("FLEX") or n.upper() == "CUSTOM"], ops
    assert plain.get_signature_list() == {
        "infer": {"inputs": ["x"], "outputs": ["probs"]},
        "train": {"inputs": ["lr", "x", "y"], "outputs": ["loss"]},
        "get_weights": {"inputs": [], "outputs": ["head_bias", "head_kernel", "hidden_bias", "hidden_kernel"]},
        "set_weights": {"inputs": ["head_bias", "head_kernel", "hidden_bias", "hidden_kernel"], "outputs": ["ok"]},
    }
    # Every signature allocates and runs on the plain runtime (which has no Flex delegate).
    x, y = np.zeros((4, 64), np.float32), np.arange(4, dtype=np.int32)
    weights = plain.get_signature_runner("get_weights")()
    assert plain.get_signature_runner("set_weights")(**weights)["ok"] == 1
    assert np.isfinite(plain.get_signature_runner("train")(x=x, y=y, lr=np.float32(0.1))["loss"])
    assert plain.get_signature_runner("infer")(x=x)["probs"].shape == (4, 10)


def test_starts_from_keras_weights(fresh, full_bytes, digits):
    _, x_test, _, _ = digits
    trainer = LiteRTTrainer(full_bytes)
    keras_weights = fedsync_model.get_weights(fresh)
    got = trainer.get_weights()
    assert list(got) == list(NAMES) and set(got) == set(keras_weights)
    for name in NAMES:
        np.testing.assert_array_equal(got[name], keras_weights[name])
    assert trainer.weight_shapes == {name: w.shape for name, w in keras_weights.items()}
    assert trainer.num_classes == 10 and trainer.input_shape == (-1, 64)
    np.testing.assert_allclose(trainer.infer(x_test), _keras_probs(fresh, x_test), atol=1e-5)


def test_export_rejects_other_architectures():
    import keras

    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10, activation="softmax", name="head")])
    with pytest.raises(ValueError, match="no layer named 'hidden'"):
        tflite_export.to_trainable_tflite(model)


# --------------------------------------------------------------------------- training


def test_train_step_matches_numpy_backprop(full_bytes, digits):
    x_train, _, y_train, _ = digits
    trainer = LiteRTTrainer(full_bytes)
    rng = np.random.default_rng(1)
    start = {
        "hidden/kernel": rng.normal(0, 0.3, (64, 32)).astype(np.float32),
        "hidden/bias": rng.normal(0, 0.3, 32).astype(np.float32),
        "head/kernel": rng.normal(0, 0.3, (32, 10)).astype(np.float32),
        "head/bias": rng.normal(0, 0.1, 10).astype(np.float32),
    }
    trainer.set_weights(start)
    x, y, lr = x_train[:48], y_train[:48], 0.3
    expected_loss, expected, hidden = _reference_step(start, x, y, lr)
    dead = float(np.mean(hidden == 0))
    assert 0.05 < dead < 0.95, dead  # the relu mask really matters for this batch
    loss = trainer.train_step(x, y, lr)
    assert loss == pytest.approx(expected_loss, abs=1e-5)
    got = trainer.get_weights()
    for name in NAMES:
        assert np.abs(got[name] - start[name]).max() > 1e-4, name  # every tensor moved
        np.testing.assert_allclose(got[name], expected[name], atol=1e-5, err_msg=name)
    # lr=0 reports the loss without changing any weight.
    trainer.train_step(x, y, 0.0)
    after = trainer.get_weights()
    for name in NAMES:
        np.testing.assert_array_equal(after[name], got[name])


def test_same_step_on_tensorflow_interpreter(full_bytes, digits):
    """The builtin-only train signature also runs on TensorFlow's own (deprecated) interpreter."""
    x_train, _, y_train, _ = digits
    x, y, lr = x_train[:32], y_train[:32], np.float32(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tf_interpreter = tf.lite.Interpreter(model_content=full_bytes)
    tf_loss = tf_interpreter.get_signature_runner("train")(x=x, y=y, lr=lr)["loss"]
    tf_weights = tf_interpreter.get_signature_runner("get_weights")()
    trainer = LiteRTTrainer(full_bytes)
    assert trainer.train_step(x, y, float(lr)) == pytest.approx(float(tf_loss), abs=1e-5)
    got = trainer.get_weights()
    for name in NAMES:
        np.testing.assert_allclose(got[name], tf_weights[name.replace("/", "_")], atol=1e-6)


def test_fit_from_random_init_learns_and_matches_keras(fresh, full_bytes, digits):
    x_train, x_test, y_train, y_test = digits
    trainer = LiteRTTrainer(full_bytes)
    base = trainer.get_weights()
    acc_before = _accuracy(trainer.infer(x_test), y_test)
    start = time.perf_counter()
    history = trainer.fit(x_train, y_train, lr=0.3, epochs=20, batch_size=32, seed=0)
    seconds = time.perf_counter() - start
    probs = trainer.infer(x_test)
    acc_after = _accuracy(probs, y_test)
    print(
        f"\nLiteRT whole-model fit from random init: {len(x_train)} samples x 20 epochs in {seconds * 1e3:.0f} ms; "
        f"loss {history[0]:.3f} -> {history[-1]:.3f}; test accuracy {acc_before:.3f} -> {acc_after:.3f}"
    )
    assert len(history) == 20 and history[0] < np.log(10)
    assert history[-1] < min(history[:10]) and history[-1] < history[0] * 0.2  # SGD: not strictly monotonic
    assert acc_before < 0.3 and acc_after > 0.90

    # The trained weights, set into a Keras model, predict the same as LiteRT.
    trained = trainer.get_weights()
    keras_model = fedsync_model.build_model(hidden_units=32, seed=1)  # different init: fully overwritten
    fedsync_model.set_weights(keras_model, trained)
    np.testing.assert_allclose(_keras_probs(keras_model, x_test), probs, atol=1e-5)
    # Deltas use the same names as a Keras client's, so they aggregate together.
    delta = {name: trained[name] - base[name] for name in trained}
    assert set(delta) == set(fedsync_model.get_weights(fresh))
    assert all(np.abs(d).max() > 0 for d in delta.values())


def test_fit_is_deterministic(full_bytes, digits):
    x_train, _, y_train, _ = digits
    runs = []
    for _ in range(2):
        trainer = LiteRTTrainer(full_bytes)
        history = trainer.fit(x_train[:200], y_train[:200], lr=0.2, epochs=2, batch_size=30, seed=3)
        runs.append((history, trainer.get_weights()))
    assert runs[0][0] == runs[1][0]
    for name in NAMES:
        np.testing.assert_array_equal(runs[0][1][name], runs[1][1][name])


# --------------------------------------------------------------------------- weights


def test_weights_round_trip_and_fresh_interpreter_restarts(fresh, full_bytes):
    trainer = LiteRTTrainer(full_bytes)
    rng = np.random.default_rng(0)
    new = {name: rng.normal(size=shape).astype(np.float32) for name, shape in trainer.weight_shapes.items()}
    new["head/bias"] = new["head/bias"].astype(np.float64)  # float64 accepted, stored as float32
    trainer.set_weights(new)
    got = trainer.get_weights()
    for name in NAMES:
        np.testing.assert_array_equal(got[name], new[name].astype(np.float32))
    got["hidden/kernel"][:] = 0  # returned arrays are copies
    assert trainer.get_weights()["hidden/kernel"].any()
    # State is per interpreter: a new trainer on the same bytes starts from the export.
    again = LiteRTTrainer(full_bytes).get_weights()
    exported = fedsync_model.get_weights(fresh)
    for name in NAMES:
        np.testing.assert_array_equal(again[name], exported[name])


def test_set_weights_validation(full_bytes):
    trainer = LiteRTTrainer(full_bytes)
    good = trainer.get_weights()
    with pytest.raises(KeyError, match="hidden/bias"):
        trainer.set_weights({name: w for name, w in good.items() if name != "hidden/bias"})
    with pytest.raises(InputError, match="unknown weight names"):
        trainer.set_weights({**good, "hidden_kernel": good["hidden/kernel"]})  # tensor names are internal
    with pytest.raises(InputError, match=r"hidden/kernel: expected shape \(64, 32\)"):
        trainer.set_weights({**good, "hidden/kernel": good["hidden/kernel"].T})
    with pytest.raises(InputError, match="NaN or Inf"):
        trainer.set_weights({**good, "head/bias": np.full(10, np.nan, np.float32)})
    after = trainer.get_weights()
    for name in NAMES:  # nothing was changed by the rejected calls
        np.testing.assert_array_equal(after[name], good[name])


def test_train_input_validation(full_bytes, digits):
    x_train, _, y_train, _ = digits
    trainer = LiteRTTrainer(full_bytes)
    x, y = x_train[:8], y_train[:8]
    with pytest.raises(InputError, match="integer class indices"):
        trainer.train_step(x, y.astype(np.float32), 0.1)
    with pytest.raises(InputError, match=r"in \[0, 10\)"):
        trainer.train_step(x, np.full(8, 10), 0.1)
    with pytest.raises(InputError, match="learning rate"):
        trainer.train_step(x, y, -0.1)
    with pytest.raises(InputError, match="empty"):
        trainer.train_step(x[:0], y[:0], 0.1)
    with pytest.raises(InputError, match="shape"):
        trainer.infer(np.zeros((3, 65), np.float32))
    assert trainer.infer(np.zeros((0, 64))).shape == (0, 10)
    assert trainer.train_step(x.astype(np.float64), y.astype(np.int64), 0.1) > 0  # converted


def test_wrong_kind_of_model_points_to_the_right_class(fresh, full_bytes):
    head_bytes = tflite_export.to_trainable_head_tflite(fresh)
    with pytest.raises(ModelFormatError, match="use LiteRTTrainer"):
        LiteRTHeadTrainer(full_bytes)
    with pytest.raises(ModelFormatError, match="use LiteRTHeadTrainer"):
        LiteRTTrainer(head_bytes)
    with pytest.raises(ModelFormatError, match="use LiteRTTrainer"):
        LiteRTClassifier(full_bytes)
    with pytest.raises(ModelFormatError, match="missing signature 'train'"):
        LiteRTTrainer(tflite_export.to_tflite_float32(fresh))
    with pytest.raises(ModelFormatError, match="TFLite model"):
        LiteRTTrainer(full_bytes[: len(full_bytes) // 2])


# --------------------------------------------------------------------------- lean client


def test_litert_only_process_trains_without_tensorflow(full_bytes, tmp_path):
    """A fresh interpreter process imports client.litert_training, loads the model file and
    trains it; TensorFlow/Keras are never imported."""
    path = tmp_path / "digits_trainable.tflite"
    path.write_bytes(full_bytes)
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from client.litert_training import LiteRTTrainer
        trainer = LiteRTTrainer({str(path)!r})
        before = trainer.get_weights()
        x = np.random.default_rng(0).random((16, 64), dtype=np.float32)
        loss = trainer.train_step(x, np.arange(16) % 10, 0.1)
        after = trainer.get_weights()
        assert np.isfinite(loss) and all((after[k] != before[k]).any() for k in before), loss
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {{"tensorflow", "keras", "tf_keras"}})
        assert not heavy, heavy
        print("ok", sorted(after))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "ok ['head/bias', 'head/kernel', 'hidden/bias', 'hidden/kernel']"


def test_fit_takes_the_steps_litert_signature_runners_take(full_bytes, digits):
    """fit re-allocates the interpreter only when a batch's shape changes (LiteRT's own runner does
    on every call): the same steps give the same numbers, bit for bit."""
    x_train, _, y_train, _ = digits
    x, y = x_train[:40], y_train[:40]
    trainer = LiteRTTrainer(full_bytes)
    history = trainer.fit(x, y, lr=0.3, epochs=3, batch_size=16, seed=5)  # batches of 16, 16 and 8
    plain = Interpreter(model_content=full_bytes, num_threads=1)
    train, infer = plain.get_signature_runner("train"), plain.get_signature_runner("infer")
    rng = np.random.default_rng(5)
    expected = []
    for _ in range(3):
        order = rng.permutation(len(x))
        total = 0.0
        for start in range(0, len(x), 16):
            idx = order[start : start + 16]
            total += float(train(x=x[idx], y=y[idx], lr=np.asarray(0.3, np.float32))["loss"]) * len(idx)
        expected.append(total / len(x))
    assert history == expected
    reference = plain.get_signature_runner("get_weights")()
    for name, weights in trainer.get_weights().items():
        np.testing.assert_array_equal(weights, reference[name.replace("/", "_")])
    for n in (1, 7, 7, 16, 1):
        np.testing.assert_array_equal(trainer.infer(x[:n]), infer(x=x[:n])["probs"])
    with pytest.raises(ValueError):
        trainer._runners["train"](x=x[:2], y=y[:2])  # an input missing, as LiteRT's runner refuses
    trainer.train_step(x[:3], y[:3], lr=0.1)
    train(x=x[:3], y=y[:3], lr=np.asarray(0.1, np.float32))
    for name, weights in trainer.get_weights().items():
        np.testing.assert_array_equal(weights, plain.get_signature_runner("get_weights")()[name.replace("/", "_")])
