"""Build a train/val/test manifest from a class-folder tree, without copying images.

    python -m train split --data ../shared/data/malaria --out runs/malaria.csv
    python -m train split --data OCT2017 --out runs/oct.csv --mode patient
    python -m train split --data ../shared/data/malaria --out runs/release.csv --val 0 --test 0 \
        --exclude-patients-of tests/data/malaria_sample      # every developer patient but the sample's

Accepted layouts: `<root>/<class>/<image>` (the NIH malaria set) and
`<root>/{train,test}/<class>/<image>` (OCT2017; its `test/` folder stays the
test split, `train/` (and `val/` if present) are split into train and val).

`patient` mode keeps every patient in exactly one split; `random` mode is the
source tutorial's split (shuffle with the seed, 80/20, then 10% of train to
validation), which leaks patients and is offered only for comparison.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from edge_runtime.images import ImageError, load_image

SPLITS = ("train", "val", "test")
MANIFEST_FIELDS = ("path", "label", "patient", "split")

# Per-dataset rules: name -> regex whose group "patient" is the patient/slide id.
PATIENT_RULES: dict[str, re.Pattern] = {
    # NIH malaria: C100P61ThinF_IMG_..._cell_162.png -> C100P61; C13NThinF_... -> C13
    "nih-malaria": re.compile(r"^(?P<patient>C\d+(?:P\d+)?)(?=[A-Za-z_])"),
    # OCT2017: CNV-154835-1.jpeg -> 154835
    "oct2017": re.compile(r"^(?:CNV|DME|DRUSEN|NORMAL)-(?P<patient>\d+)-\d+\.\w+$", re.IGNORECASE),
}


@dataclasses.dataclass(frozen=True)
class Record:
    path: str  # absolute
    label: str
    patient: str
    split: str = ""


@dataclasses.dataclass
class SplitResult:
    records: list[Record]
    bad_files: list[tuple[str, str]]  # (path, reason)
    unmatched_patients: int  # files that fell back to one-patient-per-file
    labels: list[str]


def patient_id(filename: str, rules: Sequence[re.Pattern] = tuple(PATIENT_RULES.values())) -> str | None:
    """The patient id of a file name by the first matching rule, or None."""
    for rule in rules:
        m = rule.search(filename)
        if m:
            return m.group("patient")
    return None


def discover(root: Path) -> tuple[list[tuple[Path, str, str]], list[str]]:
    """List (file, label, fixed_split) under a class-folder tree; fixed_split is "test" or ""."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root} is not a directory; expected <root>/<class>/<images>")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = [p for p in subdirs if p.name.lower() in ("train", "val", "test")]
    if split_dirs:
        groups = [(p, "test" if p.name.lower() == "test" else "") for p in split_dirs]
    else:
        groups = [(root, "")]
    files: list[tuple[Path, str, str]] = []
    labels: set[str] = set()
    for base, fixed in groups:
        for class_dir in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
            labels.add(class_dir.name)
            for f in sorted(class_dir.rglob("*")):
                if f.is_file():
                    files.append((f, class_dir.name, fixed))
    if not labels:
        raise ValueError(
            f"no class folders under {root}; expected <root>/<class>/<images> "
            "or <root>/train|test/<class>/<images>"
        )
    return files, sorted(labels)


def _check(path: Path) -> str | None:
    """None for a readable image, else the reason it is unusable."""
    if path.name.startswith(".") or path.name.lower() in ("thumbs.db", "desktop.ini"):
        return "not an image (system file)"
    try:
        load_image(path)
    except ImageError as e:
        return e.reason
    return None


def verify(paths: Sequence[Path], workers: int | None = None, progress: bool = True) -> list[str | None]:
    """Fully decode every file (threads; Pillow releases the GIL); return a reason or None per file."""
    from tqdm import tqdm

    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(workers) as pool:
        it = pool.map(_check, paths, chunksize=32)
        return list(tqdm(it, total=len(paths), desc="checking images", unit="img", disable=not progress))


def _assign_groups(
    groups: dict[str, Counter], fractions: dict[str, float], seed: int
) -> dict[str, str]:
    """Greedy stratified assignment of whole groups (patients) to splits.

    Patients are visited largest first (ties broken by the seeded shuffle) and
    each goes to the split whose per-class image counts are furthest below
    target, so class balance and split sizes both land close to the request.
    """
    rng = random.Random(seed)
    names = list(groups)
    rng.shuffle(names)
    names.sort(key=lambda n: -sum(groups[n].values()))
    totals: Counter = Counter()
    for c in groups.values():
        totals.update(c)
    have = {s: Counter() for s in fractions}
    out: dict[str, str] = {}

    def need(s: str, mix: Counter) -> float:
        # Share of this patient's class mix that split s still lacks, relative to its target.
        return sum(mix[k] * (fractions[s] * totals[k] - have[s][k]) / (fractions[s] * totals[k]) for k in mix)

    for n in names:
        best = max((s for s in fractions if fractions[s] > 0), key=lambda s: need(s, groups[n]))
        out[n] = best
        have[best].update(groups[n])
    return out


def split_records(
    items: Sequence[Record], mode: str, val: float, test: float, seed: int, has_fixed_test: bool
) -> list[Record]:
    """Give each record a split; records already marked "test" keep it."""
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"--val {val} and --test {test} must be in [0, 1) and sum below 1")
    fixed = [r for r in items if r.split == "test"]
    pool = [r for r in items if r.split != "test"]
    if mode == "random":
        rng = random.Random(seed)
        pool = sorted(pool, key=lambda r: r.path)
        rng.shuffle(pool)
        # The source's arithmetic: the first int(80%) train, the rest test; then int(10%) of train to val.
        n_train = len(pool) if has_fixed_test else int(len(pool) * (1 - test))
        train_part, test_part = pool[:n_train], pool[n_train:]
        n_val = int(len(train_part) * val)
        return (
            fixed
            + [dataclasses.replace(r, split="test") for r in test_part]
            + [dataclasses.replace(r, split="val") for r in train_part[:n_val]]
            + [dataclasses.replace(r, split="train") for r in train_part[n_val:]]
        )
    if mode != "patient":
        raise ValueError(f"--mode {mode!r} is not one of: patient, random")
    # The source's proportions: test share of all, then val share of what remains.
    t = 0.0 if has_fixed_test else test
    fractions = {"train": (1 - t) * (1 - val), "val": (1 - t) * val, "test": t}
    test_patients = {r.patient for r in fixed}
    groups: dict[str, Counter] = defaultdict(Counter)
    for r in pool:
        if r.patient not in test_patients:
            groups[r.patient][r.label] += 1
    assignment = _assign_groups(groups, fractions, seed)
    out = list(fixed)
    for r in pool:
        # A patient of the fixed test set found in train/ goes to test: never in two splits.
        out.append(dataclasses.replace(r, split="test" if r.patient in test_patients else assignment[r.patient]))
    return out


def patients_of(tree: Path) -> set[str]:
    """The patient ids of the image files under `tree` (e.g. a bundled sample to keep unseen)."""
    files, _ = discover(Path(tree))
    ids = {patient_id(f.name) for f, _, _ in files}
    if None in ids:
        raise ValueError(f"{tree}: some file names match no patient rule ({', '.join(PATIENT_RULES)})")
    return ids  # type: ignore[return-value]


def build_split(
    data: Path, mode: str = "patient", seed: int = 42, val: float = 0.1, test: float = 0.2, progress: bool = True,
    exclude_patients: Iterable[str] = (),
) -> SplitResult:
    """Discover, verify and split a class-folder tree; `exclude_patients` are left out of every split."""
    data = Path(data)
    exclude = set(exclude_patients)
    files, labels = discover(data)
    if exclude:
        files = [f for f in files if patient_id(f[0].name) not in exclude]
    reasons = verify([f for f, _, _ in files], progress=progress)
    records, bad, unmatched = [], [], 0
    for (f, label, fixed), reason in zip(files, reasons):
        if reason is not None:
            bad.append((str(f), reason))
            continue
        pid = patient_id(f.name)
        if pid is None:
            unmatched += 1
            pid = f"file:{f.relative_to(data).with_suffix('').as_posix()}"  # unique per file
        records.append(Record(str(f.resolve()), label, pid, fixed))
    if not records:
        raise ValueError(f"no readable images under {data} ({len(bad)} bad files)")
    has_fixed_test = any(r.split == "test" for r in records)
    records = split_records(records, mode, val, test, seed, has_fixed_test)
    records.sort(key=lambda r: (SPLITS.index(r.split), r.label, r.path))
    return SplitResult(records, bad, unmatched, labels)


def write_manifest(records: Iterable[Record], out: Path) -> None:
    """CSV with paths relative to the manifest's folder, so both can move together."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = out.parent.resolve()
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(MANIFEST_FIELDS)
        for r in records:
            w.writerow([os.path.relpath(r.path, base), r.label, r.patient, r.split])
    os.replace(tmp, out)


def read_manifest(path: Path, split: str | None = None) -> list[Record]:
    """Records of a manifest (optionally one split), with absolute paths."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} not found; make one with `python -m train split`")
    base = path.parent.resolve()
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = set(MANIFEST_FIELDS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"manifest {path} lacks columns {sorted(missing)}; expected {list(MANIFEST_FIELDS)}")
        rows = [Record(str((base / r["path"]).resolve()), r["label"], r["patient"], r["split"]) for r in reader]
    if split is not None:
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        rows = [r for r in rows if r.split == split]
    return rows


def summary_table(records: Sequence[Record], labels: Sequence[str]) -> str:
    """Images per split and class, and patients per split, as a text table."""
    head = ["split", *labels, "images", "patients"]
    rows = []
    for s in SPLITS:
        rs = [r for r in records if r.split == s]
        c = Counter(r.label for r in rs)
        rows.append([s, *[str(c[l]) for l in labels], str(len(rs)), str(len({r.patient for r in rs}))])
    c = Counter(r.label for r in records)
    rows.append(["all", *[str(c[l]) for l in labels], str(len(records)), str(len({r.patient for r in records}))])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    return "\n".join(
        "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
        for r in [head, *rows]
    )


def run(data: Path, out: Path, mode: str, seed: int, val: float, test: float, exclude_of: Path | None = None) -> int:
    """CLI body of `python -m train split`."""
    exclude = patients_of(exclude_of) if exclude_of else set()
    res = build_split(data, mode=mode, seed=seed, val=val, test=test, exclude_patients=exclude)
    if exclude:
        print(f"left out the {len(exclude)} patients of {exclude_of}")
    write_manifest(res.records, out)
    bad_path = Path(out).with_suffix(".bad_files.csv")
    if res.bad_files:
        with open(bad_path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "reason"])
            w.writerows(res.bad_files)
    elif bad_path.exists():
        bad_path.unlink()
    print(summary_table(res.records, res.labels))
    print(f"\nmode={mode} seed={seed}: wrote {len(res.records)} images to {out}")
    if res.unmatched_patients:
        print(
            f"warning: {res.unmatched_patients} file names matched no patient rule "
            f"({', '.join(PATIENT_RULES)}); each was treated as its own patient"
        )
    if res.bad_files:
        print(f"warning: {len(res.bad_files)} bad files left out, listed in {bad_path}")
        for p, reason in res.bad_files[:5]:
            print(f"  {p}: {reason}")
    if mode == "patient":
        seen: dict[str, set] = defaultdict(set)
        for r in res.records:
            seen[r.patient].add(r.split)
        leaked = [p for p, s in seen.items() if len(s) > 1]
        if leaked:  # cannot happen by construction; checked because a leak silently inflates accuracy
            raise RuntimeError(f"patients in more than one split: {leaked[:5]}")
    return 0
