#!/bin/sh
# cvmfsd_classad.sh -- GlideinWMS periodic script: cvmfsd's state in the startd's ClassAd.
#
# A file entry with a `period` runs through HTCondor's startd_cron, and what it
# prints on stdout is added to the machine ClassAd, each attribute behind a
# prefix (GLIDEIN_PS_ by default; prefix="NOPREFIX" keeps the names as they
# are printed) (glideinWMS doc/factory/custom_scripts.html, "Periodic
# scripts").  This prints `cvmfsctl classad`: HAS_CVMFS_<repo>, and
# CVMFS_<repo>_REVISION, _NIOERR, _LAST_IOERR, _STATE, _HIT_RATIO,
# _MOUNT_SECONDS, after OSPool's advertise-base names.  Configure it as
#
#   <file absfname="cvmfsd_classad.sh" executable="True" period="300"
#         prefix="NOPREFIX" after_entry="True" comment="cvmfsd ClassAd"/>
#
# Called as `cvmfsd_classad.sh <glidein_config>`.  When cvmfsd does not answer
# it prints HAS_CVMFS_CVMFSD = False (so START expressions can tell), and
# exits 0: a periodic script's failure is not the place to end a glidein.

glidein_config=$1
value() {
    grep "^$1 " "$glidein_config" 2>/dev/null | tail -n 1 | cut -d' ' -f2-
}
ctl=$(value CVMFSCTL)
socket=$(value CVMFSD_SOCKET)
if [ -n "$ctl" ] && [ -n "$socket" ] && ad=$("$ctl" --socket "$socket" classad 2>/dev/null)
then
    printf '%s\n' "$ad"
    echo "HAS_CVMFS_CVMFSD = True"
else
    echo "HAS_CVMFS_CVMFSD = False"
fi
exit 0
