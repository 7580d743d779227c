"""Text: tokenizers (built-in bytes, or a local Hugging Face `tokenizers` file) and the token embedding.

Legend: B batch, L token slots (padded length), E embed dim.

`TextEncoder` maps token ids (B, L) to token vectors (B, L, E) plus a padding mask (B, L). It
adds no positional embedding: positions are applied inside the attention layers (rotary
embeddings on queries and keys), so the encoder output is position-free by design and a
token's vector depends only on its id.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from mmlongnet._config import check_field_types
from mmlongnet.modalities._common import (
    check_dropout,
    check_finite,
    check_lengths,
    check_positive_int,
    padding_mask,
)
from mmlongnet.pretrained import Pretrained

__all__ = ["ByteTokenizer", "HFTokenizer", "TextEncoder", "TextEncoderConfig"]


def _pad_batch(
    sequences: Sequence[list[int]], pad_id: int, max_length: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncate to `max_length`, then right-pad with `pad_id`: ids (B, L) long, lengths (B,) long."""
    if max_length is not None:
        check_positive_int("max_length", max_length)
        sequences = [seq[:max_length] for seq in sequences]
    lengths = torch.tensor([len(seq) for seq in sequences], dtype=torch.long)  # (B,)
    width = int(lengths.max()) if len(sequences) else 0
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # (B, L)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return ids, lengths


def _check_texts(texts: object) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise ValueError(f"text: batch_encode expects a list of str, got {type(texts).__name__}")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(
                f"text: batch_encode expects a list of str, item {index} is {type(text).__name__}"
            )
    return list(texts)


class ByteTokenizer:
    """Byte-level tokenizer built in (nothing to download): UTF-8 bytes shifted past three specials.

    Ids: pad = 0, bos = 1, eos = 2, byte b -> b + 3; vocabulary size 259. Every string
    round-trips exactly through `encode` / `decode`.

    Example::

        tok = ByteTokenizer()
        ids, lengths = tok.batch_encode(["hi", "héllo"])   # ids (2, 6), lengths tensor([2, 6])
    """

    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    offset: int = 3
    vocab_size: int = 256 + 3

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`: its UTF-8 bytes + 3, optionally wrapped in bos / eos."""
        if not isinstance(text, str):
            raise ValueError(f"text: encode expects a str, got {type(text).__name__}")
        ids = [byte + self.offset for byte in text.encode("utf-8")]
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """String of the byte ids in `ids`; specials are skipped, invalid UTF-8 becomes U+FFFD."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        data = bytearray()
        for token in ids:
            token = int(token)
            if not 0 <= token < self.vocab_size:
                raise ValueError(
                    f"text: token id {token} is outside the byte vocabulary [0, {self.vocab_size})"
                )
            if token >= self.offset:
                data.append(token - self.offset)
        return data.decode("utf-8", errors="replace")

    def batch_encode(
        self,
        texts: Sequence[str],
        max_length: int | None = None,
        *,
        add_bos: bool = False,
        add_eos: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode, truncate to `max_length` ids (specials included), right-pad with `pad_id`.

        Returns:
            ids: (B, L) long, L = the longest encoded text (0 for an empty batch).
            lengths: (B,) long, valid ids per text.
        """
        texts = _check_texts(texts)
        return _pad_batch(
            [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts], self.pad_id, max_length
        )


def _import_tokenizers():
    try:
        return importlib.import_module("tokenizers")
    except ImportError as err:
        raise ImportError(
            "text: HFTokenizer needs the Hugging Face `tokenizers` package; install it with "
            "`pip install tokenizers`, or use ByteTokenizer, which needs nothing"
        ) from err


class HFTokenizer:
    """A local Hugging Face `tokenizers` JSON file behind the `ByteTokenizer` interface.

    Loads `tokenizers.Tokenizer.from_file(path)`; nothing is downloaded. The file's own padding
    and truncation settings are switched off: `batch_encode` pads and truncates.

    Args:
        path: a `tokenizer.json` written by `tokenizers.Tokenizer.save`.
        pad_token: the padding token's string. None looks for the pad id in the file's padding
            settings, then for one of "[PAD]", "<pad>", "<|pad|>" in the vocabulary.
    """

    _PAD_CANDIDATES = ("[PAD]", "<pad>", "<|pad|>")

    def __init__(self, path: str | Path, *, pad_token: str | None = None) -> None:
        tokenizers = _import_tokenizers()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"text: tokenizer file {str(path)!r} does not exist; pass a local tokenizer.json"
            )
        self._tokenizer = tokenizers.Tokenizer.from_file(str(path))
        file_padding = self._tokenizer.padding
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self.pad_id = self._resolve_pad_id(pad_token, file_padding)
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

    def _resolve_pad_id(self, pad_token: str | None, file_padding: dict | None) -> int:
        if pad_token is not None:
            pad_id = self._tokenizer.token_to_id(pad_token)
            if pad_id is None:
                raise ValueError(f"text: pad_token {pad_token!r} is not in the tokenizer's vocabulary")
            return pad_id
        if file_padding is not None and file_padding.get("pad_id") is not None:
            return int(file_padding["pad_id"])
        for candidate in self._PAD_CANDIDATES:
            pad_id = self._tokenizer.token_to_id(candidate)
            if pad_id is not None:
                return pad_id
        raise ValueError(
            f"text: the tokenizer has no padding token among {self._PAD_CANDIDATES} and no padding "
            "settings; pass pad_token='...' naming one of its tokens"
        )

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; `add_special_tokens` applies the file's post-processor (e.g. bos/eos)."""
        if not isinstance(text, str):
            raise ValueError(f"text: encode expects a str, got {type(text).__name__}")
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """String of `ids`, special tokens and padding skipped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        ids = [int(token) for token in ids]
        for token in ids:
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"text: token id {token} is outside the vocabulary [0, {self.vocab_size})")
        return self._tokenizer.decode([t for t in ids if t != self.pad_id], skip_special_tokens=True)

    def batch_encode(
        self, texts: Sequence[str], max_length: int | None = None, *, add_special_tokens: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode, truncate to `max_length` ids, right-pad with `pad_id`.

        Returns:
            ids: (B, L) long; lengths: (B,) long.
        """
        texts = _check_texts(texts)
        encoded = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        return _pad_batch(encoded, self.pad_id, max_length)


@dataclass
class TextEncoderConfig:
    """Token embedding of the text encoder."""

    embed_dim: int = 512
    """E, width of the output tokens."""
    vocab_size: int = ByteTokenizer.vocab_size
    """Number of token ids; 259 fits `ByteTokenizer`, use the tokenizer's `vocab_size` otherwise."""
    max_length: int | None = None
    """Longest accepted sequence (L); None accepts any length."""
    dropout: float = 0.0
    """Dropout on the embeddings, in [0, 1)."""
    padding_id: int = 0
    """Id whose embedding is zero and receives no gradient (the tokenizer's `pad_id`)."""
    check_finite: bool = False
    """Raise if the output holds NaN or inf (e.g. after a diverged update); costs a device sync."""
    embedding: Literal["local", "vocab_sharded"] = "local"
    """"local": one `nn.Embedding` holding the whole table on every rank. "vocab_sharded": the table's
    rows split over the ranks of a group, for large vocabularies; the encoder is built without rows,
    `mmlongnet.distributed.parallelize_vocabulary(model, group)` gives it this rank's, and every rank of
    the group calls it (each lookup is a collective). `save_pretrained` then writes this rank's rows
    only."""

    def __post_init__(self) -> None:
        check_field_types(self)
        check_positive_int("embed_dim", self.embed_dim)
        check_positive_int("vocab_size", self.vocab_size)
        if self.max_length is not None:
            check_positive_int("max_length", self.max_length)
        check_dropout("dropout", self.dropout)
        if isinstance(self.padding_id, bool) or not isinstance(self.padding_id, int):
            raise ValueError(f"padding_id must be an int, got {self.padding_id!r}")
        if not 0 <= self.padding_id < self.vocab_size:
            raise ValueError(
                f"padding_id must be in [0, vocab_size={self.vocab_size}), got {self.padding_id}"
            )
        if self.embedding not in ("local", "vocab_sharded"):
            raise ValueError(f"embedding must be 'local' or 'vocab_sharded', got {self.embedding!r}")


class UnshardedTable(nn.Module):
    """The table of a `TextEncoder` with embedding="vocab_sharded" before
    `mmlongnet.distributed.parallelize_vocabulary` swaps in this rank's rows: it holds none (`weight`
    (0, E), of the encoder's device and dtype, from which the sharded table takes them) and refuses
    lookups with a ValueError saying how to shard it."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = nn.Parameter(torch.empty(0, embedding_dim, device=device, dtype=dtype))

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        raise ValueError(
            "embedding='vocab_sharded': the table is not sharded yet; call "
            "mmlongnet.distributed.parallelize_vocabulary(model, group) on every rank of the group (after "
            "torch.distributed.init_process_group) before running the model, or use embedding='local'"
        )

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows=none until parallelize_vocabulary"


class TextEncoder(Pretrained, nn.Module):
    """Token ids -> token vectors and padding mask; no positions (the attention applies rotary ones).

    Args:
        config: `TextEncoderConfig`.
        device, dtype: where and in which dtype the embedding table is created.

    With `config.embedding="vocab_sharded"` the encoder is built without rows (an `UnshardedTable`,
    which refuses lookups); `mmlongnet.distributed.parallelize_vocabulary(encoder, group)` swaps in a
    table of this rank's rows only, and the output and the gradients then equal those of a local
    encoder over the assembled table. Positions
    holding `padding_id` (padded or not) read no row, so the padding row gets no gradient, as with
    `nn.Embedding(padding_idx=...)`. The input checks run on each rank before the lookup: a bad batch
    on one rank raises there and leaves the other ranks waiting in the collective until the group's
    timeout. `save_pretrained` / `from_pretrained` save and load this rank's rows: save one directory
    per rank and load it back under a group of the same size (`from_pretrained(dir, parallelize=lambda
    m: parallelize_vocabulary(m, group))`; a different size fails on the shapes).

    Example::

        tok = ByteTokenizer()
        enc = TextEncoder(TextEncoderConfig(embed_dim=64))
        ids, lengths = tok.batch_encode(["a", "longer text"])
        x, pad = enc(ids, lengths)       # x: (2, 11, 64), pad: (2, 11), pad[0, 1:] all True
    """

    config_class = TextEncoderConfig

    def __init__(self, config: TextEncoderConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(config, TextEncoderConfig):
            raise ValueError(f"text: config must be a TextEncoderConfig, got {type(config).__name__}")
        self.config = config
        self.embed_dim = config.embed_dim
        if config.embedding == "local":
            self.embedding = nn.Embedding(
                config.vocab_size, config.embed_dim, padding_idx=config.padding_id, device=device, dtype=dtype
            )
        else:
            self.embedding = UnshardedTable(config.vocab_size, config.embed_dim, device=device, dtype=dtype)
        self.dropout = nn.Dropout(config.dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Embeddings ~ N(0, 1/E), so that the tokens have unit RMS; the padding row is zero (a
        vocabulary-sharded table never reads its padding row, which keeps its random value)."""
        nn.init.normal_(self.embedding.weight, std=self.embed_dim**-0.5)
        if self.config.embedding == "local":
            with torch.no_grad():
                self.embedding.weight[self.config.padding_id].zero_()

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Valid tokens out per valid token in: the identity, (B,) -> (B,)."""
        return lengths

    def forward(
        self, tokens: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed token ids.

        Args:
            tokens: (B, L) integer ids in [0, vocab_size) at valid positions; what padded
                positions hold is ignored (any value, e.g. -100).
            lengths: (B,) integer, valid tokens per sample, each in [0, L]; None = all L valid.

        Returns:
            tokens_out: (B, L, E), zero at padded positions.
            padding_mask: (B, L) bool, True at padding.
        """
        cfg = self.config
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"text: expected token ids (B, L) integer, got {got}")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise ValueError(f"text: expected token ids (B, L) integer, got dtype {tokens.dtype}")
        batch, width = tokens.shape
        if cfg.max_length is not None and width > cfg.max_length:
            raise ValueError(
                f"text: got {width} token slots but max_length={cfg.max_length}; "
                "truncate, e.g. with batch_encode(texts, max_length=...)"
            )
        lengths = check_lengths("text", lengths, batch, width, "tokens", tokens.device)
        pad = padding_mask(lengths, width)  # (B, L)
        tokens = tokens.long().masked_fill(pad, cfg.padding_id)  # (B, L), padding slots hold the pad id
        if tokens.numel():
            _check_id_range(tokens, cfg.vocab_size)
        if cfg.embedding == "local":
            embedded = self.embedding(tokens)  # (B, L, E)
        else:  # only positions holding another id than padding_id are routed: no row, no gradient
            read = tokens != cfg.padding_id  # (B, L)
            rows = self.embedding.lookup(tokens[read])  # (T, E)
            embedded = rows.new_zeros(batch, width, rows.shape[-1]).index_put((read,), rows)  # (B, L, E)
        out = self.dropout(embedded)  # (B, L, E)
        out = out.masked_fill(pad[..., None], 0.0)
        if cfg.check_finite:
            check_finite("text", "token embeddings", out)
        return out, pad


def _check_id_range(tokens: torch.Tensor, vocab_size: int) -> None:
    """ValueError unless every id of `tokens` (B, L) lies in [0, vocab_size).

    On the CPU the message names the range found. On an accelerator the check runs on the device
    without reading back (an asynchronous assert, reported at the next synchronisation), so that
    a training step never waits for it.
    """
    if tokens.device.type != "cpu" or torch.compiler.is_compiling():
        inside = ((tokens >= 0) & (tokens < vocab_size)).all()
        torch._assert_async(inside, f"text: token ids must be in [0, vocab_size={vocab_size})")
        return
    low, high = torch.stack([tokens.min(), tokens.max()]).tolist()
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"text: token ids must be in [0, vocab_size={vocab_size}), got values in "
            f"[{low}, {high}]; the tokenizer and TextEncoderConfig.vocab_size disagree"
        )
