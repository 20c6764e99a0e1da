#!/usr/bin/env bash
# launch/tpu_vm.sh [OPTIONS] -- CMD... : run a jaxembed command on every worker of a Cloud TPU VM.
#
# Needs: the Google Cloud CLI (gcloud), logged in, with a project, the TPU API enabled and
# quota for the accelerator type. A slice with several workers (v4-16, v5litepod-16 and up)
# needs the workdir on storage every worker shares: --workdir gs://BUCKET/PATH (read and
# written directly: checkpoints by Orbax, the rest through gcsfs), or --mount BUCKET, which
# mounts gs://BUCKET at ~/bucket on each worker (gcsfuse; checkpoints committed in place by a
# marker file), with --workdir under it.
#
# Example (a v4-32 slice: 4 workers x 4 chips):
#   launch/tpu_vm.sh --name embed --zone us-central2-b --type v4-32 -- \
#       python -m jaxembed.train --config configs/retrofit_xlmr_base.py \
#       --workdir gs://my-bucket/runs/xlmr
#
# Steps: (1) create the TPU VM unless one of that name exists (--spot: preemptible capacity),
# with the runtime image of its generation; (2) copy this checkout (tracked files) to
# ~/jaxembed on every worker and install it with jax[tpu] into ~/jaxembed/.venv, a Python
# 3.11 made by uv (the images ship 3.10; jax, flax, orbax and grain need >= 3.11; uv is
# installed in ~/.local/bin if missing; --no-install skips this); (3) start CMD on --worker=all,
# detached (it survives a dropped connection), in that venv; (4) stream every worker's log
# (also appended to logs/tpu_vm-NAME.log here; JAXEMBED_LOG_DIR moves it) until CMD ends
# on all workers, and exit with the largest exit status. JAX finds the other workers itself (jaxembed.distributed
# detects Cloud TPU slices). Ctrl-C sends SIGTERM to CMD on every worker: training saves a
# checkpoint and exits; the same command resumes it. A second Ctrl-C leaves CMD running
# (--attach follows it again). --delete deletes the VM when CMD has ended.
#
# Options: --name NAME and --zone ZONE (required); --type (default v4-8); --version (default:
# the image of the type's generation: tpu-ubuntu2204-base for v4, v2-alpha-tpuv5-lite for
# v5litepod, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e); --project; --spot; --mount
# BUCKET; --no-install; --attach (only stream the running command's logs); --delete.
set -euo pipefail

usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; }
name="" zone="" type="v4-8" version="" project="" spot="" mount=""
install=1 attach="" delete=""
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --type) type=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --spot) spot=1; shift ;;
    --mount) mount=$2; shift 2 ;;
    --no-install) install=""; shift ;;
    --attach) attach=1; install=""; shift ;;
    --delete) delete=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "tpu_vm.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$name" ] || [ -z "$zone" ] || { [ $# -eq 0 ] && [ -z "$attach" ]; }; then
  usage >&2
  exit 2
fi
if [ -z "$version" ]; then
  # The runtime image per generation (cloud.google.com/tpu/docs/runtimes): v4's image is
  # for v4 and older; v5e, v5p and v6e have their own.
  case "$type" in
    v2-* | v3-* | v4-*) version=tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) version=v2-alpha-tpuv5-lite ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
    *) echo "tpu_vm.sh: no default runtime image for --type $type; pass --version" >&2; exit 2 ;;
  esac
fi
command -v gcloud >/dev/null || {
  echo "tpu_vm.sh: gcloud not found; install the Google Cloud CLI" >&2
  exit 2
}
cd "$(dirname "$0")/.."

tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
[ -n "$project" ] && where+=(--project "$project")
on_all() { "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$1"; }
logs=${JAXEMBED_LOG_DIR:-logs}
mkdir -p "$logs"
log="$logs/tpu_vm-$name.log"
remote="~/jaxembed"

if "${tpu[@]}" describe "$name" "${where[@]}" >/dev/null 2>&1; then
  echo "tpu_vm.sh: reusing TPU VM $name"
elif [ -n "$attach" ]; then
  echo "tpu_vm.sh: no TPU VM $name in $zone to attach to" >&2
  exit 2
else
  echo "tpu_vm.sh: creating TPU VM $name ($type, $version) in $zone"
  "${tpu[@]}" create "$name" "${where[@]}" --accelerator-type "$type" --version "$version" \
    ${spot:+--spot}
fi

if [ -n "$install" ]; then
  tarball=$(mktemp --suffix .tar.gz)
  trap 'rm -f "$tarball"' EXIT
  git ls-files -z | tar --null -czf "$tarball" -T -
  "${tpu[@]}" scp "$tarball" "$name:jaxembed.tar.gz" "${where[@]}" --worker=all
  # Python 3.11 from uv (the images' own is 3.10): a venv of an older Python is replaced.
  uv="~/.local/bin/uv"
  on_all "mkdir -p $remote && tar -xzf ~/jaxembed.tar.gz -C $remote && cd $remote && \
    { test -x $uv || curl -LsSf https://astral.sh/uv/install.sh | sh; } && \
    { .venv/bin/python -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null || \
      { rm -rf .venv && $uv venv -q --seed --python 3.11 .venv; }; } && \
    $uv pip install -q --python .venv/bin/python -e '.[gcs]' 'jax[tpu]'"
fi

if [ -n "$mount" ]; then
  on_all "mkdir -p ~/bucket && { mountpoint -q ~/bucket || { \
    command -v gcsfuse >/dev/null || { \
      curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | \
        sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && \
      echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | \
        sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && \
      sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; } && \
    gcsfuse --implicit-dirs --rename-dir-limit=1000 $mount ~/bucket; }; }"
fi

if [ -z "$attach" ]; then
  cmd=$(printf '%q ' "$@")
  # The command travels base64-encoded (any quoting survives), runs detached in its own
  # session (setsid: its process group id is the wrapper's pid, so a stop signal reaches
  # CMD and its children) and the wrapper, which outlives the signal, writes its exit
  # status to run.rc.
  encoded=$(printf '%s\n' "$cmd" | base64 | tr -d '\n')
  on_all "cd $remote && rm -f run.rc && echo $encoded | base64 -d > run.cmd && \
    source .venv/bin/activate && { \
    setsid nohup bash -c 'trap : TERM INT; source run.cmd; echo \$? > run.rc' \
      > run.log 2>&1 < /dev/null & \
    echo \$! > run.pid; }"
  echo "tpu_vm.sh: started on every worker: $cmd"
fi

stop_requested=""
on_interrupt() {
  if [ -n "$stop_requested" ]; then
    echo "tpu_vm.sh: leaving the command running (reattach with --attach)" >&2
    exit 130
  fi
  stop_requested=1
  echo "tpu_vm.sh: sending SIGTERM to the command on every worker (again: detach)" >&2
  on_all "kill -TERM -- -\$(cat $remote/run.pid) 2>/dev/null || true" || true
}
trap on_interrupt INT TERM

# Follow every worker's log until its command has ended (reconnecting if ssh drops; the
# log is then shown again from its start).
until on_all "cd $remote && tail -n +1 --pid=\$(cat run.pid) -f run.log | \
    sed -u \"s/^/[\$(hostname)] /\"; test -f run.rc || ! kill -0 \$(cat run.pid) 2>/dev/null" \
    2>&1 | tee -a "$log"; do
  sleep 2
  echo "tpu_vm.sh: reconnecting to follow the logs" >&2
done

codes=$(on_all "cat $remote/run.rc 2>/dev/null || echo 255")
status=0
for c in $codes; do
  [[ $c =~ ^[0-9]+$ ]] && [ "$c" -gt "$status" ] && status=$c
done
echo "tpu_vm.sh: the command ended with status $status (largest over workers); log: $log"
if [ -n "$delete" ]; then
  "${tpu[@]}" delete "$name" "${where[@]}" --quiet
fi
exit "$status"
