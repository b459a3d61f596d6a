"""FLUX.1 (dev and schnell) over diffusers, from local files only.

What differs from the other families, all inside this file:

* text: T5 token embeddings (`text_encoder_2`, 512 tokens) for the transformer's joint
  attention, and CLIP-L's pooled output (`text_encoder`) for its modulation;
* latents stay (B,16,h,w) everywhere in dds; only the transformer's call packs them into 2x2
  patches (a sequence of (h/2)(w/2) tokens of 64 channels), with the positions `img_ids` of
  the patch grid and zero positions `txt_ids` for the text, and unpacks its velocity;
* the schedule depends on the image size: the noise levels are shifted by
  mu = `calculate_shift(image token count)` (`schedule_for`);
* FLUX.1-dev is guidance-distilled: the guidance scale is an input (`Conditioning.guidance`),
  so one call replaces classifier-free guidance's two.  FLUX.1-schnell takes none.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from dds.errors import DDSError
from dds.models.base import Conditioning, FlowSchedule, shift_sigmas
from dds.models.diffusers_base import (
    DENOISER,
    SCHEDULER,
    TEXT_ENCODER,
    TOKENIZER,
    DiffusersModel,
    default_device,
    freeze,
)
from dds.score import flow_v_to_eps

DEFAULT_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale
MAX_SEQUENCE_LENGTH = 512  # T5 tokens FluxPipeline reads by default (and at most)
DEFAULT_LATENT_SIZE = 128  # FluxPipeline.default_sample_size: 1024 px at 8 px per latent

# Scheduler options that change the noise levels in ways dds's FlowSchedule does not model.
_UNSUPPORTED_SCHEDULER = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                          "use_beta_sigmas", "invert_sigmas")


def pack_latents(z: Tensor) -> Tensor:
    """(B,C,h,w) -> (B,(h/2)(w/2),4C): 2x2 patches as tokens, row-major over the patch grid,
    channels ordered (C, row in patch, column in patch) (FluxPipeline._pack_latents)."""
    b, c, h, w = z.shape
    x = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B,h/2,w/2,C,2,2)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: Tensor, h: int, w: int) -> Tensor:
    """(B,(h/2)(w/2),4C) -> (B,C,h,w): the inverse of `pack_latents`."""
    b, _, d = x.shape
    x = x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B,C,h/2,2,w/2,2)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device=None, dtype=torch.float32) -> Tensor:
    """((h/2)(w/2),3) positions of the packed tokens: (0, row, column) of each 2x2 patch of an
    (h, w) latent (FluxPipeline._prepare_latent_image_ids on the patch grid)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def text_ids(length: int, device=None, dtype=torch.float32) -> Tensor:
    """(L,3) zero positions of the text tokens (FluxPipeline.encode_prompt's text_ids)."""
    return torch.zeros(length, 3).to(device=device, dtype=dtype)


# Built once per size, dtype and device: no host-to-device copy in the transformer's call
# (which a CUDA graph could not capture).
_image_ids = lru_cache(maxsize=32)(image_ids)
_text_ids = lru_cache(maxsize=32)(text_ids)


def check_even(shape: Sequence[int]) -> None:
    """Refuse, in one sentence, latents whose height or width is odd (they cannot be packed)."""
    h, w = int(shape[-2]), int(shape[-1])
    if h % 2 or w % 2:
        raise DDSError(
            f"FLUX.1 packs latents in 2x2 patches, so their height and width must be even "
            f"(got {h}x{w}); use an image whose sides are multiples of 16 pixels"
        )


def calculate_shift(image_seq_len: int, config) -> float:
    """mu for `image_seq_len` packed tokens: linear from base_shift at base_image_seq_len to
    max_shift at max_image_seq_len (FluxPipeline's calculate_shift with the scheduler's config)."""
    base_len = config.get("base_image_seq_len", 256)
    max_len = config.get("max_image_seq_len", 4096)
    base_shift = config.get("base_shift", 0.5)
    max_shift = config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


def shifted(s: np.ndarray, mu: float, config) -> Tensor:
    """Noise levels s shifted as the scheduler's `set_timesteps(sigmas=s, mu=mu)` shifts them,
    in its float32 arithmetic: dynamic (exponential or linear in mu) or the static `shift`."""
    s = np.asarray(s).astype(np.float32)
    if not config.get("use_dynamic_shifting", False):
        s = shift_sigmas(s, shift=config.get("shift", 1.0))
    elif config.get("time_shift_type", "exponential") == "linear":
        s = mu / (mu + (1 / s - 1))
    else:
        s = shift_sigmas(s, mu=mu)
    return torch.from_numpy(s)


def flux_schedule(shape: Sequence[int], config, device=None) -> FlowSchedule:
    """The forward process for latents of `shape` (B,C,h,w): the training noise levels
    (i+1)/N, i < N, and the pipeline's n-step sampler `linspace(1, 1/n, n)`, both shifted with
    mu for the (h/2)(w/2) packed tokens."""
    mu = calculate_shift((int(shape[-2]) // 2) * (int(shape[-1]) // 2), config)
    n_train = int(config.get("num_train_timesteps", 1000))
    train = np.linspace(1, n_train, n_train, dtype=np.float32) / n_train  # ascending

    def sampler(n: int) -> Tensor:
        return shifted(np.linspace(1.0, 1 / n, n), mu, config)

    return FlowSchedule(sigmas=shifted(train, mu, config).to(device), sampler=sampler,
                        num_train_timesteps=n_train)


def check_scheduler(config, root) -> None:
    """Refuse a scheduler configured with noise levels dds does not reproduce."""
    used = [k for k in _UNSUPPORTED_SCHEDULER if config.get(k)]
    if used:
        raise DDSError(
            f"the scheduler in '{root}' sets {', '.join(used)}, which dds does not model; "
            "use the FLUX.1 folder's original scheduler/scheduler_config.json"
        )


class FluxModel(DiffusersModel):
    """`dds.models.base.Model` over a diffusers FLUX.1 folder (dev or schnell).

    `schedule` is the schedule at the native size (1024 px); `schedule_for(shape)` gives the
    one for other sizes.  dtype "auto" on a GPU with bfloat16 is bf16, the precision FLUX.1 was
    released in (in float16 its text encoders' activations must be clipped, which changes the
    images).
    """

    family = "flux"
    title = "FLUX.1"
    COMPONENTS = {"transformer": DENOISER, "vae": DENOISER, "text_encoder": TEXT_ENCODER,
                  "text_encoder_2": TEXT_ENCODER, "tokenizer": TOKENIZER,
                  "tokenizer_2": TOKENIZER, "scheduler": SCHEDULER}
    DENOISER_FOLDER = "transformer"

    def __init__(self, model, dtype: str = "auto", device: str | None = None,
                 trace: bool | str = "auto", label: str | None = None):
        dev = torch.device(device) if device else default_device()
        if dtype == "auto" and dev.type == "cuda" and torch.cuda.is_bf16_supported():
            dtype = "bf16"
        super().__init__(model, dtype=dtype, device=device, trace=trace, label=label)

    def _load(self) -> None:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        config = FlowMatchEulerDiscreteScheduler.load_config(self._root, subfolder="scheduler")
        check_scheduler(config, self._root)
        self._scheduler_config = config
        transformer = self._module(FluxTransformer2DModel, "transformer")
        self.vae = self._module(AutoencoderKL, "vae")
        self.text_encoder = freeze(self._module(CLIPTextModel, "text_encoder"),
                                   self.device, self.dtype)
        self.text_encoder_2 = freeze(self._module(T5EncoderModel, "text_encoder_2"),
                                     self.device, self.dtype)
        self.tokenizer = CLIPTokenizer.from_pretrained(self._root, subfolder="tokenizer")
        self.tokenizer_2 = T5TokenizerFast.from_pretrained(self._root, subfolder="tokenizer_2")
        self.denoiser_module = freeze(transformer, self.device, self.dtype)
        self.guidance_embedded = bool(transformer.config.guidance_embeds)
        self.prediction_type = "flow"
        self.latent_channels = int(transformer.config.in_channels) // 4
        vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.native_size = DEFAULT_LATENT_SIZE * vae_scale
        self.size_multiple = 2 * vae_scale  # latents are packed in 2x2 patches
        self._schedules: dict[tuple[int, int], FlowSchedule] = {}
        self.schedule = self.schedule_for((1, self.latent_channels, DEFAULT_LATENT_SIZE,
                                           DEFAULT_LATENT_SIZE))
        self.family_defaults = self._defaults()

    def _defaults(self) -> dict:
        """Editing settings.  DDS/SDS keep lr 0.1 (dds holds the per-element step fixed across
        resolutions).  FLUX.1-dev: guidance 3.5 through its embedding (the pipeline's default),
        FlowEdit as published for it (T=28, n_max=24, source 1.5, target 5.5).  FLUX.1-schnell
        was distilled to sample in a few steps without guidance, so guidance 1 (the prompt's
        prediction alone, no unconditional branch); no FlowEdit settings were published."""
        if self.guidance_embedded:
            return {"guidance": DEFAULT_GUIDANCE, "lr": 0.1,
                    "flowedit": {"steps": 28, "n_max": 24, "source_guidance": 1.5,
                                 "guidance": 5.5}}
        return {"guidance": 1.0, "lr": 0.1,
                "flowedit": {"source_guidance": 1.0, "guidance": 1.0}}

    def schedule_for(self, shape: Sequence[int]) -> FlowSchedule:
        """The FlowSchedule for latents of `shape` (B,C,h,w), shifted for its token count."""
        check_even(shape)
        key = (int(shape[-2]), int(shape[-1]))
        if key not in self._schedules:
            self._schedules[key] = flux_schedule(shape, self._scheduler_config, self.device)
        return self._schedules[key]

    # ---- prompts --------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        """list of B prompts -> embeds (B,512,D) T5 tokens, pooled (B,P) CLIP-L pooled output,
        guidance (B,) the pipeline's default 3.5 (dev; None for schnell).  Longer prompts are
        cut (`prompt_length` tells)."""
        clip_ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt").input_ids.to(self.device)
        pooled = self.text_encoder(clip_ids, output_hidden_states=False).pooler_output
        t5_ids = self.tokenizer_2(
            prompts, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
            return_tensors="pt").input_ids.to(self.device)
        embeds = self.text_encoder_2(t5_ids, output_hidden_states=False)[0]
        guidance = None
        if self.guidance_embedded:
            guidance = torch.full((len(prompts),), DEFAULT_GUIDANCE, device=self.device)
        return Conditioning(embeds, pooled, guidance)

    def prompt_length(self, prompt: str) -> tuple[int, int]:
        """(CLIP tokens in `prompt` with start and end, 77): CLIP-L, which gives the pooled
        embedding, is the tighter limit (T5 reads 512)."""
        return len(self.tokenizer(prompt).input_ids), int(self.tokenizer.model_max_length)

    # ---- the denoiser ---------------------------------------------------------------------
    def _call(self, module, z_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """The transformer's velocity (B,C,h,w) at unpacked latents z_t (B,C,h,w) and dds
        timesteps t = 1000 s (B,): packed tokens, timestep s, the guidance input when the
        transformer embeds one (cond.guidance, else the pipeline's default)."""
        b, _, h, w = z_t.shape
        check_even(z_t.shape)
        guidance = None
        if module.config.guidance_embeds:
            guidance = cond.guidance
            if guidance is None:
                guidance = torch.full((b,), DEFAULT_GUIDANCE, device=z_t.device)
        v = module(
            hidden_states=pack_latents(z_t),
            timestep=t.to(z_t.dtype).expand(b) / 1000,
            guidance=guidance,
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.embeds,
            txt_ids=_text_ids(cond.embeds.shape[1], z_t.device, z_t.dtype),
            img_ids=_image_ids(h, w, z_t.device, z_t.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(v, h, w)

    def _to_eps(self, out: Tensor, z_t: Tensor, t: Tensor) -> Tensor:
        return flow_v_to_eps(out, z_t, t, self.schedule)

    def _predict(self, module, call, z_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        check_even(z_t.shape)  # before a trace is recorded for the shape
        return super()._predict(module, call, z_t, t, cond)
