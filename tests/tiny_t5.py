"""A T5 tokenizer for tests, trained here (no download): a SentencePiece unigram model over a
small corpus of the project's own captions, saved as `T5TokenizerFast` saves a real one."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "a photo of a cat", "a photo of a dog", "a red circle on a wooden table",
    "a blue square on grass", "a green star in the sky", "a yellow cross on sand",
    "a painting of a house by the sea", "a white horse in a field", "an old stone bridge",
    "noise", "a small orange triangle", "the same scene at night", "a watercolor landscape",
]


def save_t5_tokenizer(folder: Path, vocab_size: int = 160) -> Path:
    """Train a unigram SentencePiece model on CORPUS and save it as a T5 tokenizer folder
    (tokenizer.json and its config), with T5's special tokens: <pad>=0, </s>=1, <unk>=2."""
    from tokenizers import SentencePieceUnigramTokenizer
    from transformers import T5TokenizerFast

    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator(CORPUS * 20, vocab_size=vocab_size,
                           special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                           show_progress=False)
    tok = T5TokenizerFast(tokenizer_object=sp._tokenizer, pad_token="<pad>", eos_token="</s>",
                          unk_token="<unk>", extra_ids=0, model_max_length=512)
    tok.save_pretrained(folder)
    return Path(folder)
