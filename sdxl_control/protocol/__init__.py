"""Layer 3, the condition protocol: the condition value and its four channels (:mod:`.conditions`), attaching and
detaching exactly (:mod:`.attach`, :mod:`.attention`), the prompt's text and weights (:mod:`.text`,
:mod:`.emphasis`), samplers and schedules (:mod:`.schedule`), guidance (:mod:`.guidance`) and the fast path's
attention kernels (:mod:`.fast`). Every family is written against this layer."""
