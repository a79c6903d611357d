"""The built-in stages (``type: generator``, ``consumer``, ``postgres`` ...) and their helpers.

Each is an ordinary stage written against :mod:`streampipe.stages.api`, as a user's stage is: the
runtime knows them only by the names in :data:`streampipe.stages.registry.BUILTINS`. Stages:
``generator``, ``follow``, ``http``, ``log_extractor`` (sources); ``normalizer``, ``trainer``,
``evaluator``, ``predictor``, ``compare``, ``serve``; ``consumer``, ``sqlite``, ``postgres`` (sinks);
``nats``/``nats_sink`` and ``redis``/``redis_sink`` (brokers in and out). Helpers: ``brokers``,
``checkpoints``, ``drift``, ``learning``, ``parquet_parts``, ``serving``, ``httpserver``.
"""
