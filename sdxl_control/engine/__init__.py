"""Layer 4, the engine: loading a stage's models (:mod:`.models`), the VAE and its decoders (:mod:`.vae`), start
images (:mod:`.start`), the one denoising loop (:mod:`.loop`) with step caching (:mod:`.step_cache`) and live
previews (:mod:`.preview`), upscalers (:mod:`.upscale`) and devices (:mod:`.devices`). It knows the protocol, not the
families."""
