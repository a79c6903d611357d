"""Code that runs inside a stage process (internal).

Installed as :mod:`streampipe.stages`. What it holds:

- the stage API a user implements (:mod:`.api`, :mod:`.columns`, the sink API :mod:`.delivery`);
- the stage-process runtime (:mod:`.runtime`: the loop and its owned parts), and what it calls
  (:mod:`.process`, :mod:`.poison`, :mod:`.ackpoints`, :mod:`.seen`, :mod:`.network`, :mod:`.fence`);
- what both sides share (:mod:`.spec`, :mod:`.wire`, :mod:`.state`, :mod:`.registry`);
- children the supervisor runs (:mod:`.repartition` with :mod:`.segments`, :mod:`.introspect`);
- the built-in stages and their helpers, in :mod:`.builtins`.
 Stage authors import from :mod:`streampipe`, not from
here. Stage code never imports :mod:`streampipe.launcher` or :mod:`streampipe.monitor`.
"""
