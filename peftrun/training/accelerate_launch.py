"""`accelerate launch` as `peftrun launch` runs it: the same command line, but a rank that fails ends the
launcher with torchrun's summary of the failed ranks (which rank, its exit code or signal, its host) and
exit code 1, without the launcher's own traceback on top."""

from __future__ import annotations

import subprocess
import sys


def main() -> None:
    from accelerate.commands.launch import main as accelerate_main
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        accelerate_main()
    except ChildFailedError as exc:  # torchrun's agent: several ranks, one or more failed
        print(exc.format_msg(), file=sys.stderr, flush=True)
        sys.exit(1)
    except subprocess.CalledProcessError as exc:  # one process, started plainly: it has said why itself
        sys.exit(exc.returncode if exc.returncode > 0 else 1)


if __name__ == "__main__":
    main()
