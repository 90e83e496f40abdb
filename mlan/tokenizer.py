"""Tokenizers: the built-in offline Llama-3 tokenizer, or any Hugging Face tokenizer / processor.

`load_tokenizer("llama3")` converts `llama_models/llama3/tokenizer.model` (tiktoken BPE ranks) with
transformers' `TikTokenConverter` once, caches the result as a `tokenizer.json` folder under `$MLAN_CACHE`
(default `~/.cache/mlan`) and loads it from there afterwards. No network is ever needed.

Special tokens follow `llama_models/llama3/tokenizer.py` (ids 128000..128255), with one change: llama_models
calls 128011 `<|image|>`, but Hugging Face's Llama-3.2-Vision (and mlan) put `<|image|>` at 128256, after the
256 specials. 128011 is therefore renamed to the otherwise unused `<|reserved_special_token_246|>`.

Any other tokenizer (a folder, a hub id, or a named offline base such as `smollm2-135m-instruct`, see
`mlan.pretrained`) gains the image token `<|image|>` as an added special token after its vocabulary when it has
neither `<|image|>` nor `<image>`, and its chat template learns content lists of text and image parts
(`with_image_token`). Nothing here assumes Llama-3 ids.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import tiktoken
from llama_models import llama3
from tiktoken.load import load_tiktoken_bpe
from tokenizers import AddedToken, processors
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

from mlan.pretrained import resolve_model_path

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_RESERVED_SPECIAL = 256
IMAGE_TOKEN = "<|image|>"
BOS_TOKEN, EOS_TOKEN, EOT_TOKEN, PAD_TOKEN = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"

# The Llama-3 chat template as shipped with Meta-Llama-3-8B-Instruct (BOS first, content trimmed), extended
# like Llama-3.2-Vision's to content lists of text and image parts (an image part renders as <|image|>).
LLAMA3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.index0 == 0 -%}{{ bos_token }}{%- endif -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- set ns = namespace(text='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set ns.text = ns.text + '<|image|>' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{{ ns.text | trim }}"
    "{%- endif -%}"
    "{{ '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}"
)

_CACHE_FORMAT = "2"  # bump when the conversion below changes

IMAGE_TOKEN_CANDIDATES = ("<|image|>", "<image>")  # Llama-3.2-Vision / mlan's llama3, then LLaVA's

# Put in front of a chat template written for string contents only (e.g. ChatML's `'\n' + message['content']`):
# it rewrites every content list of text and image parts into one string (an image part → the image token),
# so the rest of the template renders image documents unchanged. List concatenation, not .append: transformers
# renders templates in an immutable sandbox.
_CONTENT_LIST_PREAMBLE = (
    "{%- set _mlan = namespace(msgs=[]) -%}"
    "{%- for _m in messages -%}"
    "{%- if _m['content'] is string -%}{%- set _mlan.msgs = _mlan.msgs + [_m] -%}"
    "{%- else -%}{%- set _t = namespace(s='') -%}"
    "{%- for _p in _m['content'] -%}"
    "{%- if _p['type'] == 'image' -%}{%- set _t.s = _t.s + 'IMAGE_TOKEN' -%}"
    "{%- elif _p['type'] == 'text' -%}{%- set _t.s = _t.s + _p['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set _mlan.msgs = _mlan.msgs + [{'role': _m['role'], 'content': _t.s}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = _mlan.msgs -%}"
)


def llama3_model_file() -> Path:
    """The tiktoken rank file shipped inside the `llama-models` package."""
    path = Path(llama3.__file__).parent / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"llama-models is installed but has no {path}")
    return path


def llama3_special_tokens() -> list[str]:
    """The 256 Llama-3 special tokens in id order (128000..128255), named as llama_models names them."""
    named = [
        BOS_TOKEN,
        EOS_TOKEN,
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        PAD_TOKEN,
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",  # end of message
        EOT_TOKEN,  # end of turn
        "<|python_tag|>",
        # llama_models: "<|image|>"; moved to 128256, see the module docstring
        f"<|reserved_special_token_{NUM_RESERVED_SPECIAL - 10}|>",
    ]
    reserved = [f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_RESERVED_SPECIAL - len(named))]
    return named + reserved


def cache_dir() -> Path:
    return Path(os.environ.get("MLAN_CACHE") or Path.home() / ".cache" / "mlan")


def _convert_llama3(model_file: Path, out_dir: Path) -> None:
    """tokenizer.model → a saved PreTrainedTokenizerFast folder (slow: ~tens of seconds, done once)."""
    backend = TikTokenConverter(vocab_file=str(model_file), pattern=LLAMA3_PATTERN).converted()
    base = backend.get_vocab_size()
    specials = llama3_special_tokens() + [IMAGE_TOKEN]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    for i, t in enumerate(specials):
        if backend.token_to_id(t) != base + i:
            raise RuntimeError(f"special token {t} got id {backend.token_to_id(t)}, expected {base + i}")
    bos_id = backend.token_to_id(BOS_TOKEN)
    # Like the Hub's Llama-3 tokenizers: BOS is prepended when add_special_tokens=True.
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN}:0 $A:0",
                pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
                special_tokens=[(BOS_TOKEN, bos_id)],
            ),
        ]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOT_TOKEN,  # instruct models stop on end-of-turn
        pad_token=PAD_TOKEN,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    tok.chat_template = LLAMA3_CHAT_TEMPLATE
    tok.save_pretrained(str(out_dir))


def _llama3_cached_dir() -> Path:
    """Convert once per (rank file, format) and publish atomically, so concurrent converters never clash."""
    model_file = llama3_model_file()
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()[:16]
    final = cache_dir() / "tokenizers" / f"llama3-{digest}-v{_CACHE_FORMAT}"
    if (final / "tokenizer.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        _convert_llama3(model_file, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other
        try:
            os.rename(tmp, final)  # atomic; fails if another process published first
        except OSError:
            if not (final / "tokenizer.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def with_image_token(tok):
    """`tok` itself when it has an image token; else `<|image|>` is added as a special token after its vocabulary
    (id = len(tok) before) and a string-content chat template is taught content lists (see the preamble)."""
    vocab = tok.get_vocab()
    if any(t in vocab for t in IMAGE_TOKEN_CANDIDATES):
        return tok
    tok.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    template = tok.chat_template
    if isinstance(template, str) and "'image'" not in template and '"image"' not in template:
        tok.chat_template = _CONTENT_LIST_PREAMBLE.replace("IMAGE_TOKEN", IMAGE_TOKEN) + template
    return tok


@lru_cache(maxsize=8)
def _load_cached(name_or_path: str) -> PreTrainedTokenizerFast:
    if name_or_path == "llama3":
        return PreTrainedTokenizerFast.from_pretrained(str(_llama3_cached_dir()))
    # lazy: AutoTokenizer costs ~1.1 s more (it loads torch), which the offline llama3 path never needs
    from transformers import AutoTokenizer

    name_or_path = resolve_model_path(name_or_path)  # a named offline base → its converted folder

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError) as tok_err:
        # a processor folder / id whose tokenizer is only reachable through the processor
        from transformers import AutoProcessor  # lazy: ~5 s of start-up, for the rare processor-only folder

        try:
            tok = getattr(AutoProcessor.from_pretrained(name_or_path), "tokenizer", None)
        except (OSError, ValueError, KeyError):
            tok = None
        if tok is None:
            raise ValueError(f"cannot load a tokenizer from {name_or_path!r}: {tok_err}") from tok_err
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"tokenizer {name_or_path!r} has no fast (Rust) implementation; mlan needs one")
    return with_image_token(tok)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerFast:
    """`"llama3"` → the offline Llama-3 tokenizer; a named offline base (`mlan.pretrained`) → its converted
    folder's; anything else → a local path or hub id via transformers. Every one has an image token.

    Returned objects are shared per process (cached); do not mutate them.
    """
    return _load_cached(str(name_or_path))


def tokenizer_fingerprint(tok: PreTrainedTokenizerFast) -> str:
    """A content hash (vocab, merges, specials, chat template) for build cache keys; stable across processes."""
    cached = getattr(tok, "_mlan_fingerprint", None)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    h.update(tok.backend_tokenizer.to_str().encode())
    h.update(repr(sorted((k, str(v)) for k, v in tok.special_tokens_map.items())).encode())
    h.update((tok.chat_template if isinstance(tok.chat_template, str) else repr(tok.chat_template)).encode())
    fp = h.hexdigest()[:16]
    try:
        tok._mlan_fingerprint = fp
    except AttributeError:
        pass
    return fp


@lru_cache(maxsize=1)
def llama3_tiktoken():
    """tiktoken over the same rank file and pattern: the same ids for ordinary text, ~4x faster per core."""
    ranks = load_tiktoken_bpe(str(llama3_model_file()))
    return tiktoken.Encoding(name="mlan-llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})


def is_offline_llama3(tok: PreTrainedTokenizerFast) -> bool:
    """True when `tok` is (a copy of) the offline llama3 tokenizer, so `llama3_tiktoken` gives its ids."""
    if getattr(tok, "_mlan_is_llama3", None) is None:
        same = (
            len(tok) == 128257  # cheap checks first: no conversion for tokenizers that cannot be it
            and tok.convert_ids_to_tokens(128256) == IMAGE_TOKEN
            and tokenizer_fingerprint(tok) == tokenizer_fingerprint(load_tokenizer("llama3"))
        )
        try:
            tok._mlan_is_llama3 = same
        except AttributeError:
            return same
    return tok._mlan_is_llama3
