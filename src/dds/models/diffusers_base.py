"""What every diffusers-format family shares: finding and checking the folder, precision and
device, the autoencoder's scaling, and the named parts of `dds.models.base.Model` that do not
depend on the denoiser's architecture (copies, the fast path's module, the eps function).

A family (`stable_diffusion.py`, `sdxl.py`, `sd3.py`, `flux.py`) subclasses `DiffusersModel`,
names its components, loads them in `_load`, and writes the three things that differ: prompt
encoding, the denoiser's call, and how its output becomes eps.
"""

from __future__ import annotations

import copy
import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from dds.errors import DDSError
from dds.models.base import Conditioning, DenoiserCall, EpsFn
from dds.models.trace import unet_call_for

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# What each component folder must hold: (config file, accepted weight-file stems).
DENOISER = ("config.json", ("diffusion_pytorch_model",))
TEXT_ENCODER = ("config.json", ("model", "pytorch_model"))
TOKENIZER = (None, ())
SCHEDULER = ("scheduler_config.json", ())
SD_COMPONENTS = {"unet": DENOISER, "vae": DENOISER, "text_encoder": TEXT_ENCODER,
                 "tokenizer": TOKENIZER, "scheduler": SCHEDULER}


def resolve_model_dir(model: str | Path) -> Path:
    """A diffusers folder, or a model id already in the local Hugging Face cache (no network)."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DDSError(
                f"model '{model}' is a file; give a diffusers model folder (with unet/, vae/, "
                "text_encoder/, tokenizer/, scheduler/) or a model id in the local cache"
            )
        return path
    if str(model).count("/") == 1 and not str(model).startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(str(model), local_files_only=True))
        except Exception:
            pass
    raise DDSError(
        f"model '{model}' is neither a folder nor a model id in the local Hugging Face cache; "
        "download the weights on a machine with access (e.g. `hf download <id>`) and pass the "
        "folder with --model, or omit --model to use the built-in model"
    )


def _weight_variant(folder: Path, stems: tuple[str, ...]) -> tuple[bool, str | None]:
    """Does `folder` hold weights, and are they only in the 'fp16' variant?"""
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    plain = any(n in (f"{s}.safetensors", f"{s}.bin") for s in stems for n in names)
    half = any(n in (f"{s}.fp16.safetensors", f"{s}.fp16.bin") for s in stems for n in names)
    sharded = any(n.endswith(".index.json") for n in names)
    if plain or sharded:
        return True, None
    return half, "fp16" if half else None


def check_model_dir(root: Path, components: dict | None = None, optional: tuple[str, ...] = (),
                    title: str = "Stable Diffusion") -> dict[str, str | None]:
    """Refuse, in one sentence, a folder missing a component; return each weight variant.

    components: folder name -> (config file, weight-file stems); default Stable Diffusion's.
    optional: components the family can do without (SD3's T5 encoder): absent ones are left
    out of the result; present ones must be complete."""
    variants: dict[str, str | None] = {}
    for name, (config, stems) in (components or SD_COMPONENTS).items():
        sub = root / name
        if name in optional and not sub.is_dir():
            continue
        missing = None
        if not sub.is_dir():
            missing = f"the '{name}' folder"
        elif config and not (sub / config).is_file():
            missing = f"'{name}/{config}'"
        elif name.startswith("tokenizer") and not (
            (sub / "vocab.json").is_file() and (sub / "merges.txt").is_file()
            or (sub / "tokenizer.json").is_file() or (sub / "spiece.model").is_file()
        ):
            missing = (f"the tokenizer files in '{name}/' (tokenizer.json, "
                       "vocab.json and merges.txt, or spiece.model)")
        elif stems:
            ok, variant = _weight_variant(sub, stems)
            if not ok:
                missing = f"the weights in '{name}/' ({stems[0]}.safetensors)"
            variants[name] = variant
        if missing:
            raise DDSError(
                f"model folder '{root}' lacks {missing}; give a complete diffusers {title} "
                "folder (as written by `save_pretrained`) or re-download it"
            )
    return variants


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def attention_processors(unet) -> list[str]:
    """Names of the attention processors in a diffusers `unet`, deduplicated and sorted."""
    procs = getattr(unet, "attn_processors", {})
    return sorted({type(p).__name__ for p in procs.values()})


def _plain_attention(unet) -> bool:
    return "AttnProcessor" in attention_processors(unet)


def use_fused_attention(unet) -> None:
    """Swap diffusers' plain `AttnProcessor` for `AttnProcessor2_0`, which calls torch's fused
    `scaled_dot_product_attention` (diffusers' default with torch >= 2, so this only changes a
    UNet set to the plain one); other processors are left as they are."""
    if not _plain_attention(unet):
        return
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet.set_attn_processor({name: AttnProcessor2_0() if type(p) is AttnProcessor else p
                             for name, p in unet.attn_processors.items()})


def folder_hash(root: Path) -> str:
    """A short hash of a model folder's configs and weight-file sizes: which model and
    version made an output, without reading gigabytes of weights."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            rel = p.relative_to(root).as_posix()
            h.update(rel.encode())
            if p.suffix == ".json":
                h.update(p.read_bytes())
            else:
                h.update(str(p.stat().st_size).encode())
    return h.hexdigest()[:16]


@contextmanager
def load_errors(root: Path, title: str):
    """Turn a library's loading error into one sentence naming the folder and the family."""
    try:
        yield
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DDSError(
            f"could not load the model in '{root}' ({first}); check that the folder is "
            f"a complete diffusers {title} model"
        ) from None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """"auto" is fp16 on CUDA and fp32 elsewhere; one sentence for an unknown name."""
    if dtype == "auto":
        dtype = "fp16" if device.type == "cuda" else "fp32"
    if dtype not in DTYPES:
        raise DDSError(f"precision '{dtype}' is not one of fp32, fp16, bf16, auto")
    return DTYPES[dtype]


def freeze(module, device: torch.device, dtype: torch.dtype):
    """Move a module to device and dtype (a no-op for fp32 on the CPU), eval, no grads."""
    if device.type != "cpu" or dtype != torch.float32:
        module.to(device, dtype)
    return module.eval().requires_grad_(False)


class DiffusersModel:
    """The family-independent half of a `Model` over a diffusers folder.

    Subclasses set `family`, `title`, `COMPONENTS` (and `OPTIONAL`), `DENOISER_FOLDER`, and
    implement `_load` (set `self.denoiser_module`, `self.vae`, `self.schedule`, text encoders),
    `encode_prompt`, `prompt_length`, `_call(module, z_t, t, cond)` (the denoiser's raw output)
    and optionally `_to_eps(out, z_t, t)` (default: the output is eps) and `_uncond_cond()`.

    The denoiser and text encoders run in `dtype`; the autoencoder in float32 unless the
    subclass sets `vae_dtype` (it runs twice per edit, and SD/SDXL VAEs overflow in fp16).
    Noise predictions come back in float32 so the optimisation itself is full precision.
    """

    family = ""
    title = ""
    COMPONENTS: dict = SD_COMPONENTS
    OPTIONAL: tuple[str, ...] = ()
    DENOISER_FOLDER = "unet"
    guidance_embedded = False
    family_defaults: dict = {}  # editing settings for the family (see dds.models.base.Model)

    def __init__(self, model: str | Path, dtype: str = "auto", device: str | None = None,
                 trace: bool | str = "auto", label: str | None = None):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # loading is quick; the bar only clutters stderr
        self._root = resolve_model_dir(model)
        self._variants = check_model_dir(self._root, self.COMPONENTS, self.OPTIONAL, self.title)
        self.device = torch.device(device) if device else default_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.vae_dtype = torch.float32
        with load_errors(self._root, self.title):
            self._load()
        self.vae = freeze(self.vae, self.device, self.vae_dtype)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.shift_factor = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if not getattr(self, "size_multiple", None):  # pixels both working sides divide by
            self.size_multiple = max(8, self.vae_scale_factor)
        self._uncond: Conditioning | None = None
        self._call_frozen = unet_call_for(self.device, trace, eager=self._call)
        defaults = self._root / "dds_edit_defaults.json"
        own = json.loads(defaults.read_text()) if defaults.is_file() else {}
        self.edit_defaults = {**self.family_defaults, **own}
        self.label = label or self._root.name or "model"
        self._hash: str | None = None

    def _load(self) -> None:
        raise NotImplementedError

    def _module(self, cls, folder: str, **kw):
        """Load component `folder` with class `cls` and this folder's weight variant."""
        return cls.from_pretrained(self._root, subfolder=folder,
                                   variant=self._variants.get(folder), **kw)

    # ---- images ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """(B,3,H,W) in [-1,1] -> (B,C,H/f,W/f): (posterior mean - shift) * scale."""
        x = images.to(self.device, self.vae_dtype)
        mean = self.vae.encode(x).latent_dist.mean.float()
        return (mean - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """(B,C,h,w) -> (B,3,h*f,w*f) in [-1,1]: latents / scale + shift, decoded."""
        z = latents.to(self.device, torch.float32) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(self.vae_dtype)).sample.float().clamp(-1, 1)

    # ---- prompts --------------------------------------------------------------------------
    def uncond(self) -> Conditioning:
        """The unconditional branch's conditioning, computed once and cached.  1 row."""
        if self._uncond is None:
            self._uncond = self._uncond_cond()
        return self._uncond

    def _uncond_cond(self) -> Conditioning:
        return self.encode_prompt([""])

    # ---- the denoiser ---------------------------------------------------------------------
    def predict_eps(self, z_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """(B,C,h,w), (B,), conditioning of B rows -> eps (B,C,h,w) float32."""
        return self._predict(self.denoiser, self._call_frozen, z_t, t, cond)

    def schedule_for(self, shape):
        return self.schedule

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.denoiser_module

    @property
    def denoiser_call(self) -> DenoiserCall:
        """The denoiser's plain call (module, z_t, t, cond) -> raw output (the fast path
        traces or compiles it)."""
        return self._call

    def copy_denoiser(self, dtype: torch.dtype | None = None,
                      trainable: bool = False) -> torch.nn.Module:
        """A private copy of the denoiser (the model's own stays frozen and unchanged).

        A copy in a wider dtype than the loaded weights (float32 from an fp16 model on a GPU) is
        read from the folder again, so that it starts from the stored weights, not from their
        half-precision rounding."""
        own = next(self.denoiser.parameters()).dtype
        if dtype is not None and dtype != own and torch.finfo(dtype).bits > torch.finfo(own).bits:
            module = self._module(type(self.denoiser), self.DENOISER_FOLDER,
                                  torch_dtype=dtype).to(self.device)
        else:
            module = copy.deepcopy(self.denoiser)
            if dtype is not None and dtype != own:
                module = module.to(dtype)
        if trainable:
            return module.train().requires_grad_(True)
        return module.eval().requires_grad_(False)

    def fast_denoiser(self, dtype: torch.dtype | None = None,
                      private: bool = False) -> torch.nn.Module:
        """The denoiser for frozen, no-grad calls in `dtype` (None: the model's), with torch's
        fused attention: the model's own module when it already is that (shared: never change
        it), else a frozen private copy (always a copy when `private`)."""
        own = next(self.denoiser.parameters()).dtype
        dtype = dtype or own
        if not private and dtype == own and not _plain_attention(self.denoiser):
            return self.denoiser
        module = self.copy_denoiser(dtype).eval().requires_grad_(False)
        use_fused_attention(module)
        return module

    def attention_kernels(self, module: torch.nn.Module) -> list[str]:
        """The attention processors `module` (the denoiser or a copy of it) runs, for reports."""
        return attention_processors(module)

    def eps_fn(self, module: torch.nn.Module, call: DenoiserCall | None = None) -> EpsFn:
        """`predict_eps` through `module` (a copy of the denoiser), called by `call`."""
        call = call or self._call
        return lambda z_t, t, cond: self._predict(module, call, z_t, t, cond)

    def identity(self) -> dict:
        """What made an output: family, name and a hash of the folder's configs and files."""
        if self._hash is None:
            self._hash = folder_hash(self._root)
        return {"family": self.family, "name": self.label, "hash": self._hash,
                "prediction": self.prediction_type}

    def folder_mb(self) -> float:
        """The size of the model folder's files in MB (10^6 bytes)."""
        return sum(f.stat().st_size for f in self._root.rglob("*") if f.is_file()) / 1e6

    def training_record(self) -> dict | None:
        """The folder's training.json (how the model was made: dds's trainers write one), or
        None when it has none or it cannot be read."""
        try:
            record = json.loads((self._root / "training.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def save_autoencoder(self, folder: Path) -> list[Path]:
        """Write the VAE as a diffusers folder (what a translation network ships with)."""
        self.vae.save_pretrained(folder, safe_serialization=True)
        return sorted(p for p in Path(folder).rglob("*") if p.is_file())

    # ---- inside ---------------------------------------------------------------------------
    def _call(self, module, z_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        raise NotImplementedError

    def _to_eps(self, out: Tensor, z_t: Tensor, t: Tensor) -> Tensor:
        return out

    @torch.no_grad()
    def _predict(self, module, call, z_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        dtype = next(module.parameters()).dtype
        c = cond.to(self.device, dtype)
        out = call(module, z_t.to(self.device, dtype), t.to(self.device), c).float()
        return self._to_eps(out, z_t.float().to(self.device), t.to(self.device))
