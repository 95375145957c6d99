"""A tiny text encoder for the procedural captions: a learned word table, trained with the model.

Tokenizer: lower-case, '.' and ',' dropped, split on whitespace; each word must be in the
vocabulary. An unknown word raises a ValueError that lists the vocabulary: the procedural
model only knows its caption words, so a silent <unk> would generate a wrong video without
saying so.

Encoding mirrors upstream Wan (T5 with an end token, zero padding to a fixed length):
    [w_1 .. w_n, <eos>, 0 .. 0]  ->  [L, text_dim]
row i (i <= n) = token_embedding[id_i] + position_embedding[i]; padded rows are exactly zero.
The empty caption is [<eos>, 0 ..]: the null / negative prompt for classifier-free guidance.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

EOS = "<eos>"


def tokenize(caption: str) -> list[str]:
    """Lower-case words of a caption, punctuation '.' and ',' dropped."""
    return caption.lower().replace(".", " ").replace(",", " ").split()


class TextEncoder(nn.Module):
    """Word-table encoder: captions -> context [B, text_len, text_dim] (zero padded)."""

    def __init__(self, vocab: Sequence[str], text_len: int = 8, text_dim: int = 64) -> None:
        super().__init__()
        words = list(vocab)
        if len(set(words)) != len(words) or EOS in words:
            raise ValueError(f"vocab must be distinct words without {EOS!r}; got {words}")
        if text_len < 2:
            raise ValueError(f"text_len must be >= 2 (the longest caption + 1 for {EOS}); got {text_len}")
        if text_dim < 1:
            raise ValueError(f"text_dim must be >= 1 (e.g. 64); got {text_dim}")
        self.vocab = [EOS, *words]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.text_len, self.text_dim = text_len, text_dim
        self.token_embedding = nn.Embedding(len(self.vocab), text_dim)
        self.position_embedding = nn.Embedding(text_len, text_dim)
        nn.init.normal_(self.token_embedding.weight, std=1.0)
        nn.init.normal_(self.position_embedding.weight, std=0.1)

    def config(self) -> dict[str, object]:
        """Constructor arguments (store next to the state dict)."""
        return {"vocab": self.vocab[1:], "text_len": self.text_len, "text_dim": self.text_dim}

    def token_ids(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, L] (long, 0 where padded) and mask [B, L] (True on words and <eos>)."""
        ids = torch.zeros(len(captions), self.text_len, dtype=torch.long)
        mask = torch.zeros(len(captions), self.text_len, dtype=torch.bool)
        for b, caption in enumerate(captions):
            words = tokenize(caption)
            unknown = [w for w in words if w not in self.index]
            if unknown:
                raise ValueError(f"caption {caption!r} has unknown words {unknown}; "
                                 f"the vocabulary is {sorted(self.vocab[1:])}")
            if len(words) + 1 > self.text_len:
                raise ValueError(f"caption {caption!r} has {len(words)} words; text_len={self.text_len} "
                                 f"holds at most {self.text_len - 1} (one slot is {EOS})")
            row = [self.index[w] for w in words] + [self.index[EOS]]
            ids[b, :len(row)] = torch.tensor(row)
            mask[b, :len(row)] = True
        return ids, mask

    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """captions -> context [B, text_len, text_dim] on the module's device."""
        ids, mask = self.token_ids(captions)
        device = self.token_embedding.weight.device
        ids, mask = ids.to(device), mask.to(device)
        positions = torch.arange(self.text_len, device=device)
        x = self.token_embedding(ids) + self.position_embedding(positions)[None]  # [B, L, D]
        return x * mask[..., None]

    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        return self.encode(captions)

    def null(self, batch_size: int = 1) -> torch.Tensor:
        """Context of the empty caption [B, L, D]: the unconditional / negative prompt."""
        return self.encode([""] * batch_size)
