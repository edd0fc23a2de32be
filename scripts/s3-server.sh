#!/bin/bash
# A real S3 server on 127.0.0.1 for tests and benchmarks: single-node Ceph (monitor, memstore OSD, RADOS
# Gateway) from the Debian packages ceph-mon, ceph-osd and radosgw. Every daemon runs under its own deadline.
#
#   scripts/s3-server.sh up DIR [RGW_PORT MON_PORT_V2 MON_PORT_V1 [STORE_BYTES]]   # prints the endpoint when ready
#   scripts/s3-server.sh down DIR
#
# Credentials: access key ckptdkey, secret ckptdsecret; path-style addressing; any region.
set -euo pipefail
cmd=${1:?usage: s3-server.sh up|down DIR [RGW_PORT MON_PORT_V2 MON_PORT_V1 [STORE_BYTES]]}
D=${2:?give the server directory}
if [ "$cmd" = down ]; then
    # Each pid file names a `timeout` wrapper, which leads a process group with its daemon: signal the group,
    # so a daemon slow to stop is never left behind when its wrapper goes.
    for p in rgw osd mon; do
        if [ -f "$D/$p.pid" ]; then kill -TERM -- "-$(cat "$D/$p.pid")" 2>/dev/null || true; fi
    done
    for p in rgw osd mon; do
        if [ -f "$D/$p.pid" ]; then
            pid=$(cat "$D/$p.pid")
            for _ in $(seq 1 100); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.1; done
            kill -KILL -- "-$pid" 2>/dev/null || true
        fi
    done
    exit 0
fi
[ "$cmd" = up ] || { echo "usage: s3-server.sh up|down DIR ..." >&2; exit 2; }
RGW_PORT=${3:-19600}; MON2=${4:-13300}; MON1=${5:-16789}; BYTES=${6:-1073741824}
LIFE=${CKPTD_S3_LIFETIME:-3600}  # seconds each daemon may live: a forgotten server goes away by itself
rm -rf "$D"; mkdir -p "$D"/{run,log,mon-a,osd0}
FSID=$(uuidgen); export CEPH_CONF=$D/ceph.conf
cat > "$CEPH_CONF" <<CONF
[global]
fsid = $FSID
mon host = [v2:127.0.0.1:$MON2,v1:127.0.0.1:$MON1]
mon initial members = a
public addr = 127.0.0.1
ms bind ipv6 = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = $BYTES
run dir = $D/run
admin socket = $D/run/\$name.asok
log file = $D/log/\$name.log
mon data = $D/mon-\$id
osd data = $D/osd\$id
keyring = $D/keyring
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:$RGW_PORT
CONF
wait_for() {  # wait_for TRIES CMD...: poll a condition, 0.2 s apart
    local n=$1; shift
    for _ in $(seq 1 "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
    echo "s3-server: timed out waiting for: $*; logs in $D/log" >&2; return 1
}
ceph-authtool "$D/keyring" --create-keyring --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool "$D/keyring" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
ceph-authtool "$D/keyring" --gen-key -n client.rgw.a --cap mon 'allow rw' --cap osd 'allow rwx' >/dev/null
monmaptool --create --addv a "[v2:127.0.0.1:$MON2,v1:127.0.0.1:$MON1]" --fsid "$FSID" "$D/monmap" >/dev/null
ceph-mon --mkfs -i a --monmap "$D/monmap" --keyring "$D/keyring"
timeout "$LIFE" ceph-mon -f -i a > "$D/log/mon.out" 2>&1 & echo $! > "$D/mon.pid"
wait_for 300 timeout 5 ceph --connect-timeout 3 mon stat
OSD_UUID=$(uuidgen)
ceph-authtool "$D/osd0/keyring" --create-keyring --gen-key -n osd.0 >/dev/null
OSD_KEY=$(ceph-authtool "$D/osd0/keyring" -p -n osd.0)
echo "{\"cephx_secret\": \"$OSD_KEY\"}" | timeout 30 ceph osd new "$OSD_UUID" -i - >/dev/null
timeout 120 ceph-osd -i 0 --mkfs --osd-uuid "$OSD_UUID" --keyring "$D/osd0/keyring" > "$D/log/osd-mkfs.out" 2>&1
timeout "$LIFE" ceph-osd -f -i 0 --keyring "$D/osd0/keyring" > "$D/log/osd.out" 2>&1 & echo $! > "$D/osd.pid"
osd_up() { timeout 5 ceph osd stat 2>/dev/null | grep -q '1 up'; }
wait_for 450 osd_up
timeout "$LIFE" radosgw -f -n client.rgw.a > "$D/log/rgw.out" 2>&1 & echo $! > "$D/rgw.pid"
wait_for 900 curl -s -o /dev/null "http://127.0.0.1:$RGW_PORT/"
timeout 60 radosgw-admin user create --uid=ckptd --display-name=ckptd --access-key=ckptdkey \
    --secret-key=ckptdsecret >/dev/null
echo "http://127.0.0.1:$RGW_PORT"
