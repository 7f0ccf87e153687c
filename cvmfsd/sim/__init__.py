"""A simulated CernVM-FS: a local stratum, a drop-in ``cvmfs2`` and a ``cvmfs_talk`` client."""
