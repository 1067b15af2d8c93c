"""VisSTG: the composed network (paper Fig. 2; DESIGN.md section 1).

Two entry points share every part:

* ``forward_train(batch)``: a batch of (reference, target) pairs -> raw outputs for
  ``VisSTGCriterion``.
* ``inference_step(image, state, references)``: one frame of an online pass, given the small
  state carried from the previous frame -> detections, masks, edge scores, node features.

The first frame (or any frame without a reference node) goes through the same code with an empty
edge set, so the fused maps equal the backbone maps (the paper's "plain branch").
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from visstg.model.association import EmbeddingAssociation, OffsetAssociation, gather_connected
from visstg.model.backbone import AUTOCAST_DTYPES, ResNetFPN
from visstg.model.detection import (
    DEFAULT_SIZE_RANGES,
    DEFAULT_STRIDES,
    CenterNetHead,
    assign_targets,
    decode_detections,
    gather_at_cells,
    neighbour_cells,
)
from visstg.model.fusion import ConcatFusion, box_features
from visstg.model.gnn import SpatialTemporalGNN
from visstg.model.graph import GraphBuilder
from visstg.model.propagation import KernelWarp
from visstg.model.segmentation import (
    DEFAULT_SIZES_OF_INTEREST,
    Controller,
    LazyKernelMaps,
    MaskBranch,
    dynamic_mask_head,
    num_dynamic_params,
    upsample_mask_logits,
)
from visstg.model.tracking import EdgeClassifier, edge_scores_for_detections
from visstg.timing import NULL_TIMER

FUSIONS = ("relation", "concat", "none")
ASSOCIATIONS = ("edge", "embedding", "offset")
MASK_COMBINES = ("mean", "target", "warp")


def _size_bound(value: float | str) -> float:
    # YAML spells infinity `.inf`; a command-line override hands that over as the string ".inf".
    text = str(value).strip().lower()
    return float(text.replace(".inf", "inf")) if text.endswith(".inf") else float(value)


def _swap_halves(x: Tensor | tuple[Tensor, ...], b: int) -> Tensor | tuple[Tensor, ...]:
    """``cat([x[b:], x[:b]])``, of each tensor of a tuple too (reference, target -> target,
    reference)."""
    if isinstance(x, tuple):
        return tuple(torch.cat([t[b:], t[:b]]) for t in x)
    return torch.cat([x[b:], x[:b]])


def _as_ranges(size_ranges: Sequence[Sequence[float]]) -> tuple[tuple[float, float], ...]:
    """``[[lo, hi], ...]`` as floats; ``.inf`` / ``inf`` for an open upper end."""
    ranges = []
    for pair in size_ranges:
        try:
            lo, hi = (_size_bound(v) for v in pair)
        except (TypeError, ValueError):
            raise ValueError(
                f"model.size_ranges: {list(pair)!r} is not a [lo, hi] pair of numbers "
                "(write inf or .inf for an open end)"
            ) from None
        if not 0 <= lo < hi:
            raise ValueError(f"model.size_ranges: need 0 <= lo < hi, got [{lo}, {hi}]")
        ranges.append((lo, hi))
    return tuple(ranges)


class VisSTG(nn.Module):
    """Detect, segment and track with a spatial-temporal graph.

    Every submodule is injected; ``None`` builds the default at dimension ``dim`` (paper sizes).

    Args:
        num_classes: C.
        backbone: returns L pyramid maps ``[N, D, H_l, W_l]`` (default ``ResNetFPN(50, dim)``).
        graph: ``GraphBuilder`` (reference encoder + window edges).
        gnn: ``SpatialTemporalGNN``.
        det_head: ``CenterNetHead``.
        controller: ``Controller`` (169 dynamic parameters per location).
        mask_branch: ``MaskBranch`` (P3-P5 -> 8 channels at stride 8).
        kernel_warp: ``KernelWarp``; built when ``None`` and ``propagation`` is on.
        edge_classifier: ``EdgeClassifier`` (kept for ``association="edge"`` only).
        concat_fusion: ``ConcatFusion`` (kept for ``fusion="concat"`` only).
        embedding_head: ``EmbeddingAssociation`` (kept for ``association="embedding"`` only).
        offset_head: ``OffsetAssociation`` (kept for ``association="offset"`` only).
        dim: feature size D (only used to build defaults).
        strides, size_ranges, sizes_of_interest: per pyramid level.
        mask_feat_stride: stride of the mask-branch features (8, or 8 / ``mask_branch.upsample``),
            where the dynamic head runs; mask logits are upsampled by ``mask_upsample`` (2), so
            they come out at ``self.mask_stride`` = 8 / 2 = 4.
        mask_negative_slope: slope of the dynamic mask head's hidden activations for negative
            inputs (0: CondInst's ReLU; :func:`~visstg.model.segmentation.dynamic_mask_head` says
            why the from-scratch default leaks).
        mask_channels: channels of the mask branch's features (its ``out_channels``).
        mask_head_channels: width of the dynamic mask head's two hidden layers (CondInst's 8);
            the controller and the kernel warp carry
            ``num_dynamic_params(mask_channels + 2, mask_head_channels)`` parameters per
            location (169 for 8 and 8).
        mask_combine: inference mask logit when a reference exists: ``"mean"`` of M and M',
            ``"target"`` (M only) or ``"warp"`` (M' only).
        test_flip_masks: inference also predicts each detection's M on the frame mirrored
            left-right and averages the logits: ``"mean"`` gives (M + M_flip + M') / 3,
            ``"target"`` (M + M_flip) / 2 (``"warp"`` reads no M, so nothing changes). The mirrored
            frame goes through the backbone and the fusion as a first frame (no reference: the
            tracker's references are features of the unmirrored frames), and its kernels are
            read at the mirrored peak cells with mirrored centres. Detection, association and
            M' come from the frame itself. Test-time augmentation: about a backbone and a mask
            branch more per frame.
        mask_neighbours: training reads the target and reference kernels (M and the reference
            masks) at every cell within this many cells of a ground-truth centre that lies in
            its box (:func:`~visstg.model.detection.neighbour_cells`), not at the centre cell
            only (0, CenterNet's single positive). Inference reads the kernel at a detected
            peak, which may be a cell off; CondInst trains the kernels of every positive
            location. M' (the warped kernels) stays at the centres.
        fusion: ``"relation"`` (the GNN on the graph), or the paper's ablations (Table 2,
            :mod:`visstg.model.fusion`): ``"concat"`` (a convolution over the concatenated
            target and reference maps) or ``"none"`` (the heads read the backbone maps).
            ``graph`` and ``gnn`` are kept for ``"relation"`` only.
        association: ``"edge"`` (edge classifier; needs ``fusion="relation"``), or the
            ablations of :mod:`visstg.model.association`: ``"embedding"`` (MaskTrack R-CNN
            style) or ``"offset"`` (CenterTrack style). Every one gives ``edge_scores``.
        propagation: kernel warping on/off (off: no ``kernel_warp`` module at all).

    Injected modules a variant does not use are dropped (set to None), so the network holds no
    parameter that gets no gradient; the ones it needs and is not given are built at ``dim``.
        topk, nms_thresh, score_thresh: detection decoding.
        nms_class_agnostic: one NMS over all classes instead of per class (DESIGN.md's
            decoding is class-aware; see conf/head/default.yaml for why the synthetic default
            differs).
        edge_class_agnostic: association edges join a reference to a detection (and are
            trained on target instances) of any class, not only of the reference's class
            (DESIGN.md). A track then survives a detection whose class flickers; its video
            category is the score-weighted vote of its frames either way. The ablation
            associations (``embedding``, ``offset``) drop their class cue with it, so Table 2
            compares the three on equal terms.
        head_autocast: ``None``, ``"bf16"`` or ``"fp16"``: in training, run the detection head,
            controller and mask branch under ``torch.autocast`` in that dtype (float32 out; the
            graph, GNN, kernel warp, dynamic mask head and losses stay float32). The backbone
            has its own ``autocast``. Inference runs the heads in the surrounding precision.
        ref_detection: training also scores the detection head on the reference frame's unfused
            maps (``det_ref``), the input a first frame and an object no track knows give it at
            inference. The paper trains detection on the fused target maps only, where every
            ground-truth reference instance is in the graph; see conf/model/visstg.yaml.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: nn.Module | None = None,
        graph: GraphBuilder | None = None,
        gnn: nn.Module | None = None,
        det_head: nn.Module | None = None,
        controller: nn.Module | None = None,
        mask_branch: nn.Module | None = None,
        kernel_warp: nn.Module | None = None,
        edge_classifier: nn.Module | None = None,
        concat_fusion: nn.Module | None = None,
        embedding_head: nn.Module | None = None,
        offset_head: nn.Module | None = None,
        dim: int = 256,
        strides: Sequence[int] = DEFAULT_STRIDES,
        size_ranges: Sequence[Sequence[float]] = DEFAULT_SIZE_RANGES,
        sizes_of_interest: Sequence[float] = DEFAULT_SIZES_OF_INTEREST,
        mask_feat_stride: int = 8,
        mask_upsample: int = 2,
        mask_negative_slope: float = 0.0,
        mask_channels: int = 8,
        mask_head_channels: int = 8,
        mask_combine: str = "mean",
        test_flip_masks: bool = False,
        mask_neighbours: int = 0,
        fusion: str = "relation",
        association: str = "edge",
        propagation: bool = True,
        topk: int = 100,
        nms_thresh: float = 0.6,
        score_thresh: float = 0.05,
        nms_class_agnostic: bool = False,
        edge_class_agnostic: bool = False,
        ref_detection: bool = False,
        head_autocast: str | None = None,
    ) -> None:
        super().__init__()
        for name, value, allowed in (
            ("fusion", fusion, FUSIONS),
            ("association", association, ASSOCIATIONS),
            ("mask_combine", mask_combine, MASK_COMBINES),
        ):
            if value not in allowed:
                raise ValueError(f"VisSTG: {name} must be one of {allowed}, got {value!r}")
        if association == "edge" and fusion != "relation":
            raise ValueError(
                f"VisSTG: association='edge' classifies the edges of the graph, which only "
                f"fusion='relation' builds, but fusion={fusion!r}; use model.fusion=relation, "
                "or model.association=embedding / offset with this fusion"
            )
        strides = tuple(int(s) for s in strides)
        if not len(strides) == len(size_ranges) == len(sizes_of_interest):
            raise ValueError(
                f"VisSTG: {len(strides)} strides, {len(size_ranges)} size ranges and "
                f"{len(sizes_of_interest)} sizes of interest; one per pyramid level is needed"
            )
        if mask_channels < 1 or mask_head_channels < 1:
            raise ValueError(
                f"VisSTG: mask_channels and mask_head_channels must be >= 1, got "
                f"{mask_channels} and {mask_head_channels}"
            )
        num_params = num_dynamic_params(mask_channels + 2, mask_head_channels)
        self.mask_channels, self.mask_head_channels = int(mask_channels), int(mask_head_channels)
        self.num_classes = num_classes
        self.strides = strides
        self.size_ranges = _as_ranges(size_ranges)
        self.sizes_of_interest = tuple(float(s) for s in sizes_of_interest)
        self.mask_feat_stride = mask_feat_stride
        # Stride of every returned mask logit map (the tracker reads it to place masks).
        self.mask_stride = mask_feat_stride // mask_upsample
        self.mask_upsample = mask_upsample
        if mask_negative_slope < 0:
            raise ValueError(f"VisSTG: mask_negative_slope must be >= 0, got {mask_negative_slope}")
        self.mask_negative_slope = float(mask_negative_slope)
        self.mask_combine = mask_combine
        self.test_flip_masks = bool(test_flip_masks)
        if mask_neighbours < 0:
            raise ValueError(f"VisSTG: mask_neighbours must be >= 0, got {mask_neighbours}")
        self.mask_neighbours = int(mask_neighbours)
        self.fusion = fusion
        self.association = association
        self.propagation = propagation
        self.topk, self.nms_thresh, self.score_thresh = topk, nms_thresh, score_thresh
        self.nms_class_agnostic = nms_class_agnostic
        self.edge_class_agnostic = edge_class_agnostic
        self.ref_detection = ref_detection
        if head_autocast is not None and head_autocast not in AUTOCAST_DTYPES:
            raise ValueError(
                f"VisSTG: head_autocast must be null or one of {sorted(AUTOCAST_DTYPES)}, "
                f"got {head_autocast!r}"
            )
        self.head_dtype = AUTOCAST_DTYPES.get(head_autocast) if head_autocast else None
        # Per-stage timing of inference_step (visstg.timing); a no-op unless benchmarking.
        self.timer = NULL_TIMER
        # Inference reads the size/offset branches, the controller and the warp offsets only at
        # the peaks / detections and theta_{t-1} only where the warp samples it; True evaluates
        # them there only (same values, visstg.model.sparse), False runs them densely and
        # gathers. None: sparse on CPU, dense elsewhere (a GPU runs the dense convs at little
        # cost, and the sparse path's data-dependent shapes would synchronise the host).
        self.sparse_heads: bool | None = None

        self.backbone = backbone if backbone is not None else ResNetFPN(50, dim)
        relation = fusion == "relation"
        self.graph = (
            (graph if graph is not None else GraphBuilder(dim, strides)) if relation else None
        )
        self.gnn = (gnn if gnn is not None else SpatialTemporalGNN(dim)) if relation else None
        self.concat_fusion = None
        if fusion == "concat":
            self.concat_fusion = concat_fusion if concat_fusion is not None else ConcatFusion(dim)
        self.det_head = det_head if det_head is not None else CenterNetHead(num_classes, dim, dim)
        self.controller = controller if controller is not None else Controller(dim, num_params, dim)
        self.mask_branch = mask_branch if mask_branch is not None else MaskBranch(dim)
        # A stride-4 map first in the backbone's output, for the mask branch only.
        self.fine_level = bool(getattr(self.backbone, "fine_level", False))
        if self.fine_level != (getattr(self.mask_branch, "fine", None) is not None):
            raise ValueError(
                "VisSTG: the backbone's fine_level and the mask branch's fine must agree (the "
                "backbone's stride-4 map is read by the mask branch only); set both "
                "model.backbone.fine_level and model.mask_branch.fine, or neither"
            )
        self.stem_level = bool(getattr(self.backbone, "stem_level", False))
        if self.stem_level != (getattr(self.mask_branch, "stem", None) is not None):
            raise ValueError(
                "VisSTG: the backbone's stem_channels and the mask branch's stem_channels must "
                "agree (the backbone's stride-2 map is read by the mask branch only); set both "
                "model.backbone.stem_channels and model.mask_branch.stem_channels, or neither"
            )
        branch_stride = strides[0] // getattr(self.mask_branch, "upsample", 1)
        if branch_stride != mask_feat_stride:
            raise ValueError(
                f"VisSTG: the mask branch gives features at stride {branch_stride} (P3's "
                f"{strides[0]} / its upsample {getattr(self.mask_branch, 'upsample', 1)}) but "
                f"mask_feat_stride={mask_feat_stride}; set model.mask_feat_stride={branch_stride}"
                " (and model.mask_upsample so that mask_feat_stride / mask_upsample is the mask "
                "logits' stride)"
            )
        if propagation:
            self.kernel_warp = (
                kernel_warp if kernel_warp is not None else KernelWarp(dim, num_params)
            )
        else:
            self.kernel_warp = None
        self._check_dynamic_params(num_params)
        self.edge_classifier = self.embedding_head = self.offset_head = None
        if association == "edge":
            self.edge_classifier = (
                edge_classifier if edge_classifier is not None else EdgeClassifier(dim)
            )
        elif association == "embedding":
            self.embedding_head = (
                embedding_head if embedding_head is not None else EmbeddingAssociation(dim)
            )
        else:
            self.offset_head = offset_head if offset_head is not None else OffsetAssociation(dim)
        # Per-detection outputs the online tracker keeps per track and passes back as
        # references["memory_<key>"] (visstg.tracker.InferenceModel).
        self.track_state_keys: tuple[str, ...] = (
            ("embeddings",) if association == "embedding" else ()
        )

    # ------------------------------------------------------------------ shared pieces
    def _heads_autocast(self, like: Tensor) -> contextlib.AbstractContextManager:
        """``torch.autocast`` in ``head_autocast``'s dtype on ``like``'s device (or nothing)."""
        if self.head_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(like.device.type, dtype=self.head_dtype)

    def _backbone(self, images: Tensor) -> tuple[Tensor | None, list[Tensor]]:
        """``(fine, levels)``: the backbone's stride-4 map for the mask branch (``fine_level``;
        None otherwise; with ``stem_level`` the pair of it and the stride-2 map) and its pyramid
        levels."""
        feats = list(self.backbone(images))
        if self.stem_level:
            return (feats[0], feats[1]), feats[2:]
        return (feats[0], feats[1:]) if self.fine_level else (None, feats)

    def _soi(self, level: Tensor) -> Tensor:
        return torch.tensor(self.sizes_of_interest, device=level.device)[level]  # [N]

    def _masks_at(
        self, mask_feats: Tensor, kernel_maps: Sequence[Tensor], batch: Tensor, level: Tensor,
        cell: Tensor, centers: Tensor,
    ) -> Tensor:  # fmt: skip
        """Dynamic-head mask logits of instances whose kernels are read at (level, cell):
        ``[N, mask_upsample * h, mask_upsample * w]`` (stride 4 by default)."""
        params = gather_at_cells(kernel_maps, batch, level, cell)  # [N, 169]
        if params.shape[0] == 0:  # keep the kernel maps in the autograd graph
            params = params + sum(k.sum() for k in kernel_maps) * 0
        return self._masks_from_params(mask_feats, params, batch, level, centers)

    def _masks_at_rows(
        self, mask_feats: Tensor, kernel_maps: Sequence[Tensor], a, rows: Tensor, cells: Tensor
    ) -> Tensor:
        """Mask logits of assignment ``a``'s instances ``rows`` with kernels read at ``cells``
        (:func:`neighbour_cells`); the relative coordinates stay centred on the instance."""
        return self._masks_at(
            mask_feats, kernel_maps, a.batch[rows], a.level[rows], cells, a.centers[rows]
        )

    def _check_dynamic_params(self, num_params: int) -> None:
        """The mask branch's channels and the controller's / kernel warp's parameter count must
        be those of the dynamic head (``mask_channels``, ``mask_head_channels``)."""
        branch = getattr(self.mask_branch, "out_channels", self.mask_channels)
        if branch != self.mask_channels:
            raise ValueError(
                f"VisSTG: the mask branch gives {branch} channels but mask_channels="
                f"{self.mask_channels}; set model.mask_channels={branch} (the configs read it "
                "from model.mask_branch.out_channels)"
            )
        parts = [("controller", self.controller)]
        if self.kernel_warp is not None:
            parts.append(("kernel_warp", self.kernel_warp))
        for name, part in parts:
            got = getattr(part, "num_params", num_params)
            if got != num_params:
                raise ValueError(
                    f"VisSTG: model.{name}.num_params={got}, but a dynamic mask head on "
                    f"{self.mask_channels} mask channels with {self.mask_head_channels} hidden "
                    f"channels has {num_params} parameters; set model.{name}.num_params="
                    f"{num_params} (the configs compute it from model.mask_head_channels)"
                )

    def _masks_from_params(
        self, mask_feats: Tensor, params: Tensor, batch: Tensor, level: Tensor, centers: Tensor
    ) -> Tensor:
        """Dynamic-head mask logits of instances with kernels ``params [N, 169]``."""
        logits = dynamic_mask_head(
            mask_feats,
            params,
            batch,
            centers,
            self._soi(level),
            self.mask_feat_stride,
            channels=self.mask_head_channels,
            negative_slope=self.mask_negative_slope,
        )  # [N, h, w]
        return upsample_mask_logits(logits, self.mask_upsample)

    def _fuse(
        self,
        graph,
        f_t: Sequence[Tensor],
        f_k: Sequence[Tensor],
        ref_features: bool = True,
        compact: bool = False,
    ) -> dict[str, Any]:
        """F^_t (``maps``) and, for ``"relation"``, the final edge features (``edge_attr``);
        ``ref_features=False`` lets the GNN skip the last update of the reference nodes,
        ``compact=True`` run on the pixels that have an edge only (the same maps and edges)."""
        if self.fusion == "relation":
            return self.gnn(graph, ref_features=ref_features, compact=compact)
        if self.fusion == "concat":
            return {"maps": self.concat_fusion(f_t, f_k)}
        return {"maps": list(f_t)}  # "none": the backbone maps themselves

    def _encode(self, feats: Sequence[Tensor], boxes: Tensor) -> Tensor:
        """Node features ``[N, L, D]`` of boxes on one image's maps (ROIAlign + encoder with a
        graph, else parameter-free box means)."""
        if self.graph is not None:
            return self.graph.encode_reference(feats, [boxes])
        return box_features(feats, boxes, self.strides)

    def _association_train(
        self, maps: Sequence[Tensor], f_k: Sequence[Tensor], tgt, ref
    ) -> dict[str, Tensor]:
        """Raw outputs of the ablation association heads at the ground-truth centres."""
        if self.embedding_head is not None:
            # Reference embeddings come from the reference frame's own (unfused) maps, what a
            # first frame gives at inference.
            e_t = self.embedding_head(maps)  # L x [B, E, H_l, W_l]
            e_k = self.embedding_head(f_k)
            return {
                "embeddings_tgt": gather_connected(e_t, tgt.batch, tgt.level, tgt.cell),  # [N, E]
                "embeddings_ref": gather_connected(e_k, ref.batch, ref.level, ref.cell),  # [M, E]
            }
        if self.offset_head is not None:
            off = self.offset_head(maps, f_k)  # L x [B, 2, H_l, W_l]
            return {"track_offsets": gather_connected(off, tgt.batch, tgt.level, tgt.cell)}
        return {}

    # ------------------------------------------------------------------ training
    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.forward_train(batch)

    def forward_train(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Training forward on B (reference, target) pairs (``docs/contracts.md`` batch).

        Returns a dict (M reference / N target ground-truth instances, E edges):
            - ``det``: CenterNet head on the fused target maps (lists over levels of
              ``heatmap [B, C, H_l, W_l]``, ``size``/``offset [B, 2, H_l, W_l]``)
            - ``det_ref``: the same head on the reference frame's unfused maps (``ref_detection``;
              None otherwise)
            - ``tgt_assignment`` / ``ref_assignment``: ``Assignment`` of the target / reference
              ground truth (levels, centre cells, ...)
            - ``mask_logits [K, H/4, W/4]``: M, target kernels at the target GT centres (and,
              with ``mask_neighbours``, the cells around them); ``mask_rows [K]``: the target
              instance (assignment row) of each
            - ``mask_warp_logits [N, H/4, W/4]``: M', warped reference kernels (None if off)
            - ``ref_mask_logits [K', H/4, W/4]``: reference kernels at reference GT centres
              (and neighbours); ``ref_mask_rows [K']`` their reference instances
            - ``edge_logits [E]``, ``graph`` (the cross-frame ``Data``); None without them
            - ``embeddings_tgt [N, E]`` / ``embeddings_ref [M, E]`` (association "embedding") or
              ``track_offsets [N, 2]`` (association "offset", cells), at the GT centres
            - ``kernel_maps``: the 169-channel maps (theta_t, theta_k) for keeping every head
              in the autograd graph when there is no instance (theta_warp is only computed at
              the target centres, ``KernelWarp.warp_at``)
            - ``level_shapes``, ``strides``, ``num_classes``, ``batch_size``
        """
        ref_images, tgt_images = batch["ref_images"], batch["tgt_images"]
        b = ref_images.shape[0]
        # L x [2B, D, H_l, W_l]; fine [2B, D, H/4, W/4] (reference, target) or None
        fine, feats = self._backbone(torch.cat([ref_images, tgt_images]))
        f_k = [f[:b] for f in feats]  # reference frames
        f_t = [f[b:] for f in feats]  # target frames
        level_shapes = [tuple(f.shape[-2:]) for f in f_t]

        ref_targets, tgt_targets = batch["ref_targets"], batch["tgt_targets"]
        graph = None  # fusion "relation" only
        if self.graph is not None:
            graph = self.graph(f_k, [t["boxes"].float() for t in ref_targets], f_t)
        fused = self._fuse(graph, f_t, f_k)
        maps = fused["maps"]  # F^_t, L x [B, D, H_l, W_l]

        # Heads that see both frames take them in one call per level (heads are per-sample
        # maps, so this equals two calls; half the small-conv overhead on CPU).
        both = [torch.cat([m, f]) for m, f in zip(maps, f_k)]  # L x [2B, D, H_l, W_l]
        det_ref = None
        with self._heads_autocast(both[0]):
            if self.ref_detection:
                # The reference frame's own maps are what a first frame (or an object no track
                # knows) gives the heads at inference: train detection there too.
                both_det = self.det_head(both)
            else:
                both_det = self.det_head(maps)
            # Controller and mask branch: both frames (theta_k, the reference masks).
            thetas = self.controller(both)
            if fine is not None:  # the order of `both`: target, reference
                fine = _swap_halves(fine, b)
            mask_feats = self.mask_branch(both, fine)
        both_det = {k: [t.float() for t in v] for k, v in both_det.items()}
        det = {k: [t[:b] for t in v] for k, v in both_det.items()}
        if self.ref_detection:
            det_ref = {k: [t[b:] for t in v] for k, v in both_det.items()}
        tgt = assign_targets(tgt_targets, level_shapes, self.strides, self.size_ranges)
        ref = assign_targets(ref_targets, level_shapes, self.strides, self.size_ranges)

        theta_t, theta_k = zip(*(t.float().split(b) for t in thetas))
        theta_t, theta_k = list(theta_t), list(theta_k)  # L x [B, 169, H_l, W_l] each
        mask_feats_t, mask_feats_k = mask_feats.float().split(b)  # [B, 8, H/s, W/s] each
        mask_rows = neighbour_cells(tgt, level_shapes, self.strides, self.mask_neighbours)
        ref_mask_rows = neighbour_cells(ref, level_shapes, self.strides, self.mask_neighbours)
        mask_logits = self._masks_at_rows(mask_feats_t, theta_t, tgt, *mask_rows)
        ref_mask_logits = self._masks_at_rows(mask_feats_k, theta_k, ref, *ref_mask_rows)
        kernel_maps = {"theta_t": theta_t, "theta_k": theta_k}
        mask_warp_logits = None
        if self.kernel_warp is not None:
            # theta_warp read at the target centres only (KernelWarp.warp_at: the same
            # deform_conv2d, values and gradients, without warping every other location).
            params_warp = self.kernel_warp.warp_at(
                theta_k, f_t, f_k, tgt.batch, tgt.level, tgt.cell
            )  # [N, 169]
            mask_warp_logits = self._masks_from_params(
                mask_feats_t, params_warp, tgt.batch, tgt.level, tgt.centers
            )
        edge_logits = None  # association "edge" only
        if self.edge_classifier is not None:
            edge_logits = self.edge_classifier(fused["edge_attr"])  # [E]
        return {
            **self._association_train(maps, f_k, tgt, ref),
            "det": det,
            "det_ref": det_ref,
            "tgt_assignment": tgt,
            "ref_assignment": ref,
            "mask_logits": mask_logits,
            "mask_rows": mask_rows[0],
            "mask_warp_logits": mask_warp_logits,
            "ref_mask_logits": ref_mask_logits,
            "ref_mask_rows": ref_mask_rows[0],
            "edge_logits": edge_logits,
            "graph": graph,
            "edge_class_agnostic": self.edge_class_agnostic,
            "kernel_maps": kernel_maps,
            "level_shapes": level_shapes,
            "strides": self.strides,
            "num_classes": self.num_classes,
            "batch_size": b,
        }

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def inference_step(
        self,
        image: Tensor,
        state: dict[str, Any] | None = None,
        references: dict[str, Tensor] | None = None,
        image_size: tuple[int, int] | None = None,
        min_score: float = 0.0,
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Process one frame of an online pass.

        Args:
            image: ``[1, 3, H, W]`` normalised, padded frame t.
            state: what the previous call returned as ``new_state`` (``None`` on the first
                frame): ``feats`` (L x ``[1, D, H_l, W_l]`` backbone maps of frame t-1) and
                ``kernels`` (L x ``[1, 169, H_l, W_l]``, controller on those maps; a
                :class:`LazyKernelMaps`, computed where this frame's warp reads it).
            references: reference instances for the graph (ignored without ``state``):
                ``boxes [A, 4]`` (active tracks' boxes on frame t-1, xyxy input pixels;
                ROIAlign on ``state["feats"]``) and ``labels [A]``; optionally memory entries
                ``memory_nodes [K, L, D]`` (stored node features), ``memory_centers [K, 2]``
                (x, y of their last box), ``memory_labels [K]``, and to re-inject their kernels
                into theta_{t-1} before warping, ``memory_kernels [K, 169]`` with
                ``memory_levels [K]`` and ``memory_cells [K, 2]`` (y, x).
            image_size: ``(h, w)`` of the valid region (default: the whole image).
            min_score: also drop detections scoring below this (on top of ``score_thresh``)
                before masks, edge scores and node features are computed: the tracker passes
                its ``score_threshold``, below which it discards them anyway. The detections
                kept are the same either way (a box is suppressed by higher-scored ones only).

        Returns:
            ``(outputs, new_state)``. ``outputs`` (Dn detections, R = A + K references, active
            tracks first then memory entries):
                - ``boxes [Dn, 4]``, ``scores [Dn]``, ``labels [Dn]``, ``levels [Dn]``,
                  ``cells [Dn, 2]`` (y, x of the peak), ``class_scores [Dn, C]`` (every class's
                  heatmap probability at the peak), sorted by score
                - ``masks [Dn, H/4, W/4]`` mask logits at stride 4 (``mask_combine`` of M and
                  M' when a reference frame exists and propagation is on, else M; with
                  ``test_flip_masks`` the mirrored frame's M averaged in)
                - ``edge_scores [R, Dn]`` association probabilities (0 where no same-class edge)
                - ``node_features [Dn, L, D]`` ROIAlign of this frame's backbone maps over the
                  detected boxes (what a lost track keeps in memory)
                - ``kernels [Dn, 169]`` dynamic parameters at the detections
            ``new_state``: ``feats`` and ``kernels`` of this frame (fixed size, no per-track data).

        The heads read at a few cells (size, offset, controller, warp offsets, edge classifier,
        theta_{t-1}) are evaluated only there, and the GNN layers on the pixels that have an
        edge, when ``self.sparse_heads`` (default: on CPU); the outputs are the dense
        computation's up to float summation order (tests/test_inference_sparse.py).
        """
        if image.dim() != 4 or image.shape[0] != 1:
            raise ValueError(
                f"inference_step expects one frame [1, 3, H, W], got {tuple(image.shape)}"
            )
        device = image.device
        h, w = image_size if image_size is not None else image.shape[-2:]
        timer = self.timer
        with timer.stage("backbone+fpn"):
            fine, f_t = self._backbone(image)  # [1, D, H/4, W/4] or None; L x [1, D, H_l, W_l]
        num_levels, dim = len(f_t), f_t[0].shape[1]

        with timer.stage("graph"):
            # Reference nodes: active tracks (ROIAlign on F_{t-1}) then memory entries.
            nodes, centers, labels = [f_t[0].new_zeros(0, num_levels, dim)], [], []
            if state is not None and references is not None:
                boxes = references.get("boxes")
                if boxes is not None and len(boxes):
                    boxes = boxes.to(device).float()
                    nodes.append(self._encode(state["feats"], boxes))  # [A, L, D]
                    centers.append((boxes[:, :2] + boxes[:, 2:]) / 2)
                    labels.append(references["labels"].to(device).long())
                mem = references.get("memory_nodes")
                if mem is not None and len(mem):
                    nodes.append(mem.to(device=device, dtype=nodes[0].dtype))  # [K, L, D]
                    centers.append(references["memory_centers"].to(device).float())
                    labels.append(references["memory_labels"].to(device).long())
            ref_nodes = torch.cat(nodes)  # [R, L, D]
            ref_centers = torch.cat(centers) if centers else image.new_zeros(0, 2)
            ref_labels = (
                torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
            )
            num_refs = ref_nodes.shape[0]
            ref_batch = torch.zeros(num_refs, dtype=torch.long, device=device)
            graph = None
            if self.graph is not None:
                graph = self.graph.build_graph(ref_nodes, ref_centers, ref_batch, f_t)
        # The reference frame's maps for concat fusion and the offset head (the frame itself
        # on the first frame, where there is no track to associate with anyway).
        f_prev = state["feats"] if state is not None else f_t
        sparse = self.sparse_heads if self.sparse_heads is not None else device.type == "cpu"
        with timer.stage("gnn"):
            # Nothing reads the reference nodes after the last GNN layer: skip their update.
            # Only the pixels with an edge change: with the sparse heads the layers run on those
            # (finding them needs their count on the host, a sync on a GPU).
            fused = self._fuse(graph, f_t, f_prev, ref_features=False, compact=sparse)
            maps = fused["maps"]
        with timer.stage("detection"):
            regress = None
            if sparse:
                det = self.det_head(maps, branches=("heatmap",))
                regress = self._regress_at_peaks(maps)
            else:
                det = self.det_head(maps)
            # Decode in float32 even under autocast: box coordinates need the mantissa.
            det = {k: [t.float() for t in v] for k, v in det.items()}
            sizes = torch.tensor([[h, w]], device=device)
            dets = decode_detections(
                det, self.strides, sizes, self.topk, self.nms_thresh, self.score_thresh,
                regress=regress, class_agnostic=self.nms_class_agnostic, min_score=min_score,
            )[0]  # fmt: skip
            # Exact peak centres (cell + predicted offset) for the relative coordinates.
            det_centers = dets.pop("centers")  # [n, 2] (x, y)
            n = dets["scores"].numel()
            det_batch = torch.zeros(n, dtype=torch.long, device=device)

        # The mirrored frame only serves the detections' masks: none, no mirrored pass.
        mirrored = None
        if self.test_flip_masks and self.mask_combine != "warp" and n:
            mirrored = self._mirrored_maps(image, sparse)
        with timer.stage("mask"):
            mask_feats = self.mask_branch(maps, fine)
            det_args = (det_batch, dets["levels"], dets["cells"])
            plain = graph.edge_index.shape[1] == 0 if graph is not None else maps[0] is f_t[0]
            theta_t = None
            if sparse:
                kernels_out = self.controller.at_cells(maps, dets["levels"], dets["cells"])
            else:
                theta_t = self.controller(maps)  # L x [1, 169, H_l, W_l]
                kernels_out = gather_at_cells(theta_t, *det_args)
            masks = self._masks_from_params(
                mask_feats, kernels_out, det_batch, dets["levels"], det_centers
            )  # [n, H/4, W/4] M; kernels_out [n, 169]
            views = [masks]
            if mirrored is not None:
                views.append(self._mirrored_masks(mirrored, dets, det_centers, sparse))
            if state is not None and self.kernel_warp is not None and self.mask_combine != "target":
                if sparse:
                    params_warp = self._warp_at_detections(
                        state, f_t, references, dets["levels"], dets["cells"]
                    )
                else:
                    theta_prev = self._with_memory_kernels(state["kernels"], references)
                    theta_warp = self.kernel_warp(theta_prev, f_t, state["feats"])
                    params_warp = gather_at_cells(theta_warp, *det_args)
                warped = self._masks_from_params(
                    mask_feats, params_warp, det_batch, dets["levels"], det_centers
                )  # M'
                views = [warped] if self.mask_combine == "warp" else [*views, warped]
            masks = sum(views[1:], views[0]) / len(views) if len(views) > 1 else views[0]
            # theta for the next frame's warp: controller on the (unfused) maps, as theta_k in
            # training, so warping sees the same kind of kernels at test time. Computed when the
            # next frame reads it, and only where it does (LazyKernelMaps).
            kernels = LazyKernelMaps(self.controller, f_t, theta_t if plain else None)

        with timer.stage("association"):
            extra: dict[str, Tensor] = {}
            if self.edge_classifier is not None:
                edge_attr = fused["edge_attr"]  # [E, D]
                # Sparse: classify only the edges that reach a detection (a function of them).
                edge_logits = (
                    partial(self._classify_edges, edge_attr)
                    if sparse
                    else self.edge_classifier(edge_attr)  # [E]
                )
                edge_scores = edge_scores_for_detections(
                    graph, edge_logits, dets["levels"], det_batch, dets["cells"], dets["labels"],
                    ref_labels, num_refs, self.edge_class_agnostic,
                )  # fmt: skip
            else:
                edge_scores, extra = self._association_scores(
                    maps, f_prev, dets, det_batch, det_centers, references, ref_centers, ref_labels
                )
            node_features = self._encode(f_t, dets["boxes"])  # [n, L, D]
        outputs = {
            **dets,
            **extra,
            "masks": masks,
            "edge_scores": edge_scores,
            "node_features": node_features,
            "kernels": kernels_out,
        }
        new_state = {"feats": f_t, "kernels": kernels if self.kernel_warp is not None else None}
        return outputs, new_state

    def _mirrored_maps(self, image: Tensor, sparse: bool) -> dict[str, Any]:
        """``test_flip_masks``: the frame mirrored left-right (the whole padded image) through
        the backbone and the fusion as a first frame (no reference in the graph: the tracker's
        references are features of the unmirrored frames): ``maps`` and ``fine`` for the mask
        branch, ``width`` of the image."""
        with self.timer.stage("backbone+fpn"):
            fine, f_t = self._backbone(image.flip(-1))
        with self.timer.stage("gnn"):
            graph = None
            if self.graph is not None:
                no_refs = f_t[0].new_zeros(0, len(f_t), f_t[0].shape[1])
                batch = torch.zeros(0, dtype=torch.long, device=image.device)
                graph = self.graph.build_graph(no_refs, image.new_zeros(0, 2), batch, f_t)
            maps = self._fuse(graph, f_t, f_t, ref_features=False, compact=sparse)["maps"]
        return {"maps": maps, "fine": fine, "width": image.shape[-1]}

    def _mirrored_masks(
        self, mirrored: dict[str, Any], dets: dict[str, Tensor], centers: Tensor, sparse: bool
    ) -> Tensor:
        """M of the detections ``[n, H/4, W/4]`` on the mirrored frame (:meth:`_mirrored_maps`),
        mirrored back: kernels at the mirrored peak cells (the nearest cell when a level's
        width is not a whole number of cells), relative coordinates from the mirrored centres
        ``centers [n, 2]`` (x, y)."""
        maps, width = mirrored["maps"], mirrored["width"]
        levels = dets["levels"]
        level_widths = [m.shape[-1] for m in maps]
        cells = mirror_cells(dets["cells"], levels, self.strides, level_widths, width)
        centers = torch.stack([width - centers[:, 0], centers[:, 1]], 1)
        batch = torch.zeros_like(levels)
        mask_feats = self.mask_branch(maps, mirrored["fine"])
        if sparse:
            params = self.controller.at_cells(maps, levels, cells)
        else:
            params = gather_at_cells(self.controller(maps), batch, levels, cells)
        return self._masks_from_params(mask_feats, params, batch, levels, centers).flip(-1)

    def _association_scores(
        self,
        maps: Sequence[Tensor],
        f_prev: Sequence[Tensor],
        dets: dict[str, Tensor],
        det_batch: Tensor,
        det_centers: Tensor,
        references: dict[str, Tensor] | None,
        ref_centers: Tensor,
        ref_labels: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``edge_scores [R, Dn]`` of the ablation associations, plus their per-detection
        outputs (``embeddings [Dn, E]`` / ``displacements [Dn, 2]`` input px)."""
        num_refs = ref_labels.numel()
        args = (det_batch, dets["levels"], dets["cells"])
        det_labels = dets["labels"]
        if self.edge_class_agnostic:  # no class cue: every (track, detection) pair may match
            det_labels, ref_labels = torch.zeros_like(det_labels), torch.zeros_like(ref_labels)
        ref_boxes = _reference_boxes(references, num_refs, ref_centers)  # [R, 4]
        if self.embedding_head is not None:
            emb = gather_at_cells(self.embedding_head(maps), *args).float()  # [Dn, E]
            ref_emb = emb.new_zeros(0, emb.shape[1])
            if num_refs:
                ref_emb = (references or {}).get("memory_embeddings")
                if ref_emb is None or ref_emb.shape[0] != num_refs:
                    raise ValueError(
                        "VisSTG.inference_step: association='embedding' needs "
                        "references['memory_embeddings'] [R, E] for every reference (the "
                        "OnlineTracker passes them: the model's track_state_keys); got "
                        f"{None if ref_emb is None else tuple(ref_emb.shape)} for {num_refs}"
                    )
            scores = self.embedding_head.scores(
                emb, ref_emb.to(emb), dets["boxes"], ref_boxes, det_labels, ref_labels
            )
            return scores, {"embeddings": emb}
        off = gather_at_cells(self.offset_head(maps, f_prev), *args).float()  # [Dn, 2] cells
        stride = torch.tensor(self.strides, device=off.device, dtype=off.dtype)[dets["levels"]]
        disp = off * stride[:, None]  # [Dn, 2] input px, to the previous frame
        scores = self.offset_head.scores(
            det_centers.float() + disp, dets["boxes"], ref_centers, ref_boxes, det_labels,
            ref_labels,
        )  # fmt: skip
        return scores, {"displacements": disp}

    def _classify_edges(self, edge_attr: Tensor, edges: Tensor) -> Tensor:
        """Edge-classifier logits ``[J]`` of the edges ``edges [J]`` only."""
        return self.edge_classifier(edge_attr[edges])

    def _regress_at_peaks(self, maps: Sequence[Tensor]):
        """``decode_detections``'s ``regress``: the size and offset branches at the peaks."""

        def regress(level: Tensor, y: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
            # One image: [1, k] in; [k, 2] from the head -> [1, 2, k] float32 out.
            size, offset = self.det_head.regress_at(maps, level[0], y[0], x[0])
            return size.float().t()[None], offset.float().t()[None]

        return regress

    def _warp_at_detections(
        self,
        state: dict[str, Any],
        f_t: Sequence[Tensor],
        references: dict[str, Tensor] | None,
        level: Tensor,
        cells: Tensor,
    ) -> Tensor:
        """theta_warp at the detections ``[n, 169]``: equal to warping the whole theta_{t-1}
        (with the memory kernels written in) and reading it at the detections, but the warp
        offsets are computed at the detections only and theta_{t-1} only on the cells the
        deformable taps sample (:meth:`KernelWarp.sampled_cells`, :class:`LazyKernelMaps`)."""
        warp, theta, f_prev = self.kernel_warp, state["kernels"], state["feats"]
        num_params = warp.weight.shape[0]  # [P, 1, k, k] depthwise
        partial: list[Tensor] = []
        reads: dict[int, tuple[Tensor, Tensor]] = {}
        for lvl, (ft, fk) in enumerate(zip(f_t, f_prev)):
            idx = (level == lvl).nonzero().squeeze(1)  # [m]
            shape = tuple(ft.shape[-2:])
            if idx.numel() == 0:  # not read: a zero map keeps the memory-kernel writes valid
                partial.append(ft.new_zeros(1, num_params, 1, 1).expand(1, num_params, *shape))
                continue
            off = warp.offsets_at(ft, fk, cells[idx])  # [m, 2*k*k]
            if isinstance(theta, LazyKernelMaps):
                partial.append(theta.on_mask(lvl, warp.sampled_cells(off, cells[idx], shape)))
            else:
                partial.append(theta[lvl])
            reads[lvl] = (idx, off)
        partial = self._with_memory_kernels(partial, references)
        out = f_t[0].new_zeros(level.numel(), partial[0].shape[1])
        for lvl, (idx, off) in reads.items():
            batch = torch.zeros_like(idx)
            out[idx] = warp.warp_cells(partial[lvl], off, batch, cells[idx]).to(out.dtype)
        return out

    @staticmethod
    def _with_memory_kernels(
        kernels: Sequence[Tensor], references: dict[str, Tensor] | None
    ) -> list[Tensor]:
        """Write memory entries' stored kernels into theta_{t-1} at their last centre cells."""
        kernels = list(kernels)
        if references is None or references.get("memory_kernels") is None:
            return kernels
        mk = references["memory_kernels"]
        if not len(mk):
            return kernels
        levels, cells = references["memory_levels"].long(), references["memory_cells"].long()
        for lvl in levels.unique().tolist():
            sel = levels == lvl
            k = kernels[lvl].clone()  # [1, 169, H_l, W_l]
            hl, wl = k.shape[-2:]
            ys, xs = cells[sel, 0].clamp(0, hl - 1), cells[sel, 1].clamp(0, wl - 1)
            k[0][:, ys, xs] = mk[sel].to(k).t()  # [169, n] <- [n, 169]
            kernels[lvl] = k
        return kernels


def mirror_cells(
    cells: Tensor,
    levels: Tensor,
    strides: Sequence[int],
    level_widths: Sequence[int],
    width: int,
) -> Tensor:
    """The cells ``[N, 2]`` (y, x) of levels ``levels [N]`` on an image ``width`` pixels wide,
    mirrored left-right: the cell whose centre lies nearest to the mirrored centre
    (``level_widths[l] - 1 - x`` when the width is a whole number of cells; of two cells as
    near, the right one)."""
    stride = torch.tensor(strides, device=cells.device, dtype=torch.float32)[levels]
    last = torch.tensor(level_widths, device=cells.device)[levels] - 1
    x = torch.floor(width / stride - cells[:, 1] - 0.5).long()  # (x' + 0.5) s = W - (x + 0.5) s
    return torch.stack([cells[:, 0], torch.minimum(x.clamp(min=0), last)], 1)


def _reference_boxes(
    references: dict[str, Tensor] | None, num_refs: int, ref_centers: Tensor
) -> Tensor:
    """Last boxes ``[R, 4]`` of the references, in the graph's order (``boxes`` of the active
    tracks, then ``memory_boxes``)."""
    if num_refs == 0:
        return ref_centers.new_zeros(0, 4)
    refs = references or {}
    parts = [refs[k] for k in ("boxes", "memory_boxes") if refs.get(k) is not None]
    boxes = torch.cat([b.to(ref_centers).reshape(-1, 4) for b in parts]) if parts else None
    if boxes is None or boxes.shape[0] != num_refs:
        raise ValueError(
            "VisSTG.inference_step: the embedding and offset associations need every "
            "reference's last box (references['boxes'] and references['memory_boxes'], which "
            f"the OnlineTracker passes); got {0 if boxes is None else boxes.shape[0]} boxes "
            f"for {num_refs} references"
        )
    return boxes
