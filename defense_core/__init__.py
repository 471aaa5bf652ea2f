"""Cleanroom's engine: a pure PyTorch library for backdoor purification (TSBD).

No web, database or queue imports live here; ``api`` and ``worker`` are thin
layers over this package. Where things are:

* ``jobs`` — job kinds (``purify``): :class:`~defense_core.jobs.request.PurifyRequest`,
  the request every entry point builds, validates and loads; ``jobs.params``, the
  parameter table and :class:`~defense_core.jobs.params.PurifyConfig`;
* ``pipeline.purify`` — run a defense on loaded inputs; ``defenses`` — ``tsbd``, ``ft``;
  ``result`` — the Result document;
* ``registry`` (architectures and the :class:`~defense_core.registry.Registry` helper),
  ``attacks`` (triggers), ``tsbd`` (the stages), ``device``/``cpu_mode``/``cpu_mode_cache``
  (where and how to compute), ``sandbox`` (the contained child).
"""
