"""``python -m imaging_gateway`` runs the command-line interface."""

from imaging_gateway.cli import main

raise SystemExit(main())
