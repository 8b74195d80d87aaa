"""Chaos drills, the full run: every drill of `tests/chaos/drills.py`, each on a cluster of its own (a redis-server
with an append-only file, `sdqueue api`, two `sdqueue worker` processes on the tiny checkpoint, `sdqueue webhooks`
and a loopback webhook receiver), with more jobs and repetitions than `make test` runs (`drills.FULL`).

One figure line per drill on stdout, for BENCHMARKS.md: jobs and their outcomes, faults injected, seconds from a
fault until the last job ended, RQ retries and client retries spent, and the drill's own figures. A drill whose end
state is wrong prints FAILED with its first problems; the exit status is the number of failed drills.

`OPEN_WINDOWS` names the drills that fail on the current code because a crash window is still open, with the
failure seen; they stay out of the collected tests (`tests/chaos/test_drills.py`) until it is closed, and run here.

    python bench/chaos.py [--drill NAME ...] [--short] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.chaos import drills
from tests.chaos.cluster import Cluster

log = logging.getLogger("bench.chaos")

# drill -> what fails on the current code, and why; none are open now (each drill runs in make test too).
OPEN_WINDOWS: dict[str, str] = {}


def run_drill(name: str, size: drills.Size, workdir: Path, checkpoint: Path) -> bool:
    """Run one drill on a fresh cluster; writes its figure line (or its failure) to stdout."""
    cluster = Cluster(workdir, checkpoint)
    began = time.monotonic()
    try:
        cluster.start()
        figure = drills.DRILLS[name](cluster, size)
    except AssertionError as exc:
        known = f" (open window: {OPEN_WINDOWS[name]})" if name in OPEN_WINDOWS else ""
        lines = str(exc).splitlines()
        sys.stdout.write(f"{name}: FAILED after {time.monotonic() - began:.0f} s{known}\n  "
                         + "\n  ".join(lines[:12]) + "\n")
        log.debug("%s", exc)
        return False
    finally:
        sys.stdout.flush()
        cluster.stop()
    sys.stdout.write(figure.line() + "\n")
    sys.stdout.flush()
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drill", action="append", choices=sorted(drills.DRILLS),
                        help="run only this drill (repeatable; default: all)")
    parser.add_argument("--short", action="store_true", help="the sizes `make test` runs")
    parser.add_argument("--workdir", type=Path, help="keep the logs, Redis files and images here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per poll
    size = drills.SHORT if args.short else drills.FULL
    names = args.drill or list(drills.DRILLS)
    with tempfile.TemporaryDirectory(prefix="sdq-chaos-") as tmp:
        root = args.workdir or Path(tmp)
        from model.weights import save_random_checkpoint, tiny_configs

        root.mkdir(parents=True, exist_ok=True)
        checkpoint = save_random_checkpoint(root / "tiny.safetensors", *tiny_configs())
        failed = [name for name in names if not run_drill(name, size, root / name, checkpoint)]
    if failed:
        log.warning("failed drills: %s", ", ".join(failed))
    return len(failed)


if __name__ == "__main__":
    sys.exit(main())
