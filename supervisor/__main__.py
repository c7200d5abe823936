"""``python -m wsfleet.supervisor``: started by the front, never by hand."""

from .arbiter import main

raise SystemExit(main())
