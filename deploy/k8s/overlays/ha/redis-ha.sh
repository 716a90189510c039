#!/bin/sh
# Entry point of the Redis and Sentinel pods of the ha overlay (POSIX sh, as in the
# redis image):
#   sh redis-ha.sh redis [ARG...]     Redis with AOF, master if it is the master
#                                     Sentinel names (else, no sentinel answering:
#                                     the pod that says it is master, else pod 0),
#                                     otherwise a replica of that master
#   sh redis-ha.sh sentinel [ARG...]  a Sentinel watching that master
# ARGs are passed on to redis-server / redis-sentinel.
# Every name and number below has the manifests' value as default; the test suite
# (tests/test_sentinel.py) runs this file against local processes by overriding them.
set -eu

SERVICE=${SERVICE:-ballast}  # the master's name in Sentinel: state.sentinel.service
REDIS_HOSTS=${REDIS_HOSTS:-"ballast-redis-0.ballast-redis:6379 ballast-redis-1.ballast-redis:6379 ballast-redis-2.ballast-redis:6379"}
SENTINEL_HOSTS=${SENTINEL_HOSTS:-"ballast-sentinel-0.ballast-sentinel:26379 ballast-sentinel-1.ballast-sentinel:26379 ballast-sentinel-2.ballast-sentinel:26379"}
QUORUM=${QUORUM:-2}                          # sentinels that must agree the master is down
DOWN_AFTER_MS=${DOWN_AFTER_MS:-5000}         # silence before a sentinel calls it down
FAILOVER_TIMEOUT_MS=${FAILOVER_TIMEOUT_MS:-60000}
DATA_DIR=${DATA_DIR:-/data}                  # Redis: the PersistentVolumeClaim
CONF_DIR=${CONF_DIR:-/sentinel}              # Sentinel: it rewrites its config here
MAXMEMORY=${MAXMEMORY:-256mb}

role=${1:-}
[ $# -gt 0 ] && shift
case $role in
  redis) SELF=${SELF:-$(hostname).ballast-redis:6379} ;;
  sentinel) SELF=${SELF:-$(hostname).ballast-sentinel:26379} ;;
  *) echo "usage: $0 redis|sentinel" >&2; exit 2 ;;
esac

ask() {  # ask HOST:PORT COMMAND...: the answer, empty when nobody answers in 3 s
  hp=$1; shift
  timeout 3 redis-cli -h "${hp%:*}" -p "${hp##*:}" "$@" 2>/dev/null || true
}

master() {  # HOST:PORT of the current master
  for s in $SENTINEL_HOSTS; do
    [ "$s" = "$SELF" ] && continue
    addr=$(ask "$s" SENTINEL get-master-addr-by-name "$SERVICE" | tr '\n' ' ')
    set -- $addr
    if [ $# -eq 2 ]; then echo "$1:$2"; return; fi
  done
  for r in $REDIS_HOSTS; do
    [ "$r" = "$SELF" ] && continue
    if ask "$r" INFO replication | grep -q '^role:master'; then echo "$r"; return; fi
  done
  set -- $REDIS_HOSTS
  echo "$1"
}

m=$(master)
echo "master of $SERVICE: $m (this is $SELF)"
# No password: the pod network reaches Redis and Sentinel only from the pods the
# overlay's NetworkPolicy lets in.
if [ "$role" = redis ]; then
  replicaof=""
  [ "$m" = "$SELF" ] || replicaof="--replicaof ${m%:*} ${m##*:}"
  # shellcheck disable=SC2086  # $replicaof: none or three words
  exec redis-server --port "${SELF##*:}" --protected-mode no --dir "$DATA_DIR" \
    --appendonly yes --appendfsync everysec --save "" \
    --maxmemory "$MAXMEMORY" --maxmemory-policy noeviction \
    --replica-announce-ip "${SELF%:*}" $replicaof "$@"
fi

until getent hosts "${m%:*}" >/dev/null; do  # Sentinel refuses a name it cannot resolve
  echo "waiting for $m to resolve"
  sleep 2
done
cat > "$CONF_DIR/sentinel.conf" <<CONF
port ${SELF##*:}
protected-mode no
dir $CONF_DIR
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel announce-ip ${SELF%:*}
sentinel announce-port ${SELF##*:}
sentinel monitor $SERVICE ${m%:*} ${m##*:} $QUORUM
sentinel down-after-milliseconds $SERVICE $DOWN_AFTER_MS
sentinel failover-timeout $SERVICE $FAILOVER_TIMEOUT_MS
sentinel parallel-syncs $SERVICE 1
CONF
exec redis-sentinel "$CONF_DIR/sentinel.conf" "$@"
