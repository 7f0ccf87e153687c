"""``python -m cvmfsd``: the same as the ``cvmfsd`` command."""

from cvmfsd.cli import main

raise SystemExit(main())
