"""`python -m shapline`: the `shapline` command."""

from __future__ import annotations

import sys

from shapline.flows.cli import main

sys.exit(main())
