"""The README "Results" tables from finished runs: `python train.py --summary DIR` reads
DIR/seedS/FILE-ARCH/results.json (as train.py writes them) and prints, per data file, a markdown table
of each arch over the seeds, then CTAN against each arch and each arch against STL, paired by seed. Nothing is
written."""
from pathlib import Path
import json

import numpy as np

import ctan
import data

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}

def mean_sd(values, pct=False, sign=""):
    """'mean ± sample sd' (sd from 2 values on): 4 significant digits (at most 4 decimals), or % signed, 2 decimals."""
    m = float(np.mean(values))
    places = 2 if pct or not np.isfinite(m) or m == 0 else int(np.clip(3 - np.floor(np.log10(abs(m))), 0, 4))
    sd = f" ± {np.std(values, ddof=1):.{places}f}" if len(values) > 1 else ""
    return f"{m:{'+' if pct else sign}.{places}f}{sd}{' %' if pct else ''}"

def markdown(header, rows):
    return "\n".join("| " + " | ".join(map(str, row)) + " |" for row in [header, ["---"] * len(header), *rows])

def paired(a_runs, runs, arch, col, lower_is_better, label):
    """An arch (CTAN) against `arch` on `col` over the seeds both have (None if none): d = a - arch per seed (Delta_MTL
    is against STL: for stl, a's own); mean ± sd of d, seeds where a is better, t = mean(d) / (sd(d) / sqrt(n)) and
    whether |t| exceeds Student's t_0.975 with n - 1 degrees of freedom. The row starts with `label`."""
    base = {s: 0.0 if (arch, col) == ("stl", "Delta_MTL") else r.get(col) for s, r in runs.items()}
    d = np.array([r[col] - base[s] for s, r in a_runs.items() if r.get(col) is not None and base.get(s) is not None])
    if len(d) == 0:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        t = d.mean() / (d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    q = T_975.get(len(d) - 1)
    noise = f"{'yes' if abs(t) > q else 'no'} (t_0.975,{len(d) - 1} = {q})" if q else "n too large for the table"
    return [f"`{label}`", col, len(d), mean_sd(d, col.startswith("Delta"), "+"),
            f"{np.sum(d < 0 if col in lower_is_better else d > 0)}/{len(d)}", f"{t:+.2f}" if len(d) > 1 else "",
            noise if len(d) > 1 else "one seed: no sd"]

def read_runs(root):
    """{file: {arch: {seed: {column: value}}}} of DIR/seedS/FILE-ARCH/results.json: the test metrics, "Delta TASK"
    and "Delta_MTL" (None without a matching STL run) and the tasks. A guidance run's table (no "test") is left out."""
    runs = {}
    for path in sorted(Path(root).glob("seed*/*/results.json")):
        try:
            res = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise data.DataError(f"{path} is not readable JSON ({e}): let that run finish, or move it away") from None
        if "test" not in res:
            continue
        deltas = {f"Delta {t}": v for t, v in (res.get("delta_mtl_per_task") or {}).items()}
        row = {**res["test"], **deltas, "Delta_MTL": res.get("delta_mtl"), "tasks": res["config"]["tasks"]}
        file = runs.setdefault(path.parent.name.removesuffix(f"-{res['arch']}"), {})
        seeds = file.setdefault(res["arch"], {})
        if res["config"]["seed"] in seeds:  # e.g. a run copied into another seedS folder
            raise data.DataError(f"{path}: a second {res['arch']} run of seed {res['config']['seed']} on this file")
        seeds[res["config"]["seed"]] = row
    if not runs:
        raise data.DataError(f"{root} holds no results.json of a finished run (looked for {root}/seedS/FILE-ARCH/)")
    return runs

def tables(root, tasks_table, lower_is_better, log=print):
    """Per data file: a row per arch (stl, hps, mtan, ctan, mfe, then others) with the seeds found (and missing),
    mean ± sample sd over seeds of each task's metrics (tasks_table: train.TASKS), Delta_MTL per task and overall;
    then CTAN against each other arch and each arch against STL, paired by seed."""
    runs = read_runs(root)
    seeds = sorted({s for file in runs.values() for by_seed in file.values() for s in by_seed})
    for name, file in runs.items():
        archs = sorted(file, key=lambda a: (ctan.ARCHS + (a,)).index(a))
        tasks = list(dict.fromkeys(t for by_seed in file.values() for r in by_seed.values() for t in r["tasks"]))
        keys = [k for t in tasks for k in tasks_table[t][1]]
        cols, rows = keys + [f"Delta {t}" for t in tasks] + ["Delta_MTL"], []
        for arch in archs:
            n, missing = len(file[arch]), [str(s) for s in seeds if s not in file[arch]]
            values = [[r[c] for r in file[arch].values() if r.get(c) is not None] for c in cols]
            cells = [mean_sd(v, c.startswith("Delta")) + (f" ({len(v)} seeds)" if len(v) < n else "") if v else ""
                     for c, v in zip(cols, values)]
            rows.append([f"`{arch}`", f"{n}" + (f" ({len(missing)} missing: seed {', '.join(missing)})" if missing
                                                else ""), *cells])
        log(f"\n{name}: test split, mean ± sample sd over seeds; Delta_MTL against the STL run of the same seed\n")
        log(markdown(["arch", "seeds", *cols], rows))
        if "ctan" in file:
            pairs = [paired(file["ctan"], file[a], a, c, lower_is_better, a) for a in archs if a != "ctan"
                     for c in ["Delta_MTL", *keys]]
            log(f"\n{name}: CTAN against each arch, paired by seed: d = ctan - arch per seed, t = mean(d) / (sd(d) / "
                "sqrt(n)), beyond seed noise where |t| > t_0.975,n-1 (Student)\n")
            log(markdown(["ctan against", "on", "seeds", "mean ± sd of d", "ctan better", "t", "beyond seed noise"],
                         [row for row in pairs if row]))
        if "stl" in file and len(archs) > 1:
            pairs = [paired(file[a], file["stl"], "stl", c, lower_is_better, a) for a in archs if a != "stl"
                     for c in ["Delta_MTL", *keys]]
            log(f"\n{name}: each arch against STL, paired by seed: d = arch - stl, t as above\n")
            log(markdown(["arch", "on", "seeds", "mean ± sd of d", "better", "t", "beyond seed noise"],
                         [row for row in pairs if row]))
