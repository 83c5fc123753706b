"""The MLX bundles people already have: vMLX-family bundles (OsaurusAI's) and mlx-lm's own `zaya.py` layout.

Each bundle is written from a tiny reference model as its converter writes it (Zyphra's 80-layer config and
names, experts stacked by projection; quantized: 4-bit affine, and for vMLX an 8-bit embedding). The reference
is transformers' model holding the weights as stored (dequantized where quantized): our loader must give its
logits, with our semantics (the skip choice adds nothing) whatever the runtime the bundle was made for.
"""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import pytest

import zaya_mlx
from fixtures import make_reference, reference_logits, route_counts, write_bundle_checkpoint
from test_parity import assert_close, seq, to_np
from zaya_mlx import ZayaError
from zaya_mlx.loading import open_checkpoint

BUNDLES = [("vmlx", False), ("vmlx", True), ("mlx-lm-zaya", False), ("mlx-lm-zaya", True)]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """(layout, quantized) -> (folder, torch reference of the stored weights), written once."""
    made = {}

    def get(layout, quantized):
        if (layout, quantized) not in made:
            folder = tmp_path_factory.mktemp(f"bundle-{layout}-{'q' if quantized else 'f'}")
            # "quant": every projection's input fits group 64, so the converters quantize all of them
            ref = write_bundle_checkpoint(make_reference("quant" if quantized else "mqa"), folder, layout, quantized)
            made[layout, quantized] = folder, ref
        return made[layout, quantized]

    return get


@pytest.mark.parametrize("layout,quantized", BUNDLES)
def test_bundle_gives_the_reference_logits(layout, quantized, bundle):
    """Prefill, then token-by-token decoding through the cache, match the reference in fp32."""
    folder, ref = bundle(layout, quantized)
    assert open_checkpoint(folder).layout == layout
    ids = seq(1)
    want = reference_logits(ref, ids)
    assert int(route_counts(ref, ids)[:, -1].sum()) > 0  # some tokens skip: a runtime's own skip rule would differ
    model = zaya_mlx.load_model(str(folder), dtype="float32")
    assert_close(to_np(model(mx.array(ids, dtype=mx.int32))), want, f"{layout} prefill")
    cache = model.make_cache()
    model(mx.array([ids[0][:4]], dtype=mx.int32), cache)
    for t in range(4, len(ids[0])):
        got = to_np(model(mx.array([[ids[0][t]]], dtype=mx.int32), cache))
        assert_close(got, want[:, t : t + 1], f"{layout} decode at {t}")


@pytest.mark.parametrize("layout", ["vmlx", "mlx-lm-zaya"])
def test_quantized_bundle_keeps_its_formats(layout, bundle):
    """Each module is quantized as the bundle says: 4-bit linears and experts, the vMLX embedding in 8 bits; the
    router quantized only where the converter quantized it (vMLX's down-projection; never in mlx-lm's)."""
    folder, _ = bundle(layout, True)
    model = zaya_mlx.load_model(str(folder), dtype="float32")
    layer = model.model.layers[1]
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    assert model.model.embed_tokens.bits == (8 if layout == "vmlx" else 4)
    for module in (layer.self_attn.qkv_proj.in_proj, layer.self_attn.o_proj, layer.mlp.experts.gate_up_proj,
                   layer.mlp.experts.down_proj):
        assert (module.bits, module.group_size) == (4, 64), type(module)
    router = layer.mlp.gate.down_proj
    assert isinstance(router, nn.QuantizedLinear) == (layout == "vmlx")
    assert not isinstance(layer.mlp.gate.router_mlp.fc1, nn.QuantizedLinear)


def test_mlx_lm_loads_a_bundle(bundle):
    """mlx-lm, through our `sanitize`, reads the quantized vMLX bundle to the same logits."""
    from zaya_mlx.mlx_lm_registry import register

    assert register()
    import mlx_lm

    folder, ref = bundle("vmlx", True)
    model, _ = mlx_lm.utils.load_model(folder)
    ids = seq(1)
    assert_close(to_np(model(mx.array(ids, dtype=mx.int32)).astype(mx.float32)), reference_logits(ref, ids),
                 "mlx-lm on the vMLX bundle")


def test_joined_modules_quantized_differently_is_one_line_error(bundle, tmp_path):
    """q, k and both value halves become one projection: a bundle that gives one of them its own format cannot
    load, and says which."""
    folder, _ = bundle("vmlx", True)
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    config = json.loads((broken / "config.json").read_text())
    config["quantization"]["model.layers.2.self_attn.qkv.val_proj1"] = {"group_size": 64, "bits": 8}
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ZayaError, match=r"model\.layers\.2\.self_attn\.qkv\.linear_q and .*val_proj1 are quantized "
                                        r"differently but are joined into model\.layers\.1\.self_attn\.qkv_proj"):
        open_checkpoint(broken)


def test_partly_quantized_joined_modules_is_one_line_error(bundle, tmp_path):
    """A bundle that stores one value half unquantized beside quantized q and k cannot be joined: the error names it."""
    folder, _ = bundle("vmlx", True)
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    stem = "model.layers.0.self_attn.qkv.val_proj2"
    shard = broken / index["weight_map"][f"{stem}.weight"]
    tensors = mx.load(str(shard))
    tensors[f"{stem}.weight"] = mx.dequantize(tensors[f"{stem}.weight"], tensors.pop(f"{stem}.scales"),
                                              tensors.pop(f"{stem}.biases"), group_size=64, bits=4)
    mx.save_safetensors(str(shard), tensors)
    for suffix in ("scales", "biases"):
        del index["weight_map"][f"{stem}.{suffix}"]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ZayaError, match=rf"{stem}\.weight is stored unquantized but is joined with quantized tensors"):
        open_checkpoint(broken)
