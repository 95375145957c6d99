"""Text encoders: SkyReels-V2's umT5 (pipelines/wan/umt5.py) and MAGI-1's T5 (pipelines/magi1/t5.py).

Tiny random models and tokenizers built in tmp (a `tokenizers` WordLevel tokenizer.json, or a
sentencepiece model trained here): no hub, no network. The umT5 numerics are checked against the
upstream goldens in tests/parity/test_wan_umt5.py; the MAGI-1 encoder is transformers' own
T5EncoderModel, so it is checked against `T5EncoderModel.from_pretrained` on the same files.
"""
from __future__ import annotations

import io
import json
import shutil
import socket
from pathlib import Path

import fsspec
import pytest
import sentencepiece
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from pipelines.magi1 import t5 as magi_t5
from pipelines.skyreels_v2.checkpoint import CheckpointError
from pipelines.wan import umt5

TINY = umt5.UMT5Config.named("tiny")
WORDS = ["a", "red", "fox", "jumps", "over", "the", "lazy", "dog", "cat", "&", "schön", "video", "city"]
PAD, EOS, UNK = 0, 1, 2
CORPUS = ["a red fox jumps over the lazy dog", "the quick brown cat sleeps", "a video of a city at night",
          "waves on the beach under a blue sky"] * 20


# ----------------------------------------------------------------------------- builders

def write_wordlevel_tokenizer(folder: Path) -> dict[str, int]:
    """A T5-like tokenizer.json: whitespace words, <pad>=0, </s>=1 appended, <unk>=2."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<pad>": PAD, "</s>": EOS, "<unk>": UNK} | {w: i + 3 for i, w in enumerate(WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS)])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return vocab


def write_sentencepiece_tokenizer(folder: Path) -> None:
    """spiece.model + tokenizer_config.json: the layout of DeepFloyd's t5-v1_1-xxl tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=60, model_type="unigram",
        pad_id=PAD, eos_id=EOS, unk_id=UNK, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    (folder / "spiece.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0}))


def random_umt5(seed: int = 0) -> umt5.UMT5Encoder:
    torch.manual_seed(seed)
    return umt5.UMT5Encoder(TINY).eval()


def write_wan_model_dir(folder: Path, encoder: umt5.UMT5Encoder) -> Path:
    """The official SkyReels-V2 layout: the .pth (bf16 like the release) and google/umt5-xxl/."""
    folder.mkdir(parents=True, exist_ok=True)
    official = {k: v.to(torch.bfloat16) for k, v in umt5.to_official_state_dict(encoder).items()}
    torch.save(official, folder / umt5.WEIGHTS_FILE)
    write_wordlevel_tokenizer(folder / umt5.TOKENIZER_DIR)
    return folder


def tiny_t5_config(**overrides) -> transformers.T5Config:
    fields = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                  feed_forward_proj="gated-gelu", is_encoder_decoder=False) | overrides
    return transformers.T5Config(**fields)


def random_t5(seed: int = 0) -> transformers.T5EncoderModel:
    torch.manual_seed(seed)
    return transformers.T5EncoderModel(tiny_t5_config(attn_implementation="eager")).eval()


def copy_to_memory(folder: Path, url: str) -> str:
    """Copy a local folder tree to an fsspec memory:// URL."""
    fs = fsspec.filesystem("memory")
    for path in folder.rglob("*"):
        if path.is_file():
            fs.pipe_file(f"{url}/{path.relative_to(folder).as_posix()}", path.read_bytes())
    return url


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory) -> tuple[Path, umt5.UMT5Encoder]:
    encoder = random_umt5()
    return write_wan_model_dir(tmp_path_factory.mktemp("skyreels") / "model", encoder), encoder


@pytest.fixture(scope="module")
def magi_dir(tmp_path_factory) -> tuple[Path, transformers.T5EncoderModel]:
    """A t5-v1_1-xxl folder as upstream reads it: config.json, model.safetensors, spiece.model."""
    model = random_t5()
    folder = tmp_path_factory.mktemp("magi") / "t5-v1_1-xxl"
    model.save_pretrained(folder)
    write_sentencepiece_tokenizer(folder)
    return folder, model


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection fails: loading must read local files / fsspec URLs only."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("a text encoder tried to open a network connection")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ----------------------------------------------------------------------------- umT5: config and keys

def test_umt5_config_from_golden_style_dict():
    config = umt5.UMT5Config.from_dict({"_class_name": "T5Encoder", "vocab_size": 96, "dim": 32, "dim_attn": 32,
                                        "dim_ffn": 48, "num_heads": 4, "encoder_layers": 2, "num_buckets": 32,
                                        "shared_pos": False, "dropout": 0.1, "decoder_layers": 2})
    assert (config.head_dim, config.encoder_layers) == (8, 2)
    assert umt5.UMT5Config.named("xxl") == umt5.UMT5Config()
    assert umt5.UMT5Config.named("xxl").to_dict()["vocab_size"] == 256384


@pytest.mark.parametrize("fields, message", [
    ({"heads": 4}, "unknown UMT5Config field"),
    ({"dim_attn": 30, "num_heads": 4}, "must divide by num_heads"),
    ({"shared_pos": True}, "shared_pos=True"),
    ({"dim": 0}, "positive integer (XXL: 4096)"),
])
def test_umt5_config_errors_say_what_to_fix(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        umt5.UMT5Config.from_dict(fields)


def test_key_table_is_literal_and_complete():
    table = umt5.official_key_map(TINY)
    assert table["token_embedding.weight"] == ("shared.weight", "encoder.embed_tokens.weight")
    assert table["blocks.1.ffn.gate.0.weight"] == ("encoder.block.1.layer.1.DenseReluDense.wi_0.weight",)
    assert table["blocks.0.pos_embedding.embedding.weight"] == (
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",)
    assert len(table) == 2 + 10 * TINY.encoder_layers
    targets = {name for names in table.values() for name in names}
    assert targets == set(random_umt5().model.state_dict())


def test_official_state_dict_round_trips():
    encoder = random_umt5()
    official = umt5.to_official_state_dict(encoder)
    again = umt5.encoder_from_official(official, TINY, dtype=torch.float32)
    ids, mask = torch.tensor([[5, 6, 7, EOS, PAD]]), torch.tensor([[1, 1, 1, 1, 0]])
    torch.testing.assert_close(again(ids, mask), encoder(ids, mask), atol=0, rtol=0)


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("blocks.1.ffn.fc2.weight"), "1 missing key(s): blocks.1.ffn.fc2.weight"),
    (lambda sd: sd.update({"blocks.0.attn.q.bias": torch.zeros(32)}), "1 unexpected key(s): blocks.0.attn.q.bias"),
    (lambda sd: sd.update({"norm.weight": torch.ones(31)}), "1 mis-shaped key(s): norm.weight [31] (expected [32])"),
])
def test_strict_key_check_names_the_file_and_keys(edit, message):
    state_dict = umt5.to_official_state_dict(random_umt5())
    edit(state_dict)
    with pytest.raises(CheckpointError) as err:
        umt5.encoder_from_official(state_dict, TINY, label="/ckpt/models_t5_umt5-xxl-enc-bf16.pth")
    text = str(err.value)
    assert "\n" not in text and text.startswith("/ckpt/models_t5_umt5-xxl-enc-bf16.pth: ") and message in text


def test_wrong_config_is_a_key_error_not_a_crash():
    state_dict = umt5.to_official_state_dict(random_umt5())
    three_layers = umt5.UMT5Config.from_dict(TINY.to_dict() | {"encoder_layers": 3})
    with pytest.raises(CheckpointError, match="10 missing key"):
        umt5.encoder_from_official(state_dict, three_layers)


# ----------------------------------------------------------------------------- umT5: prompts

def test_clean_prompt_is_upstreams_whitespace_cleaning():
    assert umt5.clean_prompt("  a \t red\n\nfox  ") == "a red fox"
    assert umt5.clean_prompt("cat &amp;amp; dog") == "cat & dog"    # unescaped twice
    assert umt5.clean_prompt("schÃ¶n") == "schön"                    # ftfy repairs mojibake
    assert umt5.clean_prompt("Keeps Case, punctuation!") == "Keeps Case, punctuation!"


def test_tokenize_pads_truncates_and_appends_eos(tmp_path):
    vocab = write_wordlevel_tokenizer(tmp_path / "tok")
    encoder = umt5.UMT5TextEncoder(random_umt5(), umt5.load_tokenizer(str(tmp_path / "tok")), text_len=6)
    ids, mask = encoder.tokenize(["a  red\tfox", "the lazy dog jumps over the red fox", "", "zebra"])
    assert ids.shape == mask.shape == (4, 6) and ids.dtype == mask.dtype == torch.int64
    assert ids[0].tolist() == [vocab["a"], vocab["red"], vocab["fox"], EOS, PAD, PAD]
    assert mask[0].tolist() == [1, 1, 1, 1, 0, 0]
    assert ids[1].tolist()[-1] == EOS and mask[1].all()                  # truncated, </s> kept last
    assert ids[2].tolist() == [EOS] + [PAD] * 5                          # empty prompt: just </s>
    assert ids[3].tolist()[:2] == [UNK, EOS]


def test_encode_zeroes_padding_and_matches_encoder(tmp_path):
    write_wordlevel_tokenizer(tmp_path / "tok")
    encoder = random_umt5()
    text = umt5.UMT5TextEncoder(encoder, umt5.load_tokenizer(str(tmp_path / "tok")), text_len=8)
    prompts = ["a red fox", "the lazy dog jumps over the cat"]
    context = text(prompts)
    assert context.shape == (2, 8, TINY.dim) and text.text_dim == TINY.dim and text.text_len == 8
    ids, mask = text.tokenize(prompts)
    assert torch.equal(context[0, 4:], torch.zeros(4, TINY.dim))        # 3 words + </s>, then zeros
    assert context[0, :4].abs().sum(-1).gt(0).all()
    torch.testing.assert_close(context, encoder(ids, mask))
    torch.testing.assert_close(context[:1], text(prompts[0]))           # batching does not mix prompts


def test_load_text_encoder_official_layout_bf16(wan_dir, no_network):
    folder, reference = wan_dir
    text = umt5.load_text_encoder(str(folder), config=TINY)              # production default: bf16
    assert {p.dtype for p in text.parameters()} == {torch.bfloat16}
    context = text(["a red fox", "video of a city"])
    assert context.dtype == torch.bfloat16 and context.shape == (2, umt5.TEXT_LEN, TINY.dim)
    fp32 = umt5.load_text_encoder(str(folder), config=TINY, dtype=torch.float32)(["a red fox", "video of a city"])
    torch.testing.assert_close(context.float(), fp32, atol=0.1, rtol=0.05)
    # the .pth was written from bf16-rounded weights: the fp32 load reproduces that model exactly
    rounded = umt5.encoder_from_official({k: v.bfloat16().float() for k, v in
                                          umt5.to_official_state_dict(reference).items()}, TINY)
    ids, mask = text.tokenize(["a red fox", "video of a city"])
    torch.testing.assert_close(fp32, rounded.float()(ids, mask), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_load_text_encoder_from_url(wan_dir, scheme, no_network):
    folder, _ = wan_dir
    url = f"file://{folder}" if scheme == "file" else copy_to_memory(folder, "memory://umt5-test/model")
    from_url = umt5.load_text_encoder(url, config=TINY, dtype=torch.float32)
    local = umt5.load_text_encoder(str(folder), config=TINY, dtype=torch.float32)
    torch.testing.assert_close(from_url(["the red dog"]), local(["the red dog"]), atol=0, rtol=0)


def test_weights_as_safetensors_and_explicit_paths(tmp_path):
    from safetensors.torch import save_file
    encoder = random_umt5(1)
    save_file(umt5.to_official_state_dict(encoder), str(tmp_path / "umt5.safetensors"))
    write_wordlevel_tokenizer(tmp_path / "tok")
    text = umt5.load_text_encoder(weights=str(tmp_path / "umt5.safetensors"), tokenizer=str(tmp_path / "tok"),
                                  config=TINY, dtype=None, text_len=10)
    ids, mask = text.tokenize(["a cat"])
    torch.testing.assert_close(text(["a cat"]), encoder(ids, mask), atol=0, rtol=0)


def test_sentencepiece_tokenizer_folder(tmp_path):
    write_sentencepiece_tokenizer(tmp_path / "spm")
    text = umt5.UMT5TextEncoder(random_umt5(), umt5.load_tokenizer(str(tmp_path / "spm")), text_len=16)
    ids, mask = text.tokenize("a red fox jumps")
    n = int(mask.sum())
    assert ids[0, n - 1] == EOS and ids[0, n:].eq(PAD).all() and 2 < n < 16
    assert text("a red fox jumps").shape == (1, 16, TINY.dim)


def test_tokenizer_class_from_config_json_also_over_urls(tmp_path):
    """A tokenizer_config.json naming no class: the class comes from config.json, local or remote."""
    write_sentencepiece_tokenizer(tmp_path / "t5")
    (tmp_path / "t5" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    (tmp_path / "t5" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    for source in (str(tmp_path / "t5"), copy_to_memory(tmp_path / "t5", "memory://tokenizer-test/t5")):
        tokenizer = umt5.load_tokenizer(source)
        assert isinstance(tokenizer, transformers.T5Tokenizer) and tokenizer("a red fox").input_ids[-1] == EOS


def test_missing_weights_file_is_named(tmp_path):
    write_wordlevel_tokenizer(tmp_path / "model" / umt5.TOKENIZER_DIR)
    with pytest.raises(CheckpointError) as err:
        umt5.load_text_encoder(str(tmp_path / "model"), config=TINY)
    assert str(err.value).startswith(f"{tmp_path / 'model'}/{umt5.WEIGHTS_FILE}: missing")


def test_missing_tokenizer_is_named(wan_dir, tmp_path):
    folder, _ = wan_dir
    bare = tmp_path / "model"
    bare.mkdir()
    shutil.copy(folder / umt5.WEIGHTS_FILE, bare / umt5.WEIGHTS_FILE)
    with pytest.raises(CheckpointError) as err:
        umt5.load_text_encoder(str(bare), config=TINY)
    assert str(err.value).startswith(f"{bare}/google/umt5-xxl: tokenizer folder missing")
    (bare / umt5.TOKENIZER_DIR).mkdir(parents=True)
    (bare / umt5.TOKENIZER_DIR / "tokenizer_config.json").write_text("{}")
    with pytest.raises(CheckpointError) as err:
        umt5.load_text_encoder(str(bare), config=TINY)
    assert str(err.value).startswith(f"{bare}/google/umt5-xxl/tokenizer.json (or spiece.model): missing")


def test_unreadable_weights_file(tmp_path):
    (tmp_path / umt5.WEIGHTS_FILE).write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="not a readable torch state dict"):
        umt5.load_umt5_encoder(str(tmp_path), TINY)
    torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / umt5.WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match="expected a flat dict of tensor name -> tensor"):
        umt5.load_umt5_encoder(str(tmp_path), TINY)


# ----------------------------------------------------------------------------- MAGI-1: caption cleaning

@pytest.mark.parametrize("caption, cleaned", [
    ("A Red  FOX", "a red fox"),                                            # lower case, whitespace
    ("a <b>cute</b> cat", "a cute cat"),                                    # HTML tags
    ("see https://example.com/cat.png now", "see now"),                     # URLs (two passes)
    ("这是一只猫 a cat", "a cat"),                                            # CJK ideographs removed
    ("1+1%3D2", "1 1=2"),                                                   # unquote_plus: '+' is a space
    ("a dog—running – fast", "a dog-running - fast"),                       # every dash -> '-'
    ("“quoted”", "quoted"),                                                 # curly quotes, then stripped
    ("this-is-my-cute-cat", "this is my cute cat"),                         # slugs (> 3 separators)
    ("red-eyed tree-frog", "red-eyed tree-frog"),                           # ... but not ordinary hyphens
    ("hello @someone #12 #123456 ok", "hello ok"),                          # nicknames, hashtags
    ("free shipping download free photo 1920x1080 page 3", "photo"),       # spam words, sizes, pages
    ("model jc6640 and h264", "model and"),                                 # letter+digit codes
    ("cat &amp; dog", "cat dog"),                                           # &amp, then bad punctuation
    ("~~ *stars* | and (parens) ~~", "stars and parens"),                   # bad punctuation
])
def test_clean_caption_twice(caption, cleaned):
    assert magi_t5.preprocess_caption(caption) == cleaned


def test_second_cleaning_pass_matters():
    once = magi_t5.clean_caption("visit https://example.com/x.png now")
    assert once == "visit . now"                                            # upstream cleans twice for this
    assert magi_t5.preprocess_caption("visit https://example.com/x.png now") == "visit now"


def test_html_to_text_keeps_plain_text():
    assert magi_t5.html_to_text("a < b and c > d") == "a < b and c > d"
    assert magi_t5.html_to_text("x<!-- note -->y &lt;3") == "xy <3"


# ----------------------------------------------------------------------------- MAGI-1: model and tokenizer

def run(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


IDS = torch.tensor([[7, 9, 11, 3, 1, 0, 0, 0], [4, 5, 6, 7, 8, 9, 10, 1]])
MASK = (torch.arange(8)[None] < torch.tensor([[5], [8]])).long()


def test_magi_encoder_matches_transformers_from_pretrained(magi_dir, no_network):
    folder, original = magi_dir
    ours = magi_t5.load_t5_encoder(str(folder))
    theirs = transformers.T5EncoderModel.from_pretrained(str(folder), local_files_only=True,
                                                         attn_implementation="eager").eval()
    assert {p.dtype for p in ours.parameters()} == {torch.float32}        # fp32, as upstream
    assert ours.encoder.embed_tokens.weight is ours.shared.weight
    torch.testing.assert_close(run(ours, IDS, MASK), run(theirs, IDS, MASK), atol=0, rtol=0)
    torch.testing.assert_close(run(ours, IDS, MASK), run(original, IDS, MASK), atol=0, rtol=0)


@pytest.mark.parametrize("layout", ["pytorch_model.bin", "sharded_safetensors", "sharded_bin", "full_seq2seq"])
def test_magi_weight_layouts(tmp_path, layout):
    original = random_t5(2)
    folder = tmp_path / "t5"
    folder.mkdir()
    (folder / "config.json").write_text(original.config.to_json_string())
    state_dict = dict(original.state_dict())                                # both tied names, like torch.save
    if layout == "pytorch_model.bin":
        torch.save(state_dict, folder / "pytorch_model.bin")
    elif layout.startswith("sharded"):
        from safetensors.torch import save_file
        suffix = "safetensors" if layout == "sharded_safetensors" else "bin"
        state_dict.pop("encoder.embed_tokens.weight")                       # safetensors keeps one tied name
        keys = sorted(state_dict)
        shards = {f"model-0000{i + 1}-of-00002.{suffix}": keys[i::2] for i in range(2)}
        for name, shard_keys in shards.items():
            shard = {k: state_dict[k].contiguous() for k in shard_keys}
            save_file(shard, str(folder / name)) if suffix == "safetensors" else torch.save(shard, folder / name)
        index = "model.safetensors.index.json" if suffix == "safetensors" else "pytorch_model.bin.index.json"
        (folder / index).write_text(json.dumps({"weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    else:                                                                    # an encoder-decoder checkpoint
        torch.manual_seed(2)
        full = transformers.T5ForConditionalGeneration(tiny_t5_config(is_encoder_decoder=True))
        full.encoder.load_state_dict(original.encoder.state_dict())
        full.shared.weight.data.copy_(original.shared.weight.data)
        full.save_pretrained(folder)
    ours = magi_t5.load_t5_encoder(str(folder))
    torch.testing.assert_close(run(ours, IDS, MASK), run(original, IDS, MASK), atol=0, rtol=0)


def test_magi_text_encoder_pads_truncates_and_keeps_padding_rows(magi_dir):
    folder, original = magi_dir
    text = magi_t5.load_text_encoder(str(folder), max_length=12)
    embeddings, mask = text(["A Red FOX jumps <b>over</b> the lazy dog", "a cat"])
    assert embeddings.shape == (2, 12, 32) and mask.shape == (2, 12) and mask.dtype == torch.int64
    ids, mask_again = text.tokenize(["A Red FOX jumps <b>over</b> the lazy dog", "a cat"])
    assert torch.equal(mask, mask_again) and mask[1].sum() < 12 and mask[1, -1] == 0
    assert ids[1, int(mask[1].sum()) - 1] == EOS and ids[1, int(mask[1].sum()):].eq(PAD).all()
    assert embeddings[1, -1].abs().sum() > 0                                # NOT multiplied by the mask
    torch.testing.assert_close(embeddings, run(original, ids, mask), atol=0, rtol=0)
    long_ids, long_mask = text.tokenize(" ".join(CORPUS))
    assert long_ids.shape == (1, 12) and long_mask.all() and long_ids[0, -1] == EOS   # truncated
    assert text.max_length == 12 and text.text_dim == 32
    assert magi_t5.CAPTION_MAX_LENGTH == 800 and magi_t5.MagiT5TextEncoder(original, None).max_length == 800


def test_magi_cleaning_applies_before_tokenizing(magi_dir):
    folder, _ = magi_dir
    cleaned = magi_t5.load_text_encoder(str(folder), max_length=24)
    raw = magi_t5.load_text_encoder(str(folder), max_length=24, clean=False)
    prompt = "A <i>RED</i> fox, see www.example.com"
    assert torch.equal(cleaned.tokenize(prompt)[0], raw.tokenize(magi_t5.preprocess_caption(prompt))[0])


def test_magi_upstream_parent_folder_and_memory_url(magi_dir, tmp_path, no_network):
    folder, original = magi_dir
    parent = tmp_path / "t5"                                                 # upstream: <t5_pretrained>/t5-v1_1-xxl
    shutil.copytree(folder, parent / "t5-v1_1-xxl")
    url = copy_to_memory(parent, "memory://magi-t5-test/t5")
    for source in (str(parent), url):
        embeddings, mask = magi_t5.load_text_encoder(source, max_length=10)("a red fox")
        torch.testing.assert_close(embeddings, run(original, *magi_t5.load_text_encoder(
            str(folder), max_length=10).tokenize("a red fox")), atol=0, rtol=0)


def test_magi_bf16_option_runs_on_cpu(magi_dir):
    folder, _ = magi_dir
    bf16 = magi_t5.load_text_encoder(str(folder), max_length=10, dtype=torch.bfloat16)
    fp32 = magi_t5.load_text_encoder(str(folder), max_length=10)
    embeddings, _ = bf16("a red fox")
    assert embeddings.dtype == torch.bfloat16
    torch.testing.assert_close(embeddings.float(), fp32("a red fox")[0], atol=0.1, rtol=0.05)


def test_magi_missing_files_are_named(magi_dir, tmp_path):
    folder, _ = magi_dir
    with pytest.raises(CheckpointError) as err:
        magi_t5.load_text_encoder(str(tmp_path / "nowhere"))
    assert str(err.value).startswith(f"{tmp_path / 'nowhere'}/config.json: missing (no such folder)")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as err:
        magi_t5.load_t5_encoder(str(broken))
    assert str(err.value).startswith(f"{broken}: no T5 weights (looked for model.safetensors, ")
    (broken / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"shared.weight": "a.bin"}}))
    with pytest.raises(CheckpointError) as err:
        magi_t5.load_t5_encoder(str(broken))
    assert str(err.value).startswith(f"{broken}/a.bin: missing (listed by pytorch_model.bin.index.json)")
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(folder, no_tokenizer)
    (no_tokenizer / "spiece.model").unlink()
    with pytest.raises(CheckpointError) as err:
        magi_t5.load_text_encoder(str(no_tokenizer))
    assert str(err.value).startswith(f"{no_tokenizer}/tokenizer.json (or spiece.model): missing")


def test_magi_strict_keys(magi_dir):
    _, original = magi_dir
    state_dict = dict(original.state_dict())
    state_dict.pop("encoder.block.1.layer.1.DenseReluDense.wo.weight")
    state_dict["encoder.block.0.layer.0.SelfAttention.q.bias"] = torch.zeros(32)
    with pytest.raises(CheckpointError) as err:
        magi_t5.encoder_from_state_dict(state_dict, tiny_t5_config(), label="/t5-v1_1-xxl")
    text = str(err.value)
    assert "\n" not in text and text.startswith("/t5-v1_1-xxl: the weights do not fit")
    assert "1 missing key(s): encoder.block.1.layer.1.DenseReluDense.wo.weight" in text
    assert "1 unexpected key(s): encoder.block.0.layer.0.SelfAttention.q.bias" in text


def test_magi_bad_config_is_one_line(magi_dir, tmp_path):
    folder, _ = magi_dir
    broken = tmp_path / "t5"
    shutil.copytree(folder, broken)
    (broken / "config.json").write_text(json.dumps({"d_model": "wide"}))
    with pytest.raises(CheckpointError) as err:
        magi_t5.load_t5_encoder(str(broken))
    assert str(err.value).startswith(f"{broken}/config.json: not a valid T5 config") and "\n" not in str(err.value)
