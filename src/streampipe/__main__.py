"""``python -m streampipe ...`` is ``streampipe ...`` (used by ``up --detach`` and by benchmarks run
from an unactivated virtualenv)."""

from streampipe.launcher.cli import main

if __name__ == "__main__":
    main()
