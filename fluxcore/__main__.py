import os
import sys

from fluxcore.cli import main

status = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # Under torchrun the process group is gone by now (the CLI destroys it); leave without the
    # interpreter's teardown, where a gloo rank holding a context-parallel mesh can abort
    # ("terminate called without an active exception") after its work is written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status or 0)
raise SystemExit(status)
