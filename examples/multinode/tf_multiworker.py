"""One data-parallel gradient of a small MLP computed by TensorFlow on several processes ("workers", one per
node), saved for comparison with the single-device gradient. A plain user's script: TensorFlow and numpy only.

Every worker runs this script with the same cluster in ``TF_CONFIG`` and its own task index;
``tf.distribute.MultiWorkerMirroredStrategy`` reads it, starts this worker's gRPC server on its address and
waits until every worker has connected. Two workers on one machine, over loopback:

    export CLUSTER='"cluster": {"worker": ["127.0.0.1:PORT0", "127.0.0.1:PORT1"]}'
    TF_CONFIG="{$CLUSTER, \"task\": {\"type\": \"worker\", \"index\": 0}}" python examples/multinode/tf_multiworker.py grads.npz &
    TF_CONFIG="{$CLUSTER, \"task\": {\"type\": \"worker\", \"index\": 1}}" python examples/multinode/tf_multiworker.py grads.npz
    gradparity diagnose grads.npz --replicas 2 --batch-size 12 --dtype float64

On real machines each address in the cluster list is that worker's own address and port as the others reach it,
the same list on every node; each node gets its own task index (docs/multinode.md).

What it computes, float64, on the global batch of N examples split into equal contiguous shards, shard i held by
worker i (each worker reads only its own rows): in ``strategy.run``, the ``tf.GradientTape`` gradient of the
worker's loss, then the replica context's ``all_reduce(SUM, ...)``, which is what a Keras optimizer's
``apply_gradients`` does to the gradients it is handed under a strategy (TF-Keras and Keras 3 both sum). With
``--reduction mean`` (the default):

- ``average_mean``: ``tf.nn.compute_average_loss(per-example losses, global_batch_size=N)`` (the sum of the
  shard's losses over the global N): summed over the workers, the single-device mean's gradient;
- ``local_mean``: ``tf.reduce_mean`` of the shard's losses: summed, R times the single-device mean's gradient
  (R the number of replicas in sync, one per worker here), the mistake ``compute_average_loss`` exists for;
- ``single_mean``: worker 0 alone, the mean over the whole global batch, no strategy.

With ``--reduction sum``: ``local_sum`` (``tf.reduce_sum`` of the shard's losses: summed, the single-device
sum's gradient) and ``single_sum``.

Worker 0 writes OUT (keys ``METHOD/PARAM``, what ``gradparity diagnose`` reads); every other worker i writes its
own copy of the all-reduced gradients to OUT with ``.workerI`` before the suffix (they must agree). ``--inputs
FILE.npz`` (keys x, y, w0, b0, w1, b1) replaces the seeded batch and parameters; ``--timeout S`` bounds each
collective (``CommunicationOptions(timeout_seconds=S)``); ``--communication auto|ring`` picks the all-reduce's
implementation (on CPU, AUTO runs TensorFlow's RPC ring, the only one for CPUs: NCCL needs GPUs).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import tensorflow as tf

PARAMS = ("w0", "b0", "w1", "b1")


def default_inputs(n: int = 12, sizes=(6, 5, 4), seed: int = 0) -> dict[str, np.ndarray]:
    """The seeded global batch and parameters (identical on every worker)."""
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, sizes[0])), "y": rng.integers(0, sizes[2], size=n),
            "w0": rng.normal(size=sizes[:2]), "b0": rng.normal(size=sizes[1]) * 0.1,
            "w1": rng.normal(size=sizes[1:]), "b1": rng.normal(size=sizes[2]) * 0.1}


def per_example_losses(params, x, y):
    """Cross-entropy of ``relu(x @ w0 + b0) @ w1 + b1`` against integer labels, one per row."""
    h = tf.nn.relu(x @ params["w0"] + params["b0"])
    logits = h @ params["w1"] + params["b1"]
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)


#: Each reduction's data-parallel methods: the loss of a worker's shard, given its per-example losses and the
#: global N.
LOSSES = {
    "mean": {"average_mean": lambda losses, n: tf.nn.compute_average_loss(losses, global_batch_size=n),
             "local_mean": lambda losses, n: tf.reduce_mean(losses)},
    "sum": {"local_sum": lambda losses, n: tf.reduce_sum(losses)},
}
#: The single-device loss of each reduction (worker 0, the whole global batch).
SINGLE = {"mean": tf.reduce_mean, "sum": tf.reduce_sum}


def read_task() -> tuple[int, int]:
    """(this worker's index, the number of workers) from TF_CONFIG; SystemExit naming what is missing."""
    try:
        config = json.loads(os.environ["TF_CONFIG"])
        return int(config["task"]["index"]), len(config["cluster"]["worker"])
    except (KeyError, ValueError, TypeError) as exc:
        raise SystemExit("set TF_CONFIG to '{\"cluster\": {\"worker\": [\"HOST0:PORT0\", \"HOST1:PORT1\"]}, "
                         f"\"task\": {{\"type\": \"worker\", \"index\": I}}}}' (docs/multinode.md): {exc!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the .npz to write (worker 0; others add .workerI)")
    ap.add_argument("--inputs", type=Path, help="an .npz with x, y, w0, b0, w1, b1 (default: seeded)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds each collective may take")
    ap.add_argument("--reduction", choices=("mean", "sum"), default="mean")
    ap.add_argument("--communication", choices=("auto", "ring"), default="auto")
    args = ap.parse_args()

    # Bad input stops this worker before it connects (the others then wait for it).
    index, workers = read_task()
    inputs = dict(np.load(args.inputs)) if args.inputs else default_inputs()
    x, y = inputs["x"].astype(np.float64), inputs["y"].astype(np.int32)
    n = len(y)
    if n % workers:
        raise SystemExit(f"the global batch of {n} must split evenly over {workers} workers")

    # First, before any other TensorFlow call: the strategy starts this worker's server and joins the cluster.
    implementation = {"auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
                      "ring": tf.distribute.experimental.CommunicationImplementation.RING}[args.communication]
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=tf.distribute.experimental.
                                                         CommunicationOptions(implementation=implementation,
                                                                              timeout_seconds=args.timeout))
    r = strategy.num_replicas_in_sync
    task = strategy.cluster_resolver.task_id
    rows = slice(task * n // workers, (task + 1) * n // workers)
    with strategy.scope():   # mirrored: every worker's copy starts equal
        params = {k: tf.Variable(inputs[k].astype(np.float64), name=k) for k in PARAMS}

    def replica_grads(xs, ys, method):
        with tf.GradientTape() as tape:
            loss = LOSSES[args.reduction][method](per_example_losses(params, xs, ys), n)
        grads = tape.gradient(loss, [params[k] for k in PARAMS])
        # What an optimizer's apply_gradients does under the strategy: sum the replicas' gradients.
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)

    # Each worker contributes its own rows: the arguments of strategy.run are this worker's replica's inputs.
    xs, ys = tf.constant(x[rows]), tf.constant(y[rows])
    step = tf.function(lambda xs, ys, method: strategy.run(replica_grads, args=(xs, ys, method)))
    arrays = {}
    for method in LOSSES[args.reduction]:
        # This worker's replica's copy of each all-reduced gradient (one replica per worker).
        grads = [strategy.experimental_local_results(g)[0] for g in step(xs, ys, method)]
        arrays.update({f"{method}/{k}": np.asarray(g) for k, g in zip(PARAMS, grads)})

    out = args.out
    if task == 0:
        whole = {k: tf.constant(inputs[k].astype(np.float64)) for k in PARAMS}
        with tf.GradientTape() as tape:
            tape.watch(list(whole.values()))
            loss = SINGLE[args.reduction](per_example_losses(whole, tf.constant(x), tf.constant(y)))
        grads = tape.gradient(loss, list(whole.values()))
        arrays.update({f"single_{args.reduction}/{k}": np.asarray(g) for k, g in zip(PARAMS, grads)})
    else:
        out = args.out.with_name(f"{args.out.stem}.worker{task}{args.out.suffix}")
    np.savez(out, **arrays)
    print(f"worker {task} of {workers}: {r} replicas in sync, rows {rows.start}:{rows.stop}, "
          f"communication {args.communication}, wrote {out}", flush=True)


if __name__ == "__main__":
    main()
