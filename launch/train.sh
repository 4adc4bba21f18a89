#!/usr/bin/env bash
# Launch `python -m longnet_dist.train` under torchrun on this node.
#
#   launch/train.sh [launcher flags] [--] [hydra overrides...]
#
# Launcher flags, `--flag VALUE` or `--flag=VALUE` (each also read from the environment variable in brackets):
#   --nproc-per-node N   [NPROC_PER_NODE]  processes on this node; default: the GPUs this node may use
#                        (SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES, nvidia-smi), else 1
#   --nnodes N           [NNODES]          nodes in the job (default 1)
#   --node-rank R        [NODE_RANK]       this node's index, for the static MASTER_ADDR rendezvous
#   --rdzv-endpoint H:P  [RDZV_ENDPOINT]   c10d rendezvous host:port (any node count, elastic)
#   --rdzv-id ID         [RDZV_ID]         rendezvous id shared by the nodes (default: longnet)
#   --master-addr A      [MASTER_ADDR]     static rendezvous on A:MASTER_PORT (default port 29500)
#   --master-port P      [MASTER_PORT]
#   --max-restarts N     [MAX_RESTARTS]    restart the worker group up to N times after a failure
#                                          (default 0); restarted workers resume from the newest
#                                          complete checkpoint when the run uses resume=auto
# Rendezvous: RDZV_ENDPOINT if given, else MASTER_ADDR if given, else torchrun --standalone (one node).
# Everything after the launcher flags reaches the trainer untouched, e.g.
#   launch/train.sh --nproc-per-node 2 model=tiny 'attention.segment_lengths=[64,128]'
# PYTHON selects the interpreter (default python3). SHUTDOWN_TIMEOUT (default 300 s) is how long
# torchrun lets workers checkpoint after SIGTERM before it kills them. On a node without GPUs the
# workers run on tcmalloc when it is installed (launch/cpu_allocator.sh: ~12% faster CPU steps;
# LONGNET_TCMALLOC=0 turns it off, =1 requires it).
#
# Signals: SIGTERM to torchrun is forwarded to the workers, which finish the step, save a checkpoint
# and exit. SIGUSR1 (SLURM's warning signal) is ignored by torchrun itself and handled by the workers
# (they inherit "ignore" until the trainer installs its handler, so an early signal cannot kill them):
# send it to the whole process group, as `scancel --signal=USR1` does, e.g. `kill -USR1 -- -<pgid>`.
set -euo pipefail

die() { echo "launch/train.sh: $*" >&2; exit 2; }

count_gpus() {
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then  # set, even empty: exactly these devices
        [ "$CUDA_VISIBLE_DEVICES" = "NoDevFiles" ] && { echo 0; return; }
        echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c . || true
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

NPROC_PER_NODE="${NPROC_PER_NODE:-}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
RDZV_ENDPOINT="${RDZV_ENDPOINT:-}"
RDZV_ID="${RDZV_ID:-longnet}"
MASTER_ADDR="${MASTER_ADDR:-}"
MASTER_PORT="${MASTER_PORT:-29500}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"

while [ $# -gt 0 ]; do
    [ "$1" = -- ] && { shift; break; }
    flag="${1%%=*}"  # --flag VALUE or --flag=VALUE
    case "$flag" in
        --nproc-per-node|--nproc_per_node) variable=NPROC_PER_NODE ;;
        --nnodes) variable=NNODES ;;
        --node-rank|--node_rank) variable=NODE_RANK ;;
        --rdzv-endpoint|--rdzv_endpoint) variable=RDZV_ENDPOINT ;;
        --rdzv-id|--rdzv_id) variable=RDZV_ID ;;
        --master-addr|--master_addr) variable=MASTER_ADDR ;;
        --master-port|--master_port) variable=MASTER_PORT ;;
        --max-restarts|--max_restarts) variable=MAX_RESTARTS ;;
        *) break ;;  # the first other argument starts the trainer's (Hydra's) arguments
    esac
    if [ "$flag" != "$1" ]; then
        value="${1#*=}"; shift
    else
        value="${2-}"; shift $(( $# > 1 ? 2 : 1 ))
        if [[ "$value" == --* ]]; then value=""; fi  # the next flag, not a value
    fi
    [ -n "$value" ] || die "$flag needs a value: $flag VALUE or $flag=VALUE"
    printf -v "$variable" '%s' "$value"
done

if [ -z "$NPROC_PER_NODE" ]; then
    NPROC_PER_NODE="$(count_gpus)"
    [ "$NPROC_PER_NODE" -gt 0 ] 2>/dev/null || NPROC_PER_NODE=1
fi
for pair in "NPROC_PER_NODE=$NPROC_PER_NODE" "NNODES=$NNODES" "NODE_RANK=$NODE_RANK" "MAX_RESTARTS=$MAX_RESTARTS"; do
    [[ "${pair#*=}" =~ ^[0-9]+$ ]] || die "${pair%%=*} must be a non-negative integer, got '${pair#*=}'"
done
[ "$NPROC_PER_NODE" -ge 1 ] || die "NPROC_PER_NODE must be at least 1"
{ [[ "$MASTER_PORT" =~ ^[0-9]+$ ]] && [ "$MASTER_PORT" -ge 1 ] && [ "$MASTER_PORT" -le 65535 ]; } \
    || die "MASTER_PORT must be a port number in 1..65535, got '$MASTER_PORT'"
endpoint='^([^:]+|\[[0-9A-Fa-f:.]+\]):[0-9]+$'  # host:port, [IPv6]:port
if [ -n "${RDZV_ENDPOINT:-}" ] && ! [[ "$RDZV_ENDPOINT" =~ $endpoint ]]; then
    die "RDZV_ENDPOINT must be host:port (e.g. node001:29500), got '$RDZV_ENDPOINT'"
fi

command=("${PYTHON:-python3}" -m torch.distributed.run
         --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" --max-restarts "$MAX_RESTARTS")
if [ -n "$RDZV_ENDPOINT" ]; then
    command+=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID")
elif [ -n "$MASTER_ADDR" ]; then
    command+=(--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
elif [ "$NNODES" = 1 ]; then
    command+=(--standalone)
else
    die "NNODES=$NNODES needs a rendezvous: set RDZV_ENDPOINT=host:port (or MASTER_ADDR and NODE_RANK)"
fi
command+=(-m longnet_dist.train "$@")

if [ "$(count_gpus)" = 0 ]; then  # CPU workers: tcmalloc keeps freed tensors' memory for reuse
    preload="$("$(dirname "$0")/cpu_allocator.sh")" || die "no CPU allocator (see launch/cpu_allocator.sh)"
    if [ -n "$preload" ] && [ "$preload" != "${LD_PRELOAD:-}" ]; then
        export LD_PRELOAD="$preload"
        echo "+ LD_PRELOAD=$LD_PRELOAD" >&2
    fi
fi
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${SHUTDOWN_TIMEOUT:-300}"
# Restarted workers must not share torchrun's rendezvous store: keys left by the previous attempt's
# process groups make the new groups connect to dead peers (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
echo "+ $(printf '%q ' "${command[@]}")" >&2
trap '' USR1  # ignored by torchrun, inherited as "ignored" by the workers (see the header)
exec "${command[@]}"
