"""`gguf_base: auto | packed | dense`: a GGUF model trains on the file's own blocks or on its dense
conversion, with the same losses either way (the blocks de-quantize to the conversion's values)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from tinymodels import save_tiny_model, write_foreign_gguf
from train_helpers import losses

from lorakit.bases.gguf_linear import GGUFLinear
from lorakit.train import ConfigError, TrainConfig, load_train_config, train

pytest.importorskip("gguf")
pytest.importorskip("accelerate")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trainer tests' tiny Llama (byte-level ChatML tokenizer, one merge) written as a Q8_0 GGUF."""
    from lorakit.export.gguf_model import write_gguf_model
    from lorakit.models import load_model

    source = save_tiny_model(tmp_path_factory.mktemp("tiny"), merges=(("Ġ", "w"),))
    model, tokenizer = load_model(str(source), dtype="float32", device="cpu")
    path = tmp_path_factory.mktemp("gguf") / "tiny-q8_0.gguf"
    write_gguf_model(model, tokenizer, path, "q8_0")
    return path


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("by_default", [True, False])
def test_auto_packs_what_the_packed_loader_reads_when_packed_is_the_default(tiny_gguf, tiny_model, monkeypatch,
                                                                           by_default):
    from lorakit.models import load

    monkeypatch.setattr(load, "PACKED_BY_DEFAULT", by_default)
    assert TrainConfig(data="d", model=str(tiny_gguf)).packed_base() == by_default  # auto
    assert TrainConfig(data="d", model=str(tiny_gguf), gguf_base="packed").packed_base()
    assert not TrainConfig(data="d", model=str(tiny_gguf), gguf_base="dense").packed_base()
    assert not TrainConfig(data="d", model=str(tiny_model)).packed_base()  # no GGUF: auto is dense
    assert not TrainConfig(data="d", model=str(tiny_gguf), quantize="nf4").packed_base()  # QLoRA on the conversion


@pytest.mark.parametrize("items, message", [
    ("gguf_base=int4", "gguf_base: "),
    ("model=some/dir gguf_base=packed", "gguf_base: packed reads a .gguf file or a built-in model, not 'some/dir'"),
    ("model=x.gguf gguf_base=packed quantize=nf4", "gguf_base: packed keeps the file's own quantized blocks"),
    ("model=x.gguf gguf_base=packed method=full", "gguf_base: packed is a frozen base"),
])
def test_bad_combinations_are_one_line_errors(items, message):
    with pytest.raises(ConfigError, match=f"^{message}") as err:
        load_train_config(None, ["data=d", *items.split()])
    assert "\n" not in str(err.value)


def test_packed_refuses_an_architecture_it_does_not_read(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from lorakit.models import load

    monkeypatch.setattr(load, "PACKED_BY_DEFAULT", True)  # auto still takes the dense conversion for it
    path = write_foreign_gguf(tmp_path / "other.gguf")
    with pytest.raises(ConfigError, match="^gguf_base: gguf_base packed: other.gguf's architecture is none"):
        TrainConfig(data="d", model=str(path), gguf_base="packed").packed_base()
    assert not TrainConfig(data="d", model=str(path)).packed_base()  # auto takes the dense conversion


def test_packed_and_dense_runs_train_alike_and_resume(tiny_gguf, train_file, tmp_path, capsys):
    common = dict(model=str(tiny_gguf), data=str(train_file), batch_size=4, max_seq_len=64, lr=1e-2, quiet=True,
                  seed=0, max_steps=4)
    packed = train(TrainConfig(**common, output_dir=str(tmp_path / "packed"), gguf_base="packed", save_every=2))
    dense = train(TrainConfig(**common, output_dir=str(tmp_path / "dense"), gguf_base="dense"))
    layers = [m for m in packed.model.modules() if isinstance(m, GGUFLinear)]
    assert len(layers) == 14 and not any(isinstance(m, GGUFLinear) for m in dense.model.modules())
    assert packed.stats["total_params"] == dense.stats["total_params"]  # the blocks count as their elements

    run_p, run_d = losses(tmp_path / "packed"), losses(tmp_path / "dense")
    assert list(run_p) == [1, 2, 3, 4]
    for step in run_p:
        assert run_p[step] == pytest.approx(run_d[step], rel=1e-5)
    with torch.no_grad():
        ids = torch.tensor([[5, 60, 70, 80, 90]])
        torch.testing.assert_close(packed.model(ids).logits, dense.model(ids).logits, rtol=1e-4, atol=1e-5)
    assert yaml.safe_load((tmp_path / "packed" / "config.yaml").read_text())["gguf_base"] == "packed"

    # resume the packed run from step 2: the same steps 3 and 4
    resumed = TrainConfig(**common, output_dir=str(tmp_path / "packed"), gguf_base="packed", save_every=2,
                          resume=str(tmp_path / "packed" / "checkpoints" / "step-2"))
    train(resumed)
    again = losses(tmp_path / "packed")
    assert list(again) == [1, 2, 3, 4]
    for step in (3, 4):
        assert again[step] == pytest.approx(run_p[step], rel=1e-6)
