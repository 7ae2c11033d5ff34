"""Tokenizer from either of the checkpoint's files, and the T5 encoder's relative-position buckets."""
from __future__ import annotations

import shutil

import pytest
import torch

from musicgen.t5 import relative_buckets
from musicgen.tokenizer import TextTokenizer

TEXTS = ["80s pop track with bassy drums and synth", "lofi", "Jazz trio: upright bass, brushed drums & piano  solo!",
         "ünïcödé and numbers 120 bpm"]


def test_tokenizer_json_matches_transformers(ckpt_dir, hf_tokenizer):
    ids, mask = TextTokenizer.from_dir(ckpt_dir)(TEXTS)
    ref = hf_tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert torch.equal(ids, ref.input_ids)
    assert torch.equal(mask, ref.attention_mask)


def test_spiece_only_folder_gives_the_same_ids(ckpt_dir, tmp_path, hf_tokenizer):
    shutil.copy(ckpt_dir / "spiece.model", tmp_path / "spiece.model")
    tok = TextTokenizer.from_dir(tmp_path)
    assert tok.source.endswith("spiece.model")
    ids, mask = tok(TEXTS[:3])
    ref = hf_tokenizer(TEXTS[:3], padding=True, return_tensors="pt")
    assert torch.equal(ids, ref.input_ids)
    assert torch.equal(mask, ref.attention_mask)
    assert ids[1, mask[1].sum() - 1] == 1                       # ends with </s>
    assert (ids[1, mask[1].sum():] == 0).all()                  # right-padded with <pad>


def test_no_tokenizer_files(tmp_path):
    with pytest.raises(ValueError, match="tokenizer"):
        TextTokenizer.from_dir(tmp_path)


def test_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read tokenizer"):
        TextTokenizer.from_dir(tmp_path)


def test_relative_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    pos = torch.arange(300)
    rel = pos[None, :] - pos[:, None]
    ref = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
    assert torch.equal(relative_buckets(rel, 32, 128), ref)


def test_padding_does_not_change_real_token_states(model):
    """A prompt's states are the same alone and when padded in a batch with a longer one."""
    alone, _ = model.encode_text(["lofi"])
    batched, mask = model.encode_text(["lofi", "a much longer prompt about an orchestra with choir"])
    n = int(mask[0].sum())
    torch.testing.assert_close(batched[0, :n], alone[0, :n], atol=1e-5, rtol=1e-5)
    assert (batched[0, n:] == 0).all()
