"""``python -m streampipe.stages``: run one stage replica described by ``$STREAMPIPE_SPEC`` (a cold start)."""

from __future__ import annotations

import os
import sys

from streampipe.stages.proctitle import set_title, starting
from streampipe.stages.spec import ENV_VAR, StageSpec

if __name__ == "__main__":
    text = os.environ.get(ENV_VAR)
    if not text:
        print(f"{ENV_VAR} is not set: stage processes are started by `streampipe up`", file=sys.stderr)
        sys.exit(2)
    spec = StageSpec.from_json(text)
    set_title(starting(spec.ident), spec.pipeline)     # before the runtime's imports (up to 2 s with scikit-learn)
    from streampipe.stages.runtime import main

    sys.exit(main(spec))
