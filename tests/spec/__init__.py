"""An executable specification of llama.cpp's memory bookkeeping, independent of pymem.

Modules: ``batch`` (canonicalisation, validation, splitters), ``kv`` (KV cache),
``recurrent`` (recurrent state memory), ``memory`` (the five memory types),
``decode`` (the decode flow, synthetic compute, state envelopes), ``layout`` (blob
walker), ``state`` (byte reader/writer), ``runs`` (building spec memories for recorded
runs), ``report`` (docs/verification.md).
"""
