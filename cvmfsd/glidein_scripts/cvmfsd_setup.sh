#!/bin/bash
# cvmfsd_setup.sh -- GlideinWMS set-up script: start cvmfsd, which provides CVMFS
# for the rest of the glidein and its jobs.
#
# glidein_startup.sh runs it at start-up as `cvmfsd_setup.sh glidein_config <id>`
# (an `exec` file of a file list) and reports through error_gen.  It starts
# `cvmfsd run` in the background, waits until cvmfsd has provided CVMFS (or
# decided by the policy to go on without), publishes what the jobs need, and
# reports: error_gen -ok, or error_gen -error with cvmfsd's own message and
# hint and the exit status 1.  It never runs GlideinWMS's cvmfs_setup.sh
# machinery and does not need GLIDEIN_USE_CVMFSEXEC (see "Policy").
#
# What the Factory/Frontend configures
# ------------------------------------
# Files, in this order, in a file list fetched BEFORE singularity_setup.sh and
# the Singularity wrapper (the entry's file list, or the Frontend's
# after_entry="False" list):
#   1. cvmfsd_job_wrapper.sh  wrapper="True": jobs enter /cvmfs through it (mode 3)
#   2. cvmfsd_cleanup.sh      executable="True", and the attribute
#      GLIDEIN_CLEANUP_SCRIPT=cvmfsd_cleanup.sh as a PARAMETER (see that script)
#   3. cvmfsd_setup.sh        executable="True" (this script)
# The job-wrapper fragment must be fetched before this script runs: in mode 3
# cvmfsd writes GWMS_IS_CVMFS yes only if the fragment is in WRAPPER_LIST.
# cvmfsd itself (CVMFSD_BIN) and the cvmfsexec builds (CVMFSEXEC_DIR) come as
# the site prefers (an untar file, a shared path).
#
# Policy (glidein_config attributes, as GlideinWMS reads them)
#   GLIDEIN_USE_CVMFS      Frontend, 0|1: empty skips (ok); 1 = required
#   GLIDEIN_CVMFS_REQUIRE  Factory, required|preferred|never (any case); with
#                          GLIDEIN_USE_CVMFS=1, never skips (ok); with 0, only
#                          required|preferred start cvmfsd
#   GLIDEIN_CVMFS          required|preferred|optional|never: read only when
#                          neither of the two above is set
#   GLIDEIN_USE_CVMFSEXEC  GlideinWMS's OWN switch: 1 runs its cvmfs_setup.sh,
#                          which mounts into the same CVMFSEXEC_DIR; cvmfsd then
#                          stands aside (ok).  Leave it unset or 0.
# With none of them set, CVMFS was not requested: skip (ok).
#
# Other attributes read (all optional but GLIDEIN_CVMFS_REPOS):
#   GLIDEIN_CVMFS_REPOS      repositories, colon- or comma-separated (required:
#                            an empty list is an error, not "ready")
#   CVMFSEXEC_DIR            cvmfsexec distribution, or GlideinWMS's directory of
#                            self-extracting cvmfsexec-<src>-<os><ver>-<arch> files
#   CVMFSD_BIN               the cvmfsd command (default: cvmfsd on PATH), or the
#                            one-file bundle (a name ending in .pyz): then run with
#                            the first Python >= 3.9 of CVMFSD_PYTHON, python3,
#                            python3.14 ... python3.9, platform-python (PATH, then
#                            /usr/libexec); with none, the policy decides: an error
#                            under required, else the glidein goes on without CVMFS
#   CVMFSD_PYTHON            the interpreter for the bundle, tried first
#   CVMFSD_CACHE             where the bundle may keep its unpacked, compiled copy
#                            (default: GLIDEIN_WORK_DIR/cvmfsd-cache; "none": run it
#                            from the zip, slower to start)
#   CVMFSD_MODE              auto|host|3|2|1 (default auto)
#   CVMFSD_METRICS_LISTEN    HOST:PORT for /metrics, or none (default 127.0.0.1:0;
#                            the bound address is written back as CVMFSD_METRICS_ADDRESS)
#   CVMFSD_METRICS_TEXTFILE  node-exporter textfile to write the metrics to
#   CVMFSD_PUSHGATEWAY       Pushgateway URL to push the metrics to
#   CVMFSD_METRICS_INTERVAL  seconds between metric collections (default 15)
#   CVMFSD_GRACE             seconds between SIGTERM and SIGKILL at the end (default 30)
#   CVMFSD_MOUNT_TIMEOUT     seconds allowed for mounting (default 300)
#   CVMFSD_HANG_TIMEOUT      seconds a repository may hang before it is remounted (120)
#   CVMFSD_PROBE_INTERVAL    seconds between health probes (default 15)
#   CVMFSD_PROBE_DEADLINE    seconds before a probe counts as hung (default 5)
#   CVMFSD_SETUP_TIMEOUT     seconds this script waits for cvmfsd (default 600)
#   CVMFSD_LOG_LEVEL         debug|info|warning|error (default info)
#   CVMFSD_LOG               cvmfsd's log, JSON lines (default GLIDEIN_WORK_DIR/cvmfsd.log)
#
# Written back (by cvmfsd): CVMFSD_STATUS (mounting, ready, without-cvmfs,
# failed, stopped), GWMS_IS_CVMFS (yes only when the jobs will see CVMFS),
# GWMS_CVMFSEXEC_MODE, CVMFS_MOUNT_DIR (modes 1/2: <dist>/dist/cvmfs; mode 3 and
# the host's /cvmfs: empty), CVMFSD_PID, CVMFSD_SOCKET, CVMFSCTL, CVMFSD_POLICY,
# CVMFSD_METRICS_ADDRESS, HAS_UNPRIVILEGED_USER_NAMESPACES, and on failure
# CVMFSD_ERROR, CVMFSD_HINT, CVMFSD_FAILURE.  By this script: CVMFSD_LOG, and
# the condor_vars lines (add_condor_vars_line) that put CVMFSD_SOCKET, CVMFSCTL
# and CVMFS_MOUNT_DIR in every job's environment.
#
# The payload: a holder
# ---------------------
# `cvmfsd run` runs a payload where CVMFS is and provides CVMFS as long as it
# runs; in mode 3 the mounts live only in the namespace around it.  The glidein
# goes on outside (set-up scripts cannot move glidein_startup.sh into the
# namespace), and the jobs enter it one by one through the job-wrapper
# fragment (`cvmfsctl enter`).  So the payload is only a holder: a shell named
# cvmfsd-namespace-holder (its $0, seen in ps) that sleeps, runs and prints
# nothing else, and exits 0 when cvmfsd stops it (SIGTERM from
# cvmfsd_cleanup.sh at glidein exit).  In modes 1/2 it keeps cvmfsd, and so
# the mounts, for the glidein's life in the same way.

me=cvmfsd_setup.sh
glidein_config=$1
# glidein_startup.sh passes it relative; cvmfsd and the cleanup script get the real path
glidein_config=$(readlink -f -- "$glidein_config" 2>/dev/null || echo "$PWD/$glidein_config")

# The last occurrence of KEY wins; the value is the rest of the line.
config_value() {
    { tac "$glidein_config" | grep -m1 "^$1 " | cut -d' ' -f2-; } 2>/dev/null
}
trimmed() {  # the value of KEY without surrounding blanks
    local v
    v=$(config_value "$1")
    v=${v#"${v%%[![:space:]]*}"}
    printf '%s' "${v%"${v##*[![:space:]]}"}"
}
lower() { printf '%s' "$1" | tr '[:upper:]' '[:lower:]'; }

error_gen=$(config_value ERROR_GEN_PATH)
report_ok() {  # MESSAGE [METRIC VALUE]...
    echo "$me: $1"
    if [ -n "$error_gen" ]; then
        "$error_gen" -ok "$me" msg "$@"
    fi
    exit 0
}
report_error() {  # CATEGORY DETAIL [METRIC VALUE]...
    echo "$me: $2" >&2
    if [ -n "$error_gen" ]; then
        "$error_gen" -error "$me" "$@"
    fi
    exit 1
}

[ -r "$glidein_config" ] || report_error WN_Resource "cannot read glidein_config '$glidein_config'"

# --- policy: whether to start cvmfsd at all (cvmfsd/glidein.py resolves the same) ---
gwms_own=$(trimmed GLIDEIN_USE_CVMFSEXEC)
use=$(trimmed GLIDEIN_USE_CVMFS)
require=$(lower "$(trimmed GLIDEIN_CVMFS_REQUIRE)")
old_policy=$(lower "$(trimmed GLIDEIN_CVMFS)")
if [[ $gwms_own =~ ^[+]?0*1$ ]]; then
    report_ok "GLIDEIN_USE_CVMFSEXEC=$gwms_own: GlideinWMS's own cvmfs_setup.sh provides CVMFS; cvmfsd not started"
fi
if [ -n "$use" ] || [ -n "$require" ]; then
    said="GLIDEIN_USE_CVMFS=${use:-(unset)}, GLIDEIN_CVMFS_REQUIRE=${require:-(unset)}"
    [ -n "$use" ] || report_ok "$said: CVMFS not requested; cvmfsd not started"
    case $use in
        0|1) ;;
        *) report_error Config "GLIDEIN_USE_CVMFS='$use' is not valid; expected 0 or 1, or empty" \
               attribute GLIDEIN_USE_CVMFS ;;
    esac
    case $require in
        ''|required|preferred|optional|never) ;;
        *) report_error Config "GLIDEIN_CVMFS_REQUIRE='$require' is not valid; expected required|preferred|never, or empty" \
               attribute GLIDEIN_CVMFS_REQUIRE ;;
    esac
    [ "$require" != never ] || report_ok "$said: CVMFS not to be used here; cvmfsd not started"
    [ "$use" = 1 ] || [ -n "$require" ] || report_ok "$said: CVMFS not requested; cvmfsd not started"
else
    case $old_policy in
        '') report_ok "CVMFS not requested (GLIDEIN_USE_CVMFS, GLIDEIN_CVMFS_REQUIRE and GLIDEIN_CVMFS unset); cvmfsd not started" ;;
        never) report_ok "GLIDEIN_CVMFS=never; cvmfsd not started" ;;
        required|preferred|optional) ;;
        *) report_error Config "GLIDEIN_CVMFS='$old_policy' is not valid; expected required|preferred|optional|never" \
               attribute GLIDEIN_CVMFS ;;
    esac
fi

# --- what cvmfsd is told ------------------------------------------------------------
cvmfsd=$(config_value CVMFSD_BIN)
cvmfsd=${cvmfsd:-$(command -v cvmfsd)}
case $cvmfsd in
    *.pyz) [ -r "$cvmfsd" ] || report_error WN_Resource \
               "cannot read the cvmfsd bundle '$cvmfsd' (CVMFSD_BIN)" attribute CVMFSD_BIN ;;
    *) [ -x "$cvmfsd" ] || report_error WN_Resource \
           "cvmfsd not found (set CVMFSD_BIN or put it on PATH)" attribute CVMFSD_BIN ;;
esac
repos=$(trimmed GLIDEIN_CVMFS_REPOS)
[ -n "${repos//[:,[:space:]]/}" ] || report_error Config \
    "GLIDEIN_CVMFS_REPOS is empty: no CVMFS repository to provide" attribute GLIDEIN_CVMFS_REPOS
args=(run --glidein-config "$glidein_config" --repos "$repos" --log-format json)
dist=$(config_value CVMFSEXEC_DIR)
[ -z "$dist" ] || args+=(--dist "$dist")
option() {  # ATTRIBUTE FLAG [number]: pass the attribute's value, if set, as FLAG
    local value
    value=$(trimmed "$1")
    [ -n "$value" ] || return 0
    if [ "$3" = number ] && ! [[ $value =~ ^[0-9]+([.][0-9]*)?$ ]]; then
        report_error Config "$1='$value' is not valid; expected a number of seconds" attribute "$1"
    fi
    args+=("$2" "$value")
}
option CVMFSD_MODE --mode
option CVMFSD_METRICS_LISTEN --metrics-address
option CVMFSD_METRICS_TEXTFILE --metrics-textfile
option CVMFSD_PUSHGATEWAY --pushgateway
option CVMFSD_LOG_LEVEL --log-level
for pair in METRICS_INTERVAL:--metrics-interval GRACE:--grace MOUNT_TIMEOUT:--mount-timeout \
        HANG_TIMEOUT:--hang-timeout PROBE_INTERVAL:--probe-interval PROBE_DEADLINE:--probe-deadline; do
    option "CVMFSD_${pair%%:*}" "${pair#*:}" number
done
timeout=$(trimmed CVMFSD_SETUP_TIMEOUT)
timeout=${timeout:-600}
[[ $timeout =~ ^[0-9]+$ ]] || report_error Config \
    "CVMFSD_SETUP_TIMEOUT='$timeout' is not valid; expected whole seconds" attribute CVMFSD_SETUP_TIMEOUT
work_dir=$(config_value GLIDEIN_WORK_DIR)
log=$(config_value CVMFSD_LOG)
log=${log:-${work_dir:-$(dirname "$glidein_config")}/cvmfsd.log}

# GlideinWMS's own helpers: gconfig_add and add_condor_vars_line.
add_config_line_source=$(config_value ADD_CONFIG_LINE_SOURCE)
if [ -r "$add_config_line_source" ]; then
    # shellcheck source=/dev/null
    . "$add_config_line_source"
fi
condor_vars_file=$(config_value CONDOR_VARS_FILE)
if declare -F gconfig_add >/dev/null; then
    gconfig_add CVMFSD_LOG "$log"
fi

# --- the bundle: an interpreter to run it -----------------------------------------------
# The policy as cvmfsd resolves it (cvmfsd/glidein.py resolve_policy): USE=1 is
# required; otherwise GLIDEIN_CVMFS_REQUIRE, or else the old GLIDEIN_CVMFS.
if [ "$use" = 1 ]; then
    policy_here=required
elif [ -n "$use$require" ]; then
    policy_here=$require
else
    policy_here=$old_policy
fi
found=
find_python() {  # python := the first interpreter >= 3.9; found := what was seen
    local candidate path version
    for candidate in $(trimmed CVMFSD_PYTHON) python3 python3.14 python3.13 python3.12 \
            python3.11 python3.10 python3.9 platform-python /usr/libexec/platform-python; do
        path=$(command -v "$candidate" 2>/dev/null) || continue
        version=$("$path" -I -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' \
            2>/dev/null) || version=unusable
        found="$found${found:+, }$candidate $version ($path)"
        case $version in
            3.9.*|3.[1-9][0-9].*) python=$path; return 0 ;;
        esac
    done
    return 1
}
cvmfsd_cmd=("$cvmfsd")
case $cvmfsd in
    *.pyz)
        if ! find_python; then
            problem="no Python >= 3.9 to run the cvmfsd bundle $cvmfsd: found ${found:-none of python3, python3.14 ... python3.9, platform-python} (PATH=$PATH; set CVMFSD_PYTHON)"
            [ "$policy_here" != required ] || report_error WN_Resource "$problem" \
                attribute CVMFSD_PYTHON
            if declare -F gconfig_add >/dev/null; then
                gconfig_add CVMFSD_STATUS without-cvmfs
                gconfig_add GWMS_IS_CVMFS no
                gconfig_add CVMFSD_ERROR "$problem"
            fi
            report_ok "continuing without CVMFS, as the policy (${policy_here:-preferred}) allows: $problem" \
                mode none
        fi
        cvmfsd_cmd=("$python" -I "$cvmfsd")
        cache=$(trimmed CVMFSD_CACHE)
        cache=${cache:-${work_dir:+$work_dir/cvmfsd-cache}}
        if [ -n "$cache" ] && [ "$cache" != none ]; then
            export CVMFSD_CACHE=$cache
        fi
        ;;
esac

# --- start cvmfsd, with the holder as its payload ---------------------------------------
holder='exec >/dev/null 2>&1  # it has nothing to say; the log is cvmfsd'"'"'s, in JSON
trap "kill \$nap; exit 0" TERM INT HUP
cd / || exit 1
while :; do sleep 86400 & nap=$!; wait $nap; done'
nohup "${cvmfsd_cmd[@]}" "${args[@]}" -- /bin/sh -c "$holder" cvmfsd-namespace-holder \
    </dev/null >>"$log" 2>&1 &
pid=$!

status=
deadline=$((SECONDS + timeout))
while [ "$SECONDS" -lt "$deadline" ]; do
    if [ "$(config_value CVMFSD_PID)" = "$pid" ]; then
        status=$(config_value CVMFSD_STATUS)
        case $status in ready|without-cvmfs|failed|stopped) break ;; esac
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
done

stop_cvmfsd() {  # stop it and wait (bounded) for it to exit
    kill -TERM "$pid" 2>/dev/null
    local grace
    grace=$(trimmed CVMFSD_GRACE)
    grace=${grace%%.*}
    for _ in $(seq $(((${grace:-30} + 10) * 5))); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
}
why() {  # cvmfsd's own error and hint, or else the last line of its log
    local error hint
    error=$(config_value CVMFSD_ERROR)
    hint=$(config_value CVMFSD_HINT)
    if [ -z "$error" ]; then
        error=$(grep -v '^[[:space:]]*$' "$log" 2>/dev/null | tail -n 1 | cut -c1-500)
        error=${error:-no message}
    fi
    printf '%s%s (log: %s)' "$error" "${hint:+; hint: $hint}" "$log"
}
publish() {  # put NAME in every job's environment (condor_vars.lst columns, GlideinWMS's way)
    if declare -F add_condor_vars_line >/dev/null && [ -n "$condor_vars_file" ]; then
        # NAME  S=quoted string  -=no default  +=same name in condor  N=not required
        # N=not in the startd ClassAd  +=in the job's environment as NAME
        add_condor_vars_line "$1" "S" "-" "+" "N" "N" "+"
    else
        echo "$me: cannot publish $1 to jobs (no add_condor_vars_line or CONDOR_VARS_FILE)" >&2
    fi
}

mode=$(config_value GWMS_CVMFSEXEC_MODE)
policy=$(config_value CVMFSD_POLICY)
case $status in
    ready|without-cvmfs)
        for name in CVMFSD_SOCKET CVMFSCTL CVMFS_MOUNT_DIR; do
            publish "$name"
        done
        ;;
esac
case $status in
    ready)
        if [ "$(config_value GWMS_IS_CVMFS)" != yes ]; then
            problem="CVMFS is mounted in mode $mode but the jobs cannot reach it: cvmfsd_job_wrapper.sh is not in WRAPPER_LIST ($(config_value WRAPPER_LIST)); list it as a wrapper file fetched before $me"
            if [ "$policy" = required ]; then
                stop_cvmfsd
                report_error Config "$problem" cvmfsd_pid "$pid"
            fi
            report_ok "continuing without CVMFS for the jobs: $problem" cvmfsd_pid "$pid" mode none
        fi
        report_ok "CVMFS ready (cvmfsexec mode ${mode:-0}), cvmfsd pid $pid" cvmfsd_pid "$pid" \
            mode "${mode:-0}"
        ;;
    without-cvmfs)
        reason=$(config_value CVMFSD_ERROR)
        report_ok "continuing without CVMFS, as the policy (${policy:-preferred}) allows${reason:+: $reason} (log: $log)" \
            cvmfsd_pid "$pid" mode none
        ;;
esac
if [ -z "$status" ] && kill -0 "$pid" 2>/dev/null; then
    stop_cvmfsd
    report_error WN_Resource "cvmfsd did not get ready within $timeout s (log: $log)" cvmfsd_pid "$pid"
fi
wait "$pid"
code=$?
category=$(config_value CVMFSD_FAILURE)
report_error "${category:-WN_Resource}" "cvmfsd could not provide CVMFS (exit $code): $(why)" \
    cvmfsd_pid "$pid"
