"""Evaluation: Frechet distance, precision/recall, and the frame classifier."""
import json

import numpy as np
import pytest

from vidit.eval import classifier, metrics

# Small on purpose: the whole file must stay well under a minute and a half on 2 cores.
NUM_TRAIN_CLIPS = 600
NUM_HELD_OUT_CLIPS = 200
TRAIN_STEPS = 500


def _with_exact_stats(rng, n, mean, std):
    """n samples whose *empirical* mean and covariance are exactly mean and diag(std^2).

    Whitening the draws removes sampling error, so Frechet distances can be
    compared with closed forms to round-off precision.
    """
    x = rng.normal(size=(n, len(mean)))
    x -= x.mean(axis=0)
    cov = np.cov(x, rowvar=False)
    x = x @ np.linalg.inv(np.linalg.cholesky(cov)).T  # empirical covariance -> identity
    return x * std + mean


# --------------------------------------------------------------------------- metrics


def test_class_accuracy():
    assert metrics.class_accuracy(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])) == 0.75
    with pytest.raises(ValueError):
        metrics.class_accuracy(np.array([1, 2]), np.array([1, 2, 3]))


def test_frechet_distance_of_identical_sets_is_zero():
    feats = np.random.default_rng(0).normal(size=(500, 16))
    assert metrics.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_shifted_gaussians_is_squared_mean_difference():
    rng = np.random.default_rng(1)
    dim = 8
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    std = rng.uniform(0.5, 2.0, size=dim)
    a = _with_exact_stats(rng, 400, mu1, std)
    b = _with_exact_stats(rng, 300, mu2, std)
    assert metrics.frechet_distance(a, b) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-8)


def test_frechet_distance_matches_closed_form_for_diagonal_covariances():
    # For diagonal covariances, Tr(S1 + S2 - 2 (S1 S2)^1/2) = sum (s1 - s2)^2 with s the stds.
    rng = np.random.default_rng(2)
    dim = 12
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    std1, std2 = rng.uniform(0.2, 3.0, size=dim), rng.uniform(0.2, 3.0, size=dim)
    a = _with_exact_stats(rng, 500, mu1, std1)
    b = _with_exact_stats(rng, 500, mu2, std2)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((std1 - std2) ** 2)
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    # The distance is symmetric and also exposed on precomputed statistics.
    assert metrics.frechet_distance(b, a) == pytest.approx(expected, rel=1e-8)
    assert metrics.frechet_distance_from_stats(mu1, np.diag(std1**2), mu2, np.diag(std2**2)) == pytest.approx(
        expected, rel=1e-8
    )


def test_frechet_distance_with_singular_covariances_is_finite():
    # Fewer samples than dimensions: both covariances are singular.
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(10, 32)), rng.normal(size=(10, 32)) + 1.0
    d = metrics.frechet_distance(a, b)
    assert np.isfinite(d) and d > 0


def test_precision_recall_of_identical_sets_is_one():
    feats = np.random.default_rng(4).normal(size=(300, 8))
    assert metrics.precision_recall(feats, feats, k=3) == (1.0, 1.0)


def test_precision_recall_of_disjoint_clusters_is_low():
    rng = np.random.default_rng(5)
    real = rng.normal(size=(300, 8))
    fake = rng.normal(size=(300, 8)) + 20.0
    precision, recall = metrics.precision_recall(real, fake, k=3)
    assert precision < 0.05 and recall < 0.05


def test_precision_recall_separates_fidelity_from_coverage():
    # Fakes that cover only one of two real clusters are realistic (precision
    # high) but miss half the data (recall about one half).
    rng = np.random.default_rng(6)
    real = np.concatenate([rng.normal(size=(200, 4)), rng.normal(size=(200, 4)) + 20.0])
    fake = rng.normal(size=(400, 4))
    precision, recall = metrics.precision_recall(real, fake, k=3)
    assert precision > 0.9
    assert 0.4 < recall < 0.6


# --------------------------------------------------------------------------- classifier


def _clips(split, num, seed):
    """Moving-digits clips as float [N, T, 32, 32, 1] in [-1, 1] and labels [N]."""
    from data_pipelines import moving_digits

    examples = list(moving_digits.generate(split, num, seed))
    videos = np.stack([e["video"] for e in examples]).astype(np.float32) / 127.5 - 1.0
    return videos, np.array([e["label"] for e in examples], np.int32)


@pytest.fixture(scope="module")
def val_clips():
    # The validation split's source digits (other writers) never appear in training.
    return _clips("validation", NUM_HELD_OUT_CLIPS, seed=1)


@pytest.fixture(scope="module")
def trained():
    videos, labels = _clips("train", NUM_TRAIN_CLIPS, seed=0)
    return classifier.train_classifier(videos, labels, steps=TRAIN_STEPS, batch_size=64, seed=0, lr=2e-3)


def test_classifier_is_accurate_on_held_out_clips(trained, val_clips):
    # New clips (another seed: new motions, mostly unseen source images) from the
    # training writers: a few hundred steps already classify these well.
    videos, labels = _clips("train", NUM_HELD_OUT_CLIPS, seed=2)
    pred, probs = classifier.classify_videos(trained, videos)
    assert pred.shape == labels.shape and probs.shape == (len(labels), 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert metrics.class_accuracy(pred, labels) > 0.9
    # Unseen writers are harder (the full training run reaches ~96%, this short one ~88%).
    val_pred, _ = classifier.classify_videos(trained, val_clips[0])
    assert metrics.class_accuracy(val_pred, val_clips[1]) > 0.8


def test_features_shapes_and_time_average(trained, val_clips):
    videos = val_clips[0][:5]
    mean_feats, frame_feats = classifier.features(trained, videos)
    dim = trained.config["feature_dim"]
    assert frame_feats.shape == (5, videos.shape[1], dim)
    np.testing.assert_allclose(mean_feats, frame_feats.mean(axis=1), rtol=1e-6)
    # Batching must not change a video's features (evaluation runs in padded chunks).
    np.testing.assert_allclose(classifier.features(trained, videos[:1])[0], mean_feats[:1], rtol=1e-5, atol=1e-6)


def test_save_load_round_trip_gives_identical_outputs(trained, val_clips, tmp_path):
    videos = val_clips[0][:8]
    classifier.save(trained, tmp_path / "clf", extra={"val_accuracy": 0.5})
    restored = classifier.load(tmp_path / "clf")
    assert restored.config == trained.config
    np.testing.assert_array_equal(classifier.video_logits(restored, videos), classifier.video_logits(trained, videos))
    np.testing.assert_array_equal(classifier.features(restored, videos)[1], classifier.features(trained, videos)[1])
    # A second save over the first (e.g. a retrained classifier) replaces it.
    classifier.save(restored, tmp_path / "clf")
    assert classifier.saved_info(tmp_path / "clf")["extra"] == {}


def test_get_or_train_classifier_uses_the_cache(trained, val_clips, tmp_path, capsys):
    videos = val_clips[0][:4]
    classifier.save(trained, tmp_path, extra={"val_accuracy": 0.99})
    model = classifier.get_or_train_classifier(tmp_path)  # would take minutes if it trained
    assert "loaded" in capsys.readouterr().out
    np.testing.assert_array_equal(classifier.video_logits(model, videos), classifier.video_logits(trained, videos))
    with pytest.raises(ValueError, match="channels"):
        classifier.get_or_train_classifier(tmp_path, data_cfg={"channels": 3})


def test_load_missing_directory_names_the_path(tmp_path):
    missing = tmp_path / "no_such_classifier"
    with pytest.raises(FileNotFoundError, match="no_such_classifier"):
        classifier.load(missing)


def test_load_corrupt_directory_names_the_path(trained, tmp_path):
    directory = tmp_path / "broken"
    classifier.save(trained, directory)
    config = json.loads((directory / "classifier_config.json").read_text())
    config["architecture"]["feature_dim"] += 1  # weights no longer fit the architecture
    (directory / "classifier_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="broken"):
        classifier.load(directory)
    (directory / "classifier_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken"):
        classifier.load(directory)


def test_train_classifier_rejects_mismatched_labels():
    with pytest.raises(ValueError):
        classifier.train_classifier(np.zeros((4, 2, 32, 32, 1)), np.zeros(3), steps=1)


def test_pipeline_clips_are_the_runs_frames(data_dir):
    """The classifier's training clips for a run's data layout come through the input pipeline,
    at that run's clip length, with the generator's labels."""
    from data_pipelines import data_config, moving_digits
    cfg = data_config.defaults()
    cfg.update(dict(data_dir=data_dir, num_frames=4,
                    builder_kwargs={"num_train": 64, "num_validation": 16}))
    videos, labels = classifier._pipeline_clips(cfg, "validation", 16, seed=0, train=False)
    assert videos.shape == (16, 4, 32, 32, 1) and videos.min() >= -1 and videos.max() <= 1
    truth = sorted(e["label"] for e in moving_digits.generate("validation", 16, seed=0))
    assert sorted(labels.tolist()) == truth


def test_text_runs_are_scored_on_seen_and_paraphrased_captions():
    """vidit.evaluate conditions a text run on each label's captions, in the dataset's phrasing
    and in paraphrases, tokenized for the run's encoder; other data is refused by name."""
    from configs import text_digits
    from data_pipelines import moving_digits
    from vidit import evaluate, text_encoders
    c = text_digits.get_config("encoder=byte")
    labels = np.arange(20) % 10
    sets = evaluate.prompt_sets(c, labels)
    assert list(sets) == ["seen", "paraphrase"]
    tokenizer = text_encoders.tokenizer_for(c.model)
    for name, style in (("seen", "varied"), ("paraphrase", "paraphrase")):
        cond, examples = sets[name]
        texts = moving_digits.captions_for(labels, style, seed=1)
        assert examples == texts[:3]
        ids, mask = tokenizer(texts[7], c.model.text_len)
        np.testing.assert_array_equal(cond["text"][7], ids)
        np.testing.assert_array_equal(cond["text_mask"][7], mask)
        assert cond["text"].shape == (20, c.model.text_len)
    assert not set(sets["seen"][1][0].split()) & {"number", "numeral", "handwritten"}
    c.data.name = "my_videos"
    with pytest.raises(ValueError, match="my_videos"):
        evaluate.prompt_sets(c, labels)


def test_frame_agreement_counts_frames_that_keep_their_videos_class():
    frames = np.array([[3, 3, 3, 3], [5, 5, 2, 2], [1, 7, 7, 7]])
    assert metrics.frame_agreement(frames, np.array([3, 5, 7])) == pytest.approx(9 / 12)
    with pytest.raises(ValueError, match="do not match"):
        metrics.frame_agreement(frames, np.array([3, 5]))


def test_per_class_accuracy_and_top_confusions_name_the_failing_digits():
    labels = np.array([0, 0, 1, 1, 1, 1, 2, 2, 4, 4])
    pred = np.array([0, 0, 7, 7, 1, 7, 2, 5, 9, 9])
    assert metrics.per_class_accuracy(pred, labels, 5) == [1.0, 0.25, 0.5, None, 0.0]
    # 1 -> 7 three times, then 4 -> 9 twice, then 2 -> 5 once
    assert metrics.top_confusions(pred, labels) == [(1, 7, 3), (4, 9, 2), (2, 5, 1)]
    assert metrics.top_confusions(pred, labels, top=1) == [(1, 7, 3)]
    assert metrics.top_confusions(labels, labels) == []
    report = {"workdir": "w", "checkpoint_step": 1, "num": 10, "guidance": 5.0, "results": [{
        "steps": 50, "condition": "labels", "class_accuracy": 0.5, "frame_agreement": 0.9,
        "frechet_distance": 1.0, "frechet_distance_temporal": 1.0, "precision": 0.5,
        "recall": 0.5, "samples_per_s": 1.0,
        "class_accuracy_by_class": metrics.per_class_accuracy(pred, labels, 5),
        "top_confusions": metrics.top_confusions(pred, labels)}]}
    from vidit import evaluate
    text = evaluate.markdown(report)
    assert "1: 25%" in text and "3:" not in text.split("by class")[1].split(";")[0]
    assert "1 as 7 (3)" in text
