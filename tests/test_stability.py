"""The section-4 analysis: EASGD's cycle matrices against the paper's closed form, the matrices
against direct simulation, and the command's outputs."""

import json

import numpy as np
import pytest

from easgd_local import stability as st
from easgd_local.cli import main


@pytest.mark.parametrize("p", [3, 8])
def test_easgd_radius_is_at_most_one_exactly_where_the_closed_form_says(p):
    etas = np.linspace(0.05, 2.4, 48)
    alphas = np.linspace(0.05, 1.4, 28)
    d_eta, d_alpha = etas[1] - etas[0], alphas[1] - alphas[0]
    disagree = []
    for eta in etas:
        for alpha in alphas:
            stable = st.easgd_radius(p, eta, alpha) <= 1 + 1e-9
            if stable != st.easgd_stable_closed_form(eta, alpha):
                disagree.append((eta, alpha))
    # Only at the edge of the region, within one grid cell of the bound.
    for eta, alpha in disagree:
        near_eta_edge = abs(eta - 2) <= d_eta
        near_alpha_edge = 0 <= eta <= 2 + d_eta and abs(alpha - st.easgd_bound(min(eta, 2))) <= 2 * d_alpha
        assert near_eta_edge or near_alpha_edge, (eta, alpha, st.easgd_radius(p, eta, alpha))
    assert len(disagree) <= 0.05 * len(etas) * len(alphas)


def test_each_easgd_step_matrix_is_symmetric():
    for p, eta, alpha, l in [(3, 0.5, 0.3, 0), (8, 1.7, 0.9, 5), (3, 0.01, 1.2, 2)]:
        m = st.step_matrix(st.easgd_step(p, eta, alpha), p + 1, l)
        np.testing.assert_allclose(m, m.T, rtol=0, atol=0)


@pytest.mark.parametrize("scheme", ["easgd", "admm"])
def test_direct_simulation_agrees_with_the_matrix_product(scheme):
    p = 3
    if scheme == "easgd":
        step, size = st.easgd_step(p, 0.3, 0.2), p + 1
    else:
        step, size = st.admm_step(p, 0.004, 3.0), 2 * p + 1
    s0 = np.random.default_rng(0).normal(size=size)
    cycles = 7
    simulated = st.simulate(step, s0, p, cycles * p)[-1]
    by_matrix = np.linalg.matrix_power(st.cycle_matrix(step, size, p), cycles) @ s0
    np.testing.assert_allclose(simulated, by_matrix, rtol=1e-10, atol=1e-10)


def test_the_papers_admm_example_is_unstable_and_easgd_is_not():
    for p in (3, 8):
        assert st.admm_radius(p, 0.001, 2.5) > 1.0
        assert st.easgd_radius(p, 0.001, 0.3) < 1.0


def test_command_writes_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "s"
    assert main(["stability", "--out", str(out), "--p", "3"]) == 0  # the paper's 60,000 steps
    result = json.loads((out / "stability.json").read_text())
    assert set(result) == {"easgd", "admm", "example"}
    ex = result["example"]["3"]
    assert ex["admm_spectral_radius"] > 1 > ex["easgd_spectral_radius"]
    # ADMM's center first falls, then swings ever wider, far past where it started; EASGD's
    # decays toward the minimum.
    assert abs(ex["admm_center"][-1]) > 100 * ex["start"] and abs(ex["easgd_center"][-1]) < 1.0
    assert (out / "stability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "p = 3" in capsys.readouterr().out


def test_command_refuses_bad_p(capsys, tmp_path):
    assert main(["stability", "--out", str(tmp_path / "s"), "--p", "0"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
