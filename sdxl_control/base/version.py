"""The release of sdxl-control, which recipes record (kept here, at the ground floor, so the passes that write recipes
need not import the package's ``__init__``).

Example:
    >>> VERSION.count(".")
    2
"""

VERSION = "0.3.0"
