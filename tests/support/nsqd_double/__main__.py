"""``python -m tests.support.nsqd_double``: run the NSQ protocol double (flags as nsqd's)."""

import sys

from .daemon import main

sys.exit(main())
