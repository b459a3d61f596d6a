"""Stable Diffusion 1.x (eps) and 2.x (v-prediction) over diffusers, from local files only.

The family in one file over `dds.models.diffusers_base`: prompt encoding (CLIP's last hidden
state), the UNet's call, and v-prediction's conversion to eps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dds.errors import DDSError
from dds.models.base import FEWER_STEPS, Conditioning, NoiseSchedule
from dds.models.diffusers_base import (  # noqa: F401  (the names callers import from here)
    DTYPES,
    DiffusersModel,
    attention_processors,
    check_model_dir,
    default_device,
    folder_hash,
    freeze,
    resolve_model_dir,
    use_fused_attention,
)
from dds.models.trace import _sd_eager
from dds.score import v_to_eps


class StableDiffusionModel(DiffusersModel):
    """`dds.models.base.Model` over a diffusers Stable Diffusion 1.x/2.x folder.

    `trace` ("auto": on for the CPU) replays the UNet from a per-shape TorchScript trace in
    `predict_eps` (`dds.models.trace`).
    """

    family = "stable-diffusion"
    title = "Stable Diffusion"
    # DDS: the measured quarter-budget schedule (`dds.models.base.FEWER_STEPS`); SDS keeps the
    # reference recipe.
    family_defaults = {"dds": dict(FEWER_STEPS)}

    def _load(self) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        sched = DDPMScheduler.from_pretrained(self._root, subfolder="scheduler")
        self.unet = self._module(UNet2DConditionModel, "unet")
        self.vae = self._module(AutoencoderKL, "vae")
        self.text_encoder = self._module(CLIPTextModel, "text_encoder")
        self.tokenizer = CLIPTokenizer.from_pretrained(self._root, subfolder="tokenizer")
        self.prediction_type = sched.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise DDSError(
                f"model predicts '{self.prediction_type}'; only 'epsilon' (SD1.x) and "
                "'v_prediction' (SD2.x) are supported"
            )
        self.schedule = NoiseSchedule(sched.alphas_cumprod.float().to(self.device))  # (T,)
        self.denoiser_module = freeze(self.unet, self.device, self.dtype)
        self.text_encoder = freeze(self.text_encoder, self.device, self.dtype)
        self.native_size = int(self.unet.config.sample_size) * 2 ** (
            len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = int(self.unet.config.in_channels)

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

    def _call(self, module, z_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return _sd_eager(module, z_t, t, cond)

    def _to_eps(self, out: Tensor, z_t: Tensor, t: Tensor) -> Tensor:
        if self.prediction_type == "v_prediction":
            out = v_to_eps(out, z_t, t, self.schedule)
        return out
