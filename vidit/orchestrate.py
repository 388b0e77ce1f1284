"""Sweep points as jobs of an existing orchestrator: SkyPilot managed jobs or a GKE JobSet.

The sweep (vidit/sweep.py) writes each point's spec beside its results, submits it, polls the
job and records the point's state; the orchestrator does the rest (placing the job on a TPU
slice, restarting it after preemption: SkyPilot's managed-job recovery, JobSet's
failurePolicy.maxRestarts). Every restart resumes from the checkpoints in the point's workdir.

A sweep config's `cloud` section says where points run:

    s.cloud = dict(tpu="v5p-8",           # TPU type: version and TensorCore count, as gcloud
                   topology="2x2x1",      # chips per slice (JobSet node selector)
                   num_slices=1,
                   image="us-docker.pkg.dev/P/vidit/train:latest",  # JobSet: the container
                   use_spot=True,         # SkyPilot: spot TPUs, recovered on preemption
                   max_restarts=3)        # JobSet: restarts before the point counts as failed

Spec builders are pure (dicts); the submitters call `sky` (the SkyPilot SDK) and `kubectl`.
"""
from __future__ import annotations

import copy
import json
import math
import re
import shlex
import subprocess
from typing import Any

# GKE's node label for each TPU version (cloud.google.com/gke-tpu-accelerator).
GKE_ACCELERATORS = {"v4": "tpu-v4-podslice", "v5e": "tpu-v5-lite-podslice",
                    "v5p": "tpu-v5p-slice", "v6e": "tpu-v6e-slice"}
CHIPS_PER_HOST = 4  # TPU VM hosts of every version above hold 4 chips (GKE multi-host slices)
STATES = ("pending", "running", "succeeded", "failed")


def job_name(point_name: str) -> str:
    """A Kubernetes / SkyPilot name: lower-case DNS-1123, at most 63 characters."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"vidit-{point_name}".lower()).strip("-")
    return name[:63].rstrip("-")


def _cloud(sweep) -> dict:
    cloud = dict(sweep.get("cloud") or {})
    if "tpu" not in cloud:
        raise ValueError("an orchestrated sweep needs `cloud.tpu` (e.g. 'v5p-8') in its config")
    cloud.setdefault("topology", "2x2x1")
    cloud.setdefault("num_slices", 1)
    cloud.setdefault("use_spot", True)
    cloud.setdefault("max_restarts", 3)
    return cloud


def skypilot_task(name: str, train_args: list[str], sweep) -> dict:
    """A SkyPilot task (the YAML's fields): the checkout synced as the workdir, vidit installed
    with its TPU extra, `python -m vidit.train` run on every host of the slice."""
    cloud = _cloud(sweep)
    return {
        "name": name,
        "workdir": ".",
        "num_nodes": int(cloud["num_slices"]),
        "resources": {"accelerators": f"tpu-{cloud['tpu']}", "use_spot": bool(cloud["use_spot"])},
        "setup": 'pip install -e ".[tpu,video]"',
        "run": shlex.join(["python3", "-m", "vidit.train", *train_args]),
    }


def jobset_manifest(name: str, train_args: list[str], sweep) -> dict:
    """A JobSet with one replicated Job per slice, one pod per TPU host (as XPK builds them)."""
    cloud = _cloud(sweep)
    version = cloud["tpu"].split("-")[0]
    if version not in GKE_ACCELERATORS:
        raise ValueError(f"cloud.tpu='{cloud['tpu']}': GKE TPU versions are "
                         f"{sorted(GKE_ACCELERATORS)}")
    if "image" not in cloud:
        raise ValueError("a JobSet sweep needs `cloud.image`: a container with vidit installed")
    chips = math.prod(int(x) for x in str(cloud["topology"]).split("x"))
    hosts = max(1, chips // CHIPS_PER_HOST)
    pod = {
        "restartPolicy": "Never",
        "nodeSelector": {"cloud.google.com/gke-tpu-accelerator": GKE_ACCELERATORS[version],
                         "cloud.google.com/gke-tpu-topology": str(cloud["topology"])},
        "containers": [{
            "name": "vidit",
            "image": cloud["image"],
            "command": ["python3", "-m", "vidit.train", *train_args],
            "resources": {"limits": {"google.com/tpu": str(min(chips, CHIPS_PER_HOST))}},
        }],
    }
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": name, "annotations": {
            "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}},
        "spec": {
            "failurePolicy": {"maxRestarts": int(cloud["max_restarts"])},
            "replicatedJobs": [{
                "name": "slice",
                "replicas": int(cloud["num_slices"]),
                "template": {"spec": {"parallelism": hosts, "completions": hosts,
                                      "backoffLimit": 0, "template": {"spec": pod}}},
            }],
        },
    }


def validate_skypilot(task: dict) -> None:
    """SkyPilot's own loader and schema check (raises on a bad task)."""
    import sky
    sky.Task.from_yaml_config(copy.deepcopy(task))  # the loader consumes its argument


def validate_jobset(manifest: dict) -> None:
    """The JobSet's own fields, then each replicated Job's template through the Kubernetes
    client's models (required fields, types)."""
    from kubernetes import client
    if manifest.get("apiVersion") != "jobset.x-k8s.io/v1alpha2" or manifest.get("kind") != "JobSet":
        raise ValueError("not a jobset.x-k8s.io/v1alpha2 JobSet")
    name = manifest.get("metadata", {}).get("name", "")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name):
        raise ValueError(f"JobSet name '{name}' is not a DNS-1123 label")
    jobs = manifest.get("spec", {}).get("replicatedJobs") or []
    if not jobs:
        raise ValueError("a JobSet needs spec.replicatedJobs")
    api = client.ApiClient()
    for job in jobs:
        if not job.get("name") or int(job.get("replicas", 0)) < 1:
            raise ValueError(f"replicatedJob {job.get('name')!r} needs a name and replicas >= 1")
        template = api.deserialize(json.dumps(job["template"]), "V1JobTemplateSpec",
                                   "application/json")
        pod = template.spec.template.spec
        if not pod.containers or any(not c.image for c in pod.containers):
            raise ValueError(f"replicatedJob {job['name']!r}: every container needs an image")


# ------------------------------------------------------------------------------- submitters
class SkyPilotSubmitter:
    """Submits points as SkyPilot managed jobs (`sky jobs launch`), polls their status."""

    kind = "skypilot"
    spec = staticmethod(skypilot_task)
    validate = staticmethod(validate_skypilot)

    def submit(self, name: str, spec: dict) -> str:
        import sky
        job_ids, _ = sky.stream_and_get(sky.jobs.launch(sky.Task.from_yaml_config(
            copy.deepcopy(spec)),
                                                        name=name))
        return str(job_ids[0])

    def poll(self, job: str) -> str:
        import sky
        records = sky.get(sky.jobs.queue_v2(refresh=False, job_ids=[int(job)]))[0]
        status = records[0]["status"].name if records else "FAILED"
        if status == "SUCCEEDED":
            return "succeeded"
        if status.startswith("FAILED") or status in ("CANCELLED", "CANCELLING"):
            return "failed"
        return "pending" if status in ("PENDING", "DEPRECATED_SUBMITTED") else "running"


class JobSetSubmitter:
    """Submits points as JobSets (`kubectl apply`), polls their terminal state."""

    kind = "jobset"
    spec = staticmethod(jobset_manifest)
    validate = staticmethod(validate_jobset)

    def submit(self, name: str, spec: dict) -> str:
        subprocess.run(["kubectl", "apply", "-f", "-"], input=json.dumps(spec), text=True,
                       check=True, capture_output=True)
        return name

    def poll(self, job: str) -> str:
        out = subprocess.run(["kubectl", "get", "jobset", job, "-o", "json"], text=True,
                             capture_output=True)
        if out.returncode:
            return "failed"  # deleted, or never accepted
        status = json.loads(out.stdout).get("status", {})
        terminal = status.get("terminalState", "")
        if terminal == "Completed":
            return "succeeded"
        if terminal == "Failed":
            return "failed"
        return "running" if status.get("replicatedJobsStatus") else "pending"


SUBMITTERS = {"skypilot": SkyPilotSubmitter, "jobset": JobSetSubmitter}


def submitter(kind: str) -> Any:
    return SUBMITTERS[kind]()
