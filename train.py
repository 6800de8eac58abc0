"""Train, validate and test CTAN and its baselines on one dataset, and report the field's metrics.

    python data.py synth openkbp && python train.py --dataset openkbp --arch ctan

The file reads top to bottom: defaults table, metrics (plain numpy), losses, task weighting,
building data and model, train/evaluate loops, outputs (checkpoints, logs, preview images), CLI.
`main(argv)` returns the results dict, so tests and other scripts call it in-process.
"""

import argparse
import datetime
import itertools
import json
import os
import random
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

import ctan
import data

# ----------------------------------------------------------------------------------------------
# Defaults: ONE table per dataset. "cpu" holds the overrides used when the run is on a CPU, so the
# quick start finishes in minutes on 2 cores (small width, two blocks per stage, bounded steps).
# Dose is predicted in units of DOSE_SCALE_GY (network output 1.0 = 80 Gy), so it is O(1) like
# the other targets; the dose loss is L1 inside the possible-dose mask in those units.
# ----------------------------------------------------------------------------------------------
DOSE_SCALE_GY = 80.0

_RT = dict(  # radiotherapy planning (OpenKBP, prostate): dose + structures from 2D axial CT slices
    dims=2, epochs=60, batch_size=16, lr=1e-3, width=64, depth=(3, 4, 6, 3), size=(128, 128, 128),
    losses={"dose": "dose_l1", "structures": "bce_dice"},
    metrics=("dose_score", "dvh_score", "dice"), select="dose_score",
    cpu=dict(width=32, depth=(2, 2, 2, 2), epochs=6, batch_size=8, max_steps_per_epoch=40, max_eval_cases=4),
    dims3=dict(batch_size=2),  # whole 128^3 volumes (--dims 3)
)
DEFAULTS = {
    "openkbp": _RT,
    "prostate": _RT,
    "ham10000": dict(
        dims=2, epochs=60, batch_size=32, lr=1e-3, width=64, depth=(3, 4, 6, 3), size=(192, 256),
        losses={"segmentation": "bce_dice", "diagnosis": "ce"},
        metrics=("dice", "isic_jaccard", "balanced_accuracy", "auc"), select="balanced_accuracy",
        cpu=dict(width=32, depth=(2, 2, 2, 2), epochs=20, batch_size=16, max_steps_per_epoch=40, max_eval_cases=64),
    ),
    "stoic": dict(
        dims=3, epochs=40, batch_size=2, lr=3e-4, width=32, depth=(2, 2, 2, 2), size=(128, 128, 128),
        losses={"covid": "ce", "severe": "ce"},
        metrics=("auc_severe", "auc_covid"), select="auc_severe",
        cpu=dict(width=16, depth=(2, 2, 2, 2), epochs=15, batch_size=8, lr=1e-3, max_steps_per_epoch=30,
                 max_eval_cases=32),
    ),
}
# Direction of every reported metric: +1 higher is better, -1 lower is better (Delta_MTL, best.pt).
DIRECTION = {
    "dose_score": -1, "dvh_score": -1, "dice": +1, "isic_jaccard": +1,
    "balanced_accuracy": +1, "auc": +1, "auc_severe": +1, "auc_covid": +1,
}
OPENKBP_ROIS = data.OPENKBP_ROIS  # the official ROI order: 7 OARs, then PTV56, PTV63, PTV70


class UserError(Exception):
    """A problem the user can fix (bad option, missing file, diverged run): one line, exit code 2."""


# ----------------------------------------------------------------------------------------------
# Metrics (plain numpy)
# ----------------------------------------------------------------------------------------------
def openkbp_dvh(dose, structure_masks, voxel_dimensions, roi_names=OPENKBP_ROIS):
    """DVH metrics of one patient, as OpenKBP's official DoseEvaluator computes them
    (ababier/open-kbp, provided_code/dose_evaluation_class.py).

    Returns {(metric, roi): value} for the ROIs present (non-empty) in `structure_masks`; absent
    ROIs get no entry (officially: not contoured, skipped). OARs: D_0.1_cc and mean; targets
    (name starts with "PTV"): D_99, D_95, D_1 = percentiles 1, 5, 99 (numpy linear). D_0.1_cc is
    the percentile 100 - n/|roi|*100 with n = max(1, round(100 / voxel volume in mm^3)); when the
    ROI has fewer than n voxels the official code crashes, here the percentile is clipped at 0.
    """
    if len(roi_names) != len(structure_masks):
        raise ValueError(f"{len(structure_masks)} structure masks for {len(roi_names)} ROI names")
    dose = np.asarray(dose, dtype=np.float64).ravel()
    n_tenth_cc = np.maximum(1, np.round(100 / np.prod(np.asarray(voxel_dimensions, dtype=np.float64))))
    out = {}
    for roi, mask in zip(roi_names, structure_masks):
        roi_dose = dose[np.asarray(mask, dtype=bool).ravel()]
        if roi_dose.size == 0:
            continue
        if roi.upper().startswith("PTV"):
            out[("D_99", roi)] = np.percentile(roi_dose, 1)
            out[("D_95", roi)] = np.percentile(roi_dose, 5)
            out[("D_1", roi)] = np.percentile(roi_dose, 99)
        else:
            q = max(0.0, 100 - n_tenth_cc / roi_dose.size * 100)
            out[("D_0.1_cc", roi)] = np.percentile(roi_dose, q)
            out[("mean", roi)] = roi_dose.mean()
    return out


def openkbp_patient(pred, ref, possible_dose_mask, structure_masks, voxel_dimensions, roi_names=OPENKBP_ROIS):
    """One patient's dose error and |DVH differences| (official definitions, see `openkbp_scores`).

    Returns (dose_error, list of |ref - pred| for each DVH metric of the ROIs present in the reference).
    """
    pred = np.asarray(pred, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    dose_error = np.sum(np.abs(ref - pred)) / np.sum(possible_dose_mask)
    ref_dvh = openkbp_dvh(ref, structure_masks, voxel_dimensions, roi_names)
    pred_dvh = openkbp_dvh(pred, structure_masks, voxel_dimensions, roi_names)  # reference masks for both
    return float(dose_error), [abs(ref_dvh[k] - pred_dvh[k]) for k in ref_dvh]


def _nanmean(values):
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def openkbp_aggregate(patients):
    """(dose_score, dvh_score) from `openkbp_patient` results: dose score = mean over patients of
    sum|ref - pred| / |possible-dose mask|; DVH score = mean |ref - pred| over the whole
    patients x (metric, ROI) table, absent ROIs (NaN officially) left out, as np.nanmean does."""
    dose_errors = [p[0] for p in patients]
    dvh_errors = [e for p in patients for e in p[1]]
    return _nanmean(dose_errors), _nanmean(dvh_errors)


def openkbp_scores(pred, ref, possible_dose_mask, structure_masks, voxel_dimensions, roi_names=OPENKBP_ROIS):
    """OpenKBP challenge dose score and DVH score (Babier et al. 2021; official code
    ababier/open-kbp provided_code/dose_evaluation_class.py). Each argument is a list over patients:
    doses and mask any shape (officially 128^3), structure masks (R, *shape) in `roi_names` order,
    voxel dimensions (3,) mm. Evaluated on the doses as given: the official pipeline multiplies the
    prediction by the possible-dose mask before saving it, and `evaluate` here does the same."""
    patients = [openkbp_patient(*args, roi_names=roi_names)
                for args in zip(pred, ref, possible_dose_mask, structure_masks, voxel_dimensions)]
    return openkbp_aggregate(patients)


def dice(pred, ref, empty=1.0):
    """Dice coefficient 2|P&R| / (|P| + |R|) of two binary masks; `empty` when both are empty."""
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    total = pred.sum() + ref.sum()
    return float(empty) if total == 0 else float(2 * np.logical_and(pred, ref).sum() / total)


def roi_dice(pred_masks, ref_masks):
    """Per-ROI Dice of one patient, (R,) array. Convention: an ROI empty in the reference (not
    contoured, as in OpenKBP's missing files) is not scored: NaN, whatever the prediction; the
    per-ROI mean over patients and the mean Dice over structures then use np.nanmean."""
    return np.array([dice(p, r) if np.any(r) else np.nan for p, r in zip(pred_masks, ref_masks)])


def isic_jaccard(preds, refs, threshold=0.65):
    """ISIC 2018 Task 1 thresholded Jaccard (Codella et al. 2019): per-image IoU of binary masks
    (1.0 when both are empty), set to 0 where below 0.65, averaged over images."""
    scores = []
    for p, r in zip(preds, refs):
        p, r = np.asarray(p, dtype=bool), np.asarray(r, dtype=bool)
        union = np.logical_or(p, r).sum()
        iou = 1.0 if union == 0 else np.logical_and(p, r).sum() / union
        scores.append(iou if iou >= threshold else 0.0)
    return float(np.mean(scores))


def balanced_accuracy(y_true, y_pred):
    """ISIC 2018 Task 3 balanced multi-class accuracy: mean per-class recall over the classes
    present in y_true (as sklearn.metrics.balanced_accuracy_score)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]))


def roc_auc(y_true, score):
    """Area under the ROC curve = Mann-Whitney U / (n_pos * n_neg): the probability that a random
    positive scores above a random negative, ties counting 1/2 (average ranks). NaN if one class."""
    y_true = np.asarray(y_true).astype(bool).ravel()
    score = np.asarray(score, dtype=np.float64).ravel()
    n_pos, n_neg = int(y_true.sum()), int((~y_true).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    sorted_scores = score[order]
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    # average the ranks within each group of tied scores
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for start, count in zip(first[counts > 1], counts[counts > 1]):
        ranks[order[start:start + count]] = start + (count + 1) / 2
    return float((ranks[y_true].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_auc_macro(y_true, prob):
    """Macro one-vs-rest AUC (ISIC 2018 Task 3 reports per-class AUC): mean over classes k of
    roc_auc(y == k, prob[:, k]); classes absent from y_true are left out."""
    y_true, prob = np.asarray(y_true), np.asarray(prob)
    return _nanmean([roc_auc(y_true == k, prob[:, k]) for k in range(prob.shape[1])])


def delta_mtl(metrics, stl_metrics, keys=None):
    """Relative multi-task performance in percent (Maninis et al. 2019; Vandenhende et al. 2021):
    100/T * sum_t (-1)^{l_t} (M_t - M_t^STL) / M_t^STL, l_t = 1 where lower is better (DIRECTION).
    Averages over `keys` (default: every metric in DIRECTION that both dicts hold, finite, STL != 0)."""
    keys = [k for k in (keys or DIRECTION) if k in metrics and k in stl_metrics]
    terms = [DIRECTION[k] * (metrics[k] - stl_metrics[k]) / stl_metrics[k] for k in keys
             if np.isfinite(metrics[k]) and np.isfinite(stl_metrics[k]) and stl_metrics[k] != 0]
    return 100.0 * float(np.mean(terms)) if terms else float("nan")


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------
def dose_l1(pred, target_gy, mask):
    """L1 between predicted and reference dose (in units of DOSE_SCALE_GY) inside the possible-dose mask."""
    err = (pred - target_gy / DOSE_SCALE_GY).abs() * mask
    return err.sum() / mask.sum().clamp_min(1.0)


def bce_dice(logits, target, smooth=1.0):
    """Binary cross-entropy + soft Dice (per channel over the batch, smoothed so empty-vs-empty = 1)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits).transpose(0, 1).flatten(1)
    target = target.transpose(0, 1).flatten(1)
    soft_dice = (2 * (prob * target).sum(1) + smooth) / (prob.sum(1) + target.sum(1) + smooth)
    return bce + (1 - soft_dice.mean())


def task_losses(outputs, batch, losses, class_weights=None):
    """{task: scalar loss} for one batch; `losses` maps task -> loss name (DEFAULTS)."""
    out = {}
    for task, kind in losses.items():
        pred = outputs[task].float()
        if kind == "dose_l1":
            out[task] = dose_l1(pred, batch[task], batch["possible_dose_mask"])
        elif kind == "bce_dice":
            out[task] = bce_dice(pred, batch[task])
        elif kind == "ce":
            weight = None if class_weights is None else class_weights.get(task)
            out[task] = F.cross_entropy(pred, batch[task], weight=weight)
        else:
            raise ValueError(f"unknown loss {kind!r}")
    return out


# ----------------------------------------------------------------------------------------------
# Task weighting
# ----------------------------------------------------------------------------------------------
class Weighting(nn.Module):
    """Combines task losses into one.
    equal: plain sum.
    dwa: Dynamic Weight Average (Liu, Johns, Davison, CVPR 2019): w_k = T softmax_k(r_k / 2) with
         r_k = L_k(e-1) / L_k(e-2) from the mean training losses of the last two epochs (w = 1
         for the first two epochs); the weights sum to T.
    uncertainty: homoscedastic uncertainty (Kendall, Gal, Cipolla, CVPR 2018), in the common form
         sum_k exp(-s_k) L_k / 2 + s_k / 2 with learnable s_k = log sigma_k^2 (optimised with the model).
    mfe: MFE-UNet's fixed weights (Bui et al. 2024): L_seg + 0.25 L_cls, i.e. weight 1 for the
         pixel-level tasks and 0.25 for the image-level ones (`image_tasks`).
    """

    def __init__(self, method, tasks, temperature=2.0, image_tasks=()):
        super().__init__()
        self.method, self.tasks, self.temperature = method, list(tasks), temperature
        self.image_tasks = set(image_tasks)
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks))) if method == "uncertainty" else None
        self.history = []  # mean training loss per task, one list per finished epoch (DWA)

    def weights(self):
        """Current multiplicative weight per task (for logging; uncertainty: exp(-s)/2)."""
        if self.method == "uncertainty":
            return dict(zip(self.tasks, (0.5 * torch.exp(-self.log_vars)).tolist()))
        if self.method == "dwa" and len(self.history) >= 2:
            ratio = torch.tensor(self.history[-1]) / torch.tensor(self.history[-2]).clamp_min(1e-12)
            w = len(self.tasks) * torch.softmax(ratio / self.temperature, 0)
            return dict(zip(self.tasks, w.tolist()))
        if self.method == "mfe":
            return {t: 0.25 if t in self.image_tasks else 1.0 for t in self.tasks}
        return {t: 1.0 for t in self.tasks}

    def forward(self, losses):
        if self.method == "uncertainty":
            s = self.log_vars
            return sum(0.5 * torch.exp(-s[i]) * losses[t] + 0.5 * s[i] for i, t in enumerate(self.tasks))
        w = self.weights()
        return sum(w[t] * losses[t] for t in self.tasks)

    def end_epoch(self, mean_losses):
        self.history.append([float(mean_losses[t]) for t in self.tasks])

    def get_extra_state(self):
        return {"history": self.history}

    def set_extra_state(self, state):
        self.history = [list(h) for h in state["history"]]


# ----------------------------------------------------------------------------------------------
# Configuration, data and model
# ----------------------------------------------------------------------------------------------
ARCH_DEFAULTS = {"mfe": dict(weighting="mfe")}  # MFE-UNet's own loss: L_seg + 0.25 L_cls
RUNTIME_KEYS = {"device", "workers", "out", "resume", "eval_only", "stop_after", "log_every", "bench", "steps",
                "compile", "checkpointing"}
# Defaults shared by all datasets (the command line's own defaults are None, to tell "given" from "default").
COMMON = dict(weight_decay=1e-4, weighting="equal", seed=0, class_weights=False, augment=False, log_every=30.0,
              max_steps_per_epoch=None, max_eval_cases=None, workers=None, stop_after=None, resume=False,
              eval_only=None, compile=False, checkpointing=False, bench=False, steps=20, transition="block",
              pool_queries=True)
MODEL_OPTIONS = {"mtan": ("transition",), "ctan": ("transition", "pool_queries")}  # cfg keys for ctan.build_model
# Model options that checkpoints written before them lack, with the value those checkpoints used.
BEFORE_OPTION = dict(transition="block", pool_queries=False)


def resolve_config(args):
    """Effective config: per-dataset table, then its CPU overrides, then what the command line gave."""
    table = DEFAULTS[args.dataset]
    device = args.device or "auto"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is available (use --device cpu)")
    if args.transition and "transition" not in MODEL_OPTIONS.get(args.arch, ()):
        raise UserError(f"--transition applies to mtan and ctan (their per-task branches), not {args.arch}")
    cfg = {k: table[k] for k in ("dims", "epochs", "batch_size", "lr", "width", "depth")}
    cfg.update(COMMON)
    cfg.update(ARCH_DEFAULTS.get(args.arch, {}))
    if device == "cpu":
        cfg.update(table["cpu"])
    if (args.dims or table["dims"]) == 3:
        cfg.update(table.get("dims3", {}))
    cfg.update({k: v for k, v in vars(args).items() if v is not None})
    cfg.update(device=device, depth=tuple(cfg["depth"]), losses=dict(table["losses"]), select=table["select"],
               dose_scale_gy=DOSE_SCALE_GY)
    cfg["data"] = str(cfg.get("data") or data.default_path(args.dataset))
    cfg["out"] = str(cfg.get("out") or Path("runs") / f"{args.dataset}-{args.arch}")
    if cfg["workers"] is None:
        cfg["workers"] = 0 if device == "cpu" else min(8, os.cpu_count() or 1)
    return cfg


def open_split(cfg, split, augment=False):
    path = Path(cfg["data"])
    if not path.exists():
        raise UserError(f"{path} not found: run `python data.py synth {cfg['dataset']}` for a synthetic stand-in, "
                        f"or `python data.py convert {cfg['dataset']} RAW_DIR` for the real data")
    return data.open_dataset(str(path), split, dims=cfg["dims"], augment=augment)


def case_subset(ds, max_cases):
    """The dataset restricted to its first `max_cases` cases (all slices of them in 2D)."""
    if not max_cases or max_cases >= ds.num_cases:
        return ds
    if hasattr(ds, "case_of"):
        idx = [i for i in range(len(ds)) if ds.case_of(i) < max_cases]
    elif len(ds) == ds.num_cases:
        idx = list(range(max_cases))
    else:
        raise NotImplementedError("data.py does not expose which case each item belongs to")
    return torch.utils.data.Subset(ds, idx)


def class_weights_from(ds, losses):
    """Inverse-frequency class weights (mean 1) for each classification task, from the training labels."""
    labels = {t: [] for t, kind in losses.items() if kind == "ce"}
    for i in range(ds.num_cases):
        case = ds.case(i)
        for t in labels:
            labels[t].append(int(case[t]))
    out = {}
    for t, y in labels.items():
        counts = np.bincount(y, minlength=ds.tasks[t][1]).astype(np.float64)
        w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(counts), 0.0)
        out[t] = torch.tensor(w / w[w > 0].mean(), dtype=torch.float32)
    return out


def distributed():
    """(rank, world size, local rank) of this process: torchrun sets them; (0, 1, 0) otherwise."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def make_run(cfg, tasks, in_channels, steps_per_epoch, model=None):
    """Model (built from cfg unless given), weighting, optimizer over the trainable parameters and
    scheduler for a config (seeded: same cfg, same start).

    `run.model` is the plain network (its state_dict goes into checkpoints; evaluation uses it);
    `run.net` is what the training step calls: the model wrapped in DistributedDataParallel under
    torchrun, then torch.compile'd with --compile."""
    seed_everything(cfg["seed"])
    rank, world, local_rank = distributed()
    device = torch.device(cfg["device"], local_rank) if cfg["device"] == "cuda" else torch.device(cfg["device"])
    if model is None:
        try:
            options = {key: cfg[key] for key in MODEL_OPTIONS.get(cfg["arch"], ())}
            model = ctan.build_model(cfg["arch"], tasks, in_channels, dims=cfg["dims"], width=cfg["width"],
                                     depth=cfg["depth"], checkpointing=cfg["checkpointing"], **options)
        except ValueError as e:  # an impossible combination of options (e.g. depth 1 with mtan)
            raise UserError(f"cannot build {cfg['arch']}: {e}") from None
    model = model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if cfg["dims"] == 2:
            model = model.to(memory_format=torch.channels_last)
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    if cfg["compile"]:
        import torch._inductor.config as inductor_config
        inductor_config.fallback_random = True  # dropout draws as in eager mode: the same losses
        net = torch.compile(net, dynamic=False)  # one static graph per input shape
    weighting = Weighting(cfg["weighting"], list(cfg["losses"]),
                          image_tasks=[t for t, (kind, _) in tasks.items() if kind == "image"]).to(device)
    params = [p for p in model.parameters() if p.requires_grad] + list(weighting.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                                  fused=device.type == "cuda")  # one kernel for the whole update on a GPU
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps_per_epoch * cfg["epochs"]))
    return SimpleNamespace(cfg=cfg, device=device, model=model, net=net, weighting=weighting, optimizer=optimizer,
                           scheduler=scheduler, steps_per_epoch=steps_per_epoch, class_weights=None,
                           rank=rank, world=world)


def warn_if_synthetic(ds, cfg, log):
    """Say loudly when the data is a synthetic stand-in."""
    if ds.synthetic:
        log("!" * 78 + f"\n!! WARNING: {cfg['data']} is a SYNTHETIC stand-in, not the real {cfg['dataset']} data;\n"
            "!! its metrics say nothing about the paper's results or about real patients.\n" + "!" * 78)


def steps_per_epoch(cfg, ds):
    """Training steps in one epoch: a pass over the split (1/world of it per process under
    torchrun), at most --max-steps-per-epoch."""
    per_step = cfg["batch_size"] * distributed()[1]
    steps = len(ds) // per_step if len(ds) > per_step else 1
    return min(steps, cfg["max_steps_per_epoch"]) if cfg["max_steps_per_epoch"] else steps


def build(cfg):
    """Datasets and `make_run` for a config; under torchrun each process takes 1/world of the batches."""
    train_ds = open_split(cfg, "train", augment=cfg.get("augment", False))
    val_ds = open_split(cfg, "val")
    test_ds = open_split(cfg, "test")
    if train_ds.dataset != cfg["dataset"]:
        raise UserError(f"{cfg['data']} holds {train_ds.dataset}, not {cfg['dataset']} (check --data)")
    run = make_run(cfg, train_ds.tasks, train_ds.in_channels, steps_per_epoch(cfg, train_ds))
    init_output_bias(run.model, train_ds, cfg["losses"], n_items=64 if cfg["dims"] == 2 else 8)
    if cfg.get("class_weights"):
        run.class_weights = {t: w.to(run.device) for t, w in class_weights_from(train_ds, cfg["losses"]).items()}
    run.train_ds, run.val_ds, run.test_ds = train_ds, val_ds, test_ds
    return run


@torch.no_grad()
def init_output_bias(model, ds, losses, n_items=64):
    """Prior initialisation of the pixel heads' output bias (ours; the "prior probability" init of
    Lin et al., ICCV 2017): segmentation logits start at the mean foreground fraction per channel,
    dose at the mean scaled dose inside the possible-dose mask, both measured on n_items training
    items spread evenly over the split. Without it, small ROIs (0.1-1 % of voxels) take thousands
    of Adam steps just to move the bias from 0 to about -6. Heads without `.out.bias` are skipped."""
    heads = getattr(model, "heads", {})
    tasks = [t for t in losses if losses[t] in ("bce_dice", "dose_l1") and t in heads
             and getattr(getattr(heads[t], "out", None), "bias", None) is not None]
    if not tasks:
        return
    idx = np.linspace(0, len(ds) - 1, min(n_items, len(ds))).round().astype(int)
    items = [ds[int(i)] for i in np.unique(idx)]
    for t in tasks:
        target = torch.stack([it[t] for it in items]).transpose(0, 1).flatten(1).double()  # (C, N)
        if losses[t] == "dose_l1":
            mask = torch.stack([it["possible_dose_mask"] for it in items]).flatten().double()
            value = (target * mask).sum(1) / mask.sum().clamp_min(1) / DOSE_SCALE_GY
        else:
            frac = target.mean(1).clamp(1e-4, 0.5)
            value = torch.log(frac / (1 - frac))
        bias = heads[t].out.bias
        if bias.shape == value.shape:
            bias.copy_(value.to(bias))


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states():
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ----------------------------------------------------------------------------------------------
# Loops
# ----------------------------------------------------------------------------------------------
def to_device(batch, device, channels_last=False):
    """A batch on the device; bool masks become 0/1 floats there (they travel 4x smaller)."""
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device, non_blocking=True)
            if v.dtype == torch.bool:
                v = v.float()
            if channels_last and v.dim() == 4 and v.is_floating_point():
                v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


def autocast(device):
    """bf16 autocast on CUDA, fp32 elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def forward(run, image, net=None):
    """The network on a batch (see `autocast`). `net` defaults to the plain model."""
    with autocast(run.device):
        return (run.model if net is None else net)(image)


def train_loader(run, epoch):
    """Shuffled loader whose order depends only on (seed, epoch), so a resumed run sees the same batches."""
    g = torch.Generator()
    g.manual_seed(run.cfg["seed"] * 100_003 + epoch)
    ds, batch = run.train_ds, run.cfg["batch_size"]
    sampler = None
    if run.world > 1:  # each process a disjoint 1/world of the shuffled items, same order on resume
        sampler = torch.utils.data.DistributedSampler(ds, run.world, run.rank, shuffle=True, seed=run.cfg["seed"])
        sampler.set_epoch(epoch)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=sampler is None, sampler=sampler,
                                       generator=g, drop_last=len(ds) > batch * run.world,
                                       num_workers=run.cfg["workers"], pin_memory=run.device.type == "cuda")


def train_step(run, batch):
    """One optimisation step on a batch already on the device. Returns ({task: loss}, total loss);
    raises FloatingPointError before touching the weights when the loss is not finite."""
    losses = task_losses(forward(run, batch["image"], run.net), batch, run.cfg["losses"], run.class_weights)
    total = run.weighting(losses)
    if not torch.isfinite(total):
        raise FloatingPointError(", ".join(f"{t} {v.item():.4g}" for t, v in losses.items()))
    run.optimizer.zero_grad(set_to_none=True)
    total.backward()
    run.optimizer.step()
    run.scheduler.step()
    return losses, total


def train_one_epoch(run, epoch, log=print):
    """One epoch (at most steps_per_epoch steps). Returns mean task losses, total loss and throughput."""
    run.model.train()
    cl = run.device.type == "cuda" and run.cfg["dims"] == 2
    sums, total_sum, n_steps, n_samples = {t: 0.0 for t in run.cfg["losses"]}, 0.0, 0, 0
    t0 = last_log = time.time()
    for step, batch in enumerate(train_loader(run, epoch)):
        if step >= run.steps_per_epoch:
            break
        try:
            losses, total = train_step(run, to_device(batch, run.device, cl))
        except FloatingPointError as e:
            kept = (f"the last good checkpoint (epoch {epoch - 1}) is kept in {run.cfg['out']}/last.pt"
                    if epoch > 1 else "no checkpoint was written")
            raise UserError(f"non-finite loss at epoch {epoch} step {step} ({e}); stopped, {kept} "
                            "(try a lower --lr)") from None
        for t, v in losses.items():
            sums[t] += v.item()
        total_sum += total.item()
        n_steps += 1
        n_samples += batch["image"].shape[0]
        now = time.time()
        if now - last_log > run.cfg["log_every"] and step + 1 < run.steps_per_epoch:
            rate = n_samples / (now - t0)
            eta = (now - t0) / n_steps * (run.steps_per_epoch - n_steps)
            log(f"  epoch {epoch} step {step + 1}/{run.steps_per_epoch} loss {total_sum / n_steps:.4f} "
                f"{rate:.1f} samples/s epoch ETA {fmt_time(eta)}")
            last_log = now
    n = max(n_steps, 1)
    out = {t: s / n for t, s in sums.items()}
    elapsed = time.time() - t0
    return {"losses": out, "loss": total_sum / n, "samples_per_s": n_samples / max(elapsed, 1e-9),
            "train_time_s": elapsed, "steps": n_steps}


@torch.no_grad()
def predict(run, ds, batch_size=None):
    """Yields (batch on CPU, {task: float32 numpy outputs}) over a dataset, in order."""
    run.model.eval()
    cl = run.device.type == "cuda" and run.cfg["dims"] == 2
    g = torch.Generator()  # loaders draw a worker seed: keep that off the global RNG (exact resume)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size or run.cfg["batch_size"], shuffle=False,
                                         num_workers=run.cfg["workers"], generator=g)
    for batch in loader:
        out = forward(run, to_device(batch, run.device, cl)["image"])
        yield batch, {t: v.float().cpu().numpy() for t, v in out.items()}


def evaluate(run, ds, max_cases=None, preview_dir=None, n_preview=3):
    """The dataset's metrics (DEFAULTS[...]["metrics"] plus per-ROI Dice) on a split; optionally
    writes preview PNGs of the first `n_preview` cases."""
    name = run.cfg["dataset"]
    sub = case_subset(ds, max_cases)
    if name in data.PLANNING:
        return _evaluate_rt(run, ds, sub, preview_dir, n_preview)
    if name == "ham10000":
        return _evaluate_ham(run, ds, sub, preview_dir, n_preview)
    return _evaluate_stoic(run, ds, sub, preview_dir, n_preview)


def _evaluate_rt(run, ds, sub, preview_dir, n_preview):
    """Dose and structures scored per patient on whole volumes; 2D predictions are put back
    together from their axial slices (z, the third-last axis). Predicted dose is multiplied by the
    possible-dose mask before scoring, as the official OpenKBP pipeline does. A dose-only model
    (--arch guidance) predicts no structures: then no Dice is reported."""
    rois = list(ds.roi_names) or list(OPENKBP_ROIS)
    patients, dices, pending, segments = [], [], {}, False
    for batch, out in predict(run, sub):
        for j in range(batch["image"].shape[0]):
            c, s = int(batch["case"][j]), int(batch["slice"][j])
            if c not in pending:
                raw = ds.case(c)
                shape = raw["dose"].shape
                pending[c] = {"raw": raw, "seen": 0, "n": shape[-3] if s >= 0 else 1,
                              "dose": np.zeros(shape, np.float32), "structures": np.zeros((len(rois),) + shape, bool)}
            p = pending[c]
            where = data.axial_slice(s) if s >= 0 else (Ellipsis,)
            p["dose"][where] = out["dose"][j, 0] * DOSE_SCALE_GY
            if "structures" in out:
                p["structures"][where] = out["structures"][j] > 0
                segments = True
            p["seen"] += 1
            if p["seen"] == p["n"]:
                p = pending.pop(c)
                raw = p["raw"]
                pred = p["dose"] * raw["possible_dose_mask"]
                patients.append(openkbp_patient(pred, raw["dose"], raw["possible_dose_mask"], raw["structures"],
                                                raw["voxel_dimensions"], roi_names=rois))
                dices.append(roi_dice(p["structures"], raw["structures"]))
                if preview_dir and len(patients) <= n_preview:
                    save_rt_preview(Path(preview_dir) / f"{raw['id']}.png", raw, pred, p["structures"])
    if pending:
        raise RuntimeError(f"incomplete volumes after evaluation: cases {sorted(pending)}")
    dose_score, dvh_score = openkbp_aggregate(patients)
    if not segments and patients:
        return {"dose_score": dose_score, "dvh_score": dvh_score}
    dices = np.array(dices).reshape(-1, len(rois))
    scored = np.isfinite(dices).sum(0)  # patients in which each ROI is contoured
    per_roi = np.where(scored > 0, np.nansum(dices, 0) / np.maximum(scored, 1), np.nan)
    metrics = {"dose_score": dose_score, "dvh_score": dvh_score, "dice": _nanmean(per_roi)}
    metrics.update({f"dice_{r}": float(v) for r, v in zip(rois, per_roi)})
    return metrics


def _evaluate_ham(run, ds, sub, preview_dir, n_preview):
    """Lesion masks scored at the resolution of the stored reference mask (prediction resized)."""
    seg_pred, seg_ref, y_true, prob = [], [], [], []
    for batch, out in predict(run, sub):
        for j in range(batch["image"].shape[0]):
            raw = ds.case(int(batch["case"][j]))
            ref = np.asarray(raw["segmentation"], dtype=bool)
            logit = torch.from_numpy(out["segmentation"][j:j + 1])
            if logit.shape[-2:] != ref.shape:
                logit = F.interpolate(logit, size=ref.shape, mode="bilinear", align_corners=False)
            mask = logit[0, 0].numpy() > 0
            seg_pred.append(mask)
            seg_ref.append(ref)
            y_true.append(int(raw["diagnosis"]))
            prob.append(torch.softmax(torch.from_numpy(out["diagnosis"][j]), 0).numpy())
            if preview_dir and len(seg_pred) <= n_preview:
                save_ham_preview(Path(preview_dir) / f"{raw['id']}.png", raw, mask, prob[-1])
    prob = np.array(prob)
    return {"dice": float(np.mean([dice(p, r) for p, r in zip(seg_pred, seg_ref)])),
            "isic_jaccard": isic_jaccard(seg_pred, seg_ref),
            "balanced_accuracy": balanced_accuracy(y_true, prob.argmax(1)),
            "auc": roc_auc_macro(y_true, prob)}


def _evaluate_stoic(run, ds, sub, preview_dir, n_preview):
    """STOIC 2021 challenge: AUC for severe among COVID-positive cases; AUC for COVID."""
    covid, severe, p_covid, p_severe = [], [], [], []
    for batch, out in predict(run, sub):
        for j in range(batch["image"].shape[0]):
            covid.append(int(batch["covid"][j]))
            severe.append(int(batch["severe"][j]))
            p_covid.append(float(torch.softmax(torch.from_numpy(out["covid"][j]), 0)[1]))
            p_severe.append(float(torch.softmax(torch.from_numpy(out["severe"][j]), 0)[1]))
            if preview_dir and len(covid) <= n_preview:
                save_stoic_preview(Path(preview_dir) / f"{batch['id'][j]}.png", batch["image"][j].numpy(),
                                   covid[-1], severe[-1], p_covid[-1], p_severe[-1])
    covid, severe, p_severe = np.array(covid), np.array(severe), np.array(p_severe)
    return {"auc_severe": roc_auc(severe[covid == 1], p_severe[covid == 1]),
            "auc_covid": roc_auc(covid, p_covid)}


# ----------------------------------------------------------------------------------------------
# Outputs: preview images (pillow + numpy), checkpoints, logs
# ----------------------------------------------------------------------------------------------
_CMAP = np.array([[48, 18, 59], [70, 131, 249], [27, 208, 213], [97, 252, 108],
                  [210, 233, 53], [254, 155, 45], [217, 56, 6], [122, 4, 3]], np.float64)  # turbo-like
_ROI_COLOURS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                         [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]])


def colour_map(x):
    """Values in [0, 1] -> RGB uint8 by linear interpolation between the _CMAP anchors."""
    x = np.clip(np.nan_to_num(x), 0, 1) * (len(_CMAP) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_CMAP) - 2)
    f = (x - lo)[..., None]
    return ((1 - f) * _CMAP[lo] + f * _CMAP[lo + 1]).astype(np.uint8)


def grey(image):
    """A 2D image (any units, e.g. HU) to grey RGB uint8, scaled between its 0.5 and 99.5 percentiles."""
    image = np.asarray(image, np.float64)
    lo, hi = np.percentile(image, [0.5, 99.5])
    g = ((image - lo) / max(hi - lo, 1e-6)).clip(0, 1)
    return (np.repeat(g[..., None], 3, -1) * 255).astype(np.uint8)


def overlay(rgb, masks, alpha=0.45):
    """Binary masks (R, H, W) as coloured overlays on an RGB uint8 image."""
    out = rgb.astype(np.float64)
    for r, m in enumerate(masks):
        colour = _ROI_COLOURS[r % len(_ROI_COLOURS)]
        out[m] = (1 - alpha) * out[m] + alpha * colour
    return out.astype(np.uint8)


def save_panels(path, panels, labels):
    """Side-by-side RGB panels with a caption above each, as a PNG."""
    h = max(p.shape[0] for p in panels)
    strip = np.concatenate([np.pad(p, ((0, h - p.shape[0]), (0, 2), (0, 0))) for p in panels], 1)
    scale = max(1, 256 // h)
    img = Image.fromarray(strip).resize((strip.shape[1] * scale, h * scale), Image.NEAREST)
    canvas = Image.new("RGB", (img.width, img.height + 14), "black")
    canvas.paste(img, (0, 14))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for p, label in zip(panels, labels):
        draw.text((x + 2, 1), label, fill="white")
        x += (p.shape[1] + 2) * scale
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def save_rt_preview(path, raw, pred_dose, pred_structures):
    """Axial slice with the most reference dose: CT | dose truth | dose prediction | ROIs truth | ROIs prediction."""
    z = data.axial_slice(int(np.argmax(raw["dose"].sum((-2, -1)))))
    ct = grey(raw["image"][z])
    vmax = max(float(raw["dose"].max()), 1e-6)
    panels = [ct, colour_map(raw["dose"][z] / vmax), colour_map(pred_dose[z] / vmax),
              overlay(ct, np.asarray(raw["structures"])[z]), overlay(ct, pred_structures[z])]
    save_panels(path, panels, ["CT", "dose", "pred", "ROIs", "pred"])


def save_ham_preview(path, raw, pred_mask, prob):
    """Image | lesion truth + diagnosis | predicted lesion + diagnosis (probability)."""
    rgb, k = np.asarray(raw["image"], np.uint8), int(np.argmax(prob))
    save_panels(path, [rgb, overlay(rgb, raw["segmentation"][None]), overlay(rgb, pred_mask[None])],
                ["image", f"truth {data.HAM_CLASSES[raw['diagnosis']]}", f"pred {data.HAM_CLASSES[k]} {prob[k]:.2f}"])


def save_stoic_preview(path, image, covid, severe, p_covid, p_severe):
    """Middle axial slice (axis 0 = z) with the labels and predicted probabilities."""
    vol = image[0]
    ct = grey(vol[vol.shape[0] // 2])
    save_panels(path, [ct], [f"covid {covid} ({p_covid:.2f}) severe {severe} ({p_severe:.2f})"])


def save_atomic(obj, path):
    """torch.save to a temp file then os.replace: a crash never leaves a half-written checkpoint."""
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json_atomic(obj, path):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, (tuple, Path)):
        return list(x) if isinstance(x, tuple) else str(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


def load_checkpoint(path):
    # Our own files: they hold numpy/python RNG states, which weights_only loading rejects.
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if "config" in ck:
        ck["config"] = {**BEFORE_OPTION, **ck["config"]}
    return ck


def checkpoint(run, epoch, best):
    return {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "weighting": run.weighting.state_dict(),
            "epoch": epoch, "best": best, "rng": rng_states(), "config": run.cfg}


def fmt_time(seconds):
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def fmt_metrics(metrics, keys):
    return " ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)


def better(a, b, key):
    """Is metric value a (this epoch) at least as good as the best so far, b? Anything beats None
    (so best.pt always exists), a finite value beats NaN (e.g. an AUC on a validation set with one
    class), and a tie goes to the later epoch, which has trained longer (small validation sets
    saturate: an AUC of 1.0 from epoch 2 on should not pin best.pt to epoch 2)."""
    if b is None:
        return True
    if not np.isfinite(b):
        return bool(np.isfinite(a))
    return bool(np.isfinite(a)) and DIRECTION[key] * (a - b) >= 0


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------
def fit(run, log=print):
    """Train for cfg['epochs'] epochs (continuing from last.pt with --resume), validating each epoch;
    writes metrics.jsonl, last.pt, best.pt and predictions/. Returns the best validation record.
    Under torchrun every process trains; process 0 alone validates and writes."""
    cfg, out, main_process = run.cfg, Path(run.cfg["out"]), run.rank == 0
    select, keys = cfg["select"], DEFAULTS[cfg["dataset"]]["metrics"]
    start, best = 0, {"epoch": None, "value": None, "metrics": None}
    jsonl = out / "metrics.jsonl"
    if cfg.get("resume"):
        ckpt_path = out / "last.pt"
        if not ckpt_path.exists():
            raise UserError(f"--resume: {ckpt_path} not found (run without --resume to start)")
        ck = load_checkpoint(ckpt_path)
        run.model.load_state_dict(ck["model"])
        run.optimizer.load_state_dict(ck["optimizer"])
        run.scheduler.load_state_dict(ck["scheduler"])
        run.weighting.load_state_dict(ck["weighting"])
        set_rng_states(ck["rng"])
        start, best = ck["epoch"], ck["best"]
        if main_process:
            lines = jsonl.read_text().splitlines() if jsonl.exists() else []
            jsonl.write_text("".join(l + "\n" for l in lines if json.loads(l)["epoch"] <= start))
        log(f"resumed from {ckpt_path} after epoch {start}")
    elif main_process:
        jsonl.write_text("")
    t_run = time.time()
    for epoch in range(start + 1, cfg["epochs"] + 1):
        t0 = time.time()
        stats = train_one_epoch(run, epoch, log)
        if run.world > 1:  # the same epoch losses (hence DWA weights) in every process
            losses = torch.tensor(list(stats["losses"].values()), dtype=torch.float64)
            torch.distributed.all_reduce(losses)
            stats["losses"] = dict(zip(stats["losses"], (losses / run.world).tolist()))
        run.weighting.end_epoch(stats["losses"])
        stop = bool(cfg.get("stop_after") and epoch >= cfg["stop_after"])
        if not main_process:
            torch.distributed.barrier()  # wait while process 0 validates and writes checkpoints
            if stop:
                break
            continue
        preview = out / "predictions" if epoch == cfg["epochs"] or epoch == 1 else None
        val = evaluate(run, run.val_ds, cfg["max_eval_cases"], preview_dir=preview)
        record = {"epoch": epoch, "loss": stats["loss"], "losses": stats["losses"],
                  "weights": run.weighting.weights(), "lr": run.optimizer.param_groups[0]["lr"],
                  "samples_per_s": stats["samples_per_s"], "time_s": time.time() - t0, "val": val}
        if not np.isfinite(val[select]):
            log(f"WARNING: validation {select} is NaN (e.g. one class only in the validation cases); "
                "it cannot pick best.pt this epoch")
        if better(val[select], best["value"], select):
            best = {"epoch": epoch, "value": val[select], "metrics": val}
            save_atomic({"model": run.model.state_dict(), "epoch": epoch, "config": cfg, "val": val}, out / "best.pt")
        save_atomic(checkpoint(run, epoch, best), out / "last.pt")
        with jsonl.open("a") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")
        done = epoch - start
        eta = (time.time() - t_run) / done * (cfg["epochs"] - epoch)
        log(f"epoch {epoch}/{cfg['epochs']} loss {stats['loss']:.4f} "
            + " ".join(f"{t} {v:.4f}" for t, v in stats["losses"].items())
            + f" | val {fmt_metrics(val, keys)} | {stats['samples_per_s']:.1f} samples/s "
            f"{record['time_s']:.1f}s ETA {fmt_time(eta)}")
        if run.world > 1:
            torch.distributed.barrier()
        if stop:
            log(f"stopping after epoch {epoch} (--stop-after); continue with --resume")
            break
    return best


def test(run, ckpt_path, log=print):
    """Metrics on the test split with the weights from ckpt_path (best.pt: selected on validation)."""
    ck = load_checkpoint(ckpt_path)
    run.model.load_state_dict(ck["model"])
    metrics = evaluate(run, run.test_ds)
    log(f"test ({Path(ckpt_path).name}, epoch {ck.get('epoch')}): "
        f"{fmt_metrics(metrics, DEFAULTS[run.cfg['dataset']]['metrics'])}")
    return metrics, ck.get("epoch")


def report(cfg, test_metrics, best, ckpt_epoch, log=print, name="results.json"):
    """results.json: test metrics, the config, best validation, and Delta_MTL against the STL run."""
    out = Path(cfg["out"])
    keys = DEFAULTS[cfg["dataset"]]["metrics"]
    results = {"dataset": cfg["dataset"], "arch": cfg["arch"], "test": test_metrics, "test_epoch": ckpt_epoch,
               "best_val": best, "config": cfg, "delta_mtl": None, "stl_results": None}
    stl = out.parent / f"{cfg['dataset']}-stl" / "results.json"
    if cfg["arch"] != "stl" and stl.exists():
        stl_test = json.loads(stl.read_text())["test"]
        results["delta_mtl"] = delta_mtl(test_metrics, stl_test, keys)
        results["stl_results"] = str(stl)
        log(f"Delta_MTL vs {stl}: {results['delta_mtl']:+.2f}%")
    write_json_atomic(results, out / name)
    return results


def check_resume_config(cfg, args, ckpt_cfg):
    """--resume continues with the checkpoint's settings; an explicit different option is an error."""
    given = {k for k, v in vars(args).items() if v is not None}
    for key, value in ckpt_cfg.items():
        if key in RUNTIME_KEYS:
            continue
        if key in given and _norm(cfg.get(key)) != _norm(value):
            raise UserError(f"--resume: the checkpoint was made with {key}={value!r}, not {cfg.get(key)!r}; "
                            f"resume with the same options (or start a new --out)")
        cfg[key] = value


def _norm(v):
    return list(v) if isinstance(v, (tuple, list)) else v


# ----------------------------------------------------------------------------------------------
# --- Deep multimodal guidance (Mallya & Hamarneh, MICCAI 2022): --arch guidance ---
# The paper trains on a cheap "inferior" modality, guided by what a model learned from a costly
# "superior" one that is absent at inference. Here (ours: the paper guides classifiers; this
# brings it to dose prediction): superior input = CT + the R expert ROI masks (slow to draw),
# inferior input = CT alone; task = dose. `python train.py --dataset openkbp --arch guidance`
# runs the stages in order, each keeping its checkpoint in --out; `--stage X` reruns one of them
# from the kept checkpoints of the earlier ones:
#   a  stage_a_inferior.pt, stage_a_superior.pt: an STL dose encoder-decoder on each input,
#      trained like any run (fit: dose L1, AdamW, cosine, best epoch on validation)
#   b  stage_b_guidance.pt: G (ctan.GuidanceNetwork) maps the inferior encoder features to the
#      superior ones, MSE averaged over the encoder scales, both (a) models frozen
#   c  (nothing to train, no checkpoint) the superior decoder applied to G(inferior features)
#   d  stage_d_combined.pt: a new decoder on [inferior features ; G(inferior features)], trained
#      (inferior encoder and G frozen)
# Models (c) and (d) read the CT only. results.json puts the test dose/DVH scores side by side.
# ----------------------------------------------------------------------------------------------
GUIDANCE = dict(dropout=0.1, epochs_b=None)  # G's dropout; stage (b) epochs (None: the run's --epochs)
GUIDANCE_STAGES = ("a", "b", "c", "d")
GUIDANCE_ENTRIES = {"a": ("a_inferior", "a_superior"), "b": ("b_guidance",), "c": ("c_guided",),
                    "d": ("d_combined",)}
GUIDANCE_DEPENDENTS = {"a": "bcd", "b": "cd", "c": "", "d": ""}  # stages made from a stage's output
GUIDANCE_FILES = {"a_inferior": "stage_a_inferior.pt", "a_superior": "stage_a_superior.pt",
                  "b_guidance": "stage_b_guidance.pt", "d_combined": "stage_d_combined.pt"}
GUIDANCE_ROWS = {"a_inferior": ("(a) inferior", "CT"), "a_superior": ("(a) superior", "CT + ROI masks"),
                 "c_guided": ("(c) guided", "CT: superior decoder on G(f)"),
                 "d_combined": ("(d) combined", "CT: new decoder on [f ; G(f)]")}
DOSE_TASK, DOSE_LOSS = {"dose": ("pixel", 1)}, {"dose": "dose_l1"}


class SuperiorInput(torch.utils.data.Dataset):
    """A radiotherapy split whose items carry the superior input: "image" = [CT ; R structure
    masks] (1 + R channels). Targets, case(), case_of(), roi_names... are the split's own."""

    def __init__(self, ds):
        self.ds = ds
        self.in_channels = ds.in_channels + ds.tasks["structures"][1]

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, index):
        item = dict(self.ds[index])
        item["image"] = torch.cat([item["image"], item["structures"]], 0)
        return item

    def __getattr__(self, name):  # everything else from the wrapped split (guarded for unpickling)
        if name == "ds":
            raise AttributeError(name)
        return getattr(self.ds, name)


def freeze(module):
    """Eval mode (BN statistics and dropout fixed) and no gradients: a frozen stage stays as trained."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class CombinedGuidedModel(ctan.GuidedModel):
    """Stage (d): ctan.GuidedModel(combine=True) with new dose heads on [f ; G(f)] (twice the
    encoder's channels per scale). Only the new heads train: the inferior model and G are frozen
    (no gradients, and kept in eval mode even when the model is put in training mode)."""

    def __init__(self, inferior, guidance, dims):
        channels = [2 * c for c in inferior.encoders["dose"].channels]
        heads = nn.ModuleDict({t: ctan.make_head(dims, kind, channels, n) for t, (kind, n) in DOSE_TASK.items()})
        super().__init__(freeze(inferior), freeze(guidance), heads, combine=True)

    def train(self, mode=True):
        super().train(mode)
        self.inferior.eval()
        self.guidance.eval()
        return self


def guidance_loss(guided, target):
    """Stage (b) loss: mean over the encoder scales of MSE(G(inferior features), superior features)."""
    return sum(F.mse_loss(g.float(), t.float()) for g, t in zip(guided, target)) / len(target)


def guidance_step_features(inferior, superior, batch, device):
    """(inferior features, superior features) of a batch on the device, from the frozen (a) models."""
    with torch.no_grad(), autocast(device):
        f_inf = inferior.features(batch["image"])["dose"]
        f_sup = superior.features(torch.cat([batch["image"], batch["structures"]], 1))["dose"]
    return [f.float() for f in f_inf], [f.float() for f in f_sup]


@torch.no_grad()
def guidance_mse(guidance, inferior, superior, ds, cfg, device):
    """Mean stage (b) loss of G (eval mode) over a split, batch by batch."""
    guidance.eval()
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg["batch_size"], shuffle=False,
                                         num_workers=cfg["workers"], generator=torch.Generator())
    total, n = 0.0, 0
    for batch in loader:
        batch = to_device(batch, device)
        f_inf, f_sup = guidance_step_features(inferior, superior, batch, device)
        with autocast(device):
            guided = guidance(f_inf)
        total += guidance_loss(guided, f_sup).item() * batch["image"].shape[0]
        n += batch["image"].shape[0]
    return total / max(n, 1)


def _stage_cfg(cfg, entry):
    return dict(cfg, out=str(Path(cfg["out"]) / Path(GUIDANCE_FILES.get(entry, entry)).stem), losses=dict(DOSE_LOSS),
                guidance_stage=entry)


def _eval_run(cfg, model, test_ds=None):
    """What evaluate/predict need to score a model (no training state)."""
    return SimpleNamespace(cfg=cfg, device=torch.device(cfg["device"]), model=model, net=model, test_ds=test_ds,
                           rank=0, world=1)


def _keep_best(run, sub, out, entry, best, metrics, extra, log):
    """Stage checkpoint (best validation weights, atomic write) in --out; the stage folder keeps
    its metrics.jsonl and predictions/ but not the duplicate best.pt/last.pt."""
    ck = load_checkpoint(sub / "best.pt")
    save_atomic({"stage": entry, "model": ck["model"], "epoch": ck["epoch"], "val": best["metrics"],
                 "test": metrics, "config": run.cfg, **extra}, out / GUIDANCE_FILES[entry])
    for name in ("best.pt", "last.pt"):
        (sub / name).unlink(missing_ok=True)
    log(f"{entry}: kept {out / GUIDANCE_FILES[entry]}")


def guidance_stage_a(cfg, splits, log=print):
    """Stage (a): an STL dose model on the inferior input (CT) and one on the superior input
    (CT + ROI masks), each trained by fit() and scored on the test split. Returns {entry: metrics}."""
    out, results = Path(cfg["out"]), {}
    for entry, wrap in (("a_inferior", lambda ds: ds), ("a_superior", SuperiorInput)):
        scfg = dict(_stage_cfg(cfg, entry), arch="stl")
        sub = Path(scfg["out"])
        sub.mkdir(parents=True, exist_ok=True)
        train_ds, val_ds, test_ds = (wrap(splits[s]) for s in ("train", "val", "test"))
        run = make_run(scfg, DOSE_TASK, train_ds.in_channels, steps_per_epoch(scfg, train_ds))
        init_output_bias(run.model, train_ds, DOSE_LOSS, n_items=64 if cfg["dims"] == 2 else 8)
        run.train_ds, run.val_ds, run.test_ds = train_ds, val_ds, test_ds
        log(f"stage {entry}: STL dose model on {GUIDANCE_ROWS[entry][1]} ({train_ds.in_channels} channels), "
            f"{sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M parameters, "
            f"{run.steps_per_epoch} steps/epoch")
        best = fit(run, log)
        metrics, _ = test(run, sub / "best.pt", log)
        _keep_best(run, sub, out, entry, best, metrics, {"in_channels": train_ds.in_channels}, log)
        results[entry] = metrics
    return results


def _load_stage(cfg, entry):
    """A kept stage checkpoint; a clear error naming the command that makes it when it is missing."""
    path = Path(cfg["out"]) / GUIDANCE_FILES[entry]
    if not path.exists():
        stage = entry[0]
        raise UserError(f"--stage {cfg.get('stage') or 'all'} needs {path}, which stage {stage} makes: run "
                        f"`python train.py --dataset {cfg['dataset']} --arch guidance --stage {stage} "
                        f"--data {cfg['data']} --out {cfg['out']}` first")
    ck = load_checkpoint(path)
    made = ck["config"]
    if (made["dataset"], made["dims"]) != (cfg["dataset"], cfg["dims"]):
        raise UserError(f"{path} was made for {made['dataset']} in {made['dims']}D, not {cfg['dataset']} in "
                        f"{cfg['dims']}D (use another --out, or rerun the earlier stages)")
    return ck


def load_dose_model(cfg, entry):
    """An (a) model from its kept checkpoint, frozen, on the run's device."""
    ck = _load_stage(cfg, entry)
    made = ck["config"]
    model = ctan.build_model("stl", DOSE_TASK, ck["in_channels"], dims=made["dims"], width=made["width"],
                             depth=made["depth"])
    model.load_state_dict(ck["model"])
    return freeze(model.to(cfg["device"]))


def load_guidance(cfg):
    """G from stage_b_guidance.pt, frozen, on the run's device."""
    ck = _load_stage(cfg, "b_guidance")
    g = ctan.GuidanceNetwork(ck["config"]["dims"], ck["channels"], ck["dropout"])
    g.load_state_dict(ck["model"])
    return freeze(g.to(cfg["device"]))


def guidance_stage_b(cfg, splits, inferior, superior, log=print):
    """Stage (b): train G to map the inferior encoder features to the superior ones (MSE averaged
    over scales). Both (a) models are frozen (eval mode, no gradients), so their parameters and BN
    statistics stay bit-identical. G is selected on the validation MSE and saved in
    stage_b_guidance.pt. Returns (G, {"b_guidance": {"val_mse": ...}})."""
    device = torch.device(cfg["device"])
    channels = list(inferior.encoders["dose"].channels)
    if list(superior.encoders["dose"].channels) != channels:
        raise UserError(f"the (a) encoders differ in channels ({channels} vs {superior.encoders['dose'].channels}): "
                        "rerun stage a with one --width/--depth")
    freeze(inferior)
    freeze(superior)
    seed_everything(cfg["seed"])
    guidance = ctan.GuidanceNetwork(cfg["dims"], channels, cfg["guidance_dropout"]).to(device)
    epochs = cfg["guidance_epochs"] or cfg["epochs"]
    steps = steps_per_epoch(cfg, splits["train"])
    optimizer = torch.optim.AdamW(guidance.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps * epochs))
    loader_run = SimpleNamespace(cfg=cfg, device=device, train_ds=splits["train"], rank=0, world=1)
    val_ds = case_subset(splits["val"], cfg["max_eval_cases"])
    sub = Path(_stage_cfg(cfg, "b_guidance")["out"])
    sub.mkdir(parents=True, exist_ok=True)
    jsonl = sub / "metrics.jsonl"
    jsonl.write_text("")
    best = {"epoch": None, "val_mse": None, "state": None}
    log(f"stage b_guidance: G with 1x1 convolutions on {len(channels)} scales {channels}, dropout "
        f"{cfg['guidance_dropout']}, {sum(p.numel() for p in guidance.parameters()) / 1e6:.2f}M parameters, "
        f"{epochs} epochs of {steps} steps")
    for epoch in range(1, epochs + 1):
        t0, total, n = time.time(), 0.0, 0
        guidance.train()
        for step, batch in enumerate(train_loader(loader_run, epoch)):
            if step >= steps:
                break
            batch = to_device(batch, device)
            f_inf, f_sup = guidance_step_features(inferior, superior, batch, device)
            with autocast(device):
                guided = guidance(f_inf)
            loss = guidance_loss(guided, f_sup)
            if not torch.isfinite(loss):
                raise UserError(f"stage b: non-finite guidance loss at epoch {epoch} step {step} (try a lower --lr)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total, n = total + loss.item(), n + 1
        val = guidance_mse(guidance, inferior, superior, val_ds, cfg, device)
        record = {"epoch": epoch, "loss": total / max(n, 1), "val_mse": val, "lr": optimizer.param_groups[0]["lr"],
                  "time_s": time.time() - t0}
        with jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")
        log(f"b epoch {epoch}/{epochs} guidance MSE {record['loss']:.5f} | val MSE {val:.5f} | {record['time_s']:.1f}s")
        if best["val_mse"] is None or val < best["val_mse"]:
            best = {"epoch": epoch, "val_mse": val,
                    "state": {k: v.detach().clone() for k, v in guidance.state_dict().items()}}
    guidance.load_state_dict(best["state"])
    info = {"epoch": best["epoch"], "val_mse": best["val_mse"]}
    save_atomic({"stage": "b_guidance", "model": guidance.state_dict(), "channels": channels,
                 "dropout": cfg["guidance_dropout"], "config": dict(cfg, guidance_stage="b_guidance"), **info},
                Path(cfg["out"]) / GUIDANCE_FILES["b_guidance"])
    log(f"b_guidance: kept {Path(cfg['out']) / GUIDANCE_FILES['b_guidance']} (epoch {best['epoch']}, "
        f"val MSE {best['val_mse']:.5f})")
    return freeze(guidance), {"b_guidance": info}


def guided_model(inferior, guidance, superior):
    """Stage (c): the superior model's decoder applied to G(inferior features); reads the CT only."""
    return ctan.GuidedModel(freeze(inferior), freeze(guidance), superior.heads, combine=False).eval()


def guidance_stage_c(cfg, splits, log=print):
    """Stage (c): nothing to train; the guided model is scored on the test split."""
    model = guided_model(load_dose_model(cfg, "a_inferior"), load_guidance(cfg), load_dose_model(cfg, "a_superior"))
    metrics = evaluate(_eval_run(cfg, model), splits["test"])
    log(f"test (c_guided): {fmt_metrics(metrics, ('dose_score', 'dvh_score'))}")
    return {"c_guided": metrics}


def guidance_stage_d(cfg, splits, log=print):
    """Stage (d): new decoder on [f ; G(f)], trained by fit() (only the heads; inferior model and G
    frozen), selected on validation, scored on test, saved whole in stage_d_combined.pt."""
    inferior, guidance = load_dose_model(cfg, "a_inferior"), load_guidance(cfg)
    scfg = _stage_cfg(cfg, "d_combined")
    sub = Path(scfg["out"])
    sub.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg["seed"])
    model = CombinedGuidedModel(inferior, guidance, cfg["dims"])
    run = make_run(scfg, DOSE_TASK, 1, steps_per_epoch(scfg, splits["train"]), model=model)
    init_output_bias(run.model, splits["train"], DOSE_LOSS, n_items=64 if cfg["dims"] == 2 else 8)
    run.train_ds, run.val_ds, run.test_ds = splits["train"], splits["val"], splits["test"]
    trained = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    log(f"stage d_combined: new decoder on [f ; G(f)], {trained / 1e6:.2f}M trained "
        f"parameters (inferior encoder and G frozen), {run.steps_per_epoch} steps/epoch")
    best = fit(run, log)
    metrics, _ = test(run, sub / "best.pt", log)
    _keep_best(run, sub, Path(cfg["out"]), "d_combined", best, metrics, {}, log)
    return {"d_combined": metrics}


def guidance_table(results, n_test=None):
    """The side-by-side test table (plain text) of the entries present."""
    lines = [f"{'model':14s} {'input at inference':30s} {'dose score':>10s} {'DVH score':>10s}"]
    for entry, (label, reads) in GUIDANCE_ROWS.items():
        if entry in results:
            m = results[entry]
            lines.append(f"{label:14s} {reads:30s} {m['dose_score']:10.3f} {m['dvh_score']:10.3f}")
    head = "test split" + (f", {n_test} patients" if n_test is not None else "") + \
        ": OpenKBP dose and DVH scores, mean absolute error in Gy (lower is better)"
    return head + "\n" + "\n".join(lines)


def guidance_config(args):
    """The run's config (resolve_config) plus the guidance settings (GUIDANCE) and the stage."""
    cfg = resolve_config(args)
    cfg.update(guidance_dropout=GUIDANCE["dropout"], guidance_epochs=GUIDANCE["epochs_b"], losses=dict(DOSE_LOSS),
               stage=cfg.get("stage") or "all")
    return cfg


def run_guidance(args, log=print):
    """`--arch guidance`: the stages of deep multimodal guidance (all, or --stage X alone), then
    results.json {"guidance": {entry: test metrics}, "stages": {...}, "config": ...}."""
    if args.arch != "guidance":
        raise UserError(f"--stage applies to --arch guidance only, not {args.arch}")
    if args.dataset not in data.PLANNING:
        raise UserError(f"--arch guidance needs a superior modality (CT + ROI masks) that only the radiotherapy "
                        f"datasets ({', '.join(data.PLANNING)}) have; {args.dataset} has a single input modality "
                        f"({'the dermoscopic image' if args.dataset == 'ham10000' else 'the chest CT'}) and nothing "
                        "to guide it with")
    for option in ("resume", "eval_only", "stop_after", "bench"):
        if getattr(args, option, None):
            raise UserError(f"--{option.replace('_', '-')} does not apply to --arch guidance: rerun one stage "
                            "from the kept checkpoints with --stage a|b|c|d")
    if distributed()[1] > 1:
        raise UserError("--arch guidance runs in one process: start it without torchrun")
    cfg = guidance_config(args)
    stages = GUIDANCE_STAGES if cfg["stage"] == "all" else (cfg["stage"],)
    out = Path(cfg["out"])
    log("config: " + json.dumps(cfg, default=_json_default))
    splits = {s: open_split(cfg, s, augment=cfg.get("augment", False) and s == "train")
              for s in ("train", "val", "test")}
    if splits["train"].dataset != cfg["dataset"]:
        raise UserError(f"{cfg['data']} holds {splits['train'].dataset}, not {cfg['dataset']} (check --data)")
    warn_if_synthetic(splits["train"], cfg, log)
    out.mkdir(parents=True, exist_ok=True)
    log(f"guidance on {cfg['dataset']} ({cfg['dims']}D, {cfg['device']}): stages {', '.join(stages)}; superior "
        f"input CT + {splits['train'].tasks['structures'][1]} ROI masks, inferior input CT; "
        f"{len(splits['train'])} training items")
    new, stage_info = {}, {}
    for stage in stages:
        t0 = time.time()
        if stage == "a":
            new.update(guidance_stage_a(cfg, splits, log))
        elif stage == "b":
            _, info = guidance_stage_b(cfg, splits, load_dose_model(cfg, "a_inferior"),
                                       load_dose_model(cfg, "a_superior"), log)
            stage_info.update(info)
        elif stage == "c":
            new.update(guidance_stage_c(cfg, splits, log))
        else:
            new.update(guidance_stage_d(cfg, splits, log))
        for entry in GUIDANCE_ENTRIES[stage]:
            stage_info.setdefault(entry, {}).update(time_s=time.time() - t0, checkpoint=GUIDANCE_FILES.get(entry))
    # results.json: keep what earlier runs measured for the stages not rerun, but drop the later
    # stages' results when an earlier stage was rerun alone (they came from the replaced checkpoints)
    path, kept, kept_info = out / "results.json", {}, {}
    if len(stages) == 1 and path.exists():
        previous = json.loads(path.read_text())
        if previous.get("arch") == "guidance":
            later = [e for s in GUIDANCE_DEPENDENTS[stages[0]] for e in GUIDANCE_ENTRIES[s]]
            stale = [e for e in later if e in previous.get("guidance", {}) or e in previous.get("stages", {})]
            kept = {e: m for e, m in previous.get("guidance", {}).items() if e not in stale}
            kept_info = {e: m for e, m in previous.get("stages", {}).items() if e not in stale}
            if stale:
                log(f"results.json: dropped {', '.join(stale)} (made from the replaced stage {stages[0]}); "
                    f"rerun --stage {', '.join(GUIDANCE_DEPENDENTS[stages[0]])} to refresh them")
    merged = {**kept, **new}
    results = {"dataset": cfg["dataset"], "arch": "guidance",
               "guidance": {e: merged[e] for e in GUIDANCE_ROWS if e in merged},
               "stages": {**kept_info, **stage_info}, "test_patients": splits["test"].num_cases, "config": cfg}
    write_json_atomic(results, path)
    log(guidance_table(results["guidance"], splits["test"].num_cases))
    return results


def run_training(args, log=print):
    """Resolve the config, then train and test, or benchmark (--bench). Under torchrun
    (WORLD_SIZE > 1) this process joins the process group first and only process 0 logs."""
    if args.arch == "guidance" or getattr(args, "stage", None):
        return run_guidance(args, log)
    cfg = resolve_config(args)
    rank, world, local_rank = distributed()
    if world == 1:
        return bench(cfg, log) if cfg["bench"] else train_and_test(cfg, args, log)
    if cfg["bench"]:
        raise UserError("--bench measures one process on one device: run it without torchrun")
    if cfg["device"] == "cuda":
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group("nccl" if cfg["device"] == "cuda" else "gloo",
                                         timeout=datetime.timedelta(hours=2))
    try:
        return train_and_test(cfg, args, log if rank == 0 else (lambda *a, **k: None))
    finally:
        torch.distributed.destroy_process_group()


def train_and_test(cfg, args, log=print):
    out = Path(cfg["out"])
    if cfg.get("resume") and (out / "last.pt").exists():
        check_resume_config(cfg, args, load_checkpoint(out / "last.pt")["config"])
    if cfg.get("eval_only"):
        ck_path = Path(cfg["eval_only"])
        if not ck_path.exists():
            raise UserError(f"--eval-only: {ck_path} not found")
        ck_cfg = load_checkpoint(ck_path)["config"]
        if (ck_cfg["dataset"], ck_cfg["arch"]) != (cfg["dataset"], cfg["arch"]):
            raise UserError(f"--eval-only: {ck_path} is {ck_cfg['arch']} on {ck_cfg['dataset']}, "
                            f"not {cfg['arch']} on {cfg['dataset']}")
        cfg.update({key: ck_cfg[key] for key in ("dims", "width", "depth", *BEFORE_OPTION)})
    log("config: " + json.dumps(cfg, default=_json_default))
    run = build(cfg)
    warn_if_synthetic(run.train_ds, cfg, log)
    log(f"{cfg['arch']} on {cfg['dataset']} ({cfg['dims']}D, {cfg['device']}): "
        f"{sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M parameters, "
        f"{len(run.train_ds)} training items, {run.steps_per_epoch} steps/epoch")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.get("eval_only"):  # results_eval.json: leaves the training run's results.json alone
        metrics, epoch = test(run, cfg["eval_only"], log)
        return report(cfg, metrics, None, epoch, log, name="results_eval.json")
    best = fit(run, log)
    if run.rank != 0:
        return {}
    if cfg.get("stop_after") and cfg["stop_after"] < cfg["epochs"]:
        return {"stopped_after": cfg["stop_after"], "best_val": best, "config": cfg}
    metrics, epoch = test(run, out / "best.pt", log)
    return report(cfg, metrics, best, epoch, log)


# ----------------------------------------------------------------------------------------------
# Benchmark (--bench): training-step speed at the dataset's real input size
# ----------------------------------------------------------------------------------------------
def random_batch(cfg, tasks, in_channels):
    """A batch of random tensors shaped like the real data (DEFAULTS[...]["size"]): the model's
    speed without any input pipeline."""
    size, b = tuple(DEFAULTS[cfg["dataset"]]["size"][-cfg["dims"]:]), cfg["batch_size"]
    batch = {"image": torch.randn(b, in_channels, *size), "possible_dose_mask": torch.ones(b, 1, *size, dtype=torch.bool)}
    for t, (kind, n) in tasks.items():
        if kind == "image":
            batch[t] = torch.randint(0, n, (b,))
        else:
            batch[t] = (70 * torch.rand(b, n, *size) if cfg["losses"][t] == "dose_l1"
                        else torch.rand(b, n, *size) < 0.1)
    return batch


def time_steps(run, batches, steps, warmup):
    """Seconds per training step over `steps` steps after `warmup`, and the fraction of that time
    spent in `next(batches)` (an upper bound of the device's idle time: the step overlaps it)."""
    cl = run.device.type == "cuda" and run.cfg["dims"] == 2
    sync = torch.cuda.synchronize if run.device.type == "cuda" else (lambda: None)
    run.model.train()
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t0, wait = time.perf_counter(), 0.0
        t = time.perf_counter()
        batch = to_device(next(batches), run.device, cl)
        if i >= warmup:
            wait += time.perf_counter() - t
        train_step(run, batch)
    sync()
    elapsed = time.perf_counter() - t0
    return elapsed / steps, wait / elapsed


def forever(loader):
    while True:
        yield from loader


def bench(cfg, log=print):
    """Time cfg['steps'] training steps (after a warm-up) on random tensors of the real input size,
    then, if the --data file exists, on its training split through the DataLoader with the default
    workers, then that loader alone (no training). Prints one JSON line. A measurement, not a
    test: nothing here asserts a time."""
    name, path = cfg["dataset"], Path(cfg["data"])
    ds = open_split(cfg, "train") if path.exists() else None
    tasks = ds.tasks if ds else data.task_spec(name, len(data.SPECS[name].rois))
    in_channels = ds.in_channels if ds else data.in_channels(name)
    run = make_run(cfg, tasks, in_channels, steps_per_epoch=cfg["steps"] + 10)
    warmup, steps = max(3, cfg["steps"] // 4), cfg["steps"]
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    batch = random_batch(cfg, tasks, in_channels)
    log(f"bench: {cfg['arch']} on random {tuple(batch['image'].shape)} ({cfg['device']}), {warmup} + {steps} steps")
    sec, _ = time_steps(run, itertools.repeat(batch), steps, warmup)
    result = {
        "bench": name, "arch": cfg["arch"], "dims": cfg["dims"],
        "device": torch.cuda.get_device_name(run.device) if run.device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": "bf16 autocast" if run.device.type == "cuda" else "fp32", "compile": cfg["compile"],
        "params": sum(p.numel() for p in run.model.parameters()), "input": list(batch["image"].shape),
        "width": cfg["width"], "depth": list(cfg["depth"]), "steps": steps,
        "samples_per_s": round(cfg["batch_size"] / sec, 2), "ms_per_step": round(1000 * sec, 1),
        "peak_memory_mb": round(torch.cuda.max_memory_allocated(run.device) / 2**20 if run.device.type == "cuda"
                                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "hdf5": None,
    }
    if ds is not None:
        loader = torch.utils.data.DataLoader(ds, batch_size=cfg["batch_size"], shuffle=True, drop_last=True,
                                             num_workers=cfg["workers"], pin_memory=run.device.type == "cuda",
                                             persistent_workers=cfg["workers"] > 0)
        log(f"bench: {cfg['arch']} on {path} through the DataLoader ({cfg['workers']} workers)")
        batches = forever(loader)
        sec, wait = time_steps(run, batches, steps, warmup)
        for _ in range((loader.prefetch_factor or 0) * cfg["workers"]):  # empty the prefetch queue ...
            next(batches)
        t = time.perf_counter()  # ... then time the loader alone: the step rate it could feed
        for _ in range(steps):
            next(batches)
        supply = (time.perf_counter() - t) / steps
        result["hdf5"] = {"file": str(path), "input": [cfg["batch_size"], in_channels, *ds.spatial],
                          "workers": cfg["workers"], "samples_per_s": round(cfg["batch_size"] / sec, 2),
                          "ms_per_step": round(1000 * sec, 1), "data_wait_fraction": round(wait, 4),
                          "loader_samples_per_s": round(cfg["batch_size"] / supply, 2)}
    print(json.dumps(result), flush=True)
    return result


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit code 2, no usage dump
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv=None):
    p = _Parser(description="Train/evaluate CTAN and baselines. Options left out come from the per-dataset "
                            "table DEFAULTS in train.py (smaller ones on CPU).")
    p.add_argument("--dataset", required=True, choices=data.DATASETS)
    p.add_argument("--arch", required=True, choices=ctan.ARCHS + ("guidance",),
                   help="guidance: deep multimodal guidance for dose (CT + ROI masks guide a CT-only model)")
    p.add_argument("--stage", choices=("a", "b", "c", "d", "all"),
                   help="--arch guidance: run this stage alone from the kept checkpoints of the earlier ones "
                        "(default all)")
    p.add_argument("--data", help="HDF5 file from data.py (default data/NAME.h5)")
    p.add_argument("--dims", type=int, choices=(2, 3))
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--weighting", choices=("equal", "dwa", "uncertainty", "mfe"),
                   help="task loss weighting (default equal; mfe: L_pixel + 0.25 L_image, the default for --arch mfe)")
    p.add_argument("--class-weights", action="store_true", default=None,
                   help="inverse-frequency class weights in the cross-entropy losses")
    p.add_argument("--augment", action="store_true", default=None, help="training augmentation (data.py)")
    p.add_argument("--width", type=int, help="base channels of the network")
    p.add_argument("--depth", type=lambda s: tuple(int(x) for x in s.split(",")),
                   help="blocks per encoder stage, comma-separated (e.g. 3,4,6,3)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto")
    p.add_argument("--out", help="output folder (default runs/NAME-ARCH)")
    p.add_argument("--resume", action="store_true", default=None, help="continue from OUT/last.pt")
    p.add_argument("--eval-only", metavar="CKPT", help="only evaluate CKPT on the test split")
    p.add_argument("--workers", type=int, help="DataLoader workers (default 0 on CPU)")
    p.add_argument("--max-steps-per-epoch", type=int, help="cap on training steps per epoch")
    p.add_argument("--max-eval-cases", type=int, help="validate on the first N cases only (test uses all)")
    p.add_argument("--stop-after", type=int, help="stop after this epoch as if interrupted (then --resume)")
    p.add_argument("--log-every", type=float, help="seconds between progress lines within an epoch")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the training step's model")
    p.add_argument("--checkpointing", action="store_true", default=None,
                   help="activation checkpointing of the encoder stages (less memory, ~30%% more compute; 3D)")
    p.add_argument("--transition", choices=("block", "conv"),
                   help="mtan/ctan per-task transition between stages: block (official MTAN, default) or conv "
                        "(strided 1x1, faster)")
    p.add_argument("--bench", action="store_true", default=None,
                   help="time --steps training steps at the real input size and print one JSON line")
    p.add_argument("--steps", type=int, help="timed steps for --bench (default 20)")
    return p.parse_args(argv)


def main(argv=None):
    """Command line entry point; returns the results dict. User errors: one stderr line, exit code 2."""
    args = parse_args(argv)
    try:
        return run_training(args)
    except (UserError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print("interrupted: continue from the last finished epoch with --resume", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main()
