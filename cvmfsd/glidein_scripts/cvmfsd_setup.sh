#!/bin/bash
# cvmfsd_setup.sh -- GlideinWMS custom script: start cvmfsd for the rest of the pilot.
#
# Called by glidein_startup.sh as `cvmfsd_setup.sh <glidein_config> <entry_id>`.
# Starts `cvmfsd run` in the background, waits until it has provided CVMFS (or
# decided, by the GLIDEIN_CVMFS policy, to go on without), and reports the
# result the way glidein scripts do: error_gen -ok / -error with the failure
# category WN_Resource, and the exit status.
#
# glidein_config attributes read:
#   CVMFSEXEC_DIR        the cvmfsexec distribution (required)
#   GLIDEIN_CVMFS_REPOS  repositories, colon-separated
#   CVMFSD_BIN           the cvmfsd command (default: cvmfsd on PATH)
#   CVMFSD_SETUP_TIMEOUT seconds to wait for cvmfsd (default 600)
#   GLIDEIN_WORK_DIR     where cvmfsd.log goes (default: beside glidein_config)
# cvmfsd writes back GWMS_IS_CVMFS, GWMS_CVMFSEXEC_MODE, CVMFS_MOUNT_DIR,
# HAS_UNPRIVILEGED_USER_NAMESPACES, CVMFSD_PID and CVMFSD_STATUS.

glidein_config=$1
me=cvmfsd_setup.sh

# The last occurrence of KEY wins; the value is the rest of the line.
config_value() {
    tac "$glidein_config" 2>/dev/null | grep -m1 "^$1 " | cut -d' ' -f2-
}

error_gen=$(config_value ERROR_GEN_PATH)
report_error() {  # DETAIL [ATTRIBUTE VALUE]...
    echo "$me: $1" >&2
    if [ -n "$error_gen" ]; then
        "$error_gen" -error "$me" WN_Resource "$@"
    fi
    exit 1
}

[ -r "$glidein_config" ] || report_error "cannot read glidein_config '$glidein_config'"

cvmfsd=$(config_value CVMFSD_BIN)
cvmfsd=${cvmfsd:-$(command -v cvmfsd)}
[ -x "$cvmfsd" ] || report_error "cvmfsd not found (set CVMFSD_BIN or put it on PATH)"
dist=$(config_value CVMFSEXEC_DIR)
[ -n "$dist" ] || report_error "CVMFSEXEC_DIR is not set in glidein_config" attribute CVMFSEXEC_DIR
repos=$(config_value GLIDEIN_CVMFS_REPOS)
timeout=$(config_value CVMFSD_SETUP_TIMEOUT)
timeout=${timeout:-600}
work_dir=$(config_value GLIDEIN_WORK_DIR)
work_dir=${work_dir:-$(dirname "$glidein_config")}
log=$work_dir/cvmfsd.log

# The payload only holds the mounts until cvmfsd_cleanup.sh stops cvmfsd; later
# stages reach /cvmfs through CVMFS_MOUNT_DIR (modes 1/2) or the namespace.
hold='trap "exit 0" TERM; while :; do sleep 3600 & wait $!; done'
nohup "$cvmfsd" run --glidein-config "$glidein_config" --dist "$dist" --repos "$repos" \
    --log-format json -- /bin/sh -c "$hold" </dev/null >>"$log" 2>&1 &
pid=$!

deadline=$((SECONDS + timeout))
status=
while [ "$SECONDS" -lt "$deadline" ]; do
    if [ "$(config_value CVMFSD_PID)" = "$pid" ]; then
        status=$(config_value CVMFSD_STATUS)
        case $status in ready|without-cvmfs|failed) break ;; esac
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
done

mode=$(config_value GWMS_CVMFSEXEC_MODE)
case $status in
    ready)
        echo "$me: CVMFS ready (cvmfsexec mode ${mode:-0}), cvmfsd pid $pid"
        [ -n "$error_gen" ] && "$error_gen" -ok "$me" cvmfsd_pid "$pid" mode "${mode:-0}"
        exit 0
        ;;
    without-cvmfs)
        echo "$me: continuing without CVMFS, as the GLIDEIN_CVMFS policy allows (see $log)"
        [ -n "$error_gen" ] && "$error_gen" -ok "$me" cvmfsd_pid "$pid" mode none
        exit 0
        ;;
esac
if [ -z "$status" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    report_error "cvmfsd did not get ready within $timeout s (see $log)"
fi
wait "$pid"
code=$?
detail=$(grep -h '"level": "error"' "$log" 2>/dev/null | tail -n 1)
report_error "cvmfsd could not provide CVMFS (exit $code): ${detail:-see $log}" \
    attribute GLIDEIN_CVMFS
