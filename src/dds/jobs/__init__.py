"""Editing at dataset scale: `dds edit FOLDER | LIST | IMAGEFOLDER | world:N`, batched, sharded
over processes, GPUs and machines with accelerate, resumable and recorded (docs/scale.md).

    inputs    the job list: reading, naming, seeding, the checks before any model loads
    plan      batches of one working size, dealt to processes the same way for any N
    run       one process's share: batched edits, failures per job, the manifest, the bar
    manifest  the JSON-lines records beside the outputs: shards, reading, merging
    truth     metrics of edits whose exact truth is known (the procedural world)
    launch    --processes N: the same command in N local processes via accelerate's launcher
"""

from dds.jobs.inputs import Columns, Job, JobList, JobOptions, export_world, job_seed, read_jobs
from dds.jobs.manifest import merge, read_records
from dds.jobs.plan import default_batch_size, make_batches, shard

__all__ = [
    "Columns",
    "Job",
    "JobList",
    "JobOptions",
    "default_batch_size",
    "export_world",
    "job_seed",
    "make_batches",
    "merge",
    "read_jobs",
    "read_records",
    "shard",
]
