"""`python -m lit_align.memory --config X.yaml`: the same as `lit_align plan-memory`."""

import sys

from lit_align.memory.config import main

sys.exit(main())
