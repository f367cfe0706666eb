"""The one logger desktune writes to ("desktune"); users configure it like any other."""

import logging

logger = logging.getLogger("desktune")
