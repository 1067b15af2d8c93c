"""Whether the dynamic mask head learns in the first steps of a training config, or goes dead.

    python scripts/mask_head_health.py [--steps 300] [--every 25] [hydra overrides ...]
    python scripts/mask_head_health.py model.mask_negative_slope=0 seed=1   # CondInst's ReLU

Runs the plain step loop of ``conf/train.yaml`` with the overrides (no Lightning, but the run's
learning-rate schedule and gradient clipping) and prints, per window of ``--every`` steps, the
mean mask loss and the share of target instances whose mask logits M are one constant over the
whole map (spread under 1e-6): the dead state of a ReLU dynamic head, where every hidden unit of
its second layer is off for that instance, its output is the last bias alone and nothing
upstream of that bias gets a gradient (``visstg.model.segmentation.dynamic_mask_head``). Ends
with the first step whose window mean mask loss is under ``--below``.
"""

from __future__ import annotations

import argparse
import statistics


def constant_share(mask_logits) -> float:
    """Share of the ``[K, h, w]`` logit maps that hold one value (spread under 1e-6)."""
    if mask_logits.shape[0] == 0:
        return float("nan")
    flat = mask_logits.detach().flatten(1)  # [K, h*w]
    spread = flat.amax(1) - flat.amin(1)  # [K]
    return float((spread < 1e-6).float().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps to run")
    parser.add_argument("--every", type=int, default=25, help="steps per printed window")
    parser.add_argument("--below", type=float, default=1.5, help="mask loss the summary waits for")
    args, overrides = parser.parse_known_args(argv)

    import torch

    from step_loop import build_step_loop

    loop = build_step_loop(overrides)
    cfg, net, criterion, optimizer = loop.cfg, loop.net, loop.criterion, loop.optimizer
    loader = loop.datamodule.train_dataloader()
    # The schedule of the real run: warm-up and drops placed on max_epochs x batches per epoch.
    scheduler = None
    if loop.module.scheduler_factory is not None:
        total = int(cfg.trainer.max_epochs) * len(loader)
        scheduler = loop.module.scheduler_factory(optimizer, total_steps=total)
    clip = cfg.trainer.get("gradient_clip_val")

    print(f"{args.steps} steps, batch {cfg.data.batch_size}, "
          f"mask_negative_slope {getattr(net, 'mask_negative_slope', 0.0)}, seed {cfg.seed}")  # fmt: skip
    print("| steps | mask loss | constant masks |")
    print("| --- | --- | --- |")
    losses, shares, first_below = [], [], None
    step, batches = 0, iter(loader)
    while step < args.steps:
        try:
            batch = next(batches)
        except StopIteration:  # next epoch
            batches = iter(loader)
            continue
        out = net.forward_train(batch)
        terms = criterion(out, batch)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(loop.params, float(clip))
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        step += 1
        losses.append(float(terms["loss_mask"].detach()))
        shares.append(constant_share(out["mask_logits"]))
        if step % args.every == 0 or step == args.steps:
            n = (step - 1) % args.every + 1  # steps in this window
            mean_loss = statistics.fmean(losses[-n:])
            known = [s for s in shares[-n:] if s == s]  # steps with instances (not NaN)
            share = f"{statistics.fmean(known):.2f}" if known else "-"
            print(f"| {step - n + 1}-{step} | {mean_loss:.3f} | {share} |")
            if first_below is None and mean_loss < args.below:
                first_below = step
    if first_below is None:
        print(f"mask loss never under {args.below} (window means) in {args.steps} steps")
    else:
        print(f"mask loss under {args.below} (window mean) by step {first_below}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
