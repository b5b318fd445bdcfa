"""Checkpoint loading: official layouts, safetensors, configuration inference, pretrained names."""
import argparse

import pytest
import torch

import dit_fast
from dit_fast import checkpoint
from dit_fast import DiT, DiT_models, from_pretrained, infer_config, load_checkpoint, save_checkpoint

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


def _model(**kw):
    torch.manual_seed(0)
    model = DiT(**{**TINY, **kw})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    return model


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


def test_plain_state_dict(tmp_path):
    model = _model()
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    _same(load_checkpoint(tmp_path / "plain.pt"), model.state_dict())


def test_official_train_checkpoint_takes_ema(tmp_path):
    model, ema = _model(), _model()
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    args = argparse.Namespace(model="DiT-S/8", image_size=64, num_classes=10, global_batch_size=256)
    ckpt = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": args}
    torch.save(ckpt, tmp_path / "0000100.pt")
    _same(load_checkpoint(tmp_path / "0000100.pt"), ema.state_dict())
    _same(load_checkpoint(tmp_path / "0000100.pt", key="model"), model.state_dict())


@pytest.mark.slow
def test_train_checkpoint_config_from_args(tmp_path):
    # an official train.py checkpoint of DiT-S/8 at 64 px: the configuration comes from `args`
    with torch.device("meta"):
        shapes = DiT_models["DiT-S/8"](input_size=8, num_classes=10).state_dict()
    sd = {k: torch.randn(v.shape) * 0.01 for k, v in shapes.items()}
    args = argparse.Namespace(model="DiT-S/8", image_size=64, num_classes=10)
    torch.save({"model": sd, "ema": sd, "args": args}, tmp_path / "ckpt.pt")
    model = from_pretrained(tmp_path / "ckpt.pt")
    assert (model.input_size, model.patch_size, model.num_heads, len(model.blocks)) == (8, 8, 6, 12)
    assert not model.training


def test_ddp_and_compile_prefixes_are_stripped(tmp_path):
    model = _model()
    prefixed = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    torch.save(prefixed, tmp_path / "ddp.pt")
    _same(load_checkpoint(tmp_path / "ddp.pt"), model.state_dict())


@pytest.mark.parametrize("block", dit_fast.BLOCK_TYPES)
def test_safetensors_round_trip_with_config(tmp_path, block):
    model = _model(block=block, learn_sigma=False, num_heads=8)
    save_checkpoint(model, tmp_path / "m.safetensors")
    _same(load_checkpoint(tmp_path / "m.safetensors"), model.state_dict())
    loaded = DiT.from_pretrained(tmp_path / "m.safetensors")
    assert loaded.config == model.config
    _same(loaded.state_dict(), model.state_dict())


@pytest.mark.parametrize("block", dit_fast.BLOCK_TYPES)
def test_infer_config(block):
    model = _model(block=block)
    config = infer_config(model.state_dict(), num_heads=4)
    assert config == {**model.config, "class_dropout_prob": 0.1}


def test_infer_num_heads_from_named_sizes():
    with torch.device("meta"):
        sd = DiT_models["DiT-B/4"](input_size=16).state_dict()
    config = infer_config(sd)
    assert (config["num_heads"], config["depth"], config["patch_size"], config["input_size"]) == (12, 12, 4, 16)
    with pytest.raises(ValueError, match="num_heads"):
        infer_config(_model().state_dict())


def test_from_pretrained_plain_file_strict(tmp_path):
    model = _model(block="adaLN-Zero")
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    loaded = from_pretrained(tmp_path / "plain.pt", num_heads=4)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 10])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), model.eval()(x, t, y), atol=0, rtol=0)
    # an override that doesn't fit the weights fails loudly (strict loading), in one line
    with pytest.raises(ValueError, match=r"plain.pt does not fit the model: shape mismatch: \S+ is \(.*\) in the "
                                         r"checkpoint, \(.*\) in the model \(\+\d+ more\)$"):
        from_pretrained(tmp_path / "plain.pt", num_heads=4, hidden_size=128)
    with pytest.raises(ValueError, match=r"missing keys: blocks\.2\..*\(\+\d+ more\)"):
        from_pretrained(tmp_path / "plain.pt", num_heads=4, depth=3)


@pytest.mark.slow
def test_published_names_use_the_download_path(tmp_path, monkeypatch):
    # No network here: the download is served from a locally written file, through the real code path.
    with torch.device("meta"):
        shapes = DiT_models["DiT-S/8"](input_size=32).state_dict()
    source = tmp_path / "source.pt"
    torch.save({k: torch.zeros(v.shape) for k, v in shapes.items()}, source)
    urls = []

    def fake_download(url, dst, progress=True):
        urls.append(url)
        with open(source, "rb") as f, open(dst, "wb") as g:
            g.write(f.read())

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    monkeypatch.setenv("DIT_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(checkpoint.PRETRAINED, "DiT-XL-2-256x256.pt", ("DiT-S/8", 256))
    model = from_pretrained("DiT-XL-2-256x256")
    assert urls == ["https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"]
    assert (tmp_path / "cache" / "DiT-XL-2-256x256.pt").is_file()
    assert model.input_size == 32 and model.patch_size == 8
    from_pretrained("DiT-XL-2-256x256.pt")  # cached: no second download
    assert len(urls) == 1


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="no published checkpoint"):
        from_pretrained(tmp_path / "missing.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="expected a dict"):
        load_checkpoint(tmp_path / "list.pt")
    with pytest.raises(ValueError, match="key must be"):
        load_checkpoint(tmp_path / "list.pt", key="opt")
    torch.save({"a": torch.zeros(1)}, tmp_path / "notdit.pt")
    with pytest.raises(ValueError, match="not a DiT state dict"):
        from_pretrained(tmp_path / "notdit.pt")


def test_save_is_atomic(tmp_path, monkeypatch):
    model = _model()
    path = tmp_path / "m.pt"
    save_checkpoint(model, path)
    before = path.read_bytes()

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_model(depth=1), path)
    assert path.read_bytes() == before

    assert not list(tmp_path.glob("*.tmp"))


def _safetensors_bytes(header: bytes, data: bytes = b"\0" * 8) -> bytes:
    import struct
    return struct.pack("<Q", len(header)) + header + data


_T = b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'


@pytest.mark.parametrize("name, content, needle", [
    ("empty.pt", b"", "the file is empty"),
    ("empty.safetensors", b"", "the file is empty"),
    ("random.pt", bytes(range(256)) * 4, "not a readable torch checkpoint"),
    ("text.pt", b"hello", "not a readable torch checkpoint"),
    ("random.safetensors", bytes(range(256)) * 4, "not a readable safetensors file: "),
    ("header.safetensors", _safetensors_bytes(b"{" + _T), "not a readable safetensors file: "),
    ("meta.safetensors", _safetensors_bytes(b"{" + _T + b', "__metadata__": {"dit_config": "{bad"}}'),
     "'dit_config' metadata is not valid JSON"),
    ("list.safetensors", _safetensors_bytes(b"{" + _T + b', "__metadata__": {"dit_config": "[1]"}}'),
     "'dit_config' metadata must be a JSON object of DiT arguments, got a list"),
    ("types.safetensors", _safetensors_bytes(b"{" + _T + b', "__metadata__": {"dit_config": "{\\"depth\\": \\"x\\"}"}}'),
     "its model configuration is invalid: depth must be a positive int"),
])
def test_unreadable_files_are_one_line_with_the_path(tmp_path, name, content, needle):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        from_pretrained(path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"checkpoint {path}") and needle in msg, msg
    assert info.value.__suppress_context__ or info.value.__context__ is None  # no chained traceback


def test_truncated_checkpoints(tmp_path):
    for suffix in (".pt", ".safetensors"):
        full = tmp_path / f"full{suffix}"
        save_checkpoint(_model(), full)
        cut = tmp_path / f"cut{suffix}"
        cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
        with pytest.raises(ValueError, match=f"checkpoint {cut}: not a readable"):
            from_pretrained(cut)


def test_save_onto_a_directory_leaves_nothing(tmp_path):
    (tmp_path / "adir").mkdir()
    with pytest.raises(IsADirectoryError, match="adir is a directory"):
        save_checkpoint(_model(), tmp_path / "adir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir"]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_disk_full_while_saving(tmp_path, monkeypatch, suffix):
    # a write that runs out of space midway (as on a full disk): one OSError line, no temporary file
    import builtins
    import errno

    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, k):
            return getattr(self.f, k)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    monkeypatch.setattr(builtins, "open", lambda p, m="r", *a, **k: Full(real_open(p, m, *a, **k))
                        if "w" in m and str(p).endswith(".tmp") else real_open(p, m, *a, **k))
    if suffix == ".safetensors":  # safetensors writes from Rust: fail its writer the same way
        import safetensors.torch

        def save_file(tensors, filename, metadata=None):
            Full(real_open(filename, "wb")).write(b"x" * 2000)
        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(OSError) as info:
        save_checkpoint(_model(), tmp_path / f"m{suffix}")
    assert str(info.value) == f"cannot write checkpoint {tmp_path / f'm{suffix}'}: No space left on device"
    assert list(tmp_path.iterdir()) == []
