"""Seconds per training step (forward, criterion, backward, optimizer step) of a training config.

    python scripts/bench_train_step.py [--steps 30] [--warmup 5] [hydra overrides ...]
    python scripts/bench_train_step.py model.backbone.autocast=null model.backbone.channels_last=false
    python scripts/bench_train_step.py --device cuda --precision bf16 --steps 300 --warmup 20 \\
        --output r50_train.json +experiment=r50 data=synthetic trainer=gpu \\
        model.backbone.weights=null data.batch_size=16 'data.train_sizes=[360]' \\
        data.max_size=640 data.crop_size=null

Builds the network, criterion and data of ``conf/train.yaml`` with the overrides and times the
plain step loop (no Lightning, logging or checkpoints) on the first batches of the training
loader, loaded before the clock starts (on ``--device``; more steps than the loader holds cycle
through it). Like training, it uses deterministic algorithms when the config's
``trainer.deterministic`` is set (the CPU default), without filling new tensors with NaN
(``--fill-uninitialized`` measures that too). ``--precision bf16|fp16`` runs the forward and the
criterion under ``torch.autocast``, as Lightning's ``bf16-mixed`` / ``16-mixed`` do (fp16 with a
gradient scaler); the config's own ``autocast`` keys still apply inside. Prints the median and
mean step time, steps per second and the peak memory: CUDA's allocator peak over the timed steps
on a GPU, the process's peak resident memory on a CPU. ``--output`` writes the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument(
        "--fill-uninitialized",
        action="store_true",
        help="with deterministic algorithms, also fill new tensors with NaN (torch's default)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--precision", default="fp32", help="fp32, bf16 or fp16 (autocast)")
    parser.add_argument("--output", type=Path, help="also write the numbers to this JSON file")
    args, overrides = parser.parse_known_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.output is not None and args.output.exists():
        parser.error(f"{args.output} exists; choose another --output")

    import torch
    from pytorch_lightning.utilities import move_data_to_device

    from step_loop import build_step_loop
    from visstg.benchmark import device_name
    from visstg.cli import UsageError, resolve_device
    from visstg.inference import autocast_context

    try:
        device = torch.device(resolve_device(args.device))
        autocast = autocast_context(device, args.precision)
    except UsageError as err:
        sys.exit(f"error: {err}")
    loop = build_step_loop(overrides, fill_uninitialized=args.fill_uninitialized, device=device)
    cfg, net, criterion, optimizer = loop.cfg, loop.net, loop.criterion, loop.optimizer
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    loader = iter(loop.datamodule.train_dataloader())
    total = args.steps + args.warmup
    # Moved as Lightning moves a batch before training_step.
    batches = [move_data_to_device(next(loader), device) for _ in range(min(total, len(loader)))]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    for i in range(total):
        if i == args.warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        batch = batches[i % len(batches)]
        sync()
        start = time.perf_counter()
        with autocast:
            loss = criterion(net.forward_train(batch), batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)

    median = statistics.median(times)
    name = device_name(str(device))
    if device.type == "cuda":
        peak_mib, peak_what = torch.cuda.max_memory_allocated(device) / 2**20, "GPU allocated"
    else:  # ru_maxrss is in KiB on Linux
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak_what = "resident (process)"
    report = {
        "device": name,
        "precision": args.precision,
        "batch_size": cfg.data.batch_size,
        "steps": len(times),
        "median_s_per_step": median,
        "mean_s_per_step": statistics.mean(times),
        "steps_per_s": 1 / median,
        "peak_memory_mib": peak_mib,
        "peak_memory": peak_what,
        "overrides": overrides,
    }
    print(
        f"{len(times)} steps, batch {cfg.data.batch_size}, {name}, {args.precision}: "
        f"median {median:.3f} s/step, mean {report['mean_s_per_step']:.3f}, "
        f"{report['steps_per_s']:.2f} steps/s, peak {peak_what} memory {peak_mib:.0f} MiB"
    )
    if args.output is not None:
        args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
