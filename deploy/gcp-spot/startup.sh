#!/bin/bash
# ckptd on a GCP spot VM: the instance's startup script (metadata key `startup-script`).
# GCP runs it at every boot, so every step is idempotent. Checkpoints live on a Filestore share, so the
# VM that replaces a preempted one resumes where it stopped.
# Change: SHARE, JOB, the training code and its arguments. README.md beside this file explains each part.
set -euo pipefail

JOB=llama-7b
SHARE=filestore-ip:/ckptd          # Filestore instance IP and share name
MNT=/mnt/ckptd

if ! command -v mount.nfs >/dev/null || ! python3 -m venv --help >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nfs-common python3-venv
fi
# The same uid on every VM, so the files on the share stay writable after a replacement.
getent passwd ckptd >/dev/null || useradd --system --uid 990 --user-group --no-create-home \
    --home-dir /nonexistent --shell /usr/sbin/nologin ckptd
mkdir -p "$MNT"
grep -q " $MNT " /etc/fstab || echo "$SHARE $MNT nfs vers=3,hard,_netdev,nofail 0 0" >> /etc/fstab
mountpoint -q "$MNT" || mount "$MNT"
install -d -o ckptd -g ckptd -m 0750 "$MNT/$JOB"

if [ ! -x /opt/ckptd/bin/ckptd ]; then
    python3 -m venv /opt/ckptd
    /opt/ckptd/bin/pip install --quiet torch==2.13.0      # the torch build for your GPUs
    # ckptd is not on PyPI: build its wheel from the repository once (`python -m build`, see the README's
    # Install) and copy it onto the Filestore share: $MNT/wheels/ckptd-0.1.0-py3-none-any.whl
    /opt/ckptd/bin/pip install --quiet "$MNT/wheels/ckptd-0.1.0-py3-none-any.whl"
fi

mkdir -p /opt/ckptd-job
cat > /opt/ckptd-job/ckptd.yaml <<'YAML'
dir: /mnt/ckptd/llama-7b    # on Filestore: shared by every VM that runs this job
every_steps: 500
every: 1800
keep_last: 3
grace: 20                   # GCP: 30 s from the preemption notice to the hard stop, shutdown included
hang_timeout: 900           # below the unit's WatchdogSec (20 min)
notices:
  source: gcp               # watch the metadata server's `preempted` flag
YAML

# Your training code, e.g. in the image or from Cloud Storage: gcloud storage cp -r gs://BUCKET/job /opt/job
test -f /opt/job/train.py
/opt/ckptd/bin/ckptd install-unit "$JOB" --config /opt/ckptd-job/ckptd.yaml --run-as ckptd --now \
    /opt/job/train.py --steps 100000
