#!/bin/bash
# cvmfsd_cleanup.sh -- GlideinWMS cleanup script: stop the pilot's cvmfsd.
#
# Run at glidein exit (from the cleanup directory, like cvmfs_umount.sh) as
# `cvmfsd_cleanup.sh <glidein_config>`.  SIGTERM to cvmfsd stops the holder,
# ends the namespace (mode 3) or unmounts (modes 1/2); this waits for it and
# reports.  A cvmfsd that is already gone is fine.

glidein_config=$1
me=cvmfsd_cleanup.sh
config_value() {
    tac "$glidein_config" 2>/dev/null | grep -m1 "^$1 " | cut -d' ' -f2-
}
error_gen=$(config_value ERROR_GEN_PATH)
pid=$(config_value CVMFSD_PID)
wait_seconds=${CVMFSD_CLEANUP_WAIT:-60}

case $pid in
    ''|*[!0-9]*)
        echo "$me: no cvmfsd recorded in glidein_config; nothing to stop"
        [ -n "$error_gen" ] && "$error_gen" -ok "$me"
        exit 0
        ;;
esac
# Only ever signal our own cvmfsd: check that the pid still runs it.
if ! tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'cvmfsd'; then
    echo "$me: cvmfsd (pid $pid) has already exited"
    [ -n "$error_gen" ] && "$error_gen" -ok "$me"
    exit 0
fi
kill -TERM "$pid"
for _ in $(seq $((wait_seconds * 5))); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
done
if kill -0 "$pid" 2>/dev/null; then
    echo "$me: cvmfsd (pid $pid) still running after $wait_seconds s" >&2
    [ -n "$error_gen" ] && "$error_gen" -error "$me" WN_Resource \
        "cvmfsd (pid $pid) did not stop within $wait_seconds s"
    exit 1
fi
echo "$me: cvmfsd (pid $pid) stopped"
[ -n "$error_gen" ] && "$error_gen" -ok "$me"
exit 0
