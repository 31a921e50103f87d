"""The tq test suite.

Without an NVIDIA GPU (as in CI) the numba.cuda kernels run on Numba's CUDA simulator, at small
sizes. Numba reads NUMBA_ENABLE_CUDASIM when it is first imported, so it is set here, before
conftest.py imports tq; set it to 0 or 1 yourself to override.
"""

import os
from pathlib import Path

if "NUMBA_ENABLE_CUDASIM" not in os.environ and not Path("/dev/nvidia0").exists():
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
