"""A DiT conditioned through a frozen pretrained text encoder (all-MiniLM-L6-v2).

Its output enters as text_embedding/text_mask: computed in the train step (online) or cached by
encode_text, with the same loss; the encoder gets no gradient and no optimizer state;
samples take a prompt through the run's encoder, and a run refuses another encoder's weights.
"""
import functools
import json

import jax
import numpy as np
import pytest

from configs import moving_digits
from vidit import batches, diffusion, run as run_lib, sharding, steps, text_encoders
from vidit import train as train_lib
from vidit.errors import ConfigError, LoadError
from vidit.train_state import Setup

from tests.helpers import override


def minilm_config(data_dir, **overrides):
    c = moving_digits.get_config("smoke,cond=text")
    c.data.data_dir = data_dir
    c.train.progress = False
    c.model.text_encoder.kind = "minilm"
    c.model.text_encoder.online = True
    c.model.text_width = 384  # the encoder's width
    return override(c, **overrides)


def test_minilm_run_trains_samples_exports_and_refuses_another_encoder(data_dir, tmp_path):
    from vidit import export, sample
    c = minilm_config(data_dir, **{"train.steps": 4, "train.ckpt_every": 4, "sample.num": 2,
                                   "sample.steps": 2})
    workdir, out = tmp_path / "run", tmp_path / "export"
    summary = train_lib.train(c, str(workdir))
    assert summary["stopped_for"] is None and np.isfinite(summary["losses"]).all()
    identity = json.loads((workdir / text_encoders.IDENTITY_FILE).read_text())
    assert identity["kind"] == "minilm" and len(identity["sha256"]) == 64
    videos, _ = sample.generate(str(workdir), num=2, prompt="a 3 moving up", steps_=2)
    assert videos.shape == (2, 8, 32, 32, 1) and np.isfinite(videos).all()
    export.export(str(workdir), str(out))
    a, _ = sample.generate(str(out), num=2, prompt="a 3 moving up", steps_=2)
    b, _ = sample.generate(str(out), num=2, prompt="a 7 moving left", steps_=2)
    np.testing.assert_allclose(a, videos, atol=1e-5)
    assert np.abs(a - b).max() > 1e-4  # the prompt reaches the model through the encoder
    identity["sha256"] = "0" * 64  # as if trained with other weights
    (out / text_encoders.IDENTITY_FILE).write_text(json.dumps(identity))
    with pytest.raises(LoadError, match="trained with the minilm text encoder"):
        run_lib.load(str(out))


def test_frozen_encoder_config_errors(data_dir, tmp_path):
    c = minilm_config(data_dir, **{"model.text_width": 128})
    with pytest.raises(ConfigError, match="text_width=384"):
        train_lib.train(c, str(tmp_path / "width"))
    c = minilm_config(data_dir, **{"model.text_encoder.online": False})
    with pytest.raises(ConfigError, match="no cached caption embeddings"):
        train_lib.train(c, str(tmp_path / "cached"))
    c = minilm_config(data_dir, **{"model.text_encoder.kind": "t5"})
    with pytest.raises(ConfigError, match="needs config.model.text_encoder.path"):
        train_lib.train(c, str(tmp_path / "t5"))


def test_encode_text_caches_what_the_online_step_computes(data_dir, tmp_path, monkeypatch):
    """encode_text writes each example with its caption's embedding; a step on cached rows has
    the online step's loss, and a cached run never loads the encoder."""
    import tensorflow_datasets as tfds
    from data_pipelines import encode_text, moving_digits as md, pipeline
    tiny = {"num_train": 64, "num_validation": 16}
    folder = encode_text.encode("minilm", "moving_digits", str(tmp_path), data_dir=data_dir,
                                text_len=40, batch_size=8, progress=False, builder_kwargs=tiny)
    info = encode_text.read_info(folder)
    assert info["examples"] == {"train": 64, "validation": 16} and info["width"] == 384

    c = minilm_config(data_dir)
    mesh = sharding.make_mesh(dict(data=2, fsdp=4))
    encoder = text_encoders.load(c.model, mesh, c.sharding_rules)
    assert info["encoder"] == encoder.identity
    cached_rows = [r for r in (tfds.builder("moving_digits_minilm", data_dir=str(tmp_path))
                               .as_data_source("train")[i] for i in range(8))]
    source = md.load_builder(data_dir, **tiny).as_data_source("train")
    spec = pipeline.clip_spec(c.data)
    video = np.stack([pipeline.video_clip(source[int(r["index"])], spec) for r in cached_rows])
    labels = np.asarray([r["label"] for r in cached_rows], np.int32)
    tokens = [encoder.tokenizer(source[int(r["index"])]["caption"].decode(), 40)
              for r in cached_rows]
    online = {"video": video, "label": labels, "text": np.stack([t[0] for t in tokens]),
              "text_mask": np.stack([t[1] for t in tokens])}
    cached = {"video": video, "label": labels,
              "text_embedding": np.stack([r["text_embedding"] for r in cached_rows]),
              "text_mask": np.stack([r["text_mask"] for r in cached_rows])}
    np.testing.assert_array_equal(cached["text_mask"], online["text_mask"])
    setup = Setup(c, mesh, text_encoder=encoder)
    # The encoder is frozen: none of its parameters is in the trained state.
    assert "text" not in setup.abstract.params and setup.num_params() < 5_000_000
    frozen = {"text_encoder": encoder.params, "null_text": encoder.null(40)}
    np.testing.assert_allclose(encode_text.read_null({"name": "moving_digits_minilm",
                                                      "data_dir": str(tmp_path)})
                               ["text_embedding"], frozen["null_text"]["text_embedding"],
                               rtol=1e-4, atol=1e-4)  # another mesh: another summation order
    step = jax.jit(functools.partial(steps.train_step, setup, diffusion.make_objective(c.objective)))
    state = setup.init()
    with sharding.use(mesh, c.sharding_rules):
        losses = [float(step(state, batches.global_batch(b, mesh), frozen)[1]["loss"])
                  for b in (online, cached)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)

    # Training on the cached dataset: the encoder is never loaded.
    c = minilm_config(str(tmp_path), **{"model.text_encoder.online": False, "train.steps": 2,
                                        "train.ckpt_every": 2, "sample.num": 0})
    c.data.name, c.data.builder_kwargs = "moving_digits_minilm", {}
    monkeypatch.setattr(text_encoders, "load", lambda *a, **k: pytest.fail("encoder loaded"))
    summary = train_lib.train(c, str(tmp_path / "run"))
    assert summary["stopped_for"] is None
    saved = json.loads((tmp_path / "run" / text_encoders.IDENTITY_FILE).read_text())
    assert saved == info["encoder"]


def test_sample_captions_span_batches(data_dir):
    """The periodic samples take sample.num captions even when that is more than one batch."""
    c = override(moving_digits.get_config("smoke,cond=text"), **{"data.data_dir": data_dir})
    assert c.data.batch_size == 8
    tokenizer = text_encoders.tokenizer_for(c.model)
    rows = train_lib.sample_batch(c, 12, "validation", tokenizer)
    assert rows["text"].shape == (12, c.model.text_len) and rows["text_mask"].shape[0] == 12
    again = train_lib.sample_batch(c, 8, "validation", tokenizer)
    np.testing.assert_array_equal(rows["text"][:8], again["text"])  # the same first captions
