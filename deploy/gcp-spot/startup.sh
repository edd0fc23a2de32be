#!/bin/bash
# ckptd on a GCP spot VM: the instance's startup script (metadata key `startup-script`).
# GCP runs it at every boot, so every step is idempotent. Recommended layout: checkpoints on a local SSD
# (NVMe, `--local-ssd=interface=NVME`), so every save runs at local disk speed; ckptd copies each new one to
# Cloud Storage in the background, and the VM that replaces a preempted one resumes from there.
# Credentials: the VM's service account, read by the standard chain; none is written here or in the unit.
# Change: BUCKET, JOB, the training code and its arguments. README.md beside this file explains each part.
set -euo pipefail

JOB=llama-7b
BUCKET=my-bucket                   # the service account needs roles/storage.objectUser on it
MNT=/mnt/ckptd
SSD=/dev/disk/by-id/google-local-nvme-ssd-0

if ! python3 -m venv --help >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
fi
getent passwd ckptd >/dev/null || useradd --system --uid 990 --user-group --no-create-home \
    --home-dir /nonexistent --shell /usr/sbin/nologin ckptd
if [ ! -e "$SSD" ]; then
    echo "no local NVMe SSD: create the VM with --local-ssd=interface=NVME" >&2
    exit 1
fi
blkid "$SSD" >/dev/null || mkfs.ext4 -q -L ckptd "$SSD"     # a local SSD is blank after a preemption
mkdir -p "$MNT"
grep -q " $MNT " /etc/fstab || echo "LABEL=ckptd $MNT ext4 defaults,noatime,nofail 0 2" >> /etc/fstab
mountpoint -q "$MNT" || mount "$MNT"
install -d -o ckptd -g ckptd -m 0750 "$MNT/$JOB"

if [ ! -x /opt/ckptd/bin/ckptd ]; then
    python3 -m venv /opt/ckptd
    /opt/ckptd/bin/pip install --quiet torch==2.13.0      # the torch build for your GPUs
    # ckptd is not on PyPI: build its wheel from the repository once (`python -m build`, see the README's
    # Install) and put it in the bucket; then install it with its object-store client.
    mkdir -p /opt/ckptd-job
    gcloud storage cp "gs://$BUCKET/ckptd/wheels/ckptd-0.1.0-py3-none-any.whl" /opt/ckptd-job/
    /opt/ckptd/bin/pip install --quiet "/opt/ckptd-job/ckptd-0.1.0-py3-none-any.whl[remote]"
fi

mkdir -p /opt/ckptd-job
cat > /opt/ckptd-job/ckptd.yaml <<'YAML'
dir: /mnt/ckptd/llama-7b    # the local SSD ($MNT/$JOB): fast, lost with the VM
remote: gs://my-bucket/ckptd/llama-7b   # ($BUCKET, $JOB) the durable tier: each new checkpoint is uploaded in the background
remote_keep_last: 10        # on Cloud Storage (manifest deleted first; the newest valid one always stays)
keep_last: 2                # on the SSD; a checkpoint stays until the bucket holds it or a newer one
every_steps: 500
every: 1800
grace: 20                   # GCP: 30 s from the preemption notice to the hard stop, shutdown included
hang_timeout: 900           # below the unit's WatchdogSec (20 min)
notices:
  source: gcp               # watch the metadata server's `preempted` flag
YAML

# Your training code, e.g. in the image or from Cloud Storage: gcloud storage cp -r gs://BUCKET/job /opt/job
test -f /opt/job/train.py
/opt/ckptd/bin/ckptd install-unit "$JOB" --config /opt/ckptd-job/ckptd.yaml --run-as ckptd --now \
    /opt/job/train.py --steps 100000
