"""One data-parallel gradient with PyTorch DistributedDataParallel on several machines ("nodes"), saved for
comparison with the single-device gradient. A user's own plain script: torch and numpy only.

Launch one torchrun per node with the same rendezvous address and port and the node's own --node-rank (here two
nodes on one machine, over the loopback interface):

    torchrun --nnodes 2 --nproc-per-node 1 --node-rank 0 --master-addr 127.0.0.1 --master-port 29500 \\
        examples/multinode/torch_ddp.py grads.npz &
    torchrun --nnodes 2 --nproc-per-node 1 --node-rank 1 --master-addr 127.0.0.1 --master-port 29500 \\
        examples/multinode/torch_ddp.py grads.npz
    gradparity diagnose grads.npz --replicas 2 --batch-size 12

torchrun gives each process RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; the process group joins
through them (``init_method="env://"``) with the gloo backend (CPU tensors over TCP). Every node reads the same
global batch of N examples and takes its contiguous shard (``torch.tensor_split(batch, R)``, what a
DistributedSampler-fed loader gives each node in another order); every node starts from the same weights (DDP
also broadcasts rank 0's when it wraps the model).

Node 0 writes OUT (keys ``METHOD/PARAM``, the layout ``gradparity diagnose`` reads, in this order):
``one_device/PARAM``, the gradient of the whole global batch on node 0 alone, without the process group, then
``ddp/PARAM``, node 0's ``param.grad`` after DDP's all-reduce. Every other node r writes its own ``ddp/PARAM``
to OUT with ``.rank{r}`` before the suffix (all nodes hold the same gradient after the all-reduce). (Labels of
your choice: "single" would read, to diagnose, as a one-example-at-a-time method.)

``--reduction mean`` (default) or ``sum``: each node's ``F.cross_entropy(reduction=...)`` on its shard. DDP
averages the nodes' gradients (divides their sum by the world size R): the mean gives the single-device mean
when every shard has N / R examples, the sum gives 1/R of the single-device sum. ``--inputs FILE.npz`` (keys
``x``, ``y`` and every parameter by its torch name: ``0.weight``, ``0.bias``, ``2.weight``, ``2.bias`` of
Linear(F, H), Tanh, Linear(H, C)) replaces the seeded batch and weights.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def default_inputs(n: int = 12, features: int = 5, hidden: int = 4, classes: int = 3) -> dict[str, np.ndarray]:
    """The seeded global batch and weights (identical on every node)."""
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(n, features)), "y": rng.integers(0, classes, size=n),
            "0.weight": rng.normal(size=(hidden, features)) * 0.5, "0.bias": rng.normal(size=hidden) * 0.1,
            "2.weight": rng.normal(size=(classes, hidden)) * 0.5, "2.bias": rng.normal(size=classes) * 0.1}


def make_model(inputs: dict[str, np.ndarray]) -> nn.Module:
    """Linear(F, H), Tanh, Linear(H, C) in float64 holding the given weights."""
    (hidden, features), classes = inputs["0.weight"].shape, inputs["2.weight"].shape[0]
    model = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, classes)).double()
    model.load_state_dict({k: torch.from_numpy(np.asarray(inputs[k], dtype=np.float64))
                           for k in model.state_dict()})
    return model


def gradient(model: nn.Module, x, y, reduction: str, module: nn.Module | None = None) -> dict[str, np.ndarray]:
    """``param.grad`` of every parameter of ``model`` after one backward pass of ``(module or model)(x)``'s
    loss."""
    model.zero_grad(set_to_none=True)
    F.cross_entropy((module or model)(x), y, reduction=reduction).backward()
    return {name: p.grad.detach().numpy().copy() for name, p in model.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="the .npz node 0 writes (node r: .rank{r} before the suffix)")
    parser.add_argument("--reduction", choices=("mean", "sum"), default="mean")
    parser.add_argument("--inputs", type=Path, help="an .npz with x, y and the weights (default: seeded)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds to wait for every node to connect")
    args = parser.parse_args()

    # Bad input stops this node before it connects (the others then wait for it until --timeout).
    inputs = dict(np.load(args.inputs)) if args.inputs else default_inputs()
    x, y = torch.from_numpy(np.asarray(inputs["x"], dtype=np.float64)), torch.from_numpy(inputs["y"]).long()
    world = int(os.environ["WORLD_SIZE"])   # set by torchrun: nnodes * nproc-per-node
    if len(y) % world:
        raise SystemExit(f"the global batch of {len(y)} must split evenly over {world} processes")
    model = make_model(inputs)
    one_device = copy.deepcopy(model)

    dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=args.timeout))
    try:
        rank = dist.get_rank()
        ddp = DistributedDataParallel(model)
        xs, ys = torch.tensor_split(x, world)[rank], torch.tensor_split(y, world)[rank]
        grads = gradient(model, xs, ys, args.reduction, module=ddp)   # DDP all-reduces inside backward()
        if rank == 0:
            single = gradient(one_device, x, y, args.reduction)
            # The reference first: diagnose reads the methods in the order the file holds them.
            np.savez(args.out, **{f"one_device/{k}": v for k, v in single.items()},
                     **{f"ddp/{k}": v for k, v in grads.items()})
        else:
            np.savez(args.out.with_name(f"{args.out.stem}.rank{rank}{args.out.suffix or '.npz'}"),
                     **{f"ddp/{k}": v for k, v in grads.items()})
        dist.barrier()   # no node leaves before every node has its gradient
        print(f"rank {rank} of {world}: the {args.reduction} gradient written", flush=True)
    except BaseException:
        dist.destroy_process_group()
        raise
    # Every node has written its gradient: leave without tearing gloo down. Under load, torch 2.13's teardown of
    # a finished gloo process (destroy_process_group, then the interpreter's exit) now and then aborts it
    # ("terminate called without an active exception", SIGABRT), and torchrun would report the node as failed.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
