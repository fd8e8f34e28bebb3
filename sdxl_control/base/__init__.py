"""Layer 0, the ground floor: errors and their exit codes, validation helpers, files and how recipes name them, model
references, defaults, process caches, image reading, the stage and step-window values. Imports nothing else of
sdxl-control.

The layers, from the ground up (each imports only from those below it; ``tests/test_layers.py`` checks it):
``base`` → ``records`` → ``weights`` → ``protocol`` → ``engine`` → the condition families (``adapters``,
``preprocessors``) → ``passes`` → ``jobs`` (``presets`` with them) → the front-ends (``cli``, ``ui``).
"""
