"""Training in bf16 on a CPU on bf16 copies of the weights, their fp32 masters updated in one pass: the same
run as under autocast's casts, resumable bit for bit, and used only where it applies."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny, weights

import verydeep.train.master_weights as master_weights
import verydeep.train.step as step_module
from verydeep.runtime.processes import Processes
from verydeep.train import Trainer, train


@pytest.fixture(autouse=True)
def small_nets_too(monkeypatch):
    """The tests' nets are tiny: the copies apply to them as to the large nets they are for."""
    monkeypatch.setattr(master_weights, "MIN_WEIGHTS", 0)


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"kind": "step"' in line]


@pytest.mark.parametrize("more", [{}, dict(micro_batch=4), dict(freeze="features")])
def test_training_on_the_copies_is_training_under_autocast(data, tmp_path, monkeypatch, more):
    if "freeze" in more:  # frozen layers are copied ones: from a short run of the same net
        train(tiny(data, tmp_path / "source"))
        more = {**more, "weights": str(tmp_path / "source"), "lr": 0.01}
    options = dict(precision="bf16", dropout=0.0, epochs=2, **more)
    copies = Trainer(tiny(data, tmp_path / "copies", **options), Processes())
    assert copies.stepper.masters is not None and "bf16 copies" in copies.how
    copies.run()
    records = [json.loads(line) for line in (tmp_path / "copies" / "metrics.jsonl").read_text().splitlines()]
    assert {r["precision"] for r in records if r["kind"] == "epoch"} == {"bfloat16"}  # the epochs say how they ran
    monkeypatch.setattr(step_module, "bf16_copies", lambda model, optimizer: (None, "switched off"))
    cast = Trainer(tiny(data, tmp_path / "cast", **options), Processes())
    assert cast.stepper.masters is None and "switched off" in cast.how
    cast.run()
    # the same forward and backward passes; the updates differ at most in the last bit of a multiply-add
    assert losses(tmp_path / "copies") == pytest.approx(losses(tmp_path / "cast"), rel=1e-3)
    a, b = weights(tmp_path / "copies"), weights(tmp_path / "cast")
    for key in a:
        assert a[key].dtype == torch.float32, key  # the checkpoint holds the fp32 masters
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5)


def test_training_on_the_copies_resumes_bit_for_bit(data, tmp_path):
    options = dict(precision="bf16", epochs=2, checkpoint_every=2)
    train(tiny(data, tmp_path / "straight", **options))
    train(tiny(data, tmp_path / "resumed", stop_after_steps=7, **options))
    train(tiny(data, tmp_path / "resumed", resume=True, **options))
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.equal(value, resumed[key]) for key, value in straight.items())


@pytest.mark.parametrize("options", [dict(precision="fp32"), dict(momentum=0.0), dict(compile=True)])
def test_the_copies_only_where_they_apply(data, tmp_path, options):
    trainer = Trainer(tiny(data, tmp_path, **{"precision": "bf16", **options}), Processes())
    assert trainer.stepper.masters is None


def test_a_net_too_small_for_the_copies_to_pay_trains_under_autocasts_casts(data, tmp_path, monkeypatch):
    monkeypatch.setattr(master_weights, "MIN_WEIGHTS", 10**6)
    trainer = Trainer(tiny(data, tmp_path, precision="bf16"), Processes())
    assert trainer.stepper.masters is None and "M weights, too few for the copies to pay" in trainer.how


def test_without_a_compiler_training_goes_on_under_autocasts_casts(data, tmp_path, monkeypatch):
    def no_compiler(function, **options):
        def compiled(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return compiled

    monkeypatch.setattr(master_weights.torch, "compile", no_compiler)
    trainer = Trainer(tiny(data, tmp_path, precision="bf16"), Processes())
    assert trainer.stepper.masters is None and "did not compile (RuntimeError: InvalidCxxCompiler" in trainer.how
    assert trainer.run().steps == 4
