"""Fault injection for crash tests: run a lens command that SIGKILLs itself at a chosen point.

    python -m tests.kill_at <module:attr.path> <nth call> before|after -- <lens cli args...>

wraps the named function (e.g. `lens.checkpoint:write_manifest`, `lens.train:Trainer.rollout`) so that its
nth call kills the process with SIGKILL before or after the real call: the same signal `kill -9` sends,
at a point no test could hit reliably from outside.
"""

import functools
import importlib
import os
import signal
import sys


def arm(target: str, nth: int, when: str) -> None:
    module_name, attr_path = target.split(":")
    owner = importlib.import_module(module_name)
    *parents, name = attr_path.split(".")
    for part in parents:
        owner = getattr(owner, part)
    real = getattr(owner, name)
    calls = 0

    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == nth and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        out = real(*args, **kwargs)
        if calls == nth and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(owner, name, wrapper)


if __name__ == "__main__":
    target, nth, when, sep, *cli_args = sys.argv[1:]
    assert sep == "--" and when in ("before", "after"), __doc__
    arm(target, int(nth), when)
    from lens.cli import main

    sys.exit(main(cli_args))
