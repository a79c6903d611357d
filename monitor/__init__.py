"""Health of stage processes: restart policy, psutil readings, heartbeat liveness, events.

Nothing here imports :mod:`streampipe.stages`: the monitor knows stages by pid, heartbeat and exit code.
"""
