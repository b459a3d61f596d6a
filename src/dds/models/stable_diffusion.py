"""Stable Diffusion 1.x (eps) and 2.x (v-prediction) over diffusers, from local files only.

The whole family in one file: a second family (SDXL, SD3, FLUX) is another file like this one
that implements `dds.models.base.Model` and is registered in `dds.models.registry`.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor

from dds.errors import DDSError
from dds.models.base import Conditioning, DenoiserCall, EpsFn, NoiseSchedule
from dds.models.trace import unet_call_for
from dds.score import v_to_eps

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# What each component folder must hold: (config file, accepted weight-file stems).
_COMPONENTS = {
    "unet": ("config.json", ("diffusion_pytorch_model",)),
    "vae": ("config.json", ("diffusion_pytorch_model",)),
    "text_encoder": ("config.json", ("model", "pytorch_model")),
    "tokenizer": (None, ()),
    "scheduler": ("scheduler_config.json", ()),
}


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


def check_model_dir(root: Path) -> dict[str, str | None]:
    """Refuse, in one sentence, a folder missing a component; return each weight variant."""
    variants: dict[str, str | None] = {}
    for name, (config, stems) in _COMPONENTS.items():
        sub = root / name
        missing = None
        if not sub.is_dir():
            missing = f"the '{name}' folder"
        elif config and not (sub / config).is_file():
            missing = f"'{name}/{config}'"
        elif name == "tokenizer" and not (
            (sub / "vocab.json").is_file() and (sub / "merges.txt").is_file()
            or (sub / "tokenizer.json").is_file()
        ):
            missing = "the tokenizer files (tokenizer.json, or vocab.json and merges.txt)"
        elif stems:
            ok, variant = _weight_variant(sub, stems)
            if not ok:
                missing = f"the weights in '{name}/' ({stems[0]}.safetensors)"
            variants[name] = variant
        if missing:
            raise DDSError(
                f"model folder '{root}' lacks {missing}; give a complete diffusers Stable "
                "Diffusion folder (as written by `save_pretrained`) or re-download it"
            )
    return variants


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _eager_unet(unet, z_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    return unet(z_t, t, encoder_hidden_states=cond.embeds, return_dict=False)[0]


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


class StableDiffusionModel:
    """`dds.models.base.Model` over a diffusers Stable Diffusion 1.x/2.x folder.

    The UNet and text encoder run in `dtype`; the VAE stays in float32 (SD's VAE overflows in
    fp16 on some images, and it runs only twice per edit).  Noise predictions are returned in
    float32 so the optimisation itself is full precision.  `trace` ("auto": on for the CPU)
    replays the UNet from a per-shape TorchScript trace in `predict_eps` (`dds.models.trace`).
    """

    family = "stable-diffusion"

    def __init__(self, model: str | Path, dtype: str = "auto", device: str | None = None,
                 trace: bool | str = "auto", label: str | None = None):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # loading is quick; the bar only clutters stderr
        self._root = resolve_model_dir(model)
        variants = check_model_dir(self._root)
        self._variants = variants
        self.device = torch.device(device) if device else default_device()
        if dtype == "auto":
            dtype = "fp16" if self.device.type == "cuda" else "fp32"
        if dtype not in DTYPES:
            raise DDSError(f"precision '{dtype}' is not one of fp32, fp16, bf16, auto")
        self.dtype = DTYPES[dtype]
        try:
            sched = DDPMScheduler.from_pretrained(self._root, subfolder="scheduler")
            self.unet = UNet2DConditionModel.from_pretrained(
                self._root, subfolder="unet", variant=variants.get("unet")
            )
            self.vae = AutoencoderKL.from_pretrained(
                self._root, subfolder="vae", variant=variants.get("vae")
            )
            self.text_encoder = CLIPTextModel.from_pretrained(
                self._root, subfolder="text_encoder", variant=variants.get("text_encoder")
            )
            self.tokenizer = CLIPTokenizer.from_pretrained(self._root, subfolder="tokenizer")
        except (OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DDSError(
                f"could not load the model in '{self._root}' ({first}); check that the folder is "
                "a complete diffusers Stable Diffusion model"
            ) from None
        self.prediction_type = sched.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise DDSError(
                f"model predicts '{self.prediction_type}'; only 'epsilon' (SD1.x) and "
                "'v_prediction' (SD2.x) are supported"
            )
        self.schedule = NoiseSchedule(sched.alphas_cumprod.float().to(self.device))  # (T,)
        for module, dtype in ((self.unet, self.dtype), (self.text_encoder, self.dtype),
                              (self.vae, torch.float32)):
            if self.device.type != "cpu" or dtype != torch.float32:
                module.to(self.device, dtype)
            module.eval().requires_grad_(False)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.native_size = int(self.unet.config.sample_size) * self.vae_scale_factor
        self.latent_channels = int(self.unet.config.in_channels)
        self._uncond: Conditioning | None = None
        # The frozen UNet replayed from a per-shape TorchScript trace on the CPU, where Python
        # overhead is a large part of a small model's call (dds.models.trace).
        self._unet_call = unet_call_for(self.device, trace)
        # Editing settings recommended for this model (the built-in model ships measured ones).
        defaults = self._root / "dds_edit_defaults.json"
        self.edit_defaults = json.loads(defaults.read_text()) if defaults.is_file() else {}
        self.label = label or self._root.name or "model"
        self._hash: str | None = None

    # ---- the protocol -------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """(B,3,H,W) in [-1,1] -> (B,4,H/f,W/f): the posterior mean times the scaling factor."""
        x = images.to(self.device, torch.float32)
        return self.vae.encode(x).latent_dist.mean * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """(B,4,h,w) -> (B,3,h*f,w*f) in [-1,1]."""
        z = latents.to(self.device, torch.float32) / self.scaling_factor
        return self.vae.decode(z).sample.clamp(-1, 1)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        """list of B prompts -> (B,77,D) text embeddings.  A prompt longer than the text encoder
        reads is cut (`prompt_length` tells; the pipeline notes it to the user)."""
        max_len = self.tokenizer.model_max_length
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        return Conditioning(self.text_encoder(ids)[0])

    def prompt_length(self, prompt: str) -> tuple[int, int]:
        """(tokens in `prompt` with its start and end tokens, tokens the text encoder reads)."""
        return len(self.tokenizer(prompt).input_ids), int(self.tokenizer.model_max_length)

    def uncond(self) -> Conditioning:
        """The conditioning of the empty prompt "", computed once and cached.  1 row."""
        if self._uncond is None:
            self._uncond = self.encode_prompt([""])
        return self._uncond

    def predict_eps(self, z_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """(B,C,h,w), (B,), conditioning of B rows -> eps (B,C,h,w) float32."""
        return self._predict(self.unet, self._unet_call, z_t, t, cond)

    # ---- named parts for the fast path and the trainers ---------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    def copy_denoiser(self, dtype: torch.dtype | None = None,
                      trainable: bool = False) -> torch.nn.Module:
        """A private copy of the UNet (the model's own stays frozen and unchanged).

        A copy in a wider dtype than the loaded weights (float32 from an fp16 model on a GPU) is
        read from the folder again, so that it starts from the stored weights, not from their
        half-precision rounding."""
        own = next(self.unet.parameters()).dtype
        if dtype is not None and dtype != own and torch.finfo(dtype).bits > torch.finfo(own).bits:
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel.from_pretrained(
                self._root, subfolder="unet", variant=self._variants.get("unet"),
                torch_dtype=dtype).to(self.device)
        else:
            unet = copy.deepcopy(self.unet)
            if dtype is not None and dtype != own:
                unet = unet.to(dtype)
        return unet.train().requires_grad_(True) if trainable else unet.eval().requires_grad_(False)

    def fast_denoiser(self, dtype: torch.dtype | None = None,
                      private: bool = False) -> torch.nn.Module:
        """The UNet for frozen, no-grad calls in `dtype` (None: the model's), with torch's fused
        attention: the model's own module when it already is that (shared: never change it),
        else a frozen private copy (always a copy when `private`)."""
        own = next(self.unet.parameters()).dtype
        dtype = dtype or own
        if not private and dtype == own and not _plain_attention(self.unet):
            return self.unet
        unet = self.copy_denoiser(dtype).eval().requires_grad_(False)
        use_fused_attention(unet)
        return unet

    def attention_kernels(self, module: torch.nn.Module) -> list[str]:
        """The attention processors `module` (the UNet or a copy of it) runs, for reports."""
        return attention_processors(module)

    def eps_fn(self, module: torch.nn.Module, call: DenoiserCall | None = None) -> EpsFn:
        """`predict_eps` through `module` (a copy of the denoiser), called by `call`."""
        call = call or _eager_unet
        return lambda z_t, t, cond: self._predict(module, call, z_t, t, cond)

    def identity(self) -> dict:
        """What made an output: family, name and a hash of the folder's configs and files."""
        if self._hash is None:
            self._hash = folder_hash(self._root)
        return {"family": self.family, "name": self.label, "hash": self._hash,
                "prediction": self.prediction_type}

    def save_autoencoder(self, folder: Path) -> list[Path]:
        """Write the VAE as a diffusers folder (what a translation network ships with)."""
        self.vae.save_pretrained(folder, safe_serialization=True)
        return sorted(p for p in Path(folder).rglob("*") if p.is_file())

    # ---- inside -------------------------------------------------------------------------
    @torch.no_grad()
    def _predict(self, module, call, z_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        dtype = next(module.parameters()).dtype
        c = cond.to(self.device, dtype)
        out = call(module, z_t.to(self.device, dtype), t.to(self.device), c).float()
        if self.prediction_type == "v_prediction":
            out = v_to_eps(out, z_t.float(), t, self.schedule)
        return out
