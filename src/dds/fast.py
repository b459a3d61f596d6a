"""A fast editing path that gives the same edit as `dds.loop.edit_latents`.

Same seeds, same edit: every t and eps comes from `dds.loop.draw_t_eps`, edit by edit, step by
step, exactly as `edit_latents` draws them; the arithmetic is not written here at all: the
method's own pieces (`dds.methods`: model inputs, conditioning, combination into a gradient)
and `dds.score.sgd_step`, with the denoiser reached through the model interface
(`model.fast_denoiser`, `model.eps_fn`).  In float32 the two paths agree to rounding; in half
precision they agree to half-precision rounding.  This module only decides how the step runs:

What makes it fast (each is a flag, the defaults are listed in `FastEditor`):

* the UNet in half precision (`precision="fp16"` or `"bf16"`; a copy is made when the backend
  holds it in another dtype) instead of float32 weights cast on every call under autocast;
* the model's fastest exact kernels (`model.fast_denoiser`: for Stable Diffusion, PyTorch's
  fused scaled-dot-product attention, checked, and set on a copy when the model runs another);
* prompts encoded once (`prompt_embedding` caches each prompt, the backend caches "");
* all t, eps, alpha_t, sigma_t and w(t) for all steps drawn up front and moved to the device in
  one copy; the SGD update written by hand under `no_grad`, so the loop never waits for the
  device (no `.item()`, no autograd, no optimiser);
* `torch.compile` of the whole step, and a CUDA graph of the step replayed once per step
  (CUDA only); either falls back to eager with one warning when unavailable;
* where nothing is compiled (the CPU default), the UNet call traced once per input shape with
  `torch.jit.trace`: a second to build, the same arithmetic, without the Python overhead of
  several hundred module calls per step (a large share of a small model's call on a CPU); and
  each traced batch split by rows over the CPU threads, one chunk per thread, so that two cores
  work on two halves instead of meeting at every small op;
* many edits in one batch (B edits -> one UNet call of 4B).

No per-step callback: reporting progress would need the host to read the device every step.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from dds.errors import DDSError
from dds.loop import EditConfig, check_diverged, uses_embedded_guidance
from dds.methods import Draw, TailMean, get_method, optimizer_state
from dds.models.base import Conditioning, expand_cond
from dds.models.trace import TracedUNet

_RECIPE = EditConfig()  # the reference recipe's settings
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _clone_cond(c: Conditioning) -> Conditioning:
    """A copy of every tensor field of `c` (concatenating one part allocates new tensors)."""
    return Conditioning.cat([c])


def _copy_cond(dst: Conditioning, src: Conditioning) -> None:
    """Copy every tensor field of `src` into `dst`'s tensors in place (same shapes)."""
    for f in fields(dst):
        d = getattr(dst, f.name)
        if isinstance(d, Tensor):
            d.copy_(getattr(src, f.name))


@dataclass(frozen=True)
class _Plan:
    """Every step's draws (`dds.methods.Draw`) for B edits, stacked, on the device."""

    t: Tensor  # (S, B) timesteps
    eps: Tensor  # (S, B, C, h, w) float32 ((S, n_avg, B, C, h, w) for FlowEdit)
    weight: Tensor  # (S, B) float32: w(t), or FlowEdit's step
    phases: tuple[int, ...]  # (S,)


class FastEditor:
    """The fast editing path over a backend; keeps its half-precision UNet, compiled step and
    CUDA graphs between calls, so build one and edit many times.

    precision: "auto" (on CUDA fp16, or bf16 for a bf16 model such as FLUX; the backend's dtype
        elsewhere), "fp32", "fp16" or "bf16".
    compile: "auto" (on for CUDA, off on CPU where the Inductor build costs more than an edit),
        True/False, or a `torch.compile` mode string ("default", "max-autotune-no-cudagraphs").
    cuda_graphs: "auto" (on for CUDA), True/False; ignored (with one warning) off CUDA.
    trace: "auto" (on for the CPU when the step is not compiled), True/False: run the UNet as
        a TorchScript trace built once per input shape (`dds.models.trace`); eager if it fails.
    channels_last: run the UNet with channels-last memory format (off by default: it measured
        no faster on CPU; try it on a GPU with the benchmark's --channels-last).
    parallel: "auto" (on for the CPU), True/False: split each traced UNet batch by rows over
        the CPU threads, one chunk per thread (`dds.models.trace`); only with `trace`.
    """

    def __init__(
        self,
        backend,
        precision: str = "auto",
        compile="auto",
        cuda_graphs="auto",
        channels_last: bool = False,
        trace="auto",
        parallel="auto",
    ):
        self.backend = backend
        self.device = torch.device(backend.device)
        on_cuda = self.device.type == "cuda"
        base_dtype = next(backend.denoiser.parameters()).dtype
        if precision == "auto":  # half precision on CUDA: the model's bf16 (FLUX), else fp16
            dtype = (base_dtype if base_dtype == torch.bfloat16 else torch.float16) if on_cuda \
                else base_dtype
        elif precision in PRECISIONS:
            dtype = PRECISIONS[precision]
        else:
            raise DDSError(f"precision '{precision}' is not one of auto, fp32, fp16, bf16")
        self.dtype = dtype
        # The model's own denoiser when it fits, else a private copy (another dtype, or one
        # that channels-last will change): the model's own, used by the default path, stays.
        self.channels_last = bool(channels_last)
        unet = backend.fast_denoiser(dtype, private=self.channels_last)
        self.attention = backend.attention_kernels(unet)
        if self.channels_last:
            unet = unet.to(memory_format=torch.channels_last)
        self.unet = unet
        self._eps_fn = backend.eps_fn(unet, call=self._call)

        if compile == "auto":
            compile = on_cuda
        self.compile_mode = None
        if compile:
            self.compile_mode = compile if isinstance(compile, str) else "default"
        if cuda_graphs == "auto":
            cuda_graphs = on_cuda
        if cuda_graphs and not on_cuda:
            warnings.warn("CUDA graphs need a CUDA device; running without them", stacklevel=2)
            cuda_graphs = False
        self.cuda_graphs = bool(cuda_graphs)
        if trace == "auto":
            trace = self.compile_mode is None and not on_cuda
        self._traced = TracedUNet(enabled=bool(trace), parallel=parallel,
                                  eager=backend.denoiser_call)
        self._step = self._eager_step
        if self.compile_mode is not None:
            self._compiled = None  # built at the first call, so a failure can fall back
        self._graphs: dict[tuple, dict] = {}
        self._prompts: dict[str, Conditioning] = {}

    @property
    def trace(self) -> bool:
        return self._traced.enabled

    @property
    def split(self) -> bool:
        """Whether the traced UNet calls are split by rows over the CPU threads."""
        return self.trace and self._traced.parallel_on(self.device)

    # ---- prompts -----------------------------------------------------------------------
    def prompt_embedding(self, prompts: list[str]) -> Conditioning:
        """Conditioning of B prompts in the UNet's dtype; each distinct prompt is encoded once."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompts]
        if missing:
            c = self.backend.encode_prompt(missing).to(self.device, self.dtype)
            for i, p in enumerate(missing):
                self._prompts[p] = c[i]
        return Conditioning.cat([self._prompts[p] for p in prompts])

    def _uncond(self) -> Conditioning:
        if "" not in self._prompts:
            self._prompts[""] = self.backend.uncond().to(self.device, self.dtype)
        return self._prompts[""]

    # ---- the step ----------------------------------------------------------------------
    def _call(self, unet, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """The denoiser call: channels-last when asked, traced (and row-split) when on."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._traced(unet, x, t, cond)

    def _eager_step(self, z, z_hat, cond, t, eps, weight, phase, state, method, schedule, cfg,
                    embedded):
        """One step of the method; returns the new z.  z, z_hat: (B,C,h,w); `state`: the
        optimiser's buffers (updated in place)."""
        d = Draw(t, eps, weight, phase)
        return method.step(self._eps_fn, z, z_hat, cond, d, schedule, cfg, embedded, state)[0]

    def _run_step(self, *args):
        if self.compile_mode is not None and self._compiled is None:
            try:
                self._compiled = torch.compile(
                    self._eager_step, mode=self.compile_mode, dynamic=False
                )
                return self._compiled(*args)
            except Exception as e:  # no compiler, unsupported op or backend: stay eager
                warnings.warn(
                    f"torch.compile is unavailable here ({type(e).__name__}: "
                    f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
                    "running eager",
                    stacklevel=3,
                )
                self.compile_mode = None
                self._compiled = None
        if self.compile_mode is not None:
            return self._compiled(*args)
        return self._eager_step(*args)

    # ---- the loop ----------------------------------------------------------------------
    def _plan(self, method, seeds: list[int], shape: tuple[int, ...], cfg: EditConfig,
              schedule) -> _Plan:
        """All steps' draws, made on the CPU exactly as `edit_latents` makes them, then moved
        to the device in one go."""
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        draws = [method.draw(i, gens, shape, cfg, schedule) for i in range(method.num_steps(cfg))]
        dev = self.device
        return _Plan(t=torch.stack([d.t for d in draws]).to(dev),
                     eps=torch.stack([d.eps for d in draws]).to(dev),
                     weight=torch.stack([d.weight for d in draws]).to(dev),
                     phases=tuple(d.phase for d in draws))

    @torch.no_grad()
    def edit(
        self,
        z_hat: Tensor,
        cond_source: Conditioning,
        cond_target: Conditioning,
        cfg: EditConfig = _RECIPE,
        seeds: list[int] | None = None,
    ) -> Tensor:
        """The same edit as `edit_latents(model, z_hat, cond_source, cond_target, cfg, seeds=...)`.

        z_hat: (B,C,h,w); conditionings of B rows or 1.  Returns (B,C,h,w) float32.
        """
        b = z_hat.shape[0]
        seeds = list(seeds) if seeds is not None else [cfg.seed + i for i in range(b)]
        if len(seeds) != b:
            raise DDSError(f"got {len(seeds)} seeds for {b} edits; give one seed per edit")
        method = get_method(cfg.method)
        z_hat = z_hat.detach().float().to(self.device).contiguous()
        shape = tuple(z_hat.shape[1:])
        schedule = self.backend.schedule_for(z_hat.shape)
        plan = self._plan(method, seeds, shape, cfg, schedule.to("cpu"))

        def prep(c):
            return expand_cond(c.to(self.device, self.dtype), b)

        embedded = uses_embedded_guidance(self.backend, cfg)
        cond = method.conditioning(prep(self._uncond()), prep(cond_source), prep(cond_target),
                                   cfg, embedded)
        run = (method, schedule.to(self.device), cfg, embedded)
        z = self._loop(z_hat.clone(), z_hat, cond, plan, run)
        check_diverged(z, len(plan.phases))  # once, at the end: no host sync inside the loop
        return z

    def _loop(self, z, z_hat, cond, plan: _Plan, run):
        cfg = run[2]
        # one graph serves every step of a stateless step (SGD, no phases)
        if self.cuda_graphs and not any(plan.phases) and cfg.optimizer == "sgd":
            try:
                return self._edit_graphed(z, z_hat, cond, plan, run)
            except Exception as e:  # capture refused by some op: the eager loop is still right
                warnings.warn(
                    f"CUDA graph capture failed ({type(e).__name__}); running without graphs",
                    stacklevel=2,
                )
                self.cuda_graphs = False
                z = z_hat.clone()
        state, mean = optimizer_state(cfg, z), TailMean(cfg, len(plan.phases))
        for s, phase in enumerate(plan.phases):
            z = self._run_step(z, z_hat, cond, plan.t[s], plan.eps[s], plan.weight[s], phase,
                               state, *run)
            mean.add(s, z)
        return mean.result(z)

    def _edit_graphed(self, z, z_hat, cond, plan: _Plan, run):
        """The loop as one captured CUDA graph of a step, replayed once per step; each step's
        draws are copied into the graph's input buffers on the device (no host sync)."""
        method, _, cfg, embedded = run
        key = (tuple(z.shape), tuple(plan.eps.shape[1:]), len(cond), method.name, cfg, embedded)
        g = self._graphs.get(key)
        if g is None:
            st = {
                "z": z.clone(),
                "z_hat": z_hat.clone(),
                "cond": _clone_cond(cond),
                "t": plan.t[0].clone(),
                "eps": plan.eps[0].clone(),
                "weight": plan.weight[0].clone(),
            }

            def step():
                return self._run_step(st["z"], st["z_hat"], st["cond"], st["t"], st["eps"],
                                      st["weight"], 0, {}, *run)

            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up (and compile) outside the capture
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                st["z"].copy_(step())
            g = {"graph": graph, "static": st}
            self._graphs[key] = g
        st = g["static"]
        st["z"].copy_(z)
        st["z_hat"].copy_(z_hat)
        _copy_cond(st["cond"], cond)
        mean = TailMean(cfg, plan.t.shape[0])
        for s in range(plan.t.shape[0]):
            st["t"].copy_(plan.t[s])
            st["eps"].copy_(plan.eps[s])
            st["weight"].copy_(plan.weight[s])
            g["graph"].replay()
            mean.add(s, st["z"])
        return mean.result(st["z"].clone())


_EDITORS: dict[tuple, FastEditor] = {}


def fast_edit_latents(
    backend,
    z_hat: Tensor,
    cond_source: Conditioning,
    cond_target: Conditioning,
    cfg: EditConfig = _RECIPE,
    *,
    seeds: list[int] | None = None,
    precision: str = "auto",
    compile="auto",
    cuda_graphs="auto",
    channels_last: bool = False,
    trace="auto",
    parallel="auto",
) -> Tensor:
    """`edit_latents` through a cached `FastEditor` (one per backend and settings).

    Same arguments and result as `dds.loop.edit_latents` (no on_step); the keyword flags are
    `FastEditor`'s.  z_hat: (B,C,h,w) -> (B,C,h,w) float32 edited latents.
    """
    key = (id(backend), precision, compile, cuda_graphs, channels_last, trace, parallel)
    ed = _EDITORS.get(key)
    if ed is None or ed.backend is not backend:
        ed = FastEditor(
            backend,
            precision=precision,
            compile=compile,
            cuda_graphs=cuda_graphs,
            channels_last=channels_last,
            trace=trace,
            parallel=parallel,
        )
        _EDITORS[key] = ed
    return ed.edit(z_hat, cond_source, cond_target, cfg, seeds=seeds)
