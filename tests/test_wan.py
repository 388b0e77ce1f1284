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

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from vidit import flops, wan_weights
from vidit.errors import ConfigError, LoadError
from vidit.models import wan

from tests.helpers import import_benchmark

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


def test_parameter_and_flop_counts_match_the_model():
    import jax
    from vidit import hlo_cost  # noqa: F401
    from vidit.train_state import build_model
    cfg, params = wan_weights.load_transformer(FOLDER)
    cfg.text_len = 5
    assert flops.count_params(cfg) == sum(x.size for x in jax.tree.leaves(params))
    assert build_model(cfg, 0).__class__ is wan.WanDiT
    # The counter's forward FLOPs against XLA's count of the compiled forward (one sample).
    model = wan.build(cfg)
    x = jnp.zeros((1, 3, 4, 6, 4))
    cond = {"text_embedding": jnp.zeros((1, 5, 16))}
    compiled = jax.jit(lambda x, t: model(x, t, cond)).lower(x, jnp.zeros((1,))).compile()
    counted = flops.forward_flops(cfg, 3, 4, 6)["total"]
    assert counted == pytest.approx(compiled.cost_analysis()["flops"], rel=0.15)


@pytest.mark.slow
def test_a_tiny_wan_trains_resumes_exports_and_starts_a_run(tmp_path):
    """configs/wan21_t2v.py:smoke through vidit.train (captions via MiniLM): killed at step 3
    and resumed, it matches the straight run; its export holds a diffusers folder that loads
    back to the same weights and starts another run (model.init_from)."""
    from configs import wan21_t2v
    from vidit import export as export_lib, run as run_lib, sharding, train as train_lib
    from vidit.train_state import Setup
    c = wan21_t2v.get_config("smoke")
    c.data.data_dir = str(tmp_path / "tfds")
    c.train.progress, c.sample.num = False, 0
    c.optim.lr = 1e-3  # visible updates in 6 steps
    straight = train_lib.train(c, str(tmp_path / "a"))
    first = train_lib.train(c, str(tmp_path / "b"), stop_at=3)
    second = train_lib.train(c, str(tmp_path / "b"))
    np.testing.assert_allclose(first["losses"] + second["losses"], straight["losses"], rtol=1e-6)
    assert straight["losses"][-1] < straight["losses"][0]

    export_lib.export(str(tmp_path / "a"), str(tmp_path / "export"))
    folder = tmp_path / "export" / "transformer"
    assert json.loads((folder / "config.json").read_text())["_class_name"] == \
        "WanTransformer3DModel"
    trained = run_lib.load(str(tmp_path / "a")).params
    setup = Setup(c, sharding.make_mesh(c.mesh))
    state = setup.with_params(setup.init(), wan_weights.load_for(c.model, str(folder)))
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c.model.init_from = str(folder)
    started = train_lib.train(c, str(tmp_path / "c"), stop_at=1)
    assert started["losses"][0] < straight["losses"][0]  # it starts where the first run ended
    c.model.width = 64
    with pytest.raises(ConfigError, match="another Wan architecture.*width: weights 48"):
        wan_weights.load_for(c.model, str(folder))


def lora_model_config(rank=4):
    from configs import wan21_t2v
    c = wan21_t2v.get_config(f"smoke,lora={rank}")
    return c


def test_lora_adapters_start_as_the_base_model_train_alone_and_merge_exactly():
    from vidit import sharding
    from vidit.models import lora
    from vidit.train_state import Setup, build_model
    c = lora_model_config()
    x = jax.random.normal(jax.random.key(0), (2, 8, 32, 32, 1))
    t = jnp.array([0.3, 0.8])
    cond = {"text_embedding": jax.random.normal(jax.random.key(1), (2, 16, 384))}
    base_cfg = c.model.copy_and_resolve_references()
    base_cfg.lora.rank = 0
    adapted, base = build_model(c.model, 0), build_model(base_cfg, 0)
    np.testing.assert_array_equal(adapted(x, t, cond), base(x, t, cond))  # B = 0 at init

    # Only the adapters get optimizer state and move.
    setup = Setup(c, sharding.make_mesh(dict(data=1, fsdp=1, tensor=1, sequence=1),
                                        jax.devices()[:1]))
    state = setup.init()
    n_adapter = sum(v.size for k, v in _flat(state.params).items() if k[-1] in lora.ADAPTERS)
    n_state = sum(v.size for v in jax.tree.leaves(state.opt_state))
    assert 0 < n_adapter and n_state <= 2 * n_adapter + 16  # Adam's two moments, a count
    grads = jax.tree.map(jnp.ones_like, state.params)
    updates, _ = setup.tx.update(grads, state.opt_state, state.params)
    for key, u in _flat(updates).items():
        assert (np.abs(np.asarray(u)).max() > 0) == (key[-1] in lora.ADAPTERS), key

    # The train step differentiates the adapters alone: the same adapter gradients as a full
    # gradient, zeros elsewhere, and fewer FLOPs (no weight gradients of the base model).
    from vidit import steps

    def loss_fn(params):
        return jnp.mean(jnp.square(setup.model(params)(x, t, cond)))
    full = jax.jit(jax.value_and_grad(loss_fn))
    only = jax.jit(steps._adapter_grads(loss_fn, state.params))
    (l1, g1), (l2, g2) = full(state.params), only(state.params)
    np.testing.assert_allclose(l2, l1, rtol=1e-6)
    for key, g in _flat(g2).items():
        want = _flat(g1)[key] if key[-1] in lora.ADAPTERS else np.zeros_like(g)
        np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-4, atol=1e-7)
    assert max(np.abs(np.asarray(v)).max() for k, v in _flat(g2).items() if k[-1] == "lora_b") > 0
    cost = [f.lower(state.params).compile().cost_analysis()["flops"] for f in (full, only)]
    assert cost[1] < 0.85 * cost[0], cost

    # Merging folds the adapters into the kernels: the same function without them.
    graphdef, params = nnx.split(adapted, nnx.Param)
    params = nnx.to_pure_dict(params)
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: (jax.random.normal(jax.random.key(len(str(p))), v.shape) * 0.1
                      if getattr(p[-1], "key", None) == "lora_b" else v), params)
    state_ = nnx.state(adapted, nnx.Param)
    nnx.replace_by_pure_dict(state_, params)
    out = nnx.merge(graphdef, state_)(x, t, cond)
    g2, s2 = nnx.split(base, nnx.Param)
    nnx.replace_by_pure_dict(s2, lora.merged(params, c.model))
    merged_out = nnx.merge(g2, s2)(x, t, cond)
    assert np.abs(np.asarray(out) - np.asarray(base(x, t, cond))).max() > 1e-3  # adapters act
    np.testing.assert_allclose(merged_out, out, rtol=1e-4, atol=1e-5)

    c.model.lora.targets = ("self_attn/q", "attn/query")
    with pytest.raises(ConfigError, match=r"targets \['attn/query'\] match no Dense layer"):
        build_model(c.model, 0)


def test_a_lora_run_moves_the_adapters_alone(tmp_path):
    """Two steps of configs/wan21_t2v.py:smoke,lora=4 through vidit.train: the adapters move,
    every base weight is the initial one bit for bit."""
    from vidit import run as run_lib, sharding, train as train_lib
    from vidit.models import lora
    from vidit.train_state import Setup
    c = lora_model_config()
    c.data.data_dir = str(tmp_path / "tfds")
    c.train.progress, c.sample.num, c.optim.lr, c.optim.warmup_steps = False, 0, 1e-2, 0
    out = train_lib.train(c, str(tmp_path / "run"), stop_at=2)
    assert np.all(np.isfinite(out["losses"]))
    init = _flat(Setup(c, sharding.make_mesh(c.mesh)).init().params)
    trained = _flat(run_lib.load(str(tmp_path / "run")).params)
    for key, value in trained.items():
        same = np.array_equal(np.asarray(value), np.asarray(init[key]))
        assert same == (key[-1] not in lora.ADAPTERS), key


def _flat(tree):
    from flax import traverse_util
    return traverse_util.flatten_dict(tree)


def test_start_up_checks_refuse_a_wan_without_frozen_text_or_flow():
    from configs import wan21_t2v
    from vidit import checks, diffusion, sharding
    c = wan21_t2v.get_config("smoke")
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1, sequence=1), jax.devices()[:1])
    checks.validate(c, mesh, text_width=384)  # the smoke config passes
    c.model.text_encoder.kind = "byte"
    with pytest.raises(ConfigError, match="kind='wan' reads a frozen encoder"):
        checks.validate(c, mesh)
    c = wan21_t2v.get_config("smoke")
    c.objective = diffusion.default_config("vp")
    with pytest.raises(ConfigError, match="'vp' is not 'flow'"):
        checks.validate(c, mesh, text_width=384)


def test_the_speed_benchmark_builds_wan_at_the_sizes_it_is_given():
    """benchmarks/train_step.py --model wan (the vidit side of versus_torch.py) trains Wan's block
    at the requested sizes: the parameters the analytic count predicts, a finite loss."""
    train_step = import_benchmark("train_step")
    args = train_step.parser().parse_args(
        ["--model", "wan", "--depth", "1", "--width", "24", "--heads", "2", "--mlp", "40",
         "--batch", "1", "--res", "8", "--text_tokens", "3", "--text_width", "16"])
    bench = train_step.Bench(args)
    described = bench.describe()
    assert described["model"]["kind"] == "wan" and described["model"]["mlp"] == 40
    assert described["model"]["params"] == flops.count_params(bench.config.model)
    assert described["text_tokens"] == 3
    assert bool(bench.metrics["finite"])
    assert len(bench.steps(2)) == 2
