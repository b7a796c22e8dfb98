#!/usr/bin/env bash
# Bring the one-machine cluster of cluster-local.yaml up with `ray up`, run a smoke study on it through
# `ray job submit`, take it down with `ray down`, and check that no Ray process is left.
#
#   sudo bash scripts/local_cluster_test.sh          # as root; ~1-3 min on 2 cores
#   SAGE_DIST_PYTHON=/path/to/venv/bin/python KEEP_LOGS=1 bash scripts/local_cluster_test.sh
#
# Isolation (so it can run on a machine that other people's Ray jobs share):
# - Everything runs inside fresh PID, mount and network namespaces (`unshare`): the network namespace has
#   only its own loopback, so every packet goes to 127.0.0.1 and Ray's default ports cannot collide with
#   anyone's; `ray stop` (which `ray down` runs, and which kills every Ray process it can see) sees only
#   this namespace's processes; /run is a private tmpfs and /root and /tmp are overlays whose writes land
#   there, so ~/.ray/auth_token, /tmp/ray, the SSH key and the launcher's state files never touch the
#   real ones (reads still see the real files, e.g. a base Python under /root/.pyenv).
# - sshd listens on 127.0.0.1:22 of that namespace only (a port that is free there by construction), with a
#   host key and a client key generated in a temporary folder; root logs in with the key only.
# - sshd is stopped by its PID at the end; the namespace's init exiting then kills anything left in it.
#
# Installs openssh-server and rsync with apt-get when they are missing (needs root and Debian/Ubuntu).
# The smoke study is `python studies/tune_gamma.py --smoke-test` when that file exists, otherwise a small
# Ray job that also logs one MLflow run to the head's tracking server.
# Exit status 0 on success; timings are printed as `timing: <step> <seconds>` lines.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$REPO/scripts/local_cluster_test.sh"

log() { printf '[local-cluster] %s\n' "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# ----------------------------------------------------------------------------------------------- inner --
# Runs as PID 1 of the new PID namespace, in a network namespace whose only interface is loopback.
inner() {
    local work="$1" venv="$2"
    local t0 t1 rc=0 sshd_pid=""

    ip link set lo up
    # Private /run; /root and /tmp become overlays: everything there stays readable (the venv's base
    # Python may live under /root), every write lands in this namespace's tmpfs and vanishes with it.
    mount -t tmpfs -o mode=0755 tmpfs /run
    local d
    for d in root tmp; do
        mkdir -p "/run/overlay/$d/upper" "/run/overlay/$d/work"
        mount -t overlay overlay \
            -o "lowerdir=/$d,upperdir=/run/overlay/$d/upper,workdir=/run/overlay/$d/work" "/$d"
    done
    chmod 1777 /tmp
    mkdir -p /run/sshd /root/.ssh
    chmod 700 /root/.ssh
    export HOME=/root
    touch /root/.bashrc
    # A fresh cluster state: no token, no launcher cache, no previous MLflow store from the real home.
    rm -rf /root/.ray /root/.sage_dist /root/ray_bootstrap_config.yaml /root/ray_bootstrap_key.pem \
        /root/.ssh/id_ed25519 /root/.ssh/id_ed25519.pub /tmp/ray /tmp/ray-config-* /tmp/cluster-sage-dist-local.*

    # Keys: host key and root's client key (the path cluster-local.yaml names: ~/.ssh/id_ed25519).
    local sshdir="$work/ssh"
    mkdir -p "$sshdir"
    ssh-keygen -q -t ed25519 -N '' -f "$sshdir/host_ed25519"
    ssh-keygen -q -t ed25519 -N '' -f /root/.ssh/id_ed25519
    cp /root/.ssh/id_ed25519.pub "$sshdir/authorized_keys"
    chmod 600 "$sshdir/authorized_keys"
    cat > "$sshdir/sshd_config" <<EOF
ListenAddress 127.0.0.1
Port 22
HostKey $sshdir/host_ed25519
PidFile $sshdir/sshd.pid
AuthorizedKeysFile $sshdir/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
MaxSessions 64
MaxStartups 64
SetEnv SAGE_DIST_VENV=$venv
EOF
    /usr/sbin/sshd -t -f "$sshdir/sshd_config"
    /usr/sbin/sshd -D -f "$sshdir/sshd_config" -E "$work/sshd.log" &
    sshd_pid=$!
    log "sshd pid $sshd_pid on 127.0.0.1:22 (namespace-local)"

    local ssh_opts=(-i /root/.ssh/id_ed25519 -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null
                    -o BatchMode=yes -o ConnectTimeout=5)
    local ok=0
    for _ in $(seq 1 50); do
        if ssh "${ssh_opts[@]}" root@127.0.0.1 true 2>/dev/null; then ok=1; break; fi
        sleep 0.2
    done
    [ "$ok" = 1 ] || { cat "$work/sshd.log" >&2; die "ssh to root@127.0.0.1 does not work"; }

    export PATH="$venv/bin:$PATH"
    export RAY_USAGE_STATS_ENABLED=0
    cd "$REPO"

    # 1. ray up
    t0=$(date +%s.%N)
    if ! ray up -y --no-config-cache cluster-local.yaml > "$work/ray_up.log" 2>&1; then
        tail -n 60 "$work/ray_up.log" >&2
        rc=1
    fi
    t1=$(date +%s.%N)
    echo "timing: ray_up $(elapsed "$t0" "$t1")" | tee -a "$work/timings.txt"

    # 2a. what listens: dashboard and MLflow on 127.0.0.1 only; the Jobs API refuses a request without token
    if [ "$rc" = 0 ]; then
        # MLflow starts in the background of `ray up` (~10 s): wait for its health endpoint.
        t0=$(date +%s.%N)
        python -c 'import sys, time, urllib.request
for _ in range(180):
    try:
        urllib.request.urlopen("http://127.0.0.1:5000/health", timeout=2); sys.exit(0)
    except OSError:
        time.sleep(0.5)
sys.exit(1)' || { log "MLflow did not answer on 127.0.0.1:5000"; cat /root/.sage_dist/mlflow/server.log >&2 || true; rc=1; }
        t1=$(date +%s.%N)
        echo "timing: mlflow_ready_after_ray_up $(elapsed "$t0" "$t1")" | tee -a "$work/timings.txt"
        ss -Hltn | awk '{print $4}' | sort -u > "$work/listening.log"
        local port
        for port in 8265 5000; do
            grep -qx "127.0.0.1:$port" "$work/listening.log" || { log "nothing on 127.0.0.1:$port"; rc=1; }
            if grep -Eqx "(0\.0\.0\.0|\*|\[::\]):$port" "$work/listening.log"; then
                log "port $port listens beyond loopback"; rc=1
            fi
        done
        # Reported, not failed: any wildcard listener is harmless in this loopback-only namespace.
        log "wildcard listeners (0.0.0.0, *, [::]): $(grep -E '^(0\.0\.0\.0|\*|\[::\]):' "$work/listening.log" | tr '\n' ' ')"
        local code
        code="$(python -c 'import urllib.request, urllib.error
try:
    print(urllib.request.urlopen("http://127.0.0.1:8265/api/jobs/", timeout=10).status)
except urllib.error.HTTPError as e:
    print(e.code)')"
        if [ "$code" = 401 ]; then
            log "Jobs API without token: HTTP 401 (token auth on)"
        else
            log "Jobs API without token answered HTTP $code, expected 401"; rc=1
        fi
    fi

    # 2b. the smoke study through the Jobs API (token auth, as a user's laptop would submit)
    if [ "$rc" = 0 ]; then
        local entry smoke_mode
        if [ -f "$REPO/studies/tune_gamma.py" ]; then
            smoke_mode=study
            entry=(python studies/tune_gamma.py --smoke-test)
        else
            smoke_mode=fallback
            entry=(python -c 'import os, ray, mlflow; ray.init(); res = ray.cluster_resources(); print("cluster_resources", res); mlflow.set_experiment("cluster-smoke"); run = mlflow.start_run(run_name="local-cluster-smoke"); mlflow.log_metric("cluster_cpus", res["CPU"]); mlflow.end_run(); print("mlflow_run", run.info.run_id, "at", os.environ["MLFLOW_TRACKING_URI"])')
        fi
        log "smoke mode: $smoke_mode"
        t0=$(date +%s.%N)
        if ! RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir "$REPO" \
                -- "${entry[@]}" > "$work/job.log" 2>&1; then
            tail -n 60 "$work/job.log" >&2
            rc=1
        fi
        t1=$(date +%s.%N)
        echo "timing: job_submit_${smoke_mode} $(elapsed "$t0" "$t1")" | tee -a "$work/timings.txt"
        grep -q "succeeded" "$work/job.log" || { log "job did not report success"; rc=1; }
        if [ "$smoke_mode" = study ]; then
            # The study found the head's MLflow server and the persistent storage through the environment
            # cluster-local.yaml sets (not a node-local SQLite file, not the job's temporary working dir).
            grep -q "MLflow UI: open http://127.0.0.1:5000" "$work/job.log" \
                || { log "the study did not log to MLFLOW_TRACKING_URI"; rc=1; }
            grep -q "study folder: /root/sage_dist_runs/" "$work/job.log" \
                || { log "the study did not write under SAGE_DIST_STORAGE"; rc=1; }
        fi

        # The head's MLflow server answers on 127.0.0.1:5000 and holds the smoke run.
        if ! python - "$smoke_mode" > "$work/mlflow_check.log" 2>&1 <<'EOF'
import json, sys, urllib.request
base = "http://127.0.0.1:5000/api/2.0/mlflow"
def post(path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=10))
exps = post("/experiments/search", {"max_results": 100}).get("experiments", [])
ids = [e["experiment_id"] for e in exps]
runs = post("/runs/search", {"experiment_ids": ids, "max_results": 100}).get("runs", []) if ids else []
print("experiments", [e["name"] for e in exps], "runs", len(runs))
if sys.argv[1] == "fallback":
    assert any(e["name"] == "cluster-smoke" for e in exps), "no cluster-smoke experiment on the server"
    assert runs, "no run on the server"
else:
    assert any(e["name"] == "sage_dist" for e in exps), "no sage_dist experiment on the server"
    assert len(runs) >= 3, f"expected the study's parent run and 2 trial runs, found {len(runs)}"
EOF
        then
            cat "$work/mlflow_check.log" >&2; rc=1
        fi
        cat "$work/mlflow_check.log" >&2
    fi

    # 3. ray down (runs `ray stop` on the head through ssh; the venv's `ray` must be on the remote PATH)
    t0=$(date +%s.%N)
    if ! ray down -y cluster-local.yaml > "$work/ray_down.log" 2>&1; then
        tail -n 40 "$work/ray_down.log" >&2
        rc=1
    fi
    t1=$(date +%s.%N)
    echo "timing: ray_down $(elapsed "$t0" "$t1")" | tee -a "$work/timings.txt"

    # MLflow is not a Ray process: stop its process group by the PID it wrote.
    if [ -f /root/.sage_dist/mlflow/server.pid ]; then
        local mpid
        mpid="$(cat /root/.sage_dist/mlflow/server.pid)"
        kill -TERM -- "-$mpid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$mpid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL -- "-$mpid" 2>/dev/null || true
    fi

    # 4. nothing of Ray is left (this namespace's /proc lists only our own processes); `ray down` returns
    #    before its processes have exited, so poll for up to 20 s instead of a fixed wait
    local left pattern='gcs_server|raylet|dashboard|ray/autoscaler|ray/_private|ray::|default_worker|log_monitor|runtime_env'
    for _ in $(seq 1 100); do
        left="$(ps -eo pid=,args= | grep -E "$pattern" | grep -v grep || true)"
        [ -z "$left" ] && break
        sleep 0.2
    done
    if [ -n "$left" ]; then
        log "Ray processes left after ray down:"; printf '%s\n' "$left" >&2; rc=1
    else
        log "no Ray process left after ray down"
    fi
    local listening
    listening="$(ss -Hltn | awk '{print $4}' | grep -v -x '127.0.0.1:22' || true)"
    if [ -n "$listening" ]; then
        log "sockets still listening after ray down:"; printf '%s\n' "$listening" >&2; rc=1
    fi

    kill -TERM "$sshd_pid" 2>/dev/null || true
    wait "$sshd_pid" 2>/dev/null || true
    return "$rc"
}

if [ "${1:-}" = "--inner" ]; then
    inner "$2" "$3"
    exit $?
fi

# ----------------------------------------------------------------------------------------------- outer --
[ "$(id -u)" = 0 ] || die "run as root (sshd, namespaces and apt-get need it)"
command -v unshare > /dev/null || die "unshare (util-linux) is missing"
command -v ip > /dev/null || die "ip (iproute2) is missing"

missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v rsync > /dev/null || missing+=(rsync)
command -v ssh > /dev/null || missing+=(openssh-client)
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    # Debian's policy-rc.d in containers keeps the package's own sshd from starting; if one started anyway,
    # it is stopped below by the PID it wrote.
    had_pid=0; [ -f /run/sshd.pid ] && had_pid=1
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" > /dev/null
    if [ "$had_pid" = 0 ] && [ -f /run/sshd.pid ]; then
        log "stopping the sshd the package started (pid $(cat /run/sshd.pid))"
        kill -TERM "$(cat /run/sshd.pid)" 2>/dev/null || true
    fi
fi

PYTHON="${SAGE_DIST_PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PYTHON" ] || die "no Python at $PYTHON: set SAGE_DIST_PYTHON to the venv's python"
VENV="$("$PYTHON" -c 'import sys; print(sys.prefix)')"
[ -x "$VENV/bin/ray" ] || die "$VENV/bin/ray is missing: install ray[default] in that environment"

WORK="$(mktemp -d /var/tmp/sage-dist-local-cluster.XXXXXX)"
chmod 700 "$WORK"
log "logs in $WORK"

t_start=$(date +%s.%N)
set +e
unshare --pid --mount --net --fork --mount-proc --propagation private \
    bash "$SELF" --inner "$WORK" "$VENV"
rc=$?
set -e
t_end=$(date +%s.%N)
echo "timing: total $(elapsed "$t_start" "$t_end")" | tee -a "$WORK/timings.txt"

if [ "$rc" = 0 ]; then
    log "PASS: ray up, smoke job, ray down, no Ray process left"
    if [ "${KEEP_LOGS:-0}" = 1 ]; then log "logs kept in $WORK"; else rm -rf "$WORK"; fi
else
    log "FAIL (exit $rc); logs kept in $WORK"
fi
exit "$rc"
