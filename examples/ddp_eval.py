"""Streaming validation from a PyTorch DDP job: every rank sends its own logits, rank 0 reads the result.

Runs on CPU with the gloo backend and two processes::

    python examples/ddp_eval.py                      # starts a server in-process
    python examples/ddp_eval.py --target host:50051  # or uses a running one
    torchrun --nproc-per-node 2 examples/ddp_eval.py --target host:50051

A small classifier is trained on synthetic Gaussian clusters for a few epochs;
after each epoch every rank evaluates its part of the validation set
(``DistributedSampler``) and streams logits, labels and sample ids. The sample
ids make the merge exact even though the sampler pads the last batch by
repeating samples: the service counts each id once.

``--reduce`` says where the logits become per-sample records: ``server`` (the
logits travel), ``client`` (each rank runs the service's engine on its own
device and sends compact per-sample records), ``auto``, or ``mixed`` (the default here:
even ranks reduce locally, odd ranks send logits; one evaluation, merged
exactly, to show both modes side by side)::

    python examples/ddp_eval.py --reduce client
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Literal

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from evalstream.client import EvalClient

NUM_CLASSES = 100
FEATURES = 32


def make_split(samples: int, seed: int) -> TensorDataset:
    """Gaussian clusters, one per class, with imbalanced class frequencies; index = sample id."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(NUM_CLASSES, FEATURES, generator=g) * 1.5
    weights = 1.0 / torch.arange(1, NUM_CLASSES + 1, dtype=torch.float64)
    g.manual_seed(seed)
    labels = torch.multinomial(weights, samples, replacement=True, generator=g)
    x = centers[labels] + torch.randn(samples, FEATURES, generator=g)
    return TensorDataset(x, labels, torch.arange(samples))


def rank_mode(reduce: str, rank: int) -> Literal["server", "client", "auto"]:
    """The reduce mode of one rank: "mixed" alternates client (even ranks) and server (odd)."""
    if reduce == "mixed":
        return "client" if rank % 2 == 0 else "server"
    return reduce  # type: ignore[return-value]


def evaluate(
    model: nn.Module, loader: DataLoader, client: EvalClient, args: argparse.Namespace, step: int
) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    model.eval()
    with (
        torch.no_grad(),
        client.evaluation(
            run=args.run,
            model="mlp",
            step=step,
            rank=rank,
            world_size=world,
            num_classes=NUM_CLASSES,
            dataset_size=len(loader.dataset),  # type: ignore[arg-type]
            reduce=rank_mode(args.reduce, rank),
        ) as ev,
    ):
        for x, y, ids in loader:
            ev.add(model(x), y, sample_ids=ids)  # host copy + enqueue; sent in the background
    summary = ev.summary
    assert summary is not None
    print(
        f"rank {rank}: step {step} sent {summary.samples} samples in {summary.chunks} chunks "
        f"(reduce={ev.reduce_mode})",
        flush=True,
    )
    if rank == 0:
        m = ev.result(timeout=120).result.metrics
        print(
            f"step {step}: nll {m['nll']:.4f}  top-1 {m['accuracy_top1']:.4f}  "
            f"top-5 {m['accuracy_top5']:.4f}  ECE {m['ece']:.4f}  "
            f"balanced acc {m['balanced_accuracy']:.4f}  best T {m['best_temperature']:.2f}",
            flush=True,
        )
    model.train()


def worker(rank: int, world: int, args: argparse.Namespace) -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = DistributedDataParallel(
        nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, NUM_CLASSES))
    )
    train, val = make_split(args.samples, seed=1), make_split(args.samples // 4, seed=2)
    train_loader = DataLoader(train, batch_size=256, sampler=DistributedSampler(train, shuffle=True))
    val_loader = DataLoader(val, batch_size=512, sampler=DistributedSampler(val, shuffle=False))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    with EvalClient(args.target) as client:
        for epoch in range(1, args.epochs + 1):
            train_loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
            for x, y, _ in train_loader:
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
            evaluate(model, val_loader, client, args, step=epoch)
    dist.barrier()
    dist.destroy_process_group()


def _spawned(rank: int, world: int, args: argparse.Namespace, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    worker(rank, world, args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", default=os.environ.get("EVALSTREAM_TARGET", ""))
    parser.add_argument("--run", default="ddp-example")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--samples", type=int, default=20_000, help="training samples (validation: a quarter)"
    )
    parser.add_argument("--nproc", type=int, default=2, help="processes to spawn without torchrun")
    parser.add_argument(
        "--reduce",
        choices=("mixed", "client", "server", "auto"),
        default="mixed",
        help="where logits become records (default: mixed, even ranks on the client)",
    )
    args = parser.parse_args(argv)

    if "RANK" in os.environ:  # launched by torchrun: one process per rank already
        if not args.target:
            parser.error("under torchrun, pass --target (or set EVALSTREAM_TARGET)")
        worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
        return 0

    with tempfile.TemporaryDirectory(prefix="evalstream-ddp-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        if args.target:
            mp.spawn(_spawned, args=(args.nproc, args, init_file), nprocs=args.nproc)
            return 0
        from evalstream.service.server import BackgroundServer
        from evalstream.service.settings import Settings

        settings = Settings.load(
            env={}, grpc_address="127.0.0.1:0", metrics_address="", data_dir=os.path.join(tmp, "data")
        )
        with BackgroundServer(settings) as server:
            print(f"in-process evalstream server on {server.target}", flush=True)
            args.target = server.target
            mp.spawn(_spawned, args=(args.nproc, args, init_file), nprocs=args.nproc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
