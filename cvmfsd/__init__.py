"""cvmfsd: provide CVMFS to a grid pilot without root, and keep it healthy."""

__version__ = "0.1.0"
