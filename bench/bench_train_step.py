"""Benchmark: one full training step of ``snclr`` against ``mocov3`` on the same encoder.

A step is what ``snclr.training.train`` runs: forward of both views, backward, AdamW step,
EMA update and enqueue, with the queue pre-filled so the neighbour terms are active. Reported per
method: milliseconds and images/s of the step, and for ``snclr`` the share of the step spent
in (a) the neighbour search (``ops.knn_topk``), (b) the positiveness of the chosen neighbours
(``ops.soft_neighbors`` minus the search) and (c) the soft-target loss forward + backward
(``functional.soft_neighbor_loss``). The shares time each op alone on the exact inputs
captured from a real step, twice (one per loss direction), so they include the backward.

Run:
    python -m bench.bench_train_step            # GPU shapes (ViT-S 224 px, ResNet-18 32 px)
    python -m bench.bench_train_step --small    # CPU-sized: small_cnn on 28x28
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from bench.harness import measure, print_table, run_case
from snclr import functional, ops
from snclr.model import create_model

# (encoder, image size, channels, batch, queue rows N, K): the paper's ViT-S setting with a
# per-GPU batch of 256, and a CIFAR-sized ResNet-18 (DESIGN section 8).
CASES = [("vit_small", 224, 3, 256, 65536, 30), ("resnet18", 32, 3, 512, 65536, 5)]
SMALL_CASES = [("small_cnn", 28, 1, 64, 4096, 5)]
HEADS = dict(projector_hidden=4096, projector_dim=256, predictor_hidden=4096)
SMALL_HEADS = dict(projector_hidden=512, projector_dim=128, predictor_hidden=512)


def _step_fn(method: str, encoder: str, size: int, chans: int, batch: int, rows: int, k: int,
             heads: dict, device: torch.device) -> tuple[Callable[[], None], object]:
    torch.manual_seed(0)
    amp = device.type == "cuda"
    # As `snclr pretrain` with bank_dtype auto: a bf16 queue (bf16 search) under bf16 autocast.
    model = create_model(encoder, method=method, in_chans=chans, img_size=size, num_neighbors=k,
                         queue_size=rows, bank_dtype=torch.bfloat16 if amp else torch.float32,
                         **heads).to(device)
    model.enqueue(torch.randn(rows, heads["projector_dim"], device=device))  # queue full
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x1, x2 = (torch.randn(batch, chans, size, size, device=device) for _ in range(2))

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x1, x2)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        model.momentum_update(0.99)
        model.enqueue(out.keys)

    return step, model


def _captured_inputs(model, step: Callable[[], None]) -> dict:
    """Run one step recording the inputs of the search and of the loss (first direction)."""
    seen: dict = {}
    search, loss = model.bank.search, functional.soft_neighbor_loss

    def record_search(key, online, k, **options):
        captured = (key.detach(), online.detach(), model.bank.rows().clone(), k, options)
        seen.setdefault("search", captured)
        return search(key, online, k, **options)

    def record_loss(z, y, key, neighbors, **options):
        # Tensor options (the positiveness weights) become leaves that still take gradients.
        leaves = {name: v.detach().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v
                  for name, v in options.items()}
        seen.setdefault("loss", (z.detach(), y.detach(), key.detach(), neighbors.detach(), leaves))
        return loss(z, y, key, neighbors, **options)

    model.bank.search, functional.soft_neighbor_loss = record_search, record_loss
    try:
        step()
    finally:
        del model.bank.search
        functional.soft_neighbor_loss = loss
    return seen


def _op_times(seen: dict, device: torch.device) -> dict[str, float]:
    key, online, bank, k, options = seen["search"]
    options = {name: value for name, value in options.items()
               if name in ("attention_temperature", "threshold", "backend")}
    online = online.requires_grad_()

    def soft() -> None:
        ops.soft_neighbors(key, online, bank, k, **options).positiveness.sum().backward()

    backend = options.get("backend", "auto")
    search_ms = measure(lambda: ops.knn_topk(key, bank, k, backend=backend), device)["ms"]
    soft_ms = measure(soft, device)["ms"]
    z, y, key2, neighbors, loss_options = seen["loss"]
    z, y = z.requires_grad_(), y.requires_grad_()

    def loss() -> None:
        functional.soft_neighbor_loss(z, y, key2, neighbors, **loss_options).backward()

    loss_ms = measure(loss, device)["ms"]
    # Two loss directions per step, each with its own search and positiveness.
    positiveness_ms = max(soft_ms - search_ms, 0.0)
    return {"search": 2 * search_ms, "positiveness": 2 * positiveness_ms, "loss": 2 * loss_ms}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="CPU-sized case (runs anywhere)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    cases, heads = (SMALL_CASES, SMALL_HEADS) if args.small else (CASES, HEADS)
    rows, summary = [], []
    for encoder, size, chans, batch, queue, k in cases:
        steps = {m: _step_fn(m, encoder, size, chans, batch, queue, k, heads, device)
                 for m in ("mocov3", "snclr")}
        shape = f"{encoder} {size}px B={batch} N={queue} K={k}"
        dtype = "bf16-autocast" if device.type == "cuda" else "float32"
        case_rows = run_case("train_step", {m: fn for m, (fn, _) in steps.items()},
                             float("nan"), "full", shape=shape, dtype=dtype, device=device,
                             reference="mocov3", repeats=3)
        rows += case_rows
        shares = _op_times(_captured_inputs(steps["snclr"][1], steps["snclr"][0]), device)
        for row in case_rows:
            line = {"case": shape, "method": row["provider"], "step_ms": row["ms"],
                    "images_per_s": batch / (row["ms"] * 1e-3)}
            if row["provider"] == "snclr":
                line.update({f"{name}_%": 100 * ms / row["ms"] for name, ms in shares.items()})
            summary.append(line)
    print_table(rows)
    print()
    columns = ["case", "method", "step_ms", "images_per_s", "search_%", "positiveness_%", "loss_%"]
    cells = [[f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, ""))
              for c in columns] for r in summary]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for line in cells:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths)))


if __name__ == "__main__":
    main()
