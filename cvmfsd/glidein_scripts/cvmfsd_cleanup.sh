#!/bin/bash
# cvmfsd_cleanup.sh -- GlideinWMS cleanup script: stop the glidein's cvmfsd at exit.
#
# GlideinWMS runs every `exec` file of its file lists at start-up, except two
# names that it keeps for the end: cvmfs_umount.sh (its own) and the file
# named by the attribute GLIDEIN_CLEANUP_SCRIPT (glidein_startup.sh:1216-1220).
# Such a file is copied to exec/cleanup/ when it is fetched, and glidein_exit
# runs everything there as `<script> <glidein_config>` (glidein_startup.sh:384,
# glidein_paths.source gwms_process_scripts), on a normal end and on a failure
# alike.  What the Factory/Frontend must configure:
#
#   - this file in a file list, executable="True", BEFORE cvmfsd_setup.sh (a
#     set-up failure then still stops what was started), and
#   - GLIDEIN_CLEANUP_SCRIPT=cvmfsd_cleanup.sh (the file's name in the list) as
#     a PARAMETER: glidein_startup.sh reads it once from glidein_config before
#     it fetches any file list (:2022), where only parameters already are.
#     Factory: publish="True" parameter="True" const="False"; Frontend:
#     parameter="True".  There is one such slot per glidein.
#
# It sends SIGTERM to cvmfsd (CVMFSD_PID, checked to be that cvmfsd), which
# stops its holder, ends the namespace (mode 3) or unmounts (modes 1/2), and
# waits for it (CVMFSD_CLEANUP_WAIT seconds, default CVMFSD_GRACE + 30).
# It reports to error_gen: -ok when cvmfsd was never started or stopped in
# order; -error when cvmfsd ended before the glidein did (killed or crashed:
# its janitor marks glidein_config CVMFSD_STATUS failed and says why in
# CVMFSD_ERROR), or does not stop.

glidein_config=$1
me=cvmfsd_cleanup.sh
config_value() {
    { tac "$glidein_config" | grep -m1 "^$1 " | cut -d' ' -f2-; } 2>/dev/null
}
error_gen=$(config_value ERROR_GEN_PATH)
report_ok() {
    echo "$me: $1"
    [ -z "$error_gen" ] || "$error_gen" -ok "$me" msg "$1"
    exit 0
}
report_error() {
    echo "$me: $1" >&2
    [ -z "$error_gen" ] || "$error_gen" -error "$me" WN_Resource "$1" cvmfsd_pid "$pid"
    exit 1
}
is_our_cvmfsd() {  # whether PID still runs `cvmfsd run` for this glidein_config
    local cmdline
    cmdline=$({ tr '\0' '\n' <"/proc/$1/cmdline"; } 2>/dev/null) || return 1
    grep -q cvmfsd <<<"$cmdline" && grep -qxF -- "$glidein_config" <<<"$cmdline"
}

if [ ! -f "$glidein_config" ] || [ ! -r "$glidein_config" ]; then
    # Without it there is no telling whether a cvmfsd runs: not "nothing to stop".
    report_error "${glidein_config:-(no argument)} is not a readable glidein_config; expected the file glidein_exit passes as the first argument"
fi
pid=$(config_value CVMFSD_PID)
status=$(config_value CVMFSD_STATUS)
log=$(config_value CVMFSD_LOG)
case $pid in
    ''|*[!0-9]*) report_ok "no cvmfsd was started in this glidein; nothing to stop" ;;
esac
# cvmfsd_setup.sh gave cvmfsd the real path (readlink -f) of the same file.
glidein_config=$(readlink -f -- "$glidein_config" 2>/dev/null || echo "$glidein_config")

if ! is_our_cvmfsd "$pid"; then
    # It should have lived until now: whatever ended it took CVMFS from the jobs.
    error=$(config_value CVMFSD_ERROR)
    case $status in
        failed) report_error "cvmfsd (pid $pid) failed during the glidein: ${error:-no reason recorded}${log:+ (log: $log)}" ;;
        stopped) report_error "cvmfsd (pid $pid) stopped before the glidein ended${log:+ (log: $log)}" ;;
        *) report_error "cvmfsd (pid $pid) is gone but left CVMFSD_STATUS '${status:-unset}': it was killed together with its janitor${log:+ (log: $log)}" ;;
    esac
fi

grace=$(config_value CVMFSD_GRACE)
grace=${grace%%.*}
wait_seconds=$(config_value CVMFSD_CLEANUP_WAIT)
wait_seconds=${wait_seconds:-$((${grace:-30} + 30))}
kill -TERM "$pid" 2>/dev/null
for _ in $(seq $((wait_seconds * 5))); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
done
if kill -0 "$pid" 2>/dev/null; then
    report_error "cvmfsd (pid $pid) still running $wait_seconds s after SIGTERM${log:+ (log: $log)}"
fi
status=$(config_value CVMFSD_STATUS)
if [ "$status" = failed ]; then
    report_error "cvmfsd (pid $pid) failed while stopping: $(config_value CVMFSD_ERROR)${log:+ (log: $log)}"
fi
report_ok "cvmfsd (pid $pid) stopped (status ${status:-unknown})"
