"""Datasets for CTAN: one HDF5 file per dataset, converted from the public releases or synthetic.
`python data.py synth|convert|info ...` writes and checks the files; `open_dataset` reads them. The layout is
README.md ("## Data") in prose and `schema` in code, shared by the writer, the reader and `info`."""
import argparse
import csv
import hashlib
import json
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
import zlib
from pathlib import Path
from collections import namedtuple

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SPLITS = ("train", "val", "test")
OPENKBP_ROIS = ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx",
                "Mandible", "PTV56", "PTV63", "PTV70")
PROSTATE_ROIS = ("Bladder", "Rectum", "FemoralHead_L", "FemoralHead_R", "PTV")
HAM_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
HU_MIN, HU_MAX, HU_SCALE = -1000.0, 1500.0, 1000.0          # CT normalisation: clip, then divide
RGB_MEAN, RGB_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics

# modality "ct" (1 channel, HU) or "rgb" (3, uint8); model_dims a reader may ask for (2: slices or images, 3: volumes);
# synth_n cases of side synth_size by default; tasks {task: (kind, n_out)}, n_out None: one per ROI of `rois`.
Spec = namedtuple("Spec", "modality model_dims synth_n synth_size tasks rois")
_PLAN_TASKS = {"dose": ("pixel", 1), "structures": ("pixel", None)}
SPECS = {
    "prostate": Spec("ct", (2, 3), 30, 64, _PLAN_TASKS, PROSTATE_ROIS),
    "openkbp": Spec("ct", (2, 3), 30, 64, _PLAN_TASKS, OPENKBP_ROIS),
    "ham10000": Spec("rgb", (2,), 300, 64, {"segmentation": ("pixel", 1), "diagnosis": ("image", 7)}, ()),
    "stoic": Spec("ct", (3,), 80, 32, {"covid": ("image", 2), "severe": ("image", 2)}, ()),
}
DATASETS = tuple(SPECS)
PLANNING = ("prostate", "openkbp")  # radiotherapy planning datasets: dose + structures, slice chunks

def default_path(name: str) -> Path:
    """Where `synth` and `convert` write NAME by default (relative to the working directory)."""
    return Path("data") / f"{check_name(name)}.h5"

def in_channels(name: str) -> int:
    """Input channels of a dataset's model: 3 for RGB dermoscopy, 1 for CT."""
    return 3 if SPECS[check_name(name)].modality == "rgb" else 1

def task_spec(name: str, n_rois: int = 0) -> dict:
    """{task: (kind, n_out)} of a dataset; `structures` gets one channel per ROI."""
    return {t: (kind, n_rois if n is None else n) for t, (kind, n) in SPECS[check_name(name)].tasks.items()}

# ----------------------------------------------------------------------------- the layout, as code; errors
ATTRS = ("dataset", "tasks", "dims", "synthetic", "source", "digest")  # + roi_names (planning), classes (ham)

def schema(name: str, spatial: tuple, n_rois: int = 0) -> dict:
    """The arrays of every split: key -> (shape after the case axis, dtype). Row i of each is case i."""
    s = tuple(spatial)
    if name == "ham10000":
        return {"image": (s + (3,), "uint8"), "segmentation": (s, "bool"), "diagnosis": ((), "int64"),
                "id": ((), "str"), "lesion_id": ((), "str"), "original_size": ((2,), "int32")}
    if name == "stoic":
        return {"image": (s, "int16"), "covid": ((), "int64"), "severe": ((), "int64"), "id": ((), "str"),
                "voxel_dimensions": ((3,), "float64"), "original_shape": ((3,), "int32"),
                "original_voxel_dimensions": ((3,), "float64")}
    return {"image": (s, "int16"), "dose": (s, "float32"), "structures": ((n_rois,) + s, "bool"),
            "possible_dose_mask": (s, "bool"), "voxel_dimensions": ((3,), "float64"), "id": ((), "str")}

def _digest(name, rois):
    """sha256 of dataset, tasks, ROIs, then (`_feed`) per split its size and every value as stored, in schema order."""
    return hashlib.sha256(json.dumps([name, task_spec(name, len(rois)), list(rois)]).encode())

def _feed(digest, label: str, value, dtype: str = "str"):
    data = str(value).encode() if dtype == "str" else np.asarray(value, dtype).tobytes()
    digest.update(f"{label}:{len(data)}:".encode() + data)

class DataError(ValueError):
    """Bad input (file, folder, option): a one-line message naming the problem and the fix."""

def check_name(name: str) -> str:
    """`name` if it is a known dataset, else DataError listing the valid names."""
    if name not in SPECS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    return name

def _make_hint(name: str, verb: str = "make", out=None) -> str:
    """The commands that make a dataset file (with --out where it is not the default path)."""
    flag = f" --out {out}" if out is not None and Path(out) != Path("data") / f"{name}.h5" else ""
    return (f"{verb} it with `python data.py synth {name}{flag}` (synthetic stand-in) "
            f"or `python data.py convert {name} RAW_DIR{flag}` (real data)")

def _first_line(e: BaseException) -> str:
    return (str(e).strip() or type(e).__name__).splitlines()[0]

def _output(name, out, overwrite: bool) -> Path:
    """Where to write `name` (default data/NAME.h5), refused if it exists unless `overwrite`."""
    out = Path(out or default_path(name))
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists: add --overwrite (overwrite=True) to replace it or choose another --out")
    return out

# ----------------------------------------------------------------------------- the one writer
def _write(out, name, items: dict, make, spatial, rois=(), source="", synthetic=False, log=None) -> Path:
    """Write case `make(x)` for every x of {split: [x]} to a temporary file renamed to `out` when complete: an error
    or Ctrl-C leaves nothing. Ctrl-C sets a flag checked between cases: raised in an h5py callback, it would be lost."""
    out, keys, digest = Path(out), schema(name, spatial, len(rois)), _digest(name, rois)
    new_dirs, tmp = [p for p in out.parents if not p.exists()], out.with_name(f".{out.name}.{os.getpid()}.tmp")
    total, done, start, shown = sum(map(len, items.values())), 0, time.monotonic(), time.monotonic()
    stop, main_thread = [], threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.append(True)) if main_thread else None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(tmp, "w") as f:
            for split in SPLITS:
                g, n = f.create_group(split), len(items[split])
                for key, (tail, dtype) in keys.items():  # arrays: gzip chunks of one axial slice (planning) or case
                    dt = h5py.string_dtype() if dtype == "str" else np.dtype(dtype)
                    chunks = (1,) * (len(tail) - 1) + tail[-2:] if name in PLANNING else (1,) + tail
                    big = dict(chunks=chunks, maxshape=(None,) + tail, compression="gzip", shuffle=dt.itemsize > 1)
                    g.create_dataset(key, (n,) + tail, dt, **(big if len(tail) > 1 else {}))  # maxshape: n may be 0
                _feed(digest, split, n, "int64")
                for i, x in enumerate(items[split]):
                    case = make(x)
                    for key, (_, dtype) in keys.items():
                        g[key][i] = value = case[key] if dtype == "str" else np.asarray(case[key], dtype)
                        _feed(digest, key, value, dtype)
                    done += 1
                    if log and (time.monotonic() - shown > 10 or done == total):
                        elapsed, shown = time.monotonic() - start, time.monotonic()
                        print(f"{out.name}: {done}/{total} cases, {elapsed:.0f}s elapsed, "
                              f"ETA {elapsed / done * (total - done):.0f}s", file=log, flush=True)
                    if stop:
                        raise KeyboardInterrupt
            f.attrs.update(dataset=name, tasks=json.dumps(task_spec(name, len(rois))), source=str(source),
                           dims=len(spatial), synthetic=bool(synthetic), digest=digest.hexdigest())
            f.attrs.update({"roi_names": json.dumps(list(rois))} if name in PLANNING else {})
            f.attrs.update({"classes": json.dumps(HAM_CLASSES)} if name == "ham10000" else {})
        if stop:
            raise KeyboardInterrupt
        os.replace(tmp, out)
        return out
    except BaseException:
        tmp.unlink(missing_ok=True)
        for d in new_dirs:  # innermost first: only folders this call made, and only if still empty
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)

def _seeded_split(items, key, seed) -> dict:
    """{split: [items]}: the sorted unique keys, permuted by `seed`, cut 70/10/20 (val, test >= 1); a key, one split."""
    keys = sorted({key(x) for x in items})
    if len(keys) < 3:
        raise DataError(f"{len(keys)} cases cannot fill train, val and test: use at least 3")
    val, test = (max(1, round(len(keys) * fraction)) for fraction in (0.1, 0.2))  # train: the rest
    rank = np.random.default_rng(seed).permutation(len(keys)).argsort()  # of each key in the permutation
    split_of = {k: SPLITS[int(r >= len(keys) - val - test) + int(r >= len(keys) - test)] for k, r in zip(keys, rank)}
    return {s: [x for x in items if split_of[key(x)] == s] for s in SPLITS}

# ----------------------------------------------------------------------------- raw readers
_MET_TYPES = {"MET_CHAR": "i1", "MET_UCHAR": "u1", "MET_SHORT": "i2", "MET_USHORT": "u2", "MET_INT": "i4",
              "MET_UINT": "u4", "MET_LONG": "i4", "MET_ULONG": "u4", "MET_LONG_LONG": "i8", "MET_ULONG_LONG": "u8",
              "MET_FLOAT": "f4", "MET_DOUBLE": "f8"}

def read_metaimage(path) -> tuple[np.ndarray, np.ndarray]:
    """A MetaImage (.mha, or .mhd + .raw/.zraw) as (array z, y, x: DimSize reversed; spacing in mm, z, y, x)."""
    path, header = Path(path), {}
    if not path.is_file():
        raise DataError(f"{path} not found: expected a MetaImage .mha or .mhd file")
    with open(path, "rb") as fh:
        while "ElementDataFile" not in header:
            key, sep, value = fh.readline().decode("latin-1").partition("=")
            if not key:
                raise DataError(f"{path}: MetaImage header has no ElementDataFile line: not a MetaImage file")
            header.update({key.strip(): value.strip()} if sep else {})
        raw = fh.read()

    def numbers(key, n=None, kind=int, default=None):  # n numbers (any count if None) of a header key
        text = header.get(key, default)
        try:
            values = [kind(v) for v in text.split()]
        except (AttributeError, ValueError):
            values = []
        if not values or len(values) != (n or len(values)):
            raise DataError(f"{path}: MetaImage header key {key} is {'missing' if text is None else repr(text)}, "
                            f"expected {n or 'some'} number{'' if n == 1 else 's'} separated by spaces")
        return values

    shape = numbers("DimSize", numbers("NDims", 1)[0] if "NDims" in header else None)
    spacing = numbers("ElementSpacing", len(shape), float, header.get("ElementSize", "1 " * len(shape)))
    etype, data_file = header.get("ElementType"), path.parent / header["ElementDataFile"]
    if etype not in _MET_TYPES or numbers("ElementNumberOfChannels", 1, default="1") != [1]:
        raise DataError(f"{path}: MetaImage of {etype} x {header.get('ElementNumberOfChannels', 1)} channels is not "
                        f"supported: expected one channel of {', '.join(_MET_TYPES)}")
    msb = header.get("BinaryDataByteOrderMSB", header.get("ElementByteOrderMSB", "False")).lower() == "true"
    dtype = np.dtype(_MET_TYPES[etype]).newbyteorder(">" if msb else "<")
    if header["ElementDataFile"] != "LOCAL":
        if not data_file.is_file():
            raise DataError(f"{path}: data file {data_file} is missing (slice lists unsupported): put it by the header")
        raw = data_file.read_bytes()
    nbytes = math.prod(shape) * dtype.itemsize
    if header.get("CompressedData", "False").lower() == "true":
        try:
            raw = zlib.decompress(raw, 47)  # 32 + 15: zlib or gzip stream
        except zlib.error as e:
            raise DataError(f"{path}: corrupt zlib data ({e}): re-export the image") from None
    else:
        skip = numbers("HeaderSize", 1, default="0")[0]  # -1: the data are the last bytes
        raw = raw[len(raw) - nbytes:] if skip == -1 else raw[skip:]
    if len(raw) != nbytes:
        raise DataError(f"{path}: {len(raw)} data bytes, expected {nbytes} for DimSize {shape} "
                        f"of {etype}: the file is truncated or the header is wrong")
    array = np.frombuffer(raw, dtype).reshape(shape[::-1]).astype(dtype.newbyteorder("="))
    return array, np.array(spacing[::-1], dtype=np.float64)

def read_sparse_csv(path, shape, values=True) -> np.ndarray:
    """An OpenKBP CSV (header `,data`, rows `flat_index,value`; masks `flat_index,`) as a dense array: unlisted = 0."""
    try:
        with open(path) as fh, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # header-only files: "input contained no data"
            header, rows = fh.readline(), np.loadtxt(fh, delimiter=",", usecols=(0, 1) if values else (0,), ndmin=2)
    except ValueError as e:  # also UnicodeDecodeError
        raise DataError(f"{path}: cannot parse ({_first_line(e)}): expected rows 'flat_index,value'"
                        + ("" if values else " or 'flat_index,'")) from None
    if "data" not in header:
        raise DataError(f"{path}: first line is {header.strip()!r}, expected the OpenKBP header ',data'")
    if values and not np.isfinite(rows[:, 1]).all():
        raise DataError(f"{path}: NaN or inf among the values: fix the source data")
    index, size = rows[:, 0].astype(np.int64), math.prod(shape)
    if len(index) and (index.min() < 0 or index.max() >= size or (index != rows[:, 0]).any()):
        raise DataError(f"{path}: flat index out of range for shape {shape} (max {index.max()}): check --shape")
    dense = np.zeros(size, np.float64 if values else bool)
    dense[index] = rows[:, 1] if values else True
    return dense.reshape(shape)

def _read_image(path, mode) -> Image.Image:
    """An image file converted to PIL `mode`, or a DataError naming the file."""
    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # truncated, not an image...
        raise DataError(f"{path}: cannot decode the image ({_first_line(e)}): download it again") from None

def _csv_rows(path, columns) -> list:
    """The rows of a CSV file with a header as dicts, or a DataError naming the file and the columns it needs."""
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (ValueError, csv.Error) as e:  # also UnicodeDecodeError
        raise DataError(f"{path}: cannot parse ({_first_line(e)}): download it again") from None
    if not rows or not set(columns) <= set(rows[0]):
        raise DataError(f"{path}: needs a header with {', '.join(columns)} and data rows")
    return rows

def axial_first(volume: np.ndarray) -> np.ndarray:
    """(..., D, H, W) with W the axial axis z, as the OpenKBP CSVs index it -> (..., Z, D, H), as stored."""
    return np.moveaxis(volume, -1, -3)

def axial_slice(k: int) -> tuple:
    """Index of axial slice k in a stored planning array (..., Z, D, H) or a prediction of it."""
    return (Ellipsis, k, slice(None), slice(None))

# ----------------------------------------------------------------------------- converters
OPENKBP_SPLITS = {"train": "train-pats", "val": "validation-pats", "test": "test-pats"}
OPENKBP_FILES = ("ct.csv", "dose.csv", "possible_dose_mask.csv", "voxel_dimensions.csv")
HAM_IMAGE_DIRS = "HAM10000_images_part1/ and _part2/ (Kaggle: ham10000_images_part_1/ and _part_2/)"
HAM_MASK_DIR = "HAM10000_segmentations_lesion_tschandl"
HAM_METADATA = "HAM10000_metadata.csv"

def _sizes(text, n, example) -> tuple:
    """"128", "128,128,96", "256x192" or a sequence -> n positive multiples of 32 (one value is repeated)."""
    try:
        dims = [int(v) for v in (re.split(r"[,x]", str(text).lower()) if isinstance(text, (str, int)) else text)]
    except (ValueError, TypeError):
        dims = []
    dims = dims * n if len(dims) == 1 else dims
    if len(dims) != n or any(d <= 0 or d % 32 for d in dims):
        raise DataError(f"bad size {text!r}: need {n} positive multiples of 32 (models downsample by 32), "
                        f"e.g. {example}; pad or crop the volumes before converting")
    return tuple(dims)

def _require(raw_dir, found: dict, what: str):
    """A DataError naming the entries of {name: present} that `raw_dir` lacks and what RAW_DIR should hold."""
    gone = [name for name, ok in found.items() if not ok]
    if gone:
        raise DataError(f"{raw_dir} lacks {', '.join(gone)}: point RAW_DIR at {what}")

def read_openkbp_patient(folder, shape=(128, 128, 128), rois=OPENKBP_ROIS) -> dict:
    """One OpenKBP-layout patient folder (volumes of `shape` = (D, H, W), W = z) as one stored case (z first)."""
    folder = Path(folder)
    raw_ct = read_sparse_csv(folder / "ct.csv", shape)
    if (raw_ct != np.round(raw_ct)).any() or raw_ct.max(initial=0) > 32767 + 1024 or raw_ct.min(initial=0) < 0:
        raise DataError(f"{folder / 'ct.csv'}: values must be integers in 0..33791 (HU + 1024, stored as int16 HU)")
    try:
        voxel = np.loadtxt(folder / "voxel_dimensions.csv", ndmin=1)
    except ValueError as e:
        voxel = _first_line(e)
    if np.shape(voxel) != (3,):
        raise DataError(f"{folder / 'voxel_dimensions.csv'}: expected 3 numbers (mm), one a line: got {voxel}")
    masks = [read_sparse_csv(folder / f"{roi}.csv", shape, values=False) if (folder / f"{roi}.csv").is_file()
             else np.zeros(shape, bool) for roi in rois]  # no file: not contoured
    return {"image": axial_first(raw_ct - 1024), "dose": axial_first(read_sparse_csv(folder / "dose.csv", shape)),
            "structures": axial_first(np.stack(masks)), "id": folder.name, "voxel_dimensions": voxel[[2, 0, 1]],
            "possible_dose_mask": axial_first(read_sparse_csv(folder / "possible_dose_mask.csv", shape, False))}

def _openkbp_raw(raw_dir: Path, rois, shape):
    """Checked OpenKBP-layout folder -> ({split: [patient folder]}, folder -> case, a note on ROI files left out)."""
    _require(raw_dir, {d + "/": (raw_dir / d).is_dir() for d in OPENKBP_SPLITS.values()},
             "a folder holding train-pats/, validation-pats/ and test-pats/ (open-kbp's provided-data)")
    natural = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]  # noqa: E731, pt_2 < pt_10
    patients = {s: sorted(filter(Path.is_dir, (raw_dir / d).iterdir()), key=natural) for s, d in OPENKBP_SPLITS.items()}
    lacking, extra, found = [], set(), set()
    for p in (p for ps in patients.values() for p in ps):
        names = {c.name for c in p.glob("*.csv")}
        gone = [f for f in OPENKBP_FILES if f not in names]
        lacking += [f"{p} lacks {', '.join(gone)}"] if gone else []
        stems = {n[:-4] for n in names}
        extra |= stems - {f[:-4] for f in OPENKBP_FILES} - set(rois)
        found |= stems & set(rois)
    if lacking:
        raise DataError(f"{lacking[0]}: every patient folder needs {', '.join(OPENKBP_FILES)} ({len(lacking)} do not)")
    if not any(patients.values()):
        raise DataError(f"{raw_dir}: no patient folders under {', '.join(OPENKBP_SPLITS.values())}")
    if not found:  # e.g. an OpenKBP folder converted as prostate: every structure mask would be empty
        raise DataError(f"{raw_dir}: no patient has a file of the ROIs {', '.join(rois)} (ROI files there: "
                        f"{', '.join(sorted(extra)) or 'none'}): name the ROIs to keep with --rois")
    note = extra and f"note: ignored ROI files {', '.join(sorted(extra))} (add them to --rois to keep them)"
    return patients, lambda p: read_openkbp_patient(p, shape, rois), note

def _ham_raw(raw_dir: Path, size, seed):
    """Checked HAM10000 release -> ({split: [metadata row]} 70/10/20 by lesion_id, row -> case resized to `size`)."""
    image_dirs = [d for d in sorted(raw_dir.iterdir())
                  if d.is_dir() and re.fullmatch(r"ham10000_images_part_?[12]", d.name.lower())]
    _require(raw_dir, {HAM_METADATA: (raw_dir / HAM_METADATA).is_file(), HAM_IMAGE_DIRS: image_dirs,
                       HAM_MASK_DIR + "/": (raw_dir / HAM_MASK_DIR).is_dir()},
             "the unpacked HAM10000 release plus its lesion segmentations")
    rows = _csv_rows(raw_dir / HAM_METADATA, ("lesion_id", "image_id", "dx"))
    bad = sorted({r["dx"] for r in rows} - set(HAM_CLASSES))
    if bad:
        raise DataError(f"{raw_dir / HAM_METADATA}: unknown dx {', '.join(bad)}: expected {', '.join(HAM_CLASSES)}")
    images = {p.stem: p for d in image_dirs for p in d.glob("*.jpg")}
    masks = {r["image_id"]: raw_dir / HAM_MASK_DIR / f"{r['image_id']}_segmentation.png" for r in rows}
    lacking = [f"{i}.jpg" for i in masks if i not in images] + [m.name for m in masks.values() if not m.is_file()]
    if lacking:
        raise DataError(f"{raw_dir}: {len(lacking)} files listed in {HAM_METADATA} are missing (first: "
                        f"{', '.join(lacking[:3])}; images read from {', '.join(d.name + '/' for d in image_dirs)}): "
                        f"unpack both image parts, {HAM_IMAGE_DIRS}, and {HAM_MASK_DIR}/")

    def case(r):
        rgb, mask = _read_image(images[r["image_id"]], "RGB"), _read_image(masks[r["image_id"]], "L")
        image, segmentation = (np.asarray(im.resize(size[::-1], Image.Resampling.BILINEAR)) for im in (rgb, mask))
        return {"image": image, "segmentation": segmentation > 128, "id": r["image_id"], "lesion_id": r["lesion_id"],
                "diagnosis": HAM_CLASSES.index(r["dx"]), "original_size": (rgb.height, rgb.width)}

    return _seeded_split(sorted(rows, key=lambda r: r["image_id"]), lambda r: r["lesion_id"], seed), case, None

def _stoic_raw(raw_dir: Path, shape, seed):
    """Checked STOIC 2021 folder -> ({split: [patient]} 70/10/20, patient -> case with the scan resized to `shape`)."""
    reference, scan_dir = raw_dir / "metadata" / "reference.csv", raw_dir / "data" / "mha"
    _require(raw_dir, {str(p.relative_to(raw_dir)): p.exists() for p in (reference, scan_dir)},
             "the STOIC 2021 folder holding data/mha/ and metadata/reference.csv")
    rows = _csv_rows(reference, ("PatientID", "probCOVID", "probSevere"))
    scans = {r["PatientID"]: next((p for p in (scan_dir / f"{r['PatientID']}{e}" for e in (".mha", ".mhd"))
                                   if p.is_file()), None) for r in rows}
    lacking = [f"{pid}.mha" for pid, p in scans.items() if p is None]
    if lacking:
        raise DataError(f"{scan_dir}: {len(lacking)} scans listed in reference.csv are missing "
                        f"(first: {', '.join(lacking[:3])}): download all of data/mha")
    wrong = [f"{key} of {r['PatientID']} is {r[key]!r}" for r in rows for key in ("probCOVID", "probSevere")
             if r[key].strip() not in ("0", "1", "0.0", "1.0")]
    if wrong:
        raise DataError(f"{reference}: {wrong[0]}, expected 0 or 1")
    label = {r["PatientID"]: {"covid": int(float(r["probCOVID"])), "severe": int(float(r["probSevere"]))} for r in rows}

    def case(pid):  # resized by area averaging along axes that shrink (no aliasing), trilinear along those that grow
        volume, spacing = read_metaimage(scans[pid])
        if volume.ndim != 3 or (volume.dtype.kind == "f" and not np.isfinite(volume).all()):
            raise DataError(f"{scans[pid]}: a {volume.ndim}D image, or NaN or inf in it: expected a finite 3D CT")
        t = torch.from_numpy(volume.astype(np.float32))[None, None]
        smaller = tuple(min(a, b) for a, b in zip(volume.shape, shape))
        t = F.adaptive_avg_pool3d(t, smaller) if smaller != volume.shape else t
        t = F.interpolate(t, size=shape, mode="trilinear", align_corners=False) if smaller != tuple(shape) else t
        return {"image": np.clip(np.rint(t[0, 0].numpy()), -32768, 32767), **label[pid], "id": pid,
                "original_shape": volume.shape, "original_voxel_dimensions": spacing,
                "voxel_dimensions": spacing * volume.shape / np.array(shape)}

    return _seeded_split(sorted(scans), str, seed), case, None

def convert(name, raw_dir, out=None, *, shape=None, rois=None, size=None, seed=0, overwrite=False, log=None) -> Path:
    """Convert the raw release of `name` in `raw_dir` to `out` (default data/NAME.h5), all checked before writing.
    openkbp/prostate take `shape` (D,H,W of the flat indices) and `rois`; ham10000 and stoic `size` and `seed`."""
    raw_dir, log = Path(raw_dir), log or sys.stderr
    if (size is not None) if name in PLANNING else (shape is not None or rois):
        raise DataError(f"{name} takes {'--shape D,H,W (the raw volume shape)' if name in PLANNING else '--size'}: "
                        "--shape and --rois apply to openkbp and prostate only, --size to ham10000 and stoic")
    rois = tuple(r.strip() for r in rois.split(",") if r.strip()) if isinstance(rois, str) else tuple(rois or ())
    rois = rois or SPECS[check_name(name)].rois
    if name in PLANNING:
        shape = _sizes(shape or 128, 3, "128 or 128,128,96")
        spatial = shape[2:] + shape[:2]  # z first, as axial_first stores it
    else:
        spatial = _sizes(size or "256x192", 2, "256x192")[::-1] if name == "ham10000" else _sizes(size or 128, 3, "128")
    out = _output(name, out, overwrite)
    if not raw_dir.is_dir():
        raise DataError(f"raw folder {raw_dir} not found: pass the folder of the unpacked {name} release")
    items, make, note = (_openkbp_raw(raw_dir, rois, shape) if name in PLANNING
                         else (_ham_raw if name == "ham10000" else _stoic_raw)(raw_dir, spatial, seed))
    _write(out, name, items, make, spatial, rois, raw_dir.resolve(), log=log)
    if note:
        print(note, file=log)
    return out

# ----------------------------------------------------------------------------- synthetic stand-ins
def _grid(size, dims=3):
    """Voxel-centre coordinates in [-1, 1] per axis, as broadcastable open grids."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    return np.ix_(*[c] * dims)

def _ellipsoid(grid, centre, radii):
    """Mask of an axis-aligned ellipsoid (a radius of inf makes a cylinder)."""
    return sum(((x - c) / r) ** 2 for x, c, r in zip(grid, centre, radii)) <= 1

# Organs on the raw axes (D, H, W), W = z, in [-1, 1]: ROI -> (centre, radii (inf: along z), HU, spared by the plan).
_ORGANS = {
    "openkbp": {"SpinalCord": ((0.4, 0, 0), (0.07, 0.07, np.inf), 250, True),
                "Brainstem": ((0.35, 0, 0.7), (0.12, 0.12, 0.25), 200, True),
                "RightParotid": ((0.05, -0.45, 0.4), (0.16, 0.1, 0.18), -150, True),
                "LeftParotid": ((0.05, 0.45, 0.4), (0.16, 0.1, 0.18), -150, True),
                "Esophagus": ((0.2, 0, -0.6), (0.06, 0.08, 0.5), -400, False),
                "Larynx": ((-0.25, 0, -0.25), (0.12, 0.12, 0.2), -600, False),
                "Mandible": ((-0.45, 0, 0.3), (0.15, 0.45, 0.12), 1200, False)},
    "prostate": {"FemoralHead_R": ((0.05, -0.6, 0.1), (0.14, 0.14, 0.16), 900, True),
                 "FemoralHead_L": ((0.05, 0.6, 0.1), (0.14, 0.14, 0.16), 900, True),
                 "Bladder": ((-0.2, 0, 0.35), (0.2, 0.22, 0.2), -100, True),
                 "Rectum": ((0.35, 0, -0.4), (0.09, 0.1, 0.6), -350, True)},
}
# Lesion look per class: frequency, mean RGB, radius range (fraction of half the image).
_LESIONS = {"akiec": (0.08, (200, 100, 90), (0.35, 0.55)), "bcc": (0.08, (230, 170, 190), (0.35, 0.55)),
            "bkl": (0.12, (170, 130, 80), (0.4, 0.65)), "df": (0.07, (140, 90, 120), (0.2, 0.35)),
            "mel": (0.13, (60, 40, 35), (0.5, 0.75)), "nv": (0.45, (115, 70, 45), (0.35, 0.55)),
            "vasc": (0.07, (170, 30, 60), (0.2, 0.35))}
# STOIC (covid, severe) -> ranges of opacity count, radius, HU: ground glass if COVID (more, larger if severe), else
# at most one small solid nodule. Dealt in fifths: 60 % COVID, a third of those severe.
_OPACITIES = {(0, 0): ((0, 2), (0.08, 0.1), (30, 50)), (1, 0): ((3, 7), (0.12, 0.2), (-450, -200)),
              (1, 1): ((6, 12), (0.2, 0.3), (-450, -200))}
_STOIC_DEAL = ((0, 0), (0, 0), (1, 0), (1, 0), (1, 1))

def _synth_plan_case(rng, name, size):
    """One planning CT built on (D, H, W) like the raw CSVs, returned z first: organs are ellipsoids of distinct HU,
    the PTVs nested enhancing spheres; dose = prescription in each PTV, falling off outside, lower in spared OARs."""
    g, shape, rois = _grid(size), (size,) * 3, SPECS[name].rois
    radii = (rng.normal(0.75, 0.03), 0.65 + 0.2 * (name == "prostate"), np.inf)
    body = np.broadcast_to(_ellipsoid(g, (*rng.normal(0, 0.04, 2), 0), radii), shape)
    hu, dose = np.where(body, 40.0, -1024.0), np.zeros(shape)
    structures = np.zeros((len(rois),) + shape, bool)
    for roi, (centre, radii, value, _) in _ORGANS[name].items():
        mask = _ellipsoid(g, np.add(centre, rng.normal(0, 0.04, 3)), radii) & body
        hu[mask], structures[rois.index(roi)] = value, mask
    targets = sorted((float(roi[3:] or 78), roi) for roi in rois if roi.startswith("PTV"))  # (Gy, ROI), PTV = 78 Gy
    distance = np.sqrt(sum((x - c) ** 2 for x, c in zip(g, rng.uniform(-0.3, 0.3, 3))))
    radius = rng.uniform(0.1, 0.16)
    for rx, roi in targets:  # lowest prescription first: the largest sphere, painted under the others
        r = radius + (targets[-1][0] - rx) / 100
        hu[(distance <= r) & body], structures[rois.index(roi)] = 10 * rx - 420, (distance <= r) & body
        dose = np.maximum(dose, rx * np.exp(-np.maximum(distance - r, 0) / 0.4))
    in_target = structures[[rois.index(roi) for _, roi in targets]].any(0)
    spared = [rois.index(roi) for roi, organ in _ORGANS[name].items() if organ[3]]
    dose[structures[spared].any(0) & ~in_target] *= 0.75
    hu[body] += rng.normal(0, 15, int(body.sum()))
    return {"image": axial_first(np.rint(hu)), "dose": axial_first(dose * body), "structures": axial_first(structures),
            "possible_dose_mask": axial_first(body), "voxel_dimensions": np.array([2.5, 3.906, 3.906]) * 128 / size}

def _synth_stoic_case(rng, size, covid, severe):
    """One chest CT (z, y, x): a body cylinder, two lungs and the opacities of its class."""
    g = _grid(size)
    body = np.broadcast_to(_ellipsoid(g[1:], (rng.normal(0, 0.03), 0), (0.75, 0.92)), (size,) * 3)
    lungs = [((rng.normal(0, 0.03), -0.05, side * 0.42), (0.8, 0.55, 0.32)) for side in (-1, 1)]
    lung = _ellipsoid(g, *lungs[0]) | _ellipsoid(g, *lungs[1])
    hu = np.where(lung, -850.0, np.where(body, 40.0, -1000.0))
    count, radii, values = _OPACITIES[covid, severe]
    for _ in range(rng.integers(*count)):
        centre, axes = lungs[rng.integers(2)]
        point = np.add(centre, np.multiply(axes, rng.uniform(-0.5, 0.5, 3)))  # inside the lung
        hu[_ellipsoid(g, point, (rng.uniform(*radii),) * 3) & lung] = rng.uniform(*values)
    hu[body] += rng.normal(0, 20, int(body.sum()))
    return {"image": np.rint(hu), "covid": covid, "severe": severe, "original_shape": (size,) * 3,
            "voxel_dimensions": np.full(3, 320.0 / size), "original_voxel_dimensions": np.full(3, 320.0 / size)}

def synth(name, out=None, n=None, size=None, seed=0, overwrite=False) -> Path:
    """A learnable synthetic stand-in of `name` in the real layout: n cases (default 30/300/80) of side `size`."""
    spec = SPECS[check_name(name)]
    n, size = spec.synth_n if n is None else int(n), spec.synth_size if size is None else int(size)
    if size <= 0 or size % 32:
        raise DataError(f"--size {size} is not a positive multiple of 32: models downsample by 32, use e.g. 64")
    out, rng = _output(name, out, overwrite), np.random.default_rng(seed)
    chosen = _seeded_split(range(n), int, seed)  # split -> per case k: its number, lesion or label pair
    if name == "ham10000":  # several photos per lesion, no lesion in two splits
        freq, colours, radii = zip(*_LESIONS.values())
        lesions = [(k, np.multiply(colours[k], rng.normal(1, 0.07, 3)), rng.uniform(*radii[k]),
                    rng.normal((225, 185, 155), 12)) for k in rng.choice(len(freq), max(3, round(n / 1.25)), p=freq)]
        owner = list(range(len(lesions))) + list(rng.integers(0, len(lesions), n - len(lesions)))
        chosen = _seeded_split(owner, int, seed)
    elif name == "stoic":  # dealt so that every split of >= 5 scans holds every class
        chosen = {s: rng.permutation(len(ks)) % len(_STOIC_DEAL) for s, ks in chosen.items()}

    def make(item):
        split, i, k = item
        if name == "ham10000":  # one photo of lesion k: a new position, shape and noise each time
            cls, colour, radius, skin = lesions[k]
            mask = _ellipsoid(_grid(size, 2), rng.normal(0, 0.1, 2), radius * rng.uniform(0.7, 1.0, 2))
            rgb = np.where(mask[..., None], colour, skin) + rng.normal(0, 6, (size, size, 3))
            return {"image": np.clip(np.rint(rgb), 0, 255), "segmentation": mask, "diagnosis": cls,
                    "id": f"syn_{split}_{i:05d}", "lesion_id": f"syn_L{k:05d}", "original_size": (size, size)}
        case = _synth_stoic_case(rng, size, *_STOIC_DEAL[k]) if name == "stoic" else _synth_plan_case(rng, name, size)
        return {"id": f"syn_{split}_{i:03d}", **case}

    items = {s: [(s, i, k) for i, k in enumerate(ks)] for s, ks in chosen.items()}
    spatial = (size,) * (2 if name == "ham10000" else 3)
    return _write(out, name, items, make, spatial, spec.rois, f"synthetic seed={seed}", True)

# ----------------------------------------------------------------------------- reading
def _open_h5(path) -> h5py.File:
    """The HDF5 file at `path` open for reading, or a DataError saying how to make it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found: {_make_hint(path.stem if path.stem in SPECS else 'NAME', out=path)}")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path} is not a readable HDF5 file ({_first_line(e)}): rebuild it with data.py synth "
                        "or convert") from None

def check_layout(f: h5py.File, path) -> dict:
    """Check an open file's structure against `schema` (no data read): its name, tasks, rois, spatial, counts..."""
    name = f.attrs.get("dataset")
    if str(name) not in SPECS:
        raise DataError(f"{path}: its 'dataset' attribute is {'missing' if name is None else repr(name)}, not one of "
                        f"{', '.join(DATASETS)}: not a data.py file; {_make_hint('NAME')}")
    name, fix = str(name), _make_hint(str(name), "rebuild", out=path)
    for attr in ATTRS + (("roi_names",) if name in PLANNING else ()):
        if attr not in f.attrs:
            raise DataError(f"{path}: file attribute {attr!r} is missing: {fix}")
    try:
        rois = json.loads(f.attrs["roi_names"]) if name in PLANNING else []
        tasks = {t: (kind, int(n)) for t, (kind, n) in json.loads(f.attrs["tasks"]).items()}
    except (ValueError, TypeError) as e:
        raise DataError(f"{path}: attribute tasks or roi_names is not the expected JSON ({_first_line(e)}): {fix}")
    if tasks != task_spec(name, len(rois)):
        raise DataError(f"{path}: tasks {tasks} do not match {name} with {len(rois)} ROIs: {fix}")
    keys = schema(name, (), len(rois))
    missing = [f"{s}/{key}" for s in SPLITS for key in keys if not isinstance(f.get(f"{s}/{key}"), h5py.Dataset)]
    if missing:
        raise DataError(f"{path}: {missing[0]} is missing (groups train, val, test each need {', '.join(keys)}): {fix}")
    image, counts = f["train/image"], {split: f[f"{split}/image"].shape[0] for split in SPLITS}
    spatial = image.shape[1:3] if name == "ham10000" else image.shape[1:]
    for split in SPLITS:
        for key, (tail, dtype) in schema(name, spatial, len(rois)).items():
            ds, want = f[split][key], (counts[split],) + tail
            if ds.shape != want or image.ndim != 4:
                raise DataError(f"{path}: {split}/{key} has shape {ds.shape}, expected {want}: {fix}")
            if ("str" if h5py.check_string_dtype(ds.dtype) else ds.dtype.name) != dtype:
                raise DataError(f"{path}: {split}/{key} has dtype {ds.dtype}, expected {dtype}: {fix}")
    if any(s % 32 for s in spatial):
        raise DataError(f"{path}: spatial size {spatial} is not a multiple of 32: convert again with --shape or --size")
    return {"name": name, "tasks": tasks, "rois": rois, "spatial": tuple(spatial), "counts": counts,
            "synthetic": bool(f.attrs["synthetic"]), "digest": str(f.attrs["digest"])}

def _read(path, ds: h5py.Dataset, case, at=None):
    """ds[at] (default: row `case`), or a DataError naming file, dataset and case: a damaged chunk, NaN, inf."""
    try:
        at = case if at is None else at
        value = ds.asstr()[at] if h5py.check_string_dtype(ds.dtype) else ds[at]
    except (OSError, RuntimeError) as e:
        fix = _make_hint(str(ds.file.attrs["dataset"]), "rebuild", out=path)
        raise DataError(f"{path}: {ds.name[1:]} is damaged (case {case}: {_first_line(e)}): {fix}") from None
    if ds.dtype.kind == "f" and not np.isfinite(value).all():
        raise DataError(f"{path}: NaN or inf in {ds.name[1:]} of case {case}: fix the source data, convert again")
    return int(value) if isinstance(value, np.integer) else value

def _shift(t: torch.Tensor, offsets, fill: float) -> torch.Tensor:
    """Translate the spatial axes of a (C, *spatial) tensor by integer offsets, filling the gap."""
    out = torch.full_like(t, fill)
    src = [slice(None)] + [slice(max(0, -o), n - max(0, o)) for o, n in zip(offsets, t.shape[1:])]
    dst = [slice(None)] + [slice(max(0, o), n - max(0, -o)) for o, n in zip(offsets, t.shape[1:])]
    out[tuple(dst)] = t[tuple(src)]
    return out

class H5Dataset(torch.utils.data.Dataset):
    """One split of a data.py file as a Dataset of dicts: axial slices (dims=2 on planning volumes) or whole cases.
    The HDF5 handle is opened by the process that reads (each DataLoader worker its own), never pickled."""

    def __init__(self, path, split, dims=2, augment=False):
        self.path, self.split, self.dims, self.augment = Path(path), split, int(dims), bool(augment)
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
        with _open_h5(self.path) as f:
            meta = check_layout(f, self.path)
            self.ids = list(_read(self.path, f[split]["id"], "ids", slice(None)))  # read once: every item has its id
        self.dataset, self.tasks, self.roi_names = meta["name"], meta["tasks"], list(meta["rois"])
        self.synthetic, self.digest, self.num_cases = meta["synthetic"], meta["digest"], meta["counts"][split]
        spec = SPECS[self.dataset]
        if self.dims not in spec.model_dims:
            why = {"stoic": "its labels are per scan", "ham10000": "its images are 2D"}[self.dataset]
            raise DataError(f"{self.path} holds {self.dataset}, which cannot be read with dims={dims}: {why}; use "
                            f"dims={spec.model_dims[0]}")
        self.modality, self.in_channels = spec.modality, in_channels(self.dataset)
        self.slices = self.dims == 2 and len(meta["spatial"]) == 3
        self.spatial = meta["spatial"][1:] if self.slices else meta["spatial"]  # of one item
        self._per_case = meta["spatial"][0] if self.slices else 1
        self._h5, self._pid, self.only = None, None, None  # only: the keys an item reads (None: all of them)

    def __getstate__(self):
        return {**self.__dict__, "_h5": None, "_pid": None}

    def _get(self, key, case, at=None):
        if self._pid != os.getpid():  # arrays opened once in each process (a name lookup costs more than a small read)
            f, self._pid = h5py.File(self.path, "r"), os.getpid()
            self._h5 = {name: f[self.split][name] for name in f[self.split]}
        return _read(self.path, self._h5[key], case, at)

    def __len__(self):
        return self.num_cases * self._per_case

    def __getitem__(self, index):
        """Item: image float32 (C, *spatial) normalised, targets (dose float32 Gy, masks bool, labels int64)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        case, k = divmod(index, self._per_case) if self.slices else (index, -1)
        at = (case,) + axial_slice(k) if self.slices else (case,)
        image = self._get("image", case, at).astype(np.float32)
        if self.modality == "rgb":  # ImageNet statistics; CT: clipped HU / 1000, so air is -1 and bone up to 1.5
            image = (image.transpose(2, 0, 1) / 255 - np.reshape(RGB_MEAN, (3, 1, 1))) / np.reshape(RGB_STD, (3, 1, 1))
        else:
            image = np.clip(image, HU_MIN, HU_MAX)[None] / HU_SCALE
        item = {"image": torch.from_numpy(image.astype(np.float32))}
        only = self.only or (*self.tasks, "possible_dose_mask")  # the targets too, unless told otherwise
        for task, (kind, _) in ((t, spec) for t, spec in self.tasks.items() if t in only):
            value = torch.from_numpy(np.asarray(self._get(task, case, None if kind == "image" else at)))
            item[task] = value if kind == "image" or value.ndim > len(self.spatial) else value[None]
        if self.dataset in PLANNING and "possible_dose_mask" in only:
            item["possible_dose_mask"] = torch.from_numpy(self._get("possible_dose_mask", case, at))[None]
        if self.augment:  # label-consistent: flips for skin; for CT shifts by up to 1/32 of a side (flips swap L/R)
            dense = [key for key, t in item.items() if t.ndim > 0]
            if self.modality == "rgb":
                for axis in (-1, -2):
                    item.update({key: item[key].flip(axis) for key in dense} if torch.rand(()) < 0.5 else {})
            else:
                offsets = [int(torch.randint(-max(1, n // 32), max(1, n // 32) + 1, ())) for n in self.spatial]
                item.update({key: _shift(item[key], offsets, HU_MIN / HU_SCALE if key == "image" else 0.0)
                             for key in dense})
        return {**item, "case": case, "slice": k, "id": self.ids[case]}

    def labels(self, task) -> np.ndarray:
        """The label of an image-level task for every case, read at once (no images)."""
        return np.asarray(self._get(task, "all", slice(None)))

    def case(self, i) -> dict:
        """Case i whole, in stored units (HU, Gy, bool masks, int labels, str ids)."""
        if not 0 <= i < self.num_cases:
            raise IndexError(f"case {i} out of range for {self.num_cases} cases")
        return {key: self._get(key, i) for key in schema(self.dataset, (), len(self.roi_names))}

open_dataset = H5Dataset  # open_dataset(path, split, dims=2, augment=False): one split as a torch Dataset of dicts

# ----------------------------------------------------------------------------- info, CLI
def describe(path, full=True) -> str:
    """Check a file and summarise it; full=True reads every value: damage, NaN or inf, dose < 0, labels, digest."""
    path = Path(path)
    with _open_h5(path) as f:
        meta = check_layout(f, path)
        name, tasks, rois, counts = meta["name"], meta["tasks"], meta["rois"], meta["counts"]
        keys, digest = schema(name, meta["spatial"], len(rois)), _digest(name, rois)
        lines = [f"{path}: {name}, synthetic={meta['synthetic']}, source={f.attrs['source']}, digest={meta['digest']}",
                 "tasks: " + ", ".join(f"{t} ({kind}, {n})" for t, (kind, n) in tasks.items())]
        lines += ["roi_names: " + ", ".join(rois)] if rois else []
        for split in SPLITS:
            lines += [f"{split}: {counts[split]} cases"]
            lines += [f"  {key:26s} {str(f[split][key].shape):24s} {dtype}" for key, (_, dtype) in keys.items()]
            _feed(digest, split, counts[split], "int64")
            tally = {t: np.zeros(n, int) for t, (kind, n) in tasks.items() if kind == "image" or t == "structures"}
            for i in range(counts[split] if full else 0):
                for key, (_, dtype) in keys.items():
                    value = _read(path, f[split][key], i)
                    _feed(digest, key, value, dtype)
                    kind, k = tasks.get(key, ("", 0))
                    if kind == "image" and not 0 <= value < k:
                        raise DataError(f"{path}: {split}/{key} of case {i} is {value}, outside 0..{k - 1}")
                    if key == "dose" and value.min() < 0:
                        raise DataError(f"{path}: negative dose in {split}/dose of case {i}: fix the source data")
                    if key in tally:  # cases per label, or per ROI the cases where it is contoured
                        tally[key] += value.any(axis=(1, 2, 3)) if key == "structures" else np.arange(k) == value
            for task, counted in tally.items() if full and counts[split] else ():
                names = HAM_CLASSES if task == "diagnosis" else rois if task == "structures" else range(len(counted))
                text = ", ".join(f"{c} {m}" for c, m in zip(names, counted))
                lines.append(f"  balance {task}: {text}" + (" (cases contoured)" if task == "structures" else ""))
    if full and digest.hexdigest() != meta["digest"]:
        raise DataError(f"{path}: content does not match its digest: " + _make_hint(name, "rebuild", out=path))
    return "\n".join(lines)

def main(argv=None) -> int:
    """`python data.py synth|convert|info ...`: 0 on success, 2 with one line on stderr on bad input, 130 on Ctrl-C."""
    p = argparse.ArgumentParser(prog="data.py", description="HDF5 datasets for CTAN (layout: README.md, ## Data)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synth", help="write a synthetic stand-in with the real layout")
    c = sub.add_parser("convert", help="convert a raw public release to HDF5")
    for writer in (s, c):
        writer.add_argument("name", help=" | ".join(DATASETS))
        writer.add_argument("--seed", type=int, default=0, help="of the synthetic data, or of the split (default 0)")
        writer.add_argument("--out", help="output file (default data/NAME.h5)")
        writer.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    s.add_argument("--n", type=int, help="number of cases (default 30 for prostate/openkbp, 300 ham10000, 80 stoic)")
    s.add_argument("--size", type=int, help="spatial size, a multiple of 32 (default 64; 32 for stoic)")
    c.add_argument("raw_dir", help="folder of the unpacked release (its layout per dataset: README.md, ## Data)")
    c.add_argument("--shape", help="openkbp/prostate: volume shape of the flat indices, N or D,H,W (default 128)")
    c.add_argument("--rois", help="openkbp/prostate: comma-separated ROI names (default: the dataset's list)")
    c.add_argument("--size", help="ham10000: WIDTHxHEIGHT (default 256x192); stoic: cube side (default 128)")
    i = sub.add_parser("info", help="check a file, reading every value; print splits, shapes, dtypes, balance")
    i.add_argument("file")
    i.add_argument("--quick", action="store_true", help="check the structure only, read no data")
    args, start = p.parse_args(argv), time.monotonic()
    try:
        if args.command == "info":
            print(describe(args.file, full=not args.quick))
            return 0
        out = (synth if args.command == "synth" else convert)(**{k: v for k, v in vars(args).items() if k != "command"})
        print(f"wrote {out} ({time.monotonic() - start:.1f}s)")
        return 0
    except KeyboardInterrupt:
        print("interrupted" + (": nothing written" if args.command != "info" else ""), file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (DataError, OSError) as e:
        print(f"error: {_first_line(e)}", file=sys.stderr)
        return 2

if __name__ == "__main__":
    sys.exit(main())
