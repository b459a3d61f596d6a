"""The real CLIP BPE tokenizer, rebuilt offline from the vocabulary file shipped in open_clip_torch.

Used only when *building* models (training the built-in model, tests). At run time every model
folder carries its own saved ``tokenizer/`` folder, so this module is not needed there.

The vocabulary is reconstructed exactly the way open_clip's ``SimpleTokenizer`` does it, which is
also the vocabulary of OpenAI CLIP / Stable Diffusion 1.x (49408 tokens, ``<|startoftext|>`` =
49406, ``<|endoftext|>`` = 49407).
"""

from __future__ import annotations

import copy
import gzip
import importlib.util
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

from dds.errors import DDSError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES_END = 49152 - 256 - 2 + 1


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable unicode map used by GPT-2 / CLIP byte-level BPE."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def bpe_vocab_path() -> Path:
    """Path of open_clip's gzipped BPE vocabulary, found without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        p = Path(loc) / BPE_FILE
        if p.is_file():
            return p
    raise DDSError(
        "The CLIP vocabulary file was not found; install it with "
        "`pip install --no-deps open_clip_torch`."
    )


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    lines = gzip.open(bpe_vocab_path()).read().decode("utf-8").split("\n")
    merge_lines = lines[1:N_MERGES_END]
    merges = [tuple(m.split()) for m in merge_lines]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    for m in merges:
        vocab.append("".join(m))
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    return {tok: i for i, tok in enumerate(vocab)}, [" ".join(m) for m in merges]


def write_vocab_files(save_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` (HF CLIP format) into ``save_dir``."""
    vocab, merges = _vocab_and_merges()
    d = Path(save_dir)
    d.mkdir(parents=True, exist_ok=True)
    vocab_file = d / "vocab.json"
    merges_file = d / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def clip_tokenizer(save_dir: str | os.PathLike | None = None):
    """Build the CLIP tokenizer (``transformers.CLIPTokenizer``, max length 77).

    With ``save_dir`` the vocabulary files are written there and the tokenizer is saved there
    too (``save_pretrained``); otherwise a temporary folder is used and removed.
    """
    from transformers import CLIPTokenizer

    def build(d: str | os.PathLike) -> CLIPTokenizer:
        vocab_file, merges_file = write_vocab_files(d)
        return CLIPTokenizer(
            str(vocab_file),
            str(merges_file),
            model_max_length=77,
            pad_token="<|endoftext|>",
        )

    if save_dir is not None:
        tok = build(save_dir)
        tok.save_pretrained(str(save_dir))
        return tok
    return copy.deepcopy(_cached_tokenizer(build))


_CACHE: list = []


def _cached_tokenizer(build):
    if not _CACHE:
        with tempfile.TemporaryDirectory(prefix="dds-clip-tok-") as tmp:
            _CACHE.append(build(tmp))
    return _CACHE[0]
