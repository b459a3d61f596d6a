"""Stable Diffusion XL over diffusers, from local files only.

What differs from SD 1.x/2.x (`dds.models.stable_diffusion`):

* two CLIP text encoders (CLIP-L, `CLIPTextModel`; OpenCLIP-bigG, `CLIPTextModelWithProjection`):
  the token embeddings are both encoders' *penultimate* hidden states concatenated along the
  feature dim (B,77,768+1280), and the pooled embedding is the second encoder's projected
  output (`text_embeds`, (B,1280));
* the UNet also takes `added_cond_kwargs`: the pooled embedding and six size ids
  (original h, w, crop top, left, target h, w), built here from the latent's size, so that an
  image is conditioned on being exactly the size it is, uncropped;
* the unconditional branch is all zeros when the pipeline says `force_zeros_for_empty_prompt`
  (SDXL base), not the encoding of "";
* the VAE overflows in fp16 unless its config clears `force_upcast`, so it then runs in fp32.

The forward process is SD's (a VP schedule from the scheduler's betas) and the UNet predicts
eps (v-prediction fine-tunes are converted like SD 2.x).
"""

from __future__ import annotations

import json
from functools import lru_cache

import torch
from torch import Tensor

from dds.errors import DDSError
from dds.models.base import FEWER_STEPS, Conditioning, NoiseSchedule
from dds.models.diffusers_base import (
    DENOISER,
    SCHEDULER,
    TEXT_ENCODER,
    TOKENIZER,
    DiffusersModel,
    freeze,
)
from dds.score import v_to_eps

SDXL_COMPONENTS = {"unet": DENOISER, "vae": DENOISER, "text_encoder": TEXT_ENCODER,
                   "text_encoder_2": TEXT_ENCODER, "tokenizer": TOKENIZER,
                   "tokenizer_2": TOKENIZER, "scheduler": SCHEDULER}


def add_time_ids(height: int, width: int, dtype: torch.dtype = torch.float32,
                 device=None) -> Tensor:
    """SDXL's size conditioning for an uncropped `height` x `width` image: (1, 6)
    (original h, w, crop top, crop left, target h, w), as the pipeline's `_get_add_time_ids`
    builds it with original = target = the image size and crop (0, 0)."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device)


# Built once per size, dtype and device: no host-to-device copy in the denoiser's call (which a
# CUDA graph could not capture).
_time_ids = lru_cache(maxsize=32)(add_time_ids)


def pipeline_settings(root) -> dict:
    """The pipeline's own settings in a folder's model_index.json (empty when unreadable)."""
    try:
        index = json.loads((root / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


class SDXLModel(DiffusersModel):
    """`dds.models.base.Model` over a diffusers SDXL folder (`StableDiffusionXLPipeline`).

    Conditioning: embeds (B,77,D1+D2) penultimate CLIP states, pooled (B,P) text_encoder_2's
    projection.  The size ids are not part of it: they follow the latent's size in `_call`,
    identical for every branch, as in the pipeline.
    """

    family = "sdxl"
    title = "SDXL"
    COMPONENTS = SDXL_COMPONENTS
    # DDS/SDS guidance 7.5, the reference recipe's scale: SDXL samples at 5.0 by default, but
    # DDS guides both branches and subtracts them, and no SDXL-specific tuning says otherwise.
    # lr stays 0.1: dds keeps the per-element step fixed across resolutions
    # (EditConfig.reference_area), so a 128x128 SDXL latent moves per step as a 64x64 SD one.
    # DDS: the Stable Diffusion families' quarter-budget schedule (`FEWER_STEPS`).
    family_defaults = {"guidance": 7.5, "lr": 0.1, "dds": dict(FEWER_STEPS)}

    def _load(self) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        self._check_configs()
        sched = DDPMScheduler.from_pretrained(self._root, subfolder="scheduler")
        self.prediction_type = sched.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise DDSError(f"SDXL model in '{self._root}' predicts '{self.prediction_type}'; "
                           "only 'epsilon' and 'v_prediction' are supported")
        unet = self._module(UNet2DConditionModel, "unet")
        self.vae = self._module(AutoencoderKL, "vae")
        self.text_encoder = self._module(CLIPTextModel, "text_encoder")
        self.text_encoder_2 = self._module(CLIPTextModelWithProjection, "text_encoder_2")
        self.tokenizer = CLIPTokenizer.from_pretrained(self._root, subfolder="tokenizer")
        self.tokenizer_2 = CLIPTokenizer.from_pretrained(self._root, subfolder="tokenizer_2")
        self.force_zeros = bool(
            pipeline_settings(self._root).get("force_zeros_for_empty_prompt", True))
        self.schedule = NoiseSchedule(sched.alphas_cumprod.float().to(self.device))  # (T,)
        self.denoiser_module = freeze(unet, self.device, self.dtype)
        self.text_encoder = freeze(self.text_encoder, self.device, self.dtype)
        self.text_encoder_2 = freeze(self.text_encoder_2, self.device, self.dtype)
        if not getattr(self.vae.config, "force_upcast", True):
            self.vae_dtype = self.dtype
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.native_size = int(unet.config.sample_size) * factor
        self.latent_channels = int(unet.config.in_channels)

    def _check_configs(self) -> None:
        """Refuse, in one sentence and before reading any weights, a folder whose UNet does not
        take SDXL base's added conditioning (six size ids and the pooled projection: not the
        refiner's aesthetic score) or whose VAE normalises latents by a mean and std."""
        unet = json.loads((self._root / "unet" / "config.json").read_text())
        text_2 = json.loads((self._root / "text_encoder_2" / "config.json").read_text())
        vae = json.loads((self._root / "vae" / "config.json").read_text())
        proj = int(text_2.get("projection_dim", 512))  # CLIPTextConfig's default
        want = 6 * (unet.get("addition_time_embed_dim") or 0) + proj
        if (unet.get("addition_embed_type") != "text_time"
                or unet.get("projection_class_embeddings_input_dim") != want):
            raise DDSError(
                f"the UNet in '{self._root}' does not take SDXL's size and pooled-text "
                "conditioning (six size ids and text_encoder_2's projection); dds edits with "
                "SDXL base models, not the refiner")
        if vae.get("latents_mean") is not None:
            raise DDSError(f"the autoencoder in '{self._root}' normalises latents by a mean and "
                           "std (latents_mean), which dds does not support; give an SDXL folder "
                           "with a plain scaled VAE")

    # ---- prompts --------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        """list of B prompts -> embeds (B,77,D1+D2), pooled (B,P), as the pipeline's
        `encode_prompt` (no clip skip).  A prompt longer than 77 tokens is cut."""
        states = []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder),
                                   (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])  # (B,77,D_i), the penultimate layer
        pooled = out.text_embeds  # (B,P): text_encoder_2's projected output
        dtype = self.text_encoder_2.dtype
        return Conditioning(torch.cat(states, dim=-1).to(dtype), pooled.to(dtype))

    def prompt_length(self, prompt: str) -> tuple[int, int]:
        """(tokens in `prompt` with its start and end tokens, tokens read).  Both encoders use
        the same CLIP BPE and read 77 tokens; the first tokenizer counts for both."""
        return len(self.tokenizer(prompt).input_ids), int(self.tokenizer.model_max_length)

    def _uncond_cond(self) -> Conditioning:
        """Zeros (SDXL base: `force_zeros_for_empty_prompt`), else the encoding of "", as the
        pipeline's negative branch without a negative prompt."""
        if not self.force_zeros:
            return self.encode_prompt([""])
        length = int(self.tokenizer.model_max_length)
        width = int(self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size)
        proj = int(self.text_encoder_2.config.projection_dim)
        dtype = self.text_encoder_2.dtype
        return Conditioning(torch.zeros(1, length, width, dtype=dtype, device=self.device),
                            torch.zeros(1, proj, dtype=dtype, device=self.device))

    # ---- the denoiser ---------------------------------------------------------------------
    def _call(self, module, z_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """The UNet on z_t (B,C,h,w) with the pooled text and the size ids of a
        (h*f) x (w*f) image, the same for every row."""
        b, _, h, w = z_t.shape
        f = self.vae_scale_factor
        ids = _time_ids(h * f, w * f, z_t.dtype, z_t.device).expand(b, 6)
        added = {"text_embeds": cond.pooled, "time_ids": ids}
        return module(z_t, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=added,
                      return_dict=False)[0]

    def _to_eps(self, out: Tensor, z_t: Tensor, t: Tensor) -> Tensor:
        if self.prediction_type == "v_prediction":
            out = v_to_eps(out, z_t, t, self.schedule)
        return out
