"""pipelines.procedural.text: word-table encoder with fixed length, zero padding and a null prompt."""
from __future__ import annotations

import pytest
import torch

from pipelines.procedural.data import all_attributes, caption_vocabulary
from pipelines.procedural.text import TextEncoder, tokenize


@pytest.fixture
def encoder() -> TextEncoder:
    torch.manual_seed(0)
    return TextEncoder(caption_vocabulary(), text_len=8, text_dim=32)


def test_context_has_fixed_length_and_zero_padding(encoder):
    context = encoder.encode(["a red circle moves left", "a green square bounces"])
    assert context.shape == (2, 8, 32)
    # 5 words + <eos> = 6 rows, 4 words + <eos> = 5 rows; the rest is exactly zero
    assert context[0, :6].abs().sum(-1).gt(0).all() and (context[0, 6:] == 0).all()
    assert context[1, :5].abs().sum(-1).gt(0).all() and (context[1, 5:] == 0).all()


def test_every_caption_fits_and_distinct_captions_differ(encoder):
    captions = [a.caption() for a in all_attributes()]
    context = encoder.encode(captions)
    flat = context.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(len(captions)) * 1e9).min() > 0
    assert torch.equal(encoder.encode(captions[:1]), context[:1])


def test_null_prompt_is_the_empty_caption(encoder):
    null = encoder.null(3)
    assert null.shape == (3, 8, 32)
    assert torch.equal(null, encoder.encode(["", "", ""]))
    assert null[:, 0].abs().sum() > 0 and (null[:, 1:] == 0).all(), "only <eos> is set"


def test_tokenizer_ignores_case_and_punctuation(encoder):
    assert tokenize("A Red circle, moves LEFT.") == ["a", "red", "circle", "moves", "left"]
    assert torch.equal(encoder.encode(["A Red circle moves LEFT."]), encoder.encode(["a red circle moves left"]))


def test_unknown_words_and_long_captions_raise(encoder):
    with pytest.raises(ValueError, match=r"unknown words \['purple'\].*vocabulary is \["):
        encoder.encode(["a purple circle bounces"])
    with pytest.raises(ValueError, match="holds at most 7"):
        encoder.encode(["a red red red red red red red circle"])


def test_state_dict_round_trip_and_training(encoder):
    assert set(encoder.state_dict()) == {"token_embedding.weight", "position_embedding.weight"}
    copy = TextEncoder(**encoder.config())
    copy.load_state_dict(encoder.state_dict())
    captions = ["a blue triangle stays still", ""]
    assert torch.equal(copy.encode(captions), encoder.encode(captions))
    encoder.encode(captions).sum().backward()
    assert encoder.token_embedding.weight.grad.abs().sum() > 0, "the table is trained with the model"


def test_bad_construction_says_how_to_fix():
    with pytest.raises(ValueError, match="text_len must be >= 2"):
        TextEncoder(["a"], text_len=1)
    with pytest.raises(ValueError, match="distinct words"):
        TextEncoder(["a", "a"])
