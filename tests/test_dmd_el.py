"""DMD (distribution matching + regression on teacher pairs), the EL-style add-on (MMD in random-network
features) and DP-DMD's diversity metric."""
import itertools
import math

import numpy as np
import pytest

# -- diversity (DP-DMD) ---------------------------------------------------------------------------


def _diversity_loop(features, labels, r=0):
    """Slow reference: per condition, 1 - mean over pairs i < j of cos(f_i, f_j); mean over conditions."""
    vals = []
    for c in sorted(set(labels.tolist())):
        rows = [f for f, lab in zip(features, labels) if lab == c]
        if r:
            rows = rows[:r]
        cos = []
        for a, b in itertools.combinations(rows, 2):
            dot = sum(float(x) * float(y) for x, y in zip(a, b))
            na = math.sqrt(sum(float(x) ** 2 for x in a))
            nb = math.sqrt(sum(float(y) ** 2 for y in b))
            cos.append(dot / (na * nb))
        vals.append(1.0 - sum(cos) / len(cos))
    return sum(vals) / len(vals)


@pytest.mark.parametrize("r", [0, 5])
def test_diversity_matches_slow_loop(r):
    from eval.metrics import METRICS, diversity
    rng = np.random.default_rng(0)
    labels = np.tile(np.arange(10), 30)            # image i has class i % 10, as the evaluation samples
    feats = rng.normal(size=(300, 16)) + 0.5 * rng.normal(size=(10, 16))[labels]
    value, details = diversity(feats, labels, r)
    assert value == pytest.approx(_diversity_loop(feats, labels, r), rel=1e-6)
    assert details["samples_per_condition"] == [r or 30] and len(details["per_condition"]) == 10
    spec = METRICS["diversity_digits"]
    assert spec.extractors == ("digits",) and spec.needs == ("features", "labels", "diversity_r")


def test_diversity_extremes_and_errors():
    from eval.errors import UserError
    from eval.metrics import check_metric_names, diversity
    same = np.tile(np.array([[1.0, 2.0, 3.0]]), (6, 1)) * np.arange(1, 7)[:, None]  # one direction
    assert diversity(same, np.zeros(6, dtype=np.int64))[0] == pytest.approx(0.0, abs=1e-12)
    ortho = np.eye(4)
    assert diversity(ortho, None)[0] == pytest.approx(1.0)  # unconditional: one group
    with pytest.raises(UserError, match="fewer than"):
        diversity(ortho, np.array([0, 0, 1, 1]), 3)
    assert check_metric_names(["fid_digits", "diversity_digits"], "digits") == []
    assert check_metric_names(["diversity_digits"], "inception")
