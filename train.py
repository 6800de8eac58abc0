"""Train, validate and test CTAN and its baselines on one dataset, and report the field's metrics.

    python data.py synth openkbp && python train.py --dataset openkbp --arch ctan

The file follows one run top to bottom: the config (one defaults table and the parser), metrics,
losses and task weighting, data and model (`make_run`), the training loop (`fit`, the only one:
every arch and every guidance stage goes through it), evaluation, outputs, deep multimodal guidance,
the benchmark and the command line. `main(argv)` returns the results dict, so tests call it in-process.
"""
import argparse
import copy
import datetime
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import flop_counter
from PIL import Image, ImageDraw

import ctan
import data
import summary

# === Config ===
# ONE defaults table. A run's config is "all", then its dataset's entry, then the entry of its device
# ("cuda" or "cpu": the GPU path's choices are keys, so a CPU can run that path too),
# then the dataset's "small" entry on a CPU (the quick start finishes in minutes on 2 cores) and
# "dims3" for --dims 3, then the arch's entry, then what the command line gives.
# Dose is predicted in units of DOSE_SCALE_GY (output 1.0 = 80 Gy), so it is O(1) like the other targets.
DOSE_SCALE_GY = 80.0
_SMALL = dict(width=32, depth=(2, 2, 2, 2), max_steps_per_epoch=40)
_RT = dict(dims=2, epochs=60, batch_size=16, lr=1e-3, width=64, depth=(3, 4, 6, 3), size=(128, 128, 128),
           select="dose_score", small=dict(_SMALL, epochs=6, batch_size=8, max_eval_cases=4), dims3=dict(batch_size=2))
DEFAULTS = {
    "all": dict(weight_decay=1e-4, weighting="equal", seed=0, class_weights=False, augment=False, log_every=30.0,
                max_steps_per_epoch=None, max_eval_cases=None, transition="block", compile=False,
                checkpointing=False, steps=20, peak_tflops=None, stage="all", resume=False, overwrite=False),
    "openkbp": _RT,
    "prostate": _RT,
    "ham10000": dict(dims=2, epochs=60, batch_size=32, lr=1e-3, width=64, depth=(3, 4, 6, 3), size=(192, 256),
                     select="balanced_accuracy", small=dict(_SMALL, epochs=20, batch_size=16, max_eval_cases=64)),
    "stoic": dict(dims=3, epochs=40, batch_size=2, lr=3e-4, width=32, depth=(2, 2, 2, 2), size=(128, 128, 128),
                  select="auc_severe", small=dict(_SMALL, width=16, epochs=15, batch_size=8, lr=1e-3,
                                                  max_steps_per_epoch=30, max_eval_cases=32)),
    "cuda": dict(precision="bf16", channels_last=True, workers=min(8, os.cpu_count() or 1)),
    "cpu": dict(precision="fp32", channels_last=False, workers=0),
    "mfe": dict(weighting="mfe"),  # MFE-UNet's own loss: L_seg + 0.25 L_cls
}
# Each task: its loss and the metrics that score it (Delta_MTL averages within a task first).
TASKS = {
    "dose": ("dose_l1", ("dose_score", "dvh_score")),
    "structures": ("bce_dice", ("dice",)),
    "segmentation": ("bce_dice", ("dice", "isic_jaccard")),
    "diagnosis": ("ce", ("balanced_accuracy", "auc")),
    "covid": ("ce", ("auc_covid",)),
    "severe": ("ce", ("auc_severe",)),
    "guidance": ("value", ("guidance_mse",)),  # stage (b) of --arch guidance: the output is G's MSE
}
LOWER_IS_BETTER = {"dose_score", "dvh_score", "guidance_mse"}
RUN_FILES = ("results.json", "results_eval.json", "metrics.jsonl", "last.pt", "best.pt")
RESUMED = ("model", "optimizer", "scheduler", "weighting")  # the states last.pt holds and --resume loads

class UserError(Exception):
    """A problem the user can fix (bad option, missing file, diverged run): one line, exit code 2."""

def resolve_config(args):
    """The run's config from DEFAULTS and the options given (the parser's defaults are all None)."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    device = given.pop("device", "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is available (use --device cpu)")
    table = DEFAULTS[args.dataset]
    cfg = {**DEFAULTS["all"], **{k: v for k, v in table.items() if k not in ("small", "dims3")}, **DEFAULTS[device]}
    if device == "cpu":
        cfg.update(table["small"])
    if given.get("dims", cfg["dims"]) == 3:
        cfg.update(table.get("dims3", {}))
    for arch in args.arch.split(","):
        cfg.update(DEFAULTS.get(arch, {}))
    cfg.update(given, device=device)
    cfg["depth"] = tuple(cfg["depth"])
    if cfg["dims"] not in data.SPECS[args.dataset].model_dims:
        raise UserError(f"{args.dataset} has no {cfg['dims']}D model: use --dims {2 if cfg['dims'] == 3 else 3}")
    cfg["data"] = str(cfg.get("data") or data.default_path(args.dataset))
    if "," not in cfg["arch"] and cfg["arch"] not in ("mtan", "ctan") and "transition" in given:
        raise UserError(f"--transition applies to mtan and ctan (their task branches' transitions), not {cfg['arch']}")
    if cfg["class_weights"] and not any(TASKS[t][0] == "ce" for t in data.SPECS[args.dataset].tasks):
        raise UserError(f"--class-weights weights classification losses: {args.dataset} has no classification task")
    if cfg.get("stl") and not Path(cfg["stl"]).exists():
        raise UserError(f"--stl {cfg['stl']} not found: name an STL run's folder or its results.json")
    default_out = Path(cfg["eval_only"]).parent if cfg.get("eval_only") else Path("runs") / run_name(cfg, cfg["arch"])
    cfg["out"] = str(cfg.get("out") or default_out)
    return cfg

def run_name(cfg, arch):
    """Default run folder: data file name, 3d for volumes, arch (runs on different data stay apart)."""
    return f"{Path(cfg['data']).stem}{'-3d' if cfg['dims'] == 3 else ''}-{arch}"

# === Metrics (numpy) ===
def openkbp_dvh(dose, structure_masks, voxel_dimensions, roi_names=data.OPENKBP_ROIS):
    """DVH metrics of one patient as OpenKBP's DoseEvaluator (provided_code/dose_evaluation_class.py):
    {(metric, roi): value} for the ROIs present. OARs: D_0.1_cc (percentile 100 - n/|roi|*100, n =
    max(1, round(100 / voxel mm^3)), clipped at 0) and mean; targets (PTV*): percentiles 1, 5, 99."""
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
            for metric, q in (("D_99", 1), ("D_95", 5), ("D_1", 99)):
                out[(metric, roi)] = np.percentile(roi_dose, q)
        else:
            out[("D_0.1_cc", roi)] = np.percentile(roi_dose, max(0.0, 100 - n_tenth_cc / roi_dose.size * 100))
            out[("mean", roi)] = roi_dose.mean()
    return out

def openkbp_patient(pred, ref, possible_dose_mask, structure_masks, voxel_dimensions, roi_names=data.OPENKBP_ROIS):
    """(sum|ref - pred| / |possible-dose mask|, [|ref - pred| per DVH metric]) of one patient; the reference's
    masks serve both doses."""
    pred, ref = np.asarray(pred, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    ref_dvh = openkbp_dvh(ref, structure_masks, voxel_dimensions, roi_names)
    pred_dvh = openkbp_dvh(pred, structure_masks, voxel_dimensions, roi_names)
    dose_error = float(np.abs(ref - pred).sum() / np.sum(possible_dose_mask))
    return dose_error, [abs(ref_dvh[k] - pred_dvh[k]) for k in ref_dvh]

def openkbp_aggregate(patients):
    """(dose score, DVH score): nanmean of the patients' dose errors, and of the whole patients x
    (metric, ROI) table of DVH errors (absent ROIs left out), as the official code does."""
    dose = [p[0] for p in patients]
    dvh = [e for p in patients for e in p[1]]
    return (float(np.mean(dose)) if dose else float("nan")), (float(np.mean(dvh)) if dvh else float("nan"))

def openkbp_scores(pred, ref, possible_dose_mask, structure_masks, voxel_dimensions, roi_names=data.OPENKBP_ROIS):
    """OpenKBP challenge dose and DVH scores (Babier et al. 2021) over lists of patients, on the doses
    as given (the official pipeline, like `evaluate`, first multiplies the prediction by the mask)."""
    return openkbp_aggregate([openkbp_patient(*p, roi_names=roi_names)
                              for p in zip(pred, ref, possible_dose_mask, structure_masks, voxel_dimensions)])

def dice(pred, ref, empty=1.0):
    """Dice coefficient 2|P&R| / (|P| + |R|) of two binary masks; `empty` when both are empty."""
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    total = pred.sum() + ref.sum()
    return float(empty) if total == 0 else float(2 * np.logical_and(pred, ref).sum() / total)

def roi_dice(pred_masks, ref_masks):
    """Per-ROI Dice of one patient; an ROI empty in the reference (not contoured) is NaN, not scored."""
    return np.array([dice(p, r) if np.any(r) else np.nan for p, r in zip(pred_masks, ref_masks)])

def isic_jaccard(preds, refs, threshold=0.65):
    """ISIC 2018 Task 1 thresholded Jaccard: per-image IoU (1 when both are empty), 0 below 0.65, averaged."""
    scores = []
    for p, r in zip(preds, refs):
        p, r = np.asarray(p, dtype=bool), np.asarray(r, dtype=bool)
        union = np.logical_or(p, r).sum()
        iou = 1.0 if union == 0 else np.logical_and(p, r).sum() / union
        scores.append(iou if iou >= threshold else 0.0)
    return float(np.mean(scores))

def balanced_accuracy(y_true, y_pred):
    """ISIC 2018 Task 3: mean per-class recall over the classes in y_true (sklearn's balanced_accuracy_score)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]))

def roc_auc(y_true, score, name="AUC"):
    """Area under the ROC curve: P(a random positive scores above a random negative), ties 1/2
    (sklearn's roc_auc_score). NaN or inf scores are an error; one class only gives NaN and a warning."""
    y = np.asarray(y_true).astype(bool).ravel()
    score = np.asarray(score, dtype=np.float64).ravel()
    if not np.isfinite(score).all():
        raise ValueError(f"{name}: {np.sum(~np.isfinite(score))} scores are NaN or inf")
    neg = np.sort(score[~y])
    if y.all() or not y.any():
        warnings.warn(f"{name} is NaN: " + (f"the {len(y)} cases hold one class only" if len(y) else "no cases"))
        return float("nan")
    below, not_above = np.searchsorted(neg, score[y], "left"), np.searchsorted(neg, score[y], "right")
    return float((below + not_above).sum() / 2 / (y.sum() * len(neg)))

def roc_auc_macro(y_true, prob, name="AUC"):
    """Macro one-vs-rest AUC over the classes present in y_true (ISIC 2018 Task 3 reports per-class AUC)."""
    y_true, prob = np.asarray(y_true), np.asarray(prob, dtype=np.float64)
    if not np.isfinite(prob).all():
        raise ValueError(f"{name}: {np.sum(~np.isfinite(prob))} scores are NaN or inf")
    return float(np.mean([roc_auc(y_true == k, prob[:, k], name) for k in np.unique(y_true)]))

def delta_mtl(metrics, stl_metrics, tasks):
    """Relative multi-task performance in percent (Maninis et al. 2019; Vandenhende et al. 2021; LibMTL's Delta_p):
    per task t the mean of (-1)^l (M - M_STL) / M_STL over its metrics (TASKS; l = 1 where lower is better), then
    the mean over tasks. Returns (overall, {task: percent}); metrics that are NaN, or 0 in STL, are left out."""
    per_task = {}
    for task in tasks:
        terms = [(-1 if k in LOWER_IS_BETTER else 1) * (metrics[k] - stl_metrics[k]) / stl_metrics[k]
                 for k in TASKS[task][1] if k in metrics and k in stl_metrics
                 and np.isfinite([metrics[k], stl_metrics[k]]).all() and stl_metrics[k] != 0]
        if terms:
            per_task[task] = 100.0 * float(np.mean(terms))
    return (float(np.mean(list(per_task.values()))) if per_task else float("nan")), per_task

def better(a, b, key):
    """Does value a (this epoch) beat the best so far, b? Anything beats None or NaN, and a tie goes to the later
    epoch (small validation sets saturate)."""
    if b is None or not np.isfinite(b):
        return True
    return bool(np.isfinite(a)) and (b - a if key in LOWER_IS_BETTER else a - b) >= 0

# === Losses (task weighting: ctan.Weighting) ===
def dose_l1(pred, target_gy, mask):
    """L1 between predicted and reference dose (units of DOSE_SCALE_GY) inside the possible-dose mask."""
    err = (pred - target_gy / DOSE_SCALE_GY).abs() * mask
    return err.sum() / mask.sum().clamp_min(1.0)

def bce_dice(logits, target, smooth=1.0):
    """Binary cross-entropy + soft Dice (per channel over the batch; smoothed so empty vs empty = 1)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits).transpose(0, 1).flatten(1)
    target = target.transpose(0, 1).flatten(1)
    soft_dice = (2 * (prob * target).sum(1) + smooth) / (prob.sum(1) + target.sum(1) + smooth)
    return bce + (1 - soft_dice.mean())

LOSSES = {  # (prediction, batch, task, class weights) -> scalar loss
    "dose_l1": lambda pred, batch, task, w: dose_l1(pred, batch[task], batch["possible_dose_mask"]),
    "bce_dice": lambda pred, batch, task, w: bce_dice(pred, batch[task]),
    "ce": lambda pred, batch, task, w: F.cross_entropy(pred, batch[task], weight=(w or {}).get(task)),
    "value": lambda pred, batch, task, w: pred.mean(),  # the model returns its loss per case
}

def task_losses(outputs, batch, tasks, class_weights=None):
    """{task: scalar loss} of a batch; each task's loss is named in TASKS."""
    return {t: LOSSES[TASKS[t][0]](outputs[t].float(), batch, t, class_weights) for t in tasks}

# === Data and model ===
def open_splits(cfg, log=print):
    """{split: Dataset} of the config's HDF5 file (augmented training split with --augment); sets cfg["tasks"] and
    cfg["roi_names"] from the file."""
    path, name = cfg["data"], cfg["dataset"]
    if Path(path).is_dir():  # e.g. the raw release's folder
        raise UserError(f"{path} is a folder: --data takes an HDF5 file; `python data.py convert {name} RAW_DIR --out "
                        "FILE` makes one from a raw release")
    if not Path(path).is_file():
        raise UserError(f"{path} not found: make it with `python data.py synth {name} --out {path}` (synthetic) "
                        f"or `python data.py convert {name} RAW_DIR --out {path}`")
    splits = {s: data.open_dataset(path, s, cfg["dims"], cfg["augment"] and s == "train") for s in data.SPLITS}
    if splits["train"].dataset != name:
        raise UserError(f"{path} holds {splits['train'].dataset}, not {name} (check --data)")
    if not all(ds.num_cases for ds in splits.values()):
        raise UserError(f"{path}: a split is empty ({', '.join(f'{s} {d.num_cases}' for s, d in splits.items())})")
    if cfg.get("data_digest", splits["train"].digest) != splits["train"].digest:  # --resume: the run's last.pt has it
        raise UserError(f"{path} changed since this run began (other content): resume it on the file it was made "
                        "with, or start over with --overwrite")
    cfg.update(tasks=splits["train"].tasks, roi_names=splits["train"].roi_names, data_digest=splits["train"].digest)
    log("config: " + json.dumps(cfg))
    if splits["train"].synthetic:
        log(f"!! WARNING: {path} is a SYNTHETIC stand-in, not the real {name} data: its metrics say nothing "
            "about the paper's results or about real patients !!")
    return splits

def build_model(cfg, tasks, in_channels):
    """The network of cfg['arch'] (ctan.build_model), seeded: the same config starts the same."""
    torch.manual_seed(cfg["seed"])
    options = {"transition": cfg["transition"]} if cfg["arch"] in ("mtan", "ctan") else {}
    try:
        return ctan.build_model(cfg["arch"], tasks, in_channels, dims=cfg["dims"], width=cfg["width"],
                                depth=cfg["depth"], checkpointing=cfg["checkpointing"], **options)
    except ValueError as e:  # an impossible combination of options (e.g. depth 1 with mtan)
        raise UserError(f"cannot build {cfg['arch']}: {e}") from None

def distributed():
    """(rank, world size, local rank) of this process: torchrun sets them; (0, 1, 0) otherwise."""
    return tuple(int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))

def memory_format(cfg):
    channels_last = torch.channels_last if cfg["dims"] == 2 else torch.channels_last_3d
    return channels_last if cfg["channels_last"] else torch.contiguous_format

def make_run(cfg, model, splits, steps_per_epoch=None):
    """What a training run holds: the model on its device (`run.model`, whose state_dict checkpoints
    keep), what the step calls (`run.net`: DDP under torchrun, then torch.compile'd with --compile),
    task weighting, AdamW over the trainable parameters, a cosine schedule, the splits."""
    torch.manual_seed(cfg["seed"])
    rank, world, local_rank = distributed()
    device = torch.device(cfg["device"], local_rank) if cfg["device"] == "cuda" else torch.device(cfg["device"])
    torch.backends.cudnn.benchmark = device.type == "cuda"  # autotuned convolutions (not bit-reproducible)
    model = model.to(device, memory_format=memory_format(cfg))
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if cfg["compile"]:
        import torch._inductor.config as inductor_config
        inductor_config.fallback_random = True  # dropout draws as in eager mode: the same losses
        net = torch.compile(net, dynamic=False)
    weighting = ctan.Weighting(cfg["weighting"], cfg["tasks"]).to(device)
    params = [p for p in model.parameters() if p.requires_grad] + list(weighting.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"], fused=device.type == "cuda")
    steps_per_epoch = steps_per_epoch or min(max(1, len(splits["train"]) // (cfg["batch_size"] * world)),
                                             cfg["max_steps_per_epoch"] or 10**9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps_per_epoch * cfg["epochs"])
    run = SimpleNamespace(cfg=cfg, device=device, model=model, net=net, weighting=weighting, optimizer=optimizer,
                          scheduler=scheduler, steps_per_epoch=steps_per_epoch, class_weights=None, rank=rank,
                          world=world, **{f"{s}_ds": ds for s, ds in (splits or {}).items()})
    if splits:
        run.class_weights = class_weights_from(splits["train"], cfg["tasks"], device) if cfg["class_weights"] else None
        init_output_bias(model, splits["train"], cfg["tasks"], n_items=64 if cfg["dims"] == 2 else 8)
    return run

def class_weights_from(ds, tasks, device):
    """Inverse-frequency class weights (mean 1 over the classes present) of each classification task."""
    out = {}
    for t in (t for t in tasks if TASKS[t][0] == "ce"):
        counts = np.bincount(ds.labels(t), minlength=tasks[t][1])
        w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(counts), 0.0)
        out[t] = torch.tensor(w / w[w > 0].mean(), dtype=torch.float32, device=device)
    return out

@torch.no_grad()
def init_output_bias(model, ds, tasks, n_items=64):
    """Prior initialisation of the pixel heads' output bias (ours; Lin et al., ICCV 2017): segmentation logits
    at the mean foreground fraction per channel, dose at the mean scaled dose in the possible-dose mask, from
    n_items training items. Without it small ROIs (0.1-1 % of voxels) take thousands of steps to reach ~-6."""
    tasks = [t for t in tasks if TASKS[t][0] in ("bce_dice", "dose_l1") and t in getattr(model, "heads", {})]
    items = [ds[int(i)] for i in np.unique(np.linspace(0, len(ds) - 1, min(n_items, len(ds))).round())] if tasks else []
    for t in tasks:
        target = torch.stack([it[t] for it in items]).transpose(0, 1).flatten(1).double()  # (C, N)
        if TASKS[t][0] == "dose_l1":
            mask = torch.stack([it["possible_dose_mask"] for it in items]).flatten().double()
            value = (target * mask).sum(1) / mask.sum().clamp_min(1) / DOSE_SCALE_GY
        else:
            value = torch.logit(target.mean(1).clamp(1e-4, 0.5))
        model.heads[t].out.bias.copy_(value)

# === Training: one step, one epoch, `fit` ===
def to_device(batch, run, keys=None):
    """The tensors of a batch (or those of `keys`) on the device, non-blocking from pinned memory;
    bool masks become 0/1 floats there (they travel 4x smaller); the model's input in its memory format."""
    out = {k: batch[k].to(run.device, non_blocking=True) for k in keys or batch if torch.is_tensor(batch[k])}
    out = {k: v.float() if v.dtype == torch.bool else v for k, v in out.items()}
    if run.cfg.get("superior_input"):  # guidance: CT + the R structure masks
        out["image"] = torch.cat([out["image"], out["structures"]], 1)
    return out | {"image": out["image"].contiguous(memory_format=memory_format(run.cfg))}

def forward(run, batch, net=None):
    """The network on a batch's image, under bf16 autocast when cfg['precision'] is bf16."""
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.cfg["precision"] == "bf16"):
        return (run.model if net is None else net)(batch["image"])

def all_reduce_mean(tensor, run):
    """Mean over the processes of a tensor on the model's device (NCCL serves CUDA tensors only)."""
    assert tensor.device == run.device, (tensor.device, run.device)
    torch.distributed.all_reduce(tensor)
    return tensor / run.world

def train_step(run, batch):
    """One optimisation step on a batch on the device. Returns ({task: loss}, total), not synchronised."""
    losses = task_losses(forward(run, batch, run.net), batch, run.cfg["tasks"], run.class_weights)
    total = run.weighting(losses)
    run.optimizer.zero_grad(set_to_none=True)
    total.backward()
    for p in run.weighting.parameters() if run.world > 1 else []:  # learnable loss weights live outside DDP
        p.grad = all_reduce_mean(p.grad, run)
    run.optimizer.step()
    run.scheduler.step()
    return losses, total

def train_loader(run):
    """One loader for the run (workers persist between epochs); the order depends on (seed, epoch) alone, so a
    resumed run sees the same batches; under torchrun each process takes a disjoint 1/world of them."""
    sampler = torch.utils.data.DistributedSampler(run.train_ds, run.world, run.rank, shuffle=True, seed=run.cfg["seed"])
    return torch.utils.data.DataLoader(run.train_ds, batch_size=run.cfg["batch_size"], sampler=sampler,
                                       drop_last=len(sampler) > run.cfg["batch_size"], num_workers=run.cfg["workers"],
                                       pin_memory=run.device.type == "cuda", persistent_workers=run.cfg["workers"] > 0)

def train_one_epoch(run, loader, epoch, log):
    """At most steps_per_epoch steps. The losses are summed on the device (no synchronisation per
    step) and checked once: a non-finite loss stops the run, last.pt still at the previous epoch."""
    run.model.train()
    loader.sampler.set_epoch(epoch)
    tasks, steps, t0, last_log = list(run.cfg["tasks"]), 0, time.time(), time.time()
    sums = torch.zeros(len(tasks) + 1, device=run.device)
    for batch in loader:
        if steps == run.steps_per_epoch:
            break
        losses, total = train_step(run, to_device(batch, run))
        sums += torch.stack([losses[t].detach().float() for t in tasks] + [total.detach().float()])
        steps += 1
        if time.time() - last_log > run.cfg["log_every"] and steps < run.steps_per_epoch:
            last_log, elapsed = time.time(), time.time() - t0
            eta = datetime.timedelta(seconds=round(elapsed / steps * (run.steps_per_epoch - steps)))
            log(f"  epoch {epoch} step {steps}/{run.steps_per_epoch} loss {sums[-1].item() / steps:.4f} "
                f"{steps * run.cfg['batch_size'] / elapsed:.1f} samples/s epoch ETA {eta}")
    means = ((all_reduce_mean(sums, run) if run.world > 1 else sums) / max(steps, 1)).tolist()
    if not np.isfinite(means).all():
        raise UserError(f"non-finite loss at epoch {epoch} ({', '.join(f'{t} {v:.4g}' for t, v in zip(tasks, means))});"
                        f" stopped; {Path(run.cfg['out']) / 'last.pt'} holds epoch {epoch - 1} if any (try lower --lr)")
    elapsed = time.time() - t0
    return {"losses": dict(zip(tasks, means)), "loss": means[-1], "time_s": elapsed,
            "samples_per_s": steps * run.cfg["batch_size"] * run.world / max(elapsed, 1e-9)}

def fit(run, log=print):
    """Train for cfg['epochs'] epochs (from last.pt with --resume), validating after each: writes metrics.jsonl,
    last.pt (all it takes to resume), best.pt (best validation epoch) and predictions/ (first and last epoch).
    Returns the best validation record. Under torchrun every process trains; process 0 validates and writes."""
    cfg, out = run.cfg, Path(run.cfg["out"])
    select, start, best = cfg["select"], 0, {"epoch": None, "value": None, "metrics": None}
    jsonl = out / "metrics.jsonl"
    if cfg["resume"]:
        ck = load_checkpoint(out / "last.pt", **{part: getattr(run, part) for part in RESUMED})
        torch.set_rng_state(ck["rng"])
        start, best = ck["epoch"], ck["best"]
        if run.rank == 0 and best["epoch"] == start:  # best.pt may not have been written after last.pt
            atomic_write({"model": ck["model"], "epoch": start, "config": ck["config"]}, out / "best.pt")
        if run.rank == 0 and jsonl.exists():  # the epochs after last.pt's are done again
            kept = [line for line in jsonl.read_text().splitlines() if json.loads(line)["epoch"] <= start]
            atomic_write("".join(line + "\n" for line in kept), jsonl)
        log(f"resumed from {out / 'last.pt'} after epoch {start}")
    loader, t_run, keys = train_loader(run), time.time(), [k for t in cfg["tasks"] for k in TASKS[t][1]]
    for epoch in range(start + 1, cfg["epochs"] + 1):
        stats = train_one_epoch(run, loader, epoch, log)
        run.weighting.end_epoch(stats["losses"])
        if run.rank == 0:
            preview = out / "predictions" if epoch in (1, cfg["epochs"]) else None
            val, notes = evaluate(run, run.val_ds, cfg["max_eval_cases"], preview_dir=preview)
            for note in notes:
                log(f"WARNING: validation {note}")
            if better(val[select], best["value"], select):
                best = {"epoch": epoch, "value": val[select], "metrics": val}
            atomic_write({**{part: getattr(run, part).state_dict() for part in RESUMED}, "epoch": epoch, "best": best,
                          "rng": torch.get_rng_state(), "config": cfg}, out / "last.pt")
            if best["epoch"] == epoch:  # after last.pt: an interrupt in between is repaired on --resume
                atomic_write({"model": run.model.state_dict(), "epoch": epoch, "config": cfg}, out / "best.pt")
            record = {"epoch": epoch, **stats, "weights": run.weighting.weights(),
                      "lr": run.optimizer.param_groups[0]["lr"], "val": val}
            with jsonl.open("a") as f:
                f.write(json.dumps(record) + "\n")
            eta = datetime.timedelta(seconds=round((time.time() - t_run) / (epoch - start) * (cfg["epochs"] - epoch)))
            log(f"epoch {epoch}/{cfg['epochs']} loss {stats['loss']:.4f} "
                + " ".join(f"{t} {v:.4f}" for t, v in stats["losses"].items()) + " | val "
                + " ".join(f"{k} {val[k]:.4f}" for k in keys) + f" | {stats['samples_per_s']:.1f} samples/s "
                f"{stats['time_s']:.1f}s ETA {eta}")
        if run.world > 1:
            torch.distributed.barrier()  # the others wait while process 0 validates and writes
        if cfg.get("stop_after") and cfg["stop_after"] <= epoch < cfg["epochs"]:
            log(f"stopping after epoch {epoch} (--stop-after); continue with --resume")
            return dict(best, stopped_after=epoch)
    return best

# === Evaluation ===
@torch.no_grad()
def predict(run, ds, max_cases=None):
    """Yields (case in stored units, {task: float32 prediction of the whole case}) of the first `max_cases` cases
    (default all) in case order: the axial slices of a 2D run are put back on their index (data.axial_slice).
    Items read the model's inputs alone, which go to the device; the targets are read once a case (ds.case)."""
    run.model.eval()
    reader = copy.copy(ds)
    reader.only = ("image", "structures") if run.cfg.get("superior_input") else ("image",)
    n_slices, pending = len(ds) // max(ds.num_cases, 1), {}
    items = range(n_slices * min(max_cases or ds.num_cases, ds.num_cases))  # the first cases: items are case-major
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(reader, items), batch_size=4 * run.cfg["batch_size"],
                                         num_workers=run.cfg["workers"], generator=torch.Generator())  # no global RNG
    for batch in loader:  # no gradients: 4x the batch
        out = {t: v.float().cpu().numpy() for t, v in forward(run, to_device(batch, run, reader.only)).items()}
        for j, (c, k) in enumerate(zip(batch["case"].tolist(), batch["slice"].tolist())):
            if k < 0:
                yield ds.case(c), {t: v[j] for t, v in out.items()}
                continue
            p = pending.setdefault(c, {t: np.zeros((*v.shape[1:2], n_slices, *v.shape[2:]), np.float32)
                                       for t, v in out.items()} | {"seen": 0})
            for t, v in out.items():
                p[t][data.axial_slice(k) if v.ndim > 2 else k] = v[j]  # maps, or one value per slice
            p["seen"] += 1
            if p["seen"] == n_slices:
                yield ds.case(c), {t: v for t, v in pending.pop(c).items() if t != "seen"}

def evaluate(run, ds, max_cases=None, preview_dir=None, n_preview=3):
    """(metrics, notes) of a split: the metrics of TASKS (and Dice per ROI), one note per warning about the data
    (e.g. an AUC that is NaN because the split holds one class), PNG previews of the first cases.
    `max_cases` keeps the first cases (all slices of them in 2D)."""
    previews = [Path(preview_dir) / f"{i}.png" for i in range(n_preview)] if preview_dir else []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluator = EVALUATORS["guidance" if "guidance" in run.cfg["tasks"] else run.cfg["dataset"]]
        metrics = evaluator(run.cfg, predict(run, ds, max_cases), previews)
    library = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)  # about the installed versions
    return {k: float(v) for k, v in metrics.items()}, sorted({str(w.message) for w in caught
                                                              if not issubclass(w.category, library)})

def _evaluate_rt(cfg, cases, previews):
    """Dose and structures scored per patient on whole volumes. The dose is multiplied by the
    possible-dose mask first, as the official pipeline does; a dose-only model (guidance) gets no Dice."""
    patients, dices = [], []
    for i, (raw, pred) in enumerate(cases):
        dose = pred["dose"][0] * DOSE_SCALE_GY * raw["possible_dose_mask"]
        masks = pred["structures"] > 0 if "structures" in pred else np.zeros_like(raw["structures"])
        patients.append(openkbp_patient(dose, raw["dose"], raw["possible_dose_mask"], raw["structures"],
                                        raw["voxel_dimensions"], roi_names=cfg["roi_names"]))
        dices.append(roi_dice(masks, raw["structures"]))
        if i < len(previews):
            save_rt_preview(previews[i].with_stem(raw["id"]), raw, dose, masks)
    metrics = dict(zip(("dose_score", "dvh_score"), openkbp_aggregate(patients)))
    if "structures" in cfg["tasks"]:
        per_roi = [np.mean(d[np.isfinite(d)]) if np.isfinite(d).any() else np.nan for d in np.array(dices).T]
        metrics["dice"] = float(np.nanmean(per_roi)) if np.isfinite(per_roi).any() else float("nan")
        metrics.update({f"dice_{r}": v for r, v in zip(cfg["roi_names"], per_roi)})
    return metrics

def _evaluate_ham(cfg, cases, previews):
    """Lesion masks at the stored resolution; diagnosis by argmax (balanced accuracy) and softmax (AUC)."""
    masks, refs, y, prob = [], [], [], []
    for i, (raw, pred) in enumerate(cases):
        masks.append(pred["segmentation"][0] > 0)
        refs.append(raw["segmentation"])
        y.append(raw["diagnosis"])
        prob.append(torch.softmax(torch.from_numpy(pred["diagnosis"]), 0).numpy())
        if i < len(previews):
            rgb, k = raw["image"], int(np.argmax(prob[-1]))
            labels = ["image", f"truth {data.HAM_CLASSES[y[-1]]}", f"pred {data.HAM_CLASSES[k]} {prob[-1][k]:.2f}"]
            save_panels(previews[i].with_stem(raw["id"]), [rgb, overlay(rgb, refs[-1][None]),
                                                           overlay(rgb, masks[-1][None])], labels)
    return {"dice": np.mean([dice(p, r) for p, r in zip(masks, refs)]), "isic_jaccard": isic_jaccard(masks, refs),
            "balanced_accuracy": balanced_accuracy(y, np.argmax(prob, 1)), "auc": roc_auc_macro(y, prob, "auc")}

def _evaluate_stoic(cfg, cases, previews):
    """STOIC 2021: AUC of severe among the COVID-positive cases (the challenge metric), AUC of COVID."""
    y, p = {"covid": [], "severe": []}, {"covid": [], "severe": []}
    for i, (raw, pred) in enumerate(cases):
        for t in y:
            y[t].append(raw[t])
            p[t].append(float(torch.softmax(torch.from_numpy(pred[t]), 0)[1]))
        if i < len(previews):  # the middle axial slice (axis 0 = z)
            save_panels(previews[i].with_stem(raw["id"]), [grey(raw["image"][len(raw["image"]) // 2])],
                        [" ".join(f"{t} {y[t][-1]} ({p[t][-1]:.2f})" for t in y)])
    covid, severe = np.array(y["covid"]) == 1, np.array(y["severe"])
    return {"auc_severe": roc_auc(severe[covid], np.array(p["severe"])[covid], "auc_severe (among COVID-positive)"),
            "auc_covid": roc_auc(covid, p["covid"], "auc_covid")}

EVALUATORS = {"openkbp": _evaluate_rt, "prostate": _evaluate_rt, "ham10000": _evaluate_ham, "stoic": _evaluate_stoic,
              "guidance": lambda cfg, cases, previews: {"guidance_mse": np.mean([p["guidance"] for _, p in cases])}}

# === Outputs: previews (pillow + numpy), atomic files, checkpoints, results ===
_CMAP = np.array([[48, 18, 59], [70, 131, 249], [27, 208, 213], [97, 252, 108],
                  [210, 233, 53], [254, 155, 45], [217, 56, 6], [122, 4, 3]], np.float64)  # turbo-like
_ROI_COLOURS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                         [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]])

def colour_map(x):
    """Values in [0, 1] -> RGB uint8, interpolated between the _CMAP anchors."""
    anchors = np.linspace(0, 1, len(_CMAP))
    return np.stack([np.interp(np.nan_to_num(x), anchors, _CMAP[:, c]) for c in range(3)], -1).astype(np.uint8)

def grey(image):
    """A 2D image in any units to grey RGB uint8, scaled between its 0.5 and 99.5 percentiles."""
    image = np.asarray(image, np.float64)
    lo, hi = np.percentile(image, [0.5, 99.5])
    return (np.repeat(((image - lo) / max(hi - lo, 1e-6)).clip(0, 1)[..., None], 3, -1) * 255).astype(np.uint8)

def overlay(rgb, masks, alpha=0.45):
    """Binary masks (R, H, W) as coloured overlays on an RGB uint8 image."""
    out = rgb.astype(np.float64)
    for r, m in enumerate(masks):
        out[m] = (1 - alpha) * out[m] + alpha * _ROI_COLOURS[r % len(_ROI_COLOURS)]
    return out.astype(np.uint8)

def save_panels(path, panels, labels):
    """Side-by-side RGB panels, each with its caption above, as one PNG."""
    h = max(p.shape[0] for p in panels)
    strip = np.concatenate([np.pad(p, ((0, h - p.shape[0]), (0, 2), (0, 0))) for p in panels], 1)
    scale = max(1, 256 // h)
    img = Image.fromarray(strip).resize((strip.shape[1] * scale, h * scale), Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (max(img.width, 7 * len(labels[-1]) + 8), img.height + 14), "black")
    canvas.paste(img, (0, 14))
    x = 0
    for p, label in zip(panels, labels):
        ImageDraw.Draw(canvas).text((x + 2, 1), label, fill="white")
        x += (p.shape[1] + 2) * scale
    atomic_write(canvas, path)

def save_rt_preview(path, raw, pred_dose, pred_structures):
    """The axial slice with the most reference dose: CT | dose | predicted dose | Gy scale | ROIs | predicted ROIs."""
    z = data.axial_slice(int(np.argmax(raw["dose"].sum((-2, -1)))))
    ct, vmax = grey(raw["image"][z]), max(float(raw["dose"].max()), 1e-6)
    bar = np.repeat(colour_map(np.linspace(1, 0, ct.shape[0]))[:, None], max(4, ct.shape[1] // 16), 1)
    panels = [ct, colour_map(raw["dose"][z] / vmax), colour_map(pred_dose[z] / vmax), bar,
              overlay(ct, raw["structures"][z]), overlay(ct, pred_structures[z])]
    save_panels(path, panels, ["CT", "dose", "pred", f"0-{vmax:.0f} Gy", "ROIs", "pred"])

def atomic_write(obj, path):
    """Write a checkpoint (dict), JSON (list or str) or PNG (PIL image) to a temporary file, then
    rename it: an interrupted write never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if path.suffix == ".pt":
            torch.save(obj, tmp)
        elif path.suffix == ".png":
            obj.save(tmp, format="PNG")
        else:
            tmp.write_text(obj if isinstance(obj, str) else json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

def load_checkpoint(path, **parts):
    """A train.py checkpoint (tensors and plain values only: weights_only loading), its states loaded into the
    `parts` given (model=..., and for --resume the rest of RESUMED); one line if it is missing, truncated, not
    ours or another model's."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path} not found") from None
    except Exception as e:
        why = (str(e).strip() or type(e).__name__).splitlines()[0][:120]  # an empty file: an empty message
        raise UserError(f"{path} is not a readable checkpoint ({why}): it is truncated or damaged; use another one or "
                        "train again") from None
    if not isinstance(ck, dict) or not {"model", "config", "epoch"} <= set(ck):
        raise UserError(f"{path} is not a train.py checkpoint (it lacks model, config or epoch)")
    try:
        for name, part in parts.items():
            part.load_state_dict(ck[name])
    except (KeyError, RuntimeError, ValueError) as e:  # ValueError: ctan.py's check of the task order
        raise UserError(f"{path} holds another model ({str(e).splitlines()[0]}): it was made with other model "
                        "options, another data file or another version of the code (its config is in it)") from None
    return ck

def test(run, ckpt_path, log=print):
    """(metrics, epoch, notes) on the test split with the weights of ckpt_path (best.pt: picked on validation)."""
    ck = load_checkpoint(ckpt_path, model=run.model)
    metrics, notes = evaluate(run, run.test_ds)
    keys = [k for t in run.cfg["tasks"] for k in TASKS[t][1]]
    log(f"test ({Path(ckpt_path).name}, epoch {ck['epoch']}): " + " ".join(f"{k} {metrics[k]:.4f}" for k in keys))
    for note in notes:
        log(f"WARNING: test {note}")
    return metrics, ck["epoch"], notes

def matching_stl(cfg, results):
    """(the STL run's results, None) if it was made on the same data content, dims and split as this
    run, else (None, why). The STL run is --stl, or the run folder of this data with arch stl."""
    path = Path(cfg.get("stl") or Path(cfg["out"]).parent / run_name(cfg, "stl"))
    path = path / "results.json" if path.is_dir() else path
    if cfg["arch"] == "stl" or cfg["arch"].startswith("guidance "):
        return None, "an STL run or a guidance stage is not compared with STL"
    try:
        stl = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        why = "not found" if isinstance(e, FileNotFoundError) else "unreadable"
        return None, f"STL results {path} {why}: train --arch stl on this --data, or name them with --stl"
    if stl.get("arch") != "stl":
        return None, f"{path} is a run of {stl.get('arch')!r}, not of stl: name an STL run with --stl"
    for key in ("dataset", "synthetic", "data_digest", "dims", "split"):
        if stl.get(key) != results[key]:
            return None, f"{path} has {key}={stl.get(key)!r}, this run {results[key]!r}: not comparable"
    return stl, None

def report(run, metrics, best, epoch, notes, log=print, name="results.json"):
    """results.json: test metrics, where they come from (data digest, dims, split), the config,
    the best validation epoch, and Delta_MTL against the matching STL run."""
    cfg, ds = run.cfg, run.test_ds
    results = {"dataset": cfg["dataset"], "arch": cfg["arch"], "data": cfg["data"], "data_digest": ds.digest,
               "synthetic": ds.synthetic, "dims": cfg["dims"], "split": "test", "test": metrics, "test_epoch": epoch,
               "best_val": best, "warnings": notes, "config": cfg, "delta_mtl": None}
    stl, why = matching_stl(cfg, results)
    if stl:
        results["delta_mtl"], results["delta_mtl_per_task"] = delta_mtl(metrics, stl["test"], cfg["tasks"])
        left_out = [t for t in cfg["tasks"] if t not in results["delta_mtl_per_task"]]
        why = (f"tasks left out (none of their metrics finite and non-zero in STL): {', '.join(left_out)}"
               if left_out else None)
        log(f"Delta_MTL vs {stl['config']['out']}: {results['delta_mtl']:+.2f}% ("
            + ", ".join(f"{t} {v:+.2f}%" for t, v in results["delta_mtl_per_task"].items()) + ")")
    elif "guidance" not in why:
        log(f"no Delta_MTL: {why}")
    results["delta_mtl_note"] = why
    atomic_write(results, Path(cfg["out"]) / name)
    log(f"results: {Path(cfg['out']) / name}")
    return results

# === Deep multimodal guidance (Mallya & Hamarneh, MICCAI 2022) for dose: --arch guidance ===
# Superior input = CT + the R expert ROI masks, inferior input = CT alone (ours: the paper guides
# classifiers). Each stage is a run of its own in OUT/<stage>/, trained by `fit` like any arch;
# (c) and (d) read the CT only. README "Deep multimodal guidance" describes the stages.
GUIDANCE = {"a_inferior": "CT", "a_superior": "CT + ROI masks", "b_guidance": "G: CT features -> CT + masks",
            "c_guided": "CT: superior decoder on G(f)", "d_combined": "CT: new decoder on [f ; G(f)]"}
DOSE_TASK = {"dose": ("pixel", 1)}

def stage_model(cfg, entry, n_rois):
    """The model of a guidance stage, built on the earlier stages' best.pt (loaded and frozen)."""
    if entry.startswith("a_"):
        return build_model(dict(cfg, arch="stl"), DOSE_TASK, 1 if entry == "a_inferior" else 1 + n_rois)
    inferior = load_stage(cfg, "a_inferior", n_rois)
    if entry == "b_guidance":
        guidance = ctan.GuidanceNetwork(cfg["dims"], inferior.encoders["dose"].channels)
        return ctan.GuidanceObjective(inferior, load_stage(cfg, "a_superior", n_rois), guidance)
    guidance = load_stage(cfg, "b_guidance", n_rois).guidance
    if entry == "c_guided":
        return ctan.GuidedModel(inferior, guidance, load_stage(cfg, "a_superior", n_rois).heads).eval()
    return ctan.GuidedModel(inferior, guidance)

def load_stage(cfg, entry, n_rois):
    """The frozen model of an earlier stage from OUT/entry/best.pt; one line naming the command that makes it."""
    path = Path(cfg["guidance_out"]) / entry / "best.pt"
    if not path.exists():
        raise UserError(f"{path} not found: stage {entry[0]} makes it; run `python train.py --dataset {cfg['dataset']} "
                        f"--arch guidance --stage {entry[0]} --data {cfg['data']} --out {cfg['guidance_out']}` first")
    model = stage_model(cfg, entry, n_rois)
    load_checkpoint(path, model=model)
    return model.eval().requires_grad_(False)

def run_guidance(cfg, log=print):
    """The stages of --arch guidance in order (or --stage X alone; with --resume the unfinished ones),
    then OUT/results.json {"guidance": {stage: test metrics}} and a side-by-side table in the log."""
    splits = open_splits(cfg, log)
    results = {}
    for entry, reads in GUIDANCE.items():
        sub = dict(cfg, out=str(Path(cfg["out"]) / entry), arch=f"guidance {entry}", tasks=DOSE_TASK,
                   select="dose_score", guidance_out=cfg["out"], superior_input=entry in ("a_superior", "b_guidance"))
        done = Path(sub["out"]) / "results.json"
        if cfg["stage"] not in ("all", entry[0]) or (cfg["resume"] and done.exists()):
            results.update({entry: json.loads(done.read_text())["test"]} if done.exists() else {})
            continue
        sub["resume"] = cfg["resume"] and (Path(sub["out"]) / "last.pt").exists()
        if entry == "b_guidance":
            sub.update(tasks={"guidance": ("value", 1)}, select="guidance_mse")
        model = stage_model(sub, entry, len(cfg["roi_names"]))
        log(f"stage {entry} ({reads}): {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M "
            "trained parameters")
        if entry == "c_guided":  # nothing to train: scored as built
            run = SimpleNamespace(cfg=sub, device=torch.device(cfg["device"]), model=model.to(cfg["device"]),
                                  test_ds=splits["test"])
            metrics, notes = evaluate(run, splits["test"])
            results[entry] = report(run, metrics, None, None, notes, log)["test"]
            continue
        out = experiment(sub, model, splits, log)
        if "stopped_after" in out:
            return out
        results[entry] = out["test"]
    results.pop("b_guidance", None)
    table = [f"{e:12s} {GUIDANCE[e]:30s} {m['dose_score']:10.3f} {m['dvh_score']:10.3f}" for e, m in results.items()]
    log(f"test split, {splits['test'].num_cases} patients: OpenKBP dose and DVH scores (Gy, lower is better)\n"
        f"{'stage':12s} {'input at inference':30s} {'dose score':>10s} {'DVH score':>10s}\n" + "\n".join(table))
    guided = {"dataset": cfg["dataset"], "arch": "guidance", "data_digest": splits["test"].digest,
              "guidance": results, "config": cfg}
    atomic_write(guided, Path(cfg["out"]) / "results.json")
    log(f"results: {Path(cfg['out']) / 'results.json'}")
    return guided

# === Benchmark (--bench): training steps at the data file's item size, several archs interleaved ===
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}  # dense bf16, datasheets

def memory_estimate_gib(cfg, shape):
    """fp32 GiB of what autograd saves for the backward pass, plus weights, gradients and AdamW
    states, from one forward on the meta device (no memory used; before cuDNN workspaces)."""
    with torch.device("meta"):
        model, x = build_model(cfg, cfg["tasks"], shape[1]), torch.empty(shape)
    saved = [16 * sum(p.numel() for p in model.parameters())]
    def pack(t):
        saved[0] += 0 if t.is_leaf and t.requires_grad else t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return round(saved[0] / 2**30, 2)

def timed_step(run, next_batch):
    """(seconds spent getting the batch, seconds of the whole step), the device synchronised."""
    t0 = time.perf_counter()
    batch = next_batch()
    t1 = time.perf_counter()
    train_step(run, batch)
    torch.cuda.synchronize() if run.device.type == "cuda" else None
    return t1 - t0, time.perf_counter() - t0

CPU_ATTENTION_FLOPS = {  # flop_counter counts no attention on a CPU: its CPU kernels get the GPU kernels' formulas
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *_, **__: flop_counter.sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *_, **__: flop_counter.sdpa_backward_flop_count(g, q, k, v)}

def bench(cfg, log=print):
    """Times --steps training steps (after a warm-up) of every arch of --arch a,b,... interleaved in one
    process, on random tensors already on the device, of the --data file's item size (without a file, the dataset's
    default); with a file, the first arch through the DataLoader too (data-wait fraction) and the loader alone (the
    rate it can feed). One JSON line per arch (FLOPs from torch.utils.flop_counter, TFLOP/s, MFU where the peak
    is known), then one of time and FLOP ratios to the first arch. Asserts no time."""
    name, archs, cuda = cfg["dataset"], cfg["arch"].split(","), cfg["device"] == "cuda"
    cfg = dict(cfg, tasks=data.task_spec(name, len(data.SPECS[name].rois)))
    if not Path(cfg["data"]).is_file() and cfg["data"] not in ("none", str(data.default_path(name))):
        raise UserError(f"--data {cfg['data']} is not a file: name an HDF5 file, or time random tensors: --data none")
    ds = open_splits(cfg, log)["train"] if Path(cfg["data"]).is_file() else None  # sets cfg's tasks, ROIs; not empty
    shape = (cfg["batch_size"], data.in_channels(name), *(ds.spatial if ds else DEFAULTS[name]["size"][-cfg["dims"]:]))
    runs = [make_run(dict(cfg, arch=a), build_model(dict(cfg, arch=a), cfg["tasks"], shape[1]), None, 10**6)
            for a in archs]
    batch = {"image": torch.randn(shape), "possible_dose_mask": torch.ones(shape[0], 1, *shape[2:])}
    for t, (kind, n) in cfg["tasks"].items():
        batch[t] = torch.randint(0, n, shape[:1]) if kind == "image" else (torch.rand(shape[0], n, *shape[2:]) < 0.1)
    batch = to_device(batch | ({"dose": 70.0 * batch["dose"]} if "dose" in batch else {}), runs[0])
    warmup, steps = max(3, cfg["steps"] // 4), cfg["steps"]
    for run in runs:
        torch.cuda.reset_peak_memory_stats() if cuda else None
        resident = torch.cuda.memory_allocated() if cuda else 0  # the other archs' weights and optimizer states
        with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:  # eager:
            train_step(SimpleNamespace(**{**vars(run), "net": run.model}), batch)  # compile skips code run under a mode
        timed_step(run, lambda: batch)  # the first step of what is timed (--compile: compiled here)
        run.flops, run.peak = counter.get_total_flops(), (torch.cuda.max_memory_allocated() - resident) / 2**30
    log(f"bench: {', '.join(archs)} on random {shape} ({cfg['device']}, {cfg['precision']}), {warmup} + {steps} steps "
        "each, interleaved")
    times = np.array([[timed_step(run, lambda: batch)[1] for run in runs] for _ in range(warmup + steps)])[warmup:]
    device = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    peak = cfg["peak_tflops"] or next((v for k, v in PEAK_TFLOPS.items() if k in device and cuda), None)
    results = []
    for arch, run, sec in zip(archs, runs, np.median(times, 0)):
        results.append({"bench": name, "arch": arch, "dims": cfg["dims"], "device": device, "input": list(shape),
                        **{k: cfg[k] for k in ("precision", "channels_last", "compile", "width", "steps")},
                        "depth": list(cfg["depth"]), "params": sum(p.numel() for p in run.model.parameters()),
                        "ms_per_step": round(1000 * sec, 2), "samples_per_s": round(shape[0] / sec, 2),
                        "gflop_per_step": round(run.flops / 1e9, 2), "tflops": round(run.flops / sec / 1e12, 4),
                        "mfu": peak and round(run.flops / sec / 1e12 / peak, 4),
                        "peak_memory_gib": round(run.peak, 2) if cuda else None,
                        "estimated_memory_gib": memory_estimate_gib(dict(cfg, arch=arch), shape)})
    if ds and len(ds) >= shape[0]:
        loader = torch.utils.data.DataLoader(ds, batch_size=shape[0], shuffle=True, drop_last=True,
                                             num_workers=cfg["workers"], pin_memory=cuda)
        batches = (b for _ in iter(int, 1) for b in loader)  # endless
        wait, total = np.sum([timed_step(runs[0], lambda: to_device(next(batches), runs[0]))
                              for _ in range(warmup + steps)][warmup:], 0)
        for _ in range((loader.prefetch_factor or 0) * cfg["workers"]):  # empty the prefetch queue, then time
            next(batches)
        t = time.perf_counter()
        for _ in range(steps):
            next(batches)
        loader_rate = steps * shape[0] / (time.perf_counter() - t)
        results[0]["hdf5"] = {"file": cfg["data"], "workers": cfg["workers"],
                              "samples_per_s": round(steps * shape[0] / total, 2),
                              "data_wait_fraction": round(wait / total, 4),
                              "loader_samples_per_s": round(loader_rate, 2)}
    ms, gflop = (np.array([r[key] for r in results]) for key in ("ms_per_step", "gflop_per_step"))
    ratios = {r["arch"]: {"time": round(t, 3), "flops": round(f, 3), "time_over_flops": round(t / f, 3)}
              for r, t, f in zip(results, ms / ms[0], gflop / gflop[0])}
    for line in results + [{"ratios_vs": archs[0], "ratios": ratios}]:
        print(json.dumps(line), flush=True)
    return {"results": results, "ratios": ratios}

# === Command line ===
RUNTIME_KEYS = ("device", "workers", "precision", "channels_last", "compile", "log_every", "stop_after", "out",
                "resume", "overwrite", "stl", "eval_only", "stage")  # not taken from last.pt on --resume
MODEL_KEYS = ("dataset", "arch", "dims", "width", "depth", "transition")  # taken from the checkpoint by --eval-only

def check_out(cfg, log):
    """Nothing silently replaced: --out in a folder this user can write to; one that holds a run (with --stage X: the
    stage and the later ones) is continued with --resume, started over with --overwrite (its files go), or refused."""
    out = Path(cfg["out"])
    where = next(p for p in (out, *out.parents) if os.path.exists(p))  # the folder, or the one it will be made in
    if not where.is_dir() or not os.access(where, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {where} is not a folder this user can write to: choose another --out")
    if cfg["resume"] and not list(out.glob("**/last.pt")):
        raise UserError(f"--resume: no last.pt in {out}: start the run without --resume")
    stages = [out / e for e in GUIDANCE if cfg["stage"] != "all" and cfg["stage"] <= e[0]]
    folders = stages or [out, *(out / e for e in GUIDANCE)]
    names = ["results_eval.json"] if cfg.get("eval_only") else RUN_FILES
    held = [] if cfg["resume"] else [f / n for f in folders for n in names if (f / n).exists()]
    if held and not cfg["overwrite"]:
        ways = "" if cfg.get("eval_only") else "continue it with --resume, "  # --eval-only has no --resume
        raise UserError(f"{out} holds a run ({held[0]}): {ways}choose another --out, or start over with --overwrite")
    for path in held + [f / "predictions" for f in folders if held and not cfg.get("eval_only")]:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    log(f"--overwrite: removed {len(held)} files of the earlier run in {out}") if held else None

def checkpoint_config(cfg, args):
    """--resume: the run's settings come from its last.pt (a guidance run's: its first stage's); --eval-only: the
    model's settings (and batch size, unless given) come from the checkpoint. A given option that differs is an
    error."""
    path = Path(cfg["eval_only"]) if cfg.get("eval_only") else min(Path(cfg["out"]).glob("**/last.pt"))
    ck_cfg = load_checkpoint(path)["config"]
    ck_cfg["arch"] = ck_cfg["arch"].split()[0]  # "guidance a_inferior" -> "guidance"
    batch = () if args.batch_size else ("batch_size",)  # --eval-only: the batch it trained with (3D: not 2D's)
    keys = MODEL_KEYS + batch if cfg.get("eval_only") else [k for k in ck_cfg if k not in RUNTIME_KEYS]
    for key in keys:
        if getattr(args, key, None) is not None and json.dumps(getattr(args, key)) != json.dumps(ck_cfg[key]):
            raise UserError(f"{path} was made with {key}={ck_cfg[key]!r}, not {getattr(args, key)!r}: leave that "
                            "option out, or start a new run")
    return {**cfg, **{k: ck_cfg[k] for k in keys}}

def experiment(cfg, model, splits, log=print):
    """Train a model with `fit`, test best.pt and write results.json: every arch and guidance stage."""
    if min(cfg["batch_size"], len(splits["train"])) == 1 and np.prod(splits["train"].spatial) == 32 ** cfg["dims"]:
        raise UserError("a batch of 1 item meets a 1-voxel bottleneck, too little for BatchNorm: use --batch-size 2+")
    run = make_run(cfg, model, splits)
    log(f"{cfg['arch']} on {cfg['dataset']} ({cfg['dims']}D, {cfg['device']}, {cfg['precision']}): "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{len(splits['train'])} training items, {run.steps_per_epoch} steps/epoch")
    best = fit(run, log)
    if run.rank != 0:
        return {}
    if "stopped_after" in best:
        return {"stopped_after": best.pop("stopped_after"), "best_val": best, "config": cfg}
    metrics, epoch, notes = test(run, Path(cfg["out"]) / "best.pt", log)
    return report(run, metrics, best, epoch, notes, log)

def run_training(args, log=print):
    """Resolve the config, then train and test, evaluate a checkpoint (--eval-only), run the guidance
    stages or benchmark (--bench). Under torchrun this process joins the process group first and only
    process 0 logs. Ctrl-C stops with one line that says what was saved."""
    cfg, (rank, world, local_rank) = resolve_config(args), distributed()
    if world > 1 and (cfg.get("bench") or cfg["arch"] == "guidance" or cfg.get("eval_only")):
        raise UserError("--bench, --eval-only and --arch guidance run in one process: start them without torchrun")
    log = log if rank == 0 else (lambda *a, **k: None)
    out, fresh = Path(cfg["out"]), not Path(cfg["out"]).exists()
    try:
        if cfg.get("bench"):
            return bench(cfg, log)
        check_out(cfg, log)
        cfg = checkpoint_config(cfg, args) if cfg["resume"] or cfg.get("eval_only") else cfg
        if world > 1:
            if cfg["device"] == "cuda":
                torch.cuda.set_device(local_rank)
            torch.distributed.init_process_group("nccl" if cfg["device"] == "cuda" else "gloo",
                                                 timeout=datetime.timedelta(hours=2))
        if cfg["arch"] == "guidance":
            return run_guidance(cfg, log)
        splits = open_splits(cfg, log)
        if cfg.get("eval_only"):
            run = make_run(cfg, build_model(cfg, cfg["tasks"], splits["train"].in_channels), splits)
            metrics, epoch, notes = test(run, cfg["eval_only"], log)
            return report(run, metrics, None, epoch, notes, log, name="results_eval.json")
        return experiment(cfg, build_model(cfg, cfg["tasks"], splits["train"].in_channels), splits, log)
    except KeyboardInterrupt:
        saved = [] if cfg.get("bench") else sorted(out.glob("**/last.pt"), key=os.path.getmtime)
        if not saved and fresh:
            shutil.rmtree(out, ignore_errors=True)
        raise UserError(f"interrupted: {saved[-1]} holds the last finished epoch; continue with --resume" if saved
                        else "interrupted: nothing was saved (no epoch had finished)") from KeyboardInterrupt()
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if sys.exc_info()[0] is None:  # done: every process waits for process 0's test, then all leave together
                torch.distributed.barrier()  # (a gloo process that destroys the group alone can abort: seen in CI)
            torch.distributed.destroy_process_group()

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit code 2, no usage dump
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)

def checked(cast, ok, what):
    """An argparse type: `cast`, then `ok(value)` or a one-line error saying what is expected."""
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    return parse

POSITIVE = checked(int, lambda v: v > 0, "a positive integer")

def parse_args(argv=None):
    archs = ctan.ARCHS + ("guidance",)
    p = Parser(description="Train/evaluate CTAN and baselines. Options left out come from the table DEFAULTS "
                           "in train.py (per dataset, with smaller CPU settings).")
    p.add_argument("--dataset", choices=data.DATASETS)
    p.add_argument("--arch", type=checked(str, lambda v: set(v.split(",")) <= set(archs),
                                          f"one of {', '.join(archs)} (a comma list with --bench)"),
                   help="guidance: deep multimodal guidance for dose; with --bench a comma list, e.g. hps,ctan")
    p.add_argument("--stage", choices=("a", "b", "c", "d"), help="--arch guidance: run this stage alone")
    p.add_argument("--data", help="HDF5 file from data.py (default data/NAME.h5)")
    p.add_argument("--dims", type=int, choices=(2, 3))
    p.add_argument("--epochs", type=POSITIVE)
    p.add_argument("--batch-size", type=POSITIVE)
    p.add_argument("--lr", type=checked(float, lambda v: 0 < v < float("inf"), "a positive learning rate"))
    p.add_argument("--weight-decay", type=checked(float, lambda v: 0 <= v < float("inf"), "a number >= 0"))
    p.add_argument("--weighting", choices=("equal", "dwa", "uncertainty", "mfe"),
                   help="task loss weighting (default equal; mfe, L_pixel + 0.25 L_image, is --arch mfe's default)")
    p.add_argument("--width", type=POSITIVE, help="base channels of the network")
    p.add_argument("--depth", type=checked(lambda s: tuple(int(x) for x in s.split(",")), lambda v: len(v) == 4
                                           and min(v) > 0, "four positive integers, e.g. 3,4,6,3"),
                   help="blocks per encoder stage, e.g. 3,4,6,3 (ResNet-50); default DEFAULTS")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto")
    p.add_argument("--precision", choices=("bf16", "fp32"), help="bf16 autocast (default on CUDA) or fp32")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="channels-last memory format")
    p.add_argument("--out", help="run folder (default runs/DATAFILE[-3d]-ARCH)")
    p.add_argument("--eval-only", metavar="CKPT", help="evaluate CKPT on the test split (results_eval.json)")
    p.add_argument("--stl", help="STL run (folder or results.json) for Delta_MTL (default: DATAFILE-stl beside --out)")
    p.add_argument("--workers", type=checked(int, lambda v: v >= 0, "an integer >= 0"), help="DataLoader workers")
    p.add_argument("--max-steps-per-epoch", type=POSITIVE, help="cap on training steps per epoch")
    p.add_argument("--max-eval-cases", type=POSITIVE, help="validate on the first N cases only (test uses all)")
    p.add_argument("--stop-after", type=POSITIVE, help="stop after this epoch as if interrupted (then --resume)")
    p.add_argument("--log-every", type=checked(float, lambda v: v >= 0, "a number >= 0"), help="seconds between lines")
    p.add_argument("--transition", choices=("block", "conv"), help="mtan/ctan: official block (default) or 1x1 conv")
    p.add_argument("--steps", type=POSITIVE, help="timed steps for --bench (default 20)")
    p.add_argument("--peak-tflops", type=checked(float, lambda v: v > 0, "a positive number"), help="for --bench MFU")
    for flag, text in (("--class-weights", "inverse-frequency class weights"), ("--augment", "training augmentation"),
                       ("--resume", "continue the run in --out from its last.pt"), ("--compile", "torch.compile"),
                       ("--overwrite", "start over in an --out that holds a run"),
                       ("--checkpointing", "recompute encoder stages in the backward pass (3D memory)"),
                       ("--bench", "time training steps of each --arch, print JSON lines")):
        p.add_argument(flag, action="store_true", default=None, help=text)
    p.add_argument("--summary", metavar="DIR", help="print the README tables of DIR/seedS/FILE-ARCH/results.json")
    args = p.parse_args(argv)
    if args.summary:
        return args
    if not (args.dataset and args.arch):
        p.error("--dataset and --arch are required (unless --summary DIR)")
    if "," in args.arch and not args.bench:
        p.error(f"--arch {args.arch}: a comma list of archs is for --bench (training takes one arch)")
    if args.arch == "guidance" and (args.bench or args.eval_only):
        p.error("--arch guidance runs its stages: it takes no --bench or --eval-only")
    if args.stage and args.arch != "guidance":
        p.error(f"--stage applies to --arch guidance only, not {args.arch}")
    if args.arch == "guidance" and args.dataset not in data.PLANNING:
        p.error(f"--arch guidance needs a superior modality (CT + ROI masks) that only {', '.join(data.PLANNING)} "
                f"have; {args.dataset} has a single input modality and nothing to guide it with")
    if args.resume and (args.overwrite or args.eval_only):
        p.error("--resume continues a run: it does not go with --overwrite or --eval-only")
    return args

def main(argv=None):
    """Command line entry point; returns the results dict. A user error: one line, exit code 2; Ctrl-C: 130."""
    args = parse_args(argv)
    try:
        return summary.tables(args.summary, TASKS, LOWER_IS_BETTER) if args.summary else run_training(args)
    except (UserError, data.DataError) as e:  # from a DataLoader worker, the message is the last line
        text, stopped = str(e).strip().splitlines()[-1].removeprefix("data.DataError: "), e.__cause__
        print(text if isinstance(stopped, KeyboardInterrupt) else f"error: {text}", file=sys.stderr)
        raise SystemExit(130 if isinstance(stopped, KeyboardInterrupt) else 2)

if __name__ == "__main__":
    main()
