"""One data-parallel gradient of a small MLP computed by JAX on several processes ("nodes"), saved for comparison
with the single-device gradient. A plain user's script: JAX and numpy only.

Every process runs this script with the same coordinator address and its own process id; process 0 also runs
the coordinator service (``jax.distributed.initialize``). Two nodes on one machine, over loopback:

    python examples/multinode/jax_distributed.py --coordinator 127.0.0.1:PORT --num-processes 2 --process-id 0 grads.npz &
    python examples/multinode/jax_distributed.py --coordinator 127.0.0.1:PORT --num-processes 2 --process-id 1 grads.npz
    gradparity diagnose grads.npz --replicas 2

On real machines: the coordinator address is node 0's address that the others can reach (``10.0.0.1:PORT``),
the same on every node; each node gets its own --process-id (docs/multinode.md).

What it computes, float64, on the global batch of N examples split into equal contiguous blocks, block i held by
process i (``jax.make_array_from_process_local_data``) on a mesh of every process's devices (axis "data"):

- ``jit_mean``: ``jax.jit(jax.grad(mean loss over the global batch))`` on the sharded batch: XLA inserts the
  cross-process all-reduce (gloo on CPU) and the result is the single-device gradient of the mean;
- ``shard_map_pmean_mean``: ``jax.shard_map`` whose body takes ``jax.grad`` of its block's mean loss and
  ``lax.pmean``\\s it, the pattern carried over from ``pmap``; with shard_map's default ``check_vma=True`` the
  gradient of the replicated parameters is already summed over the blocks inside the body (the transpose of the
  implicit ``pvary`` is a ``psum``), so this is R times the single-device mean's gradient, R the mesh's devices
  (one per process unless XLA_FLAGS gives a process more);
- ``single_mean``: process 0 alone, the same loss of the whole global batch on its own first device.

Process 0 writes OUT (keys ``METHOD/PARAM``, what ``gradparity diagnose`` reads); every other process i writes its
own copy of the all-reduced gradients to OUT with ``.processI`` before the suffix (they must agree). ``--inputs
FILE.npz`` (keys x, y, w0, b0, w1, b1) replaces the seeded batch and parameters. CPU collectives across
processes need ``jax_cpu_collectives_implementation = "gloo"`` (jax 0.10's default; set here for older jax,
whose default was none: "Multiprocess computations aren't implemented on the CPU backend").
"""
from __future__ import annotations

import argparse
from pathlib import Path

import jax

# Before any computation: float64, and gloo for CPU collectives across processes.
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_cpu_collectives_implementation", "gloo")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402


def default_inputs(n: int = 12, sizes=(6, 5, 4), seed: int = 0) -> dict[str, np.ndarray]:
    """The seeded global batch and parameters (identical on every process)."""
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, sizes[0])), "y": rng.integers(0, sizes[2], size=n),
            "w0": rng.normal(size=sizes[:2]), "b0": rng.normal(size=sizes[1]) * 0.1,
            "w1": rng.normal(size=sizes[1:]), "b1": rng.normal(size=sizes[2]) * 0.1}


def mean_loss(params, x, y):
    """Cross-entropy of ``relu(x @ w0 + b0) @ w1 + b1`` against integer labels, averaged over the rows."""
    h = jax.nn.relu(x @ params["w0"] + params["b0"])
    logits = h @ params["w1"] + params["b1"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the .npz to write (process 0; others add .processI)")
    ap.add_argument("--coordinator", required=True, help="HOST:PORT of process 0's coordinator service")
    ap.add_argument("--num-processes", type=int, required=True)
    ap.add_argument("--process-id", type=int, required=True)
    ap.add_argument("--inputs", type=Path, help="an .npz with x, y, w0, b0, w1, b1 (default: seeded)")
    ap.add_argument("--timeout", type=int, default=300, help="seconds to wait for every process to connect")
    args = ap.parse_args()

    # Bad input stops this process before it connects (the others then wait for it until --timeout).
    inputs = dict(np.load(args.inputs)) if args.inputs else default_inputs()
    x, y = inputs["x"].astype(np.float64), inputs["y"].astype(np.int32)
    n, r = len(y), args.num_processes
    if n % r:
        raise SystemExit(f"the global batch of {n} must split evenly over {r} processes")

    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id, initialization_timeout=args.timeout)
    params = {k: jnp.asarray(inputs[k], dtype=jnp.float64) for k in ("w0", "b0", "w1", "b1")}
    rows = slice(jax.process_index() * n // r, (jax.process_index() + 1) * n // r)

    # Every process's devices on one axis; each process contributes its own rows of the global batch.
    mesh = Mesh(np.array(jax.devices()), ("data",))
    split, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    gx = jax.make_array_from_process_local_data(split, x[rows])
    gy = jax.make_array_from_process_local_data(split, y[rows])
    gparams = jax.device_put(params, replicated)

    grads = {"jit_mean": jax.jit(jax.grad(mean_loss), out_shardings=replicated)(gparams, gx, gy)}

    def body(p, xb, yb):
        return jax.lax.pmean(jax.grad(mean_loss)(p, xb, yb), "data")

    grads["shard_map_pmean_mean"] = jax.jit(jax.shard_map(
        body, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P()))(gparams, gx, gy)

    arrays, out = {}, args.out
    if jax.process_index() == 0:
        # Committed to this process's own device: jit runs there alone, without the other processes.
        single = jax.jit(jax.grad(mean_loss))(*jax.device_put((params, x, y), jax.local_devices()[0]))
        arrays.update({f"single_mean/{k}": np.asarray(v) for k, v in single.items()})
    else:
        out = args.out.with_name(f"{args.out.stem}.process{jax.process_index()}{args.out.suffix}")
    # Replicated results: each process reads its own local copy.
    arrays.update({f"{method}/{k}": np.asarray(v.addressable_data(0))
                   for method, g in grads.items() for k, v in g.items()})
    np.savez(out, **arrays)
    print(f"process {jax.process_index()} of {r}: {len(jax.devices())} devices, rows {rows.start}:{rows.stop}, "
          f"wrote {out}", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
