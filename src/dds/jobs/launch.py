"""`dds edit --processes N`: the same command in N local processes, started by accelerate's own
launcher (`accelerate launch --multi_gpu --num_processes N -m dds.cli edit ...`, which hands
them to torch.distributed.run), so a local run and `accelerate launch -m dds edit` on a cluster
are one code path: every process reads its rank from `accelerate.PartialState`.

The processes started here are workers (WORKER_ENV is set): they neither show a bar nor print
a summary, and they exit 0 when their jobs are recorded, failed or not; the process that
started them shows the one bar and reads the manifests for the summary and the exit code.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

WORKER_ENV = "DDS_EDIT_WORKER"


def is_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1"


def strip_option(argv: list[str], name: str) -> list[str]:
    """argv without `name VALUE` / `name=VALUE`."""
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
        elif tok == name:
            skip = True
        elif not tok.startswith(name + "="):
            out.append(tok)
    return out


@contextmanager
def environment(**values: str):
    """Set environment variables for the processes started inside; restore them after."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def launch(processes: int, edit_argv: list[str], threads: int, cpu: bool) -> None:
    """Run `dds edit *edit_argv` in `processes` local processes and wait for them (raises what
    torch.distributed.run raises when one of them fails)."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    argv = ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
            "--num_cpu_threads_per_process", str(threads), "-m", "dds.cli", "edit", *edit_argv]
    args = launch_command_parser().parse_args(argv)
    env = {WORKER_ENV: "1", "OMP_NUM_THREADS": str(threads)}
    if cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    with environment(**env):
        launch_command(args)
