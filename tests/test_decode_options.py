"""Decode options are explicit on the model; only the `zaya` command reads them from the environment."""

import os
import subprocess
import sys

import pytest

from zaya_mlx import cli
from zaya_mlx.decode import DecodeOptions

SWITCHES = ("ZAYA_FUSED", "ZAYA_KERNELS", "ZAYA_COMPILE")


@pytest.mark.parametrize("env, want", [
    ({}, DecodeOptions(fused=None, kernels=True, compile=True)),
    ({"ZAYA_FUSED": "1"}, DecodeOptions(fused=True)),
    ({"ZAYA_FUSED": "off", "ZAYA_KERNELS": "0"}, DecodeOptions(fused=False, kernels=False)),
    ({"ZAYA_COMPILE": "false", "ZAYA_FUSED": "auto"}, DecodeOptions(compile=False)),
])
def test_the_command_reads_the_documented_switches(monkeypatch, env, want):
    for name in SWITCHES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.decode_options() == want


def test_importing_the_package_leaves_the_environment_alone():
    """`import zaya_mlx` (and its model and generation modules) sets no variable, MLX's included; the switches
    set in the environment do not reach a model built through the Python API."""
    code = ("import os; before = dict(os.environ)\n"
            "import zaya_mlx, zaya_mlx.model, zaya_mlx.generation, zaya_mlx.benchmark\n"
            "m = zaya_mlx.benchmark.build_zaya(zaya_mlx.benchmark.small_config())\n"
            "print(dict(os.environ) == before, m.decode_options == zaya_mlx.model.DecodeOptions())")
    env = {**os.environ, "ZAYA_FUSED": "0", "ZAYA_COMPILE": "0"}
    env.pop("MLX_MAX_OPS_PER_BUFFER", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["True", "True"]


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "8"])
def test_a_batch_threshold_is_a_whole_number_from_1(value):
    from zaya_mlx import ZayaError

    with pytest.raises(ZayaError, match="DecodeOptions.group_experts_from is a batch size >= 1, or None for never"):
        DecodeOptions(group_experts_from=value)
    assert DecodeOptions(group_experts_from=1).group_experts_from == 1 and DecodeOptions().group_experts_from is None
