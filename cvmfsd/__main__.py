"""``python -m cvmfsd``: the same as the ``cvmfsd`` command."""

from cvmfsd.timeline import mark

mark("interpreter")

from cvmfsd.cli import main  # noqa: E402

raise SystemExit(main())
