"""Stable Diffusion (1.x eps, 2.x v-prediction) over diffusers, loaded from local files only."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import Tensor

from dds.errors import DDSError
from dds.score import v_to_eps
from dds.unet_trace import unet_call_for

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


class StableDiffusionBackend:
    """The Backend protocol over a diffusers Stable Diffusion folder.

    The UNet and text encoder run in `dtype`; the VAE stays in float32 (SD's VAE overflows in
    fp16 on some images, and it runs only twice per edit).  Noise predictions are returned in
    float32 so the optimisation itself is full precision.  `trace` ("auto": on for the CPU)
    replays the UNet from a per-shape TorchScript trace in `predict_eps` (`dds.unet_trace`).
    """

    def __init__(self, model: str | Path, dtype: str = "auto", device: str | None = None,
                 trace: bool | str = "auto"):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # loading is quick; the bar only clutters stderr
        self.root = resolve_model_dir(model)
        variants = check_model_dir(self.root)
        self.device = torch.device(device) if device else default_device()
        if dtype == "auto":
            dtype = "fp16" if self.device.type == "cuda" else "fp32"
        if dtype not in DTYPES:
            raise DDSError(f"precision '{dtype}' is not one of fp32, fp16, bf16, auto")
        self.dtype = DTYPES[dtype]
        try:
            sched = DDPMScheduler.from_pretrained(self.root, subfolder="scheduler")
            self.unet = UNet2DConditionModel.from_pretrained(
                self.root, subfolder="unet", variant=variants.get("unet")
            )
            self.vae = AutoencoderKL.from_pretrained(
                self.root, subfolder="vae", variant=variants.get("vae")
            )
            self.text_encoder = CLIPTextModel.from_pretrained(
                self.root, subfolder="text_encoder", variant=variants.get("text_encoder")
            )
            self.tokenizer = CLIPTokenizer.from_pretrained(self.root, subfolder="tokenizer")
        except (OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DDSError(
                f"could not load the model in '{self.root}' ({first}); check that the folder is "
                "a complete diffusers Stable Diffusion model"
            ) from None
        self.prediction_type = sched.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise DDSError(
                f"model predicts '{self.prediction_type}'; only 'epsilon' (SD1.x) and "
                "'v_prediction' (SD2.x) are supported"
            )
        self.alphas_cumprod = sched.alphas_cumprod.float().to(self.device)  # (T,)
        for module, dtype in ((self.unet, self.dtype), (self.text_encoder, self.dtype),
                              (self.vae, torch.float32)):
            if self.device.type != "cpu" or dtype != torch.float32:
                module.to(self.device, dtype)
            module.eval().requires_grad_(False)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.native_size = int(self.unet.config.sample_size) * self.vae_scale_factor
        self._uncond: Tensor | None = None
        # The frozen UNet replayed from a per-shape TorchScript trace on the CPU, where Python
        # overhead is a large part of a small model's call (dds.unet_trace).
        self._unet_call = unet_call_for(self.device, trace)
        # Editing settings recommended for this model (the built-in model ships measured ones).
        defaults = self.root / "dds_edit_defaults.json"
        self.edit_defaults = json.loads(defaults.read_text()) if defaults.is_file() else {}

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
    def encode_prompt(self, prompts: list[str]) -> Tensor:
        """list of B prompts -> (B,77,D) text embeddings; warns when a prompt is truncated."""
        max_len = self.tokenizer.model_max_length
        for p in prompts:
            n = len(self.tokenizer(p).input_ids)
            if n > max_len:
                warnings.warn(
                    f"prompt has {n} tokens, more than the text encoder's {max_len}; "
                    f"the end is ignored: '{p[:60]}...'",
                    stacklevel=2,
                )
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    @torch.no_grad()
    def predict_eps(self, z_t: Tensor, t: Tensor, emb: Tensor) -> Tensor:
        """(B,C,h,w), (B,), (B,L,D) -> eps (B,C,h,w) float32."""
        out = self._unet_call(
            self.unet, z_t.to(self.device, self.dtype), t.to(self.device), emb.to(self.device)
        ).float()
        if self.prediction_type == "v_prediction":
            out = v_to_eps(out, z_t.float(), t, self.alphas_cumprod)
        return out

    # ---- conveniences -------------------------------------------------------------------
    def uncond_embedding(self) -> Tensor:
        """The embedding of the empty prompt "", computed once and cached.  (1,L,D)."""
        if self._uncond is None:
            self._uncond = self.encode_prompt([""])
        return self._uncond


def load_backend(model: str | Path | None = None, dtype: str = "auto", device: str | None = None):
    """A backend for `model`: a diffusers folder, a cached model id, or None for the built-in."""
    if model is None:
        from dds.builtin import builtin_model_dir

        model = builtin_model_dir()
    return StableDiffusionBackend(model, dtype=dtype, device=device)
