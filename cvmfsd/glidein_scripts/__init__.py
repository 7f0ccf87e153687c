"""GlideinWMS custom scripts that start and stop cvmfsd (shipped as package data)."""
