"""Layer 7, jobs: what a user asks for (:mod:`.spec`'s ``JobSpec``), resolved against a model policy
(:mod:`.resolvers`), its needs checked, run by the one :class:`~sdxl_control.jobs.runner.Runner`, in batches
(:mod:`.batch`, :mod:`.ray_batch`) and imported from PNGs (:mod:`.png_import`). Presets (``sdxl_control.presets``)
belong to this layer. Every front-end calls into it."""
