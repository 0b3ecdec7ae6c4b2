"""``python -m modelcd.routing`` runs the built-in router process (see ``proxy``)."""

import sys

from modelcd.routing.proxy import main

sys.exit(main())
