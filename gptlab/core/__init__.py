"""The framework's core, one module per concept.

Torch-free: ``errors``, ``config``, ``hookspecs``, ``files`` (atomic writes), ``paths`` (cache
folders), ``runs`` (run-folder names, the metrics log). With torch: ``devices``, ``attention``
(the attention interface), ``interfaces`` (tokenizer, block, model base classes), ``plugins``
(loading, the registry), ``dispatch`` (attention backend selection), ``build`` (pre-flight,
model construction), ``generation``, ``evaluation``, ``checkpoint`` (the checkpoint format),
``trainer``.
"""
