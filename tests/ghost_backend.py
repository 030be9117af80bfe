"""A backend whose framework is not installed, for the runner's test."""

import no_such_framework_xyz  # noqa: F401
