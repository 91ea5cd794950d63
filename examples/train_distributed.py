"""Train a small stack of HDGSA blocks for a few steps: one process, DDP or FSDP2.

    python examples/train_distributed.py --parallel none --steps 4 --out single.json
    torchrun --nproc-per-node 2 examples/train_distributed.py --parallel ddp --steps 4 --out ddp.json
    torchrun --nproc-per-node 2 examples/train_distributed.py --parallel fsdp --steps 4 --out fsdp.json

Every run sees the same synthetic global batch each step (seeded), split evenly across the
ranks, and starts from the same weights, so the loss curves of the three runs agree up to the
order of floating-point sums (DDP and FSDP2 average the gradients over ranks with an all-reduce /
reduce-scatter, the single process sums them in one backward). On CPU the processes talk through
gloo, on GPUs through NCCL (one GPU per rank; keep NVLink multicast off with
``NCCL_NVLS_ENABLE=0`` on shared machines). ``--compile`` compiles each block with
``torch.compile(fullgraph=True)``: every op is a ``torch.library`` custom op, so nothing breaks
the graph. Tokens per second (all ranks together) are timed over the steps after the first.

Writes ``--out`` (JSON: the mode, world size, losses per step, tokens per second) from rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hdgsa_block import BlockConfig, HDGSAModel


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parallel", choices=("none", "ddp", "fsdp"), default="none")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=4, help="sequences per step, all ranks together")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--topk", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) each block")
    parser.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend (default: inductor on CUDA, aot_eager on CPU, which compiles fast)",
    )
    parser.add_argument(
        "--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the losses (rank 0)")
    return parser.parse_args(argv)


def synthetic_batch(step: int, args: argparse.Namespace, device: torch.device) -> torch.Tensor:
    """The step's global batch ``[global_batch, seq_len + 1]``: the same on every rank and run."""
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    return torch.randint(0, args.vocab, (args.global_batch, args.seq_len + 1), generator=generator).to(device)


def build_model(args: argparse.Namespace, device: torch.device) -> HDGSAModel:
    torch.manual_seed(args.seed)  # the same initial weights in every process and run
    cfg = BlockConfig(dim=args.dim, topk=args.topk)
    return HDGSAModel(cfg, vocab_size=args.vocab, num_layers=args.layers).to(device)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    distributed = args.parallel != "none"
    rank, world = 0, 1
    if distributed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} must divide by the world size {world}")

    model = build_model(args, device)
    if args.compile:
        compile_backend = args.compile_backend or ("inductor" if device.type == "cuda" else "aot_eager")
        for block in model.blocks:
            block.compile(fullgraph=True, backend=compile_backend)
    if args.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    elif args.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    local = args.global_batch // world
    losses, step_seconds = [], []
    for step in range(args.steps):
        tokens = synthetic_batch(step, args, device)[rank * local : (rank + 1) * local]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # The global batch's loss: the mean of the ranks' means (equal local batch sizes).
        reported = loss.detach().clone()
        if distributed:
            dist.all_reduce(reported)
            reported /= world
        losses.append(reported.item())  # a host sync, which also ends the step's GPU work
        step_seconds.append(time.perf_counter() - start)

    timed = step_seconds[1:] or step_seconds  # the first step compiles
    tokens_per_step = args.global_batch * args.seq_len
    result = {
        "parallel": args.parallel,
        "world_size": world,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "compile": args.compile,
        "losses": losses,
        "tokens_per_second": tokens_per_step * len(timed) / sum(timed),
    }
    if rank == 0:
        print(json.dumps(result))
        if args.out is not None:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    if distributed:
        # The wrapped model and its optimizer go before the process group: seen on CPU with
        # gloo, DDP's reducer destroyed after the group could hang the worker's exit.
        del model, optimizer
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
