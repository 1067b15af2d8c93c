"""Does the training input pipeline keep up with the training step? Both measured in one run.

    python scripts/bench_data.py [--steps N] [train overrides, e.g. data.num_workers=2]

Composes conf/train.yaml (the training default, see README: synthetic data; batch size,
loader workers and model from the config and the overrides), then times (1) the train
DataLoader delivering N batches (after the first, which pays the worker start-up) with nothing
else running, and (2) N training steps (forward, criterion, backward, SGD step) on one fixed
batch. Prints both rates and their ratio; the target is a ratio >= 2
(batches arrive at least twice as fast as the step consumes them). Add --json PATH for a report.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    import hydra
    import torch
    from omegaconf import OmegaConf

    from visstg.config import compose, resolved
    from visstg.train import build_module

    # Resolved without the hydra node (its sweep keys do not resolve outside a Hydra run).
    cfg = OmegaConf.create(resolved(compose("train", ["logger=none", *args.overrides])))
    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()

    # (1) The loader alone.
    it = iter(loader)
    first = next(it)  # worker start-up
    waits = []
    for _ in range(args.steps):
        start = time.perf_counter()
        try:
            next(it)
        except StopIteration:
            it = iter(loader)
            next(it)
        waits.append(time.perf_counter() - start)
    del it
    load_s = statistics.median(waits)

    # (2) The training step alone, on one fixed batch.
    module = build_module(cfg).train()
    params = [p for p in module.net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0, momentum=0.9)  # lr 0: the weights stay put
    steps = []
    for i in range(args.steps + 1):
        start = time.perf_counter()
        loss = module.model_step(first)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:  # the first step warms up
            steps.append(time.perf_counter() - start)
    step_s = statistics.median(steps)

    report = {
        "batch_size": int(cfg.data.batch_size),
        "num_workers": int(cfg.data.num_workers),
        "torch_threads": torch.get_num_threads(),
        "loader_s_per_batch": round(load_s, 4),
        "step_s_per_batch": round(step_s, 4),
        "ratio": round(step_s / max(load_s, 1e-9), 2),
        "overrides": args.overrides,
    }
    print(
        f"data loader: {load_s * 1e3:.1f} ms/batch ({report['num_workers']} workers, "
        f"batch {report['batch_size']}); training step: {step_s * 1e3:.1f} ms/batch; "
        f"loader is {report['ratio']:.1f}x faster than the step (target >= 2)"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
