"""Feature extractors and the CLIP scorer run on the job's device: the CLI picks `cuda` when torch
sees a GPU (mocked here: no real CUDA needed) and hands it to the extractor builder; on a CPU
machine everything stays on the CPU."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

import eval.features as F


@pytest.fixture
def tiny_config(tmp_path):
    """A digits benchmark without runs (the CLI commands below need only its eval block)."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"benchmark": "digits", "benchmarks": {"digits": {"eval": {
        "feature_extractor": "digits", "metrics": ["fid_digits", "max_ssim"]}}}}))
    return path


@pytest.fixture
def digits_net(tmp_path):
    """An untrained digits network file in the format of eval.digits_net (fast to build)."""
    from safetensors.torch import save_file

    from eval.digits_net import FORMAT, DigitsNet

    net = DigitsNet()
    path = tmp_path / "digits_net.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path),
              metadata={"format": FORMAT, "arch": json.dumps(net.arch), "test_acc": "0.5"})
    return path


class Recorder:
    """Stands in for a function; records its keyword arguments, returns `ret(**kwargs)`."""

    def __init__(self, ret=None):
        self.calls, self.ret = [], ret

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.ret(*args, **kwargs) if callable(self.ret) else self.ret


def test_default_device_follows_cuda_availability(monkeypatch):
    from tfd.cli import default_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == "cpu"


@pytest.mark.parametrize("gpu,flag,expected",
                         [(True, [], "cuda"), (False, [], "cpu"), (True, ["--device", "cpu"], "cpu")])
def test_score_builds_the_extractor_on_the_chosen_device(monkeypatch, tiny_config, tmp_path, gpu, flag, expected):
    import eval.score
    from tfd.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    build = Recorder(lambda *a, **k: SimpleNamespace(device=k["device"], name="digits"))
    score = Recorder({"fid_digits": {"value": 1.0}})
    monkeypatch.setattr(F, "build_extractor", build)
    monkeypatch.setattr(eval.score, "score_samples", score)
    main(["score", "--config", str(tiny_config), "--samples", "s.npz", "--out-dir", str(tmp_path / "m"),
          "--ref-stats", "r.npz", "--feature-weights", "w.safetensors", *flag])
    (args, kw), = build.calls
    assert args == ("digits",) and kw == {"weights_path": "w.safetensors", "device": expected, "digits_input_size": 8}
    (sargs, skw), = score.calls
    assert sargs[2] == ["fid_digits", "max_ssim"] and skw["device"] == expected and skw["extractor"].device == expected


@pytest.mark.parametrize("flag,config,expected", [([], None, 64), ([], 16, 16), (["--batch-size", "8"], 16, 8)])
def test_score_batch_size_from_flag_or_config(monkeypatch, tiny_config, tmp_path, capsys, flag, config, expected):
    """`tfd score` feeds the feature network `--batch-size`, else `eval.score_batch_size`, else the
    extractor's own batch; it logs images/s."""
    import eval.score
    from tfd.cli import main

    cfg = yaml.safe_load(tiny_config.read_text())
    cfg["benchmarks"]["digits"]["eval"]["score_batch_size"] = config
    path = tmp_path / "config2.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ext = SimpleNamespace(device="cpu", name="digits", batch_size=64)
    monkeypatch.setattr(F, "build_extractor", lambda *a, **k: ext)
    monkeypatch.setattr(eval.score, "score_samples", Recorder({"fid_digits": {"value": 1.0}}))
    main(["score", "--config", str(path), "--samples", "s.npz", "--out-dir", str(tmp_path / "m"),
          "--ref-stats", "r.npz", "--feature-weights", "w.safetensors", *flag])
    assert ext.batch_size == expected
    assert "images/s" in capsys.readouterr().err


def test_ref_stats_builds_the_extractor_on_the_gpu_when_present(monkeypatch, tiny_config, tmp_path):
    import eval.score
    import tfd.runs
    from tfd.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    build = Recorder(lambda *a, **k: SimpleNamespace(device=k["device"]))
    make = Recorder()
    monkeypatch.setattr(F, "build_extractor", build)
    monkeypatch.setattr(eval.score, "make_ref_stats", make)
    monkeypatch.setattr(tfd.runs, "load_data", lambda b: (np.zeros((2, 1, 8, 8), np.float32), np.zeros(2, np.int64)))
    main(["ref-stats", "--config", str(tiny_config), "--feature-weights", str(tmp_path / "w.safetensors"),
          "--out", str(tmp_path / "ref.npz")])
    assert build.calls[0][1]["device"] == "cuda"
    (args, _), = make.calls
    assert args[0].dtype == np.uint8 and args[0].shape == (2, 8, 8, 1) and args[2].device == "cuda"


def test_inception_passes_cuda_to_torch_fidelity(monkeypatch, tmp_path):
    import torch_fidelity.utils

    class FakeNet(torch.nn.Module):
        def to(self, device):
            self.moved_to = device
            return self

    create = Recorder(lambda *a, **k: FakeNet())
    monkeypatch.setattr(torch_fidelity.utils, "create_feature_extractor", create)
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"not really weights")
    for device, cuda in (("cuda", True), ("cuda:1", True), ("cpu", False)):
        ext = F.build_extractor("inception", weights_path=weights, device=device)
        assert create.calls[-1][1]["cuda"] is cuda and ext.model.moved_to == device and ext.device == device


def test_digits_extractor_and_class_acc_run_on_cpu(digits_net, tmp_path):
    """On a CPU machine: the extractor the CLI would build sits on the CPU, features come back as
    CPU float64 numpy, and the class_acc classifier is built on the same device."""
    from eval.score import compute_metrics

    ext = F.build_extractor("digits", weights_path=digits_net, device="cpu")
    assert ext.device == "cpu" and {p.device.type for p in ext.net.parameters()} == {"cpu"}
    u8 = np.random.default_rng(0).integers(0, 256, size=(5, 8, 8, 1), dtype=np.uint8)
    feats = ext.features(u8, batch_size=2)
    assert isinstance(feats, np.ndarray) and feats.dtype == np.float64 and feats.shape == (5, 64)
    assert np.array_equal(feats, F.build_extractor("digits", weights_path=digits_net).features(u8, batch_size=2))
    res = compute_metrics(u8, np.arange(5), ["class_acc"], digits_weights_path=digits_net, device="cpu")
    assert 0.0 <= res["class_acc"][0] <= 1.0


def test_clip_scorer_gets_the_device(monkeypatch):
    import eval.clip_score
    from eval.score import compute_metrics

    made = Recorder(lambda config, device: SimpleNamespace(score=lambda im, caps: 0.25, provenance={"d": device}))
    monkeypatch.setattr(eval.clip_score, "ClipScorer", made)
    res = compute_metrics(np.zeros((2, 8, 8, 3), np.uint8), None, ["clip_score"], captions=["a", "b"], device="cuda")
    assert res["clip_score"] == (0.25, {"d": "cuda"})


def test_convergence_hook_builds_its_extractor_on_the_trainer_device(monkeypatch):
    import tfd.convergence as C

    build = Recorder(lambda *a, **k: SimpleNamespace(name="digits", provenance={}, device=k["device"]))
    monkeypatch.setattr(C, "build_extractor", build)
    monkeypatch.setattr(C, "check_ref_stats", lambda *a, **k: {"provenance": {}})
    monkeypatch.setattr(C, "check_provenance", lambda *a: None)
    b = SimpleNamespace(eval=SimpleNamespace(feature_extractor="digits", feature_extractor_weights_path=None,
                                             convergence_samples=4, batch_size=2, base_seed=0),
                        channels=1, resolution=8, num_classes=10, task="class")
    C.convergence_eval_fn(b, "w.safetensors", "ref.npz", None, None, device="cuda")
    assert build.calls[0][1] == {"weights_path": "w.safetensors", "device": "cuda",
                                 "digits_input_size": 8}  # the benchmark's resolution (digits-text: 32)
