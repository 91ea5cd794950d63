"""The reference block: it trains, recomputes bitwise, compiles whole, and matches across ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hdgsa_block import BlockConfig, HDGSABlock, HDGSAModel
from torch.utils.checkpoint import checkpoint

EXAMPLES = Path(__file__).resolve().parents[1]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def small_block(device: str = "cpu", seed: int = 0, **overrides) -> HDGSABlock:
    torch.manual_seed(seed)
    block = HDGSABlock(BlockConfig(**overrides))
    with torch.no_grad():  # the mixing starts at zero weights: make every path carry signal
        block.mix.weight.normal_(0.0, 0.05)
    return block.to(device)


def streams_input(device: str = "cpu", batch: int = 2, seq_len: int = 24, seed: int = 1) -> torch.Tensor:
    cfg = BlockConfig()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq_len, cfg.streams, cfg.dim, generator=generator)
    return x.to(device).requires_grad_()


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def block_loss(block: HDGSABlock, x: torch.Tensor, use_checkpoint: bool = False) -> torch.Tensor:
    if use_checkpoint:
        out, index_loss = checkpoint(block, x, use_reentrant=False)
    else:
        out, index_loss = block(x)
    weights = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    return (out * weights).sum() + index_loss


@pytest.mark.parametrize("device", DEVICES)
def test_block_trains_every_parameter(device):
    block = small_block(device)
    x = streams_input(device)
    out, index_loss = block(x)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    assert index_loss.ndim == 0
    assert torch.isfinite(index_loss)
    assert index_loss.item() >= 0.0
    block_loss(block, x).backward()
    for name, parameter in block.named_parameters():
        assert parameter.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{name}: non-finite gradient"
        assert parameter.grad.abs().sum() > 0, f"{name}: zero gradient"
    # The indexer learns only through indexer_scores_at's KL loss.
    assert block.gsa.index_q.weight.grad.abs().sum() > 0


def test_model_loss_decreases():
    torch.manual_seed(0)
    model = HDGSAModel(BlockConfig(), vocab_size=32, num_layers=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 32, (2, 25), generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(4):
        loss = model(tokens)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("device", DEVICES)
def test_forward_is_bitwise_repeatable(device, deterministic):
    block = small_block(device)
    x = streams_input(device)
    with torch.no_grad():
        first, first_loss = block(x)
        second, second_loss = block(x)
    assert torch.equal(first, second)
    assert torch.equal(first_loss, second_loss)


@pytest.mark.parametrize("device", DEVICES)
def test_checkpoint_recompute_gives_bitwise_the_same_gradients(device, deterministic):
    block = small_block(device)
    x = streams_input(device)
    plain = torch.autograd.grad(block_loss(block, x), [x, *block.parameters()])
    recomputed = torch.autograd.grad(block_loss(block, x, use_checkpoint=True), [x, *block.parameters()])
    names = ["x", *(name for name, _ in block.named_parameters())]
    for name, a, b in zip(names, plain, recomputed, strict=True):
        assert torch.equal(a, b), (
            f"{name}: gradient differs under recompute (max {float((a - b).abs().max())})"
        )


@pytest.mark.parametrize("device", DEVICES)
def test_compiles_whole_and_matches_eager(device):
    block = small_block(device)
    x = streams_input(device, seq_len=16)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    eager_out, eager_loss = block(x)
    out, loss = compiled(x)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(block_loss(compiled, x), [x, *block.parameters()])
    eager_grads = torch.autograd.grad(block_loss(block, x), [x, *block.parameters()])
    for a, b in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def run_training(tmp_path: Path, parallel: str, processes: int, *extra: str) -> dict:
    out = tmp_path / f"{parallel}.json"
    script = [
        str(EXAMPLES / "train_distributed.py"),
        "--parallel",
        parallel,
        "--steps",
        "3",
        "--out",
        str(out),
        *extra,
    ]
    if processes == 1:
        command = [sys.executable, *script]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={processes}",
            *script,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NCCL_NVLS_ENABLE": "0"}
    # The processes run the ops' real CPU path (PyTorch); Triton's interpreter is a test vehicle
    # for the kernels, covered by the in-process tests above.
    env.pop("TRITON_INTERPRET", None)
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=150)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_ddp_and_fsdp2_compiled_match_one_process(tmp_path):
    single = run_training(tmp_path, "none", 1)
    assert len(single["losses"]) == 3
    assert single["losses"][-1] < single["losses"][0]
    for parallel in ("ddp", "fsdp"):
        # Each rank compiles its blocks with fullgraph=True: no graph break under either wrapper.
        result = run_training(tmp_path, parallel, 2, "--compile")
        assert result["world_size"] == 2
        assert result["compile"]
        # Same data, same weights: only the order of the gradient sums differs (float32).
        torch.testing.assert_close(
            torch.tensor(result["losses"]), torch.tensor(single["losses"]), rtol=1e-4, atol=1e-5
        )
