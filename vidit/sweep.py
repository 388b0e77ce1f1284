"""Scaling-law sweeps: run a grid of training runs, then fit and plot the laws.

    python -m vidit.sweep --sweep configs/sweeps/digits_isoflop.py --workdir runs/sweep
    python -m vidit.sweep --sweep configs/sweeps/digits_isoflop.py --workdir runs/sweep --parallel 2
    python -m vidit.sweep --sweep ... --workdir gs://B/sweep --launcher slurm --dry_run
    python -m vidit.sweep --analyze runs/sweep [--predict 1e18]
    python -m vidit.sweep --sweep ... --workdir gs://B/sweep --launcher skypilot \
        --check_topology v5p:2x2x1          # or --launcher jobset (GKE)
    python -m vidit.sweep --status gs://B/sweep

A sweep config (configs/sweeps/*.py) names a base config (and its variant), overrides for every
point ("key=value" strings, as on the train command line) and a grid of model sizes, compute
budgets in training FLOPs (each point's step count is the budget over the FLOP counter's
training FLOPs per step: IsoFLOP sweeps), learning rates and training-set sizes. Every point
trains with `python -m vidit.train` into <workdir>/points/<name>, which writes summary.json
when it finishes (parameters, training FLOPs, tokens, wall time, final training loss, fixed-t
validation loss). Re-running the sweep skips finished points and resumes interrupted ones from
their checkpoints; a point that fails is retried once, then reported in failures.json.
With an orchestrator (`--launcher skypilot | jobset`, vidit/orchestrate.py) the sweep writes each
point's job spec, submits it, polls it and records its state in the sweep directory, so
`--status` shows running, done and failed points from the bucket alone; `--check_topology`
compiles every point for its TPU slice first, so a point that cannot fit fails in seconds.

`--analyze` fits L(C) = A C^-alpha + L_inf on the compute-optimal frontier and N_opt ~ C^a,
D_opt ~ C^b from IsoFLOP minima with bootstrap intervals (vidit/scaling.py); where the grid
varies them, L(N, D) and the optimal learning rate and batch size as power laws in N and D
(vidit/budget.py). `--predict C` names the model size, tokens, learning rate and batch size
for budget C with intervals, and what of it is extrapolated beyond the grid. It writes
report.md with the fits, every point, and PNG plots.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib.util
import io
import itertools
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np

from vidit import budget, cli, flops as flops_lib, orchestrate, storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Point:
    name: str
    overrides: dict  # config key -> value, passed as --config.key=value
    steps: int
    params: int
    flops: float

    def command(self, sweep, workdir: str) -> list[str]:
        config = sweep.base + (f":{sweep.base_arg}" if sweep.get("base_arg") else "")
        args = [sys.executable, "-m", "vidit.train", "--config", config, "--workdir", workdir]
        return args + [f"--config.{k}={_flag_value(v)}" for k, v in self.overrides.items()]


def _flag_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def load_py_config(path: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location("sweep_cfg", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, ROOT)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


def plan(sweep) -> list[Point]:
    """Every point of the grid. Its length, by what the config gives: `budgets`, training
    FLOPs (steps = budget over the FLOP counter's FLOPs per step: IsoFLOP sweeps); `examples`,
    training clips seen (steps = examples / batch: the same data for every size and batch, as
    the L(N, D) and batch-size fits want); or `steps` for every point. `batch_sizes` varies the
    global batch, `lrs` the learning rate."""
    base = load_py_config(os.path.join(ROOT, sweep.base), sweep.get("base_arg") or None)
    lengths = ([("c", b) for b in sweep.get("budgets") or []]
               + [("x", e) for e in sweep.get("examples") or []]
               + ([("s", int(sweep.steps))] if sweep.get("steps") else []))
    if not lengths:
        raise ValueError("a sweep config needs `budgets` (training FLOPs), `examples` (clips "
                         "seen) or `steps`")
    points = []
    for size, (unit, length), lr, batch, clips in itertools.product(
            sweep.sizes, lengths, sweep.get("lrs", [base.optim.lr]),
            sweep.get("batch_sizes", [None]), sweep.get("train_clips", [None])):
        c = base.copy_and_resolve_references()
        c.model.depth, c.model.width, c.model.heads = size["depth"], size["width"], size["heads"]
        if batch:
            c.data.batch_size = batch
        per_step = flops_lib.train_flops_per_step(c.model, c.data)
        steps = {"c": lambda: round(length / per_step),
                 "x": lambda: round(length / c.data.batch_size),
                 "s": lambda: length}[unit]()
        steps = max(int(sweep.get("min_steps", 1)), steps)
        params = flops_lib.count_params(c.model)
        name = (f"d{size['depth']}w{size['width']}_"
                + (f"c{length:.0e}" if unit == "c" else f"{unit}{length}") + f"_lr{lr:g}"
                + (f"_b{batch}" if batch else "") + (f"_n{clips}" if clips else "")
                ).replace("+", "")
        overrides = {"model.depth": size["depth"], "model.width": size["width"],
                     "model.heads": size["heads"], "train.steps": steps, "optim.lr": lr,
                     "optim.warmup_steps": max(1, min(base.optim.warmup_steps, steps // 10))}
        if batch:
            overrides["data.batch_size"] = batch
        if clips:
            overrides["data.builder_kwargs.num_train"] = clips
        overrides.update(dict(o.split("=", 1) for o in sweep.get("overrides", [])))
        points.append(Point(name, overrides, steps, params, per_step * steps))
    return points


def _launch_command(point: Point, sweep, workdir: str, launcher: str) -> list[str]:
    command = point.command(sweep, workdir)
    if launcher == "local":
        return command
    train_args = command[3:]  # after "python -m vidit.train"
    if launcher == "slurm":
        return ["sbatch", "--wait", os.path.join(ROOT, "launch", "slurm.sbatch"), *train_args]
    if launcher == "tpu_vm":
        return [os.path.join(ROOT, "launch", "tpu_vm.sh"), "run", *train_args]
    raise ValueError(f"--launcher {launcher!r} is not one of local, tpu_vm, slurm")


def run_point(point: Point, sweep, root, launcher: str) -> dict:
    """Trains one point (retrying once); returns its result or a failure record."""
    workdir = storage.path(root) / "points" / point.name
    done = workdir / "summary.json"
    if done.exists():
        return _result(point, done)
    workdir.mkdir(parents=True, exist_ok=True)
    for attempt in (1, 2):
        # Appended: a point resumed after the sweep was killed keeps the log of its first part.
        log_path = workdir / f"train_attempt{attempt}.log"
        with tempfile.TemporaryFile("w+") as log:  # local while it runs, then to the sweep dir
            status = subprocess.run(_launch_command(point, sweep, str(workdir), launcher),
                                    cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
            log.seek(0)
            storage.append_text(log_path, log.read())
        if status == 0 and done.exists():
            return _result(point, done)
        print(f"[sweep] {point.name}: attempt {attempt} failed (status {status}, log "
              f"{log_path})", flush=True)
    return {"name": point.name, "failed": True, "log": str(log_path)}


def _result(point: Point, summary_path) -> dict:
    summary = json.loads(storage.path(summary_path).read_text())
    return {"name": point.name, **point.overrides, "params": summary["params"],
            "flops": summary["train_flops"], "tokens": summary["tokens"],
            "wall_s": summary["wall_s"], "final_train_loss": summary["final_train_loss"],
            "eval_loss": summary["eval_loss"], "batch_size": summary.get("batch_size"),
            "lr": summary.get("lr")}


def run_sweep(sweep, root, launcher: str = "local", parallel: int = 1,
              dry_run: bool = False) -> list[dict]:
    """Runs (or resumes) every point of the sweep under `root` (local or gs://)."""
    points = plan(sweep)
    root = storage.path(root)
    storage.write_atomic(root / "plan.json",
                         json.dumps([dataclasses.asdict(p) for p in points], indent=2))
    if dry_run:
        for p in points:
            print(shlex.join(_launch_command(p, sweep, str(root / "points" / p.name),
                                             launcher)))
        return []
    todo = [p for p in points if not (root / "points" / p.name / "summary.json").exists()]
    print(f"[sweep] {len(points)} points, {len(points) - len(todo)} already done, "
          f"{len(todo)} to run ({parallel} at a time)", flush=True)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max(1, parallel)) as pool:
        results = list(pool.map(lambda p: run_point(p, sweep, root, launcher), points))
    failures = [r for r in results if r.get("failed")]
    ok = [r for r in results if not r.get("failed")]
    storage.write_atomic(root / "results.json", json.dumps(ok, indent=2))
    storage.write_atomic(root / "failures.json", json.dumps(failures, indent=2))
    print(f"[sweep] {len(ok)} points done, {len(failures)} failed, "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return ok


# ------------------------------------------------------------------- orchestrated (cloud) runs
ORCHESTRATORS = ("skypilot", "jobset")


def run_orchestrated(sweep, root, submitter, *, poll_s: float = 60.0, max_attempts: int = 2,
                     sleep=time.sleep) -> list[dict]:
    """Hands every unfinished point to an orchestrator (vidit/orchestrate.py) and follows them
    to the end. Each point's state lives in <root>/points/<name>/status.json (state, attempts,
    job, orchestrator): a sweep restarted on another machine picks up the jobs it submitted
    instead of submitting them again. A point whose job fails (after the orchestrator's own
    retries) is submitted again up to max_attempts times; a job that ends without a
    summary.json counts as failed."""
    points = plan(sweep)
    root = storage.path(root)
    storage.write_atomic(root / "plan.json",
                         json.dumps([dataclasses.asdict(p) for p in points], indent=2))
    status = {p.name: point_status(root, p.name) for p in points}
    while True:
        for p in points:
            st = status[p.name]
            before = dict(st)
            if (root / "points" / p.name / "summary.json").exists():
                st["state"] = "done"
            elif st["state"] in ("new", "failed") and st["attempts"] < max_attempts:
                train_args = p.command(sweep, str(root / "points" / p.name))[3:]
                spec = submitter.spec(orchestrate.job_name(p.name), train_args, sweep)
                submitter.validate(spec)
                storage.write_atomic(root / "points" / p.name / f"{submitter.kind}.json",
                                     json.dumps(spec, indent=2))
                st.update(state="submitted", attempts=st["attempts"] + 1,
                          orchestrator=submitter.kind,
                          job=submitter.submit(orchestrate.job_name(p.name), spec))
                print(f"[sweep] {p.name}: submitted to {submitter.kind} as {st['job']} "
                      f"(attempt {st['attempts']})", flush=True)
            elif st["state"] in ("submitted", "pending", "running"):
                job_state = submitter.poll(st["job"])
                if job_state == "succeeded":  # finished: its summary.json decides
                    done = (root / "points" / p.name / "summary.json").exists()
                    st["state"] = "done" if done else "failed"
                else:
                    st["state"] = job_state
                if st["state"] == "failed":
                    print(f"[sweep] {p.name}: job {st['job']} failed (attempt "
                          f"{st['attempts']} of {max_attempts})", flush=True)
            if st != before:
                st["updated"] = time.time()
                storage.write_atomic(root / "points" / p.name / "status.json",
                                     json.dumps(st, indent=2))
        open_points = [n for n, st in status.items() if st["state"] not in ("done", "failed")
                       or (st["state"] == "failed" and st["attempts"] < max_attempts)]
        if not open_points:
            break
        sleep(poll_s)
    results = [_result(p, root / "points" / p.name / "summary.json") for p in points
               if status[p.name]["state"] == "done"]
    failures = [{"name": n, "failed": True, **st} for n, st in status.items()
                if st["state"] == "failed"]
    storage.write_atomic(root / "results.json", json.dumps(results, indent=2))
    storage.write_atomic(root / "failures.json", json.dumps(failures, indent=2))
    print(f"[sweep] {len(results)} points done, {len(failures)} failed", flush=True)
    return results


def point_status(root, name: str) -> dict:
    """A point's recorded state: new, submitted, pending, running, done or failed."""
    file = storage.path(root) / "points" / name / "status.json"
    st = json.loads(file.read_text()) if file.exists() else {"state": "new", "attempts": 0}
    if (storage.path(root) / "points" / name / "summary.json").exists():
        st["state"] = "done"
    return st


def status_report(root) -> str:
    """`vidit.sweep --status DIR`: every point's state from the sweep directory (a bucket
    works), read without contacting the orchestrator."""
    root = storage.path(root)
    if not (root / "plan.json").exists():
        raise FileNotFoundError(f"{root}/plan.json not found: not a sweep directory, or the "
                                f"sweep has not started")
    names = [p["name"] for p in json.loads((root / "plan.json").read_text())]
    rows, counts = [], {}
    for name in names:
        st = point_status(root, name)
        counts[st["state"]] = counts.get(st["state"], 0) + 1
        loss = ""
        if st["state"] == "done":
            loss = f"{json.loads((root / 'points' / name / 'summary.json').read_text())['eval_loss']:.4f}"
        rows.append(f"| {name} | {st['state']} | {st['attempts'] if 'attempts' in st else ''} | "
                    f"{st.get('orchestrator', '')} {st.get('job', '')} | {loss} |")
    head = ", ".join(f"{counts[k]} {k}" for k in sorted(counts))
    return "\n".join([f"{root}: {len(names)} points ({head})", "",
                      "| point | state | attempts | job | eval loss |", "|---|---|---|---|---|",
                      *rows]) + "\n"


def check_plan(sweep, topology: str, run=subprocess.run) -> list[str]:
    """Compiles each distinct model/batch of the plan for `topology` with vidit.compile before
    any point runs; returns the problems found (a point that does not compile or fit)."""
    seen, problems = {}, []
    for p in plan(sweep):
        shape = {k: v for k, v in p.overrides.items()
                 if not k.startswith(("optim.", "train."))}  # what changes the program
        key = json.dumps(shape, sort_keys=True, default=str)
        if key in seen:
            continue
        config = sweep.base + (f":{sweep.base_arg}" if sweep.get("base_arg") else "")
        command = [sys.executable, "-m", "vidit.compile", "--config", config, "--topology",
                   topology, "--json", *[f"--config.{k}={_flag_value(v)}" for k, v in
                                         shape.items()]]
        out = run(command, cwd=ROOT, capture_output=True, text=True)
        seen[key] = p.name
        if out.returncode:
            tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["(no output)"]
            problems.append(f"{p.name}: does not compile for {topology}: {tail[0]}")
            continue
        report = json.loads(out.stdout)
        if not report.get("fits", False):
            problems.append(f"{p.name}: needs {report['per_chip_gib']['total']:.1f} GiB per chip "
                            f"on {topology}, more than the chip holds")
    return problems


# ------------------------------------------------------------------------------------ analysis
def analyze(root: str, predict_flops: float | None = None, metric: str = "eval_loss") -> str:
    """report.md (and PNG plots) of a finished sweep: the IsoFLOP fits where the grid has
    several sizes at several budgets, L(N, D) and the learning-rate and batch-size laws where it
    varies those (vidit/budget.py), every point, and what the fits are worth."""
    from vidit import scaling

    root = storage.path(root)
    results = [r for r in json.loads((root / "results.json").read_text())
               if r.get(metric) is not None]
    params = [r["params"] for r in results]
    flops = [r["flops"] for r in results]
    tokens = [r["tokens"] for r in results]
    losses = [r[metric] for r in results]
    lines = [f"# Scaling-law sweep: {root.name}", "",
             f"{len(results)} points; loss = {metric} (fixed-t validation loss).", ""]
    try:
        fit = scaling.fit_sweep(params, flops, tokens, losses)
    except ValueError as e:
        fit = None
        lines += [f"No IsoFLOP fits: {e}.", ""]
    if fit is not None:
        _plots(root, results, fit, metric)
        lines += [
            f"Exponents with 90% bootstrap intervals ({fit['bootstrap_samples']} resamples "
            "within each budget).",
            "",
            "| law | fitted | published (DiT, Liang et al. 2024) |",
            "|---|---|---|",
            f"| N_opt ~ C^a | a = {fit['a']} | 0.57 |",
            f"| D_opt ~ C^b | b = {fit['b']} | 0.43 |",
            f"| L(C) = A C^-alpha + L_inf (frontier) | alpha = {fit['alpha']}, L_inf = "
            f"{fit['l_inf']} | |",
            "",
            "![loss vs compute](loss_vs_compute.png) ![isoflop](isoflop.png) "
            "![n_opt](n_opt_vs_compute.png)",
            "",
            "## IsoFLOP minima",
            "",
            "| budget (FLOPs) | N_opt | loss at N_opt |",
            "|---|---|---|",
            *[f"| {c:.3g} | {n:.3g} | {loss:.4f} |" for c, n, loss in fit["minima"]],
            "",
        ]
    laws = budget.fit_laws(budget.groups(
        params, tokens, flops, [r.get("lr", r.get("optim.lr")) or math.nan for r in results],
        [r.get("batch_size") or math.nan for r in results], losses))
    lines += budget_section(laws)
    if any(g.lr is not None for g in laws["groups"]):
        _lr_plot(root, results, metric)
        lines += ["![loss vs learning rate](loss_vs_lr.png)", ""]
    lines += [
        "## Points",
        "",
        "| point | params | FLOPs | tokens | steps | wall (s) | train loss | eval loss |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {r['name']} | {r['params']:,} | {r['flops']:.3g} | {r['tokens']:.3g} | "
          f"{r['train.steps']} | {r['wall_s']:.0f} | {r['final_train_loss']:.4f} | "
          f"{r['eval_loss']:.4f} |" for r in sorted(results, key=lambda r: (r["flops"], r["params"]))],
    ]
    lines += ["", "## How far to trust this", "",
              *[f"- {c}" for c in caveats(results, fit, laws)]]
    if predict_flops:
        lines += ["", f"## Prediction at C = {predict_flops:.3g} FLOPs", ""]
        if fit is not None:
            p = scaling.predict(fit, predict_flops, min(flops))
            lines += [f"IsoFLOP laws: optimal size {p['n_opt']:.3g} parameters, "
                      f"{p['tokens_opt']:.3g} training tokens, loss {p['loss']:.4f}.", ""]
        lines += prediction_lines(laws, predict_flops)
    report = "\n".join(lines) + "\n"
    storage.write_atomic(root / "report.md", report)
    return report


def budget_section(laws: dict) -> list[str]:
    """The L(N, D) and hyperparameter-law part of the report."""
    point, samples = laws["point"], laws["samples"]
    out = ["## Best loss and hyperparameters per (N, D)", "",
           "| params | tokens | best loss | optimal lr | optimal batch |", "|---|---|---|---|---|"]
    for g in sorted(laws["groups"], key=lambda g: (g.params, g.tokens)):
        lr = "" if g.lr is None else f"{g.lr:.3g}" + (" (grid edge)" if g.lr_at_edge else "")
        bs = "" if g.batch is None else f"{g.batch:.3g}" + (" (grid edge)" if g.batch_at_edge
                                                            else "")
        out.append(f"| {g.params:,.0f} | {g.tokens:.3g} | {g.loss:.4f} | {lr} | {bs} |")
    out += ["", "| law | fitted (90% bootstrap interval) |", "|---|---|"]
    if "loss" in point:
        e, a, alpha, b, beta = point["loss"]
        iv = lambda i: "[{:.3g}, {:.3g}]".format(*budget.interval(  # noqa: E731
            [s["loss"][i] for s in samples if "loss" in s]))
        out.append(f"| L(N, D) = E + A/N^alpha + B/D^beta (Hoffmann et al. 2022) | E = {e:.4g} "
                   f"{iv(0)}, alpha = {alpha:.3f} {iv(2)}, beta = {beta:.3f} {iv(4)} |")
    else:
        out.append("| L(N, D) | not fitted: the grid must vary both N and D (5+ groups) |")
    for name, label in (("lr", "learning rate"), ("batch", "batch size")):
        if name not in point:
            out.append(f"| optimal {label} | not fitted: fewer than 2 sizes with 3+ values |")
            continue
        k, a, b = point[name]
        ia = "[{:.3g}, {:.3g}]".format(*budget.interval([s[name][1] for s in samples
                                                          if name in s]))
        ib = "[{:.3g}, {:.3g}]".format(*budget.interval([s[name][2] for s in samples
                                                          if name in s]))
        law = f"{k:.3g} N^{a:.3f} {ia}" + (f" D^{b:.3f} {ib}" if b else " (D fixed in this grid)")
        out.append(f"| optimal {label} = k N^a D^b (Yin et al. 2025) | {law} |")
    return out + [""]


def prediction_lines(laws: dict, flops: float) -> list[str]:
    try:
        p = budget.predict(laws, flops)
    except ValueError as e:
        return [f"No L(N, D) prediction: {e}."]
    names = {"params": "model size (parameters)", "tokens": "training tokens", "loss": "loss",
             "lr": "learning rate", "batch": "batch size"}
    out = ["| quantity | predicted | 90% interval |", "|---|---|---|"]
    out += [f"| {names[k]} | {p[k][0]:.4g} | {p[k][1]:.4g} - {p[k][2]:.4g} |"
            for k in names if k in p]
    out += ["", *[f"- Extrapolation: {w}." for w in p["warnings"]]]
    return out


def caveats(results, fit, laws: dict | None = None) -> list[str]:
    """Warnings computed from this sweep's own numbers, then the ones every tiny sweep carries."""
    out = []
    for g in (laws or {}).get("groups", []):
        for name, edge in (("learning rate", g.lr_at_edge), ("batch size", g.batch_at_edge)):
            if edge:
                out.append(f"At {g.params:,.0f} parameters and {g.tokens:.3g} tokens the best "
                           f"{name} is at the edge of the grid: the optimum may lie beyond it, "
                           f"so that point of the {name} law is a bound.")
    groups = (laws or {}).get("groups", [])
    if "loss" in (laws or {}).get("point", {}) and len(groups) < 10:
        out.append(f"L(N, D) has 5 parameters and is fitted to {len(groups)} (N, D) groups: it "
                   f"passes near every point and its exponents are poorly determined; read its "
                   f"predictions far from the grid as illustrations, not forecasts.")
    if fit is None:
        return out + _general_caveats(results)
    flops = np.array([r["flops"] for r in results], float)
    decades = np.log10(flops.max() / flops.min())
    out.append(f"The budgets span {decades:.1f} decades of compute; exponents fitted over so short "
               f"a range move a lot with a single point (see the intervals).")
    for c, n_opt, _ in fit["minima"]:
        at = [r["params"] for r in results if abs(r["flops"] / c - 1) <= 0.05]
        if np.isclose(n_opt, min(at)) or np.isclose(n_opt, max(at)):
            out.append(f"At {c:.3g} FLOPs the best size is at the edge of the grid ({n_opt:.3g}): "
                       f"the true optimum may lie outside it, so N_opt there is a bound, not a "
                       f"minimum. Add a size beyond it.")
    front = [loss for _, loss in fit["frontier"]]
    if any(b >= a for a, b in zip(front, front[1:])):
        out.append("The frontier does not fall at every step in compute: some budget's best loss "
                   "is no better than a smaller budget's (noise or a mis-set learning rate).")
    else:
        out.append(f"The frontier falls with compute at every budget ({front[0]:.4f} -> "
                   f"{front[-1]:.4f}).")
    short = sorted((r["train.steps"], r["name"]) for r in results
                   if int(r.get("train.steps", 10**9)) < 200)
    if short:
        out.append(f"{len(short)} point(s) train for under 200 steps ("
                   + ", ".join(f"{name}: {steps}" for steps, name in short)
                   + "): far from converged, they pull that budget's N_opt toward smaller models.")
    a = fit["a"]
    if a.high - a.low > 0.3:
        out.append(f"The 90% interval on a is wide ({a.low:.2f} to {a.high:.2f}); agreement or "
                   f"disagreement with the published 0.57 is not significant.")
    return out + _general_caveats(results)


def _general_caveats(results) -> list[str]:
    per_run = {}  # (size, tokens) -> the learning rates tried there
    for r in results:
        per_run.setdefault((r["params"], f"{r.get('tokens', 0):.3g}"), set()).add(
            r.get("lr", r.get("optim.lr")))
    tried = max(len(v - {None}) for v in per_run.values())
    tuning = (f"{tried} learning rates per size" if tried > 1 else
              "one learning rate for every size (no per-size tuning)")
    return [
        f"One seed per point, {tuning}, and a fixed-t validation loss averaged over a few "
        "batches: each loss carries noise of the order of the differences between "
        "neighbouring sizes.",
        f"Models of {min(r['params'] for r in results):,}-{max(r['params'] for r in results):,} "
        "parameters: at this size the embeddings and the final layer are a large share of the "
        "parameters and attention a bigger share of the FLOPs than at scale, and a small "
        "dataset saturates early. The published exponents (Liang et al. 2024: DiTs at "
        "1e17-6e18 FLOPs) describe large models; a sweep this small shows that the loop works "
        "end to end, not what the exponents are for video DiTs at scale.",
    ]


def _plots(root, results, fit, metric):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    flops = np.array([r["flops"] for r in results])
    params = np.array([r["params"] for r in results])
    losses = np.array([r[metric] for r in results])

    fig, ax = plt.subplots(figsize=(6, 4))
    sc = ax.scatter(flops, losses, c=np.log10(params), cmap="viridis")
    fig.colorbar(sc, label="log10 parameters")
    front = np.array(fit["frontier"])
    ax.plot(front[:, 0], front[:, 1], "k--", label="frontier")
    amp, alpha, l_inf = fit["loss_fit"]
    if np.isfinite(alpha):
        grid = np.logspace(np.log10(flops.min()), np.log10(flops.max()), 50)
        ax.plot(grid, amp * (grid / flops.min()) ** -alpha + l_inf, "r-",
                label=f"fit: alpha={alpha:.2f}")
    ax.set(xscale="log", xlabel="training FLOPs", ylabel=metric, title="loss vs compute")
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, root / "loss_vs_compute.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for c in sorted(set(np.round(np.log10(flops), 2))):
        at = np.isclose(np.round(np.log10(flops), 2), c)
        order = np.argsort(params[at])
        ax.plot(params[at][order], losses[at][order], "o-", label=f"C=1e{c:.1f}")
    for c, n, loss in fit["minima"]:
        ax.plot(n, loss, "k*", markersize=12)
    ax.set(xscale="log", xlabel="parameters", ylabel=metric, title="IsoFLOP curves (* = N_opt)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save_figure(fig, root / "isoflop.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    m = np.array([(c, n) for c, n, _ in fit["minima"]])
    ax.plot(m[:, 0], m[:, 1], "ko", label="IsoFLOP minima")
    grid = np.logspace(np.log10(m[:, 0].min()), np.log10(m[:, 0].max()), 20)
    ax.plot(grid, fit["n_opt_prefactor"] * grid ** fit["a"].value, "r-",
            label=f"N_opt ~ C^{fit['a'].value:.2f}")
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs", ylabel="N_opt",
           title="compute-optimal model size")
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, root / "n_opt_vs_compute.png")
    plt.close(fig)


def _lr_plot(root, results, metric):
    """Loss against learning rate, one curve per model size (at each size's largest budget)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for n in sorted({r["params"] for r in results}):
        rows = [r for r in results if r["params"] == n]
        top = max(r["tokens"] for r in rows)
        rows = sorted((r.get("lr", r.get("optim.lr")), r[metric]) for r in rows
                      if r["tokens"] == top)
        ax.plot(*zip(*rows), "o-", label=f"{n:,} params")
    ax.set(xscale="log", xlabel="learning rate", ylabel=metric, title="loss vs learning rate")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save_figure(fig, root / "loss_vs_lr.png")
    plt.close(fig)


def _save_figure(fig, file) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    storage.write_atomic(file, buf.getvalue())


def main(argv):
    from absl import flags
    del argv
    f = flags.FLAGS
    if f.analyze:
        print(analyze(f.analyze, f.predict))
        return
    if f.status:
        print(status_report(f.status))
        return
    if not (f.sweep and f.workdir):
        raise SystemExit("give --sweep and --workdir to run a sweep, --analyze DIR or --status DIR")
    path, _, arg = f.sweep.partition(":")  # configs/sweeps/x.py:arg, as --config takes
    sweep = load_py_config(path, arg or None)
    if f.check_topology:
        problems = check_plan(sweep, f.check_topology)
        for line in problems:
            print(f"[sweep] {line}", file=sys.stderr)
        if problems:
            raise SystemExit(f"{len(problems)} point(s) of the plan cannot run on "
                             f"{f.check_topology}; nothing was started")
        print(f"[sweep] every point compiles and fits on {f.check_topology}", flush=True)
    if f.launcher in ORCHESTRATORS:
        run_orchestrated(sweep, f.workdir, orchestrate.submitter(f.launcher), poll_s=f.poll_s)
    else:
        run_sweep(sweep, f.workdir, f.launcher, f.parallel, f.dry_run)


def define_flags():
    from absl import flags

    flags.DEFINE_string("sweep", None, "Sweep config file (configs/sweeps/*.py).")
    flags.DEFINE_string("workdir", None, "Sweep directory: points/, plan.json, results.json.")
    flags.DEFINE_enum("launcher", "local", ["local", "tpu_vm", "slurm", *ORCHESTRATORS],
                      "Where points run: this machine, a TPU VM or SLURM (one point at a time "
                      "per --parallel), or an orchestrator (SkyPilot managed jobs, a GKE "
                      "JobSet; the sweep config's `cloud` section).")
    flags.DEFINE_float("poll_s", 60.0, "Orchestrated sweeps: seconds between status polls.")
    flags.DEFINE_string("status", None, "Print every point's state from a sweep directory.")
    flags.DEFINE_string("check_topology", None,
                        "Before running, compile every point for this TPU topology (e.g. "
                        "v5p:2x2x1) with vidit.compile and refuse a plan that does not fit.")
    flags.DEFINE_integer("parallel", 1, "Points run at the same time (local launcher).")
    flags.DEFINE_bool("dry_run", False, "Print the commands instead of running them.")
    flags.DEFINE_string("analyze", None, "Fit and plot a finished sweep directory.")
    flags.DEFINE_float("predict", None, "With --analyze: a compute budget (FLOPs) to predict at.")


def entry_point():
    cli.run(main, define_flags)


if __name__ == "__main__":
    entry_point()
