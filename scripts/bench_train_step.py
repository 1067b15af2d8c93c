"""Seconds per training step (forward, criterion, backward, AdamW step) of a training config.

    python scripts/bench_train_step.py [--steps 30] [--warmup 5] [hydra overrides ...]
    python scripts/bench_train_step.py model.backbone.autocast=null model.backbone.channels_last=false

Builds the network, criterion and data of ``conf/train.yaml`` with the overrides and times the
plain step loop (no Lightning, logging or checkpoints) on the first batches of the training
loader, loaded before the clock starts. Like training, it uses deterministic algorithms when the
config's ``trainer.deterministic`` is set (the CPU default), without filling new tensors with NaN
(``--fill-uninitialized`` measures that too). Prints the median and mean step time.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument(
        "--fill-uninitialized",
        action="store_true",
        help="with deterministic algorithms, also fill new tensors with NaN (torch's default)",
    )
    args, overrides = parser.parse_known_args()

    import torch

    from step_loop import build_step_loop

    loop = build_step_loop(overrides, fill_uninitialized=args.fill_uninitialized)
    cfg, net, criterion, optimizer = loop.cfg, loop.net, loop.criterion, loop.optimizer
    loader = iter(loop.datamodule.train_dataloader())
    batches = [next(loader) for _ in range(min(args.steps + args.warmup, len(loader)))]

    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        loss = criterion(net.forward_train(batch), batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    print(
        f"{len(times)} steps, batch {cfg.data.batch_size}, {torch.get_num_threads()} threads: "
        f"median {statistics.median(times):.3f} s/step, mean {statistics.mean(times):.3f}"
    )


if __name__ == "__main__":
    main()
