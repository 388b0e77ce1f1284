#!/usr/bin/env bash
# Cloud TPU VM slice: create, install, run the same command on every worker, tail logs, delete.
#
#   launch/tpu_vm.sh create                       # TPU_NAME, ZONE, ACCELERATOR, VERSION from env
#   launch/tpu_vm.sh install                      # copy this checkout, pip install -e ".[tpu]"
#   launch/tpu_vm.sh run --config configs/dit_1b.py --workdir gs://BUCKET/runs/dit_1b
#   launch/tpu_vm.sh logs                         # tail worker 0's log
#   launch/tpu_vm.sh delete
#
# Every worker runs `python -m vidit.train` with the same flags; JAX finds its peers on a TPU VM
# slice by itself (vidit/distributed.py), each worker reads only its rows of every global batch,
# and Orbax writes/reads checkpoints collectively (use a gs:// workdir all workers can reach).
# Before paying for the slice: python -m vidit.compile --config ... --topology v5p:4x4x4
set -euo pipefail
TPU_NAME="${TPU_NAME:-vidit}"
ZONE="${ZONE:-us-east5-a}"
ACCELERATOR="${ACCELERATOR:-v5p-128}"
VERSION="${VERSION:-v2-alpha-tpuv5}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REMOTE_DIR="vidit"
LOG="/tmp/vidit_train.log"
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" $PROJECT_FLAG --worker=all --command "$1"
}

case "${1:-}" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" $PROJECT_FLAG \
      --accelerator-type "$ACCELERATOR" --version "$VERSION" ;;
  install)
    root="$(cd "$(dirname "$0")/.." && pwd)"
    tar -C "$root" --exclude=.git --exclude=runs -czf /tmp/vidit_src.tgz .
    gcloud compute tpus tpu-vm scp /tmp/vidit_src.tgz "$TPU_NAME":/tmp/ --zone "$ZONE" \
      $PROJECT_FLAG --worker=all
    ssh_all "mkdir -p $REMOTE_DIR && tar -C $REMOTE_DIR -xzf /tmp/vidit_src.tgz && \
      cd $REMOTE_DIR && python3 -m pip install -q -e '.[tpu,video]'" ;;
  run)
    shift
    args=$(printf ' %q' "$@")
    ssh_all "cd $REMOTE_DIR && nohup python3 -m vidit.train$args > $LOG 2>&1 &" ;;
  logs)
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" $PROJECT_FLAG --worker=0 \
      --command "tail -f $LOG" ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" $PROJECT_FLAG --quiet ;;
  *)
    sed -n '2,14p' "$0"; exit 2 ;;
esac
