"""umT5-XXL text encoder of Wan2.1 / SkyReels-V2 on `transformers.UMT5EncoderModel`, official key names.

Upstream: SkyReels-V2 `skyreels_v2_infer/modules/t5.py` (`umt5_xxl(encoder_only=True)`, `T5Encoder`,
`T5EncoderModel.encode`) and `tokenizers.py` (`HuggingfaceTokenizer(clean="whitespace")`). Facts:
../shared/reference/GOLDEN_FORMAT.md section 8.2 and NOTES_skyreels_v2.md section 6.

Why `UMT5EncoderModel` fits upstream's `T5Encoder` exactly:
- every layer owns its relative-position table (upstream `shared_pos=False`); T5EncoderModel would
  share layer 0's table;
- attention logits are q.k with no 1/sqrt(d) scaling, plus the layer's bias; masked keys get the
  dtype's minimum (upstream `masked_fill(mask == 0, finfo.min)`, the SDPA path does the same);
- FFN `fc2(fc1(h) * gelu_tanh(gate(h)))` = `wo(wi_1(h) * gelu_new(wi_0(h)))` (config "gated-gelu");
- RMS norm `w * x * rsqrt(mean(x^2) + 1e-6)` with the variance in float32;
- 16 buckets per direction, exact below 8, logarithmic up to max_distance 128, capped at 15.

Reads top to bottom: config, key table, state-dict conversion, encoder, weight files, tokenizer,
prompt -> context wrapper. Production runs the encoder in bf16 (upstream casts it); tests use fp32.
Bad or missing files raise one-line `CheckpointError`s naming the file and where it was looked for.
"""
from __future__ import annotations

import html
import os
import posixpath
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

# No hub at run time: everything is read from local folders (URLs are copied to a temp folder
# first). Set before transformers/huggingface_hub read it at import; an explicit setting wins.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ftfy  # noqa: E402
import regex  # noqa: E402  (upstream's whitespace_clean uses the `regex` package's \s)
import torch  # noqa: E402
import transformers  # noqa: E402
from fsspec import AbstractFileSystem  # noqa: E402
from fsspec.core import url_to_fs  # noqa: E402
from fsspec.implementations.local import LocalFileSystem  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from pipelines.skyreels_v2.checkpoint import CheckpointError, read_shard  # noqa: E402

WEIGHTS_FILE = "models_t5_umt5-xxl-enc-bf16.pth"  # official name, in the SkyReels-V2 model folder
TOKENIZER_DIR = "google/umt5-xxl"                  # official tokenizer folder, inside the model folder
TEXT_LEN = 512                                     # upstream pads / truncates every prompt to this
MAX_DISTANCE = 128                                 # T5RelativeEmbedding(max_dist=128), not a config field
NORM_EPS = 1e-6                                    # T5LayerNorm(eps=1e-6), not a config field
REDOWNLOAD = "re-download or re-export it"
# transformers attention kernel. "eager" is upstream's explicit q.k + bias, softmax, @v; "sdpa" is
# faster on long prompts and moves fp32 outputs by about 1e-6 (both pass the goldens)
ATTENTION = "eager"


# ----------------------------------------------------------------------------- 1. config

# umt5_xxl's cfg also has decoder_layers; upstream's encoder_only=True build pops it unused
IGNORED_FIELDS = ("decoder_layers",)


@dataclass(frozen=True, kw_only=True)
class UMT5Config:
    """`umt5_xxl(encoder_only=True)` kwargs (official names); defaults are the official XXL values."""

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    encoder_layers: int = 24
    num_buckets: int = 32
    shared_pos: bool = False
    dropout: float = 0.1  # upstream's value; inactive in eval, kept so a golden model_config round-trips

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "dim_attn", "dim_ffn", "num_heads", "encoder_layers", "num_buckets"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                xxl = next(f.default for f in fields(self) if f.name == name)  # the defaults are the XXL values
                raise ValueError(f"UMT5Config.{name} must be a positive integer (XXL: {xxl}); got {value!r}")
        if self.dim_attn % self.num_heads:
            raise ValueError(f"UMT5Config.dim_attn ({self.dim_attn}) must divide by num_heads ({self.num_heads}): "
                             "each head gets dim_attn // num_heads channels (XXL: 4096 / 64)")
        if self.num_buckets % 2:
            raise ValueError(f"UMT5Config.num_buckets must be even (half per direction, XXL: 32); "
                             f"got {self.num_buckets}")
        if self.shared_pos:
            raise ValueError("UMT5Config.shared_pos=True (one position table for all layers, the T5/mT5 layout) is "
                             "not supported: umT5 checkpoints have one table per layer; use shared_pos=False")

    @classmethod
    def named(cls, name: str) -> UMT5Config:
        """A named size: "xxl" (the released encoder) or "tiny" (tests)."""
        if name not in UMT5_SIZES:
            raise ValueError(f"unknown umT5 size {name!r}; choose one of {sorted(UMT5_SIZES)}")
        return UMT5_SIZES[name]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UMT5Config:
        """Build from a golden `model_config` or JSON dict; `_`-prefixed keys (`_class_name`) are ignored."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(k for k in d if k not in valid and k not in IGNORED_FIELDS and not k.startswith("_"))
        if unknown:
            raise ValueError(f"unknown UMT5Config field(s) {unknown}; valid fields are {valid} "
                             f"(ignored: {list(IGNORED_FIELDS)} and keys starting with '_', such as _class_name)")
        return cls(**{k: v for k, v in d.items() if k in valid})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads


UMT5_SIZES: dict[str, UMT5Config] = {
    "xxl": UMT5Config(),
    "tiny": UMT5Config(vocab_size=128, dim=32, dim_attn=32, dim_ffn=48, num_heads=4, encoder_layers=2),
}


def hf_config(config: UMT5Config, attn_implementation: str = ATTENTION) -> transformers.UMT5Config:
    """The transformers config computing what upstream's T5Encoder computes (encoder only, no cache)."""
    return transformers.UMT5Config(
        vocab_size=config.vocab_size, d_model=config.dim, d_kv=config.head_dim, d_ff=config.dim_ffn,
        num_layers=config.encoder_layers, num_heads=config.num_heads,
        relative_attention_num_buckets=config.num_buckets, relative_attention_max_distance=MAX_DISTANCE,
        feed_forward_proj="gated-gelu",  # -> gelu_new: the tanh approximation upstream writes out
        dropout_rate=config.dropout, layer_norm_epsilon=NORM_EPS,
        is_encoder_decoder=False, use_cache=False, attn_implementation=attn_implementation)


# ----------------------------------------------------------------------------- 2. key table

# official Wan name -> transformers UMT5EncoderModel name(s); the embedding feeds two tied names
TOP_KEYS: dict[str, tuple[str, ...]] = {
    "token_embedding.weight": ("shared.weight", "encoder.embed_tokens.weight"),
    "norm.weight": ("encoder.final_layer_norm.weight",),
}
# per block {i}, in the official file order: layer.0 = self-attention sub-layer, layer.1 = feed-forward
BLOCK_KEYS: dict[str, str] = {
    "blocks.{i}.norm1.weight": "encoder.block.{i}.layer.0.layer_norm.weight",
    "blocks.{i}.attn.q.weight": "encoder.block.{i}.layer.0.SelfAttention.q.weight",
    "blocks.{i}.attn.k.weight": "encoder.block.{i}.layer.0.SelfAttention.k.weight",
    "blocks.{i}.attn.v.weight": "encoder.block.{i}.layer.0.SelfAttention.v.weight",
    "blocks.{i}.attn.o.weight": "encoder.block.{i}.layer.0.SelfAttention.o.weight",
    "blocks.{i}.norm2.weight": "encoder.block.{i}.layer.1.layer_norm.weight",
    "blocks.{i}.ffn.gate.0.weight": "encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight",  # gate: Linear, GELU
    "blocks.{i}.ffn.fc1.weight": "encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight",
    "blocks.{i}.ffn.fc2.weight": "encoder.block.{i}.layer.1.DenseReluDense.wo.weight",
    "blocks.{i}.pos_embedding.embedding.weight":
        "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight",  # [num_buckets, num_heads]
}


def official_key_map(config: UMT5Config) -> dict[str, tuple[str, ...]]:
    """Every official key of a checkpoint with this config -> its transformers name(s), in file order."""
    table = {"token_embedding.weight": TOP_KEYS["token_embedding.weight"]}
    for i in range(config.encoder_layers):
        table.update({ours.format(i=i): (theirs.format(i=i),) for ours, theirs in BLOCK_KEYS.items()})
    table["norm.weight"] = TOP_KEYS["norm.weight"]
    return table


def _first_few(keys: Sequence[str], shown: int = 3) -> str:
    text = ", ".join(keys[:shown])
    return text + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def to_hf_state_dict(state_dict: Mapping[str, Tensor], config: UMT5Config, label: str,
                     expected_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """Official state dict -> transformers names; missing, unexpected or mis-shaped keys: one CheckpointError line.

    `expected_shapes` are the transformers model's (from the meta-device build); `label` names the file."""
    table = official_key_map(config)
    missing = [k for k in table if k not in state_dict]
    unexpected = sorted(k for k in state_dict if k not in table)
    misshaped = [f"{k} {list(state_dict[k].shape)} (expected {list(expected_shapes[v[0]])})"
                 for k, v in table.items() if k in state_dict
                 and tuple(state_dict[k].shape) != tuple(expected_shapes[v[0]])]
    problems = [f"{len(keys)} {what} key(s): {_first_few(keys)}"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
    if problems:
        raise CheckpointError(f"{label}: does not fit the umT5 encoder {describe(config)} ({'; '.join(problems)}); "
                              f"pass the config the file was made with, or {REDOWNLOAD}")
    return {theirs: state_dict[ours] for ours, names in table.items() for theirs in names}


def to_official_state_dict(encoder: UMT5Encoder) -> dict[str, Tensor]:
    """The encoder's weights under the official names (the inverse of `to_hf_state_dict`)."""
    hf = encoder.model.state_dict()
    return {ours: hf[names[0]] for ours, names in official_key_map(encoder.config).items()}


def describe(config: UMT5Config) -> str:
    return (f"(dim {config.dim}, {config.num_heads} heads, {config.encoder_layers} layers, "
            f"vocab {config.vocab_size}, ffn {config.dim_ffn})")


# ----------------------------------------------------------------------------- 3. encoder

class UMT5Encoder(nn.Module):
    """Upstream `T5Encoder`: token ids [B, L] + mask [B, L] -> per-token features [B, L, dim]."""

    def __init__(self, config: UMT5Config, attn_implementation: str = ATTENTION) -> None:
        super().__init__()
        self.config = config
        self.model = transformers.UMT5EncoderModel(hf_config(config, attn_implementation))

    def hidden(self, ids: Tensor, mask: Tensor) -> Tensor:
        """`T5Encoder(ids, mask)`: the final norm's output; padding rows are not zeroed."""
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """`T5EncoderModel.encode` of SkyReels-V2: `T5Encoder(ids, mask) * mask[..., None]` (padding rows = 0)."""
        hidden = self.hidden(ids, mask)
        return hidden * mask[..., None].to(hidden.dtype)

    encode = forward

    def relative_buckets(self, length: int) -> Tensor:
        """Bucket of (query i, key j) [L, L]; the same in every layer (each layer has its own table)."""
        attention = self.model.encoder.block[0].layer[0].SelfAttention  # its bucket function is the forward's
        positions = torch.arange(length)
        return attention._relative_position_bucket(positions[None, :] - positions[:, None])


def encoder_from_official(state_dict: Mapping[str, Tensor], config: UMT5Config, dtype: torch.dtype | None = None,
                          device: str | torch.device = "cpu", attn_implementation: str = ATTENTION,
                          label: str = "umT5 state dict") -> UMT5Encoder:
    """Build on the meta device, map the official names strictly, then assign the tensors (cast, moved)."""
    with torch.device("meta"):
        encoder = UMT5Encoder(config, attn_implementation)
    expected = {k: tuple(v.shape) for k, v in encoder.model.state_dict().items()}
    tensors = to_hf_state_dict(state_dict, config, label, expected)
    tensors = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in tensors.items()}
    encoder.model.load_state_dict(tensors, strict=True, assign=True)
    # assign gives each name its own Parameter; tie them back so the embedding is stored once
    encoder.model.encoder.embed_tokens.weight = encoder.model.shared.weight
    return encoder.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- 4. weight files

def read_official_weights(path_or_url: str, storage_options: dict | None = None) -> dict[str, Tensor]:
    """The tensors of one weights file: `.safetensors`, else a torch state dict (`.pth`, weights_only).

    A folder is looked into for the official file name. URLs (s3://, memory://, ...) are copied
    to a temporary file first (torch.load needs a local file to memory-map 11 GB)."""
    return _read_weights(path_or_url, storage_options)[0]


def _read_weights(path_or_url: str, storage_options: dict | None) -> tuple[dict[str, Tensor], str]:
    """(tensors, the file as messages name it)."""
    fs, path = url_to_fs(path_or_url, **(storage_options or {}))
    label = path_or_url
    if fs.isdir(path):
        path, label = _join(path, WEIGHTS_FILE), _join(path_or_url, WEIGHTS_FILE)
    if not fs.isfile(path):
        raise CheckpointError(f"{label}: missing (the umT5 encoder weights, official name {WEIGHTS_FILE}, "
                              f"were looked for here); download it into the model folder or pass its path")
    if path.endswith(".safetensors"):
        return read_shard(fs, path, label=label), label
    return read_torch_weights(fs, path, label), label


def read_torch_weights(fs: AbstractFileSystem, path: str, label: str) -> dict[str, Tensor]:
    """A torch state-dict file read with weights_only (no code runs from it), memory-mapped.

    A remote file is copied to a temporary file first: torch.load memory-maps only local files,
    and mapped tensors stay valid after that file is unlinked (POSIX)."""
    if isinstance(fs, LocalFileSystem):
        return _torch_load(path, label)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, posixpath.basename(path))
        fs.get_file(path, local)
        return _torch_load(local, label)


def _torch_load(local_path: str, label: str) -> dict[str, Tensor]:
    """torch.load(weights_only=True), memory-mapped when the file format allows; a bad file: CheckpointError."""
    try:
        try:
            loaded = torch.load(local_path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            loaded = torch.load(local_path, map_location="cpu", weights_only=True)  # legacy format
    except Exception as err:  # noqa: BLE001 - unpickling errors have many types; all mean "bad file"
        reason = " ".join(str(err).split())[:120]
        raise CheckpointError(f"{label}: not a readable torch state dict ({type(err).__name__}: {reason}); "
                              f"{REDOWNLOAD}") from None
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise CheckpointError(f"{label}: expected a flat dict of tensor name -> tensor, found "
                              f"{type(loaded).__name__}; {REDOWNLOAD}")
    return dict(loaded)


def load_umt5_encoder(weights: str, config: UMT5Config | None = None, dtype: torch.dtype | None = torch.bfloat16,
                      device: str | torch.device = "cpu", storage_options: dict | None = None,
                      attn_implementation: str = ATTENTION) -> UMT5Encoder:
    """Load the encoder from its weights file or the model folder holding it (local path or fsspec URL).

    `config` defaults to the official XXL size; `dtype` None keeps the file's dtype (bf16 officially)."""
    config = config or UMT5Config.named("xxl")
    state_dict, label = _read_weights(weights, storage_options)
    return encoder_from_official(state_dict, config, dtype, device, attn_implementation, label=label)


# ----------------------------------------------------------------------------- 5. tokenizer

# config.json too: without a tokenizer_class in tokenizer_config.json (DeepFloyd's t5-v1_1-xxl),
# AutoTokenizer picks the class from config.json's model_type
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "config.json")
VOCAB_FILES = ("tokenizer.json", "spiece.model")  # one of them holds the vocabulary


def load_tokenizer(folder_or_url: str, storage_options: dict | None = None) -> Any:
    """A transformers tokenizer from a local folder or fsspec URL (copied to a temporary folder), offline.

    Only the tokenizer files are copied, so a folder that also holds model weights is fine."""
    fs, root = url_to_fs(folder_or_url, **(storage_options or {}))
    if not fs.isdir(root):
        raise CheckpointError(f"{folder_or_url}: tokenizer folder missing (looked for {' or '.join(VOCAB_FILES)} "
                              f"there); download the tokenizer files into it or pass its path")
    present = [name for name in TOKENIZER_FILES if fs.isfile(_join(root, name))]
    if not any(name in present for name in VOCAB_FILES):
        raise CheckpointError(f"{_join(folder_or_url, VOCAB_FILES[0])} (or {VOCAB_FILES[1]}): missing; the tokenizer "
                              f"folder {folder_or_url} holds no vocabulary file; download the tokenizer files into it")
    if isinstance(fs, LocalFileSystem):
        return _tokenizer_from_local(root, folder_or_url)
    with tempfile.TemporaryDirectory() as tmp:
        for name in present:
            fs.get_file(_join(root, name), os.path.join(tmp, name))
        return _tokenizer_from_local(tmp, folder_or_url)


def _tokenizer_from_local(folder: str, label: str) -> Any:
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - transformers raises many types for a bad folder
        reason = " ".join(str(err).split())[:160]
        raise CheckpointError(f"{label}: not a loadable tokenizer folder ({type(err).__name__}: {reason}); "
                              f"{REDOWNLOAD}") from None


def clean_prompt(text: str) -> str:
    """Upstream's clean="whitespace": ftfy fix, HTML unescape twice, then collapse whitespace."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip()


# ----------------------------------------------------------------------------- 6. prompts -> context

class UMT5TextEncoder(nn.Module):
    """Prompts -> context [B, text_len, dim] as SkyReels-V2's `T5EncoderModel.encode` (padding rows 0)."""

    def __init__(self, encoder: UMT5Encoder, tokenizer: Any, text_len: int = TEXT_LEN) -> None:
        super().__init__()
        if text_len < 1:
            raise ValueError(f"text_len must be a positive token count (upstream: {TEXT_LEN}); got {text_len}")
        self.encoder, self.tokenizer, self.text_len = encoder, tokenizer, text_len

    @property
    def text_dim(self) -> int:
        return self.encoder.config.dim

    def tokenize(self, prompts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """ids and mask [B, text_len] int64: cleaned, `</s>` appended, truncated and padded with 0."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tokens = self.tokenizer([clean_prompt(p) for p in prompts], padding="max_length", truncation=True,
                                max_length=self.text_len, add_special_tokens=True, return_tensors="pt")
        return tokens["input_ids"], tokens["attention_mask"]

    @torch.no_grad()
    def forward(self, prompts: str | Sequence[str]) -> Tensor:
        ids, mask = self.tokenize(prompts)
        device = self.encoder.model.shared.weight.device
        return self.encoder(ids.to(device), mask.to(device))

    encode = forward


def load_text_encoder(model_dir: str | None = None, *, weights: str | None = None, tokenizer: str | None = None,
                      config: UMT5Config | None = None, text_len: int = TEXT_LEN,
                      dtype: torch.dtype | None = torch.bfloat16, device: str | torch.device = "cpu",
                      storage_options: dict | None = None, attn_implementation: str = ATTENTION) -> UMT5TextEncoder:
    """The SkyReels-V2 text encoder from its model folder (local path or fsspec URL).

    Official layout: `<model_dir>/models_t5_umt5-xxl-enc-bf16.pth` and `<model_dir>/google/umt5-xxl/`;
    `weights` / `tokenizer` override either path. Production dtype is bf16 (upstream casts to it)."""
    if model_dir is None and (weights is None or tokenizer is None):
        raise ValueError("pass model_dir (the SkyReels-V2 model folder), or both weights= and tokenizer=")
    weights = weights or _join(model_dir, WEIGHTS_FILE)
    tokenizer = tokenizer or _join(model_dir, TOKENIZER_DIR)
    loaded_tokenizer = load_tokenizer(tokenizer, storage_options)  # small: fail fast before 11 GB of weights
    encoder = load_umt5_encoder(weights, config, dtype, device, storage_options, attn_implementation)
    return UMT5TextEncoder(encoder, loaded_tokenizer, text_len)


def _join(root: str, name: str) -> str:
    return f"{str(root).rstrip('/')}/{name}"


__all__ = ["TEXT_LEN", "TOKENIZER_DIR", "WEIGHTS_FILE", "UMT5Config", "UMT5Encoder", "UMT5TextEncoder",
           "clean_prompt", "encoder_from_official", "load_text_encoder", "load_tokenizer", "load_umt5_encoder",
           "official_key_map", "read_official_weights", "read_torch_weights", "to_hf_state_dict",
           "to_official_state_dict"]
