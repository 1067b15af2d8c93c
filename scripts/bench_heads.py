"""Milliseconds and GMAC of the backbone and of each dense head alone, on one frame.

    python scripts/bench_heads.py [--size 384 640] [--repeats 7] [hydra overrides ...]
    python scripts/bench_heads.py +experiment=r50 model.backbone.weights=null

Builds the model of ``conf/train.yaml`` with the overrides (random weights), and times, under
``torch.inference_mode`` on the CPU, the backbone + FPN with and without its batch norms folded
(``ResNetFPN.fuse_norms``), then each head on the backbone's maps of one frame: the parts that
inference runs on every cell (the heatmap branch, the mask branch) and, for comparison, the
parts it runs at the detections only when run densely (size + offset branches, controller,
kernel-warp offsets). Prints the median of ``--repeats`` calls and the GMAC
(``torch.utils.flop_counter``, a multiply-add = 1) of each, and each as a share of the folded
backbone: the floor under ``python -m visstg.benchmark``'s ratio beyond the backbone.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, nargs=2, default=[384, 640], help="input h w")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per part")
    args, overrides = parser.parse_known_args()

    import hydra
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from torch.utils.flop_counter import FlopCounterMode

    from visstg.config import register_resolvers

    register_resolvers()  # the configs' ${eval:...}
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose("train", overrides=overrides)
    net = hydra.utils.instantiate(OmegaConf.to_container(cfg.model, resolve=True)).eval()
    image = torch.randn(1, 3, *args.size)

    def measure(fn) -> tuple[float, float]:
        with torch.inference_mode():
            fn()  # warm-up
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            with FlopCounterMode(display=False) as counter:
                fn()
        return statistics.median(times), counter.get_total_flops() / 2e9

    rows = [("backbone + FPN, norms as trained", *measure(lambda: net.backbone(image)))]
    net.backbone.fuse_norms()
    rows.append(("backbone + FPN, norms folded", *measure(lambda: net.backbone(image))))
    with torch.inference_mode():
        feats = net.backbone(image)
    fine, maps = (feats[0], feats[1:]) if net.backbone.fine_level else (None, feats)  # P3..
    head = net.det_head
    rows.append(("heatmap branch (dense at inference)", *measure(lambda: head(maps, ("heatmap",)))))
    rows.append(("mask branch (dense at inference)", *measure(lambda: net.mask_branch(maps, fine))))
    rows.append(
        ("size + offset branches (at the peaks)", *measure(lambda: head(maps, ("size", "offset"))))
    )
    rows.append(("controller (at the detections)", *measure(lambda: net.controller(maps))))
    warp = getattr(net, "kernel_warp", None)
    if warp is not None:
        rows.append(
            (
                "warp offsets (at the detections)",
                *measure(lambda: [warp.offsets(f, f) for f in maps]),
            )
        )
    base = rows[1][1]
    print(f"input {args.size[0]}x{args.size[1]}, {torch.get_num_threads()} threads")
    print(f"{'part':42s} {'ms':>8s} {'GMAC':>8s} {'ms / folded backbone':>21s}")
    for name, ms, gmac in rows:
        print(f"{name:42s} {ms:8.1f} {gmac:8.3f} {ms / base:20.1%}")
    dense = rows[2][1] + rows[3][1]
    print(f"dense heads (heatmap + mask branch) / folded backbone: {dense / base:.2f}")


if __name__ == "__main__":
    main()
