"""CLIP score (Hessel et al. 2021, as the paper's Figure 9 uses it): 100 x max(cos(E_I, E_T), 0).

The CLIP model is injected (a `transformers.CLIPModel` and its tokenizer or processor), loaded
from a local folder: no weights can be downloaded here.  Images are preprocessed in torch the
way CLIP's image processor does it (bicubic resize of the short side, centre crop, CLIP mean/std).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from dds.errors import DDSError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_clip(path: str | Path | None):
    """(CLIPModel, tokenizer) from a local folder; one clear DDSError when it is missing."""
    if path is None:
        raise DDSError("the CLIP score needs CLIP weights that cannot be downloaded here; give a "
                       "local transformers CLIP folder (config.json + weights) with --clip PATH")
    p = Path(path)
    if not (p / "config.json").is_file():
        raise DDSError(f"'{p}' is not a transformers CLIP folder (no config.json); give one "
                       "saved with CLIPModel.save_pretrained and its processor with --clip")
    from transformers import CLIPModel, CLIPTokenizer

    try:
        model = CLIPModel.from_pretrained(str(p), local_files_only=True).eval()
        tok = CLIPTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise DDSError(f"the CLIP folder '{p}' cannot be loaded ({str(e).splitlines()[0]})") from None
    return model, tok


def _features(out) -> Tensor:
    """transformers 4 returns a tensor, transformers 5 an output object with the projection."""
    if isinstance(out, Tensor):
        return out
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        v = getattr(out, name, None)
        if v is not None:
            return v
    raise TypeError(f"unexpected CLIP features of type {type(out).__name__}")


def preprocess(images: Tensor, size: int) -> Tensor:
    """(B,3,H,W) in [0,1] -> CLIP pixel values (B,3,size,size)."""
    h, w = images.shape[-2:]
    s = size / min(h, w)
    x = F.interpolate(images.float(), size=(max(size, round(h * s)), max(size, round(w * s))),
                      mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def image_embeddings(model, images: Tensor) -> Tensor:
    size = int(model.config.vision_config.image_size)
    dev = next(model.parameters()).device
    return _features(model.get_image_features(pixel_values=preprocess(images, size).to(dev)))


@torch.no_grad()
def text_embeddings(model, tokenizer, texts: list[str]) -> Tensor:
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # a CLIPProcessor holds its tokenizer
    max_len = int(model.config.text_config.max_position_embeddings)
    enc = tok(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    dev = next(model.parameters()).device
    return _features(model.get_text_features(input_ids=enc["input_ids"].to(dev),
                                             attention_mask=enc["attention_mask"].to(dev)))


def clip_score(model, tokenizer, images: Tensor, texts: list[str], batch_size: int = 32) -> Tensor:
    """Per pair (B,): 100 * max(cosine(image embedding, text embedding), 0)."""
    if len(texts) != images.shape[0]:
        raise DDSError(f"{images.shape[0]} images but {len(texts)} texts for the CLIP score")
    out = []
    for i in range(0, len(texts), batch_size):
        ei = image_embeddings(model, images[i:i + batch_size])
        et = text_embeddings(model, tokenizer, texts[i:i + batch_size])
        out.append((100 * F.cosine_similarity(ei.float(), et.float(), dim=-1)).clamp_min(0).cpu())
    return torch.cat(out)
