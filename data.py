"""Datasets for the CTAN reference implementation: HDF5 files, converters, synthetic stand-ins.

Four datasets (tasks and metrics in PAPER.md): prostate and openkbp (planning CT -> dose + ROI
masks), ham10000 (dermoscopy -> lesion mask + 7-class diagnosis), stoic (chest CT -> COVID +
severity). Each lives in one HDF5 file, by default data/NAME.h5, made by one of

    python data.py synth NAME [--out data/NAME.h5] [--n N] [--size S] [--seed K]   # synthetic stand-in
    python data.py convert openkbp RAW_DIR [--shape 128]        # RAW_DIR = open-kbp's provided-data
    python data.py convert prostate RAW_DIR --rois Bladder,Rectum,FemoralHead_L,FemoralHead_R,PTV
    python data.py convert ham10000 RAW_DIR [--size 256x192] [--seed 0]
    python data.py convert stoic RAW_DIR [--size 128] [--seed 0]
    python data.py info FILE [--quick]                          # validate, print splits and balance

and read with `open_dataset(path, split, dims=2, augment=False)`, a torch Dataset of dicts.

HDF5 layout
-----------
File attributes:
  dataset         str   prostate | openkbp | ham10000 | stoic
  tasks           str   JSON {task: [kind, size]}: kind "pixel" = dense map with `size` channels,
                        "image" = one label per case out of `size` classes
  dims            int   3 for CT volumes, 2 for HAM10000 images (what a case is, not the model)
  synthetic       bool  True for `synth` stand-ins, False for converted real data
  source          str   raw folder that was converted, or "synthetic seed=K"
  converter       str   "data.py N" (N = FORMAT_VERSION), the code that wrote the file
  format_version  int   2 (1 stored planning volumes z last; ham10000 and stoic are unchanged)
  created         str   UTC time of writing
  roi_names       str   JSON list, channel order of `structures` (openkbp, prostate)
  classes         str   JSON list, meaning of `diagnosis` (ham10000)
Groups train, val, test. In each, row i of every array is case i (N cases, N may be 0):
  openkbp, prostate  (Z = D = H = 128 for the real OpenKBP.) The raw CSVs index a D x H x W
  volume whose last axis W is the axial axis z; it is stored z first, as (Z, D, H) =
  np.moveaxis(raw, -1, -3) (`axial_first`), so that one axial slice and one whole volume are
  both contiguous reads (format 1 stored z last: 3D reads were 2.5x slower)
    image               (N, Z, D, H)     int16    CT in HU. OpenKBP's ct.csv holds HU + 1024 and
                                                  omits zeros, so an absent voxel is -1024 HU and
                                                  csv value = image + 1024 exactly
    dose                (N, Z, D, H)     float32  Gy (dose.csv values as float32)
    structures          (N, R, Z, D, H)  bool     channel r = roi_names[r]; all False = not contoured
    possible_dose_mask  (N, Z, D, H)     bool
    voxel_dimensions    (N, 3)           float64  mm per stored axis (voxel_dimensions.csv, z moved first)
    id                  (N,)             str      patient folder, e.g. pt_1
  ham10000  (H x W = 192 x 256 when converted with the default --size 256x192)
    image               (N, H, W, 3)     uint8    RGB, resized bilinearly to H x W
    segmentation        (N, H, W)        bool     lesion mask (resized bilinearly, then > 128)
    diagnosis           (N,)             int64    index into classes (akiec bcc bkl df mel nv vasc)
    id                  (N,)             str      image_id, e.g. ISIC_0024306
    lesion_id           (N,)             str      the split is by lesion: no lesion in two splits
    original_size       (N, 2)           int32    (height, width) before resizing
  stoic  (S^3, S = 128 when converted by default; array axes z, y, x as MetaImage gives them)
    image               (N, S, S, S)     int16    CT in HU, resized to S^3 (area-averaged where it
                                                  shrinks, trilinear where it grows, then rounded)
    covid, severe       (N,)             int64    0/1 from reference.csv probCOVID, probSevere
    id                  (N,)             str      PatientID
    voxel_dimensions    (N, 3)           float64  mm per array axis after resizing
    original_shape      (N, 3)           int32    (z, y, x) before resizing
    original_voxel_dimensions (N, 3)     float64  mm per array axis before resizing
Images and volumes are stored whole (one row per case), chunked and gzip-compressed: for openkbp
and prostate one chunk is one axial slice of one case, so a 2D reader decompresses only the slice
it reads; for ham10000 and stoic one chunk is one case. Spatial sizes are multiples of 32. Axis 0
of every stored volume (after the case axis, and the ROI axis of `structures`) is z.

Splits: openkbp and prostate keep the challenge folders (train-pats -> train, validation-pats ->
val, test-pats -> test); ham10000 (by lesion_id) and stoic (by patient) are split 70/10/20 with
a seeded permutation (--seed). Synthetic files split their cases 70/10/20 as well.

Items (open_dataset): "image" float32 (C, *spatial), normalised: CT = clip(HU, -1000, 1500) / 1000,
so air is -1 and dense bone 1.5; RGB = (x / 255 - ImageNet mean) / ImageNet std. Pixel tasks are
(n_out, *spatial): dose float32 in Gy, masks bool (a quarter of the bytes of float through the
DataLoader; call .float() on the device, as train.py does); image tasks are int64 scalars;
openkbp and prostate add "possible_dose_mask" bool (1, *spatial); every item has "case" (row),
"slice" (axial index, -1 for whole cases) and "id". `dataset.case(i)` gives case i whole, in the
stored raw units.

Bringing your own prostate data (the paper's is private): write it in the OpenKBP layout,
RAW_DIR/{train-pats,validation-pats,test-pats}/<patient>/ with ct.csv (HU + 1024), dose.csv (Gy),
possible_dose_mask.csv, voxel_dimensions.csv (three lines, mm) and one <ROI>.csv per contoured
ROI; value files have the header `,data` and rows `flat_index,value` for the non-zero voxels, mask
files rows `flat_index,`; flat_index is the C-order index into the D x H x W volume (axis 2 = z).
Then `python data.py convert prostate RAW_DIR --rois NAME1,NAME2,... --shape D,H,W`.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
import time
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

FORMAT_VERSION = 2
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)
OPENKBP_ROIS = ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx",
                "Mandible", "PTV56", "PTV63", "PTV70")
PROSTATE_ROIS = ("Bladder", "Rectum", "FemoralHead_L", "FemoralHead_R", "PTV")
HAM_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
HU_MIN, HU_MAX, HU_SCALE = -1000.0, 1500.0, 1000.0          # CT normalisation: clip, then divide
RGB_MEAN, RGB_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics


# ----------------------------------------------------------------------------- dataset specs
class Spec(NamedTuple):
    modality: str      # "ct": 1 channel in HU; "rgb": 3 channels uint8
    model_dims: tuple  # model dims a reader may ask for: 2 = axial slices / images, 3 = volumes
    synth_n: int       # default number of synthetic cases
    synth_size: int    # default synthetic spatial size (cube side / square side)
    tasks: dict        # task -> (kind, n_out); n_out None = number of ROIs
    rois: tuple        # default ROI list (structures channels)


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


def _schema(name: str, spatial: tuple, n_rois: int) -> dict:
    """Per-split arrays: key -> (shape after the case axis, allowed dtypes; the first is written)."""
    s = tuple(spatial)
    if name == "ham10000":
        return {"image": (s + (3,), ("uint8",)), "segmentation": (s, ("bool",)),
                "diagnosis": ((), ("int64",)), "id": ((), ("str",)), "lesion_id": ((), ("str",)),
                "original_size": ((2,), ("int32",))}
    if name == "stoic":
        return {"image": (s, ("int16", "float32")), "covid": ((), ("int64",)), "severe": ((), ("int64",)),
                "id": ((), ("str",)), "voxel_dimensions": ((3,), ("float64",)),
                "original_shape": ((3,), ("int32",)), "original_voxel_dimensions": ((3,), ("float64",))}
    return {"image": (s, ("int16", "float32")), "dose": (s, ("float32",)),
            "structures": ((n_rois,) + s, ("bool",)), "possible_dose_mask": (s, ("bool",)),
            "voxel_dimensions": ((3,), ("float64",)), "id": ((), ("str",))}


# ----------------------------------------------------------------------------- errors
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
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ----------------------------------------------------------------------------- MetaImage reader
_MET_TYPES = {"MET_CHAR": "i1", "MET_UCHAR": "u1", "MET_SHORT": "i2", "MET_USHORT": "u2",
              "MET_INT": "i4", "MET_UINT": "u4", "MET_LONG": "i4", "MET_ULONG": "u4",
              "MET_LONG_LONG": "i8", "MET_ULONG_LONG": "u8", "MET_FLOAT": "f4", "MET_DOUBLE": "f8"}


def read_metaimage(path) -> tuple[np.ndarray, np.ndarray]:
    """Read a MetaImage (.mha with LOCAL data, or .mhd + external .raw/.zraw; zlib if
    CompressedData = True) with numpy + zlib. Returns (array, spacing): the array with axes
    reversed from DimSize (z, y, x for 3D), spacing in mm in the same axis order. Orientation
    (TransformMatrix, Offset) is ignored."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found: expected a MetaImage .mha or .mhd file")
    header = {}
    with open(path, "rb") as fh:
        while True:
            line = fh.readline()
            if not line:
                raise DataError(f"{path}: MetaImage header has no ElementDataFile line: not a MetaImage file")
            key, sep, value = line.decode("latin-1").partition("=")
            if sep:
                header[key.strip()] = value.strip()
                if key.strip() == "ElementDataFile":
                    break
        raw = fh.read() if header["ElementDataFile"] == "LOCAL" else None
    try:
        shape = [int(v) for v in header["DimSize"].split()]
        etype = header["ElementType"]
    except (KeyError, ValueError) as e:
        raise DataError(f"{path}: MetaImage header lacks a valid DimSize or ElementType ({_first_line(e)})")
    if etype not in _MET_TYPES:
        raise DataError(f"{path}: unsupported ElementType {etype}: expected one of {', '.join(_MET_TYPES)}")
    if int(header.get("ElementNumberOfChannels", 1)) != 1:
        raise DataError(f"{path}: multi-channel MetaImage is not supported: store one channel per file")
    msb = header.get("BinaryDataByteOrderMSB", header.get("ElementByteOrderMSB", "False")).lower() == "true"
    dtype = np.dtype(_MET_TYPES[etype]).newbyteorder(">" if msb else "<")
    if raw is None:
        name = header["ElementDataFile"]
        if name.startswith("LIST") or "%" in name:
            raise DataError(f"{path}: ElementDataFile {name!r} (one file per slice) is not supported: "
                            "resave as a single .mha")
        data_path = path.parent / name
        if not data_path.is_file():
            raise DataError(f"{path}: its data file {data_path} is missing: put it next to the header")
        raw = data_path.read_bytes()
    nbytes = math.prod(shape) * dtype.itemsize
    if header.get("CompressedData", "False").lower() == "true":
        try:
            raw = zlib.decompress(raw, 47)  # 32 + 15: zlib or gzip stream
        except zlib.error as e:
            raise DataError(f"{path}: corrupt zlib data ({e}): re-export the image")
    else:
        header_size = int(header.get("HeaderSize", 0))
        raw = raw[len(raw) - nbytes:] if header_size == -1 else raw[header_size:]
    if len(raw) != nbytes:
        raise DataError(f"{path}: {len(raw)} data bytes, expected {nbytes} for DimSize {shape} "
                        f"of {etype}: the file is truncated or the header is wrong")
    spacing = header.get("ElementSpacing", header.get("ElementSize", " ".join(["1"] * len(shape))))
    spacing = np.array([float(v) for v in spacing.split()][::-1], dtype=np.float64)
    array = np.frombuffer(raw, dtype).reshape(shape[::-1]).astype(dtype.newbyteorder("="))
    return array, spacing


# ----------------------------------------------------------------------------- HDF5 writing
@contextmanager
def _atomic_h5(out):
    """Open a temporary HDF5 file next to `out`; rename it to `out` only if the block succeeds."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            yield f
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_attrs(f, name, rois=(), synthetic=False, source=""):
    """File attributes of the layout (see the module docstring)."""
    f.attrs.update(dataset=name, tasks=json.dumps(task_spec(name, len(rois))),
                   dims=2 if SPECS[name].modality == "rgb" else 3, synthetic=bool(synthetic),
                   source=str(source), converter=f"data.py {FORMAT_VERSION}", format_version=FORMAT_VERSION,
                   created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if name in PLANNING:
        f.attrs["roi_names"] = json.dumps(list(rois))
    if name == "ham10000":
        f.attrs["classes"] = json.dumps(list(HAM_CLASSES))


def _create_split(f, split, n, name, spatial, n_rois=0):
    """Preallocate one split (chunked, compressed), so cases can be written one at a time."""
    g = f.create_group(split)
    for key, (tail, dtypes) in _schema(name, spatial, n_rois).items():
        dtype = h5py.string_dtype() if dtypes[0] == "str" else np.dtype(dtypes[0])
        if len(tail) < 2:
            g.create_dataset(key, shape=(n,) + tail, dtype=dtype)
            continue
        chunks = (1,) + tail[:-3] + (1,) + tail[-2:] if name in PLANNING else (1,) + tail  # one axial slice
        g.create_dataset(key, shape=(n,) + tail, maxshape=(None,) + tail, dtype=dtype, chunks=chunks,
                         compression="gzip", compression_opts=4, shuffle=dtype.itemsize > 1)
    return g


def _write_case(group, i, case: dict):
    for key, value in case.items():
        group[key][i] = value


def _split_counts(n, fractions=SPLIT_FRACTIONS):
    """Sizes of train/val/test for n items: val and test get at least one each."""
    if n < 3:
        raise DataError(f"{n} cases cannot fill train, val and test: use at least 3")
    val, test = max(1, round(n * fractions[1])), max(1, round(n * fractions[2]))
    return n - val - test, val, test


def _seeded_split(keys, seed):
    """{key: split} from a seeded permutation of the sorted unique keys, 70/10/20."""
    keys = sorted(set(keys))
    order = np.random.default_rng(seed).permutation(len(keys))
    counts = _split_counts(len(keys))
    bounds = np.cumsum(counts)
    return {keys[j]: SPLITS[int(np.searchsorted(bounds, rank, side="right"))] for rank, j in enumerate(order)}


class _Progress:
    """A line on stderr every `every` items and at the end: count, elapsed time, ETA."""

    def __init__(self, total, label, every=10, stream=None):
        self.total, self.label, self.every, self.done = total, label, every, 0
        self.stream, self.start = stream if stream is not None else sys.stderr, time.monotonic()

    def step(self):
        self.done += 1
        if self.done % self.every == 0 or self.done == self.total:
            elapsed = time.monotonic() - self.start
            eta = elapsed / self.done * (self.total - self.done)
            print(f"{self.label}: {self.done}/{self.total}, {elapsed:.0f}s elapsed, ETA {eta:.0f}s",
                  file=self.stream, flush=True)


# ----------------------------------------------------------------------------- converters
OPENKBP_SPLITS = {"train": "train-pats", "val": "validation-pats", "test": "test-pats"}
OPENKBP_FILES = ("ct.csv", "dose.csv", "possible_dose_mask.csv", "voxel_dimensions.csv")


def _natural_key(path: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _shape3(shape) -> tuple:
    """128 or "128" or "128,128,96" -> (D, H, W), each a multiple of 32."""
    try:
        dims = [int(v) for v in str(shape).split(",")] if isinstance(shape, (str, int)) else [int(v) for v in shape]
    except ValueError:
        raise DataError(f"bad shape {shape!r}: give one integer or D,H,W, e.g. 128 or 128,128,96")
    dims = dims * 3 if len(dims) == 1 else dims
    if len(dims) != 3 or any(d <= 0 or d % 32 for d in dims):
        raise DataError(f"bad shape {shape!r}: need three positive multiples of 32 (models downsample by 32); "
                        "pad or crop the volumes before converting")
    return tuple(dims)


def read_sparse_csv(path, shape, values=True) -> np.ndarray:
    """An OpenKBP CSV (header `,data`; rows `flat_index,value`, or `flat_index,` for masks) as a
    dense C-order array of `shape`: float64 values, or bool for masks. Unlisted voxels are 0."""
    path = Path(path)
    with open(path) as fh:
        header = fh.readline()
    if "data" not in header:
        raise DataError(f"{path}: first line is {header.strip()!r}, expected the OpenKBP header ',data'")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # header-only files: "input contained no data"
            rows = np.loadtxt(path, delimiter=",", skiprows=1, usecols=(0, 1) if values else (0,),
                              ndmin=2, dtype=np.float64)
    except ValueError as e:
        raise DataError(f"{path}: cannot parse ({_first_line(e)}): expected rows 'flat_index,value'"
                        + ("" if values else " or 'flat_index,'"))
    if values and not np.isfinite(rows[:, 1]).all():
        raise DataError(f"{path}: NaN or inf among the values: fix the source data")
    size = math.prod(shape)
    index = rows[:, 0].astype(np.int64)
    if len(index) and (index.min() < 0 or index.max() >= size or (index != rows[:, 0]).any()):
        raise DataError(f"{path}: flat index out of range for shape {shape} (max {rows[:, 0].max():.0f}): "
                        "pass the right --shape")
    dense = np.zeros(size, np.float64 if values else bool)
    dense[index] = rows[:, 1] if values else True
    return dense.reshape(shape)


def axial_first(volume: np.ndarray) -> np.ndarray:
    """(..., D, H, W) with W the axial axis z, as the OpenKBP CSVs index it -> (..., Z, D, H),
    the stored order of the planning datasets."""
    return np.moveaxis(volume, -1, -3)


def axial_slice(k: int) -> tuple:
    """Index of axial slice k in a stored planning array (..., Z, D, H) or a prediction of it."""
    return (Ellipsis, k, slice(None), slice(None))


def read_openkbp_patient(folder, shape=(128, 128, 128), rois=OPENKBP_ROIS) -> dict:
    """One OpenKBP-layout patient folder (volumes of `shape` = (D, H, W), W = z) as the arrays
    of one case of the layout (z first)."""
    folder = Path(folder)
    raw_ct = read_sparse_csv(folder / "ct.csv", shape)
    if (raw_ct != np.round(raw_ct)).any() or raw_ct.max(initial=0) > 32767 + 1024 or raw_ct.min(initial=0) < 0:
        raise DataError(f"{folder / 'ct.csv'}: values must be integers in 0..33791 (HU + 1024); "
                        "data.py stores CT as int16 HU")
    try:
        voxel = np.loadtxt(folder / "voxel_dimensions.csv", dtype=np.float64, ndmin=1)
    except ValueError as e:
        raise DataError(f"{folder / 'voxel_dimensions.csv'}: cannot parse ({_first_line(e)}): expected 3 numbers (mm)")
    if voxel.shape != (3,):
        raise DataError(f"{folder / 'voxel_dimensions.csv'}: expected 3 numbers (mm), got {voxel.size}")
    structures = np.zeros((len(rois),) + tuple(shape), bool)
    for r, roi in enumerate(rois):
        if (folder / f"{roi}.csv").is_file():
            structures[r] = read_sparse_csv(folder / f"{roi}.csv", shape, values=False)
    return {"image": axial_first((raw_ct - 1024).astype(np.int16)),
            "dose": axial_first(read_sparse_csv(folder / "dose.csv", shape).astype(np.float32)),
            "structures": axial_first(structures),
            "possible_dose_mask": axial_first(read_sparse_csv(folder / "possible_dose_mask.csv", shape, values=False)),
            "voxel_dimensions": voxel[[2, 0, 1]], "id": folder.name}  # mm per (Z, D, H)


def _openkbp_patients(raw_dir: Path, rois) -> tuple[dict, set]:
    """{split: [patient folders]} after checking that every required file exists, and the CSV
    names found that are neither required nor in `rois` (ROIs that will be left out)."""
    missing_dirs = [d for d in OPENKBP_SPLITS.values() if not (raw_dir / d).is_dir()]
    if missing_dirs:
        raise DataError(f"{raw_dir} lacks {', '.join(d + '/' for d in missing_dirs)}: point RAW_DIR at a folder "
                        "holding train-pats/, validation-pats/ and test-pats/ (open-kbp's provided-data)")
    patients, lacking, extra = {}, [], set()
    for split, sub in OPENKBP_SPLITS.items():
        patients[split] = sorted((p for p in (raw_dir / sub).iterdir() if p.is_dir()), key=_natural_key)
        for p in patients[split]:
            names = {c.name for c in p.glob("*.csv")}
            gone = [f for f in OPENKBP_FILES if f not in names]
            if gone:
                lacking.append(f"{p} lacks {', '.join(gone)}")
            extra |= {n[:-4] for n in names} - {f[:-4] for f in OPENKBP_FILES} - set(rois)
    if lacking:
        more = f" (and {len(lacking) - 1} more patients)" if len(lacking) > 1 else ""
        raise DataError(f"{lacking[0]}{more}: every patient folder needs {', '.join(OPENKBP_FILES)}")
    if not any(patients.values()):
        raise DataError(f"{raw_dir}: no patient folders under {', '.join(OPENKBP_SPLITS.values())}")
    return patients, extra


def convert_openkbp(raw_dir, out, name="openkbp", rois=None, shape=128, log=None) -> Path:
    """OpenKBP-layout CSV folders (openkbp, or prostate with its own `rois`) -> HDF5, patient by
    patient into preallocated datasets, so memory stays at a few patients' worth."""
    raw_dir, rois, shape = Path(raw_dir), tuple(rois or SPECS[name].rois), _shape3(shape)
    log = log if log is not None else sys.stderr
    patients, extra = _openkbp_patients(raw_dir, rois)
    progress = _Progress(sum(map(len, patients.values())), f"convert {name}", stream=log)
    with _atomic_h5(out) as f:
        _write_attrs(f, name, rois, synthetic=False, source=raw_dir.resolve())
        for split, folders in patients.items():
            stored = axial_first(np.empty(shape, bool)).shape  # (Z, D, H)
            g = _create_split(f, split, len(folders), name, stored, len(rois))
            for i, folder in enumerate(folders):
                _write_case(g, i, read_openkbp_patient(folder, shape, rois))
                progress.step()
    if extra:
        print(f"note: ignored ROI files {', '.join(sorted(extra))} (add them to --rois to keep them)", file=log)
    return Path(out)


HAM_MASK_DIR = "HAM10000_segmentations_lesion_tschandl"
HAM_METADATA = "HAM10000_metadata.csv"


def _parse_size2(size) -> tuple:
    """"256x192" (width x height, as PIL) or (256, 192) -> (height, width), multiples of 32."""
    try:
        w, h = (int(v) for v in (size.lower().split("x") if isinstance(size, str) else size))
    except ValueError:
        raise DataError(f"bad size {size!r}: give WIDTHxHEIGHT, e.g. 256x192")
    if w <= 0 or h <= 0 or w % 32 or h % 32:
        raise DataError(f"bad size {size!r}: width and height must be positive multiples of 32, e.g. 256x192")
    return h, w


def convert_ham10000(raw_dir, out, size="256x192", seed=0, log=None) -> Path:
    """HAM10000 release (images, metadata CSV, Tschandl lesion masks) -> HDF5 at a fixed size,
    split 70/10/20 by lesion_id with a seeded permutation."""
    raw_dir, (height, width) = Path(raw_dir), _parse_size2(size)
    log = log if log is not None else sys.stderr
    image_dirs = sorted(d for d in raw_dir.glob("HAM10000_images*") if d.is_dir())
    present = {HAM_METADATA: (raw_dir / HAM_METADATA).is_file(),
               "HAM10000_images_part1/, HAM10000_images_part2/": bool(image_dirs),
               HAM_MASK_DIR + "/": (raw_dir / HAM_MASK_DIR).is_dir()}
    gone = [name for name, ok in present.items() if not ok]
    if gone:
        raise DataError(f"{raw_dir} lacks {', '.join(gone)}: point RAW_DIR at the unpacked HAM10000 release "
                        "plus its lesion segmentations")
    with open(raw_dir / HAM_METADATA, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"lesion_id", "image_id", "dx"} <= set(rows[0]):
        raise DataError(f"{raw_dir / HAM_METADATA}: needs a header with lesion_id, image_id, dx and data rows")
    bad = sorted({r["dx"] for r in rows} - set(HAM_CLASSES))
    if bad:
        raise DataError(f"{raw_dir / HAM_METADATA}: unknown dx {', '.join(bad)}: expected {', '.join(HAM_CLASSES)}")
    images = {p.stem: p for d in image_dirs for p in d.glob("*.jpg")}
    masks = {r["image_id"]: raw_dir / HAM_MASK_DIR / f"{r['image_id']}_segmentation.png" for r in rows}
    lacking = [f"{r['image_id']}.jpg" for r in rows if r["image_id"] not in images] \
        + [m.name for m in masks.values() if not m.is_file()]
    if lacking:
        raise DataError(f"{raw_dir}: {len(lacking)} files listed in {HAM_METADATA} are missing "
                        f"(first: {', '.join(lacking[:3])}): unpack all image parts and the masks")
    split_of = _seeded_split([r["lesion_id"] for r in rows], seed)
    progress = _Progress(len(rows), "convert ham10000", every=500, stream=log)
    with _atomic_h5(out) as f:
        _write_attrs(f, "ham10000", synthetic=False, source=raw_dir.resolve())
        for split in SPLITS:
            chosen = sorted((r for r in rows if split_of[r["lesion_id"]] == split), key=lambda r: r["image_id"])
            g = _create_split(f, split, len(chosen), "ham10000", (height, width))
            for i, r in enumerate(chosen):
                with Image.open(images[r["image_id"]]) as im:
                    rgb = im.convert("RGB")
                with Image.open(masks[r["image_id"]]) as m:
                    mask = m.convert("L")
                original = (rgb.height, rgb.width)
                if original != (height, width):
                    rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
                if mask.size != (width, height):
                    mask = mask.resize((width, height), Image.Resampling.BILINEAR)
                _write_case(g, i, {"image": np.asarray(rgb), "segmentation": np.asarray(mask) > 128,
                                   "diagnosis": HAM_CLASSES.index(r["dx"]), "id": r["image_id"],
                                   "lesion_id": r["lesion_id"], "original_size": original})
                progress.step()
    return Path(out)


def resize_volume(volume: np.ndarray, shape) -> np.ndarray:
    """float32 volume resized to `shape`: area averaging along axes that shrink (no aliasing),
    then trilinear along axes that grow; unchanged values when the shape already matches."""
    volume = np.asarray(volume, np.float32)
    shape = tuple(shape)
    if volume.shape == shape:
        return volume
    t = torch.from_numpy(volume)[None, None]
    smaller = tuple(min(a, b) for a, b in zip(volume.shape, shape))
    if smaller != volume.shape:
        t = F.adaptive_avg_pool3d(t, smaller)
    if smaller != shape:
        t = F.interpolate(t, size=shape, mode="trilinear", align_corners=False)
    return t[0, 0].numpy()


def convert_stoic(raw_dir, out, size=128, seed=0, log=None) -> Path:
    """STOIC 2021 (data/mha/<PatientID>.mha or .mhd, metadata/reference.csv) -> HDF5 with every
    scan resized to size^3 (int16 HU), split 70/10/20 by a seeded permutation of patients."""
    raw_dir = Path(raw_dir)
    log = log if log is not None else sys.stderr
    side = int(size) if str(size).isdigit() else 0
    if side <= 0 or side % 32:
        raise DataError(f"bad size {size!r}: give one positive multiple of 32 (cube side), e.g. 128")
    shape = (side,) * 3
    reference, scan_dir = raw_dir / "metadata" / "reference.csv", raw_dir / "data" / "mha"
    gone = [str(p.relative_to(raw_dir)) for p in (reference, scan_dir) if not p.exists()]
    if gone:
        raise DataError(f"{raw_dir} lacks {', '.join(gone)}: point RAW_DIR at the STOIC 2021 folder "
                        "holding data/mha/ and metadata/reference.csv")
    with open(reference, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"PatientID", "probCOVID", "probSevere"} <= set(rows[0]):
        raise DataError(f"{reference}: needs a header with PatientID, probCOVID, probSevere and data rows")
    scans = {}
    for r in rows:
        found = [scan_dir / f"{r['PatientID']}{ext}" for ext in (".mha", ".mhd")]
        scans[r["PatientID"]] = next((p for p in found if p.is_file()), None)
    lacking = [f"{pid}.mha" for pid, p in scans.items() if p is None]
    if lacking:
        raise DataError(f"{scan_dir}: {len(lacking)} scans listed in reference.csv are missing "
                        f"(first: {', '.join(lacking[:3])}): download all of data/mha")

    def label(r, key):
        value = r[key].strip()
        if value not in ("0", "1", "0.0", "1.0"):
            raise DataError(f"{reference}: {key} of {r['PatientID']} is {r[key]}, expected 0 or 1")
        return int(float(value))

    labels = {r["PatientID"]: {"covid": label(r, "probCOVID"), "severe": label(r, "probSevere")} for r in rows}
    split_of = _seeded_split(list(scans), seed)
    progress = _Progress(len(rows), "convert stoic", every=20, stream=log)
    with _atomic_h5(out) as f:
        _write_attrs(f, "stoic", synthetic=False, source=raw_dir.resolve())
        for split in SPLITS:
            chosen = sorted(pid for pid in scans if split_of[pid] == split)
            g = _create_split(f, split, len(chosen), "stoic", shape)
            for i, pid in enumerate(chosen):
                volume, spacing = read_metaimage(scans[pid])
                if volume.ndim != 3:
                    raise DataError(f"{scans[pid]}: {volume.ndim}D image, expected a 3D CT")
                if volume.dtype.kind == "f" and not np.isfinite(volume).all():
                    raise DataError(f"{scans[pid]}: NaN or inf in the image: fix or drop this scan")
                hu = np.clip(np.rint(resize_volume(volume, shape)), -32768, 32767).astype(np.int16)
                _write_case(g, i, {"image": hu, **labels[pid], "id": pid, "original_shape": volume.shape,
                                   "original_voxel_dimensions": spacing,
                                   "voxel_dimensions": spacing * np.array(volume.shape) / np.array(shape)})
                progress.step()
    return Path(out)


def convert(name, raw_dir, out=None, *, shape=None, rois=None, size=None, seed=0, log=None) -> Path:
    """Convert the raw public release of dataset `name` in `raw_dir` to `out` (data/NAME.h5).
    openkbp/prostate take `shape` and `rois`; ham10000 (WIDTHxHEIGHT) and stoic (side) take
    `size`; ham10000 and stoic take `seed` for their split."""
    check_name(name)
    raw_dir, out = Path(raw_dir), Path(out) if out else default_path(name)
    if not raw_dir.is_dir():
        raise DataError(f"raw folder {raw_dir} not found: pass the folder of the unpacked {name} release")
    if name in PLANNING:
        if size is not None:
            raise DataError(f"--size does not apply to {name}: use --shape D,H,W (the raw volume shape)")
        if isinstance(rois, str):
            rois = [r.strip() for r in rois.split(",") if r.strip()]
        return convert_openkbp(raw_dir, out, name, rois=rois, shape=shape or 128, log=log)
    if shape is not None or rois:
        raise DataError(f"--shape and --rois apply to openkbp and prostate only; {name} takes --size")
    if name == "ham10000":
        return convert_ham10000(raw_dir, out, size=size or "256x192", seed=seed, log=log)
    return convert_stoic(raw_dir, out, size=size or 128, seed=seed, log=log)


# ----------------------------------------------------------------------------- synthetic stand-ins
def _grid(size, dims=3):
    """Voxel-centre coordinates in [-1, 1] per axis, as broadcastable open grids."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    return np.ix_(*[c] * dims)


def _ellipsoid(grid, centre, radii):
    """Mask of an axis-aligned ellipsoid (a radius of inf makes a cylinder)."""
    return sum(((x - c) / r) ** 2 for x, c, r in zip(grid, centre, radii)) <= 1


def _distance(grid, centre):
    return np.sqrt(sum((x - c) ** 2 for x, c in zip(grid, centre)))


def _synth_plan_case(rng, name, size):
    """One synthetic planning CT, built on axes (D, H, W) with W = z like the raw CSVs and returned
    z first like a converted case. Organs are ellipsoids with distinct HU; each PTV is a sphere
    visible as an enhancing blob; the dose is the prescription inside each PTV, falls off with
    distance from it, is lowered in spared OARs and is zero outside the body (= possible dose mask)."""
    g = _grid(size)
    inf = np.inf

    def j(v, s=0.04):
        return v + rng.normal(0, s)

    shape = (size,) * 3
    body = _ellipsoid(g, (j(0), j(0), 0), (j(0.75, 0.03), j(0.65, 0.03) + (0.2 if name == "prostate" else 0), inf))
    hu = np.where(body, 40.0, -1024.0).astype(np.float32)
    if name == "openkbp":
        spine = (j(0.4), j(0), 0)
        organs = [  # (roi or None, mask, HU), painted in this order
            (None, _ellipsoid(g, spine, (0.16, 0.16, inf)), 800),  # vertebrae
            ("SpinalCord", _ellipsoid(g, spine, (0.07, 0.07, inf)) & (g[2] < 0.45), 250),
            ("Brainstem", _ellipsoid(g, (j(0.35), j(0), j(0.7)), (0.12, 0.12, 0.25)), 200),
            ("RightParotid", _ellipsoid(g, (j(0.05), j(-0.45), j(0.4)), (0.16, 0.1, 0.18)), -150),
            ("LeftParotid", _ellipsoid(g, (j(0.05), j(0.45), j(0.4)), (0.16, 0.1, 0.18)), -150),
            ("Esophagus", _ellipsoid(g, (j(0.2), j(0), 0), (0.06, 0.08, inf)) & (g[2] < j(-0.1)), -400),
            ("Larynx", _ellipsoid(g, (j(-0.25), j(0), j(-0.25)), (0.12, 0.12, 0.2)), -600),
            ("Mandible", _ellipsoid(g, (j(-0.25), j(0), j(0.3)), (0.4, 0.45, 0.12))
             & ~_ellipsoid(g, (-0.2, 0, 0.3), (0.32, 0.37, inf)) & (g[0] < -0.2), 1200),
        ]
        primary = (j(-0.3, 0.1), rng.uniform(-0.3, 0.3), j(0.0, 0.15))
        r70 = rng.uniform(0.1, 0.16)
        targets = [("PTV56", primary, r70 + rng.uniform(0.08, 0.14), 56.0, 130), ("PTV70", primary, r70, 70.0, 320)]
        if rng.random() < 0.6:
            node = (j(0.0, 0.1), rng.choice([-1, 1]) * rng.uniform(0.3, 0.45), j(-0.3, 0.1))
            targets.insert(1, ("PTV63", node, rng.uniform(0.08, 0.13), 63.0, 260))
        spared = ("RightParotid", "LeftParotid", "SpinalCord", "Brainstem")
    else:
        organs = [
            ("FemoralHead_R", _ellipsoid(g, (j(0.05), j(-0.6), j(0.1)), (0.14, 0.14, 0.16)), 900),
            ("FemoralHead_L", _ellipsoid(g, (j(0.05), j(0.6), j(0.1)), (0.14, 0.14, 0.16)), 900),
            ("Bladder", _ellipsoid(g, (j(-0.2), j(0), j(0.35)), (j(0.2), j(0.22), 0.2)), -100),
            ("Rectum", _ellipsoid(g, (j(0.35), j(0), 0), (0.09, 0.1, inf)) & (g[2] < j(0.2)), -350),
        ]
        targets = [("PTV", (j(0.05), j(0, 0.03), j(-0.05)), rng.uniform(0.12, 0.18), 78.0, 200)]
        spared = ("Bladder", "Rectum", "FemoralHead_R", "FemoralHead_L")
    rois = SPECS[name].rois
    structures = np.zeros((len(rois),) + shape, bool)
    for roi, mask, value in organs:
        hu[mask & body] = value
        if roi:
            structures[rois.index(roi)] = mask & body
    dose = np.zeros(shape, np.float32)
    for roi, centre, radius, rx, value in targets:
        d = _distance(g, centre)
        hu[(d <= radius) & body] = value
        structures[rois.index(roi)] = (d <= radius) & body
        dose = np.maximum(dose, rx * np.exp(-np.maximum(d - radius, 0) / 0.4))
    in_target = structures[[rois.index(t[0]) for t in targets]].any(0)
    for roi in spared:
        dose[structures[rois.index(roi)] & ~in_target] *= 0.75
    hu[body] += rng.normal(0, 15, int(body.sum())).astype(np.float32)
    voxel = np.array([3.906, 3.906, 2.5]) * 128 / size
    return {"image": axial_first(np.rint(hu).astype(np.int16)), "dose": axial_first((dose * body).astype(np.float32)),
            "structures": axial_first(structures), "possible_dose_mask": axial_first(body),
            "voxel_dimensions": voxel[[2, 0, 1]]}


# Lesion look per class: mean RGB, radius range (fraction of half the image), border irregularity.
_LESIONS = {"akiec": ((200, 100, 90), (0.35, 0.55), 0.15), "bcc": ((230, 170, 190), (0.35, 0.55), 0.2),
            "bkl": ((170, 130, 80), (0.4, 0.65), 0.1), "df": ((140, 90, 120), (0.2, 0.35), 0.05),
            "mel": ((60, 40, 35), (0.5, 0.75), 0.3), "nv": ((115, 70, 45), (0.35, 0.55), 0.03),
            "vasc": ((170, 30, 60), (0.2, 0.35), 0.05)}
_LESION_FREQ = {"akiec": 0.08, "bcc": 0.08, "bkl": 0.12, "df": 0.07, "mel": 0.13, "nv": 0.45, "vasc": 0.07}


def _synth_lesion(rng):
    """Parameters of one synthetic lesion: its class decides colour, size and border."""
    cls = rng.choice(HAM_CLASSES, p=[_LESION_FREQ[c] for c in HAM_CLASSES])
    colour, (r0, r1), rough = _LESIONS[cls]
    return {"diagnosis": HAM_CLASSES.index(cls), "colour": np.array(colour) * rng.normal(1, 0.07, 3),
            "radius": rng.uniform(r0, r1), "aspect": rng.uniform(0.7, 1.0), "rough": rough,
            "phase": rng.uniform(0, 2 * np.pi, 3), "skin": np.array([225, 185, 155]) + rng.normal(0, 12, 3)}


def _render_lesion(rng, p, size):
    """One photo of a lesion: a new position, angle and noise each time (several per lesion)."""
    y, x = _grid(size, 2)
    cy, cx, angle = rng.normal(0, 0.1), rng.normal(0, 0.1), rng.uniform(0, np.pi)
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    v = ((y - cy) * np.cos(angle) - (x - cx) * np.sin(angle)) / p["aspect"]
    rho, theta = np.hypot(u, v), np.arctan2(v, u)
    edge = p["radius"] * (1 + p["rough"] * sum(np.sin(k * theta + ph) / k for k, ph in zip((3, 5, 7), p["phase"])))
    mask = rho <= edge
    shade = (0.85 + 0.15 * np.clip(rho / edge, 0, 1))[..., None]
    rgb = np.where(mask[..., None], p["colour"] * shade, p["skin"])
    rgb = rgb + rng.normal(0, 6, rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), mask


def _synth_stoic_case(rng, size, covid, severe):
    """One synthetic chest CT, axes (z, y, x): body, two lungs, and ground-glass opacities
    (HU -450..-200) in the lungs for COVID, more and larger when severe; some non-COVID
    scans get a small solid nodule instead."""
    _, y, x = g = _grid(size)
    hu = np.full((size,) * 3, -1000.0, np.float32)
    body = np.broadcast_to(_ellipsoid((y, x), (rng.normal(0, 0.03), 0), (0.75, 0.92)), hu.shape)
    hu[body] = 40
    lungs = [((rng.normal(0, 0.03), -0.05, side * 0.42), (0.8, 0.55, 0.32)) for side in (-1, 1)]
    lung = _ellipsoid(g, *lungs[0]) | _ellipsoid(g, *lungs[1])
    hu[lung] = -850
    if covid and severe:
        n, radii, values = rng.integers(6, 12), (0.2, 0.3), (-450, -200)
    elif covid:
        n, radii, values = rng.integers(3, 7), (0.12, 0.2), (-450, -200)
    else:  # at most one small solid nodule
        n, radii, values = int(rng.random() < 0.5), (0.08, 0.1), (30, 50)
    for _ in range(n):
        centre, axes = lungs[rng.integers(2)]
        direction = rng.normal(size=3)
        point = np.array(centre) + np.array(axes) * 0.7 * rng.random() ** (1 / 3) * direction / np.linalg.norm(direction)
        blob = (_distance(g, point) <= rng.uniform(*radii)) & lung
        hu[blob] = rng.uniform(*values)
    hu[body] += rng.normal(0, 20, int(body.sum())).astype(np.float32)
    return np.rint(hu).astype(np.int16)


def synth(name, out=None, n=None, size=None, seed=0) -> Path:
    """Write a synthetic stand-in of dataset `name` with the real layout (attr synthetic=True):
    n cases (default 30 / 300 / 80), spatial size `size` (a multiple of 32), split 70/10/20."""
    spec = SPECS[check_name(name)]
    n, size = spec.synth_n if n is None else int(n), spec.synth_size if size is None else int(size)
    if size <= 0 or size % 32:
        raise DataError(f"--size {size} is not a positive multiple of 32: models downsample by 32, use e.g. 64")
    out = Path(out) if out else default_path(name)
    rng = np.random.default_rng(seed)
    counts = _split_counts(n)  # volumes; ham10000 splits its lesions instead
    with _atomic_h5(out) as f:
        _write_attrs(f, name, spec.rois, synthetic=True, source=f"synthetic seed={seed}")
        if name == "ham10000":
            lesions = [_synth_lesion(rng) for _ in range(max(3, round(n / 1.25)))]
            owner = list(range(len(lesions))) + list(rng.integers(0, len(lesions), n - len(lesions)))
            split_of = _seeded_split(range(len(lesions)), seed)
            for split in SPLITS:
                chosen = [k for k in owner if split_of[k] == split]
                g = _create_split(f, split, len(chosen), name, (size, size))
                for i, k in enumerate(chosen):
                    image, mask = _render_lesion(rng, lesions[k], size)
                    _write_case(g, i, {"image": image, "segmentation": mask, "diagnosis": lesions[k]["diagnosis"],
                                       "id": f"SYN_{split}_{i:05d}", "lesion_id": f"SYN_L{k:05d}",
                                       "original_size": (size, size)})
            return out
        # STOIC labels: 60 % COVID, a third of those severe, dealt so that every split of >= 5 scans
        # holds every class (otherwise a small val/test split can lack severe cases and its AUC is NaN).
        stoic_labels = ((0, 0), (0, 0), (1, 0), (1, 0), (1, 1))
        for split, count in zip(SPLITS, counts):
            g = _create_split(f, split, count, name, (size,) * 3, len(spec.rois))
            deal = rng.permutation(count) % len(stoic_labels)
            for i in range(count):
                case = {"id": f"syn_{split}_{i:03d}"}
                if name == "stoic":
                    covid, severe = stoic_labels[deal[i]]
                    voxel = np.full(3, 320.0 / size)
                    case.update(image=_synth_stoic_case(rng, size, covid, severe), covid=int(covid),
                                severe=int(severe), voxel_dimensions=voxel, original_shape=(size,) * 3,
                                original_voxel_dimensions=voxel)
                else:
                    case.update(_synth_plan_case(rng, name, size))
                _write_case(g, i, case)
    return out


# ----------------------------------------------------------------------------- reading
def _open_h5(path) -> h5py.File:
    path = Path(path)
    if not path.is_file():
        name = path.stem if path.stem in SPECS else "NAME"
        raise DataError(f"{path} not found: {_make_hint(name, out=path)}")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path} is not a readable HDF5 file ({_first_line(e)}): rebuild it with data.py synth or convert")


def _dtype_name(ds) -> str:
    return "str" if h5py.check_string_dtype(ds.dtype) else ds.dtype.name


def check_layout(f: h5py.File, path) -> dict:
    """Check the structure of an open file against the layout (attributes, groups, keys, shapes,
    dtypes; no data read). Returns name, tasks, rois, spatial, counts, synthetic."""
    name = f.attrs.get("dataset")
    if name is None:
        raise DataError(f"{path}: no 'dataset' attribute, so not a data.py file: {_make_hint('NAME')}")
    name = str(name)
    if name not in SPECS:
        raise DataError(f"{path}: unknown dataset {name!r} in its attributes: expected one of {', '.join(DATASETS)}")
    fix = _make_hint(name, "rebuild")
    for attr in ("tasks", "dims", "synthetic"):
        if attr not in f.attrs:
            raise DataError(f"{path}: file attribute {attr!r} is missing: {fix}")
    version = int(f.attrs.get("format_version", 1))
    if version > FORMAT_VERSION:
        raise DataError(f"{path}: written by a newer data.py (format {version}; this one reads {FORMAT_VERSION}): "
                        "update data.py, or rebuild the file with this one")
    if version < 2 and name in PLANNING:
        raise DataError(f"{path}: format {version} stores {name} volumes z last; this data.py reads them z first "
                        f"(format {FORMAT_VERSION}): {_make_hint(name, 'rebuild', out=path)}")
    try:
        rois = json.loads(f.attrs["roi_names"]) if name in PLANNING and "roi_names" in f.attrs else []
        tasks = {t: (kind, int(n)) for t, (kind, n) in json.loads(f.attrs["tasks"]).items()}
    except (ValueError, TypeError) as e:
        raise DataError(f"{path}: attribute tasks or roi_names is not the expected JSON ({_first_line(e)}): {fix}")
    if tasks != task_spec(name, len(rois)):
        raise DataError(f"{path}: tasks attribute {tasks} does not match {name} with {len(rois)} ROIs "
                        f"({task_spec(name, len(rois))}): {fix}")
    spatial, counts = None, {}
    for split in SPLITS:
        if not isinstance(f.get(split), h5py.Group):
            raise DataError(f"{path}: group {split!r} is missing (expected train, val, test): {fix}")
        g = f[split]
        if "image" not in g:
            raise DataError(f"{path}: {split}/image is missing: {fix}")
        shape = g["image"].shape
        if len(shape) != 4 or (name == "ham10000" and shape[-1] != 3):
            want = "(N, H, W, 3)" if name == "ham10000" else "(N, D, H, W)"
            raise DataError(f"{path}: {split}/image has shape {shape}, expected {want}: {fix}")
        here = shape[1:3] if name == "ham10000" else shape[1:]
        if spatial not in (None, here):
            raise DataError(f"{path}: {split}/image is {here} but the other splits are {spatial}: {fix}")
        spatial, counts[split] = here, shape[0]
        for key, (tail, dtypes) in _schema(name, spatial, len(rois)).items():
            if key not in g:
                raise DataError(f"{path}: {split}/{key} is missing: {fix}")
            if g[key].shape != (shape[0],) + tail:
                raise DataError(f"{path}: {split}/{key} has shape {g[key].shape}, expected {(shape[0],) + tail}: {fix}")
            if _dtype_name(g[key]) not in dtypes:
                raise DataError(f"{path}: {split}/{key} has dtype {_dtype_name(g[key])}, "
                                f"expected {' or '.join(dtypes)}: {fix}")
    if any(s % 32 for s in spatial):
        raise DataError(f"{path}: spatial size {spatial} is not a multiple of 32: convert again with a "
                        "--shape/--size of multiples of 32")
    return {"name": name, "tasks": tasks, "rois": rois, "spatial": tuple(spatial), "counts": counts,
            "synthetic": bool(f.attrs["synthetic"])}


def _normalise(image: np.ndarray, modality: str) -> torch.Tensor:
    """Stored image -> float32 model input (C, *spatial) (see the module docstring)."""
    if modality == "rgb":
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)) / 255
        return (x - torch.tensor(RGB_MEAN)[:, None, None]) / torch.tensor(RGB_STD)[:, None, None]
    x = np.clip(image.astype(np.float32), HU_MIN, HU_MAX) / HU_SCALE
    return torch.from_numpy(x)[None]


def _shift(t: torch.Tensor, offsets, fill: float) -> torch.Tensor:
    """Translate the spatial axes of a (C, *spatial) tensor by integer offsets, filling the gap."""
    out = torch.full_like(t, fill)
    src, dst = [slice(None)], [slice(None)]
    for o, n in zip(offsets, t.shape[1:]):
        src.append(slice(max(0, -o), n - max(0, o)))
        dst.append(slice(max(0, o), n - max(0, -o)))
    out[tuple(dst)] = t[tuple(src)]
    return out


class H5Dataset(torch.utils.data.Dataset):
    """One split of a data.py HDF5 file as a Dataset of dicts (see the module docstring).
    dims=2 on planning volumes gives axial slices (all slices of all cases); dims=3 gives whole
    cases. The HDF5 handle is opened lazily in the process that reads (each DataLoader worker
    opens its own) and is never pickled; nothing reads more than the requested case or slice."""

    def __init__(self, path, split, dims=2, augment=False):
        self.path, self.split, self.dims, self.augment = Path(path), split, int(dims), bool(augment)
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
        with _open_h5(self.path) as f:
            meta = check_layout(f, self.path)
            self.ids = list(f[split]["id"].asstr()[:])  # case i's id (read once: items carry it)
        self.dataset, self.tasks, self.synthetic = meta["name"], meta["tasks"], meta["synthetic"]
        spec = SPECS[self.dataset]
        if self.dims not in spec.model_dims:
            why = {"stoic": "its labels are per scan", "ham10000": "its images are 2D"}[self.dataset]
            raise DataError(f"{self.dataset} cannot be read with dims={dims}: {why}; use dims={spec.model_dims[0]}")
        self.modality, self.roi_names = spec.modality, list(meta["rois"])
        self.in_channels = in_channels(self.dataset)
        self.num_cases = meta["counts"][split]
        self.slices = self.dims == 2 and len(meta["spatial"]) == 3
        self.spatial = meta["spatial"][1:] if self.slices else meta["spatial"]  # of one item
        self._per_case = meta["spatial"][0] if self.slices else 1
        self._h5, self._pid = None, None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_h5"] = state["_pid"] = None
        return state

    def _group(self) -> h5py.Group:
        if self._h5 is None or self._pid != os.getpid():
            self._h5, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._h5[self.split]

    def __len__(self):
        return self.num_cases * self._per_case

    def case_of(self, index) -> int:
        """Row (case) of item `index`."""
        return index // self._per_case

    def _finite(self, array, key, case):
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise DataError(f"{self.path}: NaN or inf in {self.split}/{key} of case {case}: "
                            "fix the source data and convert again")
        return array

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        case, k = divmod(index, self._per_case) if self.slices else (index, -1)
        g = self._group()
        at = (case,) + axial_slice(k) if self.slices else (case,)
        item = {"image": _normalise(self._finite(g["image"][at], "image", case), self.modality)}
        for task, (kind, _) in self.tasks.items():
            if kind == "image":
                item[task] = torch.tensor(int(g[task][case]), dtype=torch.int64)
            else:
                target = torch.from_numpy(self._finite(g[task][at], task, case))  # float32 Gy or bool mask
                item[task] = target if target.ndim > len(self.spatial) else target[None]
        if self.dataset in PLANNING:
            item["possible_dose_mask"] = torch.from_numpy(g["possible_dose_mask"][at])[None]
        if self.augment:
            item = self._augmented(item)
        item.update(case=case, slice=k, id=self.ids[case])
        return item

    def _augmented(self, item):
        """Label-consistent and cheap: random flips for skin images; for CT a random shift of up
        to 1/32 of each side (no flips: left and right ROIs would swap)."""
        dense = [key for key, t in item.items() if t.ndim > 0]
        if self.modality == "rgb":
            for axis in (-1, -2):
                if torch.rand(()) < 0.5:
                    item.update({key: item[key].flip(axis) for key in dense})
            return item
        offsets = [int(torch.randint(-max(1, n // 32), max(1, n // 32) + 1, ())) for n in self.spatial]
        air = HU_MIN / HU_SCALE
        return {**item, **{key: _shift(item[key], offsets, air if key == "image" else 0.0) for key in dense}}

    def case(self, i) -> dict:
        """Case i whole, in stored units (HU, Gy, bool masks, int labels, str ids)."""
        if not 0 <= i < self.num_cases:
            raise IndexError(f"case {i} out of range for {self.num_cases} cases")
        g = self._group()
        out = {}
        for key, ds in g.items():
            value = ds.asstr()[i] if h5py.check_string_dtype(ds.dtype) else ds[i]
            out[key] = int(value) if isinstance(value, np.integer) else value
        return out

    def __repr__(self):
        return (f"H5Dataset({str(self.path)!r}, {self.split!r}, dims={self.dims}: {self.dataset}, "
                f"{self.num_cases} cases, {len(self)} items of {self.spatial})")


def open_dataset(path, split, dims=2, augment=False) -> H5Dataset:
    """Split `split` of the data.py HDF5 file at `path` as a torch Dataset of dicts."""
    return H5Dataset(path, split, dims=dims, augment=augment)


# ----------------------------------------------------------------------------- info
def describe(path, full=True) -> str:
    """Validate a file and summarise it: attributes, per-split shapes and dtypes, task balance.
    full=True also reads every case (one at a time) to check values: finite images and doses,
    non-negative doses, labels in range."""
    path = Path(path)
    with _open_h5(path) as f:
        meta = check_layout(f, path)
        name, tasks, rois = meta["name"], meta["tasks"], meta["rois"]
        lines = [f"{path}: {name}, synthetic={meta['synthetic']}, dims={int(f.attrs['dims'])}, "
                 f"source={f.attrs.get('source', '?')}, converter={f.attrs.get('converter', '?')}",
                 "tasks: " + ", ".join(f"{t} ({kind}, {n})" for t, (kind, n) in tasks.items())]
        if rois:
            lines.append("roi_names: " + ", ".join(rois))
        for split in SPLITS:
            g = f[split]
            n = meta["counts"][split]
            lines.append(f"{split}: {n} cases")
            lines += [f"  {key:26s} {str(ds.shape):24s} {_dtype_name(ds)}" for key, ds in g.items()]
            if not full or n == 0:
                continue
            stats = {}
            for i in range(n):
                for key in ("image", "dose"):
                    if key in g and g[key].dtype.kind == "f":
                        v = g[key][i]
                        if not np.isfinite(v).all():
                            raise DataError(f"{path}: NaN or inf in {split}/{key} of case {i}: "
                                            "fix the source data and convert again")
                        if key == "dose" and v.min() < 0:
                            raise DataError(f"{path}: negative dose in {split}/dose of case {i}: fix the source data")
                if name in PLANNING:
                    dose, pdm = g["dose"][i], g["possible_dose_mask"][i]
                    stats.setdefault("dose_max", []).append(float(dose.max()))
                    stats.setdefault("dose_mean", []).append(float(dose[pdm].mean()) if pdm.any() else 0.0)
                    stats.setdefault("present", []).append(g["structures"][i].any(axis=(1, 2, 3)))
                if name == "ham10000":
                    stats.setdefault("fg", []).append(float(g["segmentation"][i].mean()))
            for task, (kind, k) in tasks.items():
                if kind == "image":
                    labels = g[task][:]
                    if labels.min() < 0 or labels.max() >= k:
                        raise DataError(f"{path}: {split}/{task} has labels outside 0..{k - 1}: fix the source data")
                    names = HAM_CLASSES if task == "diagnosis" else range(k)
                    counts = np.bincount(labels, minlength=k)
                    lines.append(f"  balance {task}: " + ", ".join(f"{c} {m}" for c, m in zip(names, counts)))
            if name in PLANNING:
                present = np.sum(stats["present"], axis=0)
                lines.append(f"  balance dose: max {max(stats['dose_max']):.1f} Gy, mean in possible_dose_mask "
                             f"{np.mean(stats['dose_mean']):.1f} Gy")
                lines.append("  balance structures (cases contoured): "
                             + ", ".join(f"{r} {c}/{n}" for r, c in zip(rois, present)))
            if name == "ham10000":
                lines.append(f"  balance segmentation: {100 * np.mean(stats['fg']):.1f}% lesion pixels")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="data.py", description="HDF5 datasets for CTAN: synthetic stand-ins, "
                                "converters from the public releases, validation. Layout: see the docstring.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synth", help="write a synthetic stand-in with the real layout")
    s.add_argument("name", help=" | ".join(DATASETS))
    s.add_argument("--out", help="output file (default data/NAME.h5)")
    s.add_argument("--n", type=int, help="number of cases (default 30 for prostate/openkbp, 300 ham10000, 80 stoic)")
    s.add_argument("--size", type=int, help="spatial size, a multiple of 32 (default 64; 32 for stoic)")
    s.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("convert", help="convert a raw public release to HDF5")
    c.add_argument("name", help=" | ".join(DATASETS))
    c.add_argument("raw_dir", help="openkbp/prostate: folder with train-pats/ validation-pats/ test-pats/; "
                   "ham10000: the unpacked release; stoic: folder with data/mha/ and metadata/")
    c.add_argument("--out", help="output file (default data/NAME.h5)")
    c.add_argument("--shape", help="openkbp/prostate: volume shape of the flat indices, N or D,H,W (default 128)")
    c.add_argument("--rois", help="openkbp/prostate: comma-separated ROI names (default: the dataset's list)")
    c.add_argument("--size", help="ham10000: WIDTHxHEIGHT (default 256x192); stoic: cube side (default 128)")
    c.add_argument("--seed", type=int, default=0, help="ham10000/stoic: seed of the 70/10/20 split")
    i = sub.add_parser("info", help="validate a file and print its splits, shapes, dtypes and task balance")
    i.add_argument("file")
    i.add_argument("--quick", action="store_true", help="check the structure only, read no data")
    args = p.parse_args(argv)
    try:
        start = time.monotonic()
        if args.command == "info":
            print(describe(args.file, full=not args.quick))
            return 0
        if args.command == "synth":
            out = synth(args.name, args.out, n=args.n, size=args.size, seed=args.seed)
        else:
            out = convert(args.name, args.raw_dir, args.out, shape=args.shape, rois=args.rois,
                          size=args.size, seed=args.seed)
        with _open_h5(out) as f:
            counts = check_layout(f, out)["counts"]
        print(f"wrote {out} ({', '.join(f'{k} {v}' for k, v in counts.items())} cases, "
              f"{time.monotonic() - start:.1f}s)")
        return 0
    except BrokenPipeError:  # output piped into e.g. `head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (DataError, OSError) as e:
        print(f"error: {_first_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
