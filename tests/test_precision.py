"""Mixed precision (dml.precision): the network under autocast, the losses in fp32, an fp16
gradient scaler whose state is part of the resume point."""

from __future__ import annotations

import json

import pytest
import torch

from dml.config import ConfigError, RunConfig, validate
from dml.models import build_model
from dml.precision import AutocastModel, for_training, grad_scaler
from dml.runs import open_run
from dml.train import resume, train


def tiny(precision: str, **over) -> RunConfig:
    cfg = RunConfig().with_overrides([
        "data.name=digits", "loss.name=multi-similarity", "train.epochs=2", "train.seed=2",
        "train.iterations_per_epoch=3", "model.params.width=8", "model.embedding_dim=16",
        "train.threads=1", "train.projections=none", "train.clustering=false",
        f"train.precision={precision}"])
    return cfg.with_overrides([f"{k}={v}" for k, v in over.items()])


def test_unknown_precision_is_refused():
    with pytest.raises(ConfigError, match="train.precision must be 'fp32', 'bf16' or 'fp16'"):
        validate(RunConfig().with_overrides(["train.precision=fp8"]))


def test_the_network_runs_in_bf16_and_hands_fp32_embeddings_to_the_loss():
    model = build_model("small-cnn", 1, 16, 8, width=4)
    cpu = torch.device("cpu")
    assert for_training(model, "fp32", cpu) is model
    net = for_training(model, "bf16", cpu)
    assert isinstance(net, AutocastModel) and net.stages is model.stages
    assert {id(p) for p in net.parameters()} == {id(p) for p in model.parameters()}
    x = torch.randn(4, 1, 16, 16)
    emb = net(x)
    assert emb.dtype == torch.float32                        # what the loss sees
    assert net.forward_to(x, 1).dtype == torch.bfloat16      # feature maps stay low
    assert net.forward_from(net.forward_to(x, 1), 1).dtype == torch.float32
    ref = model(x)
    assert not torch.equal(emb, ref)                          # really computed in bf16
    torch.testing.assert_close(emb, ref, atol=0.05, rtol=0.05)


def test_the_scaler_is_on_for_fp16_only():
    cpu = torch.device("cpu")
    assert grad_scaler("fp16", cpu).is_enabled()
    assert not grad_scaler("bf16", cpu).is_enabled() and not grad_scaler("fp32", cpu).is_enabled()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_trains_and_resumes_exactly(tmp_path, precision):
    cfg = tiny(precision)
    ref = open_run(train(cfg, tmp_path / "ref", progress=False))
    assert ref.status()["state"] == "finished"
    assert all(torch.isfinite(torch.tensor(m["train"]["loss"])) for m in ref.metrics())
    state = json.loads(next((ref.path / "checkpoints" / "resume").glob("epoch_*/state.json"))
                       .read_text())
    assert (state["scaler"] is not None) == (precision == "fp16")
    if precision == "fp16":
        assert state["scaler"]["scale"] > 0

    def stop_in_epoch_2(p):
        if p["epoch"] == 2 and p["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "int", progress=False, on_progress=stop_in_epoch_2)
    (path,) = list((tmp_path / "int").iterdir())
    resume(path, progress=False)
    from safetensors.torch import load_file

    got = load_file(path / "checkpoints" / "last.safetensors")
    want = load_file(ref.path / "checkpoints" / "last.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)
