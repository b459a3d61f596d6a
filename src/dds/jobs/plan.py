"""Batches and shards: which jobs share denoiser calls, and which process runs them.

The plan is made from the whole job list (done or not) and the batch size alone, so it is the
same in every process and for any number of processes:

1. each job's working size comes from its header size (`working_size`, the pipeline's rule);
2. jobs of one working size form groups, in list order, cut into batches of B;
3. batches are ordered by their first job, and batch k goes to process k mod N.

So a job is edited in the same batch, with the same companions and the same seeds, whether the
run has one process or many, and whether it is the first run or a resumed one: outputs do not
depend on N.  A resumed run edits the jobs of a batch that are not done yet; those are the
whole batch unless the batch was cut short by a failure (whose other jobs were then edited one
at a time, as their rerun is).
"""

from __future__ import annotations

from collections.abc import Sequence

from dds.images import working_size as _working_size
from dds.jobs.inputs import Job

# --batch-size when none is given.  A DDS edit is 4 denoiser rows per step.  On a GPU, 8 edits
# of SD1.5 at 512x512 (a UNet batch of 32 at 64x64 latents) fit with room on a 24 GB card, and
# larger latents get proportionally fewer (SDXL at 1024: 2).  On a CPU, batching saves a call's
# fixed overhead, which is what a small model's call is made of: 8 for latents up to 32x32 (the
# built-in model: B=8 edits 1.9x as many per second as B=1 on two cores, docs/scale.md); a large
# model's call is compute-bound there, and batching would only add memory: 1.
GPU_BATCH, CPU_BATCH = 8, 8
REFERENCE_LATENT_AREA = 64 * 64  # SD1.5 at 512x512
SMALL_LATENT_AREA = 32 * 32


def default_batch_size(device_type: str, latent_area: int) -> int:
    """The default edits per denoiser call on a device, for latents of `latent_area` pixels."""
    if device_type == "cuda":
        return max(1, min(GPU_BATCH, round(GPU_BATCH * REFERENCE_LATENT_AREA / latent_area)))
    return CPU_BATCH if latent_area <= SMALL_LATENT_AREA else 1


def working_size(size: tuple[int, int], long_side: int, multiple: int, crop: bool) -> tuple[int, int]:
    """The size `dds.pipeline.EditPipeline.prepare` will give an input of header size `size`."""
    if crop:
        s = min(size)
        size = (s, s)
    return _working_size(size, long_side, multiple)


def make_batches(jobs: Sequence[Job], sizes: Sequence[tuple[int, int]],
                 batch_size: int) -> list[list[Job]]:
    """Jobs of one working size in batches of `batch_size`, ordered by their first job."""
    groups: dict[tuple[int, int], list[Job]] = {}
    for job, size in zip(jobs, sizes, strict=True):
        groups.setdefault(tuple(size), []).append(job)
    batches = [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    return sorted(batches, key=lambda b: b[0].index)


def shard(batches: Sequence[list[Job]], rank: int, processes: int) -> list[list[Job]]:
    """Process `rank`'s batches: every `processes`-th, starting at its own."""
    return list(batches[rank::processes])
