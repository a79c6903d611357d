"""``python -m launcher ...`` is ``streampipe ...`` (used by ``up --detach`` for the daemon)."""

from launcher.cli import main

if __name__ == "__main__":
    main()
