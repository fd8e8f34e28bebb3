"""Layer 1, the formats as data: A1111's parameters text (:mod:`.infotext`) and the recipe a PNG carries
(:mod:`.recipe`). They read and write text and JSON; nothing here loads a model."""
