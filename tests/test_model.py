"""Video DiT model tests: patches, adaLN-Zero, 3D RoPE, any grid, scan/remat, conditioning,
parameter/FLOP counts, logical-axis sharding, attention backends and mixed precision.

Kept small for CPU: the 'tiny' size (depth 2, width 64, 2 heads), videos [4, 4, 8, 8, 1]. Only two
models are initialised for real (class and text conditioning, list-of-blocks layout); every other
variant (scan, remat, bf16, other sizes) gets its structure from an abstract build (`eval_shape`)
and reuses those parameters, so each test pays for at most a compile or two.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from vidit.models import byte_tokenizer
from vidit import config_lib, flops, sharding
from vidit.models import attention as attention_lib
from vidit.models import dit, layers
from vidit.errors import ConfigError

# Overrides of the two really initialised models (a 1-block caption encoder keeps text cheap).
VARIANT = {"class": {}, "text": {"cond": "text", "text_depth": 1}}
B = 4  # divides over data x fsdp = 4 in the sharded test, so every test can share compiles
VIDEO = (4, 8, 8)  # (T, H, W): grid (4, 4, 4) = 64 tokens with patch (1, 2, 2)
TEXT_LEN = 16
# Captions shorter than TEXT_LEN - 1 bytes, so none is truncated at either padded length.
CAPTIONS = ["a 3 moving up", "two digits", "", "7"]


# ------------------------------------------------------------------------------------ helpers
# XLA:CPU spends most of a test's time compiling; its LLVM optimisation buys nothing for these
# tiny shapes. HLO-level passes (fusion, cost analysis, SPMD partitioning) are unaffected.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
# The small pure functions under test, jitted: one compile each instead of one per eager op.
rope_angles = jit(layers.rope_angles, static_argnums=(0, 1))
apply_rope = jit(layers.apply_rope)


def model_cfg(**overrides):
    """The tiny model config (list-of-blocks layout unless scan_layers=True is given)."""
    c = config_lib.base_config()
    config_lib.set_size(c.model, "tiny")
    c.model.scan_layers = False
    for key, value in overrides.items():
        if key == "size":
            config_lib.set_size(c.model, value)
        else:
            c.model[key] = value
    return c.model


def _key(**overrides):
    """Canonical cache key: overrides equal to the tiny defaults are dropped (one compile each)."""
    default = model_cfg()
    return tuple(sorted((k, v) for k, v in overrides.items()
                        if k == "size" or default[k] != v))


@functools.lru_cache(maxsize=None)
def abstract_model(key):
    """Model with ShapeDtypeStruct parameters: structure, names and shapes, no compute."""
    cfg = model_cfg(**dict(key))
    return nnx.eval_shape(lambda: dit.build(cfg))


def graphdef(**overrides):
    return nnx.graphdef(abstract_model(_key(**overrides)))


@functools.lru_cache(maxsize=None)
def initial_params(cond):
    """Real initial parameters (pure dict) of the tiny list-of-blocks model.

    The constructor dit.build uses, run under one jit (as train_state.Setup.init does) with an RBG
    key: eager init compiles threefry's truncated normal once per parameter shape (~0.5 s each on
    CPU). Which random numbers come out does not matter here; the zero-initialised ones do.
    """
    cfg = model_cfg(**VARIANT[cond])

    def init():
        model = dit.VideoDiT(cfg, rngs=nnx.Rngs(params=jax.random.key(0, impl="unsafe_rbg")))
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    return jit(init)()


def perturb(params, scale=0.05, seed=0, where=lambda path: True):
    """params + scale * N(0, 1) on the leaves whose key path satisfies `where` (in numpy)."""
    rng = np.random.RandomState(seed)

    def leaf(path, a):
        a = np.asarray(a)
        if not where(jax.tree_util.keystr(path)):
            return jnp.asarray(a)
        return jnp.asarray(a + scale * rng.standard_normal(a.shape).astype(a.dtype))

    return jax.tree_util.tree_map_with_path(leaf, params)


def stack_blocks(params, depth):
    """List-of-blocks params -> scan layout (blocks stacked on a leading 'layers' axis)."""
    out = dict(params)
    out["blocks"] = jax.tree.map(lambda *a: jnp.asarray(np.stack(a)),
                                 *[params["blocks"][i] for i in range(depth)])
    return out


@functools.lru_cache(maxsize=None)
def apply_fn(key):
    """Jitted (params, x, t, cond) -> model output for the model config `key` (cached)."""
    g = nnx.graphdef(abstract_model(key))
    return jit(lambda p, x, t, cond: nnx.merge(g, p)(x, t, cond))


def run(params, x, t, conditioning, **overrides):
    return np.asarray(apply_fn(_key(**overrides))(params, x, t, conditioning))


def inputs(video=VIDEO, batch=B, channels=1, seed=0):
    rng = np.random.RandomState(seed)
    x = jnp.asarray(rng.standard_normal((batch, *video, channels)).astype(np.float32))
    t = jnp.asarray(np.linspace(0.1, 0.9, batch).astype(np.float32))
    return x, t


LABELS = jnp.array([0, 3, 5, 9], jnp.int32)


def text_tokens(captions=CAPTIONS, length=TEXT_LEN):
    return jnp.asarray(np.stack([byte_tokenizer.encode(c, length) for c in captions]))


def cond_for(cond):
    return {"class": {"label": LABELS}, "text": {"text": text_tokens()}, "none": {}}[cond]


def num_params(tree):
    return sum(math.prod(np.shape(a)) for a in jax.tree.leaves(tree))


# ------------------------------------------------------------------------------ 1. patchify
@pytest.mark.parametrize("patch,channels", [((1, 2, 2), 1), ((2, 4, 4), 3), ((1, 1, 1), 4)])
def test_patchify_unpatchify_round_trip_is_exact(patch, channels):
    """unpatchify(patchify(x)) == x bit for bit; tokens t-h-w ordered, (pt, ph, pw, C) inside."""
    x = jnp.asarray(np.random.RandomState(1).standard_normal((2, 4, 8, 8, channels)), jnp.float32)
    tokens, grid = layers.patchify(x, patch)
    pt, ph, pw = patch
    assert grid == (4 // pt, 8 // ph, 8 // pw)
    assert tokens.shape == (2, math.prod(grid), pt * ph * pw * channels)
    np.testing.assert_array_equal(layers.unpatchify(tokens, grid, patch, channels), x)
    # The token at grid position (i, j, k) holds exactly that spacetime box of x.
    i, j, k = grid[0] - 1, grid[1] // 2, 1
    box = np.asarray(x)[1, i * pt:(i + 1) * pt, j * ph:(j + 1) * ph, k * pw:(k + 1) * pw]
    index = (i * grid[1] + j) * grid[2] + k
    np.testing.assert_array_equal(tokens[1, index], box.reshape(-1))


@pytest.mark.parametrize("shape,patch", [((1, 3, 8, 8, 1), (2, 2, 2)),
                                         ((1, 4, 7, 8, 1), (1, 2, 2)),
                                         ((1, 4, 8, 6, 2), (1, 4, 4))])
def test_patchify_rejects_indivisible_input_naming_the_config_key(shape, patch):
    with pytest.raises(ConfigError, match=r"config\.model\.patch"):
        layers.patchify(jnp.zeros(shape), patch)


def test_model_rejects_indivisible_video():
    """The model surfaces the same ConfigError (before any compute)."""
    model = nnx.merge(graphdef(), initial_params("class"))
    x, t = inputs(video=(4, 7, 8))
    with pytest.raises(ConfigError, match=r"config\.model\.patch"):
        model(x, t, {"label": LABELS})


# --------------------------------------------------------------------------- 2. adaLN-Zero
@functools.lru_cache(maxsize=None)
def _block_fn(cond):
    block_def = nnx.graphdef(abstract_model(_key(**VARIANT[cond])).blocks[0])
    return jit(lambda p, x, c, rope, text, mask: nnx.merge(block_def, p)(x, c, rope, text, mask))


@pytest.mark.parametrize("cond", ["class", "text"])
def test_every_block_is_identity_at_init_and_not_after_perturbing_gates(cond):
    """adaLN-Zero: zero gates (and zero cross-attention output) make each DiTBlock the identity."""
    params = initial_params(cond)
    cfg = model_cfg(**VARIANT[cond])
    rng = np.random.RandomState(2)
    grid = (4, 4, 4)
    x = jnp.asarray(rng.standard_normal((B, math.prod(grid), cfg.width)), jnp.float32)
    c = jnp.asarray(rng.standard_normal((B, cfg.width)), jnp.float32)
    rope = rope_angles(grid, cfg.width // cfg.heads)
    text = mask = None
    if cond == "text":
        text = jnp.asarray(rng.standard_normal((B, TEXT_LEN, cfg.text_width)), jnp.float32)
        mask = text_tokens() > 0
    fn = _block_fn(cond)
    for i in range(cfg.depth):
        y = fn(params["blocks"][i], x, c, rope, text, mask)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x), err_msg=f"block {i}")
    gated = perturb(params, scale=0.1, where=lambda p: "['ada']['kernel']" in p)
    for i in range(cfg.depth):
        y = fn(gated["blocks"][i], x, c, rope, text, mask)
        assert np.abs(np.asarray(y) - np.asarray(x)).max() > 1e-3, f"block {i} ignores its gates"


@pytest.mark.parametrize("cond", ["class", "text"])
def test_model_output_is_exactly_zero_at_init(cond):
    """The zero-initialised final projection makes the whole model output 0 at init."""
    params = initial_params(cond)
    x, t = inputs()
    out = run(params, x, t, cond_for(cond), **VARIANT[cond])
    assert out.shape == x.shape and out.dtype == np.float32
    assert np.all(out == 0)
    out = run(perturb(params, where=lambda p: p.startswith("['final']")), x, t, cond_for(cond),
              **VARIANT[cond])
    assert np.abs(out).max() > 1e-3


@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_time_embedding_scale_bounds_its_time_derivative(scale):
    """time_scale s: the features are sinusoids of s t, so d/dt of each is at most s (MeanFlow's
    jvp differentiates through them; at DiT's 1000 the fast ones dominate du/dt)."""
    t = jnp.linspace(0.0, 1.0, 64)
    emb, d_emb = jax.jvp(lambda t: layers.timestep_embedding(t, 256, scale=scale), (t,),
                         (jnp.ones_like(t),))
    np.testing.assert_allclose(emb, layers.timestep_embedding(t * scale / 1000.0, 256), atol=2e-4)
    assert float(jnp.max(jnp.abs(d_emb))) <= scale * 1.0001
    assert float(jnp.max(jnp.abs(d_emb))) >= 0.5 * scale  # the fastest feature moves at ~s


# ---------------------------------------------------------------------------------- 3. RoPE
def test_rope_split_covers_head_dim():
    """(t, h, w) parts sum to head_dim, each even, h = w = 2 floor(d / 6) (Wan); the angle table
    has one column per rotated pair."""
    for head_dim in range(2, 258, 2):
        split = layers.rope_split(head_dim)
        assert sum(split) == head_dim, head_dim
        assert all(part % 2 == 0 and part >= 0 for part in split), (head_dim, split)
        assert split[1] == split[2] == 2 * (head_dim // 6), (head_dim, split)
    assert layers.rope_split(72) == (24, 24, 24)  # XL: 1152 / 16
    for head_dim in (32, 72):
        cos, sin = rope_angles((2, 3, 2), head_dim)
        assert cos.shape == sin.shape == (12, head_dim // 2)


def test_rope_rejects_odd_head_dim():
    with pytest.raises(ConfigError, match="head dim"):
        layers.rope_split(33)


def _rotated(vec, grid, head_dim):
    cos, sin = rope_angles(grid, head_dim)
    n = math.prod(grid)
    x = jnp.asarray(np.broadcast_to(np.asarray(vec, np.float32), (1, n, 1, head_dim)))
    return np.asarray(apply_rope(x, cos, sin))[0, :, 0].astype(np.float64)


def test_rope_scores_depend_only_on_relative_position_per_axis():
    """q(p + s) . k(p' + s) == q(p) . k(p') for a shift s along t, h or w, and the score does
    change when only one of the two positions moves along that axis."""
    head_dim, grid = 32, (6, 7, 7)
    rng = np.random.RandomState(3)
    q = _rotated(rng.standard_normal(head_dim), grid, head_dim)
    k = _rotated(rng.standard_normal(head_dim), grid, head_dim)

    def score(p, p2):
        index = lambda pos: (pos[0] * grid[1] + pos[1]) * grid[2] + pos[2]  # noqa: E731
        return q[index(p)] @ k[index(p2)]

    p, p2 = np.array([1, 2, 3]), np.array([0, 4, 1])
    base = score(p, p2)
    for axis in range(3):
        for step in (1, 2):
            s = np.zeros(3, int)
            s[axis] = step
            np.testing.assert_allclose(score(p + s, p2 + s), base, rtol=1e-5, atol=1e-5,
                                       err_msg=f"axis {axis} shift {step}")
            assert abs(score(p + s, p2) - base) > 1e-3, f"axis {axis} carries no position"
    # All three at once, too.
    np.testing.assert_allclose(score(p + 2, p2 + 2), base, rtol=1e-5, atol=1e-5)


def test_rope_preserves_norms_and_is_identity_at_origin():
    grid, head_dim = (3, 4, 5), 32
    cos, sin = rope_angles(grid, head_dim)
    x = jnp.asarray(np.random.RandomState(4).standard_normal((2, 60, 3, head_dim)), jnp.float32)
    y = np.asarray(apply_rope(x, cos, sin))
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(y[:, 0], np.asarray(x)[:, 0], rtol=1e-6)  # position (0, 0, 0)
    assert np.abs(y[:, 1:] - np.asarray(x)[:, 1:]).max() > 1e-2


# ------------------------------------------------------------------------------ 4. any grid
def test_same_params_run_on_any_grid():
    """One set of parameters runs on grids of different shapes and token counts."""
    params = perturb(initial_params("class"))
    for video in [(4, 8, 8), (2, 16, 8), (8, 4, 4)]:
        x, t = inputs(video=video)
        out = run(params, x, t, {"label": LABELS})
        assert out.shape == x.shape, video
        assert np.all(np.isfinite(out)), video
        assert np.abs(out).max() > 1e-3, video


# ------------------------------------------------------------------------- 5. scan / remat
@functools.lru_cache(maxsize=None)
def scan_params():
    """Perturbed class params in both layouts (list of blocks, stacked)."""
    listed = perturb(initial_params("class"), seed=5)
    return listed, stack_blocks(listed, model_cfg().depth)


def test_stacked_params_have_leading_layers_axis():
    """stack_blocks reproduces the scan model's parameter tree exactly (so the copy is faithful)."""
    _, stacked = scan_params()
    expected = nnx.to_pure_dict(nnx.state(abstract_model(_key(scan_layers=True)), nnx.Param))
    assert jax.tree.structure(stacked) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(stacked), jax.tree.leaves(expected)):
        assert a.shape == e.shape and a.dtype == e.dtype


def test_scan_layers_matches_list_of_blocks():
    listed, stacked = scan_params()
    x, t = inputs()
    out_list = run(listed, x, t, {"label": LABELS})
    out_scan = run(stacked, x, t, {"label": LABELS}, scan_layers=True)
    assert np.abs(out_list).max() > 1e-3
    np.testing.assert_allclose(out_scan, out_list, rtol=1e-5, atol=1e-6)


@functools.lru_cache(maxsize=None)
def _blocks_loss_and_grad(remat):
    """Gradient through the model's block stack (scan layout: the default) under a remat policy.

    Only the blocks are differentiated (the part remat wraps) to keep XLA compile time down; c and
    the RoPE tables reach the blocks by closure, as in the full forward, and get gradients too.
    """
    g = graphdef(scan_layers=True, remat=remat)

    def loss(p, h, c, rope):
        out = nnx.merge(g, p)._run_blocks(h, c, rope, None, None)
        return jnp.mean(jnp.square(out - 0.5 * h)), out

    return jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


def test_remat_policies_give_identical_outputs_and_gradients():
    _, stacked = scan_params()
    rng = np.random.RandomState(8)
    h = jnp.asarray(rng.standard_normal((B, 64, 64)), jnp.float32)
    c = jnp.asarray(rng.standard_normal((B, 64)), jnp.float32)
    rope = rope_angles((4, 4, 4), 32)
    (ref_loss, ref_out), ref_grads = _blocks_loss_and_grad("none")(stacked, h, c, rope)
    assert np.abs(np.asarray(ref_out - h)).max() > 1e-3  # the blocks are not the identity
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(ref_grads[0]["blocks"]))
    assert np.abs(np.asarray(ref_grads[2])).max() > 0  # through the closure
    for remat in ("dots_saveable", "full"):
        (loss, out), grads = _blocks_loss_and_grad(remat)(stacked, h, c, rope)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        np.testing.assert_allclose(out, ref_out, rtol=1e-6, atol=1e-7, err_msg=remat)
        for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                                jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7,
                                       err_msg=f"{remat} {jax.tree_util.keystr(path)}")


# --------------------------------------------------------------------------- 6. conditioning
def test_class_label_changes_only_its_own_example():
    params = perturb(initial_params("class"))
    x, t = inputs()
    out = run(params, x, t, {"label": LABELS})
    other = run(params, x, t, {"label": jnp.asarray([1, 3, 5, 9], jnp.int32)})
    assert np.abs(out[0] - other[0]).max() > 1e-4
    np.testing.assert_array_equal(out[1:], other[1:])
    # The null label (row num_classes of the embedding) is a distinct, valid condition.
    null = run(params, x, t, {"label": jnp.asarray(np.full((B,), 10, np.int32))})
    assert np.all(np.isfinite(null)) and np.abs(null - out).max() > 1e-4


def test_null_cond_and_drop_condition():
    """null_cond: label -> num_classes, text -> BOS + PAD; drop_condition: p=1 -> null, p=0 ->
    same; a frozen encoder's null embedding ([1, ...]) broadcasts over the batch."""
    from vidit import steps
    model = abstract_model(_key())  # no parameters needed
    cond = {"label": LABELS, "text": text_tokens()}
    null = model.null_cond(cond)
    np.testing.assert_array_equal(null["label"], np.full((B,), model_cfg().num_classes))
    np.testing.assert_array_equal(null["text"], np.stack([byte_tokenizer.null_tokens(TEXT_LEN)] * B))
    key = jax.random.key(0)
    dropped = steps.drop_condition(cond, null, key, 1.0)
    for name in cond:
        np.testing.assert_array_equal(dropped[name], null[name])
    kept = steps.drop_condition(cond, null, key, 0.0)
    for name in cond:
        np.testing.assert_array_equal(kept[name], cond[name])
    # p = 0.5: each example is all-kept or all-dropped, the same choice for label and text.
    many = {"label": jnp.asarray(np.zeros((256,), np.int32)),
            "text": jnp.asarray(np.full((256, 4), 7, np.int32))}
    half = steps.drop_condition(many, model.null_cond(many), key, 0.5)
    dropped_label = np.asarray(half["label"]) == 10
    dropped_text = np.all(np.asarray(half["text"]) == np.array([1, 0, 0, 0]), axis=1)
    np.testing.assert_array_equal(dropped_label, dropped_text)
    assert 0.3 < dropped_label.mean() < 0.7
    embedded = {"text_embedding": jnp.ones((256, 4, 3)), "text_mask": jnp.ones((256, 4), bool)}
    null = steps.null_condition(model, embedded, {"null_text": {
        "text_embedding": jnp.zeros((1, 4, 3)), "text_mask": jnp.asarray([[True, False] * 2])}})
    half = steps.drop_condition(embedded, null, key, 0.5)
    dropped_embedding = np.all(np.asarray(half["text_embedding"]) == 0, axis=(1, 2))
    np.testing.assert_array_equal(dropped_embedding, dropped_label)  # the same key: same rows
    np.testing.assert_array_equal(np.asarray(half["text_mask"])[dropped_embedding],
                                  [[True, False, True, False]] * int(dropped_embedding.sum()))


def test_text_tokens_condition_the_output():
    params = perturb(initial_params("text"))
    x, t = inputs()
    out = run(params, x, t, {"text": text_tokens()}, **VARIANT["text"])
    captions = list(CAPTIONS)
    captions[0] = "a 5 moving left"
    other = run(params, x, t, {"text": text_tokens(captions)}, **VARIANT["text"])
    assert np.abs(out[0] - other[0]).max() > 1e-4
    np.testing.assert_array_equal(out[1:], other[1:])


def test_text_padding_beyond_caption_does_not_change_output():
    """Masked padding is invisible: longer padding, and any PAD embedding or position rows past
    the caption, give the same output."""
    params = perturb(initial_params("text"))
    x, t = inputs()
    out = run(params, x, t, {"text": text_tokens()}, **VARIANT["text"])
    longer = run(params, x, t, {"text": text_tokens(length=2 * TEXT_LEN)}, **VARIANT["text"])
    np.testing.assert_allclose(longer, out, rtol=1e-5, atol=1e-6)
    longest = max(len(c.encode()) for c in CAPTIONS) + 1  # + BOS
    changed = jax.tree.map(lambda a: a, params)
    rng = np.random.RandomState(9)  # random, not constant: layer_norm would hide a constant shift
    embed = np.array(changed["text"]["embed"])
    embed[byte_tokenizer.PAD] += rng.standard_normal(embed.shape[1])
    pos = np.array(changed["text"]["pos"])
    pos[longest:] += rng.standard_normal(pos[longest:].shape)
    changed["text"]["embed"], changed["text"]["pos"] = jnp.asarray(embed), jnp.asarray(pos)
    np.testing.assert_allclose(run(changed, x, t, {"text": text_tokens()}, **VARIANT["text"]), out,
                               rtol=1e-5, atol=1e-6)
    pos[1] += rng.standard_normal(pos.shape[1])  # a position inside the captions does matter
    changed["text"]["pos"] = jnp.asarray(pos)
    assert np.abs(run(changed, x, t, {"text": text_tokens()}, **VARIANT["text"]) - out).max() > 1e-4


# --------------------------------------------------------------------- 7. params and FLOPs
@pytest.mark.parametrize("size,cond,extra", [
    ("tiny", "class", {}), ("tiny", "text", {}), ("tiny", "none", {}),
    ("mini", "class", {"scan_layers": True}), ("mini", "text", {"scan_layers": True}),
    ("mini", "none", {"channels": 4, "patch": (2, 2, 2), "mlp_ratio": 2.0}),
])
def test_count_params_matches_model(size, cond, extra):
    cfg = model_cfg(size=size, cond=cond, **extra)
    model = abstract_model(_key(size=size, cond=cond, **extra))
    assert num_params(nnx.state(model, nnx.Param)) == flops.count_params(cfg)


@pytest.mark.parametrize("cond", ["class", "text"])
def test_forward_flops_match_xla_cost_analysis(cond):
    """forward_flops vs XLA's count for a 'dense'-attention forward (compiled, never run).

    Both count 2 FLOPs per multiply-accumulate. XLA's number is the total over every HLO op: the
    weight matmuls, the attention dots (QK^T and AV) and the elementwise work (norms, softmax,
    GELU, RoPE, modulation) that forward_flops leaves out, so XLA must be a little above
    forward_flops['total'], and XLA minus the attention dots a little above forward_flops['matmul'].
    """
    overrides = dict(size="mini", cond=cond, attention="dense")
    cfg = model_cfg(**overrides)
    frames, height, width = 4, 16, 16
    batch = 2
    g, state = nnx.split(abstract_model(_key(**overrides)))
    params = nnx.to_pure_dict(state)
    x = jax.ShapeDtypeStruct((batch, frames, height, width, cfg.channels), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.float32)
    c = ({"label": jax.ShapeDtypeStruct((batch,), jnp.int32)} if cond == "class" else
         {"text": jax.ShapeDtypeStruct((batch, cfg.text_len), jnp.int32)})
    compiled = jit(lambda p, x, t, c: nnx.merge(g, p)(x, t, c)).lower(params, x, t, c).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    xla = analysis["flops"] / batch
    ours = flops.forward_flops(cfg, frames, height, width)
    print(f"\n[{cond}] XLA {xla:.4g} FLOPs/sample; forward_flops total {ours['total']:.4g} "
          f"(matmul {ours['matmul']:.4g} + attention {ours['attention']:.4g}); "
          f"XLA/total = {xla / ours['total']:.4f}, "
          f"(XLA - attention)/matmul = {(xla - ours['attention']) / ours['matmul']:.4f}")
    assert ours["tokens"] == 4 * 8 * 8
    assert 1.0 <= xla / ours["total"] <= 1.05
    assert 1.0 <= (xla - ours["attention"]) / ours["matmul"] <= 1.10


# ------------------------------------------------------------------------ 8. logical axes
@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("cond", ["class", "text"])
def test_every_param_has_logical_names_of_its_rank(scan, cond):
    state = nnx.state(abstract_model(_key(cond=cond, scan_layers=scan)), nnx.Param)
    rules = config_lib.base_config().sharding_rules
    leaves = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda v: isinstance(v, nnx.Variable))[0]
    assert leaves
    for path, var in leaves:
        where = jax.tree_util.keystr(path)
        names = var.get_metadata().get("out_sharding")
        assert names is not None, where
        assert len(names) == len(var.get_value().shape), (where, names)
        sharding.logical_to_spec(names, rules)  # every name has a rule
        if scan and where.startswith("['blocks']"):
            assert names[0] == "layers", (where, names)
    names = sharding.logical_names(state)
    assert jax.tree.structure(names, is_leaf=lambda n: isinstance(n, tuple)) == \
        jax.tree.structure(nnx.to_pure_dict(state))


def _mesh_config():
    c = config_lib.base_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.sequence = 2, 2, 2, 1
    return c


def test_sharded_forward_matches_unsharded(devices):
    """8 devices as data=2 x fsdp=2 x tensor=2: every spec divides, weights are really split,
    and the jitted forward under sharding.use() matches the single-device one."""
    c = _mesh_config()
    mesh = sharding.make_mesh(c.mesh, devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}
    rules = c.sharding_rules
    _, params = scan_params()
    names = sharding.logical_names(nnx.state(abstract_model(_key(scan_layers=True)), nnx.Param))
    shardings = sharding.tree_shardings(params, names, mesh, rules)
    for (path, s), a, n in zip(jax.tree_util.tree_flatten_with_path(shardings)[0],
                               jax.tree.leaves(params),
                               jax.tree.leaves(names, is_leaf=lambda n: isinstance(n, tuple))):
        where = jax.tree_util.keystr(path)
        s.shard_shape(a.shape)  # raises unless the spec is valid for this shape
        for dim, entry in zip(a.shape, tuple(s.spec) + (None,) * a.ndim):
            axes = (entry,) if isinstance(entry, str) else (entry or ())
            assert dim % math.prod(mesh.shape[ax] for ax in axes) == 0, (where, a.shape, s.spec)
        # At tiny size every logical rule applies as written: nothing silently replicated.
        assert s.spec == sharding.logical_to_spec(n, rules), (where, s.spec)
    qkv_spec = shardings["blocks"]["attn"]["qkv"]["kernel"].spec
    assert qkv_spec == P(None, "fsdp", None, "tensor", None)
    assert shardings["blocks"]["mlp"]["fc2"]["kernel"].spec == P(None, "tensor", "fsdp")
    # From host arrays: device_put then slices in numpy instead of compiling a slice per leaf.
    sharded_params = jax.device_put(jax.tree.map(np.asarray, params), shardings)
    x, t = inputs()
    expected = run(params, x, t, {"label": LABELS}, scan_layers=True)
    g = graphdef(scan_layers=True)
    forward = jit(lambda p, x, t, label: nnx.merge(g, p)(x, t, {"label": label}))
    with sharding.use(mesh, rules):
        out = forward(sharded_params, jax.device_put(x, sharding.batch_sharding(mesh, 5)),
                      jax.device_put(t, sharding.batch_sharding(mesh, 1)),
                      jax.device_put(LABELS, sharding.batch_sharding(mesh, 1)))
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ 9. attention backends
ATTENTION_IMPLS = {
    "dense": functools.partial(attention_lib.attention, backend="dense"),
    "xla": functools.partial(attention_lib.attention, backend="xla"),
    "chunked": functools.partial(attention_lib.attention, backend="chunked"),  # 12 <= CHUNK
    # Several query blocks, the last one padded: the lax.map + checkpoint path.
    "chunked/5": functools.partial(attention_lib.chunked_attention, chunk=5),
}


@functools.lru_cache(maxsize=None)
def _attention_value_and_grad(name):
    def f(q, k, v, mask, w):
        out = ATTENTION_IMPLS[name](q, k, v, mask)
        return jnp.sum(out * w), out

    return jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))


@pytest.mark.parametrize("masked", [False, True])
def test_attention_backends_agree(masked):
    """xla, chunked (one block and several) match dense, outputs and q/k/v gradients; keys behind
    the mask have no influence."""
    rng = np.random.RandomState(6)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
               for shape in [(2, 12, 2, 16), (2, 10, 2, 16), (2, 10, 2, 16)])
    w = jnp.asarray(rng.standard_normal((2, 12, 2, 16)), jnp.float32)
    mask = jnp.asarray(np.arange(10)[None] < np.array([[7], [3]])) if masked else None
    (_, ref), ref_grads = _attention_value_and_grad("dense")(q, k, v, mask, w)
    assert ref.shape == q.shape
    for name in ATTENTION_IMPLS:
        (_, out), grads = _attention_value_and_grad(name)(q, k, v, mask, w)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6, err_msg=name)
        for which, g, r in zip("qkv", grads, ref_grads):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5, err_msg=f"{name} d{which}")
        if masked:
            k2 = jnp.asarray(np.where(np.arange(10)[None, :, None, None] >= 7, 100.0, k))
            v2 = jnp.asarray(np.where(np.arange(10)[None, :, None, None] >= 7, -100.0, v))
            (_, out2), _ = _attention_value_and_grad(name)(q, k2, v2, mask, w)
            np.testing.assert_allclose(out2, out, rtol=1e-5, atol=1e-6, err_msg=name)
    with pytest.raises(ConfigError, match="config.model.attention"):
        attention_lib.attention(q, k, v, backend="flash")


def _plain_softmax_attend(q, k, v, mask):
    """The attention core through plain autodiff (no hand-written derivative)."""
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k)
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(logits, axis=-1), v)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_core_hand_derivative_matches_autodiff(masked):
    """The attention core's hand-written JVP (which reverse mode transposes) equals autodiff of
    the plain formula: jvp, vjp, and a second derivative (grad of a jvp, as MeanFlow's loss
    takes)."""
    rng = np.random.RandomState(3)
    q, k, v, tq, tk, tv, w = (jnp.asarray(rng.standard_normal((2, 2, 9, 8)), jnp.float32)
                              for _ in range(7))
    mask = jnp.asarray(np.arange(9)[None] < np.array([[6], [2]])) if masked else None
    core = functools.partial(attention_lib._softmax_attend, mask=mask)
    plain = functools.partial(_plain_softmax_attend, mask=mask)
    for f in (core, plain):
        assert f(q, k, v).shape == q.shape
    (out, tan), (out_ref, tan_ref) = (jax.jvp(f, (q, k, v), (tq, tk, tv)) for f in (core, plain))
    np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tan, tan_ref, rtol=1e-4, atol=1e-5)
    grads, grads_ref = (jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(q, k, v)
                        for f in (core, plain))
    for g, r in zip(grads, grads_ref):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
    second, second_ref = (
        jax.grad(lambda q: jnp.sum(jax.jvp(f, (q, k, v), (tq, tk, tv))[1] * w))(q)
        for f in (core, plain))
    np.testing.assert_allclose(second, second_ref, rtol=1e-3, atol=1e-4)


def test_model_with_multi_block_chunked_attention_matches_dense(monkeypatch):
    """The default 'chunked' backend, forced to 4 query blocks of 16 (the tiny grid's 64 tokens
    otherwise fit one block), gives the same model output as 'dense'."""
    assert model_cfg().attention == "chunked"
    params = perturb(initial_params("class"))
    x, t = inputs()
    # At 64 tokens the default run takes chunked's single-block path, i.e. dense_attention.
    ref = run(params, x, t, {"label": LABELS})
    monkeypatch.setattr(attention_lib, "chunked_attention",
                        functools.partial(attention_lib.chunked_attention, chunk=16))
    g = graphdef()
    out = np.asarray(jit(lambda p, x, t, c: nnx.merge(g, p)(x, t, c))(params, x, t,
                                                                     {"label": LABELS}))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- 10. bfloat16
def test_bfloat16_compute_is_close_to_float32_with_float32_params():
    def param_dtypes(**overrides):
        state = nnx.state(abstract_model(_key(**overrides)), nnx.Param)
        return {a.dtype for a in jax.tree.leaves(state)}

    assert param_dtypes(dtype="bfloat16") == {jnp.dtype("float32")}
    assert param_dtypes(dtype="bfloat16", param_dtype="bfloat16") == {jnp.dtype("bfloat16")}
    params = perturb(initial_params("class"))
    x, t = inputs()
    ref = run(params, x, t, {"label": LABELS})
    out = run(params, x, t, {"label": LABELS}, dtype="bfloat16")
    assert out.dtype == np.float32 and np.all(np.isfinite(out))
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    print(f"\nbf16 vs f32 relative L2 error {rel:.3g}")
    assert 0 < rel < 3e-2  # bf16 has 8 mantissa bits: ~0.4% per rounding, a few % end to end


# ---------------------------------------------------------------- numerical robustness
def test_layer_norm_is_stable_for_tokens_with_large_mean():
    rng = np.random.RandomState(7)
    x = np.concatenate([100.0 + 0.01 * rng.standard_normal((4, 64)),
                        300.0 + 0.1 * rng.standard_normal((4, 64))]).astype(np.float32)
    y = np.asarray(layers.layer_norm(jnp.asarray(x)))
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-6)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, ref, atol=2e-2)
