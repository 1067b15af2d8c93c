"""visstg.config.choose_openmp_wait_policy: passive OpenMP waiting only when the CPU is busy."""

import pytest

from visstg import config


@pytest.fixture
def no_policy(monkeypatch):
    """No exported policy, and torch treated as not imported yet (as at train start)."""
    import sys

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delitem(sys.modules, "torch", raising=False)


@pytest.mark.parametrize("busy, expected", [(0.9, "PASSIVE"), (0.05, None), (None, None)])
def test_policy_follows_how_busy_the_cpu_is(monkeypatch, no_policy, busy, expected):
    import os

    monkeypatch.setattr(config, "_cpu_busy_fraction", lambda sample_s: busy)
    assert config.choose_openmp_wait_policy() == expected
    assert os.environ.get("OMP_WAIT_POLICY") == expected


def test_nothing_is_set_once_torch_is_imported(monkeypatch, no_policy):
    import os
    import sys
    import types

    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    monkeypatch.setattr(config, "_cpu_busy_fraction", lambda sample_s: 1.0)
    assert config.choose_openmp_wait_policy() is None
    assert "OMP_WAIT_POLICY" not in os.environ


def test_a_user_setting_is_never_changed(monkeypatch):
    import os

    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setattr(config, "_cpu_busy_fraction", lambda sample_s: 1.0)
    assert config.choose_openmp_wait_policy() is None
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_busy_fraction_is_a_fraction_on_linux():
    busy = config._cpu_busy_fraction(0.05)
    assert busy is None or 0.0 <= busy <= 1.0
