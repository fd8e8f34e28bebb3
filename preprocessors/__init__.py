"""Image preprocessors for conditions (edges, depth, pose, faces), imported as ``sdxl_control.preprocessors``."""
