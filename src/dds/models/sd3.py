"""Stable Diffusion 3 / 3.5 over diffusers, from local files only.

The family in one file over `dds.models.diffusers_base`:

* text: CLIP-L and CLIP-G penultimate hidden states side by side (B,77,768+1280), padded to the
  T5 width and followed by T5's tokens along the sequence (B,77+256,4096); pooled: both CLIPs'
  projected embeddings side by side (B,2048).  A folder without `text_encoder_3/` (the T5
  encoder is most of SD3's size) works: its tokens are zeros, as the pipeline makes them.
* forward process: a rectified flow z_t = (1 - s) z + s eps on the scheduler's statically
  shifted noise levels; the transformer is called with t = 1000 s and predicts the velocity
  v = eps - z, which becomes eps = z_t + (1 - s) v.
* autoencoder: 16 channels, latents (mean - shift_factor) * scaling_factor (shared code).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from dds.errors import DDSError
from dds.models.base import Conditioning, FlowSchedule
from dds.models.diffusers_base import (
    DENOISER,
    SCHEDULER,
    TEXT_ENCODER,
    TOKENIZER,
    DiffusersModel,
    freeze,
)
from dds.score import flow_v_to_eps

T5_MAX_LENGTH = 256  # the pipeline's default `max_sequence_length`


def _sampler(scheduler, **kw) -> Callable[[int], Tensor]:
    """n -> the (n,) descending noise levels the pipeline's `retrieve_timesteps(scheduler, n)`
    leaves in the scheduler, asked of a private copy of it.

    Asking rather than re-deriving keeps diffusers' own arithmetic: `set_timesteps` spaces n
    levels between the *shifted* ends of its training table and then shifts them again."""
    def sampler(n: int) -> Tensor:
        sched = copy.deepcopy(scheduler)
        sched.set_timesteps(n, device="cpu", **kw)
        return sched.sigmas[:-1].clone()  # the last entry is the terminal 0

    return sampler


def flow_schedule(scheduler, mu: float | None = None) -> FlowSchedule:
    """The `FlowSchedule` of a `FlowMatchEulerDiscreteScheduler`: its training noise levels,
    ascending, and its n-step sampler.  `mu`: the resolution-dependent shift, for a scheduler
    configured with `use_dynamic_shifting` (its table is then unshifted)."""
    sigmas = scheduler.sigmas.flip(0).float()  # (N,) ascending
    kw = {}
    if scheduler.config.use_dynamic_shifting:
        sigmas = scheduler.time_shift(mu, 1.0, sigmas)
        kw["mu"] = mu
    return FlowSchedule(sigmas, sampler=_sampler(scheduler, **kw),
                        num_train_timesteps=int(scheduler.config.num_train_timesteps))


def _dtype_keyword() -> str:
    """transformers' name for `from_pretrained`'s dtype argument (`torch_dtype` before 4.56)."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


class SD3Model(DiffusersModel):
    """`dds.models.base.Model` over a diffusers Stable Diffusion 3 / 3.5 folder.

    `trace` ("auto": on for the CPU) replays the transformer from a per-shape TorchScript trace
    in `predict_eps` (`dds.models.trace`).
    """

    family = "sd3"
    title = "SD3"
    COMPONENTS = {"transformer": DENOISER, "vae": DENOISER, "text_encoder": TEXT_ENCODER,
                  "text_encoder_2": TEXT_ENCODER, "text_encoder_3": TEXT_ENCODER,
                  "tokenizer": TOKENIZER, "tokenizer_2": TOKENIZER, "tokenizer_3": TOKENIZER,
                  "scheduler": SCHEDULER}
    OPTIONAL = ("text_encoder_3", "tokenizer_3")
    DENOISER_FOLDER = "transformer"
    # DDS/SDS: guidance 7.5 as the reference recipe's on SD (SD3's pipeline samples at 7.0);
    # lr 0.1, as dds keeps the per-element step fixed across latent sizes.  FlowEdit: the
    # official SD3 settings (T=50, n_max=33, n_avg=1, source 3.5, target 13.5, true CFG).
    family_defaults = {"guidance": 7.5, "lr": 0.1,
                       "flowedit": {"steps": 50, "n_max": 33, "n_avg": 1, "guidance": 13.5,
                                    "source_guidance": 3.5}}

    def _load(self) -> None:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        self._has_t5()  # a half-present T5 is refused before anything loads
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
            self._root, subfolder="scheduler")
        self.vae = self._module(AutoencoderKL, "vae")
        transformer = self._module(SD3Transformer2DModel, "transformer")
        self.denoiser_module = freeze(transformer, self.device, self.dtype)
        self.text_encoders = [
            freeze(self._module(CLIPTextModelWithProjection, name), self.device, self.dtype)
            for name in ("text_encoder", "text_encoder_2")]
        self.tokenizers = [CLIPTokenizer.from_pretrained(self._root, subfolder=name)
                           for name in ("tokenizer", "tokenizer_2")]
        self.text_encoder_3, self.tokenizer_3 = self._load_t5()
        self.prediction_type = "flow"
        config = transformer.config
        vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.patch_size = int(config.patch_size)
        self.native_size = int(config.sample_size) * vae_scale
        self.latent_channels = int(config.in_channels)
        # Image sides the transformer takes: whole patches, within its position embeddings.
        self.size_multiple = vae_scale * self.patch_size
        self.max_image_side = (int(config.pos_embed_max_size) * self.patch_size * vae_scale
                               if config.pos_embed_max_size else None)
        native = (1, self.latent_channels, int(config.sample_size), int(config.sample_size))
        self.schedule = flow_schedule(self.scheduler, self._mu(native)).to(self.device)

    def _has_t5(self) -> bool:
        """Whether the folder has the T5 encoder; one sentence if it has only half of it."""
        have = [(self._root / name).is_dir() for name in ("text_encoder_3", "tokenizer_3")]
        if any(have) and not all(have):
            lacks = "tokenizer_3" if have[0] else "text_encoder_3"
            raise DDSError(
                f"model folder '{self._root}' has only half of the T5 text encoder (it lacks "
                f"the '{lacks}' folder); add it, or remove both text_encoder_3/ and tokenizer_3/ "
                "to run without T5")
        return all(have)

    def _load_t5(self):
        """The T5 encoder and its tokenizer, or (None, None) when the folder has neither.

        Loaded in `dtype` by transformers itself, which keeps the layers it knows overflow in
        half precision (T5's `wo`) in float32, as the stock pipeline loads it."""
        from transformers import T5EncoderModel, T5TokenizerFast

        if not self._has_t5():
            return None, None
        kw = {} if self.dtype == torch.float32 else {_dtype_keyword(): self.dtype}
        t5 = self._module(T5EncoderModel, "text_encoder_3", **kw)
        t5 = t5.to(self.device).eval().requires_grad_(False)
        return t5, T5TokenizerFast.from_pretrained(self._root, subfolder="tokenizer_3")

    def schedule_for(self, shape: Sequence[int]) -> FlowSchedule:
        """The flow schedule for latents of `shape` (B,C,h,w): the same for every size (SD3's
        static shift), unless the scheduler asks for the resolution-dependent shift."""
        if not self.scheduler.config.use_dynamic_shifting:
            return self.schedule
        return flow_schedule(self.scheduler, self._mu(shape)).to(self.device)

    def _mu(self, shape: Sequence[int]) -> float | None:
        """The pipeline's resolution-dependent shift for latents of `shape` (its
        `calculate_shift` of the number of image patches, same arithmetic and defaults), or
        None for a statically shifted scheduler."""
        c = self.scheduler.config
        if not c.use_dynamic_shifting:
            return None
        seq_len = (shape[-2] // self.patch_size) * (shape[-1] // self.patch_size)
        base_len, max_len = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
        base_shift, max_shift = c.get("base_shift", 0.5), c.get("max_shift", 1.16)
        m = (max_shift - base_shift) / (max_len - base_len)
        return seq_len * m + (base_shift - m * base_len)

    # ---- prompts --------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        """list of B prompts -> embeds (B,77+256,D_T5) and pooled (B,P_L+P_G), exactly the
        stock pipeline's `encode_prompt` (prompt used for all three encoders, no clip skip)."""
        (hidden_l, pooled_l), (hidden_g, pooled_g) = (self._clip(i, prompts) for i in (0, 1))
        t5 = self._t5(prompts)  # (B,256,D_T5)
        clip = torch.cat([hidden_l, hidden_g], dim=-1)  # (B,77,D_L+D_G)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Conditioning(torch.cat([clip, t5], dim=-2), torch.cat([pooled_l, pooled_g], dim=-1))

    def _clip(self, index: int, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """CLIP encoder `index`'s penultimate hidden states (B,77,D) and projected pooled
        embedding (B,P).  Both tokenizers pad to the first one's length, as the pipeline."""
        ids = self.tokenizers[index](
            prompts, padding="max_length", max_length=self.tokenizers[0].model_max_length,
            truncation=True, return_tensors="pt").input_ids.to(self.device)
        out = self.text_encoders[index](ids, output_hidden_states=True)
        return out.hidden_states[-2].to(self.text_encoders[0].dtype), out.text_embeds

    def _t5(self, prompts: list[str]) -> Tensor:
        """T5's last hidden state (B,256,D_T5); zeros of the transformer's joint width when
        the folder has no T5 encoder."""
        if self.text_encoder_3 is None:
            width = int(self.denoiser_module.config.joint_attention_dim)
            return torch.zeros(len(prompts), T5_MAX_LENGTH, width, device=self.device,
                               dtype=self.text_encoders[0].dtype)
        ids = self.tokenizer_3(
            prompts, padding="max_length", max_length=T5_MAX_LENGTH, truncation=True,
            add_special_tokens=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder_3(ids)[0].to(self.text_encoder_3.dtype)

    def prompt_length(self, prompt: str) -> tuple[int, int]:
        """(CLIP tokens in `prompt` with its start and end tokens, 77).  CLIP's limit is the
        one reported: T5 reads up to 256 tokens, but both CLIP encoders (all of the pooled
        embedding, which steers the whole image) cut a prompt at 77."""
        return len(self.tokenizers[0](prompt).input_ids), int(self.tokenizers[0].model_max_length)

    # ---- the denoiser ---------------------------------------------------------------------
    def _call(self, module, z_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """The transformer's velocity (B,C,h,w) at timestep t = 1000 s (B,)."""
        t = t.reshape(-1).expand(z_t.shape[0])
        return module(hidden_states=z_t, timestep=t, encoder_hidden_states=cond.embeds,
                      pooled_projections=cond.pooled, return_dict=False)[0]

    def _to_eps(self, out: Tensor, z_t: Tensor, t: Tensor) -> Tensor:
        return flow_v_to_eps(out, z_t, t, self.schedule)
