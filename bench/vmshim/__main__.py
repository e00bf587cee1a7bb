"""Owns: `python -m bench.vmshim` (the shim executable's entry)."""
from __future__ import annotations

import sys

from bench.vmshim.main import main

sys.exit(main())
