"""Orchestrated sweeps: the job specs pass SkyPilot's and Kubernetes' own validators, the sweep's
state machine submits, polls, retries and records through a fake orchestrator, `--status` reads
the states back, and a plan is compiled for its TPU topology before anything runs."""
import json
import os
import subprocess

import pytest
import yaml

from vidit import orchestrate, storage, sweep as sweep_lib
from tests.test_sweep import tiny_sweep

ARGS = ["--config", "configs/moving_digits.py", "--workdir", "gs://b/sweep/points/p0",
        "--config.model.width=64"]


def cloud_sweep():
    s = tiny_sweep()
    s.cloud = dict(tpu="v5p-8", topology="2x2x1", image="us-docker.pkg.dev/p/vidit/train:1")
    return s


def test_skypilot_task_passes_skypilots_loader_and_a_bad_one_does_not():
    task = orchestrate.skypilot_task("vidit-p0", ARGS, cloud_sweep())
    orchestrate.validate_skypilot(task)
    assert task["run"].startswith("python3 -m vidit.train --config configs/moving_digits.py")
    assert task["resources"] == {"accelerators": "tpu-v5p-8", "use_spot": True}
    with pytest.raises(Exception, match="resourcez|Invalid|not allowed|Additional"):
        orchestrate.validate_skypilot({**task, "resourcez": task["resources"]})


def test_jobset_manifest_passes_the_kubernetes_models_and_bad_ones_are_named():
    s = cloud_sweep()
    s.cloud.topology, s.cloud.num_slices = "4x4x4", 2
    manifest = orchestrate.jobset_manifest("vidit-p0", ARGS, s)
    orchestrate.validate_jobset(manifest)
    job = manifest["spec"]["replicatedJobs"][0]
    assert job["replicas"] == 2 and job["template"]["spec"]["parallelism"] == 16  # 64 chips
    pod = job["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "4x4x4"
    assert pod["containers"][0]["command"][3:] == ARGS
    # The committed example manifest passes the same check.
    with open(os.path.join(sweep_lib.ROOT, "launch", "jobset.yaml")) as f:
        orchestrate.validate_jobset(yaml.safe_load(f))
    bad = json.loads(json.dumps(manifest))
    bad["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0] \
        .pop("name")
    with pytest.raises(ValueError, match="name"):
        orchestrate.validate_jobset(bad)
    with pytest.raises(ValueError, match="DNS-1123"):
        orchestrate.validate_jobset({**manifest, "metadata": {"name": "Vidit_P0"}})
    del s.cloud["image"]
    with pytest.raises(ValueError, match="cloud.image"):
        orchestrate.jobset_manifest("vidit-p0", ARGS, s)
    assert orchestrate.job_name("d2w64_c3e10_lr0.001") == "vidit-d2w64-c3e10-lr0-001"


class FakeOrchestrator:
    """Jobs go pending -> running -> succeeded (writing the point's summary.json), except that
    the points in `fail` fail as many times as given."""

    kind = "fake"
    spec = staticmethod(orchestrate.skypilot_task)
    validate = staticmethod(orchestrate.validate_skypilot)

    def __init__(self, fail=None):
        self.fail, self.jobs, self.submitted = dict(fail or {}), {}, []

    def submit(self, name, spec):
        job = f"job{len(self.submitted)}"
        workdir = spec["run"].split("--workdir ")[1].split(" ")[0]
        self.jobs[job] = {"polls": 0, "workdir": workdir,
                          "fails": self.fail.get(os.path.basename(workdir), 0) > 0}
        if self.jobs[job]["fails"]:
            self.fail[os.path.basename(workdir)] -= 1
        self.submitted.append(name)
        return job

    def poll(self, job):
        j = self.jobs[job]
        j["polls"] += 1
        if j["polls"] == 1:
            return "pending"
        if j["polls"] == 2:
            return "running"
        if j["fails"]:
            return "failed"
        storage.write_atomic(storage.path(j["workdir"]) / "summary.json", json.dumps(
            {"step": 5, "final_train_loss": 0.5, "eval_loss": 0.4, "params": 1000,
             "train_flops": 1e10, "tokens": 1e5, "wall_s": 1.0}))
        return "succeeded"


def test_state_machine_submits_polls_retries_and_status_reads_it_back(tmp_path):
    names = [p.name for p in sweep_lib.plan(cloud_sweep())]
    fake = FakeOrchestrator(fail={names[1]: 1, names[2]: 5})  # one flaky, one always failing
    polls = []
    results = sweep_lib.run_orchestrated(cloud_sweep(), str(tmp_path), fake, poll_s=7,
                                         sleep=polls.append)
    assert sorted(r["name"] for r in results) == sorted([names[0], names[1], names[3]])
    failures = json.loads((tmp_path / "failures.json").read_text())
    assert [f["name"] for f in failures] == [names[2]] and failures[0]["attempts"] == 2
    assert len(fake.submitted) == 4 + 1 + 1 and set(polls) == {7}
    status = json.loads((tmp_path / "points" / names[1] / "status.json").read_text())
    assert status["state"] == "done" and status["attempts"] == 2 and status["job"] == "job4"
    spec = json.loads((tmp_path / "points" / names[0] / "fake.json").read_text())
    assert f"--workdir {tmp_path}/points/{names[0]} " in spec["run"]
    assert spec["run"].endswith("--config.sample.num=0")

    report = sweep_lib.status_report(str(tmp_path))
    assert report.startswith(f"{tmp_path}: 4 points (3 done, 1 failed)")
    assert f"| {names[2]} | failed | 2 | fake job" in report and "| 0.4000 |" in report

    # Restarted (another machine, say): nothing finished or given up on is submitted again.
    fake.submitted.clear()
    sweep_lib.run_orchestrated(cloud_sweep(), str(tmp_path), fake, sleep=polls.append)
    assert fake.submitted == []


def test_a_sweep_restarted_while_jobs_run_polls_them_instead_of_resubmitting(tmp_path):
    fake = FakeOrchestrator()
    calls = []

    def stop_after_first_poll(_):
        calls.append(1)
        raise KeyboardInterrupt  # the sweep process dies with every job pending

    with pytest.raises(KeyboardInterrupt):
        sweep_lib.run_orchestrated(cloud_sweep(), str(tmp_path), fake,
                                   sleep=stop_after_first_poll)
    assert len(fake.submitted) == 4
    assert "4 submitted" in sweep_lib.status_report(str(tmp_path))
    results = sweep_lib.run_orchestrated(cloud_sweep(), str(tmp_path), fake, sleep=lambda s: None)
    assert len(results) == 4 and len(fake.submitted) == 4  # polled, not submitted again


def test_sweep_state_in_a_bucket_and_status_from_it(bucket_dir):
    fake = FakeOrchestrator(fail={sweep_lib.plan(cloud_sweep())[0].name: 5})
    results = sweep_lib.run_orchestrated(cloud_sweep(), str(bucket_dir), fake,
                                         sleep=lambda s: None)
    assert len(results) == 3
    report = sweep_lib.status_report(str(bucket_dir))
    assert report.startswith("gs://bucket/") and "(3 done, 1 failed)" in report


def test_status_of_a_missing_sweep_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="plan.json not found"):
        sweep_lib.status_report(str(tmp_path / "nothing"))


def test_check_plan_names_points_that_do_not_fit_or_compile():
    def fake_compile(command, **kw):
        width = next(a for a in command if a.startswith("--config.model.width=")).split("=")[1]
        if width == "64":
            return subprocess.CompletedProcess(command, 0, json.dumps(
                {"fits": False, "per_chip_gib": {"total": 123.4}}), "")
        return subprocess.CompletedProcess(command, 1, "", "ConfigError: bad mesh\n")

    problems = sweep_lib.check_plan(tiny_sweep(), "v5p:2x2x1", run=fake_compile)
    assert len(problems) == 2  # one compile per model size, not per point
    assert any("needs 123.4 GiB per chip on v5p:2x2x1" in p for p in problems)
    assert any("does not compile for v5p:2x2x1: ConfigError: bad mesh" in p for p in problems)


@pytest.mark.slow
def test_check_plan_compiles_each_size_with_vidit_compile():
    assert sweep_lib.check_plan(tiny_sweep(), "v5p:2x2x1") == []
