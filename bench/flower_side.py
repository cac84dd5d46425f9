"""The Flower half of bench/vs_flower.py. Runs inside bench/.flower-venv (flwr[simulation]==1.41.0).

Flower 1.41's Message API on its Ray simulation backend: a ServerApp running the library's FedAvg
strategy (every node trains every round, example-weighted mean) with a server-side evaluate
function on the held-out digits test split, and a ClientApp that trains the same Keras MLP as
fedsync (fedsync.model.build_model: 64-32-10, same initial weights) on the same shard
(fedsync.sim.data.partition with the same scheme, seed, alpha and overlap), with the same local
epochs, batch size and SGD learning rate.

Local training: ``--trainer batch`` (default) runs Keras ``train_on_batch`` over a fresh
permutation each epoch, which is the math of ``model.fit(shuffle=True)`` without fit's per-call
tf.data setup (~0.1 s per call, per epoch more); ``--trainer fit`` calls ``model.fit`` as Flower's
Keras examples do. The default makes Flower as fast as Keras allows, the stronger baseline.

The run stops early (the remaining rounds send no messages) once test accuracy has reached
``--target`` and ``--extra-rounds`` more rounds have run, or after ``--max-minutes``.

Prints one JSON line with its figures. The repository root goes on sys.path (and PYTHONPATH, for
the Ray workers) so that fedsync.sim.data and fedsync.model import; they need numpy, scikit-learn
and keras only.

Run (normally done by bench/vs_flower.py):
  bench/.flower-venv/bin/python bench/flower_side.py --devices 100 --local-epochs 20 --lr 0.5
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import numpy as np  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--rounds", type=int, default=200, help="upper bound on FedAvg rounds")
    p.add_argument("--local-epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--partition", default="dirichlet")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--overlap", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=0.90)
    p.add_argument("--extra-rounds", type=int, default=2, help="rounds to run after reaching --target")
    p.add_argument("--max-minutes", type=float, default=5.0)
    p.add_argument("--trainer", choices=("batch", "fit"), default="batch")
    p.add_argument("--cpus-per-client", type=float, default=1.0)
    p.add_argument("--verbose", action="store_true", help="keep Flower's and Ray's INFO logs")
    return p.parse_args(argv)


# -- client side (runs in Ray workers; everything is cached per worker process) -------------------


@functools.cache
def _shards(num_devices: int, scheme: str, seed: int, alpha: float, overlap: float):
    from fedsync.sim.data import load_digits_split, partition

    train, _ = load_digits_split(seed=seed)
    return partition(train, num_devices, scheme, seed=seed, alpha=alpha, overlap=overlap)


@functools.cache
def _model(lr: float):
    from fedsync.model import build_model, compile_for_training

    model = build_model()
    compile_for_training(model, learning_rate=lr)
    return model


def _train(model, x: np.ndarray, y: np.ndarray, epochs: int, batch_size: int, seed: int, trainer: str) -> float:
    if trainer == "fit":
        import keras

        keras.utils.set_random_seed(seed)
        history = model.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0)
        return float(history.history["loss"][-1])
    rng = np.random.default_rng(seed)
    loss = float("nan")
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            loss = float(model.train_on_batch(x[idx], y[idx], return_dict=True)["loss"])
    return loss


def make_client_app():
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = msg.content["config"]
        pid = int(context.node_config["partition-id"])
        num = int(context.node_config["num-partitions"])
        shard = _shards(num, str(cfg["partition"]), int(cfg["seed"]), float(cfg["alpha"]), float(cfg["overlap"]))[pid]
        model = _model(float(cfg["lr"]))
        model.set_weights(msg.content["arrays"].to_numpy_ndarrays())
        loss = _train(
            model,
            shard.x,
            shard.y,
            int(cfg["local-epochs"]),
            int(cfg["batch-size"]),
            int(cfg["seed"]) * 1_000_003 + int(cfg["server-round"]) * num + pid,
            str(cfg["trainer"]),
        )
        content = RecordDict(
            {
                "arrays": ArrayRecord(model.get_weights()),
                "metrics": MetricRecord({"train_loss": loss, "num-examples": len(shard)}),
            }
        )
        return Message(content=content, reply_to=msg)

    return app


# -- server side (runs in this process) -----------------------------------------------------------


def make_server_app(args: argparse.Namespace, figures: dict, started: float):
    from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    from fedsync.model import build_model
    from fedsync.sim.data import load_digits_split

    _, test = load_digits_split(seed=args.seed)
    eval_model = build_model()  # seed 0: the coordinator's initial model, weight for weight
    initial = ArrayRecord(eval_model.get_weights())
    state = {"stopped": False, "hit_round": None}
    figures.update(updates=0, rounds=0, accuracy_over_time=[], time_to_target_s=None, rounds_to_target=None)

    class StoppableFedAvg(FedAvg):
        """The library's FedAvg; once the run is over, later rounds configure no training."""

        def configure_train(self, server_round, arrays, config, grid):
            if state["stopped"]:
                return []
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            valid = [m for m in replies if not m.has_error()]
            figures["updates"] += len(valid)
            figures["errors"] = figures.get("errors", 0) + len(replies) - len(valid)
            if replies:
                figures["rounds"] = server_round
            if replies and not valid:  # every client failed: say why and end the run
                state["stopped"] = True
                figures["stopped_by"] = "errors"
                figures["first_error"] = str(replies[0].error.reason)[-2000:]
            return super().aggregate_train(server_round, replies)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if state["stopped"]:
            return None
        eval_model.set_weights(arrays.to_numpy_ndarrays())
        probs = eval_model.predict_on_batch(test.x)
        accuracy = float(np.mean(np.argmax(probs, axis=1) == test.y))
        now = time.perf_counter() - started
        figures["accuracy_over_time"].append({"wall_s": now, "round": server_round, "accuracy": accuracy})
        figures["final_accuracy"] = accuracy
        if server_round > 0:
            figures["train_wall_s"] = now  # time when the last counted update had been aggregated
        if server_round == 1:
            figures["first_round_s"], figures["first_round_updates"] = now, figures["updates"]
        if accuracy >= args.target and state["hit_round"] is None:
            state["hit_round"] = server_round
            figures["time_to_target_s"] = now
            figures["rounds_to_target"] = server_round
        done = state["hit_round"] is not None and server_round >= state["hit_round"] + args.extra_rounds
        if done or now > args.max_minutes * 60 or server_round >= args.rounds:
            state["stopped"] = True
            figures["stopped_by"] = "target" if done else ("time" if now > args.max_minutes * 60 else "rounds")
        return MetricRecord({"accuracy": accuracy})

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = StoppableFedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=args.devices,
            min_available_nodes=args.devices,
        )
        train_config = ConfigRecord(
            {
                "lr": args.lr,
                "local-epochs": args.local_epochs,
                "batch-size": args.batch_size,
                "partition": args.partition,
                "alpha": args.alpha,
                "overlap": args.overlap,
                "seed": args.seed,
                "trainer": args.trainer,
            }
        )
        figures["strategy_start_s"] = time.perf_counter() - started
        strategy.start(
            grid=grid, initial_arrays=initial, num_rounds=args.rounds, train_config=train_config, evaluate_fn=evaluate
        )
        figures["strategy_end_s"] = time.perf_counter() - started

    return app


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import flwr
    import keras  # noqa: F401  (import cost stays outside the timed run, as on the fedsync side)
    import ray
    from flwr.simulation import run_simulation

    if not args.verbose:
        for name in ("flwr", "ray"):
            logging.getLogger(name).setLevel(logging.WARNING)
    figures: dict = {}
    started = time.perf_counter()
    server_app = make_server_app(args, figures, started)
    run_simulation(
        server_app=server_app,
        # From the importable module, not __main__: Ray workers unpickle the ClientApp by reference.
        client_app=importlib.import_module("bench.flower_side").make_client_app(),
        num_supernodes=args.devices,
        backend_config={
            "client_resources": {"num_cpus": args.cpus_per_client, "num_gpus": 0.0},
            "init_args": {"logging_level": "ERROR", "log_to_driver": bool(args.verbose)},
        },
        verbose_logging=args.verbose,
    )
    total = time.perf_counter() - started
    train_wall = figures.get("train_wall_s") or total
    import resource

    steady = None  # after round 1, which includes Ray starting its workers and their TensorFlow import
    if "first_round_s" in figures and train_wall > figures["first_round_s"]:
        steady = (figures["updates"] - figures["first_round_updates"]) / (train_wall - figures["first_round_s"])

    out = {
        "framework": "flower",
        "flwr_version": flwr.__version__,
        "ray_version": ray.__version__,
        "devices": args.devices,
        "trainer": args.trainer,
        "local_epochs": args.local_epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "partition": args.partition,
        "updates": figures.get("updates", 0),
        "errors": figures.get("errors", 0),
        "rounds": figures.get("rounds", 0),
        "train_wall_s": train_wall,
        "total_wall_s": total,
        "strategy_start_s": figures.get("strategy_start_s"),
        "updates_per_s": figures.get("updates", 0) / train_wall if train_wall > 0 else 0.0,
        "steady_updates_per_s": steady,
        "time_to_target_s": figures.get("time_to_target_s"),
        "rounds_to_target": figures.get("rounds_to_target"),
        "final_accuracy": figures.get("final_accuracy"),
        "stopped_by": figures.get("stopped_by"),
        "first_error": figures.get("first_error"),
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "accuracy_over_time": figures.get("accuracy_over_time", []),
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
