"""vidit.sweep: the plan follows the FLOP counter, finished points are never re-run, a failing
point is retried once and reported, and the analysis writes the report and plots."""
import json
import os
import re
import subprocess

import ml_collections
import pytest

from vidit import flops, scaling, sweep as sweep_lib
from tests import test_scaling


def tiny_sweep():
    s = ml_collections.ConfigDict()
    s.base = "configs/moving_digits.py"
    s.base_arg = "smoke"
    s.sizes = [dict(depth=1, width=32, heads=2), dict(depth=2, width=64, heads=2)]
    s.budgets = [1e10, 3e10]
    s.min_steps = 2
    s.overrides = ["sample.num=0"]
    return s


def test_plan_derives_steps_from_the_flop_counter():
    points = sweep_lib.plan(tiny_sweep())
    assert len(points) == 4
    base = sweep_lib.load_py_config(os.path.join(sweep_lib.ROOT, "configs/moving_digits.py"),
                                    "smoke")
    for p in points:
        base.model.depth, base.model.width = p.overrides["model.depth"], p.overrides["model.width"]
        per_step = flops.train_flops_per_step(base.model, base.data)
        assert p.steps == max(2, round(p.flops / per_step))
        assert p.flops == pytest.approx(per_step * p.steps)
    assert len({p.name for p in points}) == 4


class FakeTrainer:
    """Stands in for `python -m vidit.train`: writes summary.json, after failing as many times as
    `failures` says for that point."""

    def __init__(self, failures=None):
        self.calls, self.failures = [], dict(failures or {})

    def __call__(self, command, cwd, stdout, stderr):
        workdir = command[command.index("--workdir") + 1]
        name = os.path.basename(workdir)
        self.calls.append(name)
        if self.failures.get(name, 0) > 0:
            self.failures[name] -= 1
            return subprocess.CompletedProcess(command, 1)
        steps = int(next(a for a in command if a.startswith("--config.train.steps=")).split("=")[1])
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump({"step": steps, "final_train_loss": 0.5, "eval_loss": 0.4, "params": 1000,
                       "train_flops": 1e10, "tokens": 1e5, "wall_s": 1.0, "skipped": 0}, f)
        return subprocess.CompletedProcess(command, 0)


def test_rerun_finishes_only_missing_points_and_retries_once(tmp_path, monkeypatch):
    points = sweep_lib.plan(tiny_sweep())
    # A sweep killed after two points: their summaries exist.
    fake = FakeTrainer()
    monkeypatch.setattr(sweep_lib.subprocess, "run", fake)
    for p in points[:2]:
        sweep_lib.run_point(p, tiny_sweep(), str(tmp_path), "local")
    fake.calls.clear()
    results = sweep_lib.run_sweep(tiny_sweep(), str(tmp_path))
    assert sorted(fake.calls) == sorted(p.name for p in points[2:])
    assert len(results) == 4

    # A point that fails once is retried; one that fails twice is reported, the rest go on.
    fresh = tmp_path / "again"
    broken = points[1].name
    flaky = FakeTrainer(failures={points[0].name: 1, broken: 2})
    monkeypatch.setattr(sweep_lib.subprocess, "run", flaky)
    results = sweep_lib.run_sweep(tiny_sweep(), str(fresh))
    assert flaky.calls.count(points[0].name) == 2 and flaky.calls.count(broken) == 2
    assert {r["name"] for r in results} == {p.name for p in points} - {broken}
    failures = json.loads((fresh / "failures.json").read_text())
    assert [f["name"] for f in failures] == [broken]


def test_sweep_state_lives_in_a_bucket(bucket_dir, monkeypatch):
    """The plan, each point's workdir and log, results and the report in gs://."""
    from etils import epath

    class BucketTrainer(FakeTrainer):
        def __call__(self, command, cwd, stdout, stderr):
            workdir = command[command.index("--workdir") + 1]
            self.calls.append(workdir)
            print("training", file=stdout, flush=True)
            epath.Path(workdir, "summary.json").write_text(json.dumps(
                {"step": 10, "final_train_loss": 0.5, "eval_loss": 0.4, "params": 1000,
                 "train_flops": 1e10, "tokens": 1e5, "wall_s": 1.0, "skipped": 0}))
            return subprocess.CompletedProcess(command, 0)

    fake = BucketTrainer()
    monkeypatch.setattr(sweep_lib.subprocess, "run", fake)
    results = sweep_lib.run_sweep(tiny_sweep(), str(bucket_dir))
    assert len(results) == 4 and all(w.startswith("gs://bucket/") for w in fake.calls)
    assert (bucket_dir / "plan.json").exists() and (bucket_dir / "results.json").exists()
    point = sweep_lib.plan(tiny_sweep())[0].name
    assert (bucket_dir / "points" / point / "train_attempt1.log").read_text() == "training\n"
    fake.calls.clear()
    assert len(sweep_lib.run_sweep(tiny_sweep(), str(bucket_dir))) == 4 and not fake.calls


def test_analyze_writes_report_and_plots(tmp_path):
    params, flops_, tokens, losses = test_scaling.synthetic()
    results = [{"name": f"p{i}", "params": n, "flops": c, "tokens": d, "wall_s": 1.0,
                "train.steps": 10, "final_train_loss": loss, "eval_loss": loss}
               for i, (n, c, d, loss) in enumerate(zip(params, flops_, tokens, losses))]
    (tmp_path / "results.json").write_text(json.dumps(results))
    report = sweep_lib.analyze(str(tmp_path), predict_flops=1e20)
    for png in ("loss_vs_compute.png", "isoflop.png", "n_opt_vs_compute.png"):
        assert (tmp_path / png).stat().st_size > 1000
    # The report's numbers are the fit's: the N_opt exponent and its interval hold the synthetic
    # data's true exponent, and the predicted size at 1e20 is the true law's.
    row = next(line for line in report.splitlines() if line.startswith("| N_opt ~ C^a"))
    value, low, high = (float(x) for x in re.findall(r"-?\d+\.\d+", row.split("|")[2]))
    true_a = test_scaling.BETA / (test_scaling.ALPHA + test_scaling.BETA)
    assert abs(value - true_a) < 0.03 and low <= value <= high
    assert low - 0.03 <= true_a <= high + 0.03
    g = (test_scaling.ALPHA * test_scaling.A / (test_scaling.BETA * test_scaling.B)) ** (
        1 / (test_scaling.ALPHA + test_scaling.BETA))
    predicted = float(re.search(r"optimal size ([0-9.e+]+) parameters", report).group(1))
    assert predicted == pytest.approx(g * (1e20 / 6) ** true_a, rel=0.5)
    # The caveats are computed from the data: this frontier falls at every budget.
    front = [loss for _, loss in scaling.fit_sweep(params, flops_, tokens, losses)["frontier"]]
    assert all(b < a for a, b in zip(front, front[1:]))
    assert "falls with compute at every budget" in report


def test_caveats_flag_edge_minima_and_a_frontier_that_does_not_fall():
    # Two budgets, three sizes; at 1e12 the smallest size wins (edge), at 1e13 the loss is worse.
    sizes = [1e4, 1e5, 1e6]
    results = [{"name": f"n{n:g}_c{c:g}", "params": n, "flops": c, "eval_loss": loss,
                "train.steps": 16 if (n, c) == (1e6, 1e12) else 1000}
               for c, row in ((1e12, (1.0, 1.1, 1.2)), (1e13, (1.3, 1.05, 1.4)))
               for n, loss in zip(sizes, row)]
    params, flops_, losses = zip(*[(r["params"], r["flops"], r["eval_loss"]) for r in results])
    fit = {"minima": scaling.isoflop_minima(params, flops_, losses),
           "frontier": scaling.frontier(flops_, losses),
           "a": scaling.Fit(0.5, 0.1, 0.9)}
    text = " ".join(sweep_lib.caveats(results, fit))
    assert "At 1e+12 FLOPs the best size is at the edge of the grid" in text
    assert "1e+13 FLOPs the best size is at the edge" not in text
    assert "does not fall at every step" in text and "interval on a is wide" in text
    assert "1 point(s) train for under 200 steps (n1e+06_c1e+12: 16)" in text


@pytest.mark.slow
def test_one_real_point_trains_and_records(data_dir, tmp_path):
    s = tiny_sweep()
    s.sizes = s.sizes[:1]
    s.budgets = s.budgets[:1]
    s.overrides = ["sample.num=0", f"data.data_dir={data_dir}", "train.progress=False"]
    results = sweep_lib.run_sweep(s, str(tmp_path))
    assert len(results) == 1
    r = results[0]
    model = sweep_lib.load_py_config(os.path.join(sweep_lib.ROOT, "configs/moving_digits.py"),
                                     "smoke").model
    model.depth, model.width, model.heads = 1, 32, 2
    assert r["params"] == flops.count_params(model)
    assert r["eval_loss"] > 0 and r["final_train_loss"] > 0 and r["wall_s"] > 0


@pytest.mark.parametrize("launcher, head", [
    ("slurm", ["sbatch", "--wait", os.path.join(sweep_lib.ROOT, "launch", "slurm.sbatch")]),
    ("tpu_vm", [os.path.join(sweep_lib.ROOT, "launch", "tpu_vm.sh"), "run"]),
])
def test_cluster_launchers_submit_the_same_train_arguments(launcher, head, tmp_path, monkeypatch):
    """Each point goes to the cluster script with exactly the train flags a local run gets
    (the scripts pass them on to `python -m vidit.train`)."""
    seen = []
    fake = FakeTrainer()
    monkeypatch.setattr(sweep_lib.subprocess, "run",
                        lambda command, **kw: seen.append(command) or fake(command, **kw))
    results = sweep_lib.run_sweep(tiny_sweep(), str(tmp_path), launcher=launcher)
    assert len(results) == 4 and len(seen) == 4
    for command, point in zip(seen, sweep_lib.plan(tiny_sweep())):
        local = point.command(tiny_sweep(), str(tmp_path / "points" / point.name))
        assert command[:len(head)] == head and command[len(head):] == local[3:]
    with pytest.raises(ValueError, match="not one of local, tpu_vm, slurm"):
        sweep_lib.run_sweep(tiny_sweep(), str(tmp_path / "x"), launcher="kubernetes")


def test_fixed_step_plan_varies_learning_rate_and_batch():
    s = tiny_sweep()
    del s.budgets
    s.steps, s.lrs, s.batch_sizes = 50, [1e-3, 2e-3], [4, 8]
    points = sweep_lib.plan(s)
    assert len(points) == 2 * 2 * 2 and all(p.steps == 50 for p in points)
    p = next(p for p in points if p.overrides["data.batch_size"] == 8)
    assert p.name.endswith("_b8") and "_s50_" in p.name
    # FLOPs follow the batch: twice the batch, twice the FLOPs for the same size and steps.
    twin = next(q for q in points if q.overrides["data.batch_size"] == 4
                and q.overrides["model.width"] == p.overrides["model.width"]
                and q.overrides["optim.lr"] == p.overrides["optim.lr"])
    assert p.flops == pytest.approx(2 * twin.flops)
    del s.steps
    s.examples = [800]  # clips seen: the same data at every batch size
    assert sorted({(p.overrides["data.batch_size"], p.steps) for p in sweep_lib.plan(s)}) == [
        (4, 200), (8, 100)]
    assert all("_x800_" in p.name for p in sweep_lib.plan(s))
    del s.examples
    with pytest.raises(ValueError, match="needs `budgets` \(training FLOPs\), `examples`"):
        sweep_lib.plan(s)


def test_analyze_fits_learning_rate_and_batch_laws_and_predicts_a_budget(tmp_path):
    from tests import test_budget
    n, d, f, lr, bs, loss = test_budget.synthetic()
    results = [{"name": f"p{i}", "params": a, "tokens": b, "flops": c, "lr": e,
                "batch_size": g, "train.steps": 1000, "wall_s": 1.0, "final_train_loss": h,
                "eval_loss": h} for i, (a, b, c, e, g, h) in enumerate(zip(n, d, f, lr, bs, loss))]
    (tmp_path / "results.json").write_text(json.dumps(results))
    report = sweep_lib.analyze(str(tmp_path), predict_flops=1e17)
    assert (tmp_path / "loss_vs_lr.png").stat().st_size > 1000
    row = next(line for line in report.splitlines() if line.startswith("| optimal learning rate"))
    exponent, low, high = (float(x) for x in re.findall(r"N\^(-?[\d.]+) \[(-?[\d.]+), (-?[\d.]+)\]",
                                                       row)[0])
    assert low - 0.03 <= test_budget.LR_A <= high + 0.03 and abs(exponent - test_budget.LR_A) < 0.08
    assert "| L(N, D) = E + A/N^alpha" in report
    assert re.search(r"\| learning rate \| [\d.e-]+ \| [\d.e-]+ - [\d.e-]+ \|", report)
    assert "- Extrapolation: the budget 1e+17 is extrapolated" in report
    assert "7 learning rates per size" in report
