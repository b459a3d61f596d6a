"""Running one process's share of a dataset edit, and the one progress bar over all processes.

A batch's jobs are loaded (an image damaged past its header fails that job alone) and prepared
by `EditPipeline.prepare` (the same checks, working size and settings as a single edit, with
the job's seed); then each group of one working size is edited in one `FastEditor.edit` call:
B edits in one denoiser call per step, edit i drawing its t and noise from its own seed, so the
result is each edit's own, as if run alone (to float rounding: see docs/scale.md).  Each
latent and prompt embedding is computed alone (a batch of one), so its bits do not depend on
its companions.  Each output is written atomically (`EditResult.save`, PNG with metadata), then
recorded in the process's manifest shard.

A batch that diverges (`DivergedError`) or runs out of GPU memory is not lost: a diverged batch
is edited again one job at a time, so only the job that diverges fails (with its sentence); an
out-of-memory batch is split in halves.  With --save-every the step-by-step loop runs instead
(`EditPipeline.run`, one edit at a time), which is what can show a step's latents.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dds.errors import DDSError
from dds.jobs.inputs import Job, JobList
from dds.jobs.manifest import FAILED, MERGED, OK, ShardWriter, manifest_files
from dds.jobs.truth import TruthScorer

PROMPT_CACHE = 256  # prompt embeddings kept per process, on its device (each computed alone;
# a FLUX prompt is 4 MB of T5 states, so the cache stays small)


@dataclass(frozen=True)
class RunSettings:
    """What every job of a run shares.  settings: the `EditConfig` fields the command line set
    (None: the model's, else the recipe's); the job's seed replaces `seed`."""

    settings: dict
    size: int | None = None
    crop: bool = False
    model: str | None = None
    precision: str = "auto"
    seed: int = 0  # --seed: the base of the jobs' seeds
    save_every: int | None = None  # the step-by-step loop with a preview every N steps

    def request(self) -> dict:
        """What a record keeps of the request, and a resumed run must match (the batch size
        and the process count are not part of it: they change rounding, not the edit)."""
        model = self.model
        if model is not None and Path(model).exists():
            model = str(Path(model).resolve())
        given = {k: v for k, v in sorted(self.settings.items()) if v is not None}
        return {**given, "size": self.size, "crop": self.crop, "model": model,
                "precision": self.precision, "seed": self.seed}


# ---- what is left to do ---------------------------------------------------------------------
@dataclass
class Pending:
    todo: list[Job]  # to edit in this run
    recovered: list[Job]  # output written, record missing (a process killed between the two)
    done: int  # finished with a record
    failed_left: int  # failed before and left alone (--skip-failed)


def pending(jl: JobList, records: dict[str, dict], resume: bool, skip_failed: bool) -> Pending:
    """Which jobs this run edits: all of them, or with --resume those not finished yet (a job
    is finished when it has an 'ok' record and its output exists, or when its output exists
    without any record); failed jobs are retried unless `skip_failed`."""
    if not resume:
        return Pending(list(jl.jobs), [], 0, 0)
    todo, recovered, done, left = [], [], 0, 0
    for j in jl.jobs:
        rec = records.get(j.key)
        exists = j.out.exists()
        if rec is None:
            (recovered if exists else todo).append(j)
        elif rec.get("status") == OK and exists:
            done += 1
        elif rec.get("status") == FAILED and skip_failed:
            left += 1
        else:
            todo.append(j)
    return Pending(todo, recovered, done, left)


def check_same_request(jl: JobList, records: dict[str, dict], request: dict) -> None:
    """A resumed run must ask for what the finished edits were made with."""
    differ = {}
    count = 0
    for j in jl.jobs:
        rec = records.get(j.key)
        if rec is None or rec.get("status") != OK or "request" not in rec:
            continue
        old = rec["request"]
        diff = {k for k in set(old) | set(request) if old.get(k) != request.get(k)}
        if diff:
            count += 1
            for k in diff:
                differ.setdefault(k, (old.get(k), request.get(k)))
    if count:
        what = "; ".join(f"{k} {new!r} now, {old!r} then" for k, (old, new) in sorted(differ.items()))
        raise DDSError(
            f"{count} finished edits in '{jl.out_dir}' were made with other settings ({what}); "
            "rerun with their settings, drop --resume to redo every edit, or choose another --out")


def recover(jobs: list[Job], jl: JobList, writer: ShardWriter) -> None:
    """Records for outputs written by a run killed before it recorded them (no model needed;
    their metrics are computed from the files when the truth is known)."""
    from dds.images import load_image

    scorer = TruthScorer()
    try:
        for job in jobs:
            metrics = None
            if job.edit is not None or job.truth is not None:
                try:
                    metrics = scorer.score(job, load_image(job.out), job.load())
                except DDSError as e:
                    metrics = {"error": str(e)}
            now = time.time()
            writer.write(job_record(job, jl.out_dir, OK, recovered=True, started=now,
                                    finished=now, metrics=metrics))
    finally:
        writer.close()


_EDITORS: dict[tuple, object] = {}


def fast_editor(model, precision: str):
    """The model's `FastEditor` for this precision, kept between runs in one process (its
    traced denoiser calls, one per input shape, are built once)."""
    from dds.fast import FastEditor

    key = (id(model), precision)
    ed = _EDITORS.get(key)
    if ed is None or ed.backend is not model:
        ed = _EDITORS[key] = FastEditor(model, precision=precision)
    return ed


# ---- the runner -----------------------------------------------------------------------------
def job_record(job: Job, out_dir: Path, status: str, **fields) -> dict:
    """A manifest record (see `dds.jobs.manifest`)."""
    try:
        out = job.out.resolve().relative_to(out_dir.resolve()).as_posix()
    except ValueError:
        out = str(job.out)
    rec = {"key": job.key, "index": job.index,
           "image": str(job.image) if job.image is not None else job.label,
           "source": job.source, "target": job.target, "out": out, "seed": job.seed,
           "status": status}
    if job.truth is not None:
        rec["truth"] = str(job.truth)
    if job.edit is not None:
        rec["edit"] = job.edit
    rec.update({k: v for k, v in fields.items() if v is not None})
    return rec


class ShardRunner:
    """Edits one process's batches and records each job in the process's manifest shard."""

    def __init__(self, pipe, jl: JobList, run: RunSettings, writer: ShardWriter, *,
                 rank: int = 0, processes: int = 1, warn=None):
        self.pipe, self.jl, self.run_settings, self.writer = pipe, jl, run, writer
        self.rank, self.processes = rank, processes
        self.warn = warn or (lambda msg: None)
        self.scorer = TruthScorer()
        self.request = run.request()
        self._conds: OrderedDict[str, object] = OrderedDict()
        self.editor = None if run.save_every is not None else fast_editor(pipe.model, run.precision)
        self._oom_noted = False

    # ---- records ----------------------------------------------------------------------------
    def runtime(self, batch: int) -> dict:
        dtype = self.editor.dtype if self.editor is not None else self.pipe.model.dtype
        return {"device": str(self.pipe.model.device),
                "precision": str(dtype).removeprefix("torch."),
                "threads": torch.get_num_threads(), "processes": self.processes,
                "rank": self.rank, "batch": batch,
                "engine": "fast" if self.editor is not None else "loop"}

    def _write(self, rec: dict) -> None:
        self.writer.write(rec)

    def fail(self, job: Job, error: Exception, started: float, batch: int) -> None:
        now = time.time()
        self._write(job_record(job, self.jl.out_dir, FAILED, error=str(error),
                               seconds=round(now - started, 4), started=started, finished=now,
                               request=self.request, runtime=self.runtime(batch)))

    # ---- prompts and latents, each alone ----------------------------------------------------
    def cond(self, prompt: str):
        c = self._conds.get(prompt)
        if c is None:
            with torch.no_grad():
                c = self.pipe.model.encode_prompt([prompt])
            self._conds[prompt] = c
            while len(self._conds) > PROMPT_CACHE:
                self._conds.popitem(last=False)
        else:
            self._conds.move_to_end(prompt)
        return c

    # ---- running ----------------------------------------------------------------------------
    def run(self, batches: list[list[Job]], todo: set[str]) -> None:
        """Edit the jobs of `batches` whose keys are in `todo`; each batch's records are made
        durable before the next batch starts."""
        try:
            for batch in batches:
                jobs = [j for j in batch if j.key in todo]
                if jobs:
                    self.run_batch(jobs)
                    self.writer.sync()
        finally:
            self.writer.close()

    def run_batch(self, batch: list[Job]) -> None:
        from dds.pipeline import EditRequest

        rs = self.run_settings
        started = time.time()
        ready = []
        for job in batch:
            try:
                image = job.load()
                p = self.pipe.prepare(EditRequest(image, job.source, job.target,
                                                  {**rs.settings, "seed": job.seed},
                                                  size=rs.size, crop=rs.crop))
                ready.append((job, p, image))
            except DDSError as e:  # found late: an image damaged past its header
                self.fail(job, e, started, 1)
        groups: dict[tuple, list] = {}
        for item in ready:  # one working size and one config per denoiser call
            p = item[1]
            groups.setdefault((p.input.size, replace(p.config, seed=0)), []).append(item)
        for group in groups.values():
            self.run_group(group, started)

    def run_group(self, group: list, started: float) -> None:
        try:
            results = self.edit(group)
        except DDSError as e:  # DivergedError (or any one-sentence failure) of the batch
            if len(group) == 1:
                self.fail(group[0][0], e, started, 1)
                return
            for item in group:  # only the job that diverges should fail
                self.run_group([item], time.time())
            return
        except torch.cuda.OutOfMemoryError:
            if len(group) == 1:
                raise
            if not self._oom_noted:
                self.warn(f"a batch of {len(group)} edits ran out of GPU memory; splitting "
                          "batches in halves (a smaller --batch-size avoids the retries)")
                self._oom_noted = True
            torch.cuda.empty_cache()
            half = len(group) // 2
            self.run_group(group[:half], started)
            self.run_group(group[half:], time.time())
            return
        finished = time.time()
        share = (finished - started) / len(group)
        for (job, p, image), result in zip(group, results, strict=True):
            result.save(job.out)
            metrics = floors = None
            if job.edit is not None or job.truth is not None:
                try:
                    metrics = self.scorer.score(job, result.image, image)
                    if "error" not in metrics:
                        floors = self.scorer.floors(job, image, self.round_trip(result))
                except (DDSError, FileNotFoundError) as e:
                    metrics = {"error": str(e)}
            self._write(job_record(
                job, self.jl.out_dir, OK, seconds=round(share, 4), started=started,
                finished=time.time(), request=self.request, config=result.metadata["config"],
                size=list(p.input.size), notes=list(p.notes) or None, metrics=metrics,
                floors=floors, runtime=self.runtime(len(group))))

    def round_trip(self, result):
        """The autoencoder round trip of an edit's input at its working size (a floor): its
        latents as the edit encoded them (both of `edit`'s paths keep them), decoded."""
        with torch.no_grad():
            return self.pipe.decode(result.source_latents)

    def edit(self, group: list) -> list:
        """The edits of one group: `EditResult`s in order."""
        from dds.pipeline import EditResult

        if self.editor is None:  # --save-every: the step-by-step loop, one edit at a time
            (job, p, _), = group
            return [self.pipe.run(p, on_step=self.preview_hook(job))]
        from dds.images import pil_to_tensor
        from dds.methods import get_method
        from dds.models.base import cat_cond

        model = self.pipe.model
        t0 = time.monotonic()
        with torch.no_grad():
            z_hat = torch.cat([model.encode(pil_to_tensor(p.input)) for _, p, _ in group])
        cs = cat_cond([self.cond(p.source) for _, p, _ in group])
        ct = cat_cond([self.cond(p.target) for _, p, _ in group])
        cfg = group[0][1].config
        z = self.editor.edit(z_hat, cs, ct, cfg, seeds=[p.config.seed for _, p, _ in group])
        steps = get_method(cfg.method).num_steps(cfg)
        out = []
        for i, (_, p, _) in enumerate(group):
            meta = {**self.pipe.metadata(p, steps), "batch": len(group)}
            out.append(EditResult(image=self.pipe.decode(z[i:i + 1]), input=p.input,
                                  latents=z[i:i + 1], config=p.config, steps_run=steps,
                                  stopped=False, seconds=time.monotonic() - t0, metadata=meta,
                                  source_latents=z_hat[i:i + 1]))
        return out

    def preview_hook(self, job: Job):
        from dds.images import save_png

        every = self.run_settings.save_every

        def on_step(info) -> None:
            if every and info.step % every == 0 and info.step < info.total:
                snap = job.out.with_name(f"{job.out.stem}-step{info.step:04d}.png")
                save_png(self.pipe.decode(info.z), snap)

        return on_step


# ---- one bar over every process -------------------------------------------------------------
class Progress:
    """One bar for the whole run: edits recorded by every process since the bar started, read
    from the manifest shards' new lines (so it needs no messages between processes), with
    edits/s and the time left.  `start()` polls in a thread; `stop()` reads the last lines."""

    def __init__(self, out_dir: Path, total: int, quiet: bool = False, every: float = 0.5,
                 desc: str = "dds edit"):
        from dds.progress import progress_bar

        self.out_dir, self.every = Path(out_dir), every
        self.offsets = {p: p.stat().st_size for p in manifest_files(self.out_dir)}
        self.ok = self.failed = 0
        self.bar = progress_bar(total, desc, quiet=quiet, unit="edit")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def count(self) -> int:
        return self.ok + self.failed

    def poll(self) -> int:
        import json

        before = self.count
        for path in manifest_files(self.out_dir):
            if path.name == MERGED:
                continue
            off = self.offsets.get(path, 0)
            try:
                size = path.stat().st_size
                if size <= off:
                    continue
                with open(path, "rb") as f:
                    f.seek(off)
                    data = f.read(size - off)
            except OSError:
                continue
            end = data.rfind(b"\n")
            if end < 0:
                continue
            self.offsets[path] = off + end + 1
            for line in data[:end].splitlines():
                try:
                    rec = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue
                if not isinstance(rec, dict) or rec.get("recovered"):
                    continue
                self.ok += rec.get("status") == OK
                self.failed += rec.get("status") == FAILED
        if self.count != before:
            if self.failed:
                self.bar.set_postfix(failed=self.failed, refresh=False)
            self.bar.update(self.count - before)
        return self.count

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.poll()

    def start(self) -> Progress:
        self._thread = threading.Thread(target=self._loop, name="dds-progress", daemon=True)
        self._thread.start()
        return self

    def wait_for(self, total: int, alive=lambda: True) -> None:
        """Poll until `total` edits are recorded (or `alive()` turns false)."""
        while self.poll() < total and alive():
            time.sleep(self.every)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.poll()
        self.bar.close()


def summary(records: dict[str, dict], jl: JobList, since: float | None = None) -> list[str]:
    """The lines printed at the end of a run: counts, this run's rate (`since`: its start, as a
    Unix time) and the mean of every metric over the edits whose truth is known, then the
    same means of the two floors (no edit, autoencoder round trip) over those edits."""
    from dds.eval.floors import FLOOR_LABELS
    from dds.jobs.manifest import summarise

    recs = [records[j.key] for j in jl.jobs if j.key in records]
    s = summarise(recs)
    missing = len(jl.jobs) - len(recs)
    head = f"dds: {s['ok']} of {len(jl.jobs)} edits done in '{jl.out_dir}'"
    if s["failed"]:
        head += f", {s['failed']} failed (their sentences are in the manifest)"
    if missing:
        head += f", {missing} not done"
    now = [r for r in recs if since is not None and not r.get("recovered")
           and float(r.get("finished") or 0) >= since]
    if now:
        wall = time.time() - since
        first = min(float(r.get("started") or since) for r in now)
        busy = max(float(r["finished"]) for r in now) - first
        head += f"; {len(now)} in this run, {len(now) / wall:.2f} edits/s overall"
        if busy > 0:
            head += f", {len(now) / busy:.2f} edits/s while editing"
    lines = [head]
    if s["metrics"]:
        parts = _metric_parts(s["metrics"])
        lines.append(f"dds: truth known for {s['scored']} edits; mean " + ", ".join(parts))
    for name, means in s["floors"].items():
        lines.append(f"dds: floor, {FLOOR_LABELS.get(name, name)}: mean "
                     + ", ".join(_metric_parts(means)))
    return lines


def _metric_parts(means: dict[str, float]) -> list[str]:
    """'label value' for each mean, in the metrics' registered order."""
    from dds.eval.metrics import METRICS

    order = [k for k in METRICS if k in means] + [k for k in means if k not in METRICS]
    return [f"{METRICS[k].short} {METRICS[k].format(means[k])}" if k in METRICS
            else f"{k} {means[k]:.3f}" for k in order]
