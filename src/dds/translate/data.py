"""Training data for the translation network: source images with captions, and tasks.

A *source pool* is an indexable set of source images, each with its caption ŷ (and, for the
built-in world, its scene).  A *task* k turns a source caption into the target caption y_k, or
says it does not apply (then that source is never sampled for k).  Two pools:

- `WorldSources(n, seed, size)`: scenes of the built-in procedural world (`dds.world`).
- `FolderSources(path, size, on_bad_data)`: a diffusers ImageFolder, i.e. a folder with
  `metadata.jsonl` whose lines hold `file_name` and `text`.  Every image and caption is checked
  up front; a bad one is reported with its path and skipped or refused (`on_bad_data`).

Tasks are written `OLD:NEW` (replace the word OLD by NEW; name and phrase NEW), `NAME=CAPTION`
(a fixed target caption), or given as a JSON list of {name, phrase, replace | target}.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from dds.errors import DDSError

# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------


def _fix_articles(text: str) -> str:
    """'a orange' -> 'an orange', 'an red' -> 'a red' after a word substitution."""

    def fix(m: re.Match) -> str:
        art = "an" if m.group(2)[0].lower() in "aeiou" else "a"
        if m.group(1)[0].isupper():
            art = art.capitalize()
        return f"{art} {m.group(2)}"

    return re.sub(r"\b(an?|An?) (\w+)", fix, text)


@dataclass(frozen=True)
class Task:
    """One translation task: a name, the phrase its embeddings start from, and its target.

    `replace`: word pairs (OLD, NEW) applied to the source caption (the task applies when every
    OLD word occurs); `target`: a fixed target caption (applies to every source).  Exactly one.
    """

    name: str
    phrase: str
    replace: tuple[tuple[str, str], ...] = ()
    target: str | None = None

    def __post_init__(self):
        if not self.name or not re.fullmatch(r"[\w.+-]+", self.name):
            raise DDSError(f"task name {self.name!r} is invalid; use letters, digits, '-', '_' or '.'")
        if bool(self.replace) == bool(self.target):
            raise DDSError(f"task '{self.name}' needs either word replacements or a target caption")
        if not self.phrase.strip():
            raise DDSError(f"task '{self.name}' has an empty phrase; describe the task in a few words")

    def target_caption(self, caption: str, scene: dict | None = None) -> str | None:
        """y_k for a source with caption ŷ (and its world scene, when known); None: n/a."""
        if self.target is not None:
            return self.target
        if scene is not None:
            edited = self.target_scene(scene)
            if edited is not NotImplemented:
                if edited is None:
                    return None
                from dds.world import caption as world_caption

                return world_caption(edited)
        out = caption
        for old, new in self.replace:
            pat = re.compile(rf"\b{re.escape(old)}\b", re.IGNORECASE)
            if not pat.search(out):
                return None
            out = pat.sub(new, out)
        return _fix_articles(out)

    def target_scene(self, scene):
        """The world rule: change every object whose shape (or colour) is OLD into NEW.

        Returns the edited Scene, None when the task does not apply, or NotImplemented when the
        task is not a shape or object-colour rule (then the caption rule is used).
        """
        from dds.world import COLORS, SHAPES, Scene, compatible

        if len(self.replace) != 1:
            return NotImplemented
        old, new = self.replace[0]
        scene = Scene.from_dict(scene) if isinstance(scene, dict) else scene
        if old in SHAPES and new in SHAPES:
            key = "shape"
        elif old in COLORS and new in COLORS:
            key = "color"
            if not compatible(new, scene.background):
                return None
        else:
            return NotImplemented
        objs = [replace(o, **{key: new}) if getattr(o, key) == old else o for o in scene.objects]
        if all(getattr(o, key) != old for o in scene.objects):
            return None
        return replace(scene, objects=tuple(objs))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["replace"] = [list(p) for p in self.replace]
        return d

    @staticmethod
    def from_dict(d: dict) -> Task:
        if not isinstance(d, dict) or "name" not in d:
            raise DDSError(f"task entry {d!r} must be an object with at least a 'name'")
        rep = d.get("replace") or ()
        if isinstance(rep, dict):
            rep = list(rep.items())
        pairs = tuple((str(a), str(b)) for a, b in rep)
        phrase = d.get("phrase") or (" ".join(b for _, b in pairs) if pairs else d.get("target", ""))
        return Task(str(d["name"]), str(phrase), pairs, d.get("target"))


def parse_task(spec: str) -> Task:
    """'circle:square' (replace a word) or 'lion=a photo of a lion' (a fixed target caption)."""
    if "=" in spec:
        name, target = spec.split("=", 1)
        return Task(name.strip(), target.strip(), target=target.strip())
    if spec.count(":") == 1:
        old, new = (s.strip() for s in spec.split(":"))
        if old and new:
            return Task(new.replace(" ", "-"), new, ((old, new),))
    raise DDSError(
        f"task '{spec}' is not understood; write OLD:NEW (e.g. circle:square) to replace a word "
        "of the source caption, or NAME=CAPTION for a fixed target caption"
    )


def load_tasks(specs: Sequence[str]) -> list[Task]:
    """Tasks from command-line specs; a spec ending in .json is a file with a list of tasks."""
    tasks: list[Task] = []
    for s in specs:
        if s.endswith(".json"):
            try:
                rows = json.loads(Path(s).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise DDSError(f"task file '{s}' cannot be read as JSON ({e})") from None
            if not isinstance(rows, list):
                raise DDSError(f"task file '{s}' must hold a JSON list of tasks")
            tasks += [Task.from_dict(r) for r in rows]
        else:
            tasks.append(parse_task(s))
    if not tasks:
        raise DDSError("no task given; add at least one --task, e.g. --task circle:square")
    names = [t.name for t in tasks]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise DDSError(f"task names must be unique; '{sorted(dup)[0]}' is given twice")
    if len(tasks) > 256:
        raise DDSError(f"{len(tasks)} tasks given; at most 256 are supported")
    return tasks


# --------------------------------------------------------------------------------------------
# Source pools
# --------------------------------------------------------------------------------------------


class WorldSources:
    """`n` scenes of the built-in world; item i is `SceneDataset(n, seed, size)[i]`."""

    def __init__(self, n: int, seed: int, size: int):
        from dds.world import SceneDataset

        self.ds = SceneDataset(n, seed, size=size)
        self.size = size
        self.scenes = [self.ds.scene(i).to_dict() for i in range(n)]
        from dds.world import caption

        self.captions = [caption(s) for s in (self.ds.scene(i) for i in range(n))]

    def __len__(self) -> int:
        return len(self.captions)

    def image(self, i: int) -> torch.Tensor:
        """(3,size,size) in [0,1]."""
        return self.ds[i]["image"]

    def where(self, i: int) -> str:
        return f"world scene {i}"


def _report(msg: str) -> None:
    print(f"dds translate-train: warning: {msg}", file=sys.stderr)


@dataclass
class BadItem:
    where: str
    why: str


class FolderSources:
    """A diffusers ImageFolder: `metadata.jsonl` lines {"file_name": ..., "text": ...}.

    Every line and every image is checked when the pool is built, so a bad item is met once,
    reported with its path, and then skipped (`on_bad_data="skip"`) or refused ("error").
    """

    def __init__(self, folder: str | Path, size: int, on_bad_data: str = "error"):
        from dds.images import load_image

        if on_bad_data not in ("skip", "error"):
            raise DDSError(f"--on-bad-data {on_bad_data!r} is invalid; use 'skip' or 'error'")
        self.root = Path(folder)
        self.size = size
        meta = self.root / "metadata.jsonl"
        if not meta.is_file():
            raise DDSError(
                f"data folder '{self.root}' has no metadata.jsonl; write one line "
                '{"file_name": ..., "text": caption} per image (the diffusers ImageFolder layout)'
            )
        self.files: list[Path] = []
        self.captions: list[str] = []
        self.scenes: list[dict | None] = []
        self.bad: list[BadItem] = []
        lines = meta.read_text(encoding="utf-8", errors="replace").splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{meta}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                self._bad(where, f"is not valid JSON ({e.msg})", on_bad_data)
                continue
            name = row.get("file_name") if isinstance(row, dict) else None
            if not name:
                self._bad(where, "has no 'file_name'", on_bad_data)
                continue
            path = self.root / name
            text = row.get("text")
            if not isinstance(text, str) or not text.strip():
                self._bad(str(path), "has no caption ('text' is missing or empty)", on_bad_data)
                continue
            try:
                load_image(path)
            except DDSError as e:
                self._bad(str(path), f"cannot be used: {e}", on_bad_data)
                continue
            self.files.append(path)
            self.captions.append(" ".join(text.split()))
            self.scenes.append(row.get("scene") if isinstance(row.get("scene"), dict) else None)
        if not self.files:
            raise DDSError(f"data folder '{self.root}' holds no usable image with a caption")
        if self.bad:
            _report(f"skipped {len(self.bad)} bad item(s) of '{self.root}'; see the lines above")

    def _bad(self, where: str, why: str, mode: str) -> None:
        if mode == "error":
            raise DDSError(
                f"training item '{where}' {why}; fix or remove it, or pass --on-bad-data skip"
            )
        self.bad.append(BadItem(where, why))
        _report(f"skipping '{where}': it {why}")

    def __len__(self) -> int:
        return len(self.files)

    def image(self, i: int) -> torch.Tensor:
        """(3,size,size) in [0,1]: centre-cropped to a square, resized."""
        from dds.images import load_image, pil_to_tensor, prepare

        im = prepare(load_image(self.files[i]), self.size, crop=True)
        return (pil_to_tensor(im)[0] + 1) / 2

    def where(self, i: int) -> str:
        return str(self.files[i])


# --------------------------------------------------------------------------------------------
# Sampling (source, task) pairs
# --------------------------------------------------------------------------------------------


@dataclass
class TaskTable:
    """For each task, the sources it applies to and their target captions."""

    tasks: list[Task]
    sources: list[list[int]] = field(default_factory=list)  # task -> source indices
    targets: list[dict[int, str]] = field(default_factory=list)  # task -> {source: y_k}

    @staticmethod
    def build(pool, tasks: Sequence[Task]) -> TaskTable:
        table = TaskTable(list(tasks))
        scenes = getattr(pool, "scenes", None) or [None] * len(pool)
        for task in tasks:
            tgt = {}
            for i, (cap, sc) in enumerate(zip(pool.captions, scenes, strict=True)):
                y = task.target_caption(cap, sc)
                if y is not None and y != cap:
                    tgt[i] = y
            if not tgt:
                raise DDSError(
                    f"task '{task.name}' applies to none of the {len(pool)} training images; "
                    "check its words against the captions (e.g. a circle task needs circles)"
                )
            table.sources.append(sorted(tgt))
            table.targets.append(tgt)
        return table

    def sample(self, rng: np.random.Generator, n: int) -> list[tuple[int, int, str]]:
        """n triples (task k, source i, target caption y_k): k uniform, then i uniform."""
        out = []
        for _ in range(n):
            k = int(rng.integers(len(self.tasks)))
            i = self.sources[k][int(rng.integers(len(self.sources[k])))]
            out.append((k, i, self.targets[k][i]))
        return out
