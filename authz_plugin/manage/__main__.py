"""``python3 -m authz_plugin.manage`` runs fdcs-manage."""

import sys

from . import main

sys.exit(main())
