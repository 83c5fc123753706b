"""Reading config.json in either layout: what Zyphra's legacy keys mean, and one-line errors for bad values."""

import pytest

from fixtures import legacy_config, make_config
from zaya_mlx import ZayaError
from zaya_mlx.config import ZayaConfig


def legacy(**changes) -> dict:
    """The base fixture's legacy config (3 ZAYA layers = 6 original layers) with `changes`."""
    return {**legacy_config(make_config("base")), **changes}


@pytest.mark.parametrize(
    "swa_layers, layer_types, window",
    [
        ([4096, 0, 0, 0, 0, 0], ["hybrid_sliding", "hybrid", "hybrid"], 4097),  # entry = window - 1
        ([0, 0, 0, 0, 0, 0], ["hybrid"] * 3, None),  # all full attention
        ([], ["hybrid"] * 3, None),
        ([0, 0, 4, 4, 4, 0], ["hybrid", "hybrid_sliding", "hybrid_sliding"], 5),  # MoE entries carry nothing
    ],
)
def test_legacy_swa_layers_are_windows_per_original_layer(swa_layers, layer_types, window):
    """Zyphra's vLLM reading: `w = swa_layers[layer]`, sliding when w != 0, over w + 1 positions."""
    config = ZayaConfig.from_dict(legacy(swa_layers=swa_layers))
    assert config.layer_types == layer_types and config.sliding_window == window


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"swa_layers": [0, 2]}, "one entry per original layer"),  # the old reading: indices of sliding layers
        ({"swa_layers": [4, 0, 8, 0, 0, 0]}, "different windows"),
        ({"swa_layers": [4, 0, -1, 0, 0, 0]}, "integers >= 0"),
        ({"swa_layers": [4, 0, 0, 0, 0, 0], "sliding_window": 9}, "sliding_window=9"),
    ],
)
def test_legacy_swa_layers_errors(changes, words):
    with pytest.raises(ZayaError) as info:
        ZayaConfig.from_dict(legacy(**changes))
    assert words in str(info.value) and "\n" not in str(info.value)
