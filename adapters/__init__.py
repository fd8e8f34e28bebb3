"""Condition families, one module per family (ControlNet, IP-Adapter, identity, LoRA), imported as
``sdxl_control.adapters``. Each module defines frozen :class:`sdxl_control.Condition` values and the mechanism
that attaches them."""
