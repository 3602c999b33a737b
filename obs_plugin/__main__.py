"""`python -m obs_plugin ...` = `dreamstream obs ...`, for a machine that has only the companion's deps."""

import sys

from obs_plugin.companion import main

sys.exit(main())
