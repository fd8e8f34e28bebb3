"""Layer 6 (above the families in ``adapters`` and ``preprocessors``), the passes a generation makes: the request and
the :class:`~sdxl_control.passes.generator.Generator` that runs it through the engine, with hires and the face detailer
(:mod:`.detailer`)."""
