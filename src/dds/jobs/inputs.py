"""The jobs of a dataset edit: where they come from, how each is named and seeded, and the
checks that run on every job before any model loads.

INPUT kinds (`read_jobs`):

    FOLDER                 every image in it (sorted), the same --source and --target for all
    LIST.csv|.json|.jsonl  one job per row: image, source, target[, out, seed, truth, edit]
    IMAGEFOLDER            a folder with metadata.jsonl (or metadata.csv): the Hugging Face
                           `datasets` ImageFolder layout that `dds translate-train` reads;
                           file_name and text (the source caption) by default
    world:N[:SEED]         N edits of the procedural world (`dds.world`), rendered in memory;
                           each carries its exact truth, so its metrics are computed

Column names are options (`Columns`); a prompt column that is absent or empty falls back to
--source / --target.  Relative image paths are read from the list's (or ImageFolder's) folder.

Seeds.  A job's seed is a function of the job alone, never of the process or batch it runs in:
an explicit `seed` column, else `job_seed(--seed, key)`, the first four bytes of
sha256("dds-edit\\0{--seed}\\0{key}") where `key` is the job's output path relative to the output
folder.  So adding, removing or reordering rows changes no other job's seed, and the same job
list gives the same edits on any number of processes.

Checks up front: every prompt, every image's header (exists, is an image PIL reads, within the
pixel limits; its EXIF orientation applied to the size), duplicate outputs and outputs that would
overwrite an input.  Pixels are decoded only when a job's batch runs; an image that is damaged
past its header then fails that job alone (`dds.jobs.run`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from dds.errors import DDSError
from dds.images import MAX_PIXELS, check_image_file, check_size

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
LIST_SUFFIXES = {".csv", ".json", ".jsonl"}
METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # an ImageFolder's, in this order
WORLD_PREFIX = "world:"
MAX_WORLD_JOBS = 10_000_000
SEED_SPACE = 2**32  # EditConfig's seeds are 0 .. 2**32 - 1
WORLD_KINDS = ("object_color", "object_shape", "background_color")  # the evaluation's kinds


@dataclass(frozen=True)
class Columns:
    """Column names of a job list or ImageFolder; None: the input kind's default."""

    image: str | None = None  # "image"; ImageFolder: "file_name"
    source: str | None = None  # "source"; ImageFolder: "text"
    target: str = "target"
    out: str = "out"
    seed: str = "seed"
    truth: str = "truth"  # the exact edited image, when known
    edit: str = "edit"  # a world edit (`dds.world.Edit.to_dict()`), when known

    def defaults(self, imagefolder: bool) -> Columns:
        return Columns(self.image or ("file_name" if imagefolder else "image"),
                       self.source or ("text" if imagefolder else "source"),
                       self.target, self.out, self.seed, self.truth, self.edit)


@dataclass(frozen=True)
class JobOptions:
    """What the command line says about every job."""

    source: str | None = None  # --source: for rows without a source caption
    target: str | None = None  # --target: for rows without a target caption
    method: str = "dds"
    out: str | None = None  # --out: the output folder
    seed: int = 0  # --seed: the base of every job's seed
    overwrite: bool = False
    columns: Columns = field(default_factory=Columns)


@dataclass(frozen=True)
class Job:
    """One edit of a dataset.

    index: its position in the full job list (0-based); key: its identity (the output path
    relative to the output folder), which its seed and its manifest records are keyed by;
    size: the input's (w, h) from its header, upright; truth: the exact edited image's file;
    edit: a world edit (source and target scenes), whose renders are the input and the truth.
    """

    index: int
    key: str
    image: Path | None
    source: str | None
    target: str
    out: Path
    seed: int
    size: tuple[int, int] = (0, 0)
    truth: Path | None = None
    edit: dict | None = None
    label: str = ""  # the input as messages and the manifest name it

    @property
    def name(self) -> str:
        return self.label or (self.image.name if self.image is not None else self.key)

    def load(self) -> Image.Image:
        """The input image, decoded and checked (DDSError if it is unusable)."""
        if self.image is not None:
            from dds.images import load_image

            return load_image(self.image)
        from dds.world import Edit, render, to_uint8

        return Image.fromarray(to_uint8(render(Edit.from_dict(self.edit).source)))


@dataclass
class JobList:
    jobs: list[Job]
    out_dir: Path  # where the outputs (by default) and the manifests go
    kind: str  # "folder", "list", "imagefolder" or "world"
    source: str  # the INPUT as given


def job_seed(base: int, key: str) -> int:
    """The seed of the job with this key: 4 bytes of sha256('dds-edit\\0{base}\\0{key}')."""
    digest = hashlib.sha256(f"dds-edit\0{int(base)}\0{key}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def job_key(out: Path, out_dir: Path) -> str:
    """A job's identity: its output path relative to the output folder (else absolute)."""
    try:
        return out.resolve().relative_to(out_dir.resolve()).as_posix()
    except ValueError:
        return out.resolve().as_posix()


def is_dataset_input(text: str) -> bool:
    """Whether INPUT names many jobs (a folder, a job list or the world), not one image."""
    p = Path(text)
    return (text.startswith(WORLD_PREFIX) and not p.exists()) or p.is_dir() or (
        p.is_file() and p.suffix.lower() in LIST_SUFFIXES)


def probe_image(path: Path) -> tuple[int, int]:
    """An image's (w, h) as it will be seen (EXIF orientation applied), from its header alone;
    the same sentences as `dds.images.load_image` for a file that cannot be used."""
    path = check_image_file(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise DDSError(
                    f"input '{path}' declares more than {MAX_PIXELS:,} pixels and is refused as "
                    "a possible decompression bomb; downscale it first")
            check_size((w, h), str(path))
            if _orientation(im) in (5, 6, 7, 8):  # stored sideways
                w, h = h, w
            return w, h
    except DDSError:
        raise
    except UnidentifiedImageError:
        raise DDSError(f"input '{path}' is not an image file PIL can read; give a PNG or JPEG") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DDSError(f"input '{path}' is damaged or truncated ({e}); re-export the image") from None


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation tag, read without decoding pixels.  A PNG's getexif() decodes the
    whole image to look for an eXIf chunk after the pixels; only one before them is read here
    (a rare PNG with its tag after the pixels is still turned upright when it is loaded, and
    batched by the size it then has)."""
    if im.format == "PNG":
        raw = im.info.get("exif")
        if not raw:
            return 1
        exif = Image.Exif()
        exif.load(raw)
        return int(exif.get(0x0112, 1))
    return int(im.getexif().get(0x0112, 1))


def raise_all(problems: list[str], total: int, where: str = "") -> None:
    """One DDSError listing every bad job (a batch runs all or nothing), one line each."""
    if problems:
        head = f"{len(problems)} of {total} jobs {where} are invalid".replace("  ", " ")
        shown = problems[:50] + ([f"... and {len(problems) - 50} more"] if len(problems) > 50 else [])
        raise DDSError(head + "; nothing was edited:\n  " + "\n  ".join(shown))


# ---- reading rows ---------------------------------------------------------------------------
def read_rows(path: Path, what: str = "job list") -> list[dict]:
    """Rows (dicts) of a CSV, JSON list or JSON-lines file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DDSError(f"{what} '{path}' cannot be read ({e})") from None
    try:
        if path.suffix.lower() == ".csv":
            rows = list(csv.DictReader(text.splitlines()))
        elif path.suffix.lower() == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)
    except (json.JSONDecodeError, csv.Error) as e:
        raise DDSError(f"{what} '{path}' is not valid {path.suffix[1:].upper()} ({e})") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise DDSError(f"{what} '{path}' must hold a non-empty list of {{image, source, target}}")
    return rows


def _cell(row: dict, column: str):
    """A row's value in `column`; None when the column is missing or the cell empty."""
    v = row.get(column)
    return None if v is None or v == "" else v


def _text(row: dict, column: str) -> str | None:
    v = _cell(row, column)
    return v if v is None or isinstance(v, str) else str(v)


def _seed_of(row: dict, column: str, base: int, key: str) -> int:
    v = _cell(row, column)
    if v is None:
        return job_seed(base, key)
    try:
        s = int(str(v).strip())
    except ValueError:
        raise DDSError(f"its {column!r} {v!r} is not a whole number") from None
    if not 0 <= s < SEED_SPACE:
        raise DDSError(f"its {column!r} {s} is outside 0 .. {SEED_SPACE - 1}")
    return s


def _edit_of(row: dict, column: str) -> dict | None:
    v = _cell(row, column)
    if v is None:
        return None
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            raise DDSError(f"its {column!r} is not a JSON object (a world edit)") from None
    from dds.world import Edit

    try:
        return Edit.from_dict(v).to_dict()
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DDSError(f"its {column!r} is not a world edit ({type(e).__name__}: {e})") from None


def _rows_to_jobs(rows: list[dict], base: Path, where: str, opts: JobOptions, cols: Columns,
                  out_dir: Path, derive_out: Callable[[str], Path]) -> list[Job]:
    """Jobs from rows; every row's problem is collected and reported together."""
    missing = []
    for i, r in enumerate(rows, 1):
        lacks = [repr(k) for k, fallback in ((cols.image, None), (cols.target, opts.target))
                 if not r.get(k) and not fallback]
        if lacks:
            missing.append(f"job {i} lacks {' and '.join(lacks)}")
    raise_all(missing, len(rows), f"in '{where}'")
    jobs, problems = [], []
    for i, r in enumerate(rows):
        raw = str(r[cols.image])
        img = Path(raw)
        img = img if img.is_absolute() else base / img
        out = Path(str(r[cols.out])) if _text(r, cols.out) else derive_out(raw)
        key = job_key(out, out_dir)
        try:
            truth = _text(r, cols.truth)
            truth_path = None if truth is None else (
                Path(truth) if Path(truth).is_absolute() else base / truth)
            jobs.append(Job(i, key, img, _text(r, cols.source) or opts.source,
                            _text(r, cols.target) or opts.target or "", out,
                            _seed_of(r, cols.seed, opts.seed, key), truth=truth_path,
                            edit=_edit_of(r, cols.edit)))
        except DDSError as e:
            problems.append(f"job {i + 1} ({img.name}): {e}")
    raise_all(problems, len(rows), f"in '{where}'")
    return jobs


def _suffix(method: str) -> str:
    return f"-{method}.png"


def _from_list(src: Path, opts: JobOptions) -> JobList:
    out_dir = Path(opts.out or "dds-out")
    cols = opts.columns.defaults(imagefolder=False)
    jobs = _rows_to_jobs(read_rows(src), src.parent, str(src), opts, cols, out_dir,
                         lambda raw: out_dir / (Path(raw).stem + _suffix(opts.method)))
    return JobList(jobs, out_dir, "list", str(src))


def _from_imagefolder(src: Path, meta: Path, opts: JobOptions) -> JobList:
    out_dir = Path(opts.out or f"{src.resolve().name}-{opts.method}")
    cols = opts.columns.defaults(imagefolder=True)

    def derive(raw: str) -> Path:  # keep the sub-folders: images/a/x.png -> images/a/x-dds.png
        rel = Path(raw)
        rel = rel.relative_to(rel.anchor) if rel.is_absolute() else rel
        return out_dir / rel.with_name(rel.stem + _suffix(opts.method))

    jobs = _rows_to_jobs(read_rows(meta, "ImageFolder metadata"), src, str(meta), opts, cols,
                         out_dir, derive)
    return JobList(jobs, out_dir, "imagefolder", str(src))


def _from_folder(src: Path, opts: JobOptions) -> JobList:
    files = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DDSError(f"folder '{src}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    out_dir = Path(opts.out or f"{src.name}-{opts.method}")
    jobs = []
    for i, p in enumerate(files):
        out = out_dir / (p.stem + _suffix(opts.method))
        key = job_key(out, out_dir)
        jobs.append(Job(i, key, p, opts.source, opts.target or "", out, job_seed(opts.seed, key)))
    return JobList(jobs, out_dir, "folder", str(src))


def parse_world(text: str) -> tuple[int, int]:
    """'world:N[:SEED]' -> (N, SEED); SEED defaults to the held-out evaluation seed."""
    from dds.eval.seeds import HELD_OUT_SEED

    m = re.fullmatch(r"world:(\d+)(?::(\d+))?", text.strip())
    if not m or not 1 <= int(m.group(1)) <= MAX_WORLD_JOBS:
        raise DDSError(f"INPUT '{text}' is not understood; write world:N or world:N:SEED with N "
                       f"from 1 to {MAX_WORLD_JOBS:,} edits of the procedural world")
    return int(m.group(1)), int(m.group(2)) if m.group(2) is not None else HELD_OUT_SEED


def world_edit(seed: int, i: int):
    """Edit i of world:N:SEED: kind i mod 3 of the evaluation's kinds, drawn from
    default_rng([SEED, i]), so world:100 is the first 100 edits of world:1000."""
    import numpy as np

    from dds.world import sample_edit

    return sample_edit(np.random.default_rng([seed, i]), WORLD_KINDS[i % len(WORLD_KINDS)])


def _from_world(text: str, opts: JobOptions) -> JobList:
    from dds.world import CANVAS

    n, seed = parse_world(text)
    out_dir = Path(opts.out or f"world-{opts.method}")
    width = max(6, len(str(n - 1)))
    jobs = []
    for i in range(n):
        e = world_edit(seed, i)
        out = out_dir / f"{i:0{width}d}{_suffix(opts.method)}"
        key = job_key(out, out_dir)
        jobs.append(Job(i, key, None, e.source_caption, e.target_caption, out,
                        job_seed(opts.seed, key), size=(CANVAS, CANVAS), edit=e.to_dict(),
                        label=f"world:{seed}:{i}"))
    return JobList(jobs, out_dir, "world", text)


def imagefolder_metadata(src: Path) -> Path | None:
    for name in METADATA_FILES:
        if (src / name).is_file():
            return src / name
    return None


def read_jobs(text: str, opts: JobOptions, check_prompts: Callable | None = None,
              progress: Callable | None = None) -> JobList:
    """Every job of INPUT, checked: prompts (`check_prompts(source, target, method)`), each
    image's header, each truth file's header, duplicate and input-overwriting outputs.  One
    DDSError lists every problem, each naming its job; nothing is written."""
    src = Path(text)
    if text.startswith(WORLD_PREFIX) and not src.exists():
        jl = _from_world(text, opts)
    elif src.is_dir():
        meta = imagefolder_metadata(src)
        jl = _from_imagefolder(src, meta, opts) if meta else _from_folder(src, opts)
    elif src.is_file() and src.suffix.lower() in LIST_SUFFIXES:
        jl = _from_list(src, opts)
    else:
        raise DDSError(f"INPUT '{text}' is not a folder, a .csv/.json/.jsonl job list or world:N")
    jl.jobs = check_jobs(jl.jobs, opts, check_prompts, progress)
    _check_outputs(jl.jobs, opts.overwrite)
    return jl


def check_jobs(jobs: list[Job], opts: JobOptions, check_prompts: Callable | None,
               progress: Callable | None = None) -> list[Job]:
    """Each job's prompts, image header and truth header; returns the jobs with their sizes."""
    from dataclasses import replace

    problems, out = [], []
    for j in jobs:
        try:
            if check_prompts is not None:
                check_prompts(j.source, j.target, opts.method)
            size = j.size if j.image is None else probe_image(j.image)
            if j.truth is not None:
                probe_image(j.truth)
            out.append(replace(j, size=size))
        except DDSError as e:
            problems.append(f"job {j.index + 1} ({j.name}): {e}")
        if progress is not None:
            progress(1)
    raise_all(problems, len(jobs))
    return out


def _check_outputs(jobs: list[Job], overwrite: bool) -> None:
    """Two jobs writing one file, or a job writing over an input, is refused up front."""
    seen: set[Path] = set()
    inputs = {j.image.resolve() for j in jobs if j.image is not None}
    for j in jobs:
        if j.out.suffix.lower() != ".png":
            raise DDSError(f"output '{j.out}' of job {j.index + 1} must end in .png")
        key = j.out.resolve()
        if key in seen:
            raise DDSError(f"two edits would write '{j.out}'; give each job its own 'out'")
        seen.add(key)
        if key in inputs and not overwrite:
            raise DDSError(f"output '{j.out}' is an input image; choose another --out or add --overwrite")


# ---- exporting the world's jobs -------------------------------------------------------------
def export_world(text: str, folder: str | Path, opts: JobOptions) -> Path:
    """world:N[:SEED] written as an ImageFolder that `dds edit FOLDER` reads back with its
    truth: images/I.png (input), truth/I.png (the exact edited image), metadata.jsonl lines
    {file_name, text (source caption), target, truth, edit}."""
    from dds.atomic import atomic_write_text
    from dds.images import save_png
    from dds.world import Edit, render, to_uint8

    jl = _from_world(text, opts)
    root = Path(folder)
    lines = []
    for j in jl.jobs:
        e = Edit.from_dict(j.edit)
        stem = Path(j.key).name.removesuffix(_suffix(opts.method))
        for sub, scene in (("images", e.source), ("truth", e.target)):
            save_png(Image.fromarray(to_uint8(render(scene))), root / sub / f"{stem}.png")
        lines.append(json.dumps({"file_name": f"images/{stem}.png", "text": e.source_caption,
                                 "target": e.target_caption, "truth": f"truth/{stem}.png",
                                 "edit": j.edit}))
    atomic_write_text(root / "metadata.jsonl", "\n".join(lines) + "\n")
    return root
