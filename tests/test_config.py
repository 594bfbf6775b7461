"""config.yaml: typed loading, unknown keys and wrong types named, schema validation."""
import copy
import dataclasses

import pytest
import yaml

from tfd.config import Config, ConfigError, check, from_dict, load_config


def _cfg(root):
    return yaml.safe_load((root / "config.yaml").read_text())


def test_default_config_loads(root):
    cfg = load_config(root / "config.yaml")
    assert cfg.benchmark == "digits"
    assert "tfd" in cfg.bench().runs and "imagenet64" in cfg.benchmarks


@pytest.mark.parametrize("mutate,key", [
    (lambda d: d["benchmarks"]["digits"]["teacher"]["train"].update(stpes=3), "stpes"),
    (lambda d: d["benchmarks"]["digits"]["eval"].update(num_samples="many"), "num_samples"),
    (lambda d: d.update(benchmrk="digits"), "benchmrk"),
    (lambda d: d["benchmarks"]["digits"]["runs"]["tfd"].update(methd="tfd"), "methd"),
])
def test_bad_keys_are_named(root, mutate, key):
    d = _cfg(root)
    mutate(d)
    with pytest.raises(ConfigError, match=key):
        check(from_dict(Config, d, "config"))


def test_method_params_checked_by_method_dataclass(root):
    from tfd.methods import get_method
    d = _cfg(root)
    d["benchmarks"]["digits"]["runs"]["tfd"]["params"]["radi"] = [0.1]
    with pytest.raises(ConfigError, match=r"runs\.tfd\.params: unknown key 'radi' \(valid keys: .*radii"):
        from_dict(Config, d, "config")
    cfg = from_dict(Config, _cfg(root), "config")  # typed once, when loaded
    assert isinstance(cfg.bench().runs["tfd"].params, get_method("tfd").Params)


def test_imagenet64_needs_teacher_path(root):
    d = _cfg(root)
    d["benchmark"] = "imagenet64"
    with pytest.raises(ConfigError, match="teacher.checkpoint"):
        check(from_dict(Config, d, "config"))


def test_unknown_method(root):
    d = _cfg(root)
    d["benchmarks"]["digits"]["runs"]["tfd"]["method"] = "tdf"
    with pytest.raises(ConfigError, match="tdf"):
        check(from_dict(Config, d, "config"))


def test_schema_validates_and_rejects(root):
    from snakemake.utils import validate
    d = _cfg(root)
    validate(copy.deepcopy(d), str(root / "workflow/schemas/config.schema.yaml"))
    d["benchmarks"]["digits"]["eval"]["metricz"] = []
    with pytest.raises(Exception, match="metricz"):
        validate(d, str(root / "workflow/schemas/config.schema.yaml"))


def test_check_names_bad_method_params_and_train_keys(root):
    d = _cfg(root)
    d["benchmarks"]["digits"]["runs"]["tfd"]["params"]["radi"] = [0.1]
    d["benchmarks"]["digits"]["runs"]["dmd2"]["train"]["stepz"] = 3
    with pytest.raises(ConfigError) as e:
        check(from_dict(Config, d, "config"))
    assert "runs.tfd.params" in str(e.value) and "radi" in str(e.value) and "stepz" in str(e.value)


def test_ablations_expand_into_runs(root):
    b = load_config(root / "config.yaml").bench()
    noise = b.ablations["feature_noise"]
    assert [label for label, _ in noise.variants] == ["0", "0.1"]
    runs = dict(noise.variants)
    assert runs["0.1"] == "tfd"  # the base value is the base run: not trained twice
    assert b.runs[runs["0"]].params.feature_noise == 0.0
    assert dataclasses.replace(b.runs[runs["0"]].params, feature_noise=0.1) == b.runs["tfd"].params
    assert b.runs[runs["0"]].train == b.runs["tfd"].train
    # every variant of every sweep is a run; equal settings share one
    names = [r for a in b.ablations.values() for _, r in a.variants]
    assert all(n in b.runs for n in names)
    assert dict(b.ablations["layers"].variants)["enc:2+enc:5+bottleneck+dec:6+dec:10"] == "tfd"


def test_ablation_overrides_apply_to_every_variant(root):
    d = _cfg(root)
    d["benchmarks"]["digits"]["ablations"] = {"lr": {
        "base": "tfd", "key": "train.lr", "values": [1e-4, 3e-4], "labels": ["low", "high"],
        "overrides": {"train": {"steps": 50}, "params": {"n_gen": 4}}}}
    b = check(from_dict(Config, d, "config")).bench()
    (l0, r0), (l1, r1) = b.ablations["lr"].variants
    assert (l0, r0, l1, r1) == ("low", "lr__low", "high", "lr__high")
    assert b.runs[r1].train.lr == 3e-4 and b.runs[r1].train.steps == 50 and b.runs[r1].params.n_gen == 4
    assert b.runs["tfd"].train.steps == d["benchmarks"]["digits"]["runs"]["tfd"]["train"]["steps"] != 50  # base kept


@pytest.mark.parametrize("abl,match", [
    ({"base": "nope", "key": "params.feature_noise", "values": [0.0]}, "nope"),
    ({"base": "teacher_ode", "key": "params.feature_noise", "values": [0.0]}, "sampler row"),
    ({"base": "tfd", "key": "feature_noise", "values": [0.0]}, "params.<name>"),
    ({"base": "tfd", "key": "params.feature_noise", "values": [0.0, 0.1], "labels": ["a"]}, "labels"),
    ({"base": "tfd", "key": "params.feature_noise", "values": [0.0], "overrides": {"parms": {}}}, "parms"),
    ({"base": "tfd", "key": "params.feture_noise", "values": [0.0]}, "feture_noise"),
])
def test_bad_ablations_are_named(root, abl, match):
    d = _cfg(root)
    d["benchmarks"]["digits"]["ablations"] = {"sweep": abl}
    with pytest.raises(ConfigError, match=match) as e:
        check(from_dict(Config, d, "config"))
    assert "sweep" in str(e.value)


def test_run_blocks_are_typed_once_with_defaults_from_one_dataclass(root):
    """train / params / sampler are dataclasses after loading; a sampler row has no train block;
    an explicit default equals an omitted one (so sweeps reuse runs by their settings)."""
    from tfd.config import TrainCfg
    from tfd.sampling import HeunCfg
    b = load_config(root / "config.yaml").bench()
    assert isinstance(b.runs["tfd"].train, TrainCfg) and b.runs["teacher_ode"].train is None
    assert isinstance(b.runs["teacher_sde"].sampler, HeunCfg) and b.runs["teacher_sde"].sampler.S_churn == 40
    assert b.runs["dmd2"].train.seed == TrainCfg().seed  # omitted in config.yaml: the dataclass default
    d = _cfg(root)
    d["benchmarks"]["digits"]["runs"]["teacher_ode"]["train"] = {"steps": 3}
    with pytest.raises(ConfigError, match="teacher_ode.train: a 'heun' row takes no train settings"):
        from_dict(Config, d, "config")


def test_config_files_merge_like_snakemake_configfile(root):
    """`tfd --config config.yaml --config .test/config.yaml` sees the tiny DAG's settings, merged key
    by key as `snakemake --configfile` merges them."""
    b = load_config([root / "config.yaml", root / ".test" / "config.yaml"]).bench()
    full = load_config(root / "config.yaml").bench()
    assert b.runs["tfd"].train.steps == 3 and full.runs["tfd"].train.steps == 600
    assert b.runs["tfd"].params.lambda_anchor == full.runs["tfd"].params.lambda_anchor  # untouched keys kept
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config([root / "config.yaml", root / "nope.yaml"])


def test_cli_names_an_undefined_run(root, capsys):
    from tfd.cli import main
    with pytest.raises(SystemExit) as e:
        main(["distill", "--config", str(root / "config.yaml"), "--run", "tdf", "--teacher", "x", "--out-dir", "y"])
    msg = str(e.value.code)
    assert msg.startswith("tfd distill: error: run 'tdf' is not defined") and ", tfd, " in msg
