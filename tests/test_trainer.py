"""The shared trainer: exact resume after a crash, NaN guard, stats, export."""
import json

import pytest
import torch

from tfd.trainer import NonFiniteLoss, TrainCfg, Trainer

from tests.helpers import assert_same_training_state, make_method


def cfg(**kw):
    base = dict(steps=6, lr=1e-3, warmup_steps=2, checkpoint_every=3, log_every=2, ema_halflife_steps=2.0)
    return TrainCfg(**{**base, **kw})


def test_resume_after_crash_equals_uninterrupted(tmp_path, crash_and_resume):
    ref, resumed = crash_and_resume(make_method, cfg(), tmp_path)
    assert resumed.step == 6
    assert_same_training_state(ref, resumed)
    stats = [json.loads(line) for line in (tmp_path / "b" / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats][-1] == 6
    assert any(k.startswith("drift_raw") for k in stats[-1])
    info = json.loads((tmp_path / "b" / "train.json").read_text())
    assert info["iters"] == 6 and (tmp_path / "b" / "generator.safetensors").is_file()


def test_nan_guard_keeps_last_checkpoint(tmp_path):
    t = Trainer(make_method(), cfg(steps=5), tmp_path, progress=False)
    orig = t.method.train_step

    def poisoned(batch, step):
        out = orig(batch, step)
        if step == 4:
            out.losses["generator"] = out.losses["generator"] * float("nan")
        return out

    t.method.train_step = poisoned
    with pytest.raises(NonFiniteLoss, match="step 4"):
        t.fit()
    state = torch.load(tmp_path / "ckpt" / "training-state.pt", weights_only=False)
    assert state["step"] == 3
    assert not (tmp_path / "generator.safetensors").exists()


def test_fp16_refused_on_cpu(tmp_path):
    with pytest.raises(ValueError, match="GPU"):
        Trainer(make_method(), cfg(precision="fp16"), tmp_path, progress=False)


def test_checkpoint_of_other_settings_is_not_resumed(tmp_path):
    Trainer(make_method(), cfg(steps=3), tmp_path, progress=False).fit()
    m = make_method()
    m.params.lambda_anchor = 0.5  # a method hyperparameter changed: must start from scratch
    t = Trainer(m, cfg(steps=3), tmp_path, progress=False)
    assert not t.try_resume()
    assert (tmp_path / "ckpt" / "training-state.pt.stale").is_file()
    longer = Trainer(make_method(), cfg(steps=3), tmp_path / "x", progress=False)
    longer.fit()
    ext = Trainer(make_method(), cfg(steps=5), tmp_path / "x", progress=False)  # extending steps resumes
    assert ext.try_resume() and ext.step == 3
