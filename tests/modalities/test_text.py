"""Text: byte tokenizer, optional Hugging Face tokenizer file, token embedding with padding masks."""

import sys

import pytest
import torch

from mmlongnet.modalities import ByteTokenizer, HFTokenizer, TextEncoder, TextEncoderConfig

TEXTS = ["", "hello", "héllo wörld ✓ 日本語 🎉", "a\x00b\nc"]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trips_any_string(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == [b + 3 for b in text.encode("utf-8")]
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids, dtype=torch.long)) == text
    assert tok.decode(tok.encode(text, add_bos=True, add_eos=True)) == text


def test_byte_tokenizer_ids_and_specials():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 0, 1, 2)
    assert tok.encode("A") == [68]
    assert tok.encode("é") == [0xC3 + 3, 0xA9 + 3]
    assert tok.encode("A", add_bos=True, add_eos=True) == [1, 68, 2]
    assert tok.decode([0, 1, 68, 2, 0]) == "A"
    assert tok.decode([0xFF + 3]) == "\ufffd"  # a lone 0xff byte is not UTF-8
    with pytest.raises(ValueError, match="outside the byte vocabulary"):
        tok.decode([259])
    with pytest.raises(ValueError, match="encode expects a str"):
        tok.encode(b"bytes")


def test_byte_batch_encode_pads_and_truncates():
    tok = ByteTokenizer()
    ids, lengths = tok.batch_encode(["ab", "", "é"])
    assert ids.dtype == torch.long and lengths.dtype == torch.long
    assert lengths.tolist() == [2, 0, 2]
    assert ids.tolist() == [[100, 101], [0, 0], [0xC3 + 3, 0xA9 + 3]]
    ids, lengths = tok.batch_encode(["abcdef", "ab"], max_length=3, add_eos=True)
    assert lengths.tolist() == [3, 3]
    assert ids.tolist() == [[100, 101, 102], [100, 101, 2]]
    ids, lengths = tok.batch_encode([])
    assert ids.shape == (0, 0) and lengths.shape == (0,)
    with pytest.raises(ValueError, match="list of str"):
        tok.batch_encode("not a list")
    with pytest.raises(ValueError, match="item 1 is int"):
        tok.batch_encode(["a", 3])
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        tok.batch_encode(["a"], max_length=0)


def _word_level_tokenizer_file(tmp_path, with_pad=True):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "ü": 3}
    if with_pad:
        vocab["[PAD]"] = 4
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def test_hf_tokenizer_from_a_local_file(tmp_path):
    tok = HFTokenizer(_word_level_tokenizer_file(tmp_path))
    assert (tok.pad_id, tok.vocab_size) == (4, 5)
    assert tok.encode("hello world ü nope") == [1, 2, 3, 0]
    ids, lengths = tok.batch_encode(["hello world", "world", ""], max_length=5)
    assert ids.tolist() == [[1, 2], [2, 4], [4, 4]]
    assert lengths.tolist() == [2, 1, 0]
    assert tok.decode(ids[0]) == "hello world"
    assert tok.decode([2, 4, 4]) == "world"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([5])
    encoder = TextEncoder(TextEncoderConfig(embed_dim=8, vocab_size=tok.vocab_size, padding_id=tok.pad_id))
    out, pad = encoder(ids, lengths)
    assert out.shape == (3, 2, 8) and pad.tolist() == [[False, False], [False, True], [True, True]]


def test_hf_tokenizer_pad_token_errors(tmp_path):
    path = _word_level_tokenizer_file(tmp_path, with_pad=False)
    with pytest.raises(ValueError, match="pass pad_token="):
        HFTokenizer(path)
    with pytest.raises(ValueError, match="'<nope>' is not in the tokenizer's vocabulary"):
        HFTokenizer(path, pad_token="<nope>")
    assert HFTokenizer(path, pad_token="[UNK]").pad_id == 0
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFTokenizer(tmp_path / "missing.json")


def test_hf_tokenizer_without_the_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(ImportError, match="pip install tokenizers"):
        HFTokenizer(tmp_path / "tokenizer.json")


def test_encoder_shapes_masks_and_values():
    torch.manual_seed(0)
    encoder = TextEncoder(TextEncoderConfig(embed_dim=16)).eval()
    ids = torch.randint(3, 259, (3, 6))
    ids[1, 2:] = -100  # what padding slots hold is ignored
    out, pad = encoder(ids, torch.tensor([6, 2, 0]))
    assert out.shape == (3, 6, 16) and pad.dtype == torch.bool
    assert pad.tolist() == [[False] * 6, [False] * 2 + [True] * 4, [True] * 6]
    torch.testing.assert_close(out[0], encoder.embedding.weight[ids[0]], rtol=0, atol=0)
    torch.testing.assert_close(out[1, :2], encoder.embedding.weight[ids[1, :2]], rtol=0, atol=0)
    assert out[1, 2:].abs().sum() == 0 and out[2].abs().sum() == 0
    full, full_pad = encoder(ids[:1])
    assert not full_pad.any()
    torch.testing.assert_close(full, out[:1], rtol=0, atol=0)
    assert encoder.embed_dim == 16
    assert torch.equal(encoder.output_lengths(torch.tensor([4, 0])), torch.tensor([4, 0]))


def test_encoder_batch_invariance():
    torch.manual_seed(1)
    encoder = TextEncoder(TextEncoderConfig(embed_dim=8, dropout=0.1)).eval()
    tok = ByteTokenizer()
    texts = ["short", "a much longer sentence", "ü"]
    ids, lengths = tok.batch_encode(texts)
    batched, _ = encoder(ids, lengths)
    for row, text in enumerate(texts):
        alone_ids, _ = tok.batch_encode([text])
        alone, alone_pad = encoder(alone_ids)
        assert not alone_pad.any()
        torch.testing.assert_close(batched[row, : lengths[row]], alone[0], rtol=0, atol=1e-5)


def test_embedding_init_and_padding_row():
    torch.manual_seed(2)
    encoder = TextEncoder(TextEncoderConfig(embed_dim=256, vocab_size=1000, padding_id=7))
    weight = encoder.embedding.weight
    assert weight[7].abs().sum() == 0
    assert abs(weight.std().item() - 256**-0.5) < 0.003
    encoder(torch.tensor([[7, 8]]))[0].sum().backward()
    assert weight.grad[7].abs().sum() == 0 and weight.grad[8].abs().sum() > 0


def test_encoder_factory_kwargs():
    encoder = TextEncoder(TextEncoderConfig(embed_dim=4), dtype=torch.float64)
    out, _ = encoder(torch.tensor([[5, 6]]))
    assert out.dtype == torch.float64


@pytest.mark.parametrize(
    ("tokens", "lengths", "match"),
    [
        (
            torch.zeros(2, 3, 4, dtype=torch.long),
            None,
            r"expected token ids \(B, L\) integer, got \(2, 3, 4\)",
        ),
        (torch.zeros(2, 3), None, "got dtype torch.float32"),
        (
            torch.tensor([[3, 259]]),
            None,
            r"token ids must be in \[0, vocab_size=259\), got values in \[3, 259\]",
        ),
        (torch.tensor([[-1, 3]]), None, r"got values in \[-1, 3\]"),
        (torch.zeros(2, 3, dtype=torch.long), torch.tensor([1]), r"lengths must have shape \(B,\) = \(2,\)"),
        (torch.zeros(2, 3, dtype=torch.long), torch.tensor([1, 4]), r"lengths must be in \[0, 3\]"),
        (torch.zeros(2, 3, dtype=torch.long), torch.tensor([1, -1]), r"got values in \[-1, 1\]"),
        (torch.zeros(2, 3, dtype=torch.long), torch.tensor([1.0, 2.0]), "lengths must be an integer tensor"),
        ([[1, 2]], None, "expected token ids"),
    ],
)
def test_encoder_input_errors(tokens, lengths, match):
    encoder = TextEncoder(TextEncoderConfig(embed_dim=4))
    with pytest.raises(ValueError, match=match) as info:
        encoder(tokens, lengths)
    assert str(info.value).startswith("text: ")


def test_max_length_and_check_finite():
    encoder = TextEncoder(TextEncoderConfig(embed_dim=4, max_length=3, check_finite=True))
    assert encoder(torch.ones(1, 3, dtype=torch.long))[0].shape == (1, 3, 4)
    with pytest.raises(ValueError, match="text: got 4 token slots but max_length=3"):
        encoder(torch.ones(1, 4, dtype=torch.long))
    with torch.no_grad():
        encoder.embedding.weight[5, 0] = float("nan")
    with pytest.raises(ValueError, match=r"text: token embeddings holds 1 non-finite"):
        encoder(torch.tensor([[5]]))
    with pytest.raises(ValueError, match="TextEncoderConfig"):
        TextEncoder({"embed_dim": 4})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"embed_dim": 0}, "embed_dim must be a positive int"),
        ({"vocab_size": -3}, "vocab_size must be a positive int"),
        ({"max_length": 0}, "max_length must be a positive int"),
        ({"dropout": 1.0}, r"dropout must be a float in \[0, 1\)"),
        ({"padding_id": 259}, r"padding_id must be in \[0, vocab_size=259\)"),
        ({"padding_id": 1.5}, "padding_id must be an int"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextEncoderConfig(**kwargs)


class _TableWithLookup(torch.nn.Module):
    """A single-process stand-in for a vocabulary-sharded table: the whole table behind `lookup`."""

    def __init__(self, num_embeddings, embedding_dim, *, device=None, dtype=None):
        super().__init__()
        self.weight = torch.nn.Parameter(
            torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype)
        )
        self.looked_up = []

    def lookup(self, ids):  # (T,) -> (T, E)
        self.looked_up.append(ids.clone())
        return self.weight[ids]


def test_text_encoder_vocab_sharded_uses_the_table_swapped_in():
    config = TextEncoderConfig(embed_dim=4, vocab_size=10, padding_id=1, embedding="vocab_sharded")
    with pytest.raises(ValueError, match="parallelize_vocabulary"):
        TextEncoder(config)(torch.tensor([[3, 4]]))  # no rows until the table is sharded
    with pytest.raises(ValueError, match="embedding must be 'local' or 'vocab_sharded', got 'tp'"):
        TextEncoderConfig(embedding="tp")
    sharded = TextEncoder(config, dtype=torch.float64)
    sharded.embedding = _TableWithLookup(10, 4, dtype=torch.float64)  # what parallelize_vocabulary does
    sharded.reset_parameters()
    local = TextEncoder(TextEncoderConfig(embed_dim=4, vocab_size=10, padding_id=1), dtype=torch.float64)
    with torch.no_grad():
        local.embedding.weight.copy_(sharded.embedding.weight)
        local.embedding.weight[1].zero_()
    tokens, lengths = torch.tensor([[3, 1, 3, -100], [9, 9, 9, 9]]), torch.tensor([3, 4])
    grad = torch.randn(2, 4, 4, dtype=torch.float64)
    results = []
    for encoder in (sharded, local):
        out, pad = encoder(tokens, lengths)
        out.backward(grad)
        results.append((out.detach(), pad, encoder.embedding.weight.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    assert torch.equal(results[0][1], results[1][1])
    torch.testing.assert_close(results[0][2], results[1][2], rtol=0, atol=0)
    assert results[0][2][1].abs().max() == 0  # no gradient into the padding row
    assert sharded.embedding.looked_up[-1].tolist() == [3, 3, 9, 9, 9, 9]  # neither padding nor pad id
