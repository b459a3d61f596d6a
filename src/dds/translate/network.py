"""The one-pass translation network g_theta(zhat | k) of the paper's Section 4.

g starts as a copy of the base model's diffusion UNet (a diffusers `UNet2DConditionModel`), with
its three inputs repurposed:

| UNet input            | diffusion model          | translation network                              |
| --------------------- | ------------------------ | ------------------------------------------------ |
| `sample`              | noisy latent z_t         | the clean source latent zhat                     |
| `encoder_hidden_states` | text embedding of y    | learned task tokens K_k (M,77,D), initialised    |
|                       |                          | from the text encoding of the task's phrase      |
| `timestep`            | t -> sin/cos -> MLP      | the task id k -> a learned vector T_k (M,D_time),|
|                       |                          | initialised from the UNet's embedding of t = 500 |

How the timestep is replaced.  The UNet computes `emb = time_embedding(time_proj(timestep))`.
We swap `time_proj` for `TaskIds` (passes the task ids through) and `time_embedding` for
`TaskTimeEmbedding` (a table lookup), so `unet(zhat, k, K[k])` runs the stock forward with
T_k where the time embedding was: stateless, no hook, no copied forward code, and it only
relies on the two attribute names diffusers has used since its first UNet.

Output: a residual, z = zhat + s * unet(zhat, k, K_k), with a learned per-channel gain s that
starts at 0.  Why: the network is then exactly the identity at initialisation, so the first
DDS gradients are the clean zero-shot edit direction at z = zhat (where DDS is unbiased), the
identity loss only has to hold g near where it already is instead of teaching a copy from
scratch, and every pretrained weight (conv_out included) is kept.  A direct prediction
(`residual=False`: z = unet(...)) starts from the UNet's noise prediction, far from zhat.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from dds.errors import DDSError
from dds.training.toolkit import latest_good

T_INIT = 500  # the paper's "t = 0.5" on a 1000-step schedule


class TaskIds(nn.Module):
    """Stands in for `unet.time_proj`: hands the task ids (B,) through unchanged."""

    def forward(self, ids: Tensor) -> Tensor:
        return ids


class TaskTimeEmbedding(nn.Module):
    """Stands in for `unet.time_embedding`: task id (B,) -> learned T_k (B, D_time)."""

    def __init__(self, table: Tensor):
        super().__init__()
        self.table = nn.Parameter(table.clone())  # (M, D_time)

    def forward(self, ids: Tensor, condition: Tensor | None = None) -> Tensor:
        # The UNet casts the ids to the sample's dtype; ids < 256 are exact in fp16 and bf16.
        return self.table[ids.round().long()]


@dataclass
class NetConfig:
    """What is needed to rebuild g without the training code (stored as translation.json)."""

    unet: dict  # the diffusers UNet config
    tasks: list[dict]  # Task.to_dict() of each task, in embedding order
    base_model: str  # the base model's folder ("builtin" for the built-in model)
    resolution: int  # training image side in pixels
    residual: bool = True
    train: dict = field(default_factory=dict)  # the training config, for the record
    base_identity: dict = field(default_factory=dict)  # the base model's identity(), for the record

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str)


def time_embedding_at(unet, t: int = T_INIT) -> Tensor:
    """The stock UNet's time embedding of timestep t: (1, D_time)."""
    with torch.no_grad():
        ts = torch.tensor([t], device=unet.device)
        return unet.time_embedding(unet.time_proj(ts).to(unet.dtype)).float()


class TranslationNet(nn.Module):
    """g_theta(zhat | k): (B,C,h,w) source latents, (B,) task ids -> (B,C,h,w) edited latents."""

    def __init__(self, unet, task_tokens: Tensor, task_time: Tensor, residual: bool = True):
        super().__init__()
        m = task_tokens.shape[0]
        if task_time.shape[0] != m:
            raise ValueError(f"{m} task token sequences but {task_time.shape[0]} time embeddings")
        unet.time_proj = TaskIds()
        unet.time_embedding = TaskTimeEmbedding(task_time)
        self.unet = unet.train().requires_grad_(True)
        self.task_tokens = nn.Parameter(task_tokens.clone())  # (M, L, D)
        self.residual = residual
        self.out_gain = nn.Parameter(torch.zeros(unet.config.out_channels))  # (C,), s
        self.n_tasks = m

    @classmethod
    def from_unet(cls, unet, phrase_embeddings: Tensor, residual: bool = True) -> TranslationNet:
        """Start from a stock UNet; phrase_embeddings (M,L,D): text encodings of the phrases."""
        t_emb = time_embedding_at(unet).expand(phrase_embeddings.shape[0], -1)  # (M, D_time)
        return cls(unet, phrase_embeddings.float(), t_emb, residual)

    def forward(self, z_hat: Tensor, task: Tensor) -> Tensor:
        """z_hat: (B,C,h,w), task: (B,) long -> z (B,C,h,w)."""
        out = self.unet(z_hat, task, encoder_hidden_states=self.task_tokens[task]).sample
        if not self.residual:
            return out
        return z_hat + self.out_gain.view(1, -1, 1, 1) * out

    # ---- files --------------------------------------------------------------------------
    def unet_state(self) -> dict[str, Tensor]:
        """The UNet's weights without the task-time table (stock UNet keys minus time_embedding)."""
        return {k: v for k, v in self.unet.state_dict().items()
                if not k.startswith("time_embedding.")}

    def task_state(self) -> dict[str, Tensor]:
        return {"tokens": self.task_tokens.detach(),  # (M, L, D)
                "time": self.unet.time_embedding.table.detach(),  # (M, D_time)
                "out_gain": self.out_gain.detach()}  # (C,)

    def save(self, folder: Path, cfg: NetConfig) -> list[str]:
        """Write unet.safetensors, tasks.safetensors and translation.json; returns the names."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"dds_translation": cfg.to_json()}
        save_file({k: v.contiguous().cpu() for k, v in self.unet_state().items()},
                  folder / "unet.safetensors", metadata=meta)
        save_file({k: v.contiguous().cpu() for k, v in self.task_state().items()},
                  folder / "tasks.safetensors", metadata=meta)
        (folder / "translation.json").write_text(cfg.to_json(), encoding="utf-8")
        return ["unet.safetensors", "tasks.safetensors", "translation.json"]

    def load_weights(self, folder: Path) -> None:
        """Load weights written by `save` into this (same-shaped) network, exactly."""
        from safetensors.torch import load_file

        unet = load_file(Path(folder) / "unet.safetensors")
        tasks = load_file(Path(folder) / "tasks.safetensors")
        unet["time_embedding.table"] = tasks["time"]
        self.unet.load_state_dict(unet, strict=True)
        with torch.no_grad():
            self.task_tokens.copy_(tasks["tokens"])
            self.out_gain.copy_(tasks["out_gain"])


def read_config(folder: Path) -> NetConfig:
    path = Path(folder) / "translation.json"
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        return NetConfig(**d)
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise DDSError(
            f"'{folder}' is not a translation checkpoint ({path.name} is missing or unreadable: "
            f"{type(e).__name__}); give a folder written by `dds translate-train`"
        ) from None


def load_net(folder: Path, device: str | torch.device = "cpu") -> tuple[TranslationNet, NetConfig]:
    """Rebuild g from a checkpoint folder alone (no base model needed for the network)."""
    from diffusers import UNet2DConditionModel

    cfg = read_config(folder)
    unet = UNet2DConditionModel.from_config(cfg.unet)
    m = len(cfg.tasks)
    d_time = unet.time_embedding.linear_2.out_features
    tokens_shape = None
    try:
        from safetensors import safe_open

        with safe_open(str(Path(folder) / "tasks.safetensors"), "pt") as f:
            tokens_shape = f.get_slice("tokens").get_shape()
        net = TranslationNet(unet, torch.zeros(tokens_shape), torch.zeros(m, d_time), cfg.residual)
        net.load_weights(folder)
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise DDSError(
            f"the weights in checkpoint '{folder}' cannot be loaded ({first}); the checkpoint is "
            "damaged or from another network: use another checkpoint"
        ) from None
    return net.to(device).eval().requires_grad_(False), cfg


# --------------------------------------------------------------------------------------------
# Inference: one forward pass per image
# --------------------------------------------------------------------------------------------


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder, or a run folder (its model/, else its newest intact checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise DDSError(f"checkpoint '{p}' does not exist; give a folder written by "
                       "`dds translate-train` (the run folder or its model/ folder)")
    if (p / "translation.json").is_file():
        return p
    if (p / "model" / "translation.json").is_file():
        return p / "model"
    if (p / "checkpoints").is_dir():
        good = latest_good(p, warn=lambda m: print(f"dds: warning: {m}", file=sys.stderr))
        if good is not None:
            return good
    raise DDSError(f"'{p}' holds no translation network (no translation.json); give a folder "
                   "written by `dds translate-train`")


def _check_sizes(folder: Path) -> None:
    """A quick completeness check against manifest.json (sizes only; training verifies hashes)."""
    man = folder / "manifest.json"
    if not man.is_file():
        return
    try:
        entries = json.loads(man.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DDSError(f"checkpoint '{folder}' has an unreadable manifest.json; it is damaged, "
                       "use another checkpoint") from None
    for name, e in entries.items():
        f = folder / name
        if not f.is_file() or f.stat().st_size != e["bytes"]:
            raise DDSError(f"checkpoint '{folder}' is incomplete ({name} is missing or truncated); "
                           "use another checkpoint")


class Translator:
    """A loaded translation network with its VAE: images in, edited images out."""

    def __init__(self, checkpoint, base_model=None, device: str | None = None):
        from dds.models.registry import load_autoencoder

        folder = resolve_checkpoint(checkpoint)
        _check_sizes(folder)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net, self.cfg = load_net(folder, self.device)
        self.folder = folder
        if (folder / "vae" / "config.json").is_file():  # the copy the trainer exported
            self.vae = load_autoencoder(folder, self.device)
        else:  # an older checkpoint: the base model's own
            base = base_model or self.cfg.base_model
            try:
                self.vae = load_autoencoder(None if base == "builtin" else base, self.device)
            except DDSError as e:
                raise DDSError(f"{e} (for this network, pass the base model folder it was "
                               "trained from with --base-model)") from None
        self.scaling = float(self.vae.config.scaling_factor)
        vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        n_down = len(self.cfg.unet["block_out_channels"]) - 1
        self.multiple = vae_factor * 2**n_down  # image sides the UNet maps back to themselves
        self.tasks = [t["name"] for t in self.cfg.tasks]

    def task_id(self, task) -> int:
        if isinstance(task, int) and 0 <= task < len(self.tasks):
            return task
        if task in self.tasks:
            return self.tasks.index(task)
        raise DDSError(f"task {task!r} is not one this network learned; choose one of "
                       + ", ".join(self.tasks))

    @torch.no_grad()
    def edit_tensor(self, x: Tensor, task) -> Tensor:
        """(B,3,H,W) in [0,1] -> (B,3,H,W) in [0,1], one forward pass of g per image."""
        k = self.task_id(task)
        x = x.to(self.device, torch.float32) * 2 - 1
        z_hat = self.vae.encode(x).latent_dist.mean * self.scaling  # (B,C,h,w)
        ids = torch.full((x.shape[0],), k, dtype=torch.long, device=self.device)
        z = self.net(z_hat, ids).float()
        out = self.vae.decode(z / self.scaling).sample
        return ((out.clamp(-1, 1) + 1) / 2).cpu()

    def __call__(self, images, task, batch_size: int = 8) -> list:
        """Paths, PIL images or arrays -> edited PIL images (working size: the training one)."""
        from dds.images import pil_to_tensor, prepare, tensor_to_pil
        from dds.pipeline import as_image

        self.task_id(task)
        if isinstance(images, (str, Path)) or not isinstance(images, (list, tuple)):
            images = [images]
        ims = [prepare(as_image(im), self.cfg.resolution, multiple=self.multiple) for im in images]
        out: list = [None] * len(ims)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(ims):
            by_size.setdefault(im.size, []).append(i)
        for idx in by_size.values():
            for s in range(0, len(idx), batch_size):
                chunk = idx[s:s + batch_size]
                x = torch.cat([(pil_to_tensor(ims[i]) + 1) / 2 for i in chunk])
                y = self.edit_tensor(x, task) * 2 - 1
                for j, i in enumerate(chunk):
                    out[i] = tensor_to_pil(y[j])
        return out


def translate(checkpoint, images, task, base_model=None, batch_size: int = 8,
              device: str | None = None) -> list:
    """Edit `images` (paths, PIL images, arrays, or one of them) with the network's `task`.

    `checkpoint`: a `Translator`, a run folder, or a checkpoint folder.  Returns PIL images.
    """
    tr = checkpoint if isinstance(checkpoint, Translator) else Translator(
        checkpoint, base_model=base_model, device=device)
    return tr(images, task, batch_size=batch_size)
