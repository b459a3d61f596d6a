"""Sizes and training hyper-parameters of the built-in text-to-image latent diffusion model.

Everything is a frozen dataclass so that a run is fully described by one ``TrainConfig`` (it is
written next to the checkpoints and into the exported folder). ``default()`` is the shipped model,
``tiny()`` a few-thousand-parameter variant for tests.

The modules are the stock diffusers / transformers classes that Stable Diffusion 1.x uses
(``AutoencoderKL``, ``UNet2DConditionModel``, ``CLIPTextModel``), only much smaller, so that the
exported folder is a standard ``StableDiffusionPipeline`` folder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

# Stable Diffusion 1.x noise schedule.
SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}

CLIP_VOCAB_SIZE = 49408
CLIP_BOS = 49406
CLIP_EOS = 49407


@dataclass(frozen=True)
class VAEConfig:
    block_out_channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 8
    sample_size: int = 64
    mid_block_add_attention: bool = True


@dataclass(frozen=True)
class UNetConfig:
    # Cross-attention at 8x8 and 4x4 (and the 4x4 mid block): attention at 16x16 doubled the
    # CPU step time for no visible gain on this world.
    block_out_channels: tuple[int, ...] = (32, 64, 96)
    down_block_types: tuple[str, ...] = (
        "DownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
    )
    up_block_types: tuple[str, ...] = (
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "UpBlock2D",
    )
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 16
    sample_size: int = 16
    in_channels: int = 4
    out_channels: int = 4
    transformer_layers_per_block: int = 1


@dataclass(frozen=True)
class TextConfig:
    hidden_size: int = 64
    intermediate_size: int = 256
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    max_position_embeddings: int = 77
    vocab_size: int = CLIP_VOCAB_SIZE


@dataclass(frozen=True)
class TrainConfig:
    name: str = "default"
    seed: int = 0
    # How the exported weights are stored: "fp32", or "fp16" (half the size; every loader
    # still builds float32 modules from them, as the configs say float32).
    storage: str = "fp32"
    threads: int = 2
    image_size: int = 64
    # Stage 1: VAE.
    vae_steps: int = 2000
    vae_batch_size: int = 16
    vae_lr: float = 1e-3
    vae_warmup: int = 100
    vae_kl_weight: float = 1e-6
    # Weight of object pixels in the autoencoder's loss: a pixel weighs 1 + this * (objects'
    # coverage of it). Objects fill about a tenth of a scene, and under the plain mean the
    # decoder rounds small stars and crosses into blobs (0: the plain mean, as the first two
    # releases were trained; 5 raised the shapes the judge reads on reconstructions from 70% to
    # 78%, docs/builtin-model.md).
    vae_object_loss_weight: float = 5.0
    # Stage 0: the text encoder first learns to name every attribute of a caption
    # (linear heads on its token states; 0 steps: no stage 0, the encoder starts random and
    # learns with the UNet, where it all but dropped the shape words).
    text_pretrain_steps: int = 400
    text_pretrain_batch: int = 128
    text_pretrain_lr: float = 1e-3
    # Stage 2: UNet + text encoder (text_lr 0: the text encoder stays frozen, as in SD).
    unet_steps: int = 3000
    batch_size: int = 48
    # Steps that each rendered batch of scenes serves (each with its own noise, timesteps and
    # caption drops), as epochs over a dataset do: on a GPU the scene renderer, not the UNet,
    # caps the scenes a second, and reuse trades fresh scenes for more steps (1: every step
    # renders its own scenes, as every release so far was trained).
    batch_reuse: int = 1
    unet_lr: float = 1.5e-3
    text_lr: float = 0.0
    unet_warmup: int = 200
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_start: int = 200
    cfg_drop: float = 0.1
    # Offset noise: a per-image, per-channel constant of this std added to the training noise.
    # On a 16x16 latent the image's mean colour survives even the last timestep of the SD
    # schedule (sqrt(alpha_bar_T) * mean is as large as the mean of 256 unit noise values), so
    # without it the model reads the background colour from the initial noise, not the prompt.
    offset_noise: float = 0.25
    # Weight of the latent cells that objects cover in the UNet's loss: a cell weighs
    # 1 + object_loss_weight * (objects' coverage of it).  Objects fill about a tenth of a scene,
    # and a shape differs from another in a few of their cells, so under the plain mean the
    # shape words carry little of the loss (0: the plain mean, as the shipped model was trained).
    object_loss_weight: float = 0.0
    # Each sample's loss weighted by its timestep's signal-to-noise ratio SNR = abar / (1 - abar)
    # (`TIMESTEP_WEIGHTINGS`): "none", the plain epsilon objective every release was trained
    # with; "min-snr", min(SNR, snr_gamma) / SNR (Hang et al. 2023), which stops the low-noise
    # steps, whose epsilon errors are cheap to lower, from dominating the loss; "p2",
    # 1 / (1 + SNR) (Choi et al. 2022, k = 1, gamma = 1), which favours the mid-to-high noise
    # levels where coarse content, such as which shape an object has, is decided.  In the
    # epsilon objective an error in the clean image weighs SNR times its square, so at t = 700
    # (SNR about 0.1) a misdrawn shape costs a tenth of what it would cost at SNR 1.
    timestep_weighting: str = "none"
    snr_gamma: float = 5.0
    # Logging / checkpoints.
    ckpt_every: int = 200
    sample_every: int = 200
    sample_steps: int = 20
    log_every: int = 10
    eval_images: int = 256
    scale_images: int = 512
    # Every judge_every UNet steps (and at the end), the EMA model draws judge_prompts held-out
    # single-object prompts (DDIM, judge_steps steps, guidance 7.5) and the judge reads them
    # back: RUN/eval.csv is the learning curve of prompt agreement (0 turns it off).
    judge_every: int = 500
    judge_prompts: int = 64
    judge_steps: int = 20
    sample_captions: tuple[str, ...] = (
        "a red circle on a blue striped background",
        "a yellow star on a green checkered background",
        "a white square on a black dotted background",
        "a purple triangle on a yellow background",
        "a blue cross on a gray speckled background",
        "an orange star and a green circle on a white background",
    )
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> TrainConfig:
        d = dict(d)
        vae = VAEConfig(**_tuples(d.pop("vae")))
        unet = UNetConfig(**_tuples(d.pop("unet")))
        text = TextConfig(**_tuples(d.pop("text")))
        return TrainConfig(**_tuples(d), vae=vae, unet=unet, text=text)


TIMESTEP_WEIGHTINGS = ("none", "min-snr", "p2")


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def default() -> TrainConfig:
    """The third release's recipe, `dds train-builtin`'s default (about 86 minutes on 2 CPU
    cores: stage 0 3, autoencoder 25, UNet 58 with its judge readings); the shipped model is
    the fourth release (`fourth`)."""
    return TrainConfig()


def third() -> TrainConfig:
    """The third release's recipe (today's defaults; shipped before the fourth)."""
    return default()


# The fourth release's UNet: the third's with one more down/up block, so that on a 32x32 latent
# its cross-attention still sits at 8x8 and 4x4 (attention at 16x16 doubled the step's cost).
UNET4 = UNetConfig(
    block_out_channels=(32, 64, 96, 128),
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D",
                      "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    sample_size=32,
)


def with_attention_grids(u: UNetConfig, grids) -> UNetConfig:
    """``u`` with cross-attention at exactly the levels that run on these grid sides (level i
    runs on the latent's side >> i), in the down and the up path alike, as Stable Diffusion
    places it (its finest three levels); the mid block always has it. ``UNET4`` is (8, 4);
    (16, 8, 4) adds the 16x16 level, where the fourth release loses the shape word
    (docs/builtin-model-4.md, proxy (m))."""
    n = len(u.block_out_channels)
    sides = [u.sample_size >> i for i in range(n)]
    bad = sorted(set(grids) - set(sides))
    if bad:
        raise ValueError(f"no UNet level runs on a {bad[0]}x{bad[0]} grid; its levels run on "
                         f"{', '.join(map(str, sides))}")
    down = tuple("CrossAttnDownBlock2D" if sides[i] in grids else "DownBlock2D" for i in range(n))
    up = tuple("CrossAttnUpBlock2D" if sides[n - 1 - j] in grids else "UpBlock2D"
               for j in range(n))
    return replace(u, down_block_types=down, up_block_types=up)


def fourth() -> TrainConfig:
    """The fourth release's recipe, the shipped model's (docs/builtin-model-4.md): a 32x32x4
    latent, so that the decoder can show small stars and crosses (500 autoencoder steps read
    77% of the shapes on held-out reconstructions where the 16x16x4 autoencoder read 37%), and
    the UNet ``UNET4``.
    About 4.5 to 5.5 hours on 2 free CPU cores (autoencoder 1, UNet 3.2 to 4); checkpoints
    every 100 steps, so an interruption loses a few minutes at most."""
    return TrainConfig(
        name="fourth",
        vae_steps=4000,
        unet_steps=4000,
        ckpt_every=100,
        vae=VAEConfig(block_out_channels=(32, 64)),
        unet=UNET4,
        storage="fp16",  # 37.5 MB in fp32, over the folder's 30 MB budget
    )


def fourth_gpu() -> TrainConfig:
    """The fourth release's networks trained on a GPU: the same text encoder stage, autoencoder
    and UNet architecture as ``fourth``, with the UNet seeing many more scenes (batch 256, a
    larger learning rate and a longer warm-up; ``--unet-steps`` sets the length).  Meant for
    ``--device cuda``; on 2 CPU cores a step would take about 16 s (the fourth's 3 s per 48
    scenes, scaled; not measured)."""
    return replace(
        fourth(),
        name="fourth-gpu",
        unet_steps=6000,
        batch_size=256,
        unet_lr=2e-3,
        unet_warmup=500,
        ckpt_every=500,
        sample_every=1000,
        judge_every=2000,
    )


# Recipes by name, for `dds train-builtin --preset NAME`.
PRESETS = {"third": third, "fourth": fourth, "fourth-gpu": fourth_gpu}


def tiny() -> TrainConfig:
    """A few-thousand-parameter variant (per network, bar the token table) for tests."""
    return TrainConfig(
        name="tiny",
        vae_steps=4,
        vae_batch_size=2,
        vae_warmup=1,
        text_pretrain_steps=2,
        text_pretrain_batch=4,
        unet_steps=4,
        batch_size=2,
        unet_warmup=1,
        ema_start=1,
        ckpt_every=2,
        sample_every=2,
        sample_steps=2,
        log_every=1,
        eval_images=4,
        scale_images=8,
        judge_every=2,
        judge_prompts=2,
        judge_steps=2,
        sample_captions=("a red circle on a blue striped background",),
        vae=VAEConfig(block_out_channels=(8, 8, 8), norm_num_groups=4),
        unet=UNetConfig(
            block_out_channels=(8, 16, 16),
            attention_head_dim=4,
            norm_num_groups=4,
        ),
        text=TextConfig(
            hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2
        ),
    )


def with_overrides(cfg: TrainConfig, **kw) -> TrainConfig:
    """``dataclasses.replace`` that ignores ``None`` values (for command-line overrides)."""
    return replace(cfg, **{k: v for k, v in kw.items() if v is not None})


def build_vae(c: VAEConfig):
    from diffusers import AutoencoderKL

    n = len(c.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(c.block_out_channels),
        layers_per_block=c.layers_per_block,
        act_fn="silu",
        latent_channels=c.latent_channels,
        norm_num_groups=c.norm_num_groups,
        sample_size=c.sample_size,
        scaling_factor=1.0,
        mid_block_add_attention=c.mid_block_add_attention,
    )


def build_unet(c: UNetConfig, cross_attention_dim: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=c.sample_size,
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        down_block_types=tuple(c.down_block_types),
        up_block_types=tuple(c.up_block_types),
        block_out_channels=tuple(c.block_out_channels),
        layers_per_block=c.layers_per_block,
        attention_head_dim=c.attention_head_dim,
        norm_num_groups=c.norm_num_groups,
        cross_attention_dim=cross_attention_dim,
        transformer_layers_per_block=c.transformer_layers_per_block,
    )


def text_config(c: TextConfig):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        max_position_embeddings=c.max_position_embeddings,
        hidden_act="quick_gelu",
        bos_token_id=CLIP_BOS,
        eos_token_id=CLIP_EOS,
        pad_token_id=CLIP_EOS,
    )


def build_text_encoder(c: TextConfig):
    from transformers import CLIPTextModel

    return CLIPTextModel(text_config(c))


def build_models(cfg: TrainConfig):
    """Fresh (vae, unet, text_encoder) for ``cfg``; seed torch first for reproducibility."""
    vae = build_vae(cfg.vae)
    text_encoder = build_text_encoder(cfg.text)
    unet = build_unet(cfg.unet, cross_attention_dim=cfg.text.hidden_size)
    return vae, unet, text_encoder


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())
