"""The T5 tokenizer, read from the checkpoint's own files.

`tokenizer.json` (what the hub repos ship) is run with the `tokenizers` library, which applies the same
normaliser, pre-tokenizer and `</s>` post-processing as transformers. A folder with only `spiece.model` is
run with sentencepiece, appending `</s>` as T5 does. Batches are right-padded with the pad id (0 for T5)
and come with an attention mask.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch


class TextTokenizer:
    def __init__(self, encode_batch, pad_id: int, source: str):
        self._encode_batch = encode_batch
        self.pad_id = pad_id
        self.source = source

    @classmethod
    def from_dir(cls, folder: str | Path) -> "TextTokenizer":
        folder = Path(folder)
        if (folder / "tokenizer.json").is_file():
            return cls._from_tokenizer_json(folder / "tokenizer.json")
        if (folder / "spiece.model").is_file():
            return cls._from_sentencepiece(folder / "spiece.model")
        raise ValueError(f"{folder} has no text tokenizer: expected tokenizer.json or spiece.model")

    @classmethod
    def _from_tokenizer_json(cls, path: Path) -> "TextTokenizer":
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception on malformed files
            raise ValueError(f"cannot read tokenizer {path}: {e}") from e
        tok.no_padding()
        tok.no_truncation()
        pad_token = _pad_token(path.parent) or "<pad>"
        pad_id = tok.token_to_id(pad_token)
        if pad_id is None:
            pad_id = 0

        return cls(_JsonEncoder(tok), pad_id, str(path))

    @classmethod
    def _from_sentencepiece(cls, path: Path) -> "TextTokenizer":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except Exception as e:  # noqa: BLE001 - sentencepiece raises OSError or RuntimeError
            raise ValueError(f"cannot read tokenizer {path}: {e}") from e
        pad = sp.pad_id() if sp.pad_id() >= 0 else 0
        return cls(_SentencePieceEncoder(sp), pad, str(path))

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """texts -> (ids (B, L) long, mask (B, L) long), right-padded to the longest."""
        seqs = self._encode_batch(list(texts))
        length = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, :len(s)] = 1
        return ids, mask


class _JsonEncoder:
    """texts -> ids with a `tokenizers` Tokenizer (which pickles itself: a model can be copied or pickled)."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts)]


class _SentencePieceEncoder:
    """texts -> ids + </s> with sentencepiece; pickled as its serialised model."""

    def __init__(self, sp):
        self.sp = sp
        self.eos = sp.eos_id() if sp.eos_id() >= 0 else 1

    def __call__(self, texts: list[str]) -> list[list[int]]:
        return [ids + [self.eos] for ids in self.sp.encode(texts)]

    def __getstate__(self):
        return {"proto": self.sp.serialized_model_proto(), "eos": self.eos}

    def __setstate__(self, state):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_proto=state["proto"])
        self.eos = state["eos"]


def _pad_token(folder: Path) -> str | None:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = folder / name
        if f.is_file():
            try:
                value = json.loads(f.read_text()).get("pad_token")
            except (json.JSONDecodeError, AttributeError):
                continue
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                return value
    return None
