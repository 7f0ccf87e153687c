
# ---- cvmfsd_job_wrapper.sh: a GlideinWMS job-wrapper fragment (WRAPPER_LIST) ----
#
# condor_startup.sh builds condor_job_wrapper.sh (#!/bin/sh) from a fixed
# header, then every file of WRAPPER_LIST in order, then `exec` of the job
# (glideinWMS creation/web_base/condor_startup.sh:151-169 and :464-470 at
# efdc530).  This fragment is one of those files; put it FIRST in the list, so
# that the fragments after it (the Singularity wrapper) and the job run where
# /cvmfs is:
#
#   mode 3 (GWMS_CVMFSEXEC_MODE 3): /cvmfs exists only in cvmfsd's namespace.
#     The fragment re-executes the whole composed wrapper there, once, with
#     `cvmfsctl enter` (setns: the job stays in the starter's process tree and
#     cgroup); the guard variable CVMFSD_JOB_ENTERED makes the second pass
#     go straight on to the next fragment.
#   modes 1/2: exports CVMFS_MOUNT_DIR (GlideinWMS's Singularity wrapper binds
#     it at /cvmfs).
#   the host's own /cvmfs, or no CVMFS: does nothing.
#
# It finds cvmfsd as GlideinWMS's own fragments find the glidein: the
# glidein_config beside the composed wrapper (frontend/default_singularity_
# wrapper.sh:109-110), or $CVMFSD_SOCKET / $CVMFSCTL in the job's environment.
# If cvmfsd is gone or not ready, it says so on stderr; then, under the
# `required` policy, the job fails (with HTCondor's wrapper error file, so the
# job goes back to the queue instead of failing for good); otherwise it runs.
#
# POSIX sh (dash, bash, busybox ash).  It shares the wrapper's shell, so its
# names start with cvmfsd_ and are unset before the next fragment; it never
# `exit`s: it leaves by `exec` or by falling through to the next fragment.

cvmfsd_w_config=$(dirname "$0")/glidein_config
cvmfsd_w_get() {  # KEY: the last value of KEY in glidein_config (GlideinWMS's rule)
    [ -r "$cvmfsd_w_config" ] || return 0
    grep "^$1 " "$cvmfsd_w_config" | tail -n 1 | cut -d' ' -f2-
}
cvmfsd_w_say() {
    echo "cvmfsd_job_wrapper: $*" >&2
}
cvmfsd_w_fail() {  # MESSAGE: the slot cannot give this job CVMFS
    cvmfsd_w_say "$1"
    if [ -n "$_CONDOR_WRAPPER_ERROR_FILE" ]; then
        echo "cvmfsd_job_wrapper: $1" >>"$_CONDOR_WRAPPER_ERROR_FILE"
    fi
    exec /bin/sh -c 'exit 1'
}

if [ -z "$CVMFSD_JOB_ENTERED" ]; then
    cvmfsd_w_mode=$(cvmfsd_w_get GWMS_CVMFSEXEC_MODE)
    cvmfsd_w_status=$(cvmfsd_w_get CVMFSD_STATUS)
    cvmfsd_w_policy=$(cvmfsd_w_get CVMFSD_POLICY)
    [ -n "$CVMFSD_SOCKET" ] || CVMFSD_SOCKET=$(cvmfsd_w_get CVMFSD_SOCKET)
    [ -n "$CVMFSCTL" ] || CVMFSCTL=$(cvmfsd_w_get CVMFSCTL)
    [ -n "$CVMFSCTL" ] || CVMFSCTL=$(command -v cvmfsctl 2>/dev/null)
    case $cvmfsd_w_mode in
        3)
            if [ "$cvmfsd_w_status" = ready ] && [ -n "$CVMFSCTL" ] &&
                    "$CVMFSCTL" --socket "$CVMFSD_SOCKET" ping >/dev/null 2>&1; then
                CVMFSD_JOB_ENTERED=1
                export CVMFSD_JOB_ENTERED CVMFSD_SOCKET CVMFSCTL
                exec "$CVMFSCTL" --socket "$CVMFSD_SOCKET" enter -- /bin/sh "$0" "$@"
            fi
            cvmfsd_w_why="cvmfsd does not answer on '$CVMFSD_SOCKET' (status '${cvmfsd_w_status:-unknown}', cvmfsctl '${CVMFSCTL:-not found}')"
            if [ "$cvmfsd_w_policy" = required ]; then
                cvmfsd_w_fail "no /cvmfs for this job: $cvmfsd_w_why; GLIDEIN_CVMFS is required"
            fi
            cvmfsd_w_say "running without /cvmfs: $cvmfsd_w_why"
            ;;
        1|2)
            cvmfsd_w_dir=$(cvmfsd_w_get CVMFS_MOUNT_DIR)
            if [ "$cvmfsd_w_status" = ready ] && [ -n "$cvmfsd_w_dir" ] && [ -d "$cvmfsd_w_dir" ]; then
                CVMFS_MOUNT_DIR=$cvmfsd_w_dir
                export CVMFS_MOUNT_DIR
            elif [ "$cvmfsd_w_policy" = required ]; then
                cvmfsd_w_fail "no CVMFS for this job: cvmfsd status '${cvmfsd_w_status:-unknown}'; GLIDEIN_CVMFS is required"
            else
                cvmfsd_w_say "running without CVMFS: cvmfsd status '${cvmfsd_w_status:-unknown}'"
            fi
            ;;
    esac
fi
unset cvmfsd_w_config cvmfsd_w_mode cvmfsd_w_status cvmfsd_w_policy cvmfsd_w_why cvmfsd_w_dir
unset -f cvmfsd_w_get cvmfsd_w_say cvmfsd_w_fail
# ---- end of cvmfsd_job_wrapper.sh ----
