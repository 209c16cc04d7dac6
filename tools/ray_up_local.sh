#!/usr/bin/env bash
# `ray up` for real, on one machine: cluster/local.yaml (Ray's local provider over ssh) brought up on two
# "hosts", 127.0.0.1 (head) and 127.0.0.2 (worker), a short `distlm submit --wait train` run on it, a check that
# both nodes ran training workers, then `ray down`. What it printed: docs/cluster.md ("`ray up` on this machine").
#
#   sudo tools/ray_up_local.sh            # needs root: it installs openssh-server and rsync with apt-get if
#                                         # missing, adds a throw-away user and runs an sshd of its own
#
# Isolation (other Ray clusters may run on the machine): the cluster runs as a throw-away user whose home is a
# temporary directory, so Ray's own `ray stop` (which `ray down` runs, and which ends every Ray process its user
# may signal) reaches only this cluster; sshd, Ray's GCS and dashboard get free ports of their own; everything is
# removed at exit. Environment: DISTLM_VENV (default: the repository's .venv, as `make` installs it).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${DISTLM_VENV:-$REPO/.venv}
[ "$(id -u)" = 0 ] || { echo "run as root (sudo): it adds a user and starts sshd" >&2; exit 2; }
[ -x "$VENV/bin/ray" ] || { echo "no Ray in $VENV: run \`make install\` or set DISTLM_VENV" >&2; exit 2; }
SECONDS=0
step() { printf '\n==== [%3ds] %s\n' "$SECONDS" "$*"; }

WORK=$(mktemp -d /tmp/rayup.XXXXXX)   # short: Ray's socket paths have a length limit
chmod 755 "$WORK"
USER_NAME=rayup$(basename "$WORK" | cut -d. -f2 | tr 'A-Z' 'a-z')
HOME_DIR=$WORK/home
AS_USER=(runuser -l "$USER_NAME" -c)
RESTORE_MODES=()

cleanup() {
    status=$?
    set +e
    step "clean-up"
    # Whatever `ray down` left of this user's processes, by pid (never `ray stop` as root, never by name).
    leftover=$(pgrep -u "$USER_NAME" 2>/dev/null | tr '\n' ' ')
    [ -n "$leftover" ] && echo "ending processes the cluster left: $leftover" && kill $leftover 2>/dev/null
    for _ in 1 2 3 4 5; do
        sleep 1; leftover=$(pgrep -u "$USER_NAME" 2>/dev/null | tr '\n' ' ')
        [ -n "$leftover" ] && kill -9 $leftover 2>/dev/null
    done
    [ -f "$WORK/sshd/sshd.pid" ] && kill "$(cat "$WORK/sshd/sshd.pid")" 2>/dev/null && echo "sshd stopped"
    for entry in "${RESTORE_MODES[@]}"; do chmod "${entry%% *}" "${entry#* }" && echo "mode of ${entry#* } restored"; done
    id "$USER_NAME" >/dev/null 2>&1 && userdel "$USER_NAME" && echo "user $USER_NAME removed"
    rm -rf "$WORK"
    echo "exit $status after ${SECONDS}s"
}
trap cleanup EXIT
trap 'exit 143' TERM INT   # so that a stopped run cleans up too

step "openssh-server and rsync (Ray's local provider runs ssh and rsync)"
if ! [ -x /usr/sbin/sshd ] || ! command -v rsync >/dev/null; then
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssh-server rsync >/dev/null
fi
/usr/sbin/sshd -V 2>&1 | head -1 || true

read -r SSH_PORT GCS_PORT DASHBOARD_PORT CLIENT_PORT WORKER_PORTS < <("$VENV/bin/python" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks], 40000 + (socks[0].getsockname()[1] % 200) * 100)
EOF
)
echo "ports: sshd $SSH_PORT, GCS $GCS_PORT, dashboard/job server $DASHBOARD_PORT, Ray workers from $WORKER_PORTS"

step "user $USER_NAME (home $HOME_DIR) with a new ssh key; sshd on 127.0.0.1 and 127.0.0.2 port $SSH_PORT"
# Password "*": no password login, yet not a locked account (sshd without PAM refuses locked ones).
useradd --home-dir "$HOME_DIR" --create-home --shell /bin/bash --password "*" "$USER_NAME"
mkdir -p "$HOME_DIR/.ssh" "$HOME_DIR/tmp" "$WORK/shared" "$WORK/sshd" /run/sshd
ssh-keygen -q -t ed25519 -N '' -C "$USER_NAME@distlm-ray-up" -f "$HOME_DIR/.ssh/id_ed25519"
cp "$HOME_DIR/.ssh/id_ed25519.pub" "$WORK/sshd/authorized_keys"
cat > "$HOME_DIR/.ssh/config" <<EOF
Host 127.0.0.1 127.0.0.2
    Port $SSH_PORT
    StrictHostKeyChecking accept-new
EOF
# Ray's ssh runs `bash --login -c -i 'source ~/.bashrc; ...'`: this is the nodes' environment (the installed venv).
cat > "$HOME_DIR/.bashrc" <<EOF
export PATH=$VENV/bin:/usr/local/bin:/usr/bin:/bin RAY_TMPDIR=$HOME_DIR/tmp RAY_USAGE_STATS_ENABLED=0
export RAY_UP_enable_autoscaler_v2=0 HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=$HOME_DIR/torch_extensions
EOF
# DeepSpeed's compiled CPU ops, if this machine built them already (else the first job compiles them, ≈1 min).
[ -d "${TORCH_EXTENSIONS_DIR:-$REPO/build/torch_extensions}" ] && \
    cp -a "${TORCH_EXTENSIONS_DIR:-$REPO/build/torch_extensions}" "$HOME_DIR/torch_extensions"
chown -R "$USER_NAME:" "$HOME_DIR" "$WORK/shared"
# The user must be able to run the venv's interpreter; a venv made by root may point into /root (pyenv):
# directories on that path get search permission (o+x, not listing) until the script ends.
dir=
for part in $(dirname "$(readlink -f "$VENV/bin/python")" | tr / ' '); do
    dir=$dir/$part
    if ! runuser -u "$USER_NAME" -- test -x "$dir"; then
        mode=$(stat -c %a "$dir")
        RESTORE_MODES+=("$mode $dir"); chmod o+x "$dir"; echo "search permission on $dir until the end (was $mode)"
    fi
done
chmod 700 "$HOME_DIR/.ssh"
ssh-keygen -q -t ed25519 -N '' -f "$WORK/sshd/host_key"
cat > "$WORK/sshd/sshd_config" <<EOF
Port $SSH_PORT
ListenAddress 127.0.0.1
ListenAddress 127.0.0.2
HostKey $WORK/sshd/host_key
PidFile $WORK/sshd/sshd.pid
AuthorizedKeysFile $WORK/sshd/authorized_keys
AllowUsers $USER_NAME
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
EOF
/usr/sbin/sshd -f "$WORK/sshd/sshd_config" -E "$WORK/sshd/sshd.log"
"${AS_USER[@]}" "ssh 127.0.0.2 'echo ssh to 127.0.0.2 as \$(whoami): ok'"

step "the cluster yaml: a copy of cluster/local.yaml for two hosts on this machine"
CLUSTER_YAML=$HOME_DIR/local.yaml
"$VENV/bin/python" - "$REPO/cluster/local.yaml" "$CLUSTER_YAML" <<EOF
import sys, yaml
config = yaml.safe_load(open(sys.argv[1]))
config["cluster_name"] = "$USER_NAME"
config["provider"].update(head_ip="127.0.0.1", worker_ips=["127.0.0.2"])
config["auth"] = {"ssh_user": "$USER_NAME", "ssh_private_key": "~/.ssh/id_ed25519"}
# Code and environment are installed already (a submitted job uploads its own working directory); storage is
# shared because both hosts are one machine.
config["file_mounts"] = {}
config["setup_commands"] = ["python -c 'import distlm, ray, deepspeed, torch; print(\"environment ok:\", ray.__version__)'"]
# Two raylets on one host need ports of their own; each node gets 1 CPU so that the 2 training workers land on
# both (the original's head has --num-cpus=0: on real hosts the head runs no training). No \`ray stop\` first:
# both nodes are this one user on one machine, so a worker's \`ray stop\` would end the head it joins.
common = ("--num-cpus=1 --object-store-memory=200000000 --dashboard-agent-listen-port=0 --metrics-export-port=0 "
          "--temp-dir=$HOME_DIR/tmp/ray --disable-usage-stats")
config["head_start_ray_commands"] = [
    "ray start --head --node-ip-address=127.0.0.1 --port=$GCS_PORT --dashboard-host=127.0.0.1 "
    "--dashboard-port=$DASHBOARD_PORT --ray-client-server-port=$CLIENT_PORT --min-worker-port=$WORKER_PORTS "
    "--max-worker-port=$((WORKER_PORTS + 49)) --autoscaling-config=~/ray_bootstrap_config.yaml " + common]
config["worker_start_ray_commands"] = [
    "ray start --address=\$RAY_HEAD_IP:$GCS_PORT --node-ip-address=127.0.0.2 --min-worker-port=$((WORKER_PORTS + 50)) "
    "--max-worker-port=$((WORKER_PORTS + 99)) " + common]
yaml.safe_dump(config, open(sys.argv[2], "w"), sort_keys=False)
EOF
chown "$USER_NAME:" "$CLUSTER_YAML"
cat "$CLUSTER_YAML"

step "ray up (autoscaler v1: RAY_UP_enable_autoscaler_v2=0)"
"${AS_USER[@]}" "source ~/.bashrc && ray up -y --no-config-cache ~/local.yaml" 2>&1 | tail -25
# The head's autoscaler (v1) now starts the worker host over ssh; wait until Ray sees both nodes.
"${AS_USER[@]}" "source ~/.bashrc && python - <<'EOF'
import time, ray
ray.init(address='127.0.0.1:$GCS_PORT', logging_level='ERROR')
start = time.monotonic()
while sum(n['Alive'] for n in ray.nodes()) < 2:
    if time.monotonic() - start > 300:
        raise SystemExit('the worker node did not join within 300 s: see ~/tmp/ray/session_latest/logs/monitor.out')
    time.sleep(2)
print(f'2 nodes alive, {time.monotonic() - start:.0f} s after ray up returned')
EOF"
"${AS_USER[@]}" "source ~/.bashrc && ray status --address=127.0.0.1:$GCS_PORT" | sed -n '1,20p'

export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
DATA=$WORK/shared/data RUN=$WORK/shared/runs/rayup
step "distlm submit --wait preprocess: 120 chapters of the King James Bible -> shards in $DATA"
"$VENV/bin/python" "$REPO/tools/make_demo_corpus.py" "$WORK/kjv.jsonl" >/dev/null
head -n 120 "$WORK/kjv.jsonl" > "$WORK/shared/kjv120.jsonl" && chown "$USER_NAME:" "$WORK/shared/kjv120.jsonl"
cd "$REPO"
DATA_KEYS=(data.seq_len=64 data.tokenizer.vocab_size=512 "data.dir=$DATA")
"$VENV/bin/python" -m distlm.cli submit --wait --job-id "$USER_NAME-preprocess" preprocess \
    "data.inputs=[$WORK/shared/kjv120.jsonl]" data.samples_per_shard=256 data.tokenize_task_mb=0.02 "${DATA_KEYS[@]}" \
    2>&1 | tail -8

step "distlm submit --wait train: model=test, 2 workers (1 per node), 6 steps"
"$VENV/bin/python" -m distlm.cli submit --wait --job-id "$USER_NAME-train" train model=test "${DATA_KEYS[@]}" \
    "run_dir=$RUN" cluster.num_workers=2 cluster.workers_per_node=1 trainer.max_steps=6 trainer.micro_batch_size=4 \
    trainer.eval_every=3 trainer.eval_batches=1 trainer.checkpoint_every=3 optimizer.warmup_steps=1 \
    logger.mode=offline logger.samples=0 2>&1 | tee "$WORK/train.log" | grep -E "node .*node rank|step +[0-9]+|val_loss|job .* (SUCCEEDED|FAILED|STOPPED)|Error" | tail -20 || true

step "checks: the job succeeded, both nodes ran a training worker, every step was logged"
grep -q "SUCCEEDED" "$WORK/train.log" || { echo "FAILED: the train job did not succeed"; tail -40 "$WORK/train.log"; exit 1; }
"$VENV/bin/python" - "$RUN" <<EOF
import json, subprocess, sys
actors = json.loads(subprocess.run(["$VENV/bin/ray", "list", "actors", "--address", "$RAY_ADDRESS", "--filter",
                                    "class_name=RayTrainWorker", "--format", "json", "--limit", "100"],
                                   check=True, capture_output=True, text=True).stdout)
nodes = {n["node_id"]: n["node_ip"] for n in json.loads(subprocess.run(
    ["$VENV/bin/ray", "list", "nodes", "--address", "$RAY_ADDRESS", "--format", "json"],
    check=True, capture_output=True, text=True).stdout)}
print("nodes:", sorted(nodes.values()))
print("training workers ran on:", sorted(f"node {a['node_id'][:8]} ({nodes[a['node_id']]})" for a in actors))
steps = sorted({r["step"] for r in map(json.loads, open(sys.argv[1] + "/metrics.jsonl")) if "loss" in r})
print("steps logged:", steps)
assert len(nodes) == 2 and {a["node_id"] for a in actors} == set(nodes), "a training worker on each node"
assert steps == [1, 2, 3, 4, 5, 6], steps
print("ok: both nodes ran a training worker; 6 steps logged")
EOF

step "ray down"
"${AS_USER[@]}" "source ~/.bashrc && ray down -y ~/local.yaml" > "$WORK/down.log" 2>&1
grep -v "Could not terminate" "$WORK/down.log" | tail -6
echo "Ray processes of other users that ray down's \`ray stop\` was not allowed to end: $(grep -c "Could not terminate" "$WORK/down.log")"
sleep 3
echo "processes of the cluster left after ray down (its ssh sessions aside):"
pgrep -u "$USER_NAME" -a | grep -v "sshd: $USER_NAME" || echo "  none"
