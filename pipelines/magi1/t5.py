"""MAGI-1 text encoder: DeepFloyd T5-v1.1-XXL through `transformers.T5EncoderModel`, fp32, offline.

Upstream: MAGI-1 `inference/model/t5/t5_model.py` (`T5Embedder`, the DeepFloyd IF / PixArt one) and
`inference/pipeline/prompt_process.py`. Facts: ../shared/reference/GOLDEN_FORMAT.md section 8.4 and
NOTES_magi1.md section 4.
- The model is transformers' T5EncoderModel unchanged, loaded with `torch_dtype=torch.float` (fp32).
- Each prompt is cleaned with `clean_caption` twice, tokenized with padding to `max_length` =
  `caption_max_length` (800) and truncation (`</s>` is kept as the last token).
- The result is `(last_hidden_state, attention_mask)`; unlike Wan, padding rows are NOT zeroed:
  the DiT uses the mask to pick the valid caption tokens.

Folder layout (HF format, upstream's `<t5_pretrained>/t5-v1_1-xxl`): config.json, the weights
(model.safetensors, pytorch_model.bin, or shards listed by their *.index.json), and the tokenizer
files (spiece.model / tokenizer.json, tokenizer_config.json, special_tokens_map.json). Loading builds
the model on the meta device, checks the keys strictly and assigns them; every fault of the folder
is a one-line CheckpointError naming the file.
"""
from __future__ import annotations

import html
import os
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from html.parser import HTMLParser
from typing import Any

# No hub at run time (as pipelines/wan/umt5.py): set before transformers reads it at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ftfy  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from fsspec import AbstractFileSystem  # noqa: E402
from fsspec.core import url_to_fs  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from pipelines.skyreels_v2.checkpoint import CheckpointError, read_json_object, read_shard  # noqa: E402
# the tokenizer folder / URL loader and the weights_only torch reader are shared with the umT5 encoder
from pipelines.wan.umt5 import load_tokenizer, read_torch_weights  # noqa: E402

CAPTION_MAX_LENGTH = 800         # model_config.caption_max_length of every official MAGI-1 config
UPSTREAM_SUBDIR = "t5-v1_1-xxl"  # upstream appends this to runtime_config.t5_pretrained
CONFIG_FILE = "config.json"
REDOWNLOAD = "re-download the t5-v1_1-xxl folder"
# "eager": upstream pins transformers 4.42.3, whose T5 had only this attention; "sdpa" is faster
# and moves fp32 outputs by about 1e-6
ATTENTION = "eager"
# weight files in the order they are looked for: (single file, index listing shards)
WEIGHT_LAYOUTS = (("model.safetensors", "model.safetensors.index.json"),
                  ("pytorch_model.bin", "pytorch_model.bin.index.json"))
# the file may store the tied input embedding under either name (or both)
TIED_KEYS = {"encoder.embed_tokens.weight": "shared.weight"}
# a full encoder-decoder T5 checkpoint: its decoder half is dropped, as T5EncoderModel.from_pretrained does
IGNORED_PREFIXES = ("decoder.", "lm_head.")


# ----------------------------------------------------------------------------- 1. caption cleaning

class _TextOnly(HTMLParser):
    """HTML -> its text, as BeautifulSoup(html, "html.parser").text (bs4 drives this same parser)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def html_to_text(text: str) -> str:
    parser = _TextOnly()
    parser.feed(text)
    parser.close()
    return "".join(parser.parts)


def basic_clean(text: str) -> str:
    """ftfy fix, HTML unescape twice, strip (the same helper Wan's tokenizer uses)."""
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


_DOMAIN = r"[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)"
_FILE_EXT = r"(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)"
_DASHES = (r"\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0"
           r"\uFE31\uFE32\uFE58\uFE63\uFF0D")

# (pattern, replacement) applied in order; each group is one stretch of upstream's function
_URL_STEPS = [
    (rf"\b((?:https?:(?:\/{{1,3}}|[a-zA-Z0-9%])|{_DOMAIN}))", ""),  # scheme + first char, bare domains
    (rf"\b((?:www:(?:\/{{1,3}}|[a-zA-Z0-9%])|{_DOMAIN}))", ""),
]
_SYMBOL_STEPS = [
    (r"@[\w\d]+\b", ""),                      # @nickname
    # CJK strokes .. unified ideographs: upstream removes seven adjacent blocks, together U+31C0-U+9FFF;
    # so a Chinese prompt loses its Chinese text (kana below U+31C0 and Hangul survive)
    (r"[\u31c0-\u9fff]+", ""),
    (rf"[{_DASHES}]+", "-"),                  # every kind of dash
    (r"[`´«»“”¨]", '"'),
    (r"[‘’]", "'"),
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IP addresses
    (r"\d:\d\d\s+$", ""),                     # article ids
    (r"\\n", " "),                            # a literal backslash-n
    (r"#\d{1,3}\b", ""),
    (r"#\d{5,}\b", ""),
    (r"\b\d{6,}\b", ""),
    (rf"[\S]+\.{_FILE_EXT}", ""),             # file names
    (r"[\"\']{2,}", '"'),
    (r"[\.]{2,}", " "),
    (r"[#®•©™&@·º½¾¿¡§~\)\(\]\[\}\{\|\\\/\*]{1,}", " "),  # upstream's bad_punct_regex
    (r"\s+\.\s+", " "),
]
_SLUG_SEPARATOR = re.compile(r"(?:\-|\_)")     # this-is-a-slug / this_is_a_slug
_WORD_STEPS = [
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),       # jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),       # jc6640vc
    (r"\b\d+[a-zA-Z]+\d+\b", ""),             # 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""),  # also inside words, as upstream
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (rf"\b{_FILE_EXT}(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # j2d1a2a
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),     # sizes 1920x1080 (latin x, cyrillic х, ×)
    (r"\b\s+\:\s+", ": "),
    (r"(\D[,\./])\b", r"\1 "),
    (r"\s+", " "),
]
_EDGE_STEPS = [
    (r"^[\"\']([\w\W]+)[\"\']$", r"\1"),      # surrounding quotes
    (r"^[\'\_,\-\:;]", ""),
    (r"[\'\_,\-\:\-\+]$", ""),
    (r"^\.\S+$", ""),
]


def _compile(steps: list[tuple[str, str]]) -> list[tuple[re.Pattern[str], str]]:
    return [(re.compile(pattern), replacement) for pattern, replacement in steps]


URL_STEPS, SYMBOL_STEPS, WORD_STEPS, EDGE_STEPS = map(_compile, (_URL_STEPS, _SYMBOL_STEPS, _WORD_STEPS, _EDGE_STEPS))


def _substitute(text: str, steps: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, replacement in steps:
        text = pattern.sub(replacement, text)
    return text


def clean_caption(caption: str) -> str:
    """One pass of upstream's `clean_caption` (DeepFloyd IF / PixArt `T5Embedder`).

    Every step is reproduced, in order. One substitution: BeautifulSoup's html.parser `.text` is
    done with the same stdlib HTMLParser directly (text nodes kept, comments dropped); they can
    differ only on exotic markup (e.g. text inside <script>, which newer bs4 drops and this keeps)."""
    text = urllib.parse.unquote_plus(str(caption))  # also turns '+' into a space, as upstream
    text = text.strip().lower().replace("<person>", "person")
    text = _substitute(text, URL_STEPS)
    text = html_to_text(text)
    text = _substitute(text, SYMBOL_STEPS)
    if len(_SLUG_SEPARATOR.findall(text)) > 3:
        text = _SLUG_SEPARATOR.sub(" ", text)
    text = basic_clean(text)
    text = _substitute(text, WORD_STEPS)
    # (upstream calls caption.strip() here and drops the result; the edge steps see the unstripped text)
    text = _substitute(text, EDGE_STEPS)
    return text.strip()


def preprocess_caption(caption: str) -> str:
    """Upstream's `text_preprocessing`: `clean_caption` applied twice (as in training)."""
    return clean_caption(clean_caption(caption))


# ----------------------------------------------------------------------------- 2. weights

def find_model_folder(fs: AbstractFileSystem, root: str, where: str) -> tuple[str, str]:
    """(path, label) of the folder holding config.json: `root` itself or upstream's `root/t5-v1_1-xxl`."""
    for path, label in ((root, where), (_join(root, UPSTREAM_SUBDIR), _join(where, UPSTREAM_SUBDIR))):
        if fs.isfile(_join(path, CONFIG_FILE)):
            return path, label
    problem = "no such folder" if not fs.exists(root) else f"neither it nor {UPSTREAM_SUBDIR}/ holds {CONFIG_FILE}"
    raise CheckpointError(f"{_join(where, CONFIG_FILE)}: missing ({problem}); pass the t5-v1_1-xxl folder "
                          f"(config.json, weights, tokenizer files) or its parent")


def read_config(fs: AbstractFileSystem, root: str, where: str,
                attn_implementation: str = ATTENTION) -> transformers.T5Config:
    """config.json as a transformers T5Config; a bad value is one CheckpointError line."""
    label = _join(where, CONFIG_FILE)
    fields = read_json_object(fs, _join(root, CONFIG_FILE), label, REDOWNLOAD)
    try:
        return transformers.T5Config.from_dict(fields, attn_implementation=attn_implementation)
    except Exception as err:  # noqa: BLE001 - strict config validation raises several types
        reason = " ".join(str(err).split())[:200]
        raise CheckpointError(f"{label}: not a valid T5 config ({reason}); {REDOWNLOAD}") from None


def weight_files(fs: AbstractFileSystem, root: str, where: str) -> list[str]:
    """Names of the weight files: a single file, or the shards its index lists (safetensors first)."""
    for single, index in WEIGHT_LAYOUTS:
        if fs.isfile(_join(root, index)):
            weight_map = read_json_object(fs, _join(root, index), _join(where, index), REDOWNLOAD).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f'{_join(where, index)}: "weight_map" must be a non-empty object of '
                                      f"tensor name -> shard file; {REDOWNLOAD}")
            shards = sorted(set(map(str, weight_map.values())))
            absent = [name for name in shards if not fs.isfile(_join(root, name))]
            if absent:
                raise CheckpointError(f"{_join(where, absent[0])}: missing (listed by {index}"
                                      f"{f' with {len(absent) - 1} more' if len(absent) > 1 else ''}); {REDOWNLOAD}")
            return shards
        if fs.isfile(_join(root, single)):
            return [single]
    looked = ", ".join(name for layout in WEIGHT_LAYOUTS for name in layout)
    raise CheckpointError(f"{where}: no T5 weights (looked for {looked}); {REDOWNLOAD}")


def read_weights(fs: AbstractFileSystem, root: str, where: str) -> dict[str, Tensor]:
    """Every tensor of every weight file (safetensors, or torch files read with weights_only)."""
    state_dict: dict[str, Tensor] = {}
    for name in weight_files(fs, root, where):
        path, label = _join(root, name), _join(where, name)
        tensors = read_shard(fs, path, label=label) if name.endswith(".safetensors") else \
            read_torch_weights(fs, path, label)
        twice = sorted(set(tensors) & set(state_dict))
        if twice:
            raise CheckpointError(f"{label}: key {twice[0]!r} is also in another shard; {REDOWNLOAD}")
        state_dict.update(tensors)
    return state_dict


def encoder_from_state_dict(state_dict: Mapping[str, Tensor], config: transformers.T5Config,
                            dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu",
                            label: str = "T5 state dict") -> transformers.T5EncoderModel:
    """Build on the meta device, check the keys strictly, assign (cast, moved), tie the embedding."""
    with torch.device("meta"):
        model = transformers.T5EncoderModel(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tensors = {k: v for k, v in state_dict.items() if not k.startswith(IGNORED_PREFIXES)}
    for alias, name in TIED_KEYS.items():  # either name may carry the tied embedding
        source = tensors.get(name, tensors.get(alias))
        if source is not None:
            tensors[name] = tensors[alias] = source
    missing = [k for k in expected if k not in tensors]
    unexpected = sorted(k for k in tensors if k not in expected)
    misshaped = [f"{k} {list(tensors[k].shape)} (expected {list(expected[k])})"
                 for k in expected if k in tensors and tuple(tensors[k].shape) != expected[k]]
    problems = [f"{len(keys)} {what} key(s): {_first_few(keys)}"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
    if problems:
        raise CheckpointError(f"{label}: the weights do not fit the T5 encoder its {CONFIG_FILE} describes "
                              f"({'; '.join(problems)}); {REDOWNLOAD}")
    model.load_state_dict({k: v.to(device=device, dtype=dtype or v.dtype) for k, v in tensors.items()},
                          strict=True, assign=True)
    model.encoder.embed_tokens.weight = model.shared.weight  # assign untied them; store the embedding once
    return model.eval().requires_grad_(False)


def load_t5_encoder(folder_or_url: str, dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu",
                    storage_options: dict | None = None, attn_implementation: str = ATTENTION
                    ) -> transformers.T5EncoderModel:
    """The T5 encoder of a t5-v1_1-xxl folder (or its parent), local path or fsspec URL; fp32 as upstream."""
    fs, root = url_to_fs(folder_or_url, **(storage_options or {}))
    root, where = find_model_folder(fs, root, folder_or_url)
    config = read_config(fs, root, where, attn_implementation)
    state_dict = read_weights(fs, root, where)
    return encoder_from_state_dict(state_dict, config, dtype, device, label=where)


# ----------------------------------------------------------------------------- 3. prompts -> embeddings

class MagiT5TextEncoder(nn.Module):
    """Prompts -> (last_hidden_state [B, max_length, d_model], attention mask [B, max_length] int64)."""

    def __init__(self, model: transformers.T5EncoderModel, tokenizer: Any, max_length: int = CAPTION_MAX_LENGTH,
                 clean: bool = True) -> None:
        super().__init__()
        if max_length < 1:
            raise ValueError(f"max_length must be a positive token count (caption_max_length, upstream "
                             f"{CAPTION_MAX_LENGTH}); got {max_length}")
        self.model, self.tokenizer, self.max_length, self.clean = model, tokenizer, max_length, clean

    @property
    def text_dim(self) -> int:
        return self.model.config.d_model

    def tokenize(self, prompts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """ids and mask [B, max_length] int64; without `clean`, upstream's fallback `lower().strip()`."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        texts = [preprocess_caption(p) if self.clean else p.lower().strip() for p in prompts]
        tokens = self.tokenizer(texts, max_length=self.max_length, padding="max_length", truncation=True,
                                return_attention_mask=True, add_special_tokens=True, return_tensors="pt")
        return tokens["input_ids"], tokens["attention_mask"]

    @torch.no_grad()
    def forward(self, prompts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        ids, mask = self.tokenize(prompts)
        device = self.model.shared.weight.device
        ids, mask = ids.to(device), mask.to(device)
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state, mask

    encode = forward


def load_text_encoder(folder_or_url: str, *, max_length: int = CAPTION_MAX_LENGTH,
                      dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu",
                      storage_options: dict | None = None, attn_implementation: str = ATTENTION,
                      clean: bool = True) -> MagiT5TextEncoder:
    """MAGI-1's text encoder from the t5-v1_1-xxl folder (or upstream's t5_pretrained parent), offline."""
    fs, root = url_to_fs(folder_or_url, **(storage_options or {}))
    _, where = find_model_folder(fs, root, folder_or_url)
    tokenizer = load_tokenizer(where, storage_options)  # small: fail fast before 19 GB of weights
    model = load_t5_encoder(where, dtype, device, storage_options, attn_implementation)
    return MagiT5TextEncoder(model, tokenizer, max_length, clean)


def _first_few(keys: Sequence[str], shown: int = 3) -> str:
    text = ", ".join(keys[:shown])
    return text + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def _join(root: str, name: str) -> str:
    return f"{str(root).rstrip('/')}/{name}"


__all__ = ["CAPTION_MAX_LENGTH", "MagiT5TextEncoder", "basic_clean", "clean_caption", "encoder_from_state_dict",
           "html_to_text", "load_t5_encoder", "load_text_encoder", "preprocess_caption"]
