"""Maximal-update parametrisation: the coordinate check, and muP == standard at the base width."""
import jax
import numpy as np
import pytest

from vidit import config_lib, mup_check, sharding
from vidit.errors import ConfigError
from vidit.models import mup
from vidit.train_state import Setup, build_model


def small_model(parametrization: str, width: int = 64, heads: int = 2):
    c = config_lib.base_config().model
    c.depth, c.width, c.heads, c.patch = 2, width, heads, (1, 4, 4)
    c.parametrization, c.mup_base_width, c.mup_base_heads = parametrization, 64, 2
    return c


def test_coordinate_check_is_flat_under_mup_and_grows_under_standard():
    # Widths 64 -> 512 (8x), head dim fixed at 32: the change of every layer's activations
    # after 4 Adam steps stays within 2x under muP, and grows several-fold under standard
    # parametrisation in the hidden layers (measured 2026-12-06: standard 7.8-9.3x in the
    # blocks and the condition; muP 0.91-1.48x, docs/mup).
    ratios = {}
    for kind in ("standard", "mup"):
        r = mup_check.coordinate_check(small_model(kind), [64, 512], steps=4, lr=1e-2)
        ratios[kind] = {layer: r[512][layer] / r[64][layer] for layer in r[64]}
    assert set(ratios["mup"]) == {"cond", "embed", "block0", "block1", "out"}
    for layer, ratio in ratios["mup"].items():
        assert 0.5 < ratio < 2.0, (layer, ratios)
    for layer in ("cond", "block0", "block1"):
        assert ratios["standard"][layer] > 4, (layer, ratios)


def test_mup_learning_rates_follow_fan_in_and_equal_standard_at_the_base_width():
    c = small_model("mup", width=256, heads=8)
    m = mup.lr_multipliers(c, lambda mc: build_model(mc, 0))
    block = m["blocks"][0]
    for kernel in (block["attn"]["qkv"], block["attn"]["out"], block["mlp"]["fc1"],
                   block["mlp"]["fc2"], block["ada"], m["final"]["proj"], m["t_embed"]["fc2"]):
        assert kernel["kernel"] == pytest.approx(0.25)  # fan-in 4x the base model's
    for vector in (block["attn"]["qkv"]["bias"], block["attn"]["q_norm"]["scale"],
                   m["patch_embed"]["kernel"], m["t_embed"]["fc1"]["kernel"], m["class_embed"]):
        assert vector == 1.0  # input weights, biases, norms: fan-in does not grow
    # Heads of 32 -> 32 (8 heads at 256): no attention rescale; 64 wide with 2 heads is 32 too.
    assert mup.attention_multiplier(c) == 1.0
    wide_heads = small_model("mup", width=256, heads=2)  # head dim 128 against the base's 32
    assert mup.attention_multiplier(wide_heads) == pytest.approx(0.5)

    # At the base width every factor is 1: the same parameters and the same first update.
    mesh = sharding.make_mesh(dict(fsdp=1), jax.devices()[:1])
    states = {}
    for kind in ("standard", "mup"):
        cfg = config_lib.base_config()
        cfg.model = small_model(kind)
        setup = Setup(cfg, mesh)
        state = setup.init()
        grads = jax.tree.map(lambda p: jax.numpy.ones_like(p) * 0.01, state.params)
        updates, _ = setup.tx.update(grads, state.opt_state, state.params)
        states[kind] = jax.device_get((state.params, updates))
    for a, b in zip(jax.tree.leaves(states["standard"]), jax.tree.leaves(states["mup"])):
        np.testing.assert_array_equal(a, b)


def test_mup_scans_layers_and_refuses_an_unknown_parametrization():
    c = small_model("mup", width=128, heads=4)
    c.scan_layers = True
    m = mup.lr_multipliers(c, lambda mc: build_model(mc, 0))
    assert m["blocks"]["attn"]["qkv"]["kernel"] == pytest.approx(0.5)  # stacked on 'layers'
    assert m["blocks"]["attn"]["qkv"]["bias"] == 1.0
    c.parametrization = "ntk"
    with pytest.raises(ConfigError, match="parametrization='ntk'"):
        build_model(c, 0)
