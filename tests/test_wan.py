"""Wan 2.1's DiT in vidit: the forward pass matches diffusers' WanTransformer3DModel, and weights
go in and out of the diffusers layout unchanged.

The reference is tests/fixtures/wan (made by its make_fixtures.py with diffusers 0.42.1 on
PyTorch 2.13.0 CPU, float32): a tiny random WanTransformer3DModel folder and its output on
fixed inputs. PyTorch is not needed here.
"""
import copy
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from vidit import wan_weights
from vidit.errors import ConfigError, LoadError
from vidit.models import wan

HERE = os.path.join(os.path.dirname(__file__), "fixtures", "wan")
FOLDER = os.path.join(HERE, "wan_tiny", "transformer")
WEIGHTS = os.path.join(FOLDER, wan_weights.WEIGHTS)


def forward(cfg, params, ref):
    model = wan.build(cfg)
    graphdef, state = nnx.split(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    x = jnp.asarray(ref["latents"].transpose(0, 2, 3, 4, 1))  # (B, C, F, H, W) -> vidit's
    t = jnp.asarray(ref["timestep"]) / 1000.0  # Wan's timesteps are 1000 sigma
    out = nnx.merge(graphdef, state)(x, t, {"text_embedding": jnp.asarray(ref["text"])})
    return np.asarray(out).transpose(0, 4, 1, 2, 3)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_forward_matches_diffusers(scan_layers):
    ref = np.load(os.path.join(HERE, "reference.npz"))
    cfg, params = wan_weights.load_transformer(FOLDER, scan_layers=scan_layers)
    assert (cfg.width, cfg.heads, cfg.depth, cfg.ffn_dim, cfg.text_width) == (24, 2, 2, 48, 16)
    out = forward(cfg, params, ref)
    scale = np.abs(ref["output"]).max()
    assert np.abs(out - ref["output"]).max() <= 1e-4 * scale
    # Every part matters: without the q/k channel permutation (RoPE pair order) it is wrong.
    wrong = copy.deepcopy(params) if not scan_layers else None
    if wrong is not None:
        q = params["blocks"][0]["self_attn"]["q"]["kernel"]
        wrong["blocks"][0]["self_attn"]["q"]["kernel"] = q[:, wan_weights.rope_permutation(24, 2)]
        assert np.abs(forward(cfg, wrong, ref) - ref["output"]).max() > 1e-2 * scale


def test_export_gives_back_the_same_tensors_and_config(tmp_path):
    cfg, params = wan_weights.load_transformer(FOLDER)
    wan_weights.export_transformer(cfg, params, str(tmp_path))
    original, exported = load_file(WEIGHTS), load_file(str(tmp_path / wan_weights.WEIGHTS))
    assert sorted(original) == sorted(exported)
    for name, value in original.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
        assert exported[name].dtype == value.dtype
    theirs = json.load(open(os.path.join(FOLDER, "config.json")))
    ours = json.loads((tmp_path / "config.json").read_text())
    assert {k: v for k, v in theirs.items() if not k.startswith("_")} == \
        {k: v for k, v in ours.items() if not k.startswith("_")}
    # Stacked (scanned) parameters export the same tensors.
    cfg_s, params_s = wan_weights.load_transformer(FOLDER, scan_layers=True)
    assert params_s["blocks"]["mlp"]["fc1"]["kernel"].shape[0] == 2
    wan_weights.export_transformer(cfg_s, params_s, str(tmp_path / "scanned"))
    again = load_file(str(tmp_path / "scanned" / wan_weights.WEIGHTS))
    for name, value in original.items():
        np.testing.assert_array_equal(again[name], value, err_msg=name)


def test_bad_folders_are_named(tmp_path):
    from safetensors.numpy import save_file
    tensors = load_file(WEIGHTS)
    shutil.copy(os.path.join(FOLDER, "config.json"), tmp_path / "config.json")
    broken = dict(tensors)
    broken.pop("blocks.1.ffn.net.2.weight")
    broken["blocks.0.attn1.add_k_proj.weight"] = np.zeros((24, 24), np.float32)
    save_file(broken, str(tmp_path / wan_weights.WEIGHTS))
    with pytest.raises(LoadError, match=r"not mapped: \['blocks.0.attn1.add_k_proj.weight'\].*"
                                        r"missing: \['blocks.1.ffn.net.2.weight'\]"):
        wan_weights.load_transformer(str(tmp_path))
    wrong_shape = dict(tensors)
    wrong_shape["proj_out.weight"] = np.zeros((8, 24), np.float32)
    save_file(wrong_shape, str(tmp_path / wan_weights.WEIGHTS))
    with pytest.raises(LoadError, match=r"proj_out/kernel: model \(24, 16\), weights \(24, 8\)"):
        wan_weights.load_transformer(str(tmp_path))
    hf = json.load(open(os.path.join(FOLDER, "config.json")))
    with pytest.raises(ConfigError, match="image-to-video"):
        wan_weights.model_config({**hf, "image_dim": 1280, "added_kv_proj_dim": 5120})
    with pytest.raises(LoadError, match="config.json not found"):
        wan_weights.load_transformer(str(tmp_path / "nowhere"))


def test_loads_from_a_bucket(bucket_dir):
    for name in ("config.json", wan_weights.WEIGHTS):
        (bucket_dir / "wan" / name).write_bytes(open(os.path.join(FOLDER, name), "rb").read())
    cfg, params = wan_weights.load_transformer(str(bucket_dir / "wan"))
    _, local = wan_weights.load_transformer(FOLDER)
    np.testing.assert_array_equal(params["proj_out"]["kernel"], local["proj_out"]["kernel"])
