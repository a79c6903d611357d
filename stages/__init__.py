"""Code that runs inside a stage process: the runtime and the built-in stages (internal).

Installed as :mod:`streampipe.stages`. Stage authors import from :mod:`streampipe`, not from
here. Stage code never imports :mod:`streampipe.launcher` or :mod:`streampipe.monitor`.
"""
