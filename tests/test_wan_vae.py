"""Wan 2.1's VAE in vidit: encode and decode match diffusers' AutoencoderKLWan, whole-clip and
chunked with the feature cache, and weights go in and out of the diffusers layout unchanged.

The reference is tests/fixtures/wan (made by its make_fixtures.py with diffusers 0.42.1 on
PyTorch 2.13.0 CPU, float32): a tiny random AutoencoderKLWan folder (Wan 2.1's layout, narrow)
and its encode/decode of fixed inputs. PyTorch is not needed here.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from vidit import run as run_lib, sharding, wan_weights
from vidit.errors import ConfigError, LoadError
from vidit.models import wan_vae

HERE = os.path.join(os.path.dirname(__file__), "fixtures", "wan")
FOLDER = os.path.join(HERE, "wan_tiny", "vae")
WEIGHTS = os.path.join(FOLDER, wan_weights.WEIGHTS)


@pytest.fixture(scope="module")
def loaded():
    cfg, params = wan_weights.load_vae(FOLDER)
    model = wan_vae.build(cfg)
    graphdef, state = nnx.split(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    return cfg, params, nnx.merge(graphdef, state), np.load(os.path.join(HERE, "reference_vae.npz"))


def ours(a):  # diffusers' (B, C, F, H, W) -> vidit's (B, F, H, W, C)
    return jnp.asarray(a.transpose(0, 2, 3, 4, 1))


def theirs(a):
    return np.asarray(a).transpose(0, 4, 1, 2, 3)


def close(got, want):
    return np.abs(theirs(got) - want).max() <= 1e-4 * np.abs(want).max()


@nnx.jit
def encode(model, x):
    return model.encode(x)


@nnx.jit
def decode(model, z):
    return model.decode(z)


def test_encode_and_decode_match_diffusers(loaded):
    cfg, _, model, ref = loaded
    assert model.compression == (4, 8, 8) and ref["mean"].shape == (2, 4, 3, 2, 3)
    mean, logvar = encode(model, ours(ref["video"]))
    assert close(mean, ref["mean"]) and close(logvar, ref["logvar"])
    assert close(encode(model, ours(ref["image"]))[0], ref["image_mean"])  # 1 frame: an image
    assert close(decode(model, ours(ref["z"])), ref["decoded"])
    # The feature cache: chunk by chunk (diffusers' own 1 + 4 + 4 frames, and 1 + 8) and one
    # latent frame at a time (diffusers') or two, the same numbers.
    for chunk in (4, 8):
        assert close(model.encode_chunked(ours(ref["video"]), chunk)[0], ref["mean"])
    for chunk in (1, 2):
        assert close(model.decode_chunked(ours(ref["z"]), chunk), ref["decoded"])


def test_each_temporal_rule_matters(loaded):
    """Replicate padding instead of zeros before the clip, or frame 0 as the up-sampler's past,
    changes the output: the test above would catch either mistake."""
    cfg, _, model, ref = loaded
    z = ours(ref["z"])
    up = model.decoder.up_blocks[0].upsamplers[0]
    x = jax.random.normal(jax.random.key(0), (1, 3, 2, 3, 16))
    y, _ = up(x)
    # Output frames 1, 2 come from latent frame 1 with zeros (not frame 0) as past.
    alt, _ = up(x.at[:, 0].set(0.0))
    np.testing.assert_allclose(np.asarray(y[:, 1:3]), np.asarray(alt[:, 1:3]), atol=1e-6)
    conv = model.decoder.conv_in
    replicate = jnp.repeat(z[:, :1], 2, axis=1)
    assert np.abs(np.asarray(conv(z, replicate)[0] - conv(z)[0])).max() > 1e-3


def test_export_gives_back_the_same_tensors_and_config(loaded, tmp_path):
    cfg, params, _, _ = loaded
    wan_weights.export_vae(cfg, params, str(tmp_path))
    original, exported = load_file(WEIGHTS), load_file(str(tmp_path / wan_weights.WEIGHTS))
    assert sorted(original) == sorted(exported)
    for name, value in original.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
        assert exported[name].shape == value.shape and exported[name].dtype == value.dtype
    hf = json.load(open(os.path.join(FOLDER, "config.json")))
    out = json.loads((tmp_path / "config.json").read_text())
    assert {k: v for k, v in hf.items() if not k.startswith("_")} == \
        {k: v for k, v in out.items() if not k.startswith("_")}


def test_bad_folders_are_named(tmp_path):
    tensors = load_file(WEIGHTS)
    shutil.copy(os.path.join(FOLDER, "config.json"), tmp_path / "config.json")
    broken = dict(tensors)
    broken.pop("decoder.conv_out.bias")
    broken["encoder.down_blocks.0.extra.weight"] = np.zeros((2,), np.float32)
    save_file(broken, str(tmp_path / wan_weights.WEIGHTS))
    with pytest.raises(LoadError, match=r"not mapped: \['encoder.down_blocks.0.extra.weight'\]"
                                        r".*missing: \['decoder.conv_out.bias'\]"):
        wan_weights.load_vae(str(tmp_path))
    wrong = dict(tensors)
    wrong["quant_conv.weight"] = np.zeros((8, 8, 1, 1, 2), np.float32)
    save_file(wrong, str(tmp_path / wan_weights.WEIGHTS))
    with pytest.raises(LoadError, match=r"quant_conv/kernel: model \(1, 1, 1, 8, 8\), "
                                        r"weights \(1, 1, 2, 8, 8\)"):
        wan_weights.load_vae(str(tmp_path))
    hf = json.load(open(os.path.join(FOLDER, "config.json")))
    with pytest.raises(ConfigError, match="Wan 2.2"):
        wan_weights.vae_config({**hf, "is_residual": True, "patch_size": 2})
    (tmp_path / "config.json").write_text(json.dumps({**hf, "_class_name": "AutoencoderKL"}))
    with pytest.raises(LoadError, match="holds a AutoencoderKL, not an AutoencoderKLWan"):
        wan_weights.load_vae(str(tmp_path))
    cfg, _ = wan_weights.load_vae(FOLDER)
    model = wan_vae.build(cfg)
    with pytest.raises(ValueError, match="1 \\+ k\\*4 frames"):
        model.encode(jnp.zeros((1, 8, 16, 16, 3)))


def test_a_latent_dit_names_the_wan_vae_as_its_autoencoder(loaded, tmp_path):
    """config.data.autoencoder = a diffusers model folder (its vae/): the frozen Wan VAE with
    Wan's latent normalisation, z = (mean - latents_mean) / latents_std."""
    cfg, _, model, ref = loaded
    shutil.copytree(FOLDER, tmp_path / "model" / "vae")
    ae = run_lib.load_autoencoder(str(tmp_path / "model"), sharding.make_mesh(dict(fsdp=-1)))
    assert ae.compression == (4, 8, 8) and ae.latent_shape(9, 16, 24) == (3, 2, 3, 4)
    video = ours(ref["video"])
    z = jax.jit(ae.encode)(ae.params, video)
    want = (ref["mean"] - np.reshape(cfg.latents_mean, (1, 4, 1, 1, 1))) / \
        np.reshape(cfg.latents_std, (1, 4, 1, 1, 1))
    assert close(z, want)
    np.testing.assert_allclose(np.asarray(jax.jit(ae.decode)(ae.params, z)),
                               np.asarray(decode(model, encode(model, video)[0])), atol=1e-5)
    with pytest.raises(ConfigError, match="frames must be 1 \\+ k\\*4"):
        ae.latent_shape(8, 16, 24)


def test_the_wan_config_with_its_vae_trains_on_the_latents_of_81_frame_clips():
    """configs/wan21_t2v.py:vae=FOLDER: the data are 81-frame pixel clips whose Wan-VAE latents
    are the clip the config without it compiles (21 x 60 x 104 x 16 at 480p)."""
    from configs import wan21_t2v
    from vidit.autoencoder import Autoencoder, input_shape
    ae = Autoencoder.wan("wan", wan_vae.default_config())  # the full-size Wan 2.1 VAE, abstract
    for res in ("480p", "720p"):
        latent = wan21_t2v.get_config(f"res={res}")
        pixel = wan21_t2v.get_config(f"res={res},vae=/models/Wan2.1-T2V-1.3B-Diffusers")
        assert pixel.data.autoencoder.endswith("Diffusers") and pixel.data.channels == 3
        assert input_shape(pixel, ae) == input_shape(latent) == \
            (latent.data.num_frames, latent.data.height, latent.data.width, 16)


def test_loads_from_a_bucket(bucket_dir, loaded):
    for name in ("config.json", wan_weights.WEIGHTS):
        (bucket_dir / "vae" / name).write_bytes(open(os.path.join(FOLDER, name), "rb").read())
    assert wan_weights.is_vae_folder(str(bucket_dir / "vae"))
    _, params = wan_weights.load_vae(str(bucket_dir / "vae"))
    np.testing.assert_array_equal(params["quant_conv"]["kernel"],
                                  loaded[1]["quant_conv"]["kernel"])


def test_the_export_of_a_run_on_the_wan_vae_holds_its_vae(loaded, tmp_path, monkeypatch):
    """vidit.export of a Wan DiT whose autoencoder is a Wan VAE writes transformer/ and vae/,
    the latter tensor for tensor the folder diffusers wrote."""
    import types

    import ml_collections

    from vidit import export as export_lib
    from vidit.autoencoder import Autoencoder
    cfg, params, _, _ = loaded
    dit_cfg, dit_params = wan_weights.load_transformer(os.path.join(HERE, "wan_tiny",
                                                                    "transformer"))
    run = types.SimpleNamespace(
        params=dit_params, step=7, config=ml_collections.ConfigDict(dict(model=dit_cfg)),
        autoencoder=Autoencoder.wan(FOLDER, cfg, params))
    monkeypatch.setattr(export_lib.run_lib, "load", lambda workdir: run)
    export_lib.export(str(tmp_path / "run"), str(tmp_path / "out"))
    assert (tmp_path / "out" / "transformer" / wan_weights.WEIGHTS).exists()
    exported = load_file(str(tmp_path / "out" / "vae" / wan_weights.WEIGHTS))
    original = load_file(WEIGHTS)
    assert sorted(exported) == sorted(original)
    for name, value in original.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
