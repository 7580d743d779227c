"""Exports round-trip: each encoder with its modality stack reproduces `encode_<modality>`, pooled
embeddings, `LongNetLM`, atomic `save_pretrained` and load errors that name the file."""

import json

import pytest
import torch

from mmlongnet.models import MMLongNet, MMLongNetConfig
from mmlongnet.models.longnet import LongNetLM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MMLongNet(MMLongNetConfig.tiny()).eval()


@pytest.mark.parametrize("name", ["text", "audio", "video"])
def test_an_encoder_exported_with_its_stack_reproduces_encode(model, name, tmp_path):
    inputs, lengths = model.example_inputs(3, seed=2)
    encode = getattr(model, f"encode_{name}")
    tokens, padding = encode(inputs[name], lengths[name])
    model.modality_model(name).save_pretrained(tmp_path / name)
    loaded = MMLongNet.from_pretrained(tmp_path / name).eval()
    assert loaded.config.modalities == [name] and loaded.fusion is None
    again, again_padding = getattr(loaded, f"encode_{name}")(inputs[name], lengths[name])
    assert torch.equal(again, tokens) and torch.equal(again_padding, padding)
    pooled = encode(inputs[name], lengths[name], pooled=True)  # (B, E)
    keep = (~padding).float()[..., None]
    expected = (tokens * keep).sum(1) / keep.sum(1).clamp(min=1)
    assert pooled.shape == (3, model.config.d_model)
    torch.testing.assert_close(pooled, expected)


def test_language_model_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    lm = LongNetLM(259, d_model=32, nhead=2, num_layers=2, dim_feedforward=64, segment_lengths=[8, 16],
                   dilation_rates=[1, 2], tie_embeddings=True, token_shift=3).eval()  # fmt: skip
    with torch.no_grad():
        lm.token_shift.weight.normal_()
    lm.save_pretrained(tmp_path / "lm")
    assert json.loads((tmp_path / "lm" / "config.json").read_text())["config"]["d_model"] == 32
    loaded = LongNetLM.from_pretrained(tmp_path / "lm").eval()
    tokens = torch.randint(0, 259, (2, 40))
    assert torch.equal(loaded(tokens), lm(tokens))
    assert loaded.lm_head.weight is loaded.embedding.weight  # the tie survives


def _lm():
    return LongNetLM(
        16, d_model=16, nhead=2, num_layers=1, dim_feedforward=32, segment_lengths=[8], dilation_rates=[1]
    )


@pytest.mark.parametrize(
    "damage, file, match",
    [("weights_truncated", "model.safetensors", "not a readable safetensors file"),
     ("weights_garbage", "model.safetensors", "not a readable safetensors file"),
     ("config_not_json", "config.json", "not valid JSON"),
     ("config_list", "config.json", "must hold a JSON object"),
     ("config_without_config", "config.json", "must hold a JSON object")],
)  # fmt: skip
def test_a_damaged_export_is_an_error_naming_the_file(damage, file, match, tmp_path):
    folder = _lm().save_pretrained(tmp_path / "lm")
    weights, config = folder / "model.safetensors", folder / "config.json"
    if damage == "weights_truncated":
        weights.write_bytes(weights.read_bytes()[:300])
    elif damage == "weights_garbage":
        weights.write_bytes(b"\x00garbage" * 50)
    elif damage == "config_not_json":
        config.write_text("{not json")
    elif damage == "config_list":
        config.write_text("[1, 2]")
    else:
        config.write_text(json.dumps({"class": "LongNetLM"}))
    with pytest.raises(ValueError, match=match) as error:
        LongNetLM.from_pretrained(folder)
    assert str(folder / file) in str(error.value)


def test_a_failed_save_pretrained_leaves_the_old_export_intact(tmp_path, monkeypatch):
    import mmlongnet.pretrained as pretrained

    torch.manual_seed(0)
    old = _lm()
    folder = old.save_pretrained(tmp_path / "lm")
    before = {path.name: path.read_bytes() for path in folder.iterdir()}

    def failing_write(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pretrained, "save_file", failing_write)
    with pytest.raises(OSError, match="disk full"):
        _lm().save_pretrained(folder)
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    assert [path.name for path in tmp_path.iterdir()] == ["lm"]  # no temporary folder left
    monkeypatch.undo()
    torch.manual_seed(1)
    new = _lm()
    new.save_pretrained(folder)  # replaces the old export
    tokens = torch.randint(0, 16, (1, 8))
    assert torch.equal(LongNetLM.from_pretrained(folder).eval()(tokens), new.eval()(tokens))
    assert [path.name for path in tmp_path.iterdir()] == ["lm"]
